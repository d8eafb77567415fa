"""One trained agent at several KV budgets: the threshold sweeps of ``ham_rl.evaluate``, side by side.

Each run dir must hold a ``sweep.csv`` written by ``python -m ham_rl.evaluate RUN 'memory.threshold=[...]'``.
For every threshold, relative to the one the agent ended training with (tau / tau_trained), the table gives the
return and KV fraction of each run; the plot draws return against KV fraction, one line per run.

    python -m ham_rl.evaluate runs/cue_s0 'memory.threshold=[0,0.12,0.18,0.24,0.3,0.36,0.48,inf]' episodes=200
    python bench/tau_sweep.py runs/cue_s0 runs/cue_s1 --out docs/results/tau-sweep-cue
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


def read_sweep(run_dir: Path) -> tuple[float, list[dict]]:
    """``(trained tau, rows of sweep.csv)`` of a run dir."""
    trained = json.loads((run_dir / "summary.json").read_text())["threshold"]
    with open(run_dir / "sweep.csv") as f:
        rows = [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]
    return float(trained), rows


def table(runs: dict[str, tuple[float, list[dict]]]) -> str:
    """Markdown: one row per threshold (as a multiple of the trained tau), return / KV / cache recall per run."""
    names = list(runs)
    lines = ["| tau / trained tau | " + " | ".join(f"{n}: return, KV, recall" for n in names) + " |",
             "|---:|" + "---|" * len(names)]  # fmt: skip
    ratios = sorted({_ratio(r["threshold"], t) for t, rows in runs.values() for r in rows})
    for ratio in ratios:
        cells = []
        for tau_trained, rows in runs.values():
            row = next((r for r in rows if math.isclose(_ratio(r["threshold"], tau_trained), ratio, abs_tol=0.02)), None)
            if row is None:
                cells.append("")
                continue
            recall = "-" if row.get("cache_recall") is None else f"{row['cache_recall']:.2f}"
            cells.append(f"{row['mean_return']:.2f}, {row['kv_fraction']:.3f}, {recall}")
        label = "inf" if math.isinf(ratio) else f"{ratio:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(tau: float, trained: float) -> float:
    return math.inf if math.isinf(tau) else round(tau / trained, 2)


def plot(runs: dict[str, tuple[float, list[dict]]], path: Path, title: str) -> None:
    """Return against KV fraction (log scale, no cache drawn at the left edge), the trained tau marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    floor = 1e-3
    for name, (tau_trained, rows) in runs.items():
        xs = [max(r["kv_fraction"], floor) for r in rows]
        line = ax.plot(xs, [r["mean_return"] for r in rows], marker="o", label=name)[0]
        at = min(rows, key=lambda r: abs(r["threshold"] - tau_trained) if not math.isinf(r["threshold"]) else math.inf)
        ax.plot([max(at["kv_fraction"], floor)], [at["mean_return"]], "s", ms=10, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel(f"KV fraction (log; no cache drawn at {floor:g}); square: the trained tau")
    ax.set_ylabel("mean return (greedy, 200 episodes)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    parser.add_argument("--title", default="threshold sweep of trained agents")
    args = parser.parse_args()
    runs = {r.name: read_sweep(r) for r in args.runs}
    text = table(runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(runs, args.out.with_suffix(".png"), args.title)


if __name__ == "__main__":
    main()
