"""PNG plots for the report: learning curves, return against KV fraction, steps/s per memory (Agg backend)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from .runs import Run  # noqa: E402
from .stats import curves_on_grid, t_quantile  # noqa: E402
from .tables import MemoryRow, memory_sort_key  # noqa: E402

__all__ = ["memory_colors", "plot_kv_tradeoff", "plot_learning_curves", "plot_steps_per_s"]

BANDS = ("ci95", "sd", "minmax")
"""What the band around a learning curve shows: 95% CI of the mean, ± one standard deviation, or min to max."""


def memory_colors(memories: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per memory name, the same in every plot of a report."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(memories), key=memory_sort_key))}


def _band(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lower and upper band of [S, G] values over seeds S, per grid point; band is NaN where fewer than 2 seeds."""
    n = np.isfinite(values).sum(axis=0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN grid columns: 'mean of empty slice'
        mean = np.nanmean(values, axis=0)
        if kind == "minmax":
            lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        else:
            sd = np.nanstd(values, axis=0, ddof=1)
            if kind == "ci95":
                t = np.array([t_quantile(0.975, k - 1) if k >= 2 else np.nan for k in n])
                sd = t * sd / np.sqrt(n)
            lo, hi = mean - sd, mean + sd
    lo[n < 2], hi[n < 2] = np.nan, np.nan
    return mean, lo, hi


def _finish(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_learning_curves(
    env: str, by_memory: Mapping[str, Sequence[Run]], path: Path, colors: Mapping[str, tuple], band: str = "ci95"
) -> None:
    """Mean episodic return against env steps per memory: mean over seeds on a common step grid, with a band.

    Each memory's curve spans the steps that all its seeds cover (curves are interpolated, never extrapolated).
    """
    if band not in BANDS:
        raise ValueError(f"`band` must be one of {', '.join(BANDS)}, got {band!r}")
    band_label = {"ci95": "95% CI of the mean", "sd": "± 1 standard deviation", "minmax": "min to max"}[band]
    fig, ax = plt.subplots(figsize=(8, 5))
    for memory, runs in by_memory.items():
        grid, values = curves_on_grid([(r.steps, r.returns) for r in runs])
        if grid.size == 0:
            continue
        every_seed = np.isfinite(values).all(axis=0)  # past a seed's last step the mean would jump to fewer seeds
        mean, lo, hi = _band(values[:, every_seed], band)
        ax.plot(grid[every_seed], mean, color=colors[memory], lw=1.8, label=f"{memory} (n={len(runs)})")
        ax.fill_between(grid[every_seed], lo, hi, color=colors[memory], alpha=0.2, lw=0)
    ax.set_title(f"{env}: learning curves\nmean over seeds; band: {band_label}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episodic return (ep_rew_mean)")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    _finish(fig, path)


def _sweep_points(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Threshold sweep averaged over seeds: (thresholds, kv fraction, return mean, return 95% CI) sorted by kv."""
    by_threshold: dict[float, list[tuple[float, float]]] = {}
    for run in runs:
        sweep = run.sweep or {"threshold": [], "kv_fraction": [], "mean_return": []}
        for tau, kv, ret in zip(sweep["threshold"], sweep["kv_fraction"], sweep["mean_return"], strict=True):
            by_threshold.setdefault(float(tau), []).append((float(kv), float(ret)))
    taus = np.array(sorted(by_threshold))
    kv = np.array([np.nanmean([p[0] for p in by_threshold[t]]) for t in taus])
    rets = [np.array([p[1] for p in by_threshold[t]]) for t in taus]
    mean = np.array([np.nanmean(r) for r in rets])
    ci = np.array([t_quantile(0.975, r.size - 1) * r.std(ddof=1) / math.sqrt(r.size) if r.size > 1 else 0.0 for r in rets])
    order = np.argsort(kv, kind="stable")
    return taus[order], kv[order], mean[order], ci[order]


def plot_kv_tradeoff(
    env: str, by_memory: Mapping[str, Sequence[Run]], rows: Sequence[MemoryRow], path: Path, colors: Mapping[str, tuple]
) -> bool:
    """Return against KV fraction: each sweep.csv (threshold sweep) as a line, every trained memory with a cache as a point.

    Returns False and writes nothing when there is no sweep and fewer than two memories with a known KV fraction.
    """
    sweeps = {m: [r for r in runs if r.sweep is not None] for m, runs in by_memory.items()}
    sweeps = {m: runs for m, runs in sweeps.items() if runs}
    points = [r for r in rows if math.isfinite(r.kv_fraction_mean) and math.isfinite(r.final_return_mean)]
    if not sweeps and len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for memory, runs in sweeps.items():
        taus, kv, mean, ci = _sweep_points(runs)
        label = f"{memory}: threshold sweep (n={len(runs)})"
        ax.errorbar(kv, mean, yerr=ci, fmt="o-", color=colors[memory], capsize=3, label=label)
        labels: dict[tuple[float, float], list[str]] = {}  # thresholds that land on one point share a label
        for tau, x, y in zip(taus, kv, mean, strict=True):
            labels.setdefault((round(float(x), 3), round(float(y), 3)), []).append(f"{tau:g}")
        for i, ((x, y), names) in enumerate(labels.items()):
            offset = (4, (5, -12, 14)[i % 3])  # staggered so labels of nearby points do not overprint
            text = "τ=" + ", ".join(names)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=7, color=colors[memory])
    for row in points:
        yerr = 0.0 if math.isnan(row.final_return_ci95) else row.final_return_ci95
        label = f"{row.memory}: final return as trained (n={row.n_seeds})"
        style = {"fmt": "s", "ms": 8, "mfc": "white", "mew": 2, "capsize": 3}
        ax.errorbar(row.kv_fraction_mean, row.final_return_mean, yerr=yerr, color=colors[row.memory], label=label, **style)
    ax.set_xlim(-0.05, 1.05)
    ax.set_title(f"{env}: return against KV fraction\nmean over seeds, bars: 95% CI (gdn caches no token, attention all)")
    ax.set_xlabel("KV fraction (cached tokens / tokens seen)")
    ax.set_ylabel("mean episodic return")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _finish(fig, path)
    return True


def plot_steps_per_s(table: Mapping[str, Sequence[MemoryRow]], path: Path) -> None:
    """Training throughput per memory as grouped bars (one bar per env), mean ± 95% CI over seeds."""
    memories = sorted({r.memory for rows in table.values() for r in rows}, key=memory_sort_key)
    envs = list(table)
    width = 0.8 / max(len(envs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(memories) * max(1, len(envs) / 2)), 5))
    cmap = plt.get_cmap("tab10")
    for j, env in enumerate(envs):
        by_memory = {r.memory: r for r in table[env]}
        x = np.array([i for i, m in enumerate(memories) if m in by_memory], dtype=float) + (j - (len(envs) - 1) / 2) * width
        sps = [by_memory[m] for m in memories if m in by_memory]
        heights = [r.steps_per_s_mean for r in sps]
        errs = [0.0 if math.isnan(r.steps_per_s_ci95) else r.steps_per_s_ci95 for r in sps]
        bars = ax.bar(x, heights, width=width, yerr=errs, capsize=3, color=cmap(j % 10), label=env)
        ax.bar_label(bars, labels=[f"{h:,.0f}" for h in heights], fontsize=7, padding=2)
    ax.set_xticks(range(len(memories)), memories)
    ax.set_xlabel("memory")
    ax.set_ylabel("training throughput (environment steps / s)")
    ax.set_title("Training steps per second per memory\nmean over seeds, bars: 95% CI")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="env", fontsize=8)
    _finish(fig, path)
