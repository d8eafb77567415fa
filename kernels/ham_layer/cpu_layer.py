"""The HAM layer's per-token work (``reference.py``) as native calls with hand-written backwards (``cpu_layer.cpp``).

In a PPO minibatch each is some 30 eager ops forward and 50 backward over ``[tokens, hidden]``; here one call each way.
Float32 CPU tensors only; how the calls are built, and what runs where they cannot be: ``kernels/native.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native

__all__ = ["cpu_readout", "cpu_tokens", "fits"]


def fits(*tensors: Tensor) -> bool:
    """Whether the native calls take these tensors: float32 on a CPU, with the native kernels chosen and built."""
    return all(t.dtype == torch.float32 for t in tensors) and native.use_native(tensors[0])


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


class _Tokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, z, log_scale, eps):
        ctx.set_materialize_grads(False)
        qkv, z, log_scale = qkv.contiguous(), z.contiguous(), log_scale.contiguous()
        qkvn, gates, q_attn, inv, above = native.load_native().layer_tokens_forward(qkv, z, log_scale, eps)
        ctx.save_for_backward(qkvn, gates, z, inv, above, log_scale)
        return qkvn, gates, q_attn

    @staticmethod
    @once_differentiable
    def backward(ctx, d_qkvn, d_gates, d_qattn):
        qkvn, gates, z, inv, above, log_scale = ctx.saved_tensors
        d_qattn = qkvn.new_empty(0) if d_qattn is None else d_qattn.contiguous()
        dqkv, dz, dls = native.load_native().layer_tokens_backward(
            _zeros_if_none(d_qkvn, qkvn), _zeros_if_none(d_gates, gates), d_qattn, qkvn, gates, z, inv, above, log_scale
        )
        return dqkv, dz, dls, None


class _Readout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_rnn, o_kv, local, gates, weight, channels, eps):
        ctx.set_materialize_grads(False)
        xs = [t.contiguous() for t in (o_rnn, o_kv, local, gates, weight)]
        y, rstd = native.load_native().layer_readout_forward(*xs, *channels, eps)
        ctx.save_for_backward(*xs, rstd)
        ctx.channels = channels
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        *xs, rstd = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None, None, None
        grads = native.load_native().layer_readout_backward(dy.contiguous(), *xs, rstd, *ctx.channels)
        return (*grads, None, None)


def cpu_tokens(qkv: Tensor, z: Tensor, log_scale: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.tokens`` (same arguments and returns) as native calls."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, z, log_scale)):
        return _Tokens.apply(qkv, z, log_scale, float(eps))
    out = native.load_native().layer_tokens_forward(qkv.contiguous(), z.contiguous(), log_scale.contiguous(), float(eps))
    return out[0], out[1], out[2]


def cpu_readout(
    o_rnn: Tensor, o_kv: Tensor, local: Tensor, gates: Tensor, weight: Tensor, channels: tuple[int, int, int], eps: float
) -> Tensor:
    """``reference.readout`` (same arguments and returns) as native calls."""
    xs = (o_rnn, o_kv, local, gates, weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in xs):
        return _Readout.apply(*xs, tuple(channels), float(eps))
    return native.load_native().layer_readout_forward(*(t.contiguous() for t in xs), *channels, float(eps))[0]
