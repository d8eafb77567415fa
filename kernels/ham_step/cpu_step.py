"""The HAM rollout step as one native call on CPU tensors (``cpu_step.cpp``): the default CPU path of ``ham_step``,
and of the HAM layer's whole step from its input to its output projection (``cpu_layer_step``, which
``HybridMemory`` calls).

``reference.ham_step`` is some 50 small torch ops a step for a batch of envs; this is one loop over the envs in C++,
with the same in-place cache update and the same returns (to float32 round-off). Rollouts only: it has no backward,
so ``ham_step`` runs the reference whenever an input needs a gradient. How it is built, and what runs where it
cannot be: ``kernels/native.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ham_rl.kernels import native
from ham_rl.kernels.native import as_contiguous as _as

__all__ = ["cpu_ham_step", "cpu_layer_step", "supports"]

SCORE_KINDS = {"cosine": 0, "error": 1, "relative": 2}


def _rows_strided_only(t: Tensor) -> bool:
    """Every dim but the first is contiguous (a cache may be a slice of a larger reservation)."""
    if t.is_contiguous():
        return True
    if t.dim() > 1 and t.shape[0] > 0:
        return t[0].is_contiguous()  # one view, where the loop below costs several microseconds every rollout step
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def supports(q: Tensor, keys: Tensor, values: Tensor, scores: Tensor, times: Tensor, rnn_state: Tensor) -> bool:
    """Whether the native step takes these tensors: float32 throughout (int64 times) and a cache whose rows are each
    contiguous."""
    floats = (q, keys, values, scores, rnn_state)
    return (
        all(t.dtype == torch.float32 for t in floats)
        and times.dtype == torch.long
        and all(_rows_strided_only(t) for t in (keys, values, scores, times))
    )


def cpu_ham_step(
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
    threshold: float | Tensor,
    capacity: int = 0,
    router_score: Tensor | None = None,
    use_rnn: bool = True,
    use_attention: bool = True,
    scale: float | Tensor | None = None,
    score_kind: str = "cosine",
    sink: Tensor | None = None,
    checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``reference.ham_step`` (same arguments, in-place cache update and returns) as one native call, without grad.

    Raises ``RuntimeError`` where the kernel cannot be built and ``ValueError`` for tensors ``supports`` refuses
    (``checked=True``: the caller has asked ``supports`` already, as the dispatcher does every step).
    """
    if not checked and not supports(q, keys, values, scores, times, rnn_state):
        raise ValueError("the native HAM step takes float32 tensors, int64 times and a cache with contiguous rows")
    if score_kind not in SCORE_KINDS:
        raise ValueError(f"score_kind={score_kind!r}: allowed {', '.join(SCORE_KINDS)}")
    H, K = q.shape[1], q.shape[2]
    scale = K**-0.5 if scale is None else scale
    scale = _as(scale.expand(H), torch.float32) if isinstance(scale, Tensor) else q.new_full((H,), scale)
    empty = q.new_empty(0)
    with torch.no_grad():
        floats = [empty if t is None else _as(t, torch.float32) for t in (q, k, v, beta, g, gate_rnn, gate_attn)]
        o, new_state, length, score, routed = native.load_native().ham_step(
            *floats, _as(rnn_state, torch.float32) if use_rnn else empty, keys, values, scores, times,
            _as(length, torch.long), _as(start, torch.bool), _as(episode_step, torch.long), float(threshold),
            int(capacity), empty if router_score is None else _as(router_score, torch.float32), bool(use_rnn),
            bool(use_attention), scale, SCORE_KINDS[score_kind], empty if sink is None else _as(sink, torch.float32),
        )  # fmt: skip
    return o, new_state if use_rnn else rnn_state, length, score, routed


def cpu_layer_step(
    x: Tensor,
    qkv_weight: Tensor,
    local_weight: Tensor,
    gates_weight: Tensor,
    gates_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    history: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    rnn_state: Tensor,
    keys: Tensor,
    values: Tensor,
    scores: Tensor,
    times: Tensor,
    length: Tensor,
    start: Tensor,
    episode_step: Tensor,
    threshold: float | Tensor,
    capacity: int,
    log_scale: Tensor,
    score_kind: str,
    sink: Tensor | None,
    norm_weight: Tensor,
    norm_eps: float,
    stored: Tensor,
    seen: Tensor,
    checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The HAM layer's whole step, input to output projection, as one native call, without grad.

    ``x [B, input]``; the layer's projections as ``nn.Linear`` holds them: ``qkv_weight [3 H D, input]``,
    ``local_weight [H D, input]`` (the local path's, before the convolution), ``gates_weight [5 H, input]`` (the
    logits of the log decay, beta and the RNN, attention and local gates) and ``gates_bias``, ``out_weight [H D, H D]``
    and ``out_bias``; ``history [B, C - 1, H D]``, the short convolution's ``conv_weight [C, H D]`` and ``conv_bias``,
    ``log_scale [H]`` (the log of the attention's temperature), ``norm_weight [H D]``; ``stored`` and ``seen``, 0-dim
    float64 counts the routed steps and the envs are added to in place; the rest as ``cpu_ham_step``. Returns ``(y
    [B, H D], rnn state, conv history, length, score, routed)``; the cache is written in place. ``HybridMemory`` calls
    it where its layout is this one (``conv_path="local"``, unfolded, both paths, the surprise router);
    ``cpu_step.cpp`` says what it computes. ``checked=True``: the cache and the counts are those a checked call took
    or returned (a rollout's later steps), so their dtypes and layouts are not checked again.
    """
    if not checked:
        if not supports(x, keys, values, scores, times, rnn_state):
            raise ValueError("the native HAM step takes float32 tensors, int64 times and a cache with contiguous rows")
        for name, count in (("stored", stored), ("seen", seen)):
            if count.dtype != torch.float64 or count.dim() != 0:
                raise ValueError(f"{name} must be a 0-dim float64 tensor, got {count.dtype} of shape {tuple(count.shape)}")
    return tuple(
        native.load_native().layer_step(
            x, qkv_weight, local_weight, gates_weight, gates_bias, out_weight, out_bias,
            *(_as(t, torch.float32) for t in (history, conv_weight, conv_bias, rnn_state)),
            keys, values, scores, times, _as(length, torch.long), _as(start, torch.bool),
            _as(episode_step, torch.long), float(threshold), int(capacity), log_scale, SCORE_KINDS[score_kind],
            sink, _as(norm_weight, torch.float32), float(norm_eps), stored, seen,
        )
    )  # fmt: skip
