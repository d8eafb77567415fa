"""The truth for ``cpu_loss.cpp``: PPO's clipped loss as CleanRL writes it, the ops ``agents.ppo.PPO.train_step`` ran."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ppo_loss"]


def ppo_loss(
    newlogprob: Tensor,
    entropy: Tensor,
    newvalue: Tensor,
    logprob: Tensor,
    advantages: Tensor,
    returns: Tensor,
    values: Tensor,
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    norm_adv: bool,
    clip_vloss: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A minibatch's loss from the new log-probs, entropies and values (differentiable) and the rollout's log-probs,
    advantages, returns and values, all of one shape -> 0-dim ``(loss, pg_loss, v_loss, entropy_loss, approx_kl,
    clipfrac)``; only ``loss`` is meant for ``backward``."""
    logratio = newlogprob - logprob
    ratio = logratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    if norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    # policy loss
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    # value loss
    if clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = values + torch.clamp(newvalue - values, -clip_coef, clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef
    return loss, pg_loss, v_loss, entropy_loss, approx_kl, clipfrac
