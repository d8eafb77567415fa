"""The causal short convolution's forward and backward as one native call each (``cpu_conv.cpp``): its CPU default.

``ham_rl/memory/short_conv.py`` holds the convolution's PyTorch form, the truth these calls are tested against, and
dispatches to them for float32 CPU tensors. How they are built, and what runs where they cannot be:
``kernels/native.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native

__all__ = ["CpuShortConvFunction", "cpu_short_conv", "fits"]


def fits(*tensors: Tensor) -> bool:
    """Whether the native convolution takes these tensors: all float32 (mixed precision runs the PyTorch form)."""
    return all(t.dtype == torch.float32 for t in tensors)


class CpuShortConvFunction(torch.autograd.Function):
    """``SiLU(bias + sum_j w_j x_{t-j} [steps_t >= j])``, forward and backward each one call into ``cpu_conv.cpp``."""

    @staticmethod
    def forward(ctx, x, history, steps, weight, bias):
        x, history, steps, weight = x.contiguous(), history.contiguous(), steps.contiguous(), weight.contiguous()
        pre, new_history = native.load_native().conv_forward(x, history, steps, weight, bias.contiguous())
        ctx.save_for_backward(pre, x, history, steps, weight)
        return F.silu(pre), new_history

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dhistory_out):
        pre, x, history, steps, weight = ctx.saved_tensors
        dpre = torch.zeros_like(pre) if dy is None else torch.ops.aten.silu_backward(dy, pre).contiguous()
        dx, dhistory, dweight, dbias = native.load_native().conv_backward(dpre, x, history, steps, weight)
        return dx, dhistory, None, dweight, dbias


def cpu_short_conv(x: Tensor, history: Tensor, steps: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``short_conv`` (same arguments and returns) as native calls; ``ValueError`` for tensors ``fits`` refuses."""
    if not fits(x, history, weight, bias):
        raise ValueError("the native short convolution takes float32 tensors; mixed precision runs short_conv's own")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, history, weight, bias)):
        return CpuShortConvFunction.apply(x, history, steps.long(), weight, bias)
    pre, new_history = native.load_native().conv_forward(
        x.contiguous(), history.contiguous(), steps.long().contiguous(), weight.contiguous(), bias.contiguous()
    )
    return F.silu(pre), new_history
