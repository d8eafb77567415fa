"""Chunked (WY / UT-transform) gated delta rule in plain PyTorch: the CPU path of ``gated_delta_rule``.

Same arguments, defaults and return tuple as ``naive_recurrent_gated_delta_rule``; autograd runs through plain
torch ops (``torch.linalg.solve_triangular`` included). ``README.md`` beside this file derives it.
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

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.gated_delta_rule.reference import accumulation_dtype

__all__ = ["naive_chunk_gated_delta_rule", "DEFAULT_CPU_CHUNK_SIZE"]

DEFAULT_CPU_CHUNK_SIZE = 32


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
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    acc = accumulation_dtype(dtype)
    C = int(chunk_size)
    NT = (T + C - 1) // C
    pad = NT * C - T
    # -> [B, H, T, D] in the accumulation dtype, zero-padded in time to NT * C (padding: beta = 0, g = 0).
    q_, k_, v_ = (F.pad(t.to(acc), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v))
    beta_, g_ = (F.pad(t.to(acc), (0, 0, 0, pad)).transpose(1, 2) for t in (beta, g))  # [B, H, T']
    if starts is None:
        starts_ = torch.zeros(B, NT * C, dtype=torch.long, device=q.device)
    else:
        starts_ = F.pad(starts.long(), (0, pad))
    # [B, H, NT, C, D] chunks
    q_, k_, v_ = (t.reshape(B, H, NT, C, -1) for t in (q_, k_, v_))
    beta_, g_ = (t.reshape(B, H, NT, C) for t in (beta_, g_))
    ep = starts_.reshape(B, NT, C).cumsum(-1)[:, None]  # [B, 1, NT, C] episode index inside the chunk
    G = g_.cumsum(-1)  # [B, H, NT, C]
    idx = torch.arange(C, device=q.device)
    same = ep[..., :, None] == ep[..., None, :]  # [B, 1, NT, C, C]
    causal = same & (idx[:, None] >= idx[None, :])
    strict = same & (idx[:, None] > idx[None, :])
    diff = G[..., :, None] - G[..., None, :]  # [B, H, NT, C, C]
    gam = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()  # masked before exp: no inf*0
    akk = (k_ @ k_.transpose(-1, -2)) * gam * strict
    aqk = (q_ @ k_.transpose(-1, -2)) * gam
    m0 = (ep == 0).to(acc)  # [B, 1, NT, C]
    e0 = m0 * G.exp()  # [B, H, NT, C] decay from the chunk start, 0 after a reset
    eye = torch.eye(C, dtype=acc, device=q.device)
    lhs = eye + beta_[..., None] * akk  # unit lower triangular
    # Everything that does not depend on S0, for all chunks at once.
    u0 = torch.linalg.solve_triangular(lhs, beta_[..., None] * v_, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(lhs, (beta_ * e0)[..., None] * k_, upper=False, unitriangular=True)
    last_same = same[..., -1, :].to(acc)  # [B, 1, NT, C] token j in the chunk's last episode
    w_end = last_same * (G[..., -1:] - G).exp()  # [B, H, NT, C]
    d_end = (m0[..., -1] * G[..., -1].exp())[..., None, None]  # [B, H, NT, 1, 1]
    k_end = (k_ * w_end[..., None]).transpose(-1, -2)  # [B, H, NT, K, C]
    state = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    # Only the state recursion is sequential; it keeps each chunk's entering state, and the readouts of all chunks
    # follow in a few batched products (fewer small ops, forward and backward, than reading out inside the loop).
    entering, pseudo = [], []
    for c in range(NT):
        entering.append(state)
        u = u0[:, :, c] - w[:, :, c] @ state  # [B, H, C, V]
        pseudo.append(u)
        state = d_end[:, :, c] * state + k_end[:, :, c] @ u
    S = torch.stack(entering, 2)  # [B, H, NT, K, V]
    U = torch.stack(pseudo, 2)  # [B, H, NT, C, V]
    e0 = e0[..., None]
    v_hat = (e0 * (k_ @ S) + akk @ U).reshape(B, H, NT * C, V)[:, :, :T].transpose(1, 2)
    o = (scale * (e0 * (q_ @ S) + aqk @ U)).reshape(B, H, NT * C, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), v_hat.to(dtype), state
