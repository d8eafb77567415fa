"""The recurrent actor-critic: feature encoder -> memory (any of the family) -> actor and critic heads.

Action distributions are written out by hand (log_softmax / gather / multinomial) rather than through
``torch.distributions``, which validates its arguments on every call and costs more than the rest of a rollout step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from ham_rl.kernels.actor_critic import cpu_heads
from ham_rl.kernels.actor_critic.reference import tanh
from ham_rl.memory import MemoryState, make_memory

__all__ = ["ActionHead", "RecurrentActorCritic", "layer_init"]


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain ``std`` and constant bias (CleanRL's init)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class ActionHead:
    """Sampling, log-probability and entropy for Discrete, MultiDiscrete and Box action spaces.

    Discrete(n): one categorical over n logits. MultiDiscrete(nvec): independent categoricals, log-probs summed.
    Box(shape): a diagonal Gaussian with a state-independent learned log-std (the env receives the clipped sample).

    :param space: the env's action space
    :raises ValueError: for another action space (the message lists the supported ones)
    """

    def __init__(self, space: spaces.Space):
        self.space = space
        if isinstance(space, spaces.Discrete):
            self.kind, self.sizes, self.num_outputs, self.action_shape = "discrete", [int(space.n)], int(space.n), ()
        elif isinstance(space, spaces.MultiDiscrete):
            self.sizes = [int(n) for n in space.nvec.reshape(-1)]
            self.kind, self.num_outputs, self.action_shape = "multidiscrete", sum(self.sizes), (len(self.sizes),)
        elif isinstance(space, spaces.Box):
            self.kind, self.sizes = "box", []
            self.num_outputs, self.action_shape = int(np.prod(space.shape)), (int(np.prod(space.shape)),)
        else:
            raise ValueError(f"unsupported action space {space}; supported: Discrete, MultiDiscrete, Box")
        self.action_dtype = torch.float32 if self.kind == "box" else torch.long

    def sample(self, out: Tensor, log_std: Tensor | None, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """Draw actions.

        :param out: ``[B, num_outputs]`` actor output (logits, or the Gaussian mean)
        :return: actions ``[B, *action_shape]`` and their log-probs ``[B]``
        """
        if self.kind == "box":
            std = log_std.exp().expand_as(out)
            a = out if deterministic else out + std * torch.randn_like(out)
            return a, self._normal_logp(out, log_std, a)
        acts, logp = [], 0.0
        for lg in out.split(self.sizes, dim=-1):
            lp = torch.log_softmax(lg, dim=-1)
            a = lp.argmax(-1) if deterministic else torch.multinomial(lp.exp(), 1).squeeze(-1)
            acts.append(a)
            logp = logp + lp.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        action = acts[0] if self.kind == "discrete" else torch.stack(acts, dim=-1)
        return action, logp

    def evaluate(self, out: Tensor, log_std: Tensor | None, action: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies of given actions.

        :param out: ``[..., num_outputs]`` actor output
        :param action: ``[..., *action_shape]`` actions
        :return: log-probs ``[...]`` and entropies ``[...]``
        """
        if self.kind == "box":
            ent = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1).expand(out.shape[:-1])
            return self._normal_logp(out, log_std, action), ent
        logp, ent = 0.0, 0.0
        acts = action.unsqueeze(-1) if self.kind == "discrete" else action
        for i, lg in enumerate(out.split(self.sizes, dim=-1)):
            lp = torch.log_softmax(lg, dim=-1)
            logp = logp + lp.gather(-1, acts[..., i : i + 1]).squeeze(-1)
            ent = ent - (lp.exp() * lp).sum(-1)
        return logp, ent

    @staticmethod
    def _normal_logp(mean: Tensor, log_std: Tensor, a: Tensor) -> Tensor:
        z = (a - mean) / log_std.exp()
        return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def to_env(self, action: Tensor) -> np.ndarray:
        """Actions as the numpy array the vector env takes (Box samples clipped to the bounds)."""
        a = action.cpu().numpy()
        if self.kind == "box":
            a = np.clip(a, self.space.low.reshape(-1), self.space.high.reshape(-1)).reshape((-1, *self.space.shape))
        return a


class Tanh(nn.Module):
    """``tanh(x)``, computed as ``2 sigmoid(2x) - 1`` (the same function, within 2e-7): on CPU torch's own ``tanh`` and
    its backward take 2.6x as long (an MKL kernel at about 5 ns an element), and the heads run it on every token of
    every minibatch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh(x)


class RecurrentActorCritic(nn.Module):
    """Encoder ``Linear(feature_dim, embed_size) + ReLU`` -> memory -> actor / critic MLP heads (shared memory).

    :param feature_dim: size of the env features (observation, previous action, previous reward)
    :param action_space: the env's action space
    :param memory: name of the memory (see ``ham_rl.MEMORIES``)
    :param hidden_size: memory output size
    :param memory_options: options passed to ``make_memory``
    :param embed_size: size of the encoder output (the memory input)
    :param head_size: hidden width of the actor and critic heads
    """

    def __init__(
        self,
        feature_dim: int,
        action_space: spaces.Space,
        memory: str = "ham",
        hidden_size: int = 64,
        memory_options: dict | None = None,
        embed_size: int = 64,
        head_size: int = 64,
    ):
        super().__init__()
        self.action_head = ActionHead(action_space)
        self.encoder = nn.Sequential(layer_init(nn.Linear(feature_dim, embed_size)), nn.ReLU())
        self.memory = make_memory(memory, input_size=embed_size, hidden_size=hidden_size, **(memory_options or {}))
        n_out = self.action_head.num_outputs
        self.actor = nn.Sequential(
            layer_init(nn.Linear(hidden_size, head_size)), Tanh(), layer_init(nn.Linear(head_size, n_out), 0.01)
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(hidden_size, head_size)), Tanh(), layer_init(nn.Linear(head_size, 1), 1.0)
        )
        self.log_std = nn.Parameter(torch.zeros(n_out)) if self.action_head.kind == "box" else None

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> MemoryState:
        """The memory's initial state for ``batch_size`` envs."""
        return self.memory.initial_state(batch_size, device=device)

    def step(self, x: Tensor, state: MemoryState, start: Tensor, deterministic: bool = False, checked: bool = False):
        """One env step for all envs at once (one batched memory call).

        :param x: ``[B, feature_dim]`` features; start: ``[B]`` bool; ``checked``: as ``Memory.step``'s
        :return: action ``[B, *action_shape]``, log-prob ``[B]``, value ``[B]``, the new state; ``state``'s cache is
            updated in place (a rollout replaces its state at once), so keep ``state.clone()`` to hold on to it
        """
        linear, relu = self.encoder  # the modules' ops without their call machinery: a rollout calls this per step
        y, state = self.memory.step(relu.forward(linear.forward(x)), state, start, inplace=True, checked=checked)
        if self.action_head.kind == "discrete":
            actor, critic = self._head_weights
            if cpu_heads.fits(y, *actor, *critic):  # the ops below as one native call: some 20 small ops a step
                return (*cpu_heads.cpu_actor_critic_step(y, actor, critic, deterministic), state)
        action, logp = self.action_head.sample(self.actor(y), self.log_std, deterministic)
        return action, logp, self.critic(y).squeeze(-1), state

    @property
    def _head_weights(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The actor's and the critic's ``(w1, b1, w2, b2)``."""
        (a1, _, a2), (c1, _, c2) = self.actor, self.critic  # iterating a Sequential is cheaper than indexing it
        # the parameter dicts, not Module.__getattr__ eight times: the rollout asks every step
        a1, a2, c1, c2 = a1._parameters, a2._parameters, c1._parameters, c2._parameters
        return (a1["weight"], a1["bias"], a2["weight"], a2["bias"]), (c1["weight"], c1["bias"], c2["weight"], c2["bias"])

    def value(self, x: Tensor, state: MemoryState, start: Tensor) -> Tensor:
        """Value ``[B]`` of one step from ``state`` (left as it was), e.g. to bootstrap a cut-off episode."""
        y, _ = self.memory.step(self.encoder(x), state, start)
        return self.critic(y).squeeze(-1)

    def evaluate_actions(self, x: Tensor, state: MemoryState, starts: Tensor, actions: Tensor, context: int = 0):
        """Replay whole segments with one sequence call of the memory.

        :param x: ``[n, context + T, feature_dim]``; state: the memory state of the n envs at segment start; starts
            ``[n, context + T]``
        :param actions: ``[n, T, *action_shape]``, the actions of the last T steps
        :param context: leading steps replayed for the memory only (earlier steps of the episodes in progress, so the
            gradient reaches them), without heads or losses
        :return: log-probs ``[n, T]``, entropies ``[n, T]``, values ``[n, T]``
        """
        linear, relu = self.encoder  # as in step: the modules' ops without the Sequential's call machinery
        y, _ = self.memory(relu.forward(linear.forward(x)), state, starts)
        y = y[:, context:]
        if self.action_head.kind == "discrete":
            actor, critic = self._head_weights
            if cpu_heads.fits(y, *actor, *critic):  # the ops below, one native call forward and one backward
                out = cpu_heads.cpu_actor_critic_evaluate(y.reshape(-1, y.shape[-1]), actions.reshape(-1), actor, critic)
                return tuple(t.view(y.shape[:-1]) for t in out)
        logp, ent = self.action_head.evaluate(self.actor(y), self.log_std, actions)
        return logp, ent, self.critic(y).squeeze(-1)
