"""Supervised recall benchmark: can each memory learn recall by gradient, and how fast?

For every memory: encoder + memory + actor head of ``ham_rl.agents.RecurrentActorCritic`` trained with
cross-entropy on the answer steps only (Adam 1e-3, 32 fresh episodes per update, a fixed update budget); reports
the episodes until the running accuracy (mean over the last 4 updates, each measured on its batch before the
update, so on unseen episodes) passes the target, or "not reached (final accuracy)". No RL: this separates "can
the memory learn it" from PPO's credit assignment. The episodes come from the same generators as the
``ham_rl/*`` recall envs (envs/recall_tasks.py), observations only (no previous action or reward).

For memories with a KV cache it also runs the sequence form on fresh episodes after training and reads the
cache: KV fraction (entries / steps) and the fraction of informative steps (the cue, the pairs) it holds.

    python bench/recall.py --quick
    python bench/recall.py --tasks cue-random-d50,ar-16 --memories ham,gdn,attention --updates 600
    python bench/recall.py --memory-kwargs '{"time_feature": false, "conv_size": 0}' --name off
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from torch.nn import functional as F

from ham_rl.agents import RecurrentActorCritic
from ham_rl.envs.recall_tasks import RecallBatch, associative_recall_batch, cue_recall_batch
from ham_rl.memory import MEMORIES, memory_options


def _cue(delay: int, random_step: bool, noise: bool) -> dict:
    return dict(delay=delay, cue_steps=delay // 2 if random_step else 1, distractors="random" if noise else "periodic")


def _ar(pairs: int) -> dict:
    # one key vocabulary for every N (64 >= the largest N), so only the number of pairs changes the difficulty
    return dict(num_pairs=pairs, num_keys=64, num_values=8, context_len=max(32, 4 * pairs), num_questions=8)


#: task name -> (generator, its kwargs)
TASKS: dict[str, tuple] = {
    **{
        f"cue-{'random' if r else 'first'}-d{d}{'-noise' if n else ''}": (cue_recall_batch, _cue(d, r, n))
        for d in (50, 200, 1000)
        for r in (False, True)
        for n in (False, True)
    },
    **{f"ar-{n}": (associative_recall_batch, _ar(n)) for n in (4, 8, 16, 32, 64)},
}
QUICK_TASKS = ["cue-random-d50", "ar-4"]
WINDOW = 4  # updates in the running accuracy


def build(memory: str, obs_dim: int, num_actions: int, memory_kwargs: dict) -> tuple[RecurrentActorCritic, list[str]]:
    """The policy with ``memory_kwargs`` this memory accepts; returns it and the options it does not take."""
    allowed = memory_options(memory)
    opts = {k: v for k, v in memory_kwargs.items() if k in allowed}
    model = RecurrentActorCritic(obs_dim, spaces.Discrete(num_actions), memory=memory, memory_options=opts)
    return model, sorted(set(memory_kwargs) - set(allowed))


def logits_of(model: RecurrentActorCritic, batch: RecallBatch):
    """Sequence form over whole episodes: actor logits at every step and the final memory state."""
    x = torch.from_numpy(batch.obs)
    starts = torch.zeros(x.shape[:2], dtype=torch.bool)
    starts[:, 0] = True
    y, state = model.memory(model.encoder(x), model.initial_state(x.shape[0]), starts)
    return model.actor(y), state


def cache_stats(model: RecurrentActorCritic, gen, kwargs: dict, rng: np.random.Generator, n: int = 64) -> tuple:
    """KV fraction and fraction of informative steps cached, on ``n`` fresh episodes (None without a cache)."""
    batch = gen(rng, n, **kwargs)
    with torch.no_grad():
        _, state = logits_of(model, batch)
    if state.cache is None:
        return None, None
    times, length = state.cache.times.numpy(), state.cache.length.numpy()
    cached = np.zeros_like(batch.informative)
    for b in range(n):
        cached[b, times[b, : length[b]]] = True
    kv = float(length.sum() / batch.informative.size)
    return kv, float((cached & batch.informative).sum() / batch.informative.sum())


def run_one(memory: str, task: str, updates: int, seed: int, memory_kwargs: dict, target: float, batch: int) -> dict:
    """Train one memory on one task; episodes to ``target`` accuracy, the accuracy curve and the cache stats."""
    gen, kwargs = TASKS[task]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    probe = gen(rng, 1, **kwargs)
    num_actions = kwargs.get("num_cues", kwargs.get("num_values", 4))
    model, ignored = build(memory, probe.obs.shape[2], num_actions, memory_kwargs)
    params = [*model.encoder.parameters(), *model.memory.parameters(), *model.actor.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    t0, curve, reached = time.perf_counter(), [], None
    for u in range(updates):
        data = gen(rng, batch, **kwargs)
        logits, _ = logits_of(model, data)
        answers = torch.from_numpy(data.answers)
        asked = answers >= 0
        loss = F.cross_entropy(logits[asked], answers[asked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float((logits[asked].argmax(-1) == answers[asked]).float().mean()))
        if u + 1 >= WINDOW and np.mean(curve[-WINDOW:]) >= target:
            reached = (u + 1) * batch
            break
    kv, informative = cache_stats(model, gen, kwargs, np.random.default_rng(seed + 10_000))
    return dict(memory=memory, task=task, episodes=reached, final_acc=float(np.mean(curve[-WINDOW:])), updates=len(curve),
                kv_fraction=kv, informative_cached=informative, seconds=time.perf_counter() - t0,
                ignored=",".join(ignored), curve=curve)  # fmt: skip


def cell(r: dict) -> str:
    """One table cell: episodes to the target or the final accuracy, and what the cache held."""
    out = f"{r['episodes']:,}" if r["episodes"] is not None else f"not reached ({r['final_acc']:.2f})"
    if r["kv_fraction"] is not None and r["memory"] != "attention":
        out += f" · KV {r['kv_fraction']:.0%} · inf {r['informative_cached']:.0%}"
    return out


def markdown(results: list[dict], tasks: list[str], memories: list[str]) -> str:
    """Memory x task table of episodes to the target."""
    by = {(r["memory"], r["task"]): r for r in results}
    lines = ["| memory | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m in memories:
        lines.append(f"| {m} | " + " | ".join(cell(by[m, t]) if (m, t) in by else "" for t in tasks) + " |")
    return "\n".join(lines)


def plot(results: list[dict], tasks: list[str], path: Path, target: float, batch: int) -> None:
    """Accuracy curves, one panel per task, one line per memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for r in (r for r in results if r["task"] == task):
            acc = np.convolve(r["curve"], np.ones(WINDOW) / WINDOW, mode="valid") if len(r["curve"]) >= WINDOW else []
            ax.plot(np.arange(WINDOW, len(r["curve"]) + 1) * batch, acc, label=r["memory"], lw=1.2)
        ax.axhline(target, color="grey", ls=":", lw=0.8)
        ax.set(title=task, xlabel="episodes", ylabel="running accuracy", ylim=(0, 1.02))
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_list(value: str, allowed: list[str], what: str) -> list[str]:
    """Comma list, each item checked against ``allowed``."""
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what} {', '.join(bad) or repr(value)}; allowed: {', '.join(allowed)}")
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memories", default=",".join(MEMORIES), help="comma list of ham_rl.MEMORIES")
    p.add_argument("--tasks", default=None, help=f"comma list of {', '.join(TASKS)} (default: all)")
    p.add_argument("--updates", type=int, default=600, help="update budget per memory and task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-kwargs", default="{}", help="JSON options for make_memory (each memory takes the ones it has)")
    p.add_argument("--target", type=float, default=0.95, help="running accuracy that counts as learned")
    p.add_argument("--batch", type=int, default=32, help="episodes per update")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_TASKS)}, 60 updates")
    p.add_argument("--name", default="recall", help="file stem of the CSV, markdown and PNG written to --out")
    p.add_argument("--out", default="docs/recall", help="folder for the outputs")
    args = p.parse_args()
    torch.set_num_threads(1)
    memories = parse_list(args.memories, list(MEMORIES), "memory")
    tasks = parse_list(args.tasks or ",".join(QUICK_TASKS if args.quick else TASKS), list(TASKS), "task")
    updates = 60 if args.quick else args.updates
    if updates < WINDOW:
        raise SystemExit(f"--updates must be >= {WINDOW}, got {updates}")
    try:
        memory_kwargs = json.loads(args.memory_kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--memory-kwargs must be a JSON object, got {args.memory_kwargs!r} ({e})") from e
    if not isinstance(memory_kwargs, dict):
        raise SystemExit(f"--memory-kwargs must be a JSON object, got {args.memory_kwargs!r}")

    results = []
    for task in tasks:
        for m in memories:
            r = run_one(m, task, updates, args.seed, memory_kwargs, args.target, args.batch)
            results.append(r)
            note = f" (ignored: {r['ignored']})" if r["ignored"] else ""
            print(f"{task:22s} {m:12s} {cell(r):44s} {r['updates']:5d} updates {r['seconds']:7.1f} s{note}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, tasks, memories)
    print(f"\nepisodes to {args.target:.0%} running accuracy ({updates} updates x {args.batch} episodes at most), "
          f"memory kwargs {memory_kwargs}, seed {args.seed}\n\n{table}")  # fmt: skip
    (out / f"{args.name}.md").write_text(table + "\n")
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in results[0] if k != "curve"], extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    plot(results, tasks, out / f"{args.name}.png", args.target, args.batch)
    print(f"wrote {out / args.name}.md, .csv, .png")


if __name__ == "__main__":
    main()
