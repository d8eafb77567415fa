"""Attention over each token's visible cache entries: ``cache_attention`` dispatches to Triton or torch's SDPA."""

from __future__ import annotations

import torch
from torch import Tensor

from ham_rl.kernels.backend import resolve_backend
from ham_rl.kernels.cache_attention.reference import masked_cache_attention
from ham_rl.kernels.cache_attention.sdpa import sdpa_cache_attention

__all__ = ["cache_attention", "masked_cache_attention", "sdpa_cache_attention"]


def cache_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor,
    scale: float | Tensor | None = None,
    sink: Tensor | None = None,
) -> Tensor:
    """Masked softmax attention; arguments and return as ``masked_cache_attention`` (the truth).

    Runs the block-sparse Triton kernel (``parallel.parallel_cache_attention``, forward and backward) when
    ``resolve_backend(q)`` is ``"triton"``, unless ``scale`` is a tensor that needs a gradient (the kernel does not
    differentiate the scale) or a ``sink`` is given (it has no null entry); torch's fused
    ``scaled_dot_product_attention`` (``sdpa.py``) otherwise.

    Args:
        q: ``[B, T, H, K]``; keys ``[B, S, H, K]``; values ``[B, S, H, V]``; visible ``[B, T, S]`` bool.
        scale: a float or a per-head ``[H]`` tensor; ``K ** -0.5`` if None.
        sink: ``[B, H]`` logit of a null entry (value 0) every query sees, or None.

    Returns:
        ``o [B, T, H, V]``; rows with nothing visible are 0.
    """
    if sink is not None:  # the Triton kernel has no null entry; SDPA runs on every device
        return sdpa_cache_attention(q, keys, values, visible, scale, sink)
    scale_grad = isinstance(scale, Tensor) and scale.requires_grad and torch.is_grad_enabled()
    if not scale_grad and resolve_backend(q) == "triton":
        from ham_rl.kernels.cache_attention.parallel import parallel_cache_attention

        return parallel_cache_attention(q, keys, values, visible, scale)
    return sdpa_cache_attention(q, keys, values, visible, scale)
