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

# bench/ holds kernels.py, memory.py ...: keep them from shadowing the packages of the same name, and find the repo
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np
import torch

CONTENDERS = ("ours-ham", "ours-gru", "ours-mlp", "RecurrentPPO-defaults", "RecurrentPPO-matched")
DEFAULT_CONTENDERS = ("ours-ham", "ours-gru", "RecurrentPPO-defaults", "RecurrentPPO-matched")


def ours(memory: str, args) -> list[tuple[int, float, float]]:
    """Train with our PPO; returns (env steps, seconds, mean return) after every update."""
    from agents import PPO, PPOConfig, RecurrentActorCritic
    from envs import VecEnv

    torch.manual_seed(args.seed)
    cfg = PPOConfig()
    venv = VecEnv(args.env, cfg.num_envs, seed=args.seed)
    opts = {"num_heads": 4} if memory.startswith("ham") else {}
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, args.hidden, opts)
    ppo = PPO(agent, venv, cfg, total_timesteps=args.steps)
    curve, t0 = [], time.perf_counter()
    while ppo.update < ppo.num_updates:
        stats = ppo.iterate()
        curve.append((ppo.global_step, time.perf_counter() - t0, stats["rollout/ep_rew_mean"]))
    return curve


def recurrent_ppo(settings: str, args) -> list[tuple[int, float, float]]:
    """Train sb3-contrib's RecurrentPPO; returns (env steps, seconds, mean return) after every rollout."""
    import popgym  # noqa: F401  (registers the popgym ids)
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from agents import PPOConfig
    from envs import resolve_env_id

    cfg = PPOConfig()
    env = make_vec_env(resolve_env_id(args.env), n_envs=cfg.num_envs, seed=args.seed)
    kwargs: dict = {}
    arch: dict = {}
    if settings == "matched":
        kwargs = dict(
            batch_size=cfg.batch_size // cfg.num_minibatches,
            n_epochs=cfg.update_epochs,
            learning_rate=lambda progress: progress * cfg.learning_rate,  # annealed to 0, as ours
            ent_coef=cfg.ent_coef,
        )
        arch = dict(shared_lstm=True, enable_critic_lstm=False)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        env,
        n_steps=cfg.num_steps,
        seed=args.seed,
        device="cpu",
        policy_kwargs=dict(lstm_hidden_size=args.hidden, **arch),
        **kwargs,
    )
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
