"""Fused HAM rollout step in Triton: one program per env does everything ``reference.ham_step`` does.

Per env b (all heads at once, as ``[H, K, V]`` register tiles, padded to powers of two with masks):
reset on ``start``, decay, prediction ``v_hat``, surprise ``min_h (1 - cos(v_hat_h, v_h))``, delta-rule write,
RNN readout, routing (``score >= threshold``), slot choice (append, or evict the lowest score, ties the oldest,
at ``capacity``), attention over the env's cache with a running (online) softmax, and the two gates. The new
entry is attended from registers and written after the cache has been read, so no program reads what it
writes. An empty cache gives 0. The cache tensors are updated in place; the RNN state goes to a new tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ham_rl.kernels.triton_utils import next_power_of_2

__all__ = ["fused_ham_step", "fused_ham_step_fwd", "fused_ham_step_fwd_kernel"]


@triton.jit
def fused_ham_step_fwd_kernel(
    q,  # [B, H, K]
    k,  # [B, H, K]
    v,  # [B, H, V]
    beta,  # [B, H]
    g,  # [B, H]
    gate_rnn,  # [B, H]
    gate_attn,  # [B, H]
    h0,  # [B, H, K, V] float32
    ht,  # [B, H, K, V] float32 (out)
    keys,  # [B, L, H, K] (in place)
    values,  # [B, L, H, V] (in place)
    scores,  # [B, L] (in place)
    times,  # [B, L] int64 (in place)
    length,  # [B] int64
    start,  # [B] int32
    episode_step,  # [B] int64
    router,  # [B] float32 (read only if HAS_ROUTER)
    attn_scale,  # [H] float32
    o,  # [B, H, V] float32 (out)
    new_length,  # [B] int64 (out)
    score_out,  # [B] float32 (out)
    routed_out,  # [B] int32 (out)
    threshold,
    capacity,
    s_kb,
    s_kl,
    s_kh,
    s_vb,
    s_vl,
    s_vh,
    s_sb,
    s_tb,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BL: tl.constexpr,
    USE_RNN: tl.constexpr,
    USE_ATTENTION: tl.constexpr,
    HAS_ROUTER: tl.constexpr,
    HAS_CAPACITY: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_h = o_h < H
    m_hk = m_h[:, None] & (o_k < K)[None, :]  # [BH, BK]
    m_hv = m_h[:, None] & (o_v < V)[None, :]  # [BH, BV]
    p_hk = o_h[:, None] * K + o_k[None, :]
    p_hv = o_h[:, None] * V + o_v[None, :]

    is_start = tl.load(start + i_b) != 0
    n_old = tl.load(length + i_b)
    n_old = tl.where(is_start, 0, n_old)

    b_q = tl.load(q + i_b * H * K + p_hk, mask=m_hk, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_b * H * K + p_hk, mask=m_hk, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_b * H * V + p_hv, mask=m_hv, other=0.0).to(tl.float32)
    b_o = tl.zeros([BH, BV], dtype=tl.float32)
    b_score = tl.full([], 1.0, tl.float32)
    if USE_RNN:
        m_hkv = m_hk[:, :, None] & (o_v < V)[None, None, :]
        p_hkv = o_h[:, None, None] * K * V + o_k[None, :, None] * V + o_v[None, None, :]
        b_s = tl.load(h0 + i_b * H * K * V + p_hkv, mask=m_hkv, other=0.0).to(tl.float32)  # [BH, BK, BV]
        b_s = tl.where(is_start, 0.0, b_s)
        b_beta = tl.load(beta + i_b * H + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_a = tl.exp(tl.load(g + i_b * H + o_h, mask=m_h, other=0.0).to(tl.float32))
        b_vhat = b_a[:, None] * tl.sum(b_k[:, :, None] * b_s, 1)  # [BH, BV]
        b_s = b_a[:, None, None] * b_s + (b_beta[:, None] * b_k)[:, :, None] * (b_v - b_vhat)[:, None, :]
        tl.store(ht + i_b * H * K * V + p_hkv, b_s, mask=m_hkv)
        b_orn = tl.sum(b_q[:, :, None] * b_s, 1)  # [BH, BV], readout scale 1 as in the reference
        # surprise: 1 - cos, with torch's eps rule: dot / (max(|a|, eps) * max(|b|, eps))
        n_hat = tl.maximum(tl.sqrt(tl.sum(b_vhat * b_vhat, 1)), 1e-8)
        n_v = tl.maximum(tl.sqrt(tl.sum(b_v * b_v, 1)), 1e-8)
        b_e = 1.0 - tl.sum(b_vhat * b_v, 1) / (n_hat * n_v)
        b_e = tl.where(m_h, b_e, float("inf"))
        b_score = tl.min(b_e, 0)
        b_gr = tl.load(gate_rnn + i_b * H + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_o += b_gr[:, None] * b_orn
    if HAS_ROUTER:
        b_score = tl.load(router + i_b).to(tl.float32)
    # Scalar flags are int32 0/1: the interpreter cannot broadcast a scalar bool against a block in `&`.
    f_routed = (b_score >= threshold).to(tl.int32)
    n_new = n_old
    if USE_ATTENTION:
        o_l = tl.arange(0, BL)
        # ---- where the entry goes (choose_slot) ----
        f_full = tl.zeros([], dtype=tl.int32)
        b_min = tl.full([], float("inf"), tl.float32)
        victim = n_old
        if HAS_CAPACITY:
            f_full = (n_old >= capacity).to(tl.int32)
            n_scan = tl.where(f_full * f_routed > 0, n_old, 0)
            for l0 in range(0, n_scan, BL):
                offs = l0 + o_l
                sc = tl.load(scores + i_b * s_sb + offs, mask=offs < n_scan, other=float("inf")).to(tl.float32)
                b_min = tl.minimum(b_min, tl.min(sc, 0))
            t_min = tl.full([], 9223372036854775807, tl.int64)
            for l0 in range(0, n_scan, BL):
                offs = l0 + o_l
                sc = tl.load(scores + i_b * s_sb + offs, mask=offs < n_scan, other=float("inf")).to(tl.float32)
                tm = tl.load(times + i_b * s_tb + offs, mask=offs < n_scan, other=0)
                tm = tl.where((offs < n_scan) & (sc == b_min), tm, 9223372036854775807)
                t_min = tl.minimum(t_min, tl.min(tm, 0))
            for l0 in range(0, n_scan, BL):
                offs = l0 + o_l
                sc = tl.load(scores + i_b * s_sb + offs, mask=offs < n_scan, other=float("inf")).to(tl.float32)
                tm = tl.load(times + i_b * s_tb + offs, mask=offs < n_scan, other=0)
                hit = (offs < n_scan) & (sc == b_min) & (tm == t_min)
                victim = tl.minimum(victim, tl.min(tl.where(hit, offs, 2147483647), 0).to(tl.int64))
        f_stored = f_routed * tl.maximum(1 - f_full, (b_score >= b_min).to(tl.int32))
        f_evict = f_stored * f_full
        slot = tl.where(f_evict > 0, victim, n_old)
        slot_gone = tl.where(f_evict > 0, victim, -1)  # the evicted entry is no longer in the cache
        n_new = n_old + (f_stored * (1 - f_full)).to(tl.int64)

        # ---- attention over the cache after the write, with a running softmax ----
        b_scale = tl.load(attn_scale + o_h, mask=m_h, other=0.0)
        b_kc = b_k.to(keys.dtype.element_ty).to(tl.float32)  # the new entry as the cache stores it
        b_vc = b_v.to(values.dtype.element_ty).to(tl.float32)
        s_new = tl.sum(b_q * b_kc, 1) * b_scale  # [BH]
        b_m = tl.where(f_stored > 0, s_new, -1e30)
        b_l = tl.where(f_stored > 0, 1.0, 0.0) + tl.zeros([BH], dtype=tl.float32)
        b_acc = tl.where(f_stored > 0, b_vc, 0.0)  # [BH, BV]
        for l0 in range(0, n_old, BL):
            offs = l0 + o_l
            valid = (offs < n_old) & (offs != slot_gone)
            m_lhk = valid[:, None, None] & m_hk[None, :, :]
            m_lhv = valid[:, None, None] & m_hv[None, :, :]
            b_kt = tl.load(
                keys + i_b * s_kb + offs[:, None, None] * s_kl + o_h[None, :, None] * s_kh + o_k[None, None, :],
                mask=m_lhk,
                other=0.0,
            ).to(tl.float32)  # [BL, BH, BK]
            b_vt = tl.load(
                values + i_b * s_vb + offs[:, None, None] * s_vl + o_h[None, :, None] * s_vh + o_v[None, None, :],
                mask=m_lhv,
                other=0.0,
            ).to(tl.float32)  # [BL, BH, BV]
            b_sc = tl.sum(b_kt * b_q[None, :, :], 2) * b_scale[None, :]  # [BL, BH]
            b_sc = tl.where(valid[:, None], b_sc, float("-inf"))
            m_new = tl.maximum(b_m, tl.max(b_sc, 0))
            alpha = tl.exp(b_m - m_new)
            p = tl.exp(b_sc - m_new[None, :])
            b_l = b_l * alpha + tl.sum(p, 0)
            b_acc = b_acc * alpha[:, None] + tl.sum(p[:, :, None] * b_vt, 0)
            b_m = m_new
        # An empty cache gives 0; a NaN entry of the env's own episode (b_l NaN, and NaN > 0 is False) gives NaN, as
        # in the reference: the NaN is not hidden inside its episode.
        b_okv = tl.where((b_l[:, None] > 0) | (b_l[:, None] != b_l[:, None]), b_acc / tl.maximum(b_l, 1e-30)[:, None], 0.0)
        b_ga = tl.load(gate_attn + i_b * H + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_o += b_ga[:, None] * b_okv

        # ---- write the entry (after every read of this env's cache) ----
        tl.store(
            keys + i_b * s_kb + slot * s_kl + o_h[:, None] * s_kh + o_k[None, :],
            b_k.to(keys.dtype.element_ty),
            mask=tl.where(f_stored > 0, m_hk, False),
        )
        tl.store(
            values + i_b * s_vb + slot * s_vl + o_h[:, None] * s_vh + o_v[None, :],
            b_v.to(values.dtype.element_ty),
            mask=tl.where(f_stored > 0, m_hv, False),
        )
        tl.store(scores + i_b * s_sb + slot, b_score.to(scores.dtype.element_ty), mask=f_stored > 0)
        tl.store(times + i_b * s_tb + slot, tl.load(episode_step + i_b), mask=f_stored > 0)
    tl.store(o + i_b * H * V + p_hv, b_o, mask=m_hv)
    tl.store(new_length + i_b, n_new)
    tl.store(score_out + i_b, b_score)
    tl.store(routed_out + i_b, f_routed)


def fused_ham_step_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    gate_rnn: Tensor,
    gate_attn: Tensor,
    rnn_state: Tensor,
    keys: Tensor,
    values: Tensor,
    scores: Tensor,
    times: Tensor,
    length: Tensor,
    start: Tensor,
    episode_step: Tensor,
    threshold: float,
    capacity: int,
    router_score: Tensor | None,
    use_rnn: bool,
    use_attention: bool,
    scale: Tensor,
    block_l: int = 16,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch one program per env. ``scale`` is a ``[H]`` float32 tensor; shapes as in ``reference.ham_step``."""
    B, H, K = q.shape
    V = v.shape[-1]
    q, k, v, beta, g, gate_rnn, gate_attn = (t.contiguous() for t in (q, k, v, beta, g, gate_rnn, gate_attn))
    h0 = rnn_state.float().contiguous()
    ht = torch.empty_like(h0) if use_rnn else h0
    o = q.new_empty(B, H, V, dtype=torch.float32)
    new_length = torch.empty_like(length)
    score = q.new_empty(B, dtype=torch.float32)
    routed = q.new_empty(B, dtype=torch.int32)
    router = score if router_score is None else router_score.float().contiguous()
    for name, t, d in (("keys", keys, K), ("values", values, V)):
        if t.stride(-1) != 1:
            raise ValueError(f"`{name}` must have a contiguous last dim (head dim {d}); got strides {t.stride()}")
    fused_ham_step_fwd_kernel[(B,)](
        q, k, v, beta, g, gate_rnn, gate_attn, h0, ht,
        keys, values, scores, times,
        length.contiguous(), start.to(torch.int32).contiguous(), episode_step.long().contiguous(), router,
        scale.float().contiguous(),
        o, new_length, score, routed,
        float(threshold), int(capacity),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        scores.stride(0), times.stride(0),
        H=H, K=K, V=V,
        BH=next_power_of_2(H), BK=next_power_of_2(K), BV=next_power_of_2(V), BL=block_l,
        USE_RNN=bool(use_rnn), USE_ATTENTION=bool(use_attention),
        HAS_ROUTER=router_score is not None, HAS_CAPACITY=int(capacity) > 0,
        num_warps=4,
    )  # fmt: skip
    if not use_rnn:
        ht = rnn_state
    return o, ht, new_length, score, routed.bool()


def fused_ham_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    gate_rnn: Tensor,
    gate_attn: Tensor,
    rnn_state: Tensor,
    keys: Tensor,
    values: Tensor,
    scores: Tensor,
    times: Tensor,
    length: Tensor,
    start: Tensor,
    episode_step: Tensor,
    threshold: float,
    capacity: int = 0,
    router_score: Tensor | None = None,
    use_rnn: bool = True,
    use_attention: bool = True,
    scale: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton HAM step; same arguments, in-place cache update and return tuple as ``reference.ham_step``.

    No autograd: rollouts run it under ``torch.no_grad``.
    """
    H, K = q.shape[1], q.shape[2]
    scale = K**-0.5 if scale is None else scale
    if isinstance(scale, Tensor):
        scale_h = scale.detach().float().reshape(-1).expand(H).to(q.device)
    else:
        scale_h = torch.full((H,), float(scale), device=q.device, dtype=torch.float32)
    with torch.no_grad():
        return fused_ham_step_fwd(
            q, k, v, beta, g, gate_rnn, gate_attn, rnn_state, keys, values, scores, times, length, start,
            episode_step, threshold, capacity, router_score, use_rnn, use_attention, scale_h,
        )  # fmt: skip
