"""Pure-PyTorch HAM rollout step for B envs at once: the truth for the fused Triton step kernel.

One call does, per env: reset on a start flag, decay, prediction v_hat, surprise, delta-rule write, RNN
readout, routing decision, write into that env's cache (append, or evict the lowest-score entry when a
capacity is set), attention over that env's cache, and the two gates.

The cache tensors are updated in place (an append writes past the old length, so a state held from before
the step still reads the same entries; an eviction or a reset overwrites them). Keep ``state.clone()`` if you
need an old state intact. The caller reserves at least ``min(length.max() + 1, capacity + 1)`` slots: slot
``length`` doubles as a scratch slot, so envs that store nothing write there and no branch per env is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ham_rl.kernels.cache_attention.reference import masked_softmax
from ham_rl.kernels.gated_delta_rule.reference import accumulation_dtype, gated_delta_rule_step
from ham_rl.kernels.nonfinite import all_finite, zero_rows

__all__ = ["SCORES", "ham_step", "surprise_score", "choose_slot"]


#: how the surprise router scores a token from the RNN's prediction (``surprise_score``)
SCORES = ("cosine", "error", "relative")


def surprise_score(v_hat: Tensor, v: Tensor, kind: str = "cosine") -> Tensor:
    """Router score of the RNN's prediction ``v_hat`` of ``v``, ``[..., H, V] -> [...]``.

    ``cosine``: ``min_h (1 - cos(v_hat_h, v_h))``, scale-free; a zero prediction gives 1 (the spec's score).
    ``error``: ``||v - v_hat|| / sqrt(H V)`` over all heads, the RMS prediction error: it keeps the value's scale,
    which training raises for the steps the agent needs and lowers for those it ignores (docs/ham.md).
    ``relative``: ``||v - v_hat|| / max(||v||, eps)`` over all heads: the error's share of the value, which a value that
    training shrinks keeps (a step never seen in the episode scores about 1, a predicted one about 0).
    """
    acc = accumulation_dtype(v.dtype)
    v_hat, v = v_hat.to(acc), v.to(acc)
    if kind == "error":
        return (v - v_hat).square().mean((-2, -1)).sqrt()
    if kind == "relative":
        return (v - v_hat).square().sum((-2, -1)).sqrt() / v.square().sum((-2, -1)).sqrt().clamp_min(1e-8)
    # F.cosine_similarity's formula (each norm clamped at eps), in 6 ops instead of its 13: this runs every step.
    eps = 1e-8
    cos = (v_hat * v).sum(-1) / (v_hat.norm(dim=-1).clamp_min(eps) * v.norm(dim=-1).clamp_min(eps))
    return (1.0 - cos).amin(-1)


def choose_slot(
    scores: Tensor, times: Tensor, length: Tensor, score: Tensor, routed: Tensor, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Where each env writes its new entry.

    Returns ``(slot [B] long, stored [B] bool, new_length [B] long)``. Below capacity (or unbounded,
    ``capacity == 0``) a routed entry is appended. At capacity it replaces the entry with the lowest score
    (ties: the oldest), unless its own score is lower than all of them. Envs that store nothing get the
    scratch slot ``length``.
    """
    if capacity <= 0:
        return length, routed, length + routed.long()
    slots = scores.shape[1]
    full = length >= capacity
    valid = torch.arange(slots, device=length.device) < length[:, None]
    masked = scores.masked_fill(~valid, float("inf"))
    min_score = masked.amin(1)
    # Among the entries with the lowest score, the one written first (smallest time) goes.
    tie_times = times.masked_fill(~(valid & (masked == min_score[:, None])), torch.iinfo(torch.long).max)
    victim = tie_times.argmin(1)
    stored = routed & (~full | (score >= min_score))
    slot = torch.where(stored & full, victim, length)
    return slot, stored, length + (stored & ~full).long()


def _weighted_values(weights: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """``sum_l weights[b, l, h] values[b, l, h]`` over the valid slots: ``[B, L, H]``, ``[B, L, H, V]`` -> ``[B, H, V]``.

    Slots past an env's length may hold anything, a finished episode's NaN too, and a weight of 0 times NaN is NaN,
    so they are selected out. On CPU that select (where() with a broadcast mask, ~4x a multiply) runs only when the
    plain weighted sum comes out non-finite, which a valid NaN entry also makes it.
    """
    if values.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: the select fuses, no host check
        o = (weights[..., None] * values).sum(1)
        if all_finite(o):
            return o
    return (weights[..., None] * torch.where(valid[..., None, None], values, 0.0)).sum(1)


def ham_step(
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
    score_kind: str = "cosine",
    sink: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One HAM step for a batch of envs.

    Args:
        q, k: ``[B, H, K]`` L2-normalised queries and keys; v ``[B, H, V]``.
        beta, g: ``[B, H]`` write strength and log decay; gate_rnn, gate_attn ``[B, H]`` gate values in (0, 1).
        rnn_state: ``[B, H, K, V]`` delta-rule state before the step (float32).
        keys, values, scores, times: the cache ``[B, L, H, K]``, ``[B, L, H, V]``, ``[B, L]``, ``[B, L]``;
            written in place.
        length: ``[B]`` long entries per env before the step.
        start: ``[B]`` bool, the env begins a new episode at this step (state zeroed, cache emptied first).
        episode_step: ``[B]`` long step of this token within its episode (stored for eviction ties).
        threshold: tau; a token is routed to the cache iff its score >= tau.
        capacity: most entries per env, 0 for unbounded.
        router_score: ``[B]`` score from a learned router (or a constant for window memories); None uses surprise.
        use_rnn, use_attention: switch either path off (gdn: no attention; attention/window: no RNN).
        scale: attention logit scale, a float or a per-head ``[H]`` tensor; ``K ** -0.5`` if None.
        score_kind: how the surprise is scored, one of ``SCORES`` (``surprise_score``).
        sink: ``[B, H]`` logit of the attention's null entry (value 0), or None (``masked_cache_attention``).

    Returns:
        ``(o [B, H, V], new_rnn_state [B, H, K, V], new_length [B], score [B], routed [B] bool)``; ``o`` is the
        gated sum before the output norm.
    """
    B, H, K = q.shape
    acc = accumulation_dtype(q.dtype)
    # Resets select, never multiply: NaN * 0 is NaN, so a finished episode's NaN would survive a multiply.
    length = torch.where(start, 0, length)
    o = q.new_zeros(B, H, v.shape[-1], dtype=acc)
    score = q.new_ones(B, dtype=acc)
    if use_rnn:
        rnn_state = zero_rows(rnn_state, start)
        o_rnn, v_hat, rnn_state = gated_delta_rule_step(*(t.to(acc) for t in (q, k, v, beta, g, rnn_state)))
        score = surprise_score(v_hat, v, score_kind)
        o = o + gate_rnn[..., None].to(acc) * o_rnn
    if router_score is not None:
        score = router_score.to(acc)
    routed = score >= threshold
    if use_attention:
        slot, stored, length = choose_slot(scores, times, length, score, routed, capacity)
        rows = torch.arange(B, device=q.device)
        keys[rows, slot] = torch.where(stored[:, None, None], k.to(keys.dtype), keys[rows, slot])
        values[rows, slot] = torch.where(stored[:, None, None], v.to(values.dtype), values[rows, slot])
        scores[rows, slot] = torch.where(stored, score.to(scores.dtype), scores[rows, slot])
        times[rows, slot] = torch.where(stored, episode_step, times[rows, slot])
        valid = torch.arange(keys.shape[1], device=q.device) < length[:, None]  # [B, L]
        scale = K**-0.5 if scale is None else scale
        if isinstance(scale, Tensor):
            scale = scale.to(acc)  # [H], broadcast over [B, L, H]
        # Multiply-and-sum in the cache's own [B, L, H, .] layout: an einsum would copy the whole cache per step.
        logits = (keys.to(acc) * q.to(acc)[:, None]).sum(-1) * scale  # [B, L, H]
        mask = valid[..., None].expand(logits.shape)  # [B, L, H]
        if sink is not None:
            logits = torch.cat([logits, sink.to(acc)[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(B, 1, H)], 1)
        weights = masked_softmax(logits, mask, dim=1)[:, : keys.shape[1]]
        o_kv = _weighted_values(weights, values.to(acc), valid)
        o = o + gate_attn[..., None].to(acc) * o_kv
    return o, rnn_state, length, score, routed
