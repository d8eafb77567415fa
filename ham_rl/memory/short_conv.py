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
        T = x.shape[1]
        padded = torch.cat([history.to(x.dtype), x], 1)  # [B, size - 1 + T, C]
        windows = padded.unfold(1, self.size, 1)  # [B, T, C, size]; position p holds x_{t - (size - 1 - p)}
        lags = torch.arange(self.size - 1, -1, -1, device=x.device)  # the lag of each window position
        # x_{t-j} exists in this episode only if the episode is at least j steps old at t.
        in_episode = (steps[..., None] >= lags).to(x.dtype)  # [B, T, size]
        y = (windows * self.weight.flip(0).T).mul(in_episode[:, :, None, :]).sum(-1) + self.bias
        return nn.functional.silu(y), padded[:, T:]
