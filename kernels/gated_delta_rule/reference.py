"""Pure-PyTorch gated delta rule with episode resets: the truth the Triton kernels are tested against.

Layout is batch, time, heads: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta and g ``[B, T, H]``,
state ``[B, H, K, V]``. Per head, per step (``a = exp(g)``, the decay in (0, 1])::

    S      <- 0                      if starts[t]        (the episode begins: forget everything)
    v_hat  = a * (k^T S)             the RNN's prediction of v from k, before writing token t
    S      = a * S + beta * k (v - v_hat)^T
    o      = scale * q^T S
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_recurrent_gated_delta_rule", "gated_delta_rule_step", "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gated_delta_rule_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """One step for a batch: q, k ``[B, H, K]``, v ``[B, H, V]``, beta, g ``[B, H]``, state ``[B, H, K, V]``.

    Returns ``(o [B, H, V], v_hat [B, H, V], new_state [B, H, K, V])``; the caller applies resets to ``state``.
    """
    a = g.exp()[..., None]  # [B, H, 1]
    # Multiply-and-sum, not bmm/baddbmm: for B * H products of [1, K] x [K, V] those run a small-matrix kernel
    # per product, 4-7x slower on CPU than one elementwise pass over the [B, H, K, V] state.
    v_hat = a * (k[..., None] * state).sum(-2)
    new_state = torch.addcmul(a[..., None] * state, (k * beta[..., None])[..., None], (v - v_hat)[..., None, :])
    o = scale * (q[..., None] * new_state).sum(-2)
    return o, v_hat, new_state


def naive_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None = None,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gated delta rule as a loop over time (each iteration works on the whole batch).

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (HAM passes them L2-normalised).
        v: ``[B, T, H, V]`` values.
        beta: ``[B, T, H]`` write strengths in (0, 1).
        g: ``[B, T, H]`` log decays (<= 0).
        starts: ``[B, T]`` bool, True where an episode begins (the state is zeroed before that step).
        initial_state: ``[B, H, K, V]`` state carried in from before the segment (zeros if None).
        scale: multiplies the readout.

    Returns:
        ``(o [B, T, H, V], v_hat [B, T, H, V], final_state [B, H, K, V])``, computed in float32 (float64 for
        float64 inputs) and cast back to ``q.dtype``; the final state stays in the accumulation dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    acc = accumulation_dtype(dtype)
    q, k, v, beta, g = (t.to(acc) for t in (q, k, v, beta, g))
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    starts = None if starts is None else starts.bool()
    outs, preds = [], []
    for t in range(T):
        if starts is not None:
            # Select, not multiply by a keep mask: NaN * 0 is NaN, so a finished episode's NaN would survive the reset.
            state = torch.where(starts[:, t, None, None, None], 0.0, state)
        o, v_hat, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], state, scale)
        outs.append(o)
        preds.append(v_hat)
    return torch.stack(outs, 1).to(dtype), torch.stack(preds, 1).to(dtype), state
