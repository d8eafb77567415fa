"""Pure-PyTorch attention of each token over the cache entries it may see: the truth for the Triton kernel.

In HAM's sequence form the candidate entries of env b are the cache carried in from before the segment
followed by the segment's own tokens; ``visible[b, t, s]`` says whether entry s is in env b's cache at step t
(same episode, routed, not evicted, written at or before t). A token that sees nothing gets 0, never NaN; a
token gets NaN exactly when its query or an entry it sees is not finite (``ham_rl.kernels.nonfinite``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ham_rl.kernels.gated_delta_rule.reference import accumulation_dtype
from ham_rl.kernels.nonfinite import contain_attention, poison_attention

__all__ = ["masked_cache_attention", "masked_softmax"]


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` restricted to ``mask``; a slice with nothing allowed gives zeros, not NaN."""
    logits = logits.masked_fill(~mask, float("-inf"))
    # An all-masked slice has max -inf; a finite floor keeps exp() at 0 instead of NaN.
    weights = (logits - logits.amax(dim, keepdim=True).clamp_min(-1e30).detach()).exp() * mask
    return weights / weights.sum(dim, keepdim=True).clamp_min(1e-30)


def masked_cache_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor,
    scale: float | Tensor | None = None,
    sink: Tensor | None = None,
) -> Tensor:
    """Softmax attention restricted by a visibility mask.

    Args:
        q: ``[B, T, H, K]`` queries.
        keys: ``[B, S, H, K]`` candidate keys.
        values: ``[B, S, H, V]`` candidate values.
        visible: ``[B, T, S]`` bool, shared by all heads.
        scale: logit scale, a float or a per-head ``[H]`` tensor; ``K ** -0.5`` if None.
        sink: ``[B, H]`` logit of an always-visible null entry whose value is 0, or None for none. With it, entries
            that match the query no better than the sink share their weight with nothing, so a weak match reads
            little instead of all of one entry's value.

    Returns:
        ``o [B, T, H, V]`` in ``q.dtype`` (computed in float32, or float64); rows with nothing visible are 0.
    """
    acc, dtype = accumulation_dtype(q.dtype), q.dtype
    # A weight of 0 times a NaN value is NaN: bad entries are zeroed, the queries that see them set to NaN after.
    (q, keys, values), masks = contain_attention(q, keys, values, visible, force=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(scale, Tensor):
        scale = scale.to(acc)[:, None, None]  # [H] -> [H, 1, 1], broadcast over [B, H, T, S]
    logits = torch.einsum("bthk,bshk->bhts", q.to(acc), keys.to(acc)) * scale  # [B, H, T, S]
    mask = visible[:, None].expand(logits.shape)  # [B, H, T, S], shared by the heads
    if sink is not None:
        logits = torch.cat([logits, sink.to(acc)[:, :, None, None].expand(*logits.shape[:3], 1)], -1)
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:3], 1)], -1)
    weights = masked_softmax(logits, mask, dim=-1)[..., : keys.shape[1]]
    return poison_attention(torch.einsum("bhts,bshv->bthv", weights, values.to(acc)).to(dtype), masks)
