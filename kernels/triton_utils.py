"""Helpers the Triton kernels share (the backend choice itself is ``ham_rl.kernels.backend``)."""

from __future__ import annotations

__all__ = ["next_power_of_2"]


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
