"""The HAM cache rule: the fused rollout step for B envs (``ham_step`` dispatches to Triton or the reference), the
slot rule it applies (``choose_slot``) and that rule's replay over a segment for the sequence form (``plan_cache``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ham_rl.kernels.backend import resolve_backend
from ham_rl.kernels.gated_delta_rule.reference import accumulation_dtype
from ham_rl.kernels.ham_step import cpu_step
from ham_rl.kernels.ham_step.cache_plan import CachePlan, attention_plan, plan_cache, seen_candidates
from ham_rl.kernels.ham_step.reference import SCORES, choose_slot, surprise_score
from ham_rl.kernels.ham_step.reference import ham_step as reference_ham_step
from ham_rl.kernels.native import use_native
from ham_rl.kernels.nonfinite import zero_rows

__all__ = [
    "CachePlan",
    "attention_plan",
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
    score_kind: str = "cosine",
    sink: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One HAM step for B envs; arguments, in-place cache update and returns as ``reference.ham_step``.

    Runs the fused Triton kernel (``kernels/ham_step/fused.py``) when ``resolve_backend(q)`` says so and no input
    needs a gradient (the kernel has no backward; rollouts run under ``torch.no_grad``) and no ``sink`` is given (it
    has no null entry). On CPU tensors without a gradient it runs the native step (``cpu_step.py``: float32, built on
    first use, ``HAM_RL_CPU_KERNEL=torch`` turns it off, ``kernels/native.py``); the reference otherwise.
    The kernel scores by cosine; another ``score_kind`` is computed beside it and passed as the router's score.
    """
    args = (q, k, v, beta, g, gate_rnn, gate_attn, rnn_state, keys, values, scores, times, length, start, episode_step)
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (*args, router_score, scale)
    )
    if sink is None and not wants_grad and resolve_backend(q) == "triton":
        from ham_rl.kernels.ham_step.fused import fused_ham_step

        if router_score is None and use_rnn and score_kind != "cosine":
            router_score = _score_beside(q, k, v, g, rnn_state, start, score_kind)
        return fused_ham_step(
            *args, threshold, capacity=capacity, router_score=router_score, use_rnn=use_rnn,
            use_attention=use_attention, scale=scale,
        )  # fmt: skip
    if not wants_grad and use_native(q) and cpu_step.supports(q, keys, values, scores, times, rnn_state):
        return cpu_step.cpu_ham_step(
            *args, threshold, capacity=capacity, router_score=router_score, use_rnn=use_rnn,
            use_attention=use_attention, scale=scale, score_kind=score_kind, sink=sink, checked=True,
        )  # fmt: skip
    return reference_ham_step(
        *args, threshold, capacity=capacity, router_score=router_score, use_rnn=use_rnn, use_attention=use_attention,
        scale=scale, score_kind=score_kind, sink=sink,
    )  # fmt: skip


def _score_beside(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S: Tensor, start: Tensor, kind: str) -> Tensor:
    """The surprise score ``[B]`` of the prediction ``exp(g) k^T S`` (S reset where ``start``), as the reference has it."""
    acc = accumulation_dtype(q.dtype)
    S = zero_rows(S.to(acc), start)
    v_hat = g.to(acc).exp()[..., None] * torch.einsum("bhk,bhkv->bhv", k.to(acc), S)
    return surprise_score(v_hat, v, kind)
