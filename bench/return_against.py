"""Return against a task's size, one line per memory: MMER (mean ± 95% CI over seeds) of finished runs, plotted
against the number of (key, value) pairs of associative recall or the corridor length of the T-Maze. With
``--success EPISODES`` the y axis is instead the greedy success rate of each run's last checkpoint over that many
episodes (``ham_rl.evaluate``; envs that report ``is_success``: the T-Maze), which a long corridor's training return
understates: one step that is not forward there ends the episode short of the junction.

The size comes from the run's env id through the preset tables (``envs/recall_tasks.py``, ``envs/tmaze.py``); runs of
other envs are skipped with a note. Prints the table it plots.

    python bench/return_against.py pairs /tmp/runs/ar2-* /tmp/runs/ar4-* --out docs/results/ar_return_vs_pairs.png
    python bench/return_against.py corridor /tmp/runs/tm* --out docs/results/tmaze_return_vs_length.png
    python bench/return_against.py pairs RUNS --out PNG --include-unfinished   # runs stopped after reaching 0.9 too
    python bench/return_against.py corridor /tmp/runs/tm* --success 200 --include-unfinished --out tmaze_success.png
    python bench/return_against.py corridor --points docs/results/tmaze_success_vs_length.csv --success 200 --out ...

``--save-points CSV`` writes each run's value (memory, size, value, run); ``--points CSV`` adds such rows to the
runs' (or stands for them), so a plot whose runs are gone can be redrawn and extended from the values recorded in
docs/results.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # `python bench/<name>.py`: run from the checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ham_rl.envs.recall_tasks import PRESETS as RECALL_PRESETS  # noqa: E402
from ham_rl.envs.tmaze import PRESETS as TMAZE_PRESETS  # noqa: E402
from ham_rl.evaluate import evaluate_run  # noqa: E402
from ham_rl.report.plots import memory_colors  # noqa: E402
from ham_rl.report.runs import find_runs  # noqa: E402
from ham_rl.report.stats import mean_ci  # noqa: E402

#: size name -> (axis label, {gymnasium id: size})
SIZES = {
    "pairs": (
        "(key, value) pairs",
        {env_id: kw["num_pairs"] for env_id, task, kw in RECALL_PRESETS.values() if task == "associative" and kw},
    ),
    "corridor": ("corridor length L", {env_id: kw["corridor_length"] for env_id, kw in TMAZE_PRESETS.values()}),
}


#: the columns of --points and --save-points
POINT_FIELDS = ("memory", "size", "value", "run")


def read_points(path: Path) -> list[tuple[str, int, float, str]]:
    """The rows of a --save-points CSV as (memory, size, value, run)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != POINT_FIELDS:
            raise SystemExit(f"{path}: the columns must be {','.join(POINT_FIELDS)}, got {reader.fieldnames}")
        return [(r["memory"], int(r["size"]), float(r["value"]), r["run"]) for r in reader]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", choices=sorted(SIZES), help="what the x axis is")
    p.add_argument("runs", nargs="*", type=Path, help="run directories, or folders searched for them")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--include-unfinished", action="store_true", help="also runs without summary.json (stopped early)")
    p.add_argument("--success", type=int, metavar="EPISODES", help="plot the greedy success rate over EPISODES instead")
    p.add_argument("--points", type=Path, metavar="CSV", help="also plot these recorded values (memory,size,value,run)")
    p.add_argument("--save-points", type=Path, metavar="CSV", help="write every plotted value to this CSV")
    args = p.parse_args()
    if args.success is not None and args.success < 1:
        p.error(f"--success must be a number of episodes >= 1, got {args.success}")
    if not args.runs and args.points is None:
        p.error("give run directories, --points CSV, or both")
    metric = "MMER" if args.success is None else "success"
    label, size_of = SIZES[args.size]
    points = read_points(args.points) if args.points is not None else []
    for run in find_runs(args.runs, include_unfinished=args.include_unfinished) if args.runs else []:
        if run.env not in size_of:
            print(f"skipped {run.path}: {run.env} is not a {args.size} preset")
            continue
        if args.success is None:
            points.append((run.memory, size_of[run.env], run.mmer, str(run.path)))
            continue
        success = evaluate_run(run.path, {"episodes": args.success}, quiet=True, pictures=False)[0]["success_rate"]
        if success is None:
            print(f"skipped {run.path}: {run.env} does not report is_success")
            continue
        print(f"{run.path}: greedy success {success:.3f} over {args.success} episodes")
        points.append((run.memory, size_of[run.env], success, str(run.path)))
    if not points:
        raise SystemExit(f"no finished run of a {args.size} preset under {', '.join(map(str, args.runs))}")
    if args.save_points is not None:
        with open(args.save_points, "w", newline="") as f:
            csv.writer(f).writerows([POINT_FIELDS, *points])
        print(f"wrote {args.save_points}")
    by_memory: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for memory, size, value, _ in points:
        by_memory[memory][size].append(value)
    colors = memory_colors(list(by_memory))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    print(f"{'memory':12s} {label:>20s} {metric:>8s} {'± 95% CI':>9s} {'seeds':>6s}")
    for memory, points in sorted(by_memory.items()):
        xs = sorted(points)
        stats = [mean_ci(points[x]) for x in xs]
        for x, (mean, half, n) in zip(xs, stats, strict=True):
            print(f"{memory:12s} {x:20d} {mean:8.3f} {'' if math.isnan(half) else f'{half:9.3f}'} {n:6d}")
        means = [s[0] for s in stats]
        halves = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
        ax.errorbar(xs, means, yerr=halves, marker="o", capsize=3, label=memory, color=colors[memory])
    ax.set_xlabel(label)
    ax.set_ylabel(f"{'MMER' if args.success is None else 'greedy success rate'} (mean ± 95% CI over seeds)")
    if args.success is not None:
        ax.set_ylim(-0.05, 1.05)  # a rate: a CI over a few seeds would otherwise stretch the axis past 0 and 1
    ax.set_xscale("log" if args.size == "corridor" else "linear")
    ax.minorticks_off()  # on a log axis the minor ticks' labels (3 x 10^2, ...) crowd out the sizes set below
    sizes = sorted({x for points in by_memory.values() for x in points})
    ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes: the lines cross everywhere
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
