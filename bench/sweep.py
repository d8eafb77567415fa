"""Wall clock of one 4-job sweep run sequentially (Hydra's basic launcher) and through the joblib launcher, in turn.

Each repeat runs ``python -m ham_rl.train --multirun memory=gru seed=0,1,2,3`` at a small setting both ways (needs
``pip install "ham_rl[joblib]"``); the table gives the median wall clock of the whole command and the ratio.

    python bench/sweep.py                              # 2 repeats, n_jobs=2, 4096 steps per job
    python bench/sweep.py --repeats 3 --n-jobs 4 --steps 20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python bench/<name>.py`: bench.side_by_side comes from the checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench.side_by_side import median_table

SMALL = ["agent.num_envs=8", "agent.num_steps=32", "memory.hidden_size=32", "progress=false", "tensorboard=false"]


def wall_clock(launcher: list[str], steps: int, out: str) -> float:
    """Seconds of one whole multirun command (process start included)."""
    cmd = [sys.executable, "-m", "ham_rl.train", "--multirun", *launcher, "memory=gru", "seed=0,1,2,3"]
    cmd += [f"total_timesteps={steps}", *SMALL, f"hydra.sweep.dir={out}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    """Time both launchers per repeat and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4096)
    args = p.parse_args()
    joblib = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"]
    settings = {"sequential": [], f"joblib, n_jobs={args.n_jobs}": joblib}
    times: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, launcher in settings.items():
                times[name].append(wall_clock(launcher, args.steps, f"{tmp}/{r}_{len(times[name])}_{name[:6]}"))
    title = f"4 jobs (gru, seeds 0-3), {args.steps} steps each, median of {args.repeats}"
    print(median_table(title, "launcher", "wall clock s", times, higher_is_faster=False, digits=1))


if __name__ == "__main__":
    main()
