"""Causal depthwise convolution over the last few steps of an episode, with per-env history (Gated DeltaNet's
short convolution). It gives q, k and v direct access to the previous ``size - 1`` steps, which a delta rule
with unit-norm keys otherwise has to learn to encode through positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ShortConv"]


class ShortConv(nn.Module):
    """``y_t = SiLU(sum_j w_j * x_{t-j})`` over ``j < size``, never reaching back past the episode's start.

    The history of each env (its last ``size - 1`` inputs) travels in the memory state as ``[B, size - 1, C]``.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.size = size
        bound = 1 / math.sqrt(size)
        self.weight = nn.Parameter(torch.empty(size, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(channels))

    def initial_history(self, batch_size: int, channels: int, device, dtype) -> Tensor:
        """``[B, size - 1, C]`` zeros."""
        return torch.zeros(batch_size, self.size - 1, channels, device=device, dtype=dtype)

    def forward(self, x: Tensor, history: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]``, ``history [B, size-1, C]``, ``steps [B, T]`` step in episode -> ``(y [B, T, C], history)``."""
        T, K = x.shape[1], self.size
        padded = torch.cat([history.to(x.dtype), x], 1)  # [B, K - 1 + T, C]; row K - 1 + t holds x_t
        y = x * self.weight[0] + self.bias
        # One shifted slice per lag: contiguous rows, cheaper forward and backward than an unfold's strided windows.
        for j in range(1, K):
            # x_{t-j} exists in this episode only if the episode is at least j steps old at t.
            in_episode = (steps >= j).to(x.dtype)[..., None]  # [B, T, 1]
            y = y + padded[:, K - 1 - j : K - 1 - j + T] * in_episode * self.weight[j]
        return nn.functional.silu(y), padded[:, T:]
