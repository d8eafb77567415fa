"""The HAM layer's sequence form (``HybridMemory``'s native path, input to output) as one autograd node on CPU.

Built op by op, the layer records some 60 autograd nodes a segment, and a PPO update replays a 4 x 202-step minibatch
through them 32 times an iteration: the nodes, their saved tensors and the ops that only route gradients (the
zero-filled index backward, unbind's stack, cat's slices) cost about as much as the kernels' arithmetic. Here the
forward calls the layer's native kernels (``short_conv``, ``cpu_layer``, the delta rule's ``cpu_recurrent``), the cache
plan (``ham_step.attention_plan``) and torch's CPU flash attention without recording a graph, and the backward is one
native call (``cpu_sequence.cpp``) that runs the same kernels' backward in reverse; the input projections' backward is
one matmul for the input and one for the weights (the three projections' gradients side by side).

The results equal the op-by-op path's within float32 round-off (the matmuls and the gradient scatter group their sums
differently); ``tests/kernels/test_kernels_ham_layer.py`` compares outputs, the final state and every gradient, with
and without a carried-in cache, with a capacity, and with the final state differentiated.

The node takes finite inputs only: ``cpu_layer_sequence`` returns None when a projection, the carried-in state or the
attention's query holds a NaN or an inf, and the caller runs the op-by-op path, whose kernels contain a bad token to
its own episode (``kernels/nonfinite.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native
from ham_rl.kernels.gated_delta_rule.cpu_recurrent import DEFAULT_BLOCK
from ham_rl.kernels.ham_step.cache_plan import attention_plan
from ham_rl.kernels.ham_step.reference import surprise_score
from ham_rl.kernels.nonfinite import all_finite

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


class _LayerSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *args):
        (
            weights, starts, steps, S0, history0, keys0, values0, scores0, times0, length0, tau, capacity, score_kind,
            heads, channels, eps, proj,
        ) = args[-17:]  # fmt: skip
        ctx.set_materialize_grads(False)  # the final state's gradients are None unless a later segment reads it
        ops = native.load_native()
        B, T, C = x.shape
        N, H = B * T, heads
        qkv, lin, z = proj
        d = lin.shape[-1] // H
        G = z.shape[-1] // H
        z = z.view(N, G, H)
        pre, history = ops.conv_forward(lin, history0, steps, weights.conv.contiguous(), weights.conv_bias.contiguous())
        local = F.silu(pre)
        log_scale = weights.log_scale.contiguous()
        qkvn, gates, q_attn, inv, above = ops.layer_tokens_forward(qkv.view(N, 3, H, d), z, log_scale, 1e-12)
        qkvn4 = qkvn.view(B, T, 3, H, d)
        q, k, v = (qkvn4[:, :, i].contiguous() for i in range(3))
        gates4 = gates.view(B, T, G, H)
        g, beta = gates4[:, :, 0].contiguous(), gates4[:, :, 1].contiguous()
        st = starts.to(torch.uint8).contiguous()
        h0 = S0.contiguous() if S0 is not None else q.new_empty(0)
        o_rnn, v_hat, S, checkpoints = ops.gdr_forward(q, k, v, beta, g, st, h0, 1.0, DEFAULT_BLOCK)

        score = surprise_score(v_hat, v, score_kind)  # [B, T]
        routed = score >= tau
        index, visible, src, final_length = attention_plan(scores0, times0, length0, starts, steps, score, routed, capacity)
        L0 = keys0.shape[1]
        keys_all = torch.cat([keys0, k], 1) if L0 else k  # [B, L0 + T, H, d]
        values_all = torch.cat([values0, v], 1) if L0 else v
        rows = torch.arange(B)[:, None]
        keys, values = keys_all[rows, index], values_all[rows, index]  # [B, S, H, d]
        # What F.scaled_dot_product_attention does on CPU with a bool mask, with the log-sum-exp kept for the backward.
        mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))[:, None]
        qa, ka, va = q_attn.view(B, T, H, d).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        o_att, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qa, ka, va, 0.0, False, attn_mask=mask, scale=1.0
        )
        anything = visible.any(-1)  # [B, T]; a token that sees nothing reads 0 (older torch returned NaN there)
        o_kv = torch.where(anything[:, None, :, None], o_att, 0.0).transpose(1, 2).reshape(N, H, d)
        y_norm, rstd = ops.layer_readout_forward(
            o_rnn.view(N, H, d), o_kv, local.view(N, H, d), gates, weights.norm.contiguous(), *channels, eps
        )
        y = F.linear(y_norm, weights.out, weights.out_bias).view(B, T, -1)

        keys_f, values_f = keys_all[rows, src], values_all[rows, src]
        scores_f = (torch.cat([scores0, score.to(scores0.dtype)], 1) if L0 else score.to(scores0.dtype)).gather(1, src)
        times_f = (torch.cat([times0, steps], 1) if L0 else steps).gather(1, src)
        ctx.save_for_backward(
            x, lin, history0, steps, pre, qkvn, gates, z, inv, above, q, k, v, beta, g, st, checkpoints, index, src,
            mask, anything, qa, ka, va, o_att, lse, o_rnn, o_kv, local, y_norm, rstd,
        )  # fmt: skip
        ctx.weights, ctx.meta = weights, (channels, L0)
        ctx.mark_non_differentiable(history, scores_f, times_f, final_length)
        return y, S, history, keys_f, values_f, scores_f, times_f, final_length

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
        return (*grads, *([None] * 17))


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
    scores, times, length) the carried-in state, none of it needing a gradient; ``tau`` the routing threshold;
    ``channels`` the rows of the gates that hold the RNN's, the attention's and the local path's readout gates; ``eps``
    RMSNorm's. Returns ``(y [B, T, D_out], S, history, keys, values, scores, times, length)``: the output and the
    state after the segment (gradients flow to ``x``, the weights, and from ``S``, ``keys`` and ``values``).
    """
    keys0, values0, scores0, times0, length0 = cache
    if keys0.shape[1] and bool(starts[:, 0].all()):  # every row starts an episode: nothing carried in is ever read
        keys0, values0, scores0, times0 = (t[:, :0] for t in (keys0, values0, scores0, times0))
        length0 = torch.zeros_like(length0)
    with torch.no_grad():  # the node's backward differentiates them itself
        proj = (F.linear(x, weights.qkv), F.linear(x, weights.local), F.linear(x, weights.gates, weights.gates_bias))
        # q and k are unit (or 0), so the attention's query is finite where its temperature is
        if not all_finite(*proj, S0, keys0, values0, weights.log_scale.exp()):
            return None
    args = (
        weights, starts, steps.long().contiguous(), S0, history0.contiguous(), keys0, values0, scores0, times0,
        length0, tau, capacity, score_kind, heads, tuple(channels), float(eps), proj,
    )  # fmt: skip
    return _LayerSequence.apply(x, *weights, *args)
