"""Find and load training run directories written by ``ham_rl.train``.

A run directory holds ``config.yaml`` (the resolved Hydra config) and ``metrics.csv`` (one row per PPO update);
a finished run also holds ``summary.json``, and a trained HAM may hold ``sweep.csv`` from ``ham_rl.evaluate``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

__all__ = ["METRICS_COLUMNS", "SWEEP_COLUMNS", "ReportError", "Run", "find_run_dirs", "find_runs", "load_run", "read_columns"]

METRICS_COLUMNS = ("global_step", "time_s", "ep_rew_mean", "ep_len_mean", "fps", "kv_fraction", "kv_len_mean", "threshold")
"""Columns of ``metrics.csv``; ``global_step`` and ``ep_rew_mean`` are required, the others read as NaN when absent."""
SWEEP_COLUMNS = ("threshold", "mean_return", "std_return", "kv_fraction", "episodes")
"""Columns of ``sweep.csv``, all required."""


class ReportError(ValueError):
    """A run directory or argument the report cannot use; the message is one line and names the file."""


def read_columns(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read a numeric CSV into float arrays by column; empty cells become NaN."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ReportError(f"{path}: empty file, expected a header with {', '.join(required)}")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise ReportError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
            rows: list[list[float]] = []
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ReportError(
                        f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(header)} ({','.join(header)})"
                    )
                rows.append([_parse_float(v, path, reader.line_num, name) for v, name in zip(row, header, strict=True)])
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a readable CSV file ({e})") from e
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header))
    columns = {name: table[:, header.index(name)] for name in (*required, *optional) if name in header}  # dict: no repeats
    for name in optional:
        columns.setdefault(name, np.full(len(rows), np.nan))
    return columns


def _parse_float(value: str, path: Path, line: int, column: str) -> float:
    value = value.strip()
    if value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise ReportError(f"{path} line {line}: column {column}: {value!r} is not a number") from None


def _last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else math.nan


def _as_float(value: object) -> float:
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


@dataclass
class Run:
    """One training run: its identity (env, memory, seed), its metrics by column, and its summary if finished."""

    path: Path
    env: str
    memory: str
    seed: int
    total_timesteps: float
    metrics: dict[str, np.ndarray]
    summary: dict | None = None
    sweep: dict[str, np.ndarray] | None = None
    threshold: float = math.nan

    @property
    def finished(self) -> bool:
        """Whether the trainer wrote summary.json."""
        return self.summary is not None

    @property
    def steps(self) -> np.ndarray:
        """Environment steps of each metrics row, [N]."""
        return self.metrics["global_step"]

    @property
    def returns(self) -> np.ndarray:
        """Mean episodic return (ep_rew_mean) of each metrics row, [N]; NaN before the first episode ends."""
        return self.metrics["ep_rew_mean"]

    @property
    def mmer(self) -> float:
        """POPGym's MMER: the maximum over training of ep_rew_mean (from metrics.csv); NaN if no episode ended."""
        finite = self.returns[np.isfinite(self.returns)]
        return float(finite.max()) if finite.size else math.nan

    def steps_to(self, threshold: float) -> float:
        """Env steps until ep_rew_mean (a running mean over 100 episodes) first reached ``threshold``; NaN if never."""
        reached = np.flatnonzero(np.isfinite(self.returns) & (self.returns >= threshold))
        return float(self.steps[reached[0]]) if reached.size else math.nan

    @property
    def final_return(self) -> float:
        """summary.json's final_return, else the last ep_rew_mean in metrics.csv."""
        value = _as_float((self.summary or {}).get("final_return"))
        return value if math.isfinite(value) else _last_finite(self.returns)

    @property
    def kv_fraction(self) -> float:
        """summary.json's kv_fraction, else the mean of those logged (as the trainer's summary); NaN without a cache."""
        value = _as_float((self.summary or {}).get("kv_fraction"))
        if math.isfinite(value):
            return value
        logged = self.metrics["kv_fraction"][np.isfinite(self.metrics["kv_fraction"])]
        return float(logged.mean()) if logged.size else math.nan

    @property
    def steps_per_s(self) -> float:
        """summary.json's steps_per_s, else last global_step / last time_s, else the mean logged fps."""
        value = _as_float((self.summary or {}).get("steps_per_s"))
        if math.isfinite(value):
            return value
        steps, time_s = self.steps, self.metrics["time_s"]
        ok = np.isfinite(time_s) & (time_s > 0)
        if ok.any():
            return float(steps[ok][-1] / time_s[ok][-1])
        fps = self.metrics["fps"][np.isfinite(self.metrics["fps"])]
        return float(fps.mean()) if fps.size else math.nan

    @property
    def steps_reached(self) -> float:
        """summary.json's global_step, else the last global_step logged."""
        value = _as_float((self.summary or {}).get("global_step"))
        return value if math.isfinite(value) else _last_finite(self.steps)

    @property
    def num_params(self) -> float:
        """summary.json's num_params; NaN for an unfinished run."""
        return _as_float((self.summary or {}).get("num_params"))


def _select(cfg: object, key: str) -> object:
    return OmegaConf.select(cfg, key, default=None)  # type: ignore[arg-type]


def load_run(path: str | os.PathLike) -> Run:
    """Load one run directory (config.yaml, metrics.csv, and summary.json / sweep.csv when present)."""
    path = Path(path)
    try:
        cfg = OmegaConf.load(path / "config.yaml")
    except Exception as e:  # omegaconf raises yaml errors of several kinds
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ReportError(f"{path / 'config.yaml'}: not a readable YAML config ({type(e).__name__}: {first_line})") from e
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{path / 'summary.json'}: not valid JSON ({e})") from e
        if not isinstance(summary, dict):
            raise ReportError(f"{path / 'summary.json'}: expected a JSON object, got {type(summary).__name__}")
    values = {}
    keys = (("env.id", "env"), ("memory.name", "memory"), ("seed", "seed"), ("total_timesteps", "total_timesteps"))
    for key, summary_key in keys:
        value = _select(cfg, key)
        values[key] = value if value is not None else (summary or {}).get(summary_key)
        if values[key] is None:
            raise ReportError(f"{path / 'config.yaml'}: no `{key}` (needed to group runs by env, memory and seed)")
    metrics = read_columns(path / "metrics.csv", ("global_step", "ep_rew_mean"), METRICS_COLUMNS)
    order = np.argsort(metrics["global_step"], kind="stable")
    steps = metrics["global_step"][order]
    keep = np.append(steps[1:] != steps[:-1], True)[: len(steps)]  # a resumed run may log a step twice: keep the last
    metrics = {name: col[order][keep] for name, col in metrics.items()}
    sweep = read_columns(path / "sweep.csv", SWEEP_COLUMNS) if (path / "sweep.csv").is_file() else None
    threshold = _select(cfg, "memory.threshold")
    return Run(
        path=path,
        env=str(values["env.id"]),
        memory=str(values["memory.name"]),
        seed=int(values["seed"]),  # type: ignore[arg-type]
        total_timesteps=float(values["total_timesteps"]),  # type: ignore[arg-type]
        metrics=metrics,
        summary=summary,
        sweep=sweep,
        threshold=float(threshold) if isinstance(threshold, (int, float)) else math.nan,
    )


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories (holding metrics.csv and config.yaml) at or under the given paths, sorted, no duplicates."""
    found: dict[Path, None] = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise ReportError(f"{root}: no such directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "metrics.csv" in filenames and "config.yaml" in filenames:
                found[Path(dirpath).resolve()] = None
                dirnames.clear()  # a run's own subfolders (checkpoints, logs) hold no runs
    return sorted(found)


def find_runs(paths: Sequence[str | os.PathLike], include_unfinished: bool = False) -> list[Run]:
    """Load every run under the paths; unfinished runs (no summary.json) are skipped with a warning unless included."""
    dirs = find_run_dirs(paths)
    if not dirs:
        raise ReportError(f"no runs found under {', '.join(map(str, paths))} (a run dir holds metrics.csv and config.yaml)")
    runs, unfinished, unreadable = [], [], []
    for d in dirs:
        try:
            run = load_run(d)
        except ReportError as e:  # one bad run dir must not cost the report of all the others
            warnings.warn(f"skipped {d}: {e}", stacklevel=2)
            unreadable.append(str(e))
            continue
        if not run.finished and not include_unfinished:
            unfinished.append(run)
            continue
        if not np.isfinite(run.returns).any():
            warnings.warn(f"{d}: no episode has ended yet (ep_rew_mean is empty), skipped", stacklevel=2)
            continue
        runs.append(run)
    if unfinished:
        warnings.warn(
            f"skipped {len(unfinished)} unfinished run(s) (no summary.json; pass --include-unfinished to use them): "
            + ", ".join(str(r.path) for r in unfinished[:3])
            + (" ..." if len(unfinished) > 3 else ""),
            stacklevel=2,
        )
    if not runs:
        raise ReportError(
            f"no usable runs under {', '.join(map(str, paths))} ({len(dirs)} found; {len(unreadable)} unreadable"
            + (f", the first: {unreadable[0]}" if unreadable else "")
            + f"; {len(unfinished)} unfinished: pass --include-unfinished to use them)"
        )
    seen: dict[tuple[str, str, int], Path] = {}
    for run in runs:
        key = (run.env, run.memory, run.seed)
        if key in seen:
            warnings.warn(f"two runs of {run.env} / {run.memory} / seed {run.seed}: {seen[key]} and {run.path}", stacklevel=2)
        seen[key] = run.path
    return runs
