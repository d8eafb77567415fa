"""The actor-critic heads as native calls (``cpu_heads.cpp``): the rollout step (``reference.actor_critic_step``: the two
MLPs and the log-softmax in plain loops, the sample by ``torch.multinomial``'s algorithm), and the update's log-probs,
entropies and values of given actions (``reference.actor_critic_evaluate``) forward and backward, one call each way
around MKL's matmuls.

A rollout step runs the actor's and the critic's MLPs and the categorical sample on a few dozen envs; as torch ops that
is some 20 calls at several microseconds of dispatch each, more than their arithmetic; in the update, some 25 ops forward
and as many autograd nodes back.
The results equal the reference's to float32 round-off (the sums run in another order than MKL's), and the sample
makes the same generator draws from probabilities equal to round-off, so the actions are the reference's except where
a draw falls within round-off of a boundary. How it is built, and what runs where it cannot be: ``kernels/native.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native

__all__ = ["cpu_actor_critic_evaluate", "cpu_actor_critic_step", "fits"]


def fits(y: Tensor, *weights: Tensor) -> bool:
    """Whether the native calls take these: float32 CPU tensors outside autocast (the update's matmuls inside the call
    would run in its dtype), the native kernels chosen and built."""
    return (
        all(t.dtype == torch.float32 for t in (y, *weights))
        and not torch.is_autocast_enabled(y.device.type)
        and native.use_native(y)
    )


def cpu_actor_critic_step(
    y: Tensor,
    actor: tuple[Tensor, Tensor, Tensor, Tensor],
    critic: tuple[Tensor, Tensor, Tensor, Tensor],
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.actor_critic_step`` (same arguments and returns) as one native call, without grad."""
    action, logp, value = native.load_native().actor_critic_step(y, *actor, *critic, bool(deterministic))
    return action, logp, value


def _empty_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if grad is None else grad.contiguous()


class _Evaluate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, actions, *weights):
        ctx.set_materialize_grads(False)
        y, actions = y.contiguous(), actions.contiguous()
        logp, ent, value, ha, hc, lp, probs = native.load_native().actor_critic_evaluate_forward(y, actions, *weights)
        ctx.save_for_backward(y, actions, ha, hc, lp, probs, ent, weights[0], weights[2], weights[4], weights[6])
        return logp, ent, value

    @staticmethod
    @once_differentiable
    def backward(ctx, d_logp, d_ent, d_value):
        y, actions, ha, hc, lp, probs, ent, aw1, aw2, cw1, cw2 = ctx.saved_tensors
        grads = native.load_native().actor_critic_evaluate_backward(
            *(_empty_if_none(g, y) for g in (d_logp, d_ent, d_value)), y, actions, ha, hc, lp, probs, ent, aw1, aw2,
            cw1, cw2,
        )  # fmt: skip
        return grads[0], None, *grads[1:]


def cpu_actor_critic_evaluate(
    y: Tensor, actions: Tensor, actor: tuple[Tensor, Tensor, Tensor, Tensor], critic: tuple[Tensor, Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.actor_critic_evaluate`` (same arguments and returns, gradients included) as one native call each
    way; ``y [N, hidden]``, ``actions [N]`` long in ``[0, A)`` (``RuntimeError`` naming the first one outside)."""
    return _Evaluate.apply(y, actions.long(), *actor, *critic)
