"""Where the trainer's time goes: each phase of a PPO iteration, per memory and episode length.

Runs our PPO (the trainer's defaults, rollout rows of one whole episode: ``num_steps`` = the episode length) on the
cue tasks of 52, 202 and 1002 steps and times, inside each iteration:

- ``env``: the vector env's ``step`` (the envs, the features of observation, previous action and reward);
- ``policy step``: the agent's batched ``step`` (encoder, memory step, heads, sampling), of which ``memory step`` is
  the memory's own;
- ``rollout other``: the rest of the rollout (buffers, conversions, the bootstrap value);
- ``GAE``; ``update forward``: the sequence forward of every minibatch (``evaluate_actions``), ``update backward``,
  ``optimizer``, ``update other`` (losses, clipping, statistics);
- ``logging``: what the trainer does per iteration to log it (a metrics CSV row, a TensorBoard scalar per stat).

Prints, per (memory, episode length), env-steps/s and each phase's share of the iteration time (median over
iterations after a warm-up iteration). Shares, not absolute times, are what to compare across machines.

    python bench/profile_trainer.py                              # ham, gru, attention at 52, 202 and 1002 steps
    python bench/profile_trainer.py --memory ham --lengths 202 --iterations 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from ham_rl.agents import PPO, PPOConfig, RecurrentActorCritic
from ham_rl.envs import VecEnv
from ham_rl.runlog import MetricsCSV

TASKS = {52: "ham_rl/CueRecallRandomD50-v0", 202: "ham_rl/CueRecallRandomD200-v0", 1002: "ham_rl/CueRecallRandomD1000-v0"}
PHASES = ("env", "policy step", "memory step", "rollout other", "GAE", "update forward", "update backward",
          "optimizer", "update other", "logging")  # fmt: skip


class Timers:
    """Seconds per phase, accumulated over one iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def time(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t

    def wrap(self, obj, name: str, phase: str) -> None:
        """Time every call of ``obj.name`` as ``phase``."""
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            with self.time(phase):
                return original(*args, **kwargs)

        setattr(obj, name, timed)


def profile(memory: str, length: int, iterations: int, seed: int = 0) -> tuple[float, dict[str, float]]:
    """Env-steps/s and the median share of each phase over ``iterations`` PPO iterations (after one warm-up)."""
    torch.manual_seed(seed)
    cfg = PPOConfig(num_steps=length)
    venv = VecEnv(TASKS[length], cfg.num_envs, seed=seed)
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, 64)
    ppo = PPO(agent, venv, cfg, total_timesteps=(iterations + 1) * cfg.batch_size)
    timers = Timers()
    timers.wrap(venv, "step", "env")
    timers.wrap(agent, "step", "policy step")
    timers.wrap(agent.memory, "step", "memory step")
    timers.wrap(ppo, "collect_rollout", "rollout")
    timers.wrap(ppo, "compute_advantages", "GAE")
    timers.wrap(ppo, "train_step", "update")
    timers.wrap(agent, "evaluate_actions", "update forward")
    timers.wrap(ppo.optimizer, "step", "optimizer")
    backward = torch.Tensor.backward

    def timed_backward(tensor, *args, **kwargs):
        with timers.time("update backward"):
            return backward(tensor, *args, **kwargs)

    from torch.utils.tensorboard import SummaryWriter

    shares, rates = defaultdict(list), []
    with tempfile.TemporaryDirectory() as run_dir:
        metrics, writer = MetricsCSV(Path(run_dir) / "metrics.csv"), SummaryWriter(run_dir)
        torch.Tensor.backward = timed_backward
        try:
            for i in range(iterations + 1):
                timers.seconds.clear()
                t = time.perf_counter()
                stats = ppo.iterate()
                with timers.time("logging"):  # as ham_rl.train logs an iteration
                    metrics.append({"global_step": ppo.global_step, "ep_rew_mean": stats["rollout/ep_rew_mean"]})
                    for k, v in stats.items():
                        if v is not None:
                            writer.add_scalar(k, v, ppo.global_step)
                total = time.perf_counter() - t
                if i == 0:
                    continue  # warm-up: first calls allocate and pick kernels
                s = timers.seconds
                phase = dict(s)
                phase["policy step"] = s["policy step"] - s["memory step"]
                phase["rollout other"] = s["rollout"] - s["env"] - s["policy step"]
                phase["update other"] = s["update"] - s["update forward"] - s["update backward"] - s["optimizer"]
                for name in PHASES:
                    shares[name].append(phase.get(name, 0.0) / total)
                rates.append(cfg.batch_size / total)
        finally:
            torch.Tensor.backward = backward
            writer.close()
    return statistics.median(rates), {name: statistics.median(v) for name, v in shares.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", nargs="+", default=["ham", "gru", "attention"])
    p.add_argument("--lengths", nargs="+", type=int, default=sorted(TASKS), choices=sorted(TASKS))
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"32 envs, rows of one episode, {args.iterations} iterations (median), {args.threads} torch thread(s)\n")
    print("| memory | episode | env-steps/s | " + " | ".join(PHASES) + " |")
    print("|---|---:|---:|" + "---:|" * len(PHASES))
    for length in args.lengths:
        for memory in args.memory:
            rate, shares = profile(memory, length, args.iterations)
            cells = " | ".join(f"{100 * shares[name]:.0f}%" for name in PHASES)
            print(f"| {memory} | {length} | {rate:,.0f} | {cells} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
