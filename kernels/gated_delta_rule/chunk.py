"""Chunked gated delta rule in Triton, forward and backward, with episode resets and the prediction v_hat.

One program per (batch, head) walks the chunks in order (forward) or in reverse (backward), with the
``[K, V]`` float32 state in registers; inside a chunk it does the WY / UT-transform algebra of
``naive_chunk.py`` (derivation in ``README.md``) with ``tl.dot``. The forward stores the state entering each
chunk (``[B, NT, H, K, V]`` float32) for the backward, which recomputes everything else. Head dims are padded
to powers of two (>= 16, as ``tl.dot`` needs) with masks; the chunk size is 16, 32 or 64. Every ``tl.dot`` runs
on float32 operands in IEEE precision: exact parity with the float32 reference, and it sidesteps the
interpreter's wrong bfloat16 dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ham_rl.kernels.nonfinite import contain_delta_rule, delta_rule_grads, output_grads, poison_delta_rule
from ham_rl.kernels.triton_utils import next_power_of_2

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_fwd",
    "chunk_gated_delta_rule_bwd",
    "chunk_gated_delta_rule_fwd_kernel",
    "chunk_gated_delta_rule_bwd_kernel",
    "ChunkGatedDeltaRuleFunction",
]


@triton.jit
def chunk_gated_delta_rule_fwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    beta,  # [B, T, H]
    g,  # [B, T, H]
    starts,  # [B, T] int32
    h0,  # [B, H, K, V] float32
    o,  # [B, T, H, V]
    vhat,  # [B, T, H, V]
    ht,  # [B, H, K, V] float32
    hs,  # [B, NT, H, K, V] float32: the state entering each chunk
    T,
    NT,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    lower_eq = o_i[:, None] >= o_i[None, :]
    is_last = o_i == BT - 1
    eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s = tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, NT):
        t0 = i_c * BT
        o_t = t0 + o_i
        m_t = o_t < T
        p_tk = (i_b * T + o_t[:, None]) * H * K + i_h * K + o_k[None, :]
        p_tv = (i_b * T + o_t[:, None]) * H * V + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + (i_b * T + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_g = tl.load(g + (i_b * T + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_ep = tl.zeros([BT], dtype=tl.float32)
        if HAS_STARTS:
            b_st = tl.load(starts + i_b * T + o_t, mask=m_t, other=0).to(tl.float32)
            b_ep = tl.sum(tl.where(lower_eq, b_st[None, :], 0.0), 1)  # episode index inside the chunk
        b_G = tl.sum(tl.where(lower_eq, b_g[None, :], 0.0), 1)  # chunk-local cumulative log decay
        same = b_ep[:, None] == b_ep[None, :]
        causal = same & lower_eq
        strict = causal & (o_i[:, None] != o_i[None, :])
        gam = tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        akk = tl.where(strict, tl.dot(b_k, tl.trans(b_k), input_precision="ieee") * gam, 0.0)
        aqk = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * gam
        e0 = tl.where(b_ep == 0, tl.exp(b_G), 0.0)
        # X = (I + diag(beta) Akk)^-1 by forward substitution, one row at a time.
        b_l = b_beta[:, None] * akk
        b_x = eye
        for i in range(1, BT):
            l_i = tl.sum(tl.where(o_i[:, None] == i, b_l, 0.0), 0)  # row i of L, [BT] over j < i
            x_i = tl.sum(tl.where(o_i[None, :] == i, eye, 0.0), 0) - tl.sum(l_i[:, None] * b_x, 0)
            b_x = tl.where(o_i[:, None] == i, x_i[None, :], b_x)
        b_ks = tl.dot(b_k, b_s, input_precision="ieee")  # [BT, BV]
        b_u = tl.dot(b_x, b_beta[:, None] * (b_v - e0[:, None] * b_ks), input_precision="ieee")
        b_vh = e0[:, None] * b_ks + tl.dot(akk, b_u, input_precision="ieee")
        b_o = scale * (e0[:, None] * tl.dot(b_q, b_s, input_precision="ieee") + tl.dot(aqk, b_u, input_precision="ieee"))
        tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)
        tl.store(vhat + p_tv, b_vh.to(vhat.dtype.element_ty), mask=m_tv)
        tl.store(hs + ((i_b * NT + i_c) * H + i_h) * K * V + p_kv, b_s, mask=m_kv)
        ep_last = tl.sum(tl.where(is_last, b_ep, 0.0), 0)
        G_last = tl.sum(tl.where(is_last, b_G, 0.0), 0)
        w_end = tl.where(b_ep == ep_last, tl.exp(G_last - b_G), 0.0)
        d_end = tl.where(ep_last == 0, tl.exp(G_last), 0.0)
        b_s = d_end * b_s + tl.dot(tl.trans(b_k * w_end[:, None]), b_u, input_precision="ieee")
    tl.store(ht + i_bh * K * V + p_kv, b_s, mask=m_kv)


@triton.jit
def chunk_gated_delta_rule_bwd_kernel(
    q,
    k,
    v,
    beta,
    g,
    starts,
    hs,  # [B, NT, H, K, V] float32 from the forward
    do,  # [B, T, H, V]
    dvhat,  # [B, T, H, V]
    dht,  # [B, H, K, V]
    dq,  # [B, T, H, K] float32 (out)
    dk,
    dv,
    dbeta,  # [B, T, H] float32 (out)
    dg,
    dh0,  # [B, H, K, V] float32 (out)
    T,
    NT,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    lower_eq = o_i[:, None] >= o_i[None, :]
    is_last = o_i == BT - 1
    eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)  # gradient of the state leaving the current chunk
    if USE_FINAL_STATE_GRADIENT:
        b_ds = tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        t0 = i_c * BT
        o_t = t0 + o_i
        m_t = o_t < T
        p_tk = (i_b * T + o_t[:, None]) * H * K + i_h * K + o_k[None, :]
        p_tv = (i_b * T + o_t[:, None]) * H * V + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + (i_b * T + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_g = tl.load(g + (i_b * T + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_do = scale * tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_dvh = tl.load(dvhat + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_s0 = tl.load(hs + ((i_b * NT + i_c) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
        b_ep = tl.zeros([BT], dtype=tl.float32)
        if HAS_STARTS:
            b_st = tl.load(starts + i_b * T + o_t, mask=m_t, other=0).to(tl.float32)
            b_ep = tl.sum(tl.where(lower_eq, b_st[None, :], 0.0), 1)
        b_G = tl.sum(tl.where(lower_eq, b_g[None, :], 0.0), 1)
        same = b_ep[:, None] == b_ep[None, :]
        causal = same & lower_eq
        strict = causal & (o_i[:, None] != o_i[None, :])
        gam = tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        kk = tl.dot(b_k, tl.trans(b_k), input_precision="ieee")
        qk = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        akk = tl.where(strict, kk * gam, 0.0)
        aqk = qk * gam
        e0 = tl.where(b_ep == 0, tl.exp(b_G), 0.0)
        b_l = b_beta[:, None] * akk
        b_x = eye
        for i in range(1, BT):
            l_i = tl.sum(tl.where(o_i[:, None] == i, b_l, 0.0), 0)
            x_i = tl.sum(tl.where(o_i[None, :] == i, eye, 0.0), 0) - tl.sum(l_i[:, None] * b_x, 0)
            b_x = tl.where(o_i[:, None] == i, x_i[None, :], b_x)
        b_ks = tl.dot(b_k, b_s0, input_precision="ieee")
        b_r = b_v - e0[:, None] * b_ks  # residual against the carried-in state's prediction
        b_u = tl.dot(b_x, b_beta[:, None] * b_r, input_precision="ieee")
        ep_last = tl.sum(tl.where(is_last, b_ep, 0.0), 0)
        G_last = tl.sum(tl.where(is_last, b_G, 0.0), 0)
        w_end = tl.where(b_ep == ep_last, tl.exp(G_last - b_G), 0.0)
        d_end = tl.where(ep_last == 0, tl.exp(G_last), 0.0)

        # S_end = d_end S0 + K^T diag(w_end) U
        b_du = tl.dot(b_k * w_end[:, None], b_ds, input_precision="ieee")  # [BT, BV]
        b_uds = tl.dot(b_u, tl.trans(b_ds), input_precision="ieee")  # [BT, BK]
        b_dk = w_end[:, None] * b_uds
        b_dw = tl.sum(b_uds * b_k, 1) * w_end
        b_dG = -b_dw
        dG_last = tl.sum(b_dw, 0) + d_end * tl.sum(tl.sum(b_s0 * b_ds, 1), 0)
        # o = scale (e0 Q S0 + Aqk U);  v_hat = e0 K S0 + Akk U
        b_du += tl.dot(tl.trans(aqk), b_do, input_precision="ieee") + tl.dot(tl.trans(akk), b_dvh, input_precision="ieee")
        daqk = tl.where(causal, tl.dot(b_do, tl.trans(b_u), input_precision="ieee"), 0.0)
        dakk = tl.where(strict, tl.dot(b_dvh, tl.trans(b_u), input_precision="ieee"), 0.0)
        # U = X Y with (I + L) X = I, Y = diag(beta) R, L = diag(beta) Akk
        b_dy = tl.dot(tl.trans(b_x), b_du, input_precision="ieee")
        b_dl = tl.where(strict, -tl.dot(b_dy, tl.trans(b_u), input_precision="ieee"), 0.0)
        b_dbeta = tl.sum(b_dl * akk, 1) + tl.sum(b_dy * b_r, 1)
        dakk += b_beta[:, None] * b_dl
        b_dr = b_beta[:, None] * b_dy  # = dV
        # terms through S0 and e0: o (dO), v_hat (dVh) and R = V - e0 K S0 (-dR)
        b_dvs = b_dvh - b_dr
        b_qs = tl.dot(b_q, b_s0, input_precision="ieee")
        de0 = tl.sum(b_do * b_qs, 1) + tl.sum(b_dvs * b_ks, 1)
        b_dq = e0[:, None] * tl.dot(b_do, tl.trans(b_s0), input_precision="ieee")
        b_dk += e0[:, None] * tl.dot(b_dvs, tl.trans(b_s0), input_precision="ieee")
        b_ds0 = d_end * b_ds
        b_ds0 += tl.dot(tl.trans(b_q * e0[:, None]), b_do, input_precision="ieee")
        b_ds0 += tl.dot(tl.trans(b_k * e0[:, None]), b_dvs, input_precision="ieee")
        # Aqk = (Q K^T) * gam, Akk = (K K^T) * gam (strict)
        daqk_g = daqk * gam
        dakk_g = dakk * gam
        b_dq += tl.dot(daqk_g, b_k, input_precision="ieee")
        b_dk += tl.dot(tl.trans(daqk_g), b_q, input_precision="ieee")
        b_dk += tl.dot(dakk_g, b_k, input_precision="ieee") + tl.dot(tl.trans(dakk_g), b_k, input_precision="ieee")
        dgam = (daqk * qk + dakk * kk) * gam
        b_dG += tl.sum(dgam, 1) - tl.sum(dgam, 0) + de0 * e0
        b_dG += tl.where(is_last, dG_last, 0.0)
        b_dg = tl.sum(tl.where(lower_eq, b_dG[:, None], 0.0), 0)  # reverse cumsum: dg_s = sum_{i >= s} dG_i
        tl.store(dq + p_tk, b_dq, mask=m_tk)
        tl.store(dk + p_tk, b_dk, mask=m_tk)
        tl.store(dv + p_tv, b_dr, mask=m_tv)
        tl.store(dbeta + (i_b * T + o_t) * H + i_h, b_dbeta, mask=m_t)
        tl.store(dg + (i_b * T + o_t) * H + i_h, b_dg, mask=m_t)
        b_ds = b_ds0
    tl.store(dh0 + i_bh * K * V + p_kv, b_ds, mask=m_kv)


def _block_sizes(K: int, V: int) -> tuple[int, int]:
    return max(16, next_power_of_2(K)), max(16, next_power_of_2(V))


def chunk_gated_delta_rule_fwd(q, k, v, beta, g, starts, initial_state, scale, chunk_size):
    """Launch the forward: returns ``(o, v_hat, final_state, hs)``; ``hs`` ``[B, NT, H, K, V]`` is for the backward."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _block_sizes(K, V)
    NT = triton.cdiv(T, chunk_size)
    o = torch.empty_like(v)
    vhat = torch.empty_like(v)
    ht = q.new_empty(B, H, K, V, dtype=torch.float32)
    hs = q.new_empty(B, NT, H, K, V, dtype=torch.float32)
    chunk_gated_delta_rule_fwd_kernel[(B * H,)](
        q, k, v, beta, g, starts if starts is not None else q, initial_state if initial_state is not None else ht,
        o, vhat, ht, hs, T, NT, float(scale),
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
        HAS_STARTS=starts is not None, USE_INITIAL_STATE=initial_state is not None, num_warps=4,
    )  # fmt: skip
    return o, vhat, ht, hs


def chunk_gated_delta_rule_bwd(q, k, v, beta, g, starts, hs, do, dvhat, dht, scale, chunk_size):
    """Launch the backward: returns float32 ``(dq, dk, dv, dbeta, dg, dh0)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _block_sizes(K, V)
    NT = hs.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    dbeta, dg = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    dh0 = torch.empty(B, H, K, V, **f32)
    chunk_gated_delta_rule_bwd_kernel[(B * H,)](
        q, k, v, beta, g, starts if starts is not None else q, hs, do, dvhat, dht if dht is not None else dh0,
        dq, dk, dv, dbeta, dg, dh0, T, NT, float(scale),
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
        HAS_STARTS=starts is not None, USE_FINAL_STATE_GRADIENT=dht is not None, num_warps=4,
    )  # fmt: skip
    return dq, dk, dv, dbeta, dg, dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, starts, initial_state, scale, chunk_size):
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        # The kernels never see a non-finite number: a masked 0 inside tl.dot would carry it to the whole chunk.
        (q, k, v, beta, g, initial_state), ctx.masks = contain_delta_rule(q, k, v, beta, g, starts, initial_state)
        q, k, v, beta, g = (t.contiguous() for t in (q, k, v, beta, g))
        starts = None if starts is None else starts.to(torch.int32).contiguous()
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, vhat, ht, hs = chunk_gated_delta_rule_fwd(q, k, v, beta, g, starts, h0, scale, chunk_size)
        ctx.save_for_backward(q, k, v, beta, g, starts, hs)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return poison_delta_rule(o, vhat, ht, ctx.masks)

    @staticmethod
    def backward(ctx, do, dvhat, dht):
        q, k, v, beta, g, starts, hs = ctx.saved_tensors
        do, dvhat, dht = output_grads(do, dvhat, dht, ctx.masks)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dvhat = torch.zeros_like(v) if dvhat is None else dvhat.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dbeta, dg, dh0 = chunk_gated_delta_rule_bwd(
            q, k, v, beta, g, starts, hs, do, dvhat, dht, ctx.scale, ctx.chunk_size
        )
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dg.to(g.dtype), dh0)
        dq, dk, dv, dbeta, dg, dh0 = delta_rule_grads(grads, ctx.masks)
        return dq, dk, dv, dbeta, dg, None, dh0, None, None


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None = None,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton chunked gated delta rule; arguments and returns as ``naive_recurrent_gated_delta_rule``.

    Args:
        q, k: ``[B, T, H, K]``; v ``[B, T, H, V]``; beta, g ``[B, T, H]``; starts ``[B, T]`` bool or None;
        initial_state ``[B, H, K, V]`` or None; scale multiplies the readout.
        chunk_size: 16, 32 or 64.

    Returns:
        ``(o [B, T, H, V], v_hat [B, T, H, V], final_state [B, H, K, V] float32)``; o and v_hat in ``q.dtype``.
    """
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32 or 64; got {chunk_size}")
    if q.shape[-1] > 128 or v.shape[-1] > 128:
        raise ValueError(f"head dims up to 128 are supported; got K={q.shape[-1]}, V={v.shape[-1]}")
    return ChunkGatedDeltaRuleFunction.apply(q, k, v, beta, g, starts, initial_state, float(scale), chunk_size)
