"""The HAM layer's per-token work around its two paths, in PyTorch: the truth ``cpu_layer.cpp`` is tested against.

``tokens``: from the input projections to what the delta rule and the attention read (unit q and k, v, the log decay,
the sigmoid gates, the attention's query with its temperature). ``readout``: the three paths' outputs through their
gates, summed, and RMSNorm; the output projection follows. ``HybridMemory`` computes the same with its own modules
(``_per_token``, ``_gated``, ``_add_local``, ``_readout``) for every layout; these two cover the HAM layer's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["readout", "tokens"]


def tokens(qkv: Tensor, z: Tensor, log_scale: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv [N, 3, H, d]``, gate logits ``z [N, G, H]`` (the log decay's first), ``log_scale [H]`` ->
    ``(qkvn [N, 3, H, d]`` with q and k unit, ``gates [N, G, H]``, ``q_attn [N, H, d])``."""
    q, k, v = qkv.unbind(1)
    q, k = F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)
    gates = torch.cat([-F.softplus(z[:, :1]), torch.sigmoid(z[:, 1:])], 1)
    return torch.stack([q, k, v], 1), gates, q * log_scale.exp()[:, None]


def readout(
    o_rnn: Tensor, o_kv: Tensor, local: Tensor, gates: Tensor, weight: Tensor, channels: tuple[int, int, int], eps: float
) -> Tensor:
    """``RMSNorm(g_r o_rnn + g_a o_kv + g_l local)`` over ``[N, H, d]`` paths -> ``[N, H d]``; ``channels`` are the
    rows of ``gates [N, G, H]`` that hold g_r, g_a and g_l."""
    g_r, g_a, g_l = (gates[:, c, :, None] for c in channels)
    x = (g_r * o_rnn + g_a * o_kv + g_l * local).flatten(1)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
