"""The HAM cache rule: the fused rollout step for B envs (``ham_step`` dispatches to Triton or the reference), the
slot rule it applies (``choose_slot``) and that rule's replay over a segment for the sequence form (``plan_cache``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ham_rl.kernels.backend import resolve_backend
from ham_rl.kernels.ham_step.cache_plan import CachePlan, plan_cache, seen_candidates
from ham_rl.kernels.ham_step.reference import SCORES, choose_slot, surprise_score
from ham_rl.kernels.ham_step.reference import ham_step as reference_ham_step

__all__ = [
    "CachePlan",
    "choose_slot",
    "ham_step",
    "plan_cache",
    "reference_ham_step",
    "seen_candidates",
    "surprise_score",
    "SCORES",
]


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One HAM step for B envs; arguments, in-place cache update and returns as ``reference.ham_step``.

    Runs the fused Triton kernel (``kernels/ham_step/fused.py``) when ``resolve_backend(q)`` says so and no input
    needs a gradient (the kernel has no backward; rollouts run under ``torch.no_grad``), the reference otherwise.
    """
    args = (q, k, v, beta, g, gate_rnn, gate_attn, rnn_state, keys, values, scores, times, length, start, episode_step)
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (*args, router_score, scale)
    )
    if not wants_grad and resolve_backend(q) == "triton":
        from ham_rl.kernels.ham_step.fused import fused_ham_step

        fn = fused_ham_step
    else:
        fn = reference_ham_step
    return fn(
        *args, threshold, capacity=capacity, router_score=router_score, use_rnn=use_rnn, use_attention=use_attention,
        scale=scale,
    )  # fmt: skip
