"""L2 normalisation over the last dim with a hand-written backward (queries and keys of the HAM layer)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["l2norm"]


def _forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inv = norm.clamp_min(eps).reciprocal()
    return x * inv, inv, norm


class _L2Norm(torch.autograd.Function):
    """``y = x / max(||x||, eps)``; backward ``dx = (dy - y (y . dy)) / ||x||`` where ``||x|| > eps``, else ``dy / eps``.

    ``F.normalize`` goes through a norm, a clamp, an expand and a division, and autograd replays about ten ops
    over the whole tensor in the backward; this is five.
    """

    @staticmethod
    def forward(ctx, x, eps):
        y, inv, norm = _forward(x, eps)
        ctx.save_for_backward(y, inv, norm > eps)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, inv, above = ctx.saved_tensors
        # Where the norm was clamped, y = x / eps is linear in x: no projection term.
        radial = torch.where(above, (y * dy).sum(-1, keepdim=True), 0.0)
        return (dy - y * radial) * inv, None


def l2norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=-1, eps=eps)`` with a cheaper backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _L2Norm.apply(x, eps)
    return _forward(x, eps)[0]  # rollout steps: no autograd.Function overhead
