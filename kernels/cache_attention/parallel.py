"""Block-sparse masked softmax attention over the cache in Triton, forward and backward.

``visible [B, T, S]`` (shared by heads) is reduced on the host to a tile map ``[B, NT, NS]``: whether any query
of a T-block sees any entry of an S-block. Each program skips the tiles with nothing visible, so the work
follows the routed (sparse) pattern, not T x S. Inside a tile the exact per-element mask applies. The forward
is FlashAttention-style (running max and sum, one program per (T-block, batch x head)) and saves the
log-sum-exp; the backward recomputes the probabilities: one kernel for dk, dv (per S-block) and one for dq
(per T-block), so no atomics. Rows that see nothing give 0 and zero gradients, never NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ham_rl.kernels.nonfinite import contain_attention, poison_attention
from ham_rl.kernels.triton_utils import next_power_of_2

__all__ = [
    "parallel_cache_attention",
    "parallel_cache_attention_fwd",
    "parallel_cache_attention_bwd",
    "parallel_cache_attention_fwd_kernel",
    "parallel_cache_attention_bwd_dkv_kernel",
    "parallel_cache_attention_bwd_dq_kernel",
    "ParallelCacheAttentionFunction",
]


@triton.jit
def parallel_cache_attention_fwd_kernel(
    q,  # [B, T, H, K]
    keys,  # [B, S, H, K]
    values,  # [B, S, H, V]
    visible,  # [B, T, S] uint8
    tiles,  # [B, NT, NS] int32
    scale,  # [H] float32
    o,  # [B, T, H, V]
    lse,  # [B, H, T] float32
    T,
    S,
    NT,
    NS,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = i_t * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    b_q = tl.load(
        q + ((i_b * T + o_m[:, None]) * H + i_h) * K + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :], other=0.0
    ).to(tl.float32)
    b_scale = tl.load(scale + i_h)
    b_m = tl.full([BM], -1e30, dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    for i_s in range(0, NS):
        if tl.load(tiles + (i_b * NT + i_t) * NS + i_s) != 0:
            o_n = i_s * BN + tl.arange(0, BN)
            m_n = o_n < S
            b_k = tl.load(
                keys + ((i_b * S + o_n[:, None]) * H + i_h) * K + o_k[None, :],
                mask=m_n[:, None] & (o_k < K)[None, :],
                other=0.0,
            ).to(tl.float32)
            b_v = tl.load(
                values + ((i_b * S + o_n[:, None]) * H + i_h) * V + o_v[None, :],
                mask=m_n[:, None] & (o_v < V)[None, :],
                other=0.0,
            ).to(tl.float32)
            vis = tl.load(visible + (i_b * T + o_m[:, None]) * S + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * b_scale
            b_s = tl.where(vis != 0, b_s, float("-inf"))
            m_new = tl.maximum(b_m, tl.max(b_s, 1))
            alpha = tl.exp(b_m - m_new)
            p = tl.exp(b_s - m_new[:, None])
            b_l = b_l * alpha + tl.sum(p, 1)
            b_acc = b_acc * alpha[:, None] + tl.dot(p, b_v, input_precision="ieee")
            b_m = m_new
    b_o = tl.where(b_l[:, None] > 0, b_acc / tl.maximum(b_l, 1e-30)[:, None], 0.0)
    tl.store(
        o + ((i_b * T + o_m[:, None]) * H + i_h) * V + o_v[None, :],
        b_o.to(o.dtype.element_ty),
        mask=m_m[:, None] & (o_v < V)[None, :],
    )
    b_lse = tl.where(b_l > 0, b_m + tl.log(tl.maximum(b_l, 1e-30)), 0.0)
    tl.store(lse + i_bh * T + o_m, b_lse, mask=m_m)


@triton.jit
def parallel_cache_attention_bwd_dkv_kernel(
    q,
    keys,
    values,
    visible,
    tiles,
    scale,
    do,  # [B, T, H, V]
    lse,  # [B, H, T]
    delta,  # [B, H, T] rowsum(dO * O)
    dk,  # [B, S, H, K] float32 (out)
    dv,  # [B, S, H, V] float32 (out)
    T,
    S,
    NT,
    NS,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_s = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_n = i_s * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_n = o_n < S
    m_nk = m_n[:, None] & (o_k < K)[None, :]
    m_nv = m_n[:, None] & (o_v < V)[None, :]
    b_k = tl.load(keys + ((i_b * S + o_n[:, None]) * H + i_h) * K + o_k[None, :], mask=m_nk, other=0.0).to(tl.float32)
    b_v = tl.load(values + ((i_b * S + o_n[:, None]) * H + i_h) * V + o_v[None, :], mask=m_nv, other=0.0).to(tl.float32)
    b_scale = tl.load(scale + i_h)
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)
    for i_t in range(0, NT):
        if tl.load(tiles + (i_b * NT + i_t) * NS + i_s) != 0:
            o_m = i_t * BM + tl.arange(0, BM)
            m_m = o_m < T
            b_q = tl.load(
                q + ((i_b * T + o_m[:, None]) * H + i_h) * K + o_k[None, :],
                mask=m_m[:, None] & (o_k < K)[None, :],
                other=0.0,
            ).to(tl.float32)
            b_do = tl.load(
                do + ((i_b * T + o_m[:, None]) * H + i_h) * V + o_v[None, :],
                mask=m_m[:, None] & (o_v < V)[None, :],
                other=0.0,
            ).to(tl.float32)
            b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=0.0)
            b_delta = tl.load(delta + i_bh * T + o_m, mask=m_m, other=0.0)
            vis = tl.load(visible + (i_b * T + o_m[:, None]) * S + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * b_scale
            p = tl.where(vis != 0, tl.exp(b_s - b_lse[:, None]), 0.0)  # [BM, BN]
            b_dv += tl.dot(tl.trans(p), b_do, input_precision="ieee")
            dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
            ds = p * (dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(ds), b_q, input_precision="ieee") * b_scale
    tl.store(dk + ((i_b * S + o_n[:, None]) * H + i_h) * K + o_k[None, :], b_dk, mask=m_nk)
    tl.store(dv + ((i_b * S + o_n[:, None]) * H + i_h) * V + o_v[None, :], b_dv, mask=m_nv)


@triton.jit
def parallel_cache_attention_bwd_dq_kernel(
    q,
    keys,
    values,
    visible,
    tiles,
    scale,
    do,
    lse,
    delta,
    dq,  # [B, T, H, K] float32 (out)
    T,
    S,
    NT,
    NS,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = i_t * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    m_mk = m_m[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q + ((i_b * T + o_m[:, None]) * H + i_h) * K + o_k[None, :], mask=m_mk, other=0.0).to(tl.float32)
    b_do = tl.load(
        do + ((i_b * T + o_m[:, None]) * H + i_h) * V + o_v[None, :], mask=m_m[:, None] & (o_v < V)[None, :], other=0.0
    ).to(tl.float32)
    b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=0.0)
    b_delta = tl.load(delta + i_bh * T + o_m, mask=m_m, other=0.0)
    b_scale = tl.load(scale + i_h)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)
    for i_s in range(0, NS):
        if tl.load(tiles + (i_b * NT + i_t) * NS + i_s) != 0:
            o_n = i_s * BN + tl.arange(0, BN)
            m_n = o_n < S
            b_k = tl.load(
                keys + ((i_b * S + o_n[:, None]) * H + i_h) * K + o_k[None, :],
                mask=m_n[:, None] & (o_k < K)[None, :],
                other=0.0,
            ).to(tl.float32)
            b_v = tl.load(
                values + ((i_b * S + o_n[:, None]) * H + i_h) * V + o_v[None, :],
                mask=m_n[:, None] & (o_v < V)[None, :],
                other=0.0,
            ).to(tl.float32)
            vis = tl.load(visible + (i_b * T + o_m[:, None]) * S + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * b_scale
            p = tl.where(vis != 0, tl.exp(b_s - b_lse[:, None]), 0.0)
            dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
            ds = p * (dp - b_delta[:, None])
            b_dq += tl.dot(ds, b_k, input_precision="ieee") * b_scale
    tl.store(dq + ((i_b * T + o_m[:, None]) * H + i_h) * K + o_k[None, :], b_dq, mask=m_mk)


def _sizes(q: Tensor, values: Tensor, block_m: int, block_n: int):
    B, T, H, K = q.shape
    S, V = values.shape[1], values.shape[-1]
    return B, T, S, H, K, V, triton.cdiv(T, block_m), triton.cdiv(S, block_n)


def tile_map(visible: Tensor, block_m: int, block_n: int) -> Tensor:
    """``[B, T, S]`` bool -> ``[B, NT, NS]`` int32: 1 where a (T-block, S-block) tile has anything visible."""
    B, T, S = visible.shape
    NT, NS = triton.cdiv(T, block_m), triton.cdiv(S, block_n)
    padded = torch.nn.functional.pad(visible, (0, NS * block_n - S, 0, NT * block_m - T))
    return padded.reshape(B, NT, block_m, NS, block_n).any(4).any(2).to(torch.int32).contiguous()  # [B, NT, NS]


def parallel_cache_attention_fwd(q, keys, values, visible, scale_h, block_m=32, block_n=32):
    """Launch the forward; returns ``(o [B, T, H, V], lse [B, H, T] float32, tiles [B, NT, NS])``."""
    B, T, S, H, K, V, NT, NS = _sizes(q, values, block_m, block_n)
    BK, BV = max(16, next_power_of_2(K)), max(16, next_power_of_2(V))
    tiles = tile_map(visible, block_m, block_n)
    o = q.new_empty(B, T, H, V)
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    parallel_cache_attention_fwd_kernel[(NT, B * H)](
        q, keys, values, visible, tiles, scale_h, o, lse, T, S, NT, NS,
        H=H, K=K, V=V, BM=block_m, BN=block_n, BK=BK, BV=BV, num_warps=4,
    )  # fmt: skip
    return o, lse, tiles


def parallel_cache_attention_bwd(q, keys, values, visible, tiles, scale_h, o, lse, do, block_m=32, block_n=32):
    """Launch the backward; returns float32 ``(dq, dkeys, dvalues)``."""
    B, T, S, H, K, V, NT, NS = _sizes(q, values, block_m, block_n)
    BK, BV = max(16, next_power_of_2(K)), max(16, next_power_of_2(V))
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, T, H] -> [B, H, T]
    dq = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, S, H, K, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, S, H, V, dtype=torch.float32, device=q.device)
    meta = dict(H=H, K=K, V=V, BM=block_m, BN=block_n, BK=BK, BV=BV, num_warps=4)
    parallel_cache_attention_bwd_dkv_kernel[(NS, B * H)](
        q, keys, values, visible, tiles, scale_h, do, lse, delta, dk, dv, T, S, NT, NS, **meta
    )
    parallel_cache_attention_bwd_dq_kernel[(NT, B * H)](
        q, keys, values, visible, tiles, scale_h, do, lse, delta, dq, T, S, NT, NS, **meta
    )
    return dq, dk, dv


class ParallelCacheAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, values, visible, scale_h, block_m, block_n):
        q, keys, values = (t.contiguous() for t in (q, keys, values))
        visible = visible.to(torch.uint8).contiguous()
        o, lse, tiles = parallel_cache_attention_fwd(q, keys, values, visible, scale_h, block_m, block_n)
        ctx.save_for_backward(q, keys, values, visible, tiles, scale_h, o, lse)
        ctx.blocks = (block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, keys, values, visible, tiles, scale_h, o, lse = ctx.saved_tensors
        dq, dk, dv = parallel_cache_attention_bwd(
            q, keys, values, visible, tiles, scale_h, o, lse, do.contiguous(), *ctx.blocks
        )
        return dq.to(q.dtype), dk.to(keys.dtype), dv.to(values.dtype), None, None, None, None


def parallel_cache_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor,
    scale: float | Tensor | None = None,
    block_m: int = 32,
    block_n: int = 32,
) -> Tensor:
    """Triton block-sparse masked attention; arguments and return as ``masked_cache_attention``.

    Args:
        q: ``[B, T, H, K]``; keys ``[B, S, H, K]``; values ``[B, S, H, V]``; visible ``[B, T, S]`` bool.
        scale: a float or a per-head ``[H]`` tensor (no gradient flows into it); ``K ** -0.5`` if None.
        block_m, block_n: query and key tile sizes (powers of two >= 16).

    Returns:
        ``o [B, T, H, V]`` in ``q.dtype``; rows with nothing visible are 0.
    """
    H, K = q.shape[2], q.shape[3]
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"`{name}` must be a power of two >= 16; got {b}")
    scale = K**-0.5 if scale is None else scale
    if isinstance(scale, Tensor):
        scale_h = scale.detach().float().reshape(-1).expand(H).contiguous().to(q.device)
    else:
        scale_h = torch.full((H,), float(scale), dtype=torch.float32, device=q.device)
    # The kernels never see a non-finite number: 0 weights times a NaN value in tl.dot would be NaN (nonfinite.py).
    (q, keys, values), masks = contain_attention(q, keys, values, visible)
    return poison_attention(ParallelCacheAttentionFunction.apply(q, keys, values, visible, scale_h, block_m, block_n), masks)
