"""Flat float encodings of gymnasium spaces, for a batch of envs at once.

Discrete -> one-hot, MultiDiscrete -> concatenated one-hots, MultiBinary -> 0/1 floats, Box -> flattened floats,
Tuple and Dict -> the concatenation of their parts (Dict in the space's key order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

__all__ = ["SpaceEncoder"]


class SpaceEncoder:
    """Encodes a list of B samples of ``space`` into a float32 array ``[B, dim]``.

    :param space: a gymnasium space (Discrete, MultiDiscrete, MultiBinary, Box, or Tuple/Dict of these)
    :raises ValueError: for a space type it cannot encode (the message lists the supported ones)
    """

    SUPPORTED = ("Discrete", "MultiDiscrete", "MultiBinary", "Box", "Tuple", "Dict")

    def __init__(self, space: spaces.Space):
        self.space = space
        self.dim = self._dim(space)

    def _dim(self, space: spaces.Space) -> int:
        if isinstance(space, spaces.Discrete):
            return int(space.n)
        if isinstance(space, spaces.MultiDiscrete):
            return int(np.sum(space.nvec))
        if isinstance(space, (spaces.MultiBinary, spaces.Box)):
            return math.prod(space.shape)
        if isinstance(space, spaces.Tuple):
            return sum(self._dim(s) for s in space.spaces)
        if isinstance(space, spaces.Dict):
            return sum(self._dim(s) for s in space.spaces.values())
        raise ValueError(f"cannot encode a {type(space).__name__} space ({space}); supported: {', '.join(self.SUPPORTED)}")

    def __call__(self, samples: Sequence[Any], out: np.ndarray | None = None) -> np.ndarray:
        """Encode ``samples`` (a list of B samples) into ``out`` ``[B, dim]`` (allocated if None) and return it."""
        n = len(samples)
        if out is None:
            out = np.zeros((n, self.dim), dtype=np.float32)
        else:
            out[:] = 0.0
        self._encode(self.space, samples, out, 0)
        return out

    def _encode(self, space: spaces.Space, samples: Sequence[Any], out: np.ndarray, off: int) -> int:
        n = len(samples)
        if isinstance(space, spaces.Discrete):
            idx = np.asarray(samples, dtype=np.int64).reshape(n) - int(space.start)
            out[np.arange(n), off + idx] = 1.0
            return off + int(space.n)
        if isinstance(space, spaces.MultiDiscrete):
            nvec = space.nvec.reshape(-1)
            arr = np.asarray(samples, dtype=np.int64).reshape(n, -1) - space.start.reshape(1, -1)
            offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]])
            out[np.arange(n)[:, None], off + offsets[None, :] + arr] = 1.0
            return off + int(np.sum(nvec))
        if isinstance(space, (spaces.MultiBinary, spaces.Box)):
            d = math.prod(space.shape)  # not np.prod: a numpy call per step costs more than the copy below
            out[:, off : off + d] = np.asarray(samples, dtype=np.float32).reshape(n, d)
            return off + d
        if isinstance(space, spaces.Tuple):
            for i, sub in enumerate(space.spaces):
                off = self._encode(sub, [s[i] for s in samples], out, off)
            return off
        if isinstance(space, spaces.Dict):
            for key, sub in space.spaces.items():
                off = self._encode(sub, [s[key] for s in samples], out, off)
            return off
        raise ValueError(f"cannot encode a {type(space).__name__} space; supported: {', '.join(self.SUPPORTED)}")
