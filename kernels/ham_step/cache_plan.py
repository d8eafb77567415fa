"""Which cache entries each token of a segment sees, and what the cache holds at the end (sequence form).

The sequence-form replay of the step form's cache-slot rule (``reference.choose_slot``), beside it in the kernels
layer: pure tensor work on the carried cache's per-slot ``scores``/``times`` and ``length``, no state objects.

The candidates of env b are its carried-in cache slots ``[0, L0)`` followed by the segment's T tokens
(candidate ``L0 + t`` is token t). Routing decisions carry no gradient, so the plan is computed once, without
autograd, and the attention then reads all candidates under the ``visible`` mask. Without a capacity the plan
has a closed form; with one, the append/evict rule of the step form (``ham_rl.kernels.ham_step.choose_slot``) is
replayed over time on integer slot maps, so both forms keep identical slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ham_rl.kernels import native
from ham_rl.kernels.ham_step.reference import choose_slot

__all__ = ["CachePlan", "attention_plan", "plan_cache", "seen_candidates"]


@dataclass
class CachePlan:
    """What routing decided for one segment.

    :param visible: ``[B, T, C]`` bool, column c is in env b's cache after step t
    :param final_source: ``[B, Lf]`` long, the candidate each final cache slot holds (valid below final_length)
    :param final_length: ``[B]`` long, entries in each env's cache at the end of the segment
    :param columns: ``[B, C]`` long, the candidate of each column of ``visible``; None when column s is candidate s
        (``C = L0 + T``). Without a capacity only routed tokens can be visible, so the plan keeps columns for those
        alone, and its masks grow with T times the cache, not with T squared.
    """

    visible: Tensor
    final_source: Tensor
    final_length: Tensor
    columns: Tensor | None = None

    def candidates(self, index: Tensor) -> Tensor:
        """Candidate numbers of ``visible``'s columns ``index [B, n]`` (what keys and values are gathered by)."""
        return index if self.columns is None else self.columns.gather(1, index)


@torch.no_grad()
def plan_cache(
    scores: Tensor,
    times: Tensor,
    length: Tensor,
    starts: Tensor,
    steps: Tensor,
    score: Tensor,
    routed: Tensor,
    capacity: int,
    fifo: bool = False,
) -> CachePlan:
    """Replay routing for a segment; capacity 0 = unbounded.

    ``scores``, ``times`` ``[B, L0]`` and ``length`` ``[B]`` describe the carried-in cache (slots past an env's length
    are ignored); ``starts``, ``steps``, ``score``, ``routed`` are ``[B, T]``.

    ``fifo=True`` promises that every token is routed with the same score (window memories), so a full cache always
    evicts its oldest entry and the plan has a closed form.
    """
    if capacity > 0 and fifo:
        return _plan_fifo(times, length, starts, steps, capacity)
    if capacity > 0:
        if _native_plan_fits(scores, score):
            visible, final_source, final_length = native.load_native().plan_capacity(
                scores.contiguous(), times.long().contiguous(), length.long().contiguous(), starts.bool().contiguous(),
                steps.long().contiguous(), score.contiguous(), routed.bool().contiguous(), capacity,
            )  # fmt: skip
            return CachePlan(visible=visible, final_source=final_source, final_length=final_length)
        return _plan_with_capacity(scores, times, length, starts, steps, score, routed, capacity)
    B, T = starts.shape
    L0 = times.shape[1]
    # Only routed tokens can be seen: columns for the carried slots, then each env's routed tokens in time order
    # (padded to the env with most; the padding is never visible), the candidates' order of the full mask.
    tokens, n_routed = _chosen_first(routed)  # [B, R]
    t_idx = torch.arange(T, device=starts.device)
    episode = starts.long().cumsum(1)  # [B, T]; 0 = the episode carried in from before the segment
    see_carried = _see_carried(length, L0, episode)
    real = torch.arange(tokens.shape[1], device=starts.device) < n_routed[:, None]  # [B, R]
    see_tokens = (
        (tokens[:, None, :] <= t_idx[None, :, None])  # at or before the query
        & (episode.gather(1, tokens)[:, None, :] == episode[:, :, None])  # in its episode
        & real[:, None, :]
    )  # [B, T, R]
    visible = torch.cat([see_carried, see_tokens], 2)
    columns = torch.cat([torch.arange(L0, device=starts.device).expand(B, L0), L0 + tokens], 1)
    # The final cache is what the last token sees, kept in candidate order (carried slots, then time order).
    order, length = _chosen_first(visible[:, -1])
    return CachePlan(visible=visible, final_source=columns.gather(1, order), final_length=length, columns=columns)


def _native_plan_fits(scores: Tensor, score: Tensor) -> bool:
    """Whether the capacity replay runs as one native call (``cpu_plan.cpp``): float32 scores on a CPU."""
    return scores.dtype == torch.float32 and score.dtype == torch.float32 and native.use_native(score)


def _see_carried(length: Tensor, slots: int, episode: Tensor) -> Tensor:
    """``[B, T, L0]``: the carried-in slots below each env's length, seen by the tokens of the carried-in episode."""
    valid = torch.arange(slots, device=episode.device) < length[:, None]  # [B, L0]
    return (episode == 0)[:, :, None] & valid[:, None, :]


def _episode_visibility(length: Tensor, slots: int, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Which candidates lie in each token's episode, at or before it: ``([B, T, L0] carried, [B, T, T] segment)``."""
    T = starts.shape[1]
    episode = starts.long().cumsum(1)  # [B, T]; 0 = the episode carried in from before the segment
    t_idx = torch.arange(T, device=starts.device)
    see_carried = _see_carried(length, slots, episode)
    causal = (t_idx[None, :] <= t_idx[:, None])[None]  # [1, T(query), T(key)]
    return see_carried, causal & (episode[:, None, :] == episode[:, :, None])


def _chosen_first(chosen: Tensor) -> tuple[Tensor, Tensor]:
    """``chosen [B, S]`` bool -> (indices of the chosen columns first, in order, ``[B, max count]``; counts ``[B]``)."""
    count = chosen.sum(1)
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)
    return order[:, : max(int(count.max()), 1)], count


def _plan_fifo(times: Tensor, length: Tensor, starts: Tensor, steps: Tensor, window: int) -> CachePlan:
    """Every token cached, the oldest evicted: the entry of episode step n sits in slot n mod window."""
    recent = steps[:, :, None] - window  # [B, T, 1]: a token sees entries written after this step
    see_carried, see_segment = _episode_visibility(length, times.shape[1], starts)
    see_carried = see_carried & (times[:, None, :] > recent)
    visible = torch.cat([see_carried, see_segment & (steps[:, None, :] > recent)], 2)  # [B, T, L0 + T]
    in_final = visible[:, -1]
    final_length = in_final.sum(1)
    width = max(int(final_length.max()), 1)
    candidate_steps = torch.cat([times, steps], 1)  # [B, L0 + T]
    slot = torch.where(in_final, candidate_steps % window, window)  # candidates not kept go to a dump column
    final_source = torch.zeros(starts.shape[0], window + 1, dtype=torch.long, device=starts.device)
    final_source.scatter_(1, slot, torch.arange(slot.shape[1], device=starts.device).expand_as(slot))
    return CachePlan(visible=visible, final_source=final_source[:, :width], final_length=final_length)


def _plan_with_capacity(
    scores: Tensor, times: Tensor, length: Tensor, starts: Tensor, steps: Tensor, score: Tensor, routed: Tensor, capacity: int
) -> CachePlan:
    B, T = starts.shape
    L0, device = times.shape[1], starts.device
    n_cand = L0 + T
    width = capacity + 1  # slot `capacity` is the scratch slot that choose_slot sends non-writers to
    carried = min(L0, width)
    # Integer slot maps: which candidate each slot holds, with its score and time (n_cand = nothing).
    slot_source = torch.full((B, width), n_cand, dtype=torch.long, device=device)
    slot_source[:, :carried] = torch.arange(carried, device=device)
    slot_score = torch.zeros(B, width, dtype=scores.dtype, device=device)
    slot_score[:, :carried] = scores[:, :carried]
    slot_time = torch.zeros(B, width, dtype=torch.long, device=device)
    slot_time[:, :carried] = times[:, :carried]
    length = length.clone()
    rows = torch.arange(B, device=device)
    slot_idx = torch.arange(width, device=device)
    visible = torch.zeros(B, T, n_cand + 1, dtype=torch.bool, device=device)  # last column swallows "nothing"
    for t in range(T):
        length = torch.where(starts[:, t], 0, length)
        slot, stored, length = choose_slot(slot_score, slot_time, length, score[:, t], routed[:, t], capacity)
        slot_source[rows, slot] = torch.where(stored, L0 + t, slot_source[rows, slot])
        slot_score[rows, slot] = torch.where(stored, score[:, t].to(slot_score.dtype), slot_score[rows, slot])
        slot_time[rows, slot] = torch.where(stored, steps[:, t], slot_time[rows, slot])
        live = torch.where(slot_idx < length[:, None], slot_source, n_cand)
        visible[:, t].scatter_(1, live, True)
    used = max(int(length.max()), 1)
    final_source = torch.where(slot_idx[:used] < length[:, None], slot_source[:, :used], 0)
    return CachePlan(visible=visible[:, :, :n_cand], final_source=final_source, final_length=length)


@torch.no_grad()
def seen_candidates(visible: Tensor, multiple: int = 16) -> tuple[Tensor, Tensor]:
    """The candidates some token sees, per env: ``(index [B, S'], visible [B, T, S'])``, S' a multiple of ``multiple``.

    HAM caches a few percent of the tokens, so most candidate columns are never visible; attending over the
    columns in use (padded to the env that uses most) makes the attention cost follow the cache, not T.
    The width is rounded up to a multiple of 16 with invisible columns: torch's attention sums a row in a lane order
    that depends on the width's remainder, so one env's routing (a bad input is never routed) would otherwise move
    the other envs' outputs by round-off; at multiples of 16 they come out bitwise the same.
    """
    index, _ = _chosen_first(visible.any(1))  # used columns first, in order
    pad = -index.shape[1] % multiple
    index = torch.nn.functional.pad(index, (0, pad))  # candidate 0 again, hidden below
    seen = visible.gather(2, index[:, None, :].expand(-1, visible.shape[1], -1))
    if pad:
        seen[..., -pad:] = False
    return index, seen


@torch.no_grad()
def attention_plan(
    scores: Tensor,
    times: Tensor,
    length: Tensor,
    starts: Tensor,
    steps: Tensor,
    score: Tensor,
    routed: Tensor,
    capacity: int,
    fifo: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``plan_cache`` (same arguments) and what the attention reads of it: ``(candidates [B, S], seen [B, T, S],
    final_source, final_length)``, the candidates of ``seen_candidates``' columns.

    Without a capacity (not fifo) on a CPU this is one native call (``cpu_plan.cpp``'s ``plan_unbounded``) in place of
    some 40 PyTorch ops, with the same tensors as result.
    """
    if capacity == 0 and not fifo and native.use_native(starts):
        return native.load_native().plan_unbounded(
            length.long().contiguous(), times.shape[1], starts.bool().contiguous(), routed.bool().contiguous(), 16
        )
    plan = plan_cache(scores, times, length, starts, steps, score, routed, capacity, fifo)
    index, seen = seen_candidates(plan.visible)
    return plan.candidates(index), seen, plan.final_source, plan.final_length
