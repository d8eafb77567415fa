"""Command line: ``python -m ham_rl.report <run dirs...> [--out DIR]``.

Finds runs (recursively, Hydra multirun folders included), writes per env ``<env>.md`` and ``<env>.csv`` (one row per
memory), ``<env>_curves.png`` and ``<env>_kv.png``, ``<env>_evaluations.md`` where runs were evaluated
(``ham_rl.evaluate``'s ``evaluations.jsonl``: one row per run), and one ``steps_per_s.png``; then prints what it wrote.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .evaluations import evaluation_rows, write_evaluations
from .plots import BANDS, memory_colors, plot_kv_tradeoff, plot_learning_curves, plot_steps_per_s
from .runs import ReportError, find_runs
from .tables import REACH, MemoryRow, env_filename, group_runs, summarize, write_csv, write_markdown

__all__ = ["build_parser", "main", "write_report"]

PROG = "ham_rl.report"


def build_parser() -> argparse.ArgumentParser:
    """The report's argument parser."""
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Tables (markdown, CSV) and PNG plots comparing memories, from ham_rl.train run directories.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run directories, or folders searched recursively for them")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: ./report)")
    p.add_argument("--include-unfinished", action="store_true", help="also use runs without summary.json")
    p.add_argument("--band", choices=BANDS, default="ci95", help="learning-curve band across seeds (default: ci95)")
    reach_help = f"returns whose env steps to first reach the tables report (default: {REACH[0]} {REACH[1]})"
    p.add_argument("--reach", nargs=2, type=float, default=list(REACH), metavar=("LOW", "HIGH"), help=reach_help)
    return p


def write_report(
    paths: Sequence[str | Path],
    out: str | Path,
    include_unfinished: bool = False,
    band: str = "ci95",
    reach: Sequence[float] = REACH,
) -> tuple[dict[str, list[MemoryRow]], dict[str, list[Path]]]:
    """Write the report for the runs under `paths` into `out`; returns the table rows by env and the files by env."""
    runs = find_runs(paths, include_unfinished=include_unfinished)
    table = summarize(runs, reach)
    groups = group_runs(runs)
    # read before anything is written: a bad evaluations.jsonl stops the report with nothing half-written
    evaluated = {env: evaluation_rows(run for group in groups[env].values() for run in group) for env in table}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = memory_colors([r.memory for r in runs])
    written: dict[str, list[Path]] = {}
    for env, rows in table.items():
        stem = env_filename(env)
        files = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}_curves.png"]
        write_markdown(rows, files[0])
        write_csv(rows, files[1])
        plot_learning_curves(env, groups[env], files[2], colors, band=band)
        if plot_kv_tradeoff(env, groups[env], rows, out / f"{stem}_kv.png", colors):
            files.append(out / f"{stem}_kv.png")
        if evaluated[env]:
            write_evaluations(env, evaluated[env], out / f"{stem}_evaluations.md")
            files.append(out / f"{stem}_evaluations.md")
        written[env] = files
    plot_steps_per_s(table, out / "steps_per_s.png")
    written[""] = [out / "steps_per_s.png"]
    return table, written


def _print_summary(table: dict[str, list[MemoryRow]], written: dict[str, list[Path]], out: Path) -> None:
    total = 0
    for env, rows in table.items():
        n_runs = sum(r.n_seeds for r in rows)
        total += n_runs
        best = max(rows, key=lambda r: -math.inf if math.isnan(r.mmer_mean) else r.mmer_mean)
        print(f"{env}: {len(rows)} memories, {n_runs} runs; best MMER: {best.memory} {best.mmer_mean:.3f}")
        print("  wrote " + ", ".join(f.name for f in written[env]))
    print(f"{PROG}: {total} runs, {len(table)} env(s) -> {out}/ (tables, plots and {written[''][0].name})")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m ham_rl.report``; errors a user can cause exit with a one-line message."""
    args = build_parser().parse_args(argv)

    def show(message: Warning | str, category: type[Warning], *rest: object, **kw: object) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show  # type: ignore[assignment]
        try:
            table, written = write_report(args.paths, args.out, args.include_unfinished, args.band, args.reach)
        except ReportError as e:
            raise SystemExit(f"{PROG}: error: {e}") from None
        except OSError as e:
            raise SystemExit(f"{PROG}: error: cannot write to {args.out}: {e.strerror} ({e.filename})") from None
        _print_summary(table, written, args.out)
