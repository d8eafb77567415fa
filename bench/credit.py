"""Where PPO's gradient on the memory comes from, on the cue tasks: the answer step against the steps whose action is
never rewarded.

A cue task rewards one action per episode (the answer at the last step); the other ``delay + 1`` actions earn
nothing, yet PPO's loss averages over all of them: their advantages (value errors, normalised with the answer's) push
the policy, and their value targets (the episode's discounted outcome) push the critic, both through the shared
memory. This bench measures, for an agent as PPO sees it (untrained, or after ``--train`` env steps), the
memory's and encoder's gradient on single minibatches of the trainer (4 whole episodes), split by loss term:

- ``pg answer`` / ``pg other``: the clipped policy loss at the answer steps / at every other step;
- ``value`` and ``entropy``: those terms of the loss, with their coefficients;
- ``signal``: the mean gradient of the answer's cross-entropy over every episode of all rollouts, less the same with
  the answers shuffled between episodes: the direction that teaches the memory to carry the cue, and nothing else
  (PPO's answer-step term points along it in expectation).

It prints each term's median norm and the median cosine of each with the signal, per task. A task whose
minibatch gradient points less along the signal needs more minibatches to move the memory the same way; the
gradient-norm clip (``max_grad_norm``) scales the whole step by the total norm, so the other terms also shrink the
signal's step. The trainer's defaults (``PPOConfig``) except ``num_steps``, which is set to the episode length so
that every row is one whole episode.

    python bench/credit.py                                     # ham, gru and attention at delays 50 and 200
    python bench/credit.py --memory ham --env ham_rl/CueRecallRandomD200-v0 --train 200000
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from ham_rl.agents import PPO, PPOConfig, RecurrentActorCritic
from ham_rl.envs import VecEnv, make_env

TERMS = ("pg answer", "pg other", "value", "entropy", "total")


def _flat(grads: tuple, params: list) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-12))


def measure(env_id: str, memory: str, rollouts: int, train_steps: int, seed: int) -> dict:
    """Median gradient norm and cosine with the signal of every loss term, over the minibatches of ``rollouts``."""
    probe = make_env(env_id).unwrapped
    episode, num_cues = probe.episode_len, int(probe.action_space.n)  # cue tasks without blank episodes
    cfg = PPOConfig(num_steps=episode)
    torch.manual_seed(seed)
    venv = VecEnv(env_id, cfg.num_envs, seed=seed)
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, 64)
    ppo = PPO(agent, venv, cfg, total_timesteps=max(train_steps, cfg.batch_size) + rollouts * cfg.batch_size)
    while ppo.global_step < train_steps:
        ppo.iterate()
    params = [p for p in list(agent.encoder.parameters()) + list(agent.memory.parameters()) if p.requires_grad]
    batches, answers = [], []
    for _ in range(rollouts):
        ppo.collect_rollout()
        if not ppo.starts[0].all():
            raise RuntimeError("rows are not whole episodes: the rollout must start at every env's episode start")
        adv, _ = ppo.compute_advantages()
        obs = torch.from_numpy(ppo.obs).transpose(0, 1)  # [B, T, D]
        answer = obs[:, :, :num_cues].sum(1).argmax(-1)  # the cue each episode showed
        returns = (adv + ppo.values).T
        batches.append(
            (obs, torch.from_numpy(ppo.starts).T, ppo.actions.T.clone(), ppo.logprobs.T.clone(), adv.T, returns, ppo.state0)
        )
        answers.append(answer)
    # the signal: the answer's cross-entropy over every episode, less the same with the answers shuffled between
    # episodes, so that what is left is the part that depends on the cue (not, say, on the answers' marginals)
    signal = torch.zeros(sum(p.numel() for p in params))
    shuffle = torch.Generator().manual_seed(seed)
    for (obs, starts, _, _, _, _, state0), answer in zip(batches, answers, strict=True):
        y, _ = agent.memory(agent.encoder(obs), state0, starts)
        logits = agent.actor(y[:, -1])
        shuffled = answer[torch.randperm(len(answer), generator=shuffle)]
        loss = F.cross_entropy(logits, answer) - F.cross_entropy(logits, shuffled)
        signal += _flat(torch.autograd.grad(loss, params, allow_unused=True), params)
    stats = {t: ([], []) for t in TERMS}
    rows = cfg.num_envs // cfg.num_minibatches
    for obs, starts, actions, old_logp, adv, returns, state0 in batches:
        for mb in torch.arange(cfg.num_envs).split(rows):
            logp, ent, value = agent.evaluate_actions(obs[mb], state0[mb], starts[mb], actions[mb])
            a = adv[mb]
            a = (a - a.mean()) / (a.std() + 1e-8)
            ratio = (logp - old_logp[mb]).exp()
            pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef))
            n = pg.numel()
            is_answer = torch.zeros_like(pg, dtype=torch.bool)
            is_answer[:, -1] = True
            terms = {
                "pg answer": pg[is_answer].sum() / n,
                "pg other": pg[~is_answer].sum() / n,
                "value": cfg.vf_coef * 0.5 * ((value - returns[mb]) ** 2).mean(),
                "entropy": -cfg.ent_coef * ent.mean(),
            }
            grads = {
                k: _flat(torch.autograd.grad(v, params, retain_graph=True, allow_unused=True), params)
                for k, v in terms.items()
            }
            grads["total"] = sum(grads.values())
            for k, g in grads.items():
                stats[k][0].append(float(g.norm()))
                stats[k][1].append(_cos(g, signal))
    return {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in stats.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", nargs="+", default=["ham_rl/CueRecallRandomD50-v0", "ham_rl/CueRecallRandomD200-v0"])
    p.add_argument("--memory", nargs="+", default=["ham", "gru", "attention"])
    p.add_argument("--rollouts", type=int, default=4, help="rollouts of 32 whole episodes per (env, memory)")
    p.add_argument("--train", type=int, default=0, help="PPO env steps before measuring (0: untrained)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"median over minibatches of 4 episodes; {args.rollouts} rollouts; after {args.train} env steps of PPO\n")
    print(
        "| env | memory | "
        + " | ".join(f"‖{t}‖" for t in TERMS)
        + " | "
        + " | ".join(f"cos({t}, signal)" for t in TERMS)
        + " |"
    )
    print("|---|---|" + "---:|" * (2 * len(TERMS)))
    for env_id in args.env:
        for memory in args.memory:
            s = measure(env_id, memory, args.rollouts, args.train, args.seed)
            norms = " | ".join(f"{s[t][0]:.3g}" for t in TERMS)
            coss = " | ".join(f"{s[t][1]:+.3f}" for t in TERMS)
            print(f"| {env_id} | {memory} | {norms} | {coss} |", flush=True)


if __name__ == "__main__":
    main()
