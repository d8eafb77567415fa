"""PPO's clipped loss as one native call (``cpu_loss.cpp``): the loss, its parts and statistics, and the loss's gradient
with respect to the new log-probs, entropies and values, which the backward scales by the loss's upstream gradient.

The results equal ``reference.ppo_loss``'s to float32 round-off (the sums run in double, in another order), the
gradient included where a max or a clamp ties (torch's conventions are kept: a tie splits, a bound passes). How it is
built, and what runs where it cannot be: ``kernels/native.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native

__all__ = ["cpu_ppo_loss", "fits"]


def fits(*tensors: Tensor) -> bool:
    """Whether the native call takes these: float32 CPU tensors, the native kernels chosen and built."""
    return all(t.dtype == torch.float32 for t in tensors) and native.use_native(tensors[0])


class _PPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, newlogprob, entropy, newvalue, *rest):
        xs = [t.reshape(-1).contiguous() for t in (newlogprob, entropy, newvalue, *rest[:4])]
        stats, grads = native.load_native().ppo_loss_forward(*xs, *rest[4:])
        ctx.save_for_backward(grads)
        ctx.shape = newlogprob.shape
        parts = stats[1:].unbind()
        ctx.mark_non_differentiable(*parts)
        return (stats[0], *parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_loss, *_):
        (grads,) = ctx.saved_tensors
        d_lp, d_ent, d_v = (grads * d_loss).view(3, *ctx.shape).unbind()
        return d_lp, d_ent, d_v, *([None] * 9)


def cpu_ppo_loss(
    newlogprob: Tensor,
    entropy: Tensor,
    newvalue: Tensor,
    logprob: Tensor,
    advantages: Tensor,
    returns: Tensor,
    values: Tensor,
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    norm_adv: bool,
    clip_vloss: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``reference.ppo_loss`` (same arguments and returns) as one native call; the gradient reaches the first three."""
    return _PPOLoss.apply(
        newlogprob, entropy, newvalue, logprob, advantages, returns, values, float(clip_coef), float(ent_coef),
        float(vf_coef), bool(norm_adv), bool(clip_vloss),
    )  # fmt: skip
