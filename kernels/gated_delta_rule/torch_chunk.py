"""Chunked gated delta rule in plain PyTorch with a hand-written backward: the CPU path of ``gated_delta_rule``.

The forward is ``naive_chunk.chunked_forward``, run without autograd; its intermediates are kept for a backward
that is the Triton kernel's (``chunk.py``; formulas in ``README.md``) written as batched torch ops over all chunks
at once. Only the gradient of the state runs chunk by chunk, in reverse, two products per chunk:

    dS_c = d_end dS_{c+1} + (what chunk c's outputs send to S_c) - w_c^T (k_end_c dS_{c+1})

Autograd through ``naive_chunk.py`` records about 150 small ops per call and replays each backward; this backward
is about 50 batched ops. The intermediates are some 20 tensors per token (chunk-square blocks among them), so an
input longer than twice ``segment_chunks`` chunks is run one segment at a time: the forward keeps only the inputs and
the state entering each segment, and the backward recomputes a segment's intermediates from its entering state,
last segment first, handing the gradient of that state to the segment before (as flash-linear-attention's chunked
kernels recompute rather than store). Tests compare both forms, values and every gradient, with the recurrent
reference."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels.gated_delta_rule.naive_chunk import DEFAULT_CPU_CHUNK_SIZE, chunked_forward, chunks, unchunk
from ham_rl.kernels.nonfinite import contain_delta_rule, delta_rule_grads, output_grads, poison_delta_rule

__all__ = ["torch_chunk_gated_delta_rule", "TorchChunkGatedDeltaRuleFunction", "DEFAULT_SEGMENT_CHUNKS"]

#: Inputs of more than twice this many chunks are run and recomputed in segments of this many (chunks of 32: rows up
#: to 1,024 steps keep every intermediate, as before, since recomputing costs 1.5x the delta rule's time at 1,024
#: steps; at 4,096 steps the intermediates would be about 90 MiB per PPO minibatch, docs/performance.md).
DEFAULT_SEGMENT_CHUNKS = 16


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


def _segments(T: int, chunk_size: int, segment_chunks: int) -> list[tuple[int, int]]:
    """``[t0, t1)`` spans covering ``T`` steps: one, or ``segment_chunks`` whole chunks each (the last may be shorter)
    when ``T`` is over twice that."""
    step = chunk_size * segment_chunks
    if T <= 2 * step:
        return [(0, T)]
    return [(t0, min(t0 + step, T)) for t0 in range(0, T, step)]


class TorchChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Forward and backward of the chunked gated delta rule in torch ops (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, starts, initial_state, scale, chunk_size, segment_chunks):
        ctx.set_materialize_grads(False)  # unused outputs (v_hat in training, the final state) cost nothing
        T, dtypes = q.shape[1], [t.dtype for t in (q, k, v, beta, g)]
        ctx.meta = (T, scale, chunk_size, dtypes, initial_state is not None,
                    initial_state.dtype if initial_state is not None else None)  # fmt: skip
        # Non-finite inputs never enter the chunk algebra (its masks are zeros inside matmuls): see nonfinite.py.
        (q, k, v, beta, g, initial_state), ctx.masks = contain_delta_rule(q, k, v, beta, g, starts, initial_state)
        spans = _segments(T, chunk_size, segment_chunks)
        if len(spans) == 1:  # short enough to keep every intermediate: the backward reads them as they are
            out = chunked_forward(q, k, v, beta, g, starts, initial_state, scale, chunk_size)
            ctx.spans = None
            ctx.save_for_backward(*out[3:])
            o, v_hat, state = unchunk(out.o, T), unchunk(out.v_hat, T), out.state
        else:  # one segment at a time, keeping only the inputs and the state entering each segment
            state, entering, os, vhats = initial_state, [], [], []
            for t0, t1 in spans:
                entering.append(state)
                seg = _span(q, k, v, beta, g, starts, t0, t1)
                out = chunked_forward(*seg, state, scale, chunk_size)
                os.append(unchunk(out.o, t1 - t0))
                vhats.append(unchunk(out.v_hat, t1 - t0))
                state = out.state
                del out  # the segment's intermediates go before the next one is built
            ctx.spans = spans
            ctx.save_for_backward(q, k, v, beta, g, starts, *entering)  # None (no starts, no initial state) kept as None
            o, v_hat = torch.cat(os, 1), torch.cat(vhats, 1)
        return poison_delta_rule(o.to(dtypes[0]), v_hat.to(dtypes[0]), state, ctx.masks)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dvhat, dht):
        T, scale, chunk_size, dtypes, has_h0, h0_dtype = ctx.meta
        do, dvhat, dht = output_grads(do, dvhat, dht, ctx.masks)
        want_dh0 = has_h0 and ctx.needs_input_grad[6]
        if ctx.spans is None:
            grads, dh0 = _chunk_backward(ctx.saved_tensors, T, scale, do, dvhat, dht, want_dh0)
        else:  # recompute each segment from its entering state, last first; its state gradient goes to the one before
            q, k, v, beta, g, starts, *entering = ctx.saved_tensors
            parts, dh0 = [], dht
            for i in reversed(range(len(ctx.spans))):
                t0, t1 = ctx.spans[i]
                seg = _span(q, k, v, beta, g, starts, t0, t1)
                kept = chunked_forward(*seg, entering[i], scale, chunk_size)[3:]
                do_s = None if do is None else do[:, t0:t1]
                dvhat_s = None if dvhat is None else dvhat[:, t0:t1]
                seg_grads, dh0 = _chunk_backward(kept, t1 - t0, scale, do_s, dvhat_s, dh0, i > 0 or want_dh0)
                parts.append(seg_grads)
                del kept
            grads = [torch.cat(ts[::-1], 1) for ts in zip(*parts, strict=True)]
        grads = [t.to(dt) for t, dt in zip(grads, dtypes, strict=True)]
        dh0 = dh0.to(h0_dtype) if want_dh0 and dh0 is not None else None
        dq, dk, dv, dbeta, dg, dh0 = delta_rule_grads((*grads, dh0), ctx.masks)
        return dq, dk, dv, dbeta, dg, None, dh0, None, None, None


def _span(q, k, v, beta, g, starts, t0: int, t1: int) -> tuple:
    """The inputs of steps ``[t0, t1)``."""
    return (q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], beta[:, t0:t1], g[:, t0:t1],
            None if starts is None else starts[:, t0:t1])  # fmt: skip


def _chunk_backward(saved, T, scale, do, dvhat, dht, want_dh0):
    """Gradients ``[dq, dk, dv, dbeta, dg]`` (``[B, T, H, .]``, accumulation dtype) and ``dh0`` of one forward."""
    q_, k_, v_, beta_, gam, gs, kk, qk, akk, aqk, e0, X, w, U, ks, qs, S, k_end, w_end, d_end = saved
    B, H, NT, C, K = k_.shape
    V = v_.shape[-1]
    acc = k_.dtype
    pad = NT * C - T
    e0_ = e0[..., None]
    # What each chunk's outputs send to the state entering it, apart from the path through the next chunk.
    du_s = direct = None
    if do is not None:
        do_ = chunks(do.to(acc), NT, C, pad)
        if scale != 1.0:
            do_ = do_ * scale
        du_s = aqk.transpose(-1, -2) @ do_
        direct = (q_ * e0_).transpose(-1, -2) @ do_
    if dvhat is not None:
        dvh_ = chunks(dvhat.to(acc), NT, C, pad)
        du_s = _add(du_s, akk.transpose(-1, -2) @ dvh_)
        direct = _add(direct, (k_ * e0_).transpose(-1, -2) @ dvh_)
    if du_s is not None:
        direct = direct - w.transpose(-1, -2) @ du_s
    # dS_c = d_end dS_{c+1} + direct_c - w_c^T (k_end_c dS_{c+1}), in reverse; k_end dS is also part of dU.
    ds = k_.new_zeros(B * H, K, V) if dht is None else dht.to(acc).reshape(B * H, K, V)
    k_end_, w_t = k_end.reshape(B * H, NT, C, K), w.transpose(-1, -2).reshape(B * H, NT, K, C)
    d_end_ = d_end.reshape(B * H, NT, 1, 1)
    direct_ = None if direct is None else direct.reshape(B * H, NT, K, V)
    ds_is_zero = dht is None  # then the products with it are zeros: skip them (the last chunk, in training)
    leaving, kds = [None] * NT, [None] * NT
    for c in reversed(range(NT)):
        leaving[c] = ds
        if ds_is_zero:
            kds[c] = k_.new_zeros(B * H, C, V)
            if direct_ is not None:
                ds, ds_is_zero = direct_[:, c], False
            continue
        kds[c] = k_end_[:, c] @ ds
        if c == 0 and not want_dh0:
            break  # what leaves the first chunk backwards is the initial state's gradient, not wanted
        carried = d_end_[:, c] * ds
        if direct_ is not None:
            carried = carried + direct_[:, c]
        ds = torch.baddbmm(carried, w_t[:, c], kds[c], alpha=-1)
    dS = torch.stack(leaving, 1).reshape(B, H, NT, K, V)  # gradient of the state leaving each chunk
    du = _add(du_s, torch.stack(kds, 1).reshape(B, H, NT, C, V))
    # S_end = d_end S0 + K^T diag(w_end) U
    uds = U @ dS.transpose(-1, -2)  # [B, H, NT, C, K]
    dk = w_end[..., None] * uds
    dw = (uds * k_).sum(-1) * w_end
    dG_last = dw.sum(-1) + d_end * (S * dS).sum((-1, -2))  # [B, H, NT]
    # U = X (beta R), R = V - e0 K S0
    dy = X.transpose(-1, -2) @ du
    dyu = dy @ U.transpose(-1, -2)
    r = torch.addcmul(v_, e0_, ks, value=-1)
    dbeta = (dy * r).sum(-1).sub_((dyu * akk).sum(-1))
    dr = beta_[..., None] * dy
    # The gradient reaching v_hat's K S0 term is dvhat - dr; with no dvhat, -dr (signs folded, no negation pass).
    dvs, sign = (dr, -1.0) if dvhat is None else (dvh_ - dr, 1.0)
    de0 = (dvs * ks).sum(-1)
    if sign < 0:
        de0 = de0.neg_()
    St = S.transpose(-1, -2)
    dk.addcmul_(e0_, dvs @ St, value=sign)
    # Akk = (K K^T) * gam * strict, reached from the solve and from v_hat; Aqk = (Q K^T) * gam from o
    dakk = beta_[..., None] * dyu
    dakk = dvh_ @ U.transpose(-1, -2) - dakk if dvhat is not None else dakk.neg_()
    dakk.mul_(gs)
    dk += (dakk + dakk.transpose(-1, -2)) @ k_
    dgam = dakk * kk
    if do is not None:
        de0 += (do_ * qs).sum(-1)
        daqk = (do_ @ U.transpose(-1, -2)).mul_(gam)
        dq = (daqk @ k_).addcmul_(e0_, do_ @ St)
        dk += daqk.transpose(-1, -2) @ q_
        dgam.addcmul_(daqk, qk)
    else:
        dq = torch.zeros_like(q_)
    dG = (dgam.sum(-1) - dgam.sum(-2)).addcmul_(de0, e0).sub_(dw)
    dG[..., -1] += dG_last
    dg = dG.flip(-1).cumsum(-1).flip(-1)  # G is a cumsum of g inside the chunk
    dh0 = ds.reshape(B, H, K, V) if want_dh0 else None
    return [unchunk(t, T) for t in (dq, dk, dr, dbeta, dg)], dh0


def torch_chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None = None,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CPU_CHUNK_SIZE,
    segment_chunks: int = DEFAULT_SEGMENT_CHUNKS,
) -> tuple[Tensor, Tensor, Tensor]:
    """``naive_chunk_gated_delta_rule`` (same arguments and returns) with the hand-written backward.

    Sequences longer than twice ``segment_chunks`` chunks are run a segment of ``segment_chunks`` chunks at a time
    and recomputed in the backward from each segment's entering state, so that what is kept for the backward is the
    inputs, not the intermediates.
    """
    if int(segment_chunks) < 1:
        raise ValueError(f"segment_chunks={segment_chunks!r}: must be a positive number of chunks")
    return TorchChunkGatedDeltaRuleFunction.apply(
        q, k, v, beta, g, starts, initial_state, float(scale), int(chunk_size), int(segment_chunks)
    )
