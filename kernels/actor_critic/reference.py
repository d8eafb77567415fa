"""The truth for ``cpu_heads.cpp``: the PyTorch ops ``RecurrentActorCritic.step`` runs after its memory, for a discrete
action space."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["actor_critic_evaluate", "actor_critic_step", "tanh"]


def tanh(x: Tensor) -> Tensor:
    """``tanh(x)`` as the heads compute it, ``2 sigmoid(2x) - 1`` (``agents.policy.Tanh``)."""
    return torch.sigmoid(2 * x) * 2 - 1


def actor_critic_step(
    y: Tensor,
    actor: tuple[Tensor, Tensor, Tensor, Tensor],
    critic: tuple[Tensor, Tensor, Tensor, Tensor],
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``y [B, hidden]`` -> ``(action [B] long, log-prob [B], value [B])``.

    ``actor`` and ``critic`` are ``(w1, b1, w2, b2)`` of ``Linear -> tanh -> Linear``; the actor's output is the
    logits of one categorical distribution, sampled with ``torch.multinomial`` (the default generator) or, with
    ``deterministic``, its argmax.
    """
    logits = F.linear(tanh(F.linear(y, actor[0], actor[1])), actor[2], actor[3])
    value = F.linear(tanh(F.linear(y, critic[0], critic[1])), critic[2], critic[3]).squeeze(-1)
    lp = torch.log_softmax(logits, dim=-1)
    action = lp.argmax(-1) if deterministic else torch.multinomial(lp.exp(), 1).squeeze(-1)
    return action, lp.gather(-1, action.unsqueeze(-1)).squeeze(-1), value


def actor_critic_evaluate(
    y: Tensor, actions: Tensor, actor: tuple[Tensor, Tensor, Tensor, Tensor], critic: tuple[Tensor, Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``y [N, hidden]``, ``actions [N]`` long -> ``(log-prob [N], entropy [N], value [N])``, differentiable: what
    ``RecurrentActorCritic.evaluate_actions`` computes after its memory for a discrete action space."""
    logits = F.linear(tanh(F.linear(y, actor[0], actor[1])), actor[2], actor[3])
    value = F.linear(tanh(F.linear(y, critic[0], critic[1])), critic[2], critic[3]).squeeze(-1)
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1), value
