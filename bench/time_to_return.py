"""Wall-clock time to a return: our trainer vs sb3-contrib RecurrentPPO, one after the other in one process.

Throughput alone hides how much each trainer learns per env step, so this trains each contender for the same
env steps on the same env, number of envs and rollout length, and reports when (env steps and seconds) the mean
return of the last 100 episodes first reaches each target, and where it ends.

- ours-<memory>: ``agents.PPO`` with the trainer's defaults (configs/agent/ppo.yaml) and that memory (ham, gru,
  or mlp: no memory, the floor).
- RecurrentPPO-defaults: ``RecurrentPPO("MlpLstmPolicy", env, n_steps=...)`` with an LSTM of the same hidden size and
  everything else at sb3-contrib's defaults (batch 128, 10 epochs, lr 3e-4, a critic LSTM).
- RecurrentPPO-matched: our PPO settings (minibatches of the same size, 4 epochs, lr 1e-3 annealed, entropy 0.01) and
  one LSTM shared by actor and critic.

    python bench/time_to_return.py                                  # popgym-repeat, 200k steps, seed 0
    python bench/time_to_return.py --contenders ours-ham RecurrentPPO-matched --steps 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

if __package__ in (None, ""):  # `python bench/<name>.py`: bench.contenders comes from the checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from bench.contenders import make_ours, make_recurrent_ppo
from ham_rl.agents import PPOConfig

CONTENDERS = ("ours-ham", "ours-gru", "ours-mlp", "RecurrentPPO-defaults", "RecurrentPPO-matched")
DEFAULT_CONTENDERS = ("ours-ham", "ours-gru", "RecurrentPPO-defaults", "RecurrentPPO-matched")


def ours(memory: str, args) -> list[tuple[int, float, float]]:
    """Train with our PPO; returns (env steps, seconds, mean return) after every update."""
    ppo = make_ours(args.env, memory, args.hidden, PPOConfig(), args.steps, args.seed)
    curve, t0 = [], time.perf_counter()
    while ppo.update < ppo.num_updates:
        stats = ppo.iterate()
        curve.append((ppo.global_step, time.perf_counter() - t0, stats["rollout/ep_rew_mean"]))
    return curve


def recurrent_ppo(settings: str, args) -> list[tuple[int, float, float]]:
    """Train sb3-contrib's RecurrentPPO; returns (env steps, seconds, mean return) after every rollout."""
    from stable_baselines3.common.callbacks import BaseCallback

    model = make_recurrent_ppo(args.env, settings, args.hidden, PPOConfig(), args.seed)
    curve: list[tuple[int, float, float]] = []

    class Record(BaseCallback):
        def _on_rollout_end(self) -> None:
            returns = [e["r"] for e in self.model.ep_info_buffer]
            curve.append((self.model.num_timesteps, time.perf_counter() - t0, float(np.mean(returns)) if returns else None))

        def _on_step(self) -> bool:
            return True

    t0 = time.perf_counter()
    model.learn(args.steps, callback=Record())
    return curve


def first_reach(curve, target: float) -> tuple[int, float] | None:
    """(env steps, seconds) of the first point whose mean return is >= target."""
    return next(((s, t) for s, t, r in curve if r is not None and r >= target), None)


def _fmt(ret: float | None) -> str:
    return "-" if ret is None else f"{ret:+.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="popgym-repeat")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--hidden", type=int, default=64, help="memory / LSTM hidden size (all contenders)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(DEFAULT_CONTENDERS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    rows = []
    for name in args.contenders:
        if name.startswith("ours-"):
            curve = ours(name.removeprefix("ours-"), args)
        else:
            curve = recurrent_ppo(name.removeprefix("RecurrentPPO-"), args)
        steps, seconds, ret = curve[-1]
        reached = [first_reach(curve, t) for t in args.targets]
        rows.append((name, steps, seconds, ret, reached))
        cells = "  ".join(
            f">={t:g}: " + (f"{r[0]:>7d} steps {r[1]:7.1f} s" if r else "never")
            for t, r in zip(args.targets, reached, strict=True)
        )
        print(f"{name:22s} final {_fmt(ret)} after {steps} steps, {seconds:7.1f} s  {cells}", flush=True)

    print(f"\nenv={args.env} steps={args.steps} hidden={args.hidden} seed={args.seed} threads={args.threads}")
    print("| contender | final return | wall s | steps/s | " + " | ".join(f"to {t:g}: steps, s" for t in args.targets) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(args.targets))
    for name, steps, seconds, ret, reached in rows:
        cells = " | ".join(f"{r[0]}, {r[1]:.0f}" if r else "never" for r in reached)
        print(f"| {name} | {_fmt(ret)} | {seconds:.0f} | {steps / seconds:.0f} | {cells} |")


if __name__ == "__main__":
    main()
