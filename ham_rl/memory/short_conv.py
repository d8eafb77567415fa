"""Causal depthwise convolution over the last few steps of an episode, with per-env history (Gated DeltaNet's
short convolution). It gives q, k and v direct access to the previous ``size - 1`` steps, which a delta rule
with unit-norm keys otherwise has to learn to encode through positions.

The convolution is depthwise and linear before its SiLU, so on a projection ``W x`` it folds into the projection:
``sum_j w_j * (W x_{t-j}) = [diag(w_0) W, ..., diag(w_{K-1}) W] [x_t; ...; x_{t-K+1}]``. When the projection's
input is narrow (``size * input_size <= FOLD_MAX_INPUTS``, e.g. POPGym observations), ``folded_short_conv`` runs
that one matmul over the masked lagged *inputs* instead of masking, shifting and summing the 3 * hidden projected
channels. A HAM forward + backward on one 128-step row (hidden 256, size 4) then takes 7.1 instead of 8.1 ms with 4
input features and 7.8 instead of 8.2 with 16; at 32 the two forms are even and at 64 the folded one is 1.2x slower,
hence the bound. Its history is then the last ``size - 1`` inputs rather than projections.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ham_rl.kernels.native import use_native
from ham_rl.kernels.short_conv import cpu_conv

__all__ = ["ShortConv", "short_conv", "folded_short_conv", "lagged_inputs", "fold_weight", "FOLD_MAX_INPUTS"]

#: ``folded_short_conv`` pays for itself while the folded matmul's inner size, ``size * input_size``, stays this small
FOLD_MAX_INPUTS = 64


def _masked(t: Tensor, steps: Tensor, lag: int) -> Tensor:
    """``t [B, T, C]`` with the rows of tokens fewer than ``lag`` steps into their episode set to 0."""
    # where, not a multiply by a 0/1 mask: a previous episode's inf or NaN must not leak into this one.
    return torch.where((steps >= lag)[..., None], t, 0.0)


def _lag(padded: Tensor, steps: Tensor, K: int, j: int) -> Tensor:
    """The inputs ``j`` steps back, 0 before the episode's start, from ``padded = [history, x]``."""
    T = steps.shape[1]
    return _masked(padded[:, K - 1 - j : K - 1 - j + T], steps, j) if j else padded[:, K - 1 :]


def _forward(x: Tensor, history: Tensor, steps: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(pre-activation, padded = [history, x], new history)``."""
    K, T = weight.shape[0], x.shape[1]
    padded = torch.cat([history.to(x.dtype), x], 1)  # [B, K - 1 + T, C]; row K - 1 + t holds x_t
    pre = torch.addcmul(bias, x, weight[0])
    for j in range(1, K):
        pre.addcmul_(_lag(padded, steps, K, j), weight[j])
    return pre, padded, padded[:, T:]


class _ShortConvFunction(torch.autograd.Function):
    """``SiLU(bias + sum_j w_j x_{t-j} [steps_t >= j])`` on ``padded = [history, x]``, forward and backward by hand.

    Autograd through masked shifted slices records about 20 ops on ``[B, T, C]`` tensors and replays twice as many
    in the backward; here each lag is one ``where`` (the reset mask) and one in-place ``addcmul_`` in the forward,
    and the backward redoes the ``where`` rather than keeping every lag.
    """

    @staticmethod
    def forward(ctx, x, history, steps, weight, bias):
        pre, padded, new_history = _forward(x, history, steps, weight, bias)
        # padded, not the K masked lags: the backward redoes each lag's where (K - 1 copies of x fewer kept)
        ctx.save_for_backward(steps, weight, pre, padded)
        ctx.dtypes = (x.dtype, history.dtype, weight.dtype, bias.dtype)  # mixed precision: grads match inputs
        return nn.functional.silu(pre), new_history

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dhistory_out):
        steps, weight, pre, padded = ctx.saved_tensors
        K, (B, T, C) = weight.shape[0], pre.shape
        dpre = torch.ops.aten.silu_backward(dy, pre)
        dpadded = dpre.new_zeros(B, K - 1 + T, C)
        torch.mul(dpre, weight[0], out=dpadded[:, K - 1 :])
        dweight = torch.stack([(dpre * _lag(padded, steps, K, j)).sum((0, 1)) for j in range(K)])
        for j in range(1, K):
            dpadded[:, K - 1 - j : K - 1 - j + T].addcmul_(_masked(dpre, steps, j), weight[j])
        dbias = dpre.sum((0, 1))
        x_dtype, history_dtype, weight_dtype, bias_dtype = ctx.dtypes
        dx = dpadded[:, K - 1 :].to(x_dtype) if ctx.needs_input_grad[0] else None
        dhistory = dpadded[:, : K - 1].to(history_dtype) if ctx.needs_input_grad[1] else None
        return dx, dhistory, None, dweight.to(weight_dtype), dbias.to(bias_dtype)


def short_conv(x: Tensor, history: Tensor, steps: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``x [B, T, C]``, ``history [B, K-1, C]``, ``steps [B, T]``, ``weight [K, C]``, ``bias [C]`` -> ``(y, history)``.

    On float32 CPU tensors this runs the native form (``kernels/short_conv/cpu_conv.py``, ``kernels/native.py``)."""
    if cpu_conv.fits(x, history, weight, bias) and use_native(x):
        return cpu_conv.cpu_short_conv(x, history, steps, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, history, weight, bias)):
        return _ShortConvFunction.apply(x, history, steps, weight, bias)
    pre, _, new_history = _forward(x, history, steps, weight, bias)  # rollout steps: no autograd.Function overhead
    return nn.functional.silu(pre), new_history


def folded_short_conv(
    x: Tensor, history: Tensor, steps: Tensor, proj_weight: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """``short_conv`` of the projection ``x @ proj_weight.T`` as one matmul over the lagged inputs (module docstring).

    ``x [B, T, F]``, ``history [B, K-1, F]`` (the last inputs, not projections), ``steps [B, T]``,
    ``proj_weight [C, F]``, ``weight [K, C]``, ``bias [C]`` -> ``(y [B, T, C], history [B, K-1, F])``.
    """
    lagged, new_history = lagged_inputs(x, history, steps, weight.shape[0])
    return nn.functional.silu(nn.functional.linear(lagged, fold_weight(proj_weight, weight), bias)), new_history


def lagged_inputs(x: Tensor, history: Tensor, steps: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``[x_t; x_{t-1}; ...; x_{t-size+1}]`` per token, 0 before the episode start: ``x [..., T, F]``, ``history
    [..., size-1, F]``, ``steps [..., T]`` -> ``([..., T, size * F], new history [..., size-1, F])``."""
    T = x.shape[-2]
    padded = torch.cat([history.to(x.dtype), x], -2)  # [..., K - 1 + T, F]; row K - 1 + t holds x_t
    lagged = [x] + [_masked(padded[..., size - 1 - j : size - 1 - j + T, :], steps, j) for j in range(1, size)]
    return torch.cat(lagged, -1), padded[..., T:, :]


def fold_weight(proj_weight: Tensor, weight: Tensor) -> Tensor:
    """The folded weight ``[..., C, K * F]``: column block j is ``diag(w_j) W`` (``proj_weight [..., C, F]``,
    ``weight [..., K, C]``), matching ``lagged_inputs``."""
    return (weight[..., :, :, None] * proj_weight[..., None, :, :]).transpose(-3, -2).flatten(-2)


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
        return short_conv(x, history, steps, self.weight, self.bias)
