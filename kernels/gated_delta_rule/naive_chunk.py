"""Chunked (WY / UT-transform) gated delta rule in plain PyTorch, differentiated by autograd.

Same arguments, defaults and return tuple as ``naive_recurrent_gated_delta_rule``; autograd runs through plain
torch ops (``torch.linalg.solve_triangular`` included). ``README.md`` beside this file derives it. The forward,
``chunked_forward``, is shared with ``torch_chunk.py`` (the CPU path), which runs it without autograd and keeps
its intermediates for a hand-written backward. The masks below are zeros inside matmuls, where 0 * NaN is NaN, so
non-finite inputs are sanitised first and their episode's outputs set to NaN afterwards (``ham_rl.kernels.nonfinite``).
Per chunk of C tokens with entering state S0 (``[K, V]`` per head), chunk-local cumulative log decay G, and
``same[i, j]`` true when tokens i and j lie in the same episode (resets come from a cumsum of ``starts``, never
from ``-inf`` log decays)::

    m0     = no episode starts in the chunk up to and including i   (S0 still visible to token i)
    Gam    = exp(G_i - G_j) where same[i, j] and j <= i, else 0      [C, C]
    Akk    = (K K^T) * Gam, strictly lower                            [C, C]
    U      = (I + diag(beta) Akk)^-1 diag(beta) (V - diag(m0 e^G) K S0)     pseudo values beta (v - v_hat)
    v_hat  = diag(m0 e^G) K S0 + Akk U
    o      = scale (diag(m0 e^G) Q S0 + ((Q K^T) * Gam) U)
    S_end  = m0_last e^{G_last} S0 + K^T diag(same[last, j] e^{G_last - G_j}) U
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ham_rl.kernels.gated_delta_rule.reference import accumulation_dtype
from ham_rl.kernels.nonfinite import contain_delta_rule, poison_delta_rule

__all__ = ["naive_chunk_gated_delta_rule", "chunked_forward", "ChunkedForward", "DEFAULT_CPU_CHUNK_SIZE"]

DEFAULT_CPU_CHUNK_SIZE = 32


def chunks(t: Tensor, NT: int, C: int, pad: int) -> Tensor:
    """``[B, T, H, D]`` -> ``[B, H, NT, C, D]`` (or ``[B, T, H]`` -> ``[B, H, NT, C]``), zero-padded in time, contiguous.

    Contiguous because the permuted view cannot fold ``B, H, NT`` into one batch dim: every batched matmul on it
    would copy it again (about 15% of the op's time when it did)."""
    if t.dim() == 4:
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        return t.transpose(1, 2).contiguous().view(t.shape[0], t.shape[2], NT, C, t.shape[3])
    t = F.pad(t, (0, 0, 0, pad)) if pad else t
    return t.transpose(1, 2).contiguous().view(t.shape[0], t.shape[2], NT, C)


def unchunk(t: Tensor, T: int) -> Tensor:
    """``[B, H, NT, C, D]`` -> ``[B, T, H, D]`` (or ``[B, H, NT, C]`` -> ``[B, T, H]``), padding dropped."""
    B, H, NT, C = t.shape[:4]
    t = t.reshape(B, H, NT * C, *t.shape[4:])[:, :, :T]
    return t.transpose(1, 2)


class ChunkedForward(NamedTuple):
    """The outputs (chunked, in the accumulation dtype) and what the hand-written backward reads."""

    o: Tensor  # [B, H, NT, C, V]
    v_hat: Tensor  # [B, H, NT, C, V]
    state: Tensor  # [B, H, K, V] final state
    q: Tensor  # [B, H, NT, C, K], and k, v, beta [B, H, NT, C] likewise
    k: Tensor
    v: Tensor
    beta: Tensor
    gam: Tensor  # [B, H, NT, C, C] exp(G_i - G_j) on the causal same-episode part, else 0
    gs: Tensor  # gam on the strictly lower part
    kk: Tensor  # K K^T
    qk: Tensor  # Q K^T
    akk: Tensor
    aqk: Tensor
    e0: Tensor  # [B, H, NT, C] m0 e^G
    X: Tensor  # (I + diag(beta) Akk)^-1
    w: Tensor  # X diag(beta e0) K
    U: Tensor  # pseudo values of every chunk
    ks: Tensor  # K S0
    qs: Tensor  # Q S0
    S: Tensor  # [B, H, NT, K, V] the state entering each chunk
    k_end: Tensor  # diag(w_end) K
    w_end: Tensor  # [B, H, NT, C]
    d_end: Tensor  # [B, H, NT]


def chunked_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None,
    initial_state: Tensor | None,
    scale: float,
    chunk_size: int,
) -> ChunkedForward:
    """The chunked forward (arguments as ``naive_chunk_gated_delta_rule``), outputs and intermediates chunked."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    C = int(chunk_size)
    NT = (T + C - 1) // C
    pad = NT * C - T
    # [B, H, NT, C, D] chunks in the accumulation dtype, zero-padded in time to NT * C (padding: beta = 0, g = 0).
    q_, k_, v_ = (chunks(t.to(acc), NT, C, pad) for t in (q, k, v))
    beta_, g_ = (chunks(t.to(acc), NT, C, pad) for t in (beta, g))  # [B, H, NT, C]
    if starts is None:
        ep = torch.zeros(B, 1, NT, C, dtype=torch.long, device=q.device)
    else:  # [B, 1, NT, C] episode index inside the chunk
        ep = F.pad(starts.long(), (0, pad)).reshape(B, NT, C).cumsum(-1)[:, None]
    G = g_.cumsum(-1)  # [B, H, NT, C]
    idx = torch.arange(C, device=q.device)
    same = ep[..., :, None] == ep[..., None, :]  # [B, 1, NT, C, C]
    causal = same & (idx[:, None] >= idx[None, :])
    # masked before exp, so no inf * 0
    gam = torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")).exp()
    gs = gam * (idx[:, None] > idx[None, :])  # the strictly lower part, for Akk
    kk = k_ @ k_.transpose(-1, -2)
    qk = q_ @ k_.transpose(-1, -2)
    akk, aqk = kk * gs, qk * gam
    e0 = torch.where(ep == 0, G.exp(), 0.0)  # [B, H, NT, C]: decay from the chunk start, 0 after a reset
    # Everything that does not depend on S0, for all chunks at once.
    eye = torch.eye(C, dtype=acc, device=q.device)
    X = torch.linalg.solve_triangular(torch.addcmul(eye, beta_[..., None], akk), eye, upper=False, unitriangular=True)
    u0 = X @ (beta_[..., None] * v_)
    w = X @ ((beta_ * e0)[..., None] * k_)
    w_end = torch.where(same[..., -1, :], (G[..., -1:] - G).exp(), 0.0)  # [B, H, NT, C]: token j in the last episode
    d_end = torch.where(ep[..., -1] == 0, G[..., -1].exp(), 0.0)  # [B, H, NT]
    k_end = k_ * w_end[..., None]
    # Only the state recursion is sequential: U_c = U0_c - w_c S_c, S_{c+1} = d_end S_c + k_end^T U_c. It keeps
    # each chunk's entering state, and the readouts of all chunks follow in a few batched products.
    k_end_t = k_end.transpose(-1, -2).reshape(B * H, NT, K, C)
    u0_, w_ = u0.reshape(B * H, NT, C, V), w.reshape(B * H, NT, C, K)
    state = q.new_zeros(B * H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc).reshape(B * H, K, V)
    d_end_ = d_end.reshape(B * H, NT, 1, 1)
    entering, pseudo = [], []
    for c in range(NT):
        entering.append(state)
        u = torch.baddbmm(u0_[:, c], w_[:, c], state, alpha=-1)
        pseudo.append(u)
        state = torch.baddbmm(d_end_[:, c] * state, k_end_t[:, c], u)
    S = torch.stack(entering, 1).reshape(B, H, NT, K, V)
    U = torch.stack(pseudo, 1).reshape(B, H, NT, C, V)
    ks, qs = k_ @ S, q_ @ S
    v_hat = (akk @ U).addcmul_(e0[..., None], ks)
    o = (aqk @ U).addcmul_(e0[..., None], qs)
    if scale != 1.0:
        o = o * scale
    return ChunkedForward(
        o, v_hat, state.reshape(B, H, K, V), q_, k_, v_, beta_, gam, gs, kk, qk, akk, aqk, e0, X, w, U, ks, qs, S,
        k_end, w_end, d_end,
    )  # fmt: skip


def naive_chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None = None,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CPU_CHUNK_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gated delta rule, chunk-parallel inside chunks of ``chunk_size`` tokens, sequential across chunks.

    Args:
        q, k: ``[B, T, H, K]``; v ``[B, T, H, V]``; beta, g ``[B, T, H]`` (g = log decay <= 0).
        starts: ``[B, T]`` bool, True where an episode begins (state zeroed before that step); may sit anywhere.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        scale: multiplies the readout.
        chunk_size: tokens per chunk; T need not be a multiple of it.

    Returns:
        ``(o [B, T, H, V], v_hat [B, T, H, V], final_state [B, H, K, V])`` as the naive recurrent form.
    """
    dtype, T = q.dtype, q.shape[1]
    (q, k, v, beta, g, initial_state), masks = contain_delta_rule(q, k, v, beta, g, starts, initial_state)
    out = chunked_forward(q, k, v, beta, g, starts, initial_state, scale, chunk_size)
    return poison_delta_rule(unchunk(out.o, T).to(dtype), unchunk(out.v_hat, T).to(dtype), out.state, masks)
