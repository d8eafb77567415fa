"""HAMRecurrentPPO (HAM memory) against stock sb3-contrib RecurrentPPO (LSTM), side by side in one run.

Both train on the same env, for the same steps, with the same hidden size and PPO hyperparameters; runs alternate
(HAM, LSTM, HAM, LSTM, ...) so that machine drift hits both. Prints steps/s per run, the medians and their ratio,
and the ratio within each repeat (back-to-back runs) with its median.
The defaults are RecurrentPPO's own (n_steps 128, batch_size 128, n_epochs 10, hidden 256), on 8 envs and one
torch thread (on this 2-core machine both models run faster on one thread than on two).

    python -m bench.sb3                                   # ham vs LSTM, RecurrentPPO defaults, 3072 steps, 3 repeats
    python -m bench.sb3 --hidden-size 128 --batch-size 256 --n-epochs 4 --steps 4096 --also lstm gru
    python -m bench.sb3 --memory-kwargs '{"num_heads": 4, "target_fraction": 0.3}'

``--also NAME ...`` adds HAMRecurrentPPO runs with other memories of the family (e.g. ``lstm``: the same
LSTM cell as the stock run, through the whole-row training pass), which separates the adapter's gain from the
memory's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import popgym  # noqa: F401  (registers popgym-*-v0)
import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from ham_rl.sb3 import HAMRecurrentPPO


class RolloutTimer(BaseCallback):
    """Splits wall time into rollout collection and the rest (mostly train())."""

    def __init__(self):
        super().__init__()
        self.rollout_s = 0.0
        self._t0 = 0.0

    def _on_rollout_start(self) -> None:
        self._t0 = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.rollout_s += time.perf_counter() - self._t0

    def _on_step(self) -> bool:
        return True


def run_one(label: str, args: argparse.Namespace, memory: str | None, seed: int) -> dict:
    """Train one model for ``args.steps`` steps; ``memory=None`` is stock RecurrentPPO with its LSTM."""
    env = make_vec_env(args.env, n_envs=args.n_envs, seed=seed)
    common = dict(n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs, seed=seed, device="cpu")
    if memory is None:
        model = RecurrentPPO("MlpLstmPolicy", env, policy_kwargs=dict(lstm_hidden_size=args.hidden_size), **common)
    else:
        memory_kwargs = args.memory_kwargs if memory == args.memory else {}
        policy_kwargs = dict(memory=memory, memory_kwargs=memory_kwargs, hidden_size=args.hidden_size)
        model = HAMRecurrentPPO("MlpHamPolicy", env, policy_kwargs=policy_kwargs, **common)
    timer = RolloutTimer()
    start = time.perf_counter()
    model.learn(args.steps, callback=timer)
    wall = time.perf_counter() - start
    n = model.num_timesteps
    returns = [e["r"] for e in model.ep_info_buffer]
    row = dict(
        label=label,
        steps=n,
        wall_s=wall,
        sps=n / wall,
        rollout_sps=n / timer.rollout_s,
        train_s=wall - timer.rollout_s,
        ep_rew_mean=float(np.mean(returns)) if returns else float("nan"),
    )
    print(
        f"  {label:28s} steps={n:6d} wall={wall:7.2f}s sps={row['sps']:7.0f} rollout_sps={row['rollout_sps']:7.0f} "
        f"train_s={row['train_s']:6.2f} ep_rew_mean={row['ep_rew_mean']:+.3f}",
        flush=True,
    )
    env.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="popgym-RepeatPreviousEasy-v0", help="gymnasium id")
    parser.add_argument("--memory", default="ham", help="memory of the HAMRecurrentPPO run")
    parser.add_argument("--memory-kwargs", type=json.loads, default={}, help="its options, as JSON")
    parser.add_argument("--also", nargs="*", default=[], help="more HAMRecurrentPPO memories to time (e.g. lstm gru)")
    parser.add_argument("--hidden-size", type=int, default=256, help="memory/LSTM hidden size (both)")
    parser.add_argument("--steps", type=int, default=3072, help="env steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model (the median is reported)")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up runs")
    args = parser.parse_args()
    if args.threads > 0:
        th.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*render_mode.*")

    models = [(f"HAMRecurrentPPO[{args.memory}]", args.memory), ("RecurrentPPO[LSTM]", None)]
    models += [(f"HAMRecurrentPPO[{m}]", m) for m in args.also]
    print(
        f"python {platform.python_version()} torch {th.__version__} threads {th.get_num_threads()} cpus {os.cpu_count()} | "
        f"env {args.env} n_envs {args.n_envs} n_steps {args.n_steps} batch_size {args.batch_size} n_epochs {args.n_epochs} "
        f"hidden {args.hidden_size} steps {args.steps} repeats {args.repeats} memory_kwargs {args.memory_kwargs}",
        flush=True,
    )
    results: dict[str, list[dict]] = {label: [] for label, _ in models}
    if args.warmup:
        # One short untimed run per model first: the first run in a process pays one-time costs (lazy imports,
        # allocator and BLAS warm-up) that would otherwise land on whichever model runs first.
        print("warm-up (not reported)", flush=True)
        warm = argparse.Namespace(**{**vars(args), "steps": args.n_envs * args.n_steps})
        for label, memory in models:
            run_one(label, warm, memory, seed=args.repeats)
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        for label, memory in models:  # alternate the models within each repeat
            results[label].append(run_one(label, args, memory, seed=r))

    print("\nmedian over repeats")
    med = {label: statistics.median(row["sps"] for row in rows) for label, rows in results.items()}
    for label, rows in results.items():
        train = statistics.median(row["train_s"] for row in rows)
        roll = statistics.median(row["rollout_sps"] for row in rows)
        print(f"  {label:28s} sps={med[label]:7.0f} rollout_sps={roll:7.0f} train_s={train:6.2f}")
    lstm = med["RecurrentPPO[LSTM]"]
    for label, _ in models:
        if label != "RecurrentPPO[LSTM]":
            # Runs of one repeat ran back to back, so their ratio cancels the machine's drift between repeats.
            paired = [a["sps"] / b["sps"] for a, b in zip(results[label], results["RecurrentPPO[LSTM]"], strict=True)]
            print(
                f"ratio {label} / RecurrentPPO[LSTM] = {med[label] / lstm:.2f}x (of the medians); "
                f"per repeat {', '.join(f'{r:.2f}x' for r in paired)}, median {statistics.median(paired):.2f}x"
            )


if __name__ == "__main__":
    main()
