"""Training throughput, side by side in one process: our PPO with ham and with gru vs sb3-contrib RecurrentPPO (LSTM).

Every contender trains for the same number of env steps, with the same env, number of envs, rollout length and
memory size. RecurrentPPO runs in one or both of two settings (--sb3-settings):

- matched: the same PPO work as ours (minibatch count --minibatches, 4 epochs, lr, entropy coefficient) and the same
  architecture (one LSTM shared by actor and critic, as our policy shares its memory). The ratio is then the
  implementation alone.
- defaults: RecurrentPPO as ``RecurrentPPO("MlpLstmPolicy", env, n_steps=..., policy_kwargs=dict(lstm_hidden_size=...))``
  gives it: batch_size 128, 10 epochs, a second LSTM for the critic. The ratio is then what a user switching trainers
  sees, including the difference in gradient work per env step.

Prints the median env-steps/s over the repeats (contenders interleaved so that machine load hits all alike) and the
ratios to each RecurrentPPO setting.

    python bench/throughput.py                  # the trainer's defaults: 32 envs x 64 steps, 8 minibatches; 3 repeats
    python bench/throughput.py --num-envs 8 --num-steps 128 --minibatches 4 --sb3-settings matched
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

if __package__ in (None, ""):  # `python bench/<name>.py`: bench.contenders comes from the checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench.contenders import SB3_SETTINGS, make_ours, make_recurrent_ppo
from ham_rl.agents import PPOConfig


def _config(args) -> PPOConfig:
    return PPOConfig(
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        num_minibatches=args.minibatches,
        update_epochs=4,
        learning_rate=5e-4,
        anneal_lr=False,
        ent_coef=0.01,
    )


def ours(memory: str, args) -> float:
    ppo = make_ours(args.env, memory, args.hidden, _config(args), args.steps, seed=0)
    t = time.perf_counter()
    while ppo.update < ppo.num_updates:
        ppo.iterate()
    return ppo.global_step / (time.perf_counter() - t)


def recurrent_ppo(args, settings: str) -> float:
    model = make_recurrent_ppo(args.env, settings, args.hidden, _config(args), seed=0)
    t = time.perf_counter()
    model.learn(args.steps)
    return model.num_timesteps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="popgym-repeat")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument(
        "--minibatches", type=int, default=8, help="minibatches per epoch (RecurrentPPO: batch_size = envs*steps/this)"
    )
    p.add_argument("--steps", type=int, default=16384, help="env steps per contender per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every contender")
    p.add_argument(
        "--sb3-settings",
        nargs="*",
        choices=SB3_SETTINGS,
        default=list(SB3_SETTINGS),
        help="RecurrentPPO settings to time (none: skip it)",
    )
    args = p.parse_args()
    if args.steps < args.num_envs * args.num_steps:
        p.error("--steps must be >= num_envs * num_steps")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    contenders = {"ours-ham": lambda: ours("ham", args), "ours-gru": lambda: ours("gru", args)}
    for settings in args.sb3_settings:
        contenders[f"RecurrentPPO-{settings}"] = lambda settings=settings: recurrent_ppo(args, settings)
    results: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.repeats):
        for name, fn in contenders.items():
            results[name].append(fn())
            print(f"repeat {r + 1}/{args.repeats} {name:24s} {results[name][-1]:10.0f} steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nenv={args.env} num_envs={args.num_envs} num_steps={args.num_steps} hidden={args.hidden} "
        f"steps={args.steps} repeats={args.repeats} threads={args.threads}"
    )
    bases = {k: v for k, v in med.items() if k.startswith("RecurrentPPO")}
    print(f"{'contender':24s} {'steps/s (median)':>18s}" + "".join(f" {'x ' + k:>24s}" for k in bases))
    for k, v in med.items():
        print(f"{k:24s} {v:18.0f}" + "".join(f" {v / b:24.2f}" for b in bases.values()))
    for k, b in bases.items():
        print(f"\nours-ham / {k} = {med['ours-ham'] / b:.2f}x (target >= 10x); ours-gru / {k} = {med['ours-gru'] / b:.2f}x")


if __name__ == "__main__":
    main()
