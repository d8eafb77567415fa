"""Cache attention through ``torch.nn.functional.scaled_dot_product_attention``: the CPU path.

torch's fused attention takes the ``visible`` mask as a boolean ``attn_mask`` and has its own backward, so one
call replaces the reference's einsum, masked softmax and einsum (about 2-4x faster forward + backward on CPU at
the sizes PPO uses). The reference in ``reference.py`` stays the truth that tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ham_rl.kernels.gated_delta_rule.reference import accumulation_dtype
from ham_rl.kernels.nonfinite import contain_attention, poison_attention

__all__ = ["sdpa_cache_attention"]


def sdpa_cache_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor,
    scale: float | Tensor | None = None,
    sink: Tensor | None = None,
) -> Tensor:
    """Arguments and return as ``masked_cache_attention``; rows with nothing visible are 0."""
    acc, dtype = accumulation_dtype(q.dtype), q.dtype
    # SDPA adds its mask as -inf (NaN + -inf is NaN) and multiplies 0 weights by NaN values: no non-finite input enters.
    (q, keys, values), masks = contain_attention(q, keys, values, visible)
    if isinstance(scale, Tensor):  # a per-head scale folds into q: SDPA takes one float
        q, scale = q * scale.to(q.dtype)[:, None], 1.0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if sink is not None:
        (q, keys, values, visible), scale = _with_sink(q * scale, keys, values, visible, sink), 1.0
    o = F.scaled_dot_product_attention(
        q.to(acc).transpose(1, 2),  # [B, H, T, K]
        keys.to(acc).transpose(1, 2),
        values.to(acc).transpose(1, 2),
        attn_mask=visible[:, None],  # [B, 1, T, S], shared by the heads
        scale=scale,
    ).transpose(1, 2)
    # torch >= 2.5 already returns 0 for a row that sees nothing; older builds return NaN there, so zero it anyway.
    anything = visible.any(-1)[..., None, None]  # [B, T, 1, 1]
    return poison_attention(torch.where(anything, o, torch.zeros((), dtype=o.dtype, device=o.device)).to(dtype), masks)


def _with_sink(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, sink: Tensor) -> tuple[Tensor, ...]:
    """Scaled ``q`` and the cache with the null entry appended, for SDPA at scale 1.

    One more feature carries the sink's logit: q gets a 1, the entries a 0 and the null entry (value 0) the logit
    ``sink [B, H]``, so SDPA's own backward gives the sink its gradient.
    """
    B, S, H, _ = keys.shape
    q = torch.cat([q, q.new_ones(*q.shape[:-1], 1)], -1)
    null_key = torch.cat([keys.new_zeros(B, 1, H, keys.shape[-1]), sink.to(keys.dtype)[:, None, :, None]], -1)
    keys = torch.cat([torch.cat([keys, keys.new_zeros(B, S, H, 1)], -1), null_key], 1)
    values = torch.cat([values, values.new_zeros(B, 1, H, values.shape[-1])], 1)
    visible = torch.cat([visible, visible.new_ones(*visible.shape[:-1], 1)], -1)
    return q, keys, values, visible
