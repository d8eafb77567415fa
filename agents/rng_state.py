"""The global random generators' states as plain data and tensors, for checkpoints that load with ``weights_only``."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["numpy_rng_from_plain", "numpy_rng_to_plain", "python_rng_from_plain", "python_rng_to_plain"]


def numpy_rng_to_plain(state: tuple) -> dict:
    """``np.random.get_state()`` (a tuple holding a uint32 array) as plain data and a tensor."""
    name, key, pos, has_gauss, gauss = state
    return {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}  # fmt: skip


def numpy_rng_from_plain(data: dict) -> tuple:
    """Inverse of :func:`numpy_rng_to_plain`, for ``np.random.set_state``."""
    return (data["name"], data["key"].numpy().astype(np.uint32), data["pos"], data["has_gauss"], data["gauss"])


def python_rng_to_plain(state: tuple) -> list:
    """``random.getstate()`` as plain lists."""
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def python_rng_from_plain(data: list) -> tuple:
    """Inverse of :func:`python_rng_to_plain`, for ``random.setstate``."""
    version, internal, gauss_next = data
    return (version, tuple(internal), gauss_next)
