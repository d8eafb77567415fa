"""Non-finite inputs stay inside their episode: the containment shared by the chunked and the attention kernels.

A reset or a mask that multiplies lets NaN through (``NaN * 0 = NaN``), and so does every matmul whose masked
coefficient is a 0: the chunked delta rule mixes all tokens of a chunk through ``Q K^T`` and a triangular solve,
and attention multiplies a softmax weight of 0 with every value. One NaN token would then reach the tokens before
it and past the next reset. So these kernels never compute on a non-finite number: the bad inputs are replaced
by zeros first ("sanitised"), and the outputs that depend on them in exact arithmetic are set to NaN afterwards
("poisoned"), which is what the step-by-step reference computes. Tokens outside the poisoned set come out
exactly as if the bad input had never been there, and their gradients too (a sanitised input gets gradient 0).

On CPU tensors a cheap check (one sum per tensor, a NaN or inf makes the sum non-finite) skips all of this when
everything is finite; on GPU the masks are always computed, so no call waits on the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "zero_rows",
    "DeltaRuleContainment",
    "contain_delta_rule",
    "poison_delta_rule",
    "output_grads",
    "delta_rule_grads",
    "AttentionContainment",
    "contain_attention",
    "poison_attention",
]


def all_finite(*tensors: Tensor | None) -> bool:
    """True if no tensor holds a NaN or an inf (a sum that overflows also says False: only the slow path runs)."""
    with torch.no_grad():  # one sum and .item() each: ~2 us on a PPO-sized tensor, where isfinite().all() takes ~17
        return all(math.isfinite(t.sum().item()) for t in tensors if t is not None)


def zero_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t`` with the rows (first dim) where ``rows [B]`` is True set to 0 by selection, never by a multiply."""
    if t.numel() > 8192 and t.device.type == "cpu" and not torch.compiler.is_compiling():
        # On CPU, where() with a broadcast mask costs ~4x a multiply per element; index_fill touches only the reset rows.
        return t.index_fill(0, rows.nonzero().squeeze(1), 0.0) if rows.any() else t
    # On a GPU, or for a small tensor, where() costs about a multiply and asks nothing of the host.
    return torch.where(rows.view((-1,) + (1,) * (t.dim() - 1)), 0.0, t)


def _finite_rows(t: Tensor, dims: int) -> Tensor:
    """True where the last ``dims`` dims of ``t`` hold only finite numbers."""
    ok = torch.isfinite(t)
    return ok.flatten(-dims).all(-1) if dims else ok


def _fill(bad: Tensor, t: Tensor, value: float) -> Tensor:
    """``t`` with the rows where ``bad`` (over the leading dims of ``t``) set to ``value``; gradients pass elsewhere."""
    return torch.where(bad.reshape(*bad.shape, *([1] * (t.dim() - bad.dim()))), value, t)


def _zero(bad: Tensor, t: Tensor) -> Tensor:
    return _fill(bad, t, 0.0)


class DeltaRuleContainment(NamedTuple):
    """Where the inputs of one gated delta rule call were bad, and which outputs that makes NaN."""

    q_bad: Tensor  # [B, T, H] q not finite: only that token's readout depends on it
    w_bad: Tensor  # [B, T, H] k, v, beta or g not finite: the write is dropped, its episode is poisoned from it on
    h0_bad: Tensor | None  # [B, H] the carried-in state not finite (None without one)
    poisoned: Tensor  # [B, T, H] v_hat is NaN (the state a token reads is poisoned)
    o_poisoned: Tensor  # [B, T, H] o is NaN
    final: Tensor  # [B, H] the final state is NaN


def contain_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, starts: Tensor | None, h0: Tensor | None
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None], DeltaRuleContainment | None]:
    """``((q, k, v, beta, g, h0) sanitised, containment)``; containment is None when every input was finite.

    A token with a non-finite k, v, beta or g becomes a no-op token (k = v = beta = g = 0); a non-finite q reads 0;
    a non-finite carried-in state is zeroed. In the recurrent form such a token makes the state NaN until the next
    reset, so the outputs of its episode from it on are poisoned; a bad carried-in state poisons the segment's first
    episode. (A log decay of -inf counts as bad: the chunked forms cannot take it, see ``naive_chunk.py``.)
    """
    if q.device.type == "cpu" and all_finite(q, k, v, beta, g, h0):
        return (q, k, v, beta, g, h0), None
    with torch.no_grad():
        B, T, H = beta.shape
        q_bad = ~_finite_rows(q, 1)
        w_bad = ~(_finite_rows(k, 1) & _finite_rows(v, 1) & torch.isfinite(beta) & torch.isfinite(g))
        t_idx = torch.arange(T, device=q.device)
        # A token is poisoned when the last bad token at or before it comes at or after the last episode start.
        if starts is None:
            last_start = torch.full((B, T), -1, dtype=torch.long, device=q.device)
        else:
            last_start = torch.where(starts.bool(), t_idx, -1).cummax(1).values  # [B, T]
        last_bad = torch.where(w_bad, t_idx[:, None], -1).cummax(1).values  # [B, T, H]
        poisoned = (last_bad >= 0) & (last_bad >= last_start[..., None])
        h0_bad = None
        if h0 is not None:
            h0_bad = ~_finite_rows(h0, 2)
            poisoned |= h0_bad[:, None, :] & (last_start < 0)[..., None]
        if T:
            final = poisoned[:, -1]
        else:
            final = h0_bad if h0_bad is not None else torch.zeros(B, H, dtype=torch.bool, device=q.device)
        masks = DeltaRuleContainment(q_bad, w_bad, h0_bad, poisoned, poisoned | q_bad, final)
    q = _zero(q_bad, q)
    k, v, beta, g = (_zero(w_bad, t) for t in (k, v, beta, g))
    h0 = None if h0 is None else _zero(h0_bad, h0)
    return (q, k, v, beta, g, h0), masks


def poison_delta_rule(
    o: Tensor, v_hat: Tensor, state: Tensor, masks: DeltaRuleContainment | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Set the outputs that depend on a bad input to NaN (``masks`` from ``contain_delta_rule``; None: unchanged)."""
    if masks is None:
        return o, v_hat, state
    nan = float("nan")
    return _fill(masks.o_poisoned, o, nan), _fill(masks.poisoned, v_hat, nan), _fill(masks.final, state, nan)


def delta_rule_grads(grads: tuple[Tensor | None, ...], masks: DeltaRuleContainment | None) -> tuple[Tensor | None, ...]:
    """``(dq, dk, dv, dbeta, dg, dh0)`` of the sanitised inputs -> those of the inputs (0 where an input was replaced)."""
    if masks is None:
        return grads
    dq, dk, dv, dbeta, dg, dh0 = grads
    out = [None if dq is None else _zero(masks.q_bad, dq)]
    out += [None if d is None else _zero(masks.w_bad, d) for d in (dk, dv, dbeta, dg)]
    out.append(None if dh0 is None or masks.h0_bad is None else _zero(masks.h0_bad, dh0))
    return tuple(out)


def output_grads(
    do: Tensor | None, dvhat: Tensor | None, dht: Tensor | None, masks: DeltaRuleContainment | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients reaching the unpoisoned outputs: 0 where ``poison_delta_rule`` wrote NaN (it selects a constant)."""
    if masks is None:
        return do, dvhat, dht
    do = None if do is None else _zero(masks.o_poisoned, do)
    dvhat = None if dvhat is None else _zero(masks.poisoned, dvhat)
    dht = None if dht is None else _zero(masks.final, dht)
    return do, dvhat, dht


class AttentionContainment(NamedTuple):
    """Which attention outputs read a bad query or see a bad cache entry."""

    poisoned: Tensor  # [B, T, H]


def contain_attention(
    q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, force: bool = False
) -> tuple[tuple[Tensor, Tensor, Tensor], AttentionContainment | None]:
    """``((q, keys, values) sanitised, containment)``; containment is None when everything was finite.

    An entry whose key or value is not finite is zeroed, so a 0 softmax weight on it stays 0; every query that sees
    it (``visible``), and every non-finite query that sees anything, is poisoned. ``force`` skips the cheap check.
    """
    if not force and q.device.type == "cpu" and all_finite(q, keys, values):
        return (q, keys, values), None
    with torch.no_grad():
        q_bad = ~_finite_rows(q, 1)  # [B, T, H]
        entry_bad = ~(_finite_rows(keys, 1) & _finite_rows(values, 1))  # [B, S, H]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        seen_bad = torch.bmm(visible.to(acc), entry_bad.to(acc)) > 0  # [B, T, H]: some visible entry is bad
        masks = AttentionContainment((q_bad & visible.any(-1)[..., None]) | seen_bad)
    return (_zero(q_bad, q), _zero(entry_bad, keys), _zero(entry_bad, values)), masks


def poison_attention(o: Tensor, masks: AttentionContainment | None) -> Tensor:
    """``o [B, T, H, V]`` with the poisoned rows set to NaN (None: unchanged)."""
    return o if masks is None else _fill(masks.poisoned, o, float("nan"))
