"""The HAM layer's sequence form (``HybridMemory``'s native path, input to output) as one autograd node on CPU.

Forward and backward each call the layer's native kernels (``short_conv``, ``cpu_layer``, the delta rule's
``cpu_recurrent``), torch's CPU flash attention and a few matmuls in a fixed order, with no autograd graph of their
own. Built op by op, the same layer records some 60 autograd nodes a segment, and a PPO update replays a 4 x 202-step
minibatch through them 32 times an iteration: the nodes, their saved-tensor bookkeeping and the ops that only exist to
route gradients (the zero-filled index backward, unbind's stack, cat's slices) cost as much as the kernels' arithmetic.

The plan of what each token sees (``ham_step.cache_plan``) and the routing score carry no gradient and run as before.
The input projections' backward is one matmul for the input and one for the weights (the three projections'
gradients side by side). The results equal the op-by-op path's within float32 round-off (the matmuls group their sums
differently); ``tests/kernels/test_kernels_ham_layer.py`` compares outputs, the final state and every gradient.

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


def _flat(t: Tensor, *shape: int) -> Tensor:
    return t.reshape(*shape).contiguous()


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
        D, d = lin.shape[-1], lin.shape[-1] // H
        G = z.shape[-1] // H
        z = z.view(N, G, H)
        pre, history = ops.conv_forward(lin, history0, steps, weights.conv.contiguous(), weights.conv_bias.contiguous())
        local = F.silu(pre)
        log_scale = weights.log_scale.contiguous()
        qkvn, gates, q_attn, inv, above = ops.layer_tokens_forward(
            qkv.view(N, 3, H, d), z, log_scale, 1e-12
        )
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
        (
            x, lin, history0, steps, pre, qkvn, gates, z, inv, above, q, k, v, beta, g, st, checkpoints, index, src,
            mask, anything, qa, ka, va, o_att, lse, o_rnn, o_kv, local, y_norm, rstd,
        ) = ctx.saved_tensors  # fmt: skip
        w, (channels, L0) = ctx.weights, ctx.meta
        ops = native.load_native()
        B, T, C = x.shape
        N, (_, _, H, d) = B * T, q.shape
        G = gates.shape[1]
        dy = torch.zeros(B, T, w.out.shape[0]) if dy is None else dy
        dyf = dy.reshape(N, -1)
        d_out, d_out_bias = dyf.t().mm(y_norm), dyf.sum(0)
        d_ynorm = dyf.mm(w.out)
        do_rnn, do_kv, d_local, d_gates, d_norm = ops.layer_readout_backward(
            d_ynorm, o_rnn.view(N, H, d), o_kv, local.view(N, H, d), gates, w.norm.contiguous(), rstd, *channels
        )
        do_att = torch.where(anything[:, :, None, None], do_kv.view(B, T, H, d), 0.0).transpose(1, 2)
        dqa, dka, dva = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do_att, qa, ka, va, o_att, lse, 0.0, False, attn_mask=mask, scale=1.0
        )
        rows = torch.arange(B)[:, None]
        dk_all = x.new_zeros(B, L0 + T, H, d).index_put_((rows, index), dka.transpose(1, 2), accumulate=True)
        dv_all = x.new_zeros(B, L0 + T, H, d).index_put_((rows, index), dva.transpose(1, 2), accumulate=True)
        if dkeys_f is not None:
            dk_all.index_put_((rows, src), dkeys_f, accumulate=True)
        if dvalues_f is not None:
            dv_all.index_put_((rows, src), dvalues_f, accumulate=True)
        empty = x.new_empty(0)
        dq, dk, dv, dbeta, dg = ops.gdr_backward(
            q, k, v, beta, g, st, checkpoints, do_rnn.view(B, T, H, d), empty,
            empty if dS is None else dS.contiguous(), 1.0, DEFAULT_BLOCK, False,
        )[:5]  # fmt: skip
        dk += dk_all[:, L0:]
        dv += dv_all[:, L0:]
        d_qkvn = torch.stack([dq, dk, dv], 2).view(N, 3, H, d)
        d_gates = d_gates.view(B, T, G, H)
        d_gates[:, :, 0] += dg
        d_gates[:, :, 1] += dbeta
        dqkv, dz, d_log_scale = ops.layer_tokens_backward(
            d_qkvn, d_gates.view(N, G, H), dqa.transpose(1, 2).reshape(N, H, d), qkvn, gates, z, inv, above,
            w.log_scale.contiguous(),
        )  # fmt: skip
        d_pre = torch.ops.aten.silu_backward(d_local.view(B, T, -1), pre).contiguous()
        d_lin, _, d_conv, d_conv_bias = ops.conv_backward(d_pre, lin, history0, steps, w.conv.contiguous())
        # The three projections' gradients side by side: one matmul for the input, one for the weights.
        d_proj = torch.cat([dqkv.view(N, -1), d_lin.view(N, -1), dz.view(N, -1)], 1)  # [N, 3D + D + G H]
        d_x = d_proj.mm(torch.cat([w.qkv, w.local, w.gates])).view(B, T, C)
        d_w = d_proj.t().mm(x.reshape(N, C))
        d_qkv_w, d_local_w, d_gates_w = d_w.split([w.qkv.shape[0], w.local.shape[0], w.gates.shape[0]])
        d_weights = (d_qkv_w, d_local_w, d_gates_w, dz.view(N, -1).sum(0), d_conv, d_conv_bias, d_log_scale, d_norm,
                     d_out, d_out_bias)  # fmt: skip
        return (d_x, *d_weights, *([None] * 17))


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
