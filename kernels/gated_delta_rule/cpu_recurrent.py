"""The gated delta rule's loop over time as one native call forward and one backward: the default CPU path.

``cpu_recurrent.cpp`` runs ``reference.py``'s recurrence per (row, head) in C++, the state held in vector registers
(a head of 16 x 16 is 16 rows of one 16-float vector), and its hand-written backward runs back through time from
a state kept every ``block`` steps, recomputing the states in between. On a PPO minibatch this replaces the chunked
form's ~1,000 small torch ops (``torch_chunk.py``) with two calls (docs/performance.md has the timings). How it is
built, and what runs where it cannot be: ``kernels/native.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ham_rl.kernels import native
from ham_rl.kernels.gated_delta_rule.reference import accumulation_dtype
from ham_rl.kernels.nonfinite import contain_delta_rule, delta_rule_grads, output_grads, poison_delta_rule

__all__ = [
    "DEFAULT_BLOCK",
    "CpuRecurrentGatedDeltaRuleFunction",
    "cpu_recurrent_gated_delta_rule",
    "has_vector_path",
]

#: steps between the states the forward keeps for the backward (T / 16 states per head; 16 x 16 x 4 B each)
DEFAULT_BLOCK = 16
#: value widths (head sizes) with the vector path; other widths run scalar loops, slower than the chunked form
VECTOR_WIDTHS = (16, 32, 64)


def has_vector_path(v: Tensor) -> bool:
    """True when the kernel runs ``v``'s heads on its vector path: float32 accumulation and a head of 16, 32 or 64."""
    return accumulation_dtype(v.dtype) == torch.float32 and v.shape[-1] in VECTOR_WIDTHS


def _as(t: Tensor | None, dtype: torch.dtype, empty: Tensor) -> Tensor:
    """``t`` contiguous in ``dtype``, or an empty tensor (the kernel's "none") for None."""
    return empty if t is None else native.as_contiguous(t, dtype)


class CpuRecurrentGatedDeltaRuleFunction(torch.autograd.Function):
    """Forward and backward of the gated delta rule, each one call into ``cpu_recurrent.cpp``."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, starts, initial_state, scale, block):
        ctx.set_materialize_grads(False)  # unused outputs (v_hat in training, the final state) cost nothing
        dtypes = [t.dtype for t in (q, k, v, beta, g)]
        h0_dtype = None if initial_state is None else initial_state.dtype
        acc = accumulation_dtype(q.dtype)
        # Non-finite inputs never enter the recurrence (they would reach the gradients of their whole episode).
        (q, k, v, beta, g, initial_state), ctx.masks = contain_delta_rule(q, k, v, beta, g, starts, initial_state)
        empty = q.new_empty(0, dtype=acc)
        xs = [_as(t, acc, empty) for t in (q, k, v, beta, g)]
        st = _as(starts, torch.uint8, empty.to(torch.uint8))
        o, v_hat, state, checkpoints = native.load_native().gdr_forward(*xs, st, _as(initial_state, acc, empty), scale, block)
        ctx.save_for_backward(*xs, st, checkpoints)
        ctx.meta = (scale, block, dtypes, h0_dtype)
        return poison_delta_rule(o.to(dtypes[0]), v_hat.to(dtypes[0]), state, ctx.masks)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dvhat, dht):
        scale, block, dtypes, h0_dtype = ctx.meta
        do, dvhat, dht = output_grads(do, dvhat, dht, ctx.masks)
        *xs, st, checkpoints = ctx.saved_tensors
        acc = xs[0].dtype
        empty = xs[0].new_empty(0)
        want_dh0 = h0_dtype is not None and ctx.needs_input_grad[6]
        outs = native.load_native().gdr_backward(
            *xs, st, checkpoints, _as(do, acc, empty), _as(dvhat, acc, empty), _as(dht, acc, empty), scale, block, want_dh0
        )
        grads = [t.to(dt) for t, dt in zip(outs[:5], dtypes, strict=True)]
        dh0 = outs[5].to(h0_dtype) if want_dh0 else None
        dq, dk, dv, dbeta, dg, dh0 = delta_rule_grads((*grads, dh0), ctx.masks)
        return dq, dk, dv, dbeta, dg, None, dh0, None, None


def cpu_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    starts: Tensor | None = None,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
    block: int = DEFAULT_BLOCK,
) -> tuple[Tensor, Tensor, Tensor]:
    """``naive_recurrent_gated_delta_rule`` (same arguments and returns) as native CPU calls, with their backward.

    ``block``: steps between the states kept for the backward. Raises ``RuntimeError`` where the kernel cannot be
    built (``kernels.native.native_available()`` says whether it can) and ``ValueError`` for a tensor not on the
    CPU.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: must be a positive number of steps")
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g), ("initial_state", initial_state)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the native delta rule runs on CPU tensors only")
    return CpuRecurrentGatedDeltaRuleFunction.apply(q, k, v, beta, g, starts, initial_state, float(scale), block)
