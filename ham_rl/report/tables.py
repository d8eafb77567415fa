"""Per-env tables: one row per memory, aggregated over seeds, written as markdown and CSV."""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .runs import ReportError, Run
from .stats import mean_ci

__all__ = [
    "KV_FRACTION_BY_DEFINITION",
    "MEMORY_ORDER",
    "MemoryRow",
    "env_filename",
    "memory_sort_key",
    "group_runs",
    "read_table",
    "summarize",
    "write_csv",
    "write_markdown",
]

MEMORY_ORDER = ("ham", "ham-learned", "gdn", "attention", "window", "hqlt", "gru", "lstm", "mlp")
"""Row order of the tables and plots; other memory names follow in alphabetical order."""
KV_FRACTION_BY_DEFINITION = {"gdn": 0.0, "attention": 1.0}
"""KV fractions used when a run logged none: gdn caches no token, attention caches every token."""


@dataclass
class MemoryRow:
    """One memory on one env, aggregated over its seeds (means with 95% CI half-widths; NaN where unknown)."""

    env: str
    memory: str
    n_seeds: int
    seeds: str
    steps_budget: float
    steps_reached: float
    mmer_mean: float
    mmer_ci95: float
    final_return_mean: float
    final_return_ci95: float
    kv_fraction_mean: float
    kv_fraction_ci95: float
    steps_per_s_mean: float
    steps_per_s_ci95: float
    num_params: float
    reach_low: float
    """the lower return threshold of the steps-to columns (REACH[0] unless the report was asked for others)"""
    steps_to_low_mean: float
    """env steps until the running return first reached reach_low, mean over the seeds that reached it"""
    steps_to_low_ci95: float
    reached_low: int
    """how many seeds reached reach_low within their budget"""
    reach_high: float
    steps_to_high_mean: float
    steps_to_high_ci95: float
    reached_high: int


def memory_sort_key(name: str) -> tuple[int, str]:
    """Sort key putting the project's memories first, in MEMORY_ORDER."""
    return (MEMORY_ORDER.index(name), "") if name in MEMORY_ORDER else (len(MEMORY_ORDER), name)


def env_filename(env: str) -> str:
    """A file-name-safe form of an env id (popgym-RepeatPreviousEasy-v0 stays as it is)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", env)


def group_runs(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    """Runs grouped by env, then by memory; envs sorted by name, memories in MEMORY_ORDER, runs by seed."""
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.env][run.memory].append(run)
    by_seed = lambda r: (r.seed, str(r.path))
    return {
        env: {m: sorted(groups[env][m], key=by_seed) for m in sorted(groups[env], key=memory_sort_key)}
        for env in sorted(groups)
    }


def _one_value(values: list[float], what: str, env: str, memory: str) -> float:
    finite = sorted({v for v in values if math.isfinite(v)})
    if len(finite) > 1:
        shown = ", ".join(f"{v:g}" for v in finite)
        warnings.warn(f"{env} / {memory}: seeds differ in {what} ({shown}); using the largest", stacklevel=3)
    return finite[-1] if finite else math.nan


#: returns whose first crossing the tables report (env steps to reach them), e.g. 0.5 and 0.9 of a +-1 task
REACH = (0.5, 0.9)


def _reach(group: Sequence[Run], threshold: float) -> dict[str, float | int]:
    steps = [r.steps_to(threshold) for r in group]
    mean, ci, n = mean_ci([s for s in steps if math.isfinite(s)])
    return {"mean": mean, "ci": ci, "n": n}


def summarize(runs: Sequence[Run], reach: Sequence[float] = REACH) -> dict[str, list[MemoryRow]]:
    """Aggregate runs into one MemoryRow per (env, memory): MMER, final return, KV fraction, steps/s and env steps to
    reach the two returns of ``reach``, over seeds."""
    if len(reach) != 2 or not all(math.isfinite(float(v)) for v in reach):
        raise ReportError(f"reach must be two finite returns (low, high), got {list(reach)}")
    low_at, high_at = sorted(float(v) for v in reach)
    table: dict[str, list[MemoryRow]] = {}
    for env, by_memory in group_runs(runs).items():
        rows = []
        for memory, group in by_memory.items():
            mmer, mmer_ci, n = mean_ci([r.mmer for r in group])
            final, final_ci, _ = mean_ci([r.final_return for r in group])
            kv, kv_ci, _ = mean_ci([r.kv_fraction for r in group])
            if math.isnan(kv) and memory in KV_FRACTION_BY_DEFINITION:
                kv, kv_ci = KV_FRACTION_BY_DEFINITION[memory], math.nan
            sps, sps_ci, _ = mean_ci([r.steps_per_s for r in group])
            low, high = _reach(group, low_at), _reach(group, high_at)
            thresholds = {r.threshold for r in group if math.isfinite(r.threshold)}
            if len(thresholds) > 1:
                msg = f"{env} / {memory}: seeds were trained at different memory.threshold {sorted(thresholds)}"
                warnings.warn(msg, stacklevel=2)
            rows.append(
                MemoryRow(
                    env=env,
                    memory=memory,
                    n_seeds=n,
                    seeds=" ".join(str(r.seed) for r in group),
                    steps_budget=_one_value([r.total_timesteps for r in group], "total_timesteps", env, memory),
                    steps_reached=min(r.steps_reached for r in group),
                    mmer_mean=mmer,
                    mmer_ci95=mmer_ci,
                    final_return_mean=final,
                    final_return_ci95=final_ci,
                    kv_fraction_mean=kv,
                    kv_fraction_ci95=kv_ci,
                    steps_per_s_mean=sps,
                    steps_per_s_ci95=sps_ci,
                    num_params=_one_value([r.num_params for r in group], "num_params", env, memory),
                    reach_low=low_at,
                    steps_to_low_mean=low["mean"],
                    steps_to_low_ci95=low["ci"],
                    reached_low=low["n"],
                    reach_high=high_at,
                    steps_to_high_mean=high["mean"],
                    steps_to_high_ci95=high["ci"],
                    reached_high=high["n"],
                )
            )
        table[env] = rows
    return table


def _csv_value(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(rows: Sequence[MemoryRow], path: Path) -> None:
    """Write rows as CSV with full-precision floats (empty cells for NaN), so read_table gives back the same numbers."""
    names = [f.name for f in fields(MemoryRow)]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_csv_value(v) for v in asdict(row).values()])
    tmp.replace(path)


def read_table(path: str | Path) -> list[MemoryRow]:
    """Read a CSV written by write_csv back into MemoryRows."""
    path = Path(path)
    types = {f.name: f.type for f in fields(MemoryRow)}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or set(reader.fieldnames) != set(types):
            raise ReportError(f"{path}: expected columns {','.join(types)}, got {','.join(reader.fieldnames or [])}")
        rows = []
        for record in reader:
            values: dict[str, object] = {}
            for name, kind in types.items():
                cell = record[name]
                if kind == "float":
                    values[name] = float(cell) if cell != "" else math.nan
                elif kind == "int":
                    values[name] = int(cell)
                else:
                    values[name] = cell
            rows.append(MemoryRow(**values))  # type: ignore[arg-type]
    return rows


def _pm(mean: float, half: float, fmt: str) -> str:
    if math.isnan(mean):
        return "—"
    return format(mean, fmt) if math.isnan(half) else f"{format(mean, fmt)} ± {format(half, fmt)}"


def _steps(row: MemoryRow) -> str:
    budget = "—" if math.isnan(row.steps_budget) else f"{row.steps_budget:,.0f}"
    if not math.isnan(row.steps_budget) and row.steps_reached < 0.99 * row.steps_budget:  # not a rollout's rounding
        return f"{row.steps_reached:,.0f} of {budget}"
    return budget


def _count(steps: float) -> str:
    """``1.25M``, ``354k``, ``9,600``: env step counts at a glance."""
    if steps >= 1e6:
        return f"{steps / 1e6:.2f}M"
    return f"{steps / 1e3:,.0f}k" if steps >= 1e4 else f"{steps:,.0f}"


def _steps_to(mean: float, half: float, reached: int, seeds: int) -> str:
    """``120k ± 20k (3/3)``; ``not reached (0/3)``; the mean is over the seeds that reached the return."""
    if reached == 0:
        return f"not reached (0/{seeds})"
    value = _count(mean) if math.isnan(half) else f"{_count(mean)} ± {_count(half)}"
    return f"{value} ({reached}/{seeds})"


def write_markdown(rows: Sequence[MemoryRow], path: Path) -> None:
    """Write rows as a markdown table under a heading naming the env, the best MMER in bold."""
    best = max((r.mmer_mean for r in rows if not math.isnan(r.mmer_mean)), default=math.nan)
    low, high = (rows[0].reach_low, rows[0].reach_high) if rows else REACH
    lines = [
        f"## {rows[0].env}" if rows else "## (no runs)",
        "",
        "MMER: the maximum over training of the mean episodic return (POPGym's metric). Values are the mean over seeds",
        "± the 95% confidence half-width (Student t); a single seed shows no interval. KV fraction: cached tokens /",
        "tokens seen (— for memories without a cache). Steps: the budget, or 'reached of budget' when a seed stopped short.",
        "Steps to R: env steps until the running mean return first reached R, mean ± 95% CI over the seeds that reached it",
        "(how many did, in brackets); judge a memory by these, not by one budget's end point.",
        "",
        f"| memory | seeds | steps | MMER | final return | steps to {low:g} | steps to {high:g} | KV fraction | steps/s "
        "| parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mmer = _pm(r.mmer_mean, r.mmer_ci95, ".3f")
        if r.mmer_mean == best:
            mmer = f"**{mmer}**"
        params = "—" if math.isnan(r.num_params) else f"{r.num_params:,.0f}"
        kv = _pm(r.kv_fraction_mean, r.kv_fraction_ci95, ".3f")
        sps = _pm(r.steps_per_s_mean, r.steps_per_s_ci95, ",.0f")
        final = _pm(r.final_return_mean, r.final_return_ci95, ".3f")
        to_low = _steps_to(r.steps_to_low_mean, r.steps_to_low_ci95, r.reached_low, r.n_seeds)
        to_high = _steps_to(r.steps_to_high_mean, r.steps_to_high_ci95, r.reached_high, r.n_seeds)
        cells = [r.memory, str(r.n_seeds), _steps(r), mmer, final, to_low, to_high, kv, sps, params]
        lines.append("| " + " | ".join(cells) + " |")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
