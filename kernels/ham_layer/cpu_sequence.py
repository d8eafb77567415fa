"""The HAM layer's sequence form (``HybridMemory``'s native path, input to output) as one autograd node on CPU.

Built op by op, the layer records some 60 autograd nodes a segment, and a PPO update replays a 4 x 202-step minibatch
through them 32 times an iteration: the nodes, their saved tensors, the ops that only route gradients (the
zero-filled index backward, unbind's stack, cat's slices) and the interpreter between them cost about as much as the
kernels' arithmetic. Here the forward and the backward are one native call each (``cpu_sequence.cpp``), which run the
layer's kernels (``short_conv``, ``cpu_layer``, the delta rule's ``cpu_recurrent``, the cache plan of ``ham_step``)
and torch's CPU flash attention in order, joined by plain loops instead of the ops that copy, stack and scatter
between them.

The results equal the op-by-op path's within float32 round-off (the matmuls and the gradient scatter group their sums
differently), and its routing, plan and cache exactly; ``tests/kernels/test_kernels_ham_layer.py`` compares outputs,
the final state and every gradient, with and without a carried-in cache, with a capacity, for every router score,
and with the final state differentiated.

The node takes finite inputs only: the native forward declines (``cpu_layer_sequence`` returns None) when a
projection, the carried-in state or the attention's temperature is not finite, and the caller runs the op-by-op path,
whose kernels contain a bad token to its own episode (``kernels/nonfinite.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native
from ham_rl.kernels.gated_delta_rule.cpu_recurrent import DEFAULT_BLOCK
from ham_rl.kernels.ham_step.cpu_step import SCORE_KINDS

__all__ = ["LayerWeights", "cpu_layer_sequence"]


class LayerWeights(NamedTuple):
    """The HAM layer's parameters as its modules hold them (``gates`` in blocks of H rows, the log decay's first)."""

    qkv: Tensor  # [3 D, C]
    local: Tensor  # [D, C]
    gates: Tensor  # [G H, C]
    gates_bias: Tensor  # [G H]
    conv: Tensor  # [K, D] the short convolution's taps
    conv_bias: Tensor  # [D]
    log_scale: Tensor  # [H] the attention's log temperature
    norm: Tensor  # [D] RMSNorm's weight
    out: Tensor  # [D_out, D]
    out_bias: Tensor  # [D_out]


class _Declined(Exception):
    """The forward found an input that is not finite (the native call returned nothing)."""


class _LayerSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *args):
        weights, state, settings = args[-3:]
        ctx.set_materialize_grads(False)  # the final state's gradients are None unless a later segment reads it
        out = native.load_native().layer_sequence_forward(x, [w.contiguous() for w in weights], *state, *settings)
        if not out:
            raise _Declined
        outputs, saved = out[:8], out[8:]
        ctx.save_for_backward(*saved)
        ctx.weights, ctx.meta = weights, (settings[4:7], state[4].shape[1])  # the readout's channels, L0
        ctx.mark_non_differentiable(*outputs[2:3], *outputs[5:])  # history, scores, times, length
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dS, _dhistory, dkeys_f, dvalues_f, *_):
        w, (channels, L0) = ctx.weights, ctx.meta
        x = ctx.saved_tensors[0]
        empty = x.new_empty(0)
        dy = torch.zeros(*x.shape[:2], w.out.shape[0]) if dy is None else dy.contiguous()
        weights = [t.contiguous() for t in (w.qkv, w.local, w.gates, w.conv, w.log_scale, w.norm, w.out)]
        grads = native.load_native().layer_sequence_backward(
            ctx.saved_tensors, weights, dy, *(empty if t is None else t.contiguous() for t in (dS, dkeys_f, dvalues_f)),
            *channels, L0, DEFAULT_BLOCK,
        )  # fmt: skip
        return (*grads, None, None, None)


def cpu_layer_sequence(
    x: Tensor,
    weights: LayerWeights,
    starts: Tensor,
    steps: Tensor,
    S0: Tensor | None,
    history0: Tensor,
    cache: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    tau: Tensor,
    capacity: int,
    score_kind: str,
    heads: int,
    channels: tuple[int, int, int],
    eps: float,
) -> tuple[Tensor, ...] | None:
    """The HAM layer on a segment ``x [B, T, C]`` as one autograd node, or None where an input is not finite.

    ``starts``, ``steps`` ``[B, T]``; ``S0 [B, H, d, d]``, ``history0 [B, K - 1, D]`` and ``cache`` (keys, values,
    scores, times, length) the carried-in state, none of it needing a gradient; ``tau`` the routing threshold (0-dim);
    ``channels`` the rows of the gates that hold the RNN's, the attention's and the local path's readout gates; ``eps``
    RMSNorm's. Returns ``(y [B, T, D_out], S, history, keys, values, scores, times, length)``: the output and the
    state after the segment (gradients flow to ``x``, the weights, and from ``S``, ``keys`` and ``values``).
    """
    if cache[0].shape[1] and bool(starts[:, 0].all()):  # every row starts an episode: nothing carried in is read
        cache = (*(t[:, :0] for t in cache[:4]), torch.zeros_like(cache[4]))
    state = (
        starts.bool().contiguous(), steps.long().contiguous(), x.new_empty(0) if S0 is None else S0.contiguous(),
        history0.contiguous(), *(t.contiguous() for t in cache[:3]), *(t.long().contiguous() for t in cache[3:]),
    )  # fmt: skip
    settings = (tau.detach(), int(capacity), SCORE_KINDS[score_kind], int(heads), *channels, float(eps), DEFAULT_BLOCK)
    try:
        return _LayerSequence.apply(x, *weights, weights, state, settings)
    except _Declined:
        return None
