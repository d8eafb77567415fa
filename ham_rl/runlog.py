"""What a run writes besides checkpoints: metrics.csv (one row per update), TensorBoard scalars, summary.json.

Run directory format (read by ham_rl.report):
- ``config.yaml``: the resolved config (env.id is the gymnasium id)
- ``metrics.csv``: ``global_step,time_s,ep_rew_mean,ep_len_mean,fps,kv_fraction,kv_len_mean,threshold``,
  one row per PPO update, an empty cell where a value is unknown
- ``summary.json``: see :func:`summarise`
- ``resumes.jsonl``: one line per resume that changed a setting allowed to change (``RESUME_MAY_CHANGE``)
- ``checkpoints/last.pt``, ``tb/``
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

__all__ = ["METRICS_HEADER", "MetricsCSV", "summarise", "write_json_atomic"]

METRICS_HEADER = ["global_step", "time_s", "ep_rew_mean", "ep_len_mean", "fps", "kv_fraction", "kv_len_mean", "threshold"]


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _num(s: str) -> float | None:
    return float(s) if s not in ("", None) else None


class MetricsCSV:
    """Appends one row per update to ``<run>/metrics.csv``; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            rows = [r for r in self.read(self.path) if r["global_step"] is not None and r["global_step"] <= resume_step]
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(METRICS_HEADER)
                for r in rows:
                    w.writerow([_cell(int(r[k]) if k == "global_step" else r[k]) for k in METRICS_HEADER])
            os.replace(tmp, self.path)
        elif not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(METRICS_HEADER)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(k)) for k in METRICS_HEADER])

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict]:
        """Rows as dicts of floats (None for empty cells)."""
        with open(path, newline="") as f:
            return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def summarise(rows: list[dict], *, env: str, memory: str, seed: int, total_timesteps: int, num_params: int,
              threshold: float | None) -> dict:  # fmt: skip
    """summary.json from the metrics rows of the whole run (all invocations, resumes included)."""
    last = rows[-1] if rows else {}
    rets = [r["ep_rew_mean"] for r in rows if r["ep_rew_mean"] is not None]
    kvs = [r["kv_fraction"] for r in rows if r["kv_fraction"] is not None]
    wall = last.get("time_s") or 0.0
    step = int(last.get("global_step") or 0)
    return {
        "env": env,
        "memory": memory,
        "seed": int(seed),
        "total_timesteps": int(total_timesteps),
        "global_step": step,
        "num_params": int(num_params),
        "final_return": last.get("ep_rew_mean"),
        "mmer": max(rets) if rets else None,
        "kv_fraction": sum(kvs) / len(kvs) if kvs else None,
        "steps_per_s": step / wall if wall > 0 else 0.0,
        "wall_time_s": wall,
        "threshold": threshold,
    }


def _finite_or_none(value):
    """JSON has no NaN or infinity: a non-finite float becomes null (None), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def write_json_atomic(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as strict JSON (non-finite numbers as null), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
