"""What each run's answer is read from: the records ``ham_rl.evaluate`` appends to ``evaluations.jsonl``, as a table.

Per run, at the last checkpoint step it was evaluated at, the latest record of each of four kinds: at the trained
threshold, with the cache off (threshold inf), with the informative steps' entries dropped from the cache
(``drop=informative``) and with only those kept (``drop=uninformative``). The score is the success rate where the env
reports one (T-Maze, MiniGrid's rooms), else the mean return. Other thresholds of a sweep are in ``sweep.csv``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .runs import ReportError, Run
from .tables import memory_sort_key

__all__ = ["EVALUATIONS", "KINDS", "EvaluationRow", "evaluation_rows", "read_evaluations", "write_evaluations"]

EVALUATIONS = "evaluations.jsonl"  # the file name ham_rl.evaluate writes (not imported: the report needs no torch)
KINDS = ("trained", "cache off", "informative dropped", "informative only")
_REQUIRED = ("checkpoint_step", "threshold", "trained_threshold", "drop", "mean_return")


def read_evaluations(path: str | Path) -> list[dict]:
    """The records of one ``evaluations.jsonl``, in the order written; a bad line is a one-line ReportError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not a UTF-8 text file ({e.reason})") from e
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise ReportError(f"{path} line {number}: expected a JSON object with {', '.join(missing)}")
        records.append(record)
    return records


def _threshold(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"threshold {value!r} is not a number, 'inf', '-inf' or null")
    return float(value)


def _kind(record: dict) -> str | None:
    tau, trained, drop = _threshold(record["threshold"]), _threshold(record["trained_threshold"]), record["drop"]
    if tau == trained:
        return {None: "trained", "informative": "informative dropped", "uninformative": "informative only"}.get(drop)
    return "cache off" if tau == math.inf and drop is None else None


@dataclass
class EvaluationRow:
    """One run's evaluations: a score per kind (None where not evaluated) and what the trained cache kept."""

    memory: str
    seed: int
    checkpoint_step: int
    metric: str  # "success" or "return"
    scores: dict[str, float | None] = field(default_factory=dict)
    trained: dict = field(default_factory=dict)  # the record at the trained threshold, {} if none


def _score(record: dict, metric: str) -> float | None:
    value = record.get("success_rate") if metric == "success" else record.get("mean_return")
    return None if value is None else float(value)


def evaluation_rows(runs: Iterable[Run]) -> list[EvaluationRow]:
    """One row per run that has an ``evaluations.jsonl``, sorted by memory (the report's order), then seed."""
    rows = []
    for run in runs:
        path = run.path / EVALUATIONS
        if not path.is_file():
            continue
        records = read_evaluations(path)
        if not records:
            continue
        try:
            step = max(int(r["checkpoint_step"]) for r in records)
            latest = {}
            for record in records:  # later lines win
                if int(record["checkpoint_step"]) == step and (kind := _kind(record)) is not None:
                    latest[kind] = record
        except (TypeError, ValueError, ReportError) as e:
            raise ReportError(f"{path}: {e}") from None
        if not latest:
            continue
        first = latest.get("trained") or next(iter(latest.values()))
        metric = "success" if first.get("success_rate") is not None else "return"
        scores = {kind: _score(latest[kind], metric) if kind in latest else None for kind in KINDS}
        rows.append(EvaluationRow(run.memory, run.seed, step, metric, scores, latest.get("trained", {})))
    return sorted(rows, key=lambda r: (memory_sort_key(r.memory), r.seed))


def _cell(value: object, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def write_evaluations(env: str, rows: list[EvaluationRow], path: Path) -> None:
    """``<env>_evaluations.md``: one line per run, the four scores and what the cache kept at the trained threshold."""
    metrics = sorted({r.metric for r in rows})
    what = " and ".join("success rate" if m == "success" else "mean return" for m in metrics)
    lines = [
        f"## {env}: what the answer is read from",
        "",
        f"Greedy evaluations (`python -m ham_rl.evaluate RUN`), {what}: at the trained threshold; with the cache off",
        "(`'memory.threshold=[null,inf]'`); with each informative step's entry removed from the cache right after its",
        "step (`drop=informative`); with only those entries kept (`drop=uninformative`). The latest of each at the",
        "run's last evaluated checkpoint; — where not evaluated. The cache columns are at the trained threshold.",
        "",
        "| memory | seed | checkpoint step | episodes | score | cache off | informative dropped | informative only "
        "| KV fraction | cached per episode | informative steps cached | step 0 cached |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r.trained
        cells = [r.memory, str(r.seed), f"{r.checkpoint_step:,}", _cell(t.get("episodes"), "d")]
        cells += [_cell(r.scores[k]) for k in KINDS]
        cells += [_cell(t.get(k)) for k in ("kv_fraction",)]
        cells += [_cell(t.get("cached_per_episode"), ".1f"), _cell(t.get("cache_recall")), _cell(t.get("step0_cached"))]
        lines.append("| " + " | ".join(cells) + " |")
    if len(metrics) > 1:
        lines += ["", "Score: the success rate where the env reports one, else the mean return."]
    path.write_text("\n".join(lines) + "\n")
