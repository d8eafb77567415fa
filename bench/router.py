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

    python bench/router.py untrained --out docs/router/untrained.md
    python bench/router.py trained runs/cue_ham_s0 runs/cue_ham_s1 --kv 0.05 0.03 --out docs/router/trained.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ham_rl.agents import RecurrentActorCritic
from ham_rl.checkpoint import load_checkpoint
from ham_rl.config import load_run_config, memory_kwargs
from ham_rl.envs import VecEnv
from ham_rl.envs.recall_tasks import novelty_stream
from ham_rl.evaluate import evaluate_run
from ham_rl.kernels.gated_delta_rule import gated_delta_rule
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
        "value norm alone (no prediction)": v.norm(dim=-1).mean(-1).numpy(),
    }


def greedy_episodes(run_dir: Path, episodes: int = 128) -> tuple[RecurrentActorCritic, torch.Tensor, np.ndarray]:
    """The run's agent, the features ``[episodes, T, F]`` of its greedy episodes and their informative flags."""
    cfg, ckpt = load_run_config(run_dir), load_checkpoint(run_dir / "checkpoints" / "last.pt")
    venv = VecEnv(cfg.env.id, episodes, seed=int(cfg.seed) + 2000, prev_action=cfg.env.prev_action,
                  prev_reward=cfg.env.prev_reward)  # fmt: skip
    name, hidden, options = memory_kwargs(cfg.memory)
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, name, hidden, options,
                                 embed_size=int(cfg.agent.embed_size), head_size=int(cfg.agent.head_size))  # fmt: skip
    agent.load_state_dict(ckpt["ppo"]["agent"])
    agent.eval()
    x, start = venv.reset()
    state, xs, flags = agent.initial_state(episodes), [], []
    with torch.no_grad():
        while True:  # fixed-length episodes: every env starts and ends together
            xs.append(x)
            flags.append(informative_flags(venv.infos))
            action, _, _, state = agent.step(torch.from_numpy(x), state, torch.from_numpy(start), deterministic=True)
            x, _, start, _ = venv.step(agent.action_head.to_env(action))
            if start.all():
                break
    venv.close()
    return agent, torch.from_numpy(np.stack(xs, 1)), np.stack(flags, 1) == 1


def trained(run_dirs: list[Path], budgets: list[float]) -> str:
    lines = [
        "| run | its router: return, KV, recall, precision, step 0 | score | "
        + " | ".join(f"recall at KV {k:.0%}" for k in budgets) + " |",
        "|---|---|---|" + "---:|" * len(budgets),
    ]  # fmt: skip
    for run_dir in run_dirs:
        own = evaluate_run(run_dir, {"episodes": 200}, quiet=True)[0]
        agent, x, informative = greedy_episodes(run_dir)
        mem = agent.memory
        starts = torch.zeros(x.shape[:2], dtype=torch.bool)
        starts[:, 0] = True
        with torch.no_grad():  # the memory's own input stage and delta rule, to read the prediction v_hat
            state = mem.initial_state(x.shape[0])
            xx, steps = mem._prepare(agent.encoder(x), state, starts)
            p, S, _ = mem._inputs(xx, state, steps)
            _, v_hat, _ = gated_delta_rule(p["q"], p["k"], p["v"], p["beta"], p["g"], starts, S)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        summary = (f"{own['mean_return']:.2f}, {fmt(own['kv_fraction'])}, {fmt(own['cache_recall'])}, "
                   f"{fmt(own['cache_precision'])}, {fmt(own['step0_cached'])}")  # fmt: skip
        for i, (label, score) in enumerate(candidate_scores(v_hat, p["v"]).items()):
            cells = []
            for kv in budgets:
                cached = score >= np.quantile(score, 1 - kv)
                cells.append(f"{cached[informative].mean():.2f}" if informative.any() else "-")
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
    for p in (u, t):
        p.add_argument("--out", type=Path, help="also write the table (markdown) here")
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "untrained":
        table = untrained(args.seeds)
    else:
        if not all(0 < k < 1 for k in args.kv):
            parser.error(f"--kv takes fractions in (0, 1), got {args.kv}")
        table = trained(args.runs, args.kv)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
