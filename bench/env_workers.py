"""Env steps/s of a costly env in this process against 1 and 2 worker processes (``env.workers``), side by side.

The env is MiniGrid's memory task rendered as pixels (``MiniGrid-MemoryS13Random-v0`` with the RGB partial view, a
56x56x3 image: about 1 ms a step), needing ``pip install minigrid``; without it, the same setting on POPGym
RepeatPreviousEasy (microseconds a step) shows what the workers cost on a cheap env. Each repeat times every setting
once, in turn, stepping random actions (the policy's cost left out); the table gives the median over repeats and the
ratio to in-process.

    python bench/env_workers.py                          # 16 envs, 150 steps, 3 repeats, workers 0 (in-process), 1, 2
    python bench/env_workers.py --envs 32 --workers 0 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import gymnasium as gym
import numpy as np

if __package__ in (None, ""):  # `python bench/<name>.py`: bench.side_by_side from the checkout; bench/ stays on the
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # path for the env's module id

from bench.side_by_side import median_table

PIXEL_ENV = "ham_rl_bench/MiniGridMemoryPixels-v0"


def make_pixel_env(**kwargs) -> gym.Env:
    """MiniGrid's memory task with the agent's 7x7 view rendered as a 56x56x3 image."""
    import minigrid  # noqa: F401 - registers the MiniGrid ids
    from minigrid.wrappers import ImgObsWrapper, RGBImgPartialObsWrapper

    return ImgObsWrapper(RGBImgPartialObsWrapper(gym.make("MiniGrid-MemoryS13Random-v0", **kwargs)))


if PIXEL_ENV not in gym.registry:  # the workers import this module (the env id names it) and register it too
    gym.register(PIXEL_ENV, entry_point=make_pixel_env, disable_env_checker=True)


def steps_per_s(env_id: str, num_envs: int, workers: int, steps: int) -> float:
    """Env steps per second over ``steps`` vector steps of random actions (start-up and reset not timed)."""
    from ham_rl.envs import make_vec_env

    venv = make_vec_env(env_id, num_envs, workers, seed=0)
    try:
        venv.reset()
        venv.action_space.seed(0)
        actions = np.array([[venv.action_space.sample() for _ in range(num_envs)] for _ in range(steps)])
        t0 = time.perf_counter()
        for a in actions:
            venv.step(a)
        return steps * num_envs / (time.perf_counter() - t0)
    finally:
        venv.close()


def main() -> None:
    """Parse the arguments, time every setting per repeat, print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    pixels = importlib.util.find_spec("minigrid") is not None
    env_id = f"env_workers:{PIXEL_ENV}" if pixels else "popgym-RepeatPreviousEasy-v0"
    if not pixels:
        print("minigrid is not installed (pip install minigrid): timing the cheap POPGym env instead")
    runs: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for w in args.workers:
            runs[w].append(steps_per_s(env_id, args.envs, w, args.steps))
    title = f"{env_id}, {args.envs} envs, {args.steps} steps, median of {args.repeats}"
    print(median_table(title, "env.workers", "env steps/s", {str(w): v for w, v in runs.items()}, higher_is_faster=True))


if __name__ == "__main__":
    main()
