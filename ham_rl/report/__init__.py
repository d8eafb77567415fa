"""Compare memories across training runs: tables (markdown, CSV) and PNG plots. CLI: ``python -m ham_rl.report``."""

from .cli import main, write_report
from .runs import ReportError, Run, find_run_dirs, find_runs, load_run
from .stats import curves_on_grid, mean_ci, t_quantile
from .tables import MemoryRow, read_table, summarize

__all__ = [
    "MemoryRow",
    "ReportError",
    "Run",
    "curves_on_grid",
    "find_run_dirs",
    "find_runs",
    "load_run",
    "main",
    "mean_ci",
    "read_table",
    "summarize",
    "t_quantile",
    "write_report",
]
