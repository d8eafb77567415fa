"""Gymnasium spaces as JSON-ready plain data and back, for files that must load without unpickling.

Covers Box, Discrete, MultiDiscrete, MultiBinary and Dict/Tuple of those; any other space raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

__all__ = ["space_from_json", "space_to_json"]


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """``space`` as nested dicts, lists, numbers and strings (``json.dumps`` writes its infinite bounds)."""
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(), "shape": list(space.shape),
                "dtype": np.dtype(space.dtype).str}  # fmt: skip
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist(),
                "dtype": np.dtype(space.dtype).str}  # fmt: skip
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(s) for k, s in space.spaces.items()}}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_json(s) for s in space.spaces]}
    raise ValueError(f"{type(space).__name__} has no plain-data form; supported: Box, Discrete, MultiDiscrete, MultiBinary, "
                     "Dict, Tuple")  # fmt: skip


def space_from_json(data: Any) -> spaces.Space:
    """Inverse of :func:`space_to_json`; raises ``ValueError`` for anything it did not write."""
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "Box":
            dtype = np.dtype(data["dtype"])
            low, high = np.array(data["low"], dtype=dtype), np.array(data["high"], dtype=dtype)
            return spaces.Box(low=low, high=high, shape=tuple(data["shape"]), dtype=dtype)
        if kind == "Discrete":
            return spaces.Discrete(int(data["n"]), start=int(data["start"]))
        if kind == "MultiDiscrete":
            return spaces.MultiDiscrete(np.array(data["nvec"]), dtype=np.dtype(data["dtype"]), start=np.array(data["start"]))
        if kind == "MultiBinary":
            return spaces.MultiBinary(data["n"])
        if kind == "Dict":
            return spaces.Dict({k: space_from_json(v) for k, v in data["spaces"].items()})
        if kind == "Tuple":
            return spaces.Tuple([space_from_json(v) for v in data["spaces"]])
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad {kind} space data: {e}") from None
    raise ValueError(f"not a space written by space_to_json: {str(data)[:80]}")
