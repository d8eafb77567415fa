"""Gated delta rule with episode resets: ``gated_delta_rule`` dispatches to Triton, the native CPU kernel or the chunked
PyTorch form."""

from __future__ import annotations

from torch import Tensor

from ham_rl.kernels.backend import resolve_backend
from ham_rl.kernels.gated_delta_rule.cpu_recurrent import cpu_recurrent_gated_delta_rule, has_vector_path
from ham_rl.kernels.gated_delta_rule.naive_chunk import DEFAULT_CPU_CHUNK_SIZE, naive_chunk_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.reference import naive_recurrent_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.torch_chunk import torch_chunk_gated_delta_rule
from ham_rl.kernels.native import use_native

__all__ = [
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "naive_chunk_gated_delta_rule",
    "torch_chunk_gated_delta_rule",
    "cpu_recurrent_gated_delta_rule",
]


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None = None,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gated delta rule; arguments and returns as ``naive_recurrent_gated_delta_rule`` (the truth).

    Runs ``chunk.chunk_gated_delta_rule`` (Triton, forward and backward) when ``resolve_backend(q)`` is
    ``"triton"``. On CPU tensors it runs the native kernel, ``cpu_recurrent_gated_delta_rule`` (one C++ call forward
    and one backward) for float32 heads of 16, 32 or 64 values, unless ``kernels.native.use_native`` says no
    (``HAM_RL_CPU_KERNEL=torch``, it cannot be built here, or ``torch.compile`` is tracing); otherwise the chunked
    PyTorch form with a hand-written backward, ``torch_chunk_gated_delta_rule``.

    Args:
        q, k: ``[B, T, H, K]``; v ``[B, T, H, V]``; beta, g ``[B, T, H]``; starts ``[B, T]`` bool or None;
        initial_state ``[B, H, K, V]`` or None; scale multiplies the readout.

    Returns:
        ``(o [B, T, H, V], v_hat [B, T, H, V], final_state [B, H, K, V])``.
    """
    if resolve_backend(q) == "triton":
        from ham_rl.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule

        return chunk_gated_delta_rule(q, k, v, beta, g, starts, initial_state, scale)
    # Where the native kernel has no vector path (float64, odd head sizes) its scalar loops lose to the chunked form.
    if use_native(q) and has_vector_path(v):
        return cpu_recurrent_gated_delta_rule(q, k, v, beta, g, starts, initial_state, scale)
    return torch_chunk_gated_delta_rule(q, k, v, beta, g, starts, initial_state, scale, DEFAULT_CPU_CHUNK_SIZE)
