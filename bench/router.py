"""Which steps does HAM's router cache, and would another score have kept the informative ones? Side by side.

Two parts, each a markdown table (written with ``--out``):

``untrained``: a fresh memory per configuration on a periodic stream (one-hot symbols cycling with period 8) with
one new symbol (the cue) at a random step in [20, 100], 200 steps, 200 episodes, step form: the fraction of
episodes whose cue was cached, of the predictable steps cached (after the first two periods, which are new to the
RNN too) and the steps cached per episode. It asks whether a score finds novelty before any training.

``trained RUN_DIR ...``: for each trained run, what its own router caches (``ham_rl.evaluate``: return, KV fraction,
cache recall and precision, step 0 cached), then, on 128 greedy episodes of that agent, every candidate score
computed from its trained memory (the RNN's prediction ``v_hat`` of each step's value ``v``) with one threshold
per score set so that a given fraction of all steps is cached: the recall each score would reach at that budget.
It asks whether training leaves a score that still singles out the informative steps.

``cues RUN_DIR ...``: per cue of a cue-recall run (the cue's index in the observation's first ``num_cues`` features),
over 200 greedy episodes: how often the run's own router cached it, and the return when it was shown. It asks
whether a router that misses some cues misses them at random or always the same ones.

``fresh ENV_ID``: fresh agents (ham at its defaults, seeds 0-2) on a registered env, 64 episodes each with actions
sampled from the untrained policy (what the first rollouts see), with and without the previous action among the
features: the same candidate scores and budgets as ``trained``, and the cue's rank among its episode's steps. It asks
whether the features the router scores hold noise that outranks the informative steps before any training.

    python bench/router.py untrained --out docs/router/untrained.md
    python bench/router.py trained runs/cue_ham_s0 runs/cue_ham_s1 --kv 0.05 0.03 --out docs/router/trained.md
    python bench/router.py cues runs/d1000_ham_s2
    python bench/router.py fresh ham_rl/CueRecallRandomD1000-v0 --kv 0.05 0.01 --out docs/router/fresh-d1000.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ham_rl.agents import RecurrentActorCritic
from ham_rl.config import load_run_config
from ham_rl.envs import VecEnv
from ham_rl.envs.recall_tasks import novelty_stream
from ham_rl.evaluate import evaluate_run, load_run_agent
from ham_rl.kernels.gated_delta_rule import gated_delta_rule
from ham_rl.kernels.ham_step import surprise_score
from ham_rl.memory import make_memory
from ham_rl.routing import informative_flags

PERIOD, VOCAB, STEPS, EPISODES = 8, 12, 200, 200

#: (label, ham options) of the untrained comparison
COSINE = dict(score="cosine", target_fraction=None)  # the spec's router: scale-free score, fixed tau
UNTRAINED = [
    ("cosine, conv on q/k/v (before 2026-12-01), tau 0.5", dict(COSINE, conv_path="qkv", threshold=0.5)),
    ("cosine, conv on q/k/v, tau 0.3", dict(COSINE, conv_path="qkv", threshold=0.3)),
    ("cosine, conv local, tau 0.5", dict(COSINE, threshold=0.5)),
    ("cosine, conv local, tau 0.3", dict(COSINE, threshold=0.3)),
    ("cosine, no conv, tau 0.3", dict(COSINE, conv_size=0, threshold=0.3)),
    ("error, conv local, tau 0.15 (the defaults)", {}),
    ("error, conv local, tau 0.13", dict(threshold=0.13)),
    ("time feature on, cosine, tau 0.3", dict(COSINE, time_feature=True, threshold=0.3)),
]


def periodic_stream(seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``[EPISODES, STEPS, VOCAB]`` one-hot periodic stream with one new symbol per episode, and the cue steps."""
    x, cue_at = novelty_stream(np.random.default_rng(seed), EPISODES, STEPS, PERIOD, VOCAB)
    return torch.from_numpy(x), cue_at


def untrained_row(options: dict, seed: int) -> tuple[float, float, float]:
    """(cue cached, predictable cached, cached per episode) of a fresh ham with ``options``."""
    torch.manual_seed(seed)
    mem = make_memory("ham", VOCAB, 64, **options)
    x, cue_at = periodic_stream(seed)
    state, cached = mem.initial_state(EPISODES), []
    with torch.no_grad():
        for t in range(STEPS):
            _, state = mem.step(x[:, t], state, torch.full((EPISODES,), t == 0), inplace=True)
            cached.append(mem.last_routing[1].clone())
    c = torch.stack(cached, 1).numpy()
    rows = np.arange(EPISODES)
    predictable = np.ones_like(c)
    predictable[:, : 2 * PERIOD] = False
    predictable[rows, cue_at] = False
    return float(c[rows, cue_at].mean()), float(c[predictable].mean()), float(c.sum(1).mean())


def untrained(seeds: list[int]) -> str:
    lines = [
        "| configuration | cue cached | predictable steps cached | cached per episode |",
        "|---|---:|---:|---:|",
    ]
    for label, options in UNTRAINED:
        rows = np.array([untrained_row(options, s) for s in seeds])
        cue, pred, per_ep = rows.mean(0)
        lines.append(f"| {label} | {cue:.2f} (min {rows[:, 0].min():.2f}) | {pred:.3f} | {per_ep:.1f} |")
    return "\n".join(lines)


def candidate_scores(v_hat: torch.Tensor, v: torch.Tensor) -> dict[str, np.ndarray]:
    """Every score the comparison ranks, ``[B, T, H, d] -> [B, T]`` each."""
    cos = torch.nn.functional.cosine_similarity(v_hat, v, dim=-1)
    err = (v - v_hat).norm(dim=-1)
    return {
        "cosine, min over heads (spec)": (1 - cos).amin(-1).numpy(),
        "cosine, mean over heads": (1 - cos).mean(-1).numpy(),
        "error, min over heads": err.amin(-1).numpy(),
        "error, RMS over heads (score=error)": (v - v_hat).square().mean((-2, -1)).sqrt().numpy(),
        "error's share of the value, all heads (score=relative)": surprise_score(v_hat, v, "relative").numpy(),
        "value norm alone (no prediction)": v.norm(dim=-1).mean(-1).numpy(),
    }


def run_agent(run_dir: Path, episodes: int) -> tuple[RecurrentActorCritic, VecEnv]:
    """The run's trained agent (eval mode) and ``episodes`` envs of its task, seeded apart from training."""
    cfg = load_run_config(run_dir)
    venv = VecEnv(cfg.env.id, episodes, seed=int(cfg.seed) + 2000, prev_action=cfg.env.prev_action,
                  prev_reward=cfg.env.prev_reward)  # fmt: skip
    agent = load_run_agent(run_dir, venv, cfg)
    return agent, venv


def play(agent: RecurrentActorCritic, venv: VecEnv, deterministic: bool) -> dict[str, np.ndarray]:
    """One episode in every env (fixed-length episodes: all start and end together): per step ``[envs, T]`` the
    features ``x`` (``[envs, T, F]``), ``informative`` flags, ``routed`` (what the memory cached) and ``reward``."""
    x, start = venv.reset()
    state, out = agent.initial_state(venv.num_envs), {"x": [], "informative": [], "routed": [], "reward": []}
    with torch.no_grad():
        while True:
            out["x"].append(x)
            out["informative"].append(informative_flags(venv.infos) == 1)
            action, _, _, state = agent.step(torch.from_numpy(x), state, torch.from_numpy(start), deterministic=deterministic)
            routing = getattr(agent.memory, "last_routing", None)  # None: a memory without a router caches nothing
            out["routed"].append(np.zeros(venv.num_envs, dtype=bool) if routing is None else routing[1].numpy())
            x, reward, start, _ = venv.step(agent.action_head.to_env(action))
            out["reward"].append(reward)
            if start.all():
                break
    venv.close()
    return {key: np.stack(value, 1) for key, value in out.items()}


def greedy_episodes(run_dir: Path, episodes: int = 128) -> tuple[RecurrentActorCritic, torch.Tensor, np.ndarray]:
    """The run's agent, the features ``[episodes, T, F]`` of its greedy episodes and their informative flags."""
    agent, venv = run_agent(run_dir, episodes)
    seen = play(agent, venv, deterministic=True)
    return agent, torch.from_numpy(seen["x"]), seen["informative"]


def sampled_episodes(env_id: str, seed: int, prev_action: bool, episodes: int = 64):
    """A fresh ham agent, the features ``[episodes, T, F]`` of its sampled episodes and their informative flags."""
    torch.manual_seed(seed)
    venv = VecEnv(env_id, episodes, seed=seed + 1000, prev_action=prev_action, prev_reward=True)
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, "ham", 64)
    seen = play(agent, venv, deterministic=False)
    return agent, torch.from_numpy(seen["x"]), seen["informative"]


def predictions(agent: RecurrentActorCritic, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v_hat, v)`` of the agent's memory on whole episodes ``x``: its own input stage and delta rule."""
    mem = agent.memory
    starts = torch.zeros(x.shape[:2], dtype=torch.bool)
    starts[:, 0] = True
    with torch.no_grad():
        state = mem.initial_state(x.shape[0])
        xx, steps = mem._prepare(agent.encoder(x), state, starts)
        p, S, _ = mem._inputs(xx, state, steps)
        _, v_hat, _ = gated_delta_rule(p["q"], p["k"], p["v"], p["beta"], p["g"], starts, S)
    return v_hat, p["v"]


def recall_cells(score: np.ndarray, informative: np.ndarray, budgets: list[float]) -> list[str]:
    """The share of informative steps whose score is in the top ``kv`` of all steps, per budget."""
    cells = []
    for kv in budgets:
        cached = score >= np.quantile(score, 1 - kv)
        cells.append(f"{cached[informative].mean():.2f}" if informative.any() else "-")
    return cells


def fresh(env_id: str, budgets: list[float], seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    lines = [
        "| previous action in the features | seed | score | "
        + " | ".join(f"recall at KV {k:.0%}" for k in budgets)
        + " | informative step's rank (share of its episode below it) |",
        "|---|---:|---|" + "---:|" * (len(budgets) + 1),
    ]  # fmt: skip
    for prev_action in (True, False):
        for seed in seeds:
            agent, x, informative = sampled_episodes(env_id, seed, prev_action)
            v_hat, v = predictions(agent, x)
            for i, (label, score) in enumerate(candidate_scores(v_hat, v).items()):
                ranks = [(score[e] < score[e][informative[e]].max()).mean() for e in range(len(score)) if informative[e].any()]
                head = f"{'yes' if prev_action else 'no'} | {seed}" if i == 0 else " | "
                cells = recall_cells(score, informative, budgets) + [f"{np.mean(ranks):.3f}"]
                lines.append(f"| {head} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cues(run_dirs: list[Path], num_cues: int = 4, episodes: int = 200) -> str:
    lines = ["| run | cue | episodes | cached | return |", "|---|---:|---:|---:|---:|"]
    for run_dir in run_dirs:
        seen = play(*run_agent(run_dir, episodes), deterministic=True)
        shown = seen["informative"]  # [episodes, T]: the cue's step (one per episode)
        has_cue = shown.any(1)
        rows, at = np.arange(episodes), shown.argmax(1)
        cue = np.where(has_cue, seen["x"][rows, at, :num_cues].argmax(1), -1)
        cached = has_cue & seen["routed"][rows, at]
        ret = seen["reward"].sum(1)
        for c in range(num_cues):
            m = cue == c
            lines.append(f"| {run_dir.name} | {c} | {m.sum()} | {cached[m].mean():.2f} | {ret[m].mean():.2f} |")
    return "\n".join(lines)


def trained(run_dirs: list[Path], budgets: list[float]) -> str:
    lines = [
        "| run | its router: return, KV, recall, precision, step 0 | score | "
        + " | ".join(f"recall at KV {k:.0%}" for k in budgets) + " |",
        "|---|---|---|" + "---:|" * len(budgets),
    ]  # fmt: skip
    for run_dir in run_dirs:
        own = evaluate_run(run_dir, {"episodes": 200}, quiet=True)[0]
        agent, x, informative = greedy_episodes(run_dir)
        v_hat, v = predictions(agent, x)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        summary = (f"{own['mean_return']:.2f}, {fmt(own['kv_fraction'])}, {fmt(own['cache_recall'])}, "
                   f"{fmt(own['cache_precision'])}, {fmt(own['step0_cached'])}")  # fmt: skip
        for i, (label, score) in enumerate(candidate_scores(v_hat, v).items()):
            cells = recall_cells(score, informative, budgets)
            head = f"{run_dir.name} | {summary}" if i == 0 else " | "
            lines.append(f"| {head} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    u = sub.add_parser("untrained", help="fresh memories on a periodic stream with one cue")
    u.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t = sub.add_parser("trained", help="trained run dirs: their router and every candidate score at a KV budget")
    t.add_argument("runs", type=Path, nargs="+")
    t.add_argument("--kv", type=float, nargs="+", default=[0.05, 0.03], help="KV fractions to compare the scores at")
    c = sub.add_parser("cues", help="cue-recall run dirs: per cue, how often their router cached it")
    c.add_argument("runs", type=Path, nargs="+")
    f = sub.add_parser("fresh", help="fresh agents on an env, sampled actions, with and without the previous action")
    f.add_argument("env_id")
    f.add_argument("--kv", type=float, nargs="+", default=[0.05, 0.01], help="KV fractions to compare the scores at")
    for p in (u, t, c, f):
        p.add_argument("--out", type=Path, help="also write the table (markdown) here")
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("trained", "fresh") and not all(0 < k < 1 for k in args.kv):
        parser.error(f"--kv takes fractions in (0, 1), got {args.kv}")
    if args.part == "untrained":
        table = untrained(args.seeds)
    elif args.part == "cues":
        table = cues(args.runs)
    elif args.part == "fresh":
        table = fresh(args.env_id, args.kv)
    else:
        table = trained(args.runs, args.kv)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
