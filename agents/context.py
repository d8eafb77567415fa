"""The episode context of PPO's update: the last rollouts, kept so that a minibatch's rows are replayed from their
episodes' starts (``agent.context_steps``, docs/training.md)."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

from ham_rl.agents.policy import RecurrentActorCritic
from ham_rl.memory import MemoryState

__all__ = ["EpisodeContext"]


class EpisodeContext:
    """The last rollouts' features and start flags, with the memory state at each of their starts.

    A rollout boundary inside an episode would cut the gradient from a later step to an earlier one (a question to
    its cue) if each row were replayed from the state stored at its rollout start. Instead, a minibatch's rows are
    replayed from ``W0``, the earliest start of the episodes in progress at the rollout start: every row then has its
    own episode start at or after ``W0``, so the state at ``W0`` does not matter and a fresh one is used. Where an
    episode began more than ``context_steps`` (rounded up to whole rollouts) before, ``W0`` is the start of the oldest
    kept rollout and its stored state is used: truncated BPTT for those episodes only.
    """

    def __init__(self, context_steps: int, num_steps: int, num_envs: int, feature_dim: int, device: torch.device):
        self.num_steps, self.device = num_steps, device
        self.max_rollouts = -(-context_steps // num_steps)  # ceil
        self.obs = torch.zeros(0, num_envs, feature_dim, device=device)  # [L, B, D], L a multiple of num_steps
        self.starts = torch.zeros(0, num_envs, dtype=torch.bool, device=device)
        self.states: deque[MemoryState] = deque(maxlen=max(self.max_rollouts, 1))

    def push(self, obs: np.ndarray, starts: np.ndarray, state0: MemoryState) -> None:
        """Keep the rollout just trained on (features ``[T, B, D]``, starts ``[T, B]``, its start state)."""
        if self.max_rollouts == 0:
            return
        most = self.max_rollouts * self.num_steps
        self.obs = torch.cat([self.obs, torch.from_numpy(obs).to(self.device)])[-most:]
        self.starts = torch.cat([self.starts, torch.from_numpy(starts).to(self.device)])[-most:]
        self.states.append(state0)  # the deque keeps as many as the rollouts kept

    def rows(self, mb: Tensor, b_obs: Tensor, b_starts: Tensor, state0: MemoryState, agent: RecurrentActorCritic):
        """``(x [n, C + T, D], state at its first step, starts [n, C + T], C)`` for the env rows ``mb``."""
        in_progress = torch.where(b_starts[mb, 0], 0, state0.episode_len[mb])  # steps of each row's episode so far
        kept = len(self.obs)
        context = self._context(in_progress, state0)
        if context == 0:
            return b_obs[mb], state0[mb], b_starts[mb], 0
        if int(in_progress.max()) > kept:  # an episode older than what is kept: from the oldest kept start state
            context, state = kept, self.states[0][mb]
        else:
            state = agent.initial_state(len(mb), device=self.device)  # every row's episode starts inside the context
        x = torch.cat([self.obs[kept - context :, mb].transpose(0, 1), b_obs[mb]], 1)
        starts = torch.cat([self.starts[kept - context :, mb].transpose(0, 1), b_starts[mb]], 1)
        return x, state, starts, context

    def _context(self, in_progress: Tensor, state0: MemoryState) -> int:
        """Steps of context replayed before rows whose episodes are ``in_progress`` steps old at the rollout start."""
        if not state0.rnn and state0.cache is None:  # a memory without state (mlp) has nothing to replay
            return 0
        return min(int(in_progress.max()), len(self.obs))

    def epoch_rows(
        self, perm: Tensor, size: int, b_obs: Tensor, b_starts: Tensor, state0: MemoryState, agent: RecurrentActorCritic
    ) -> list[tuple[Tensor, MemoryState, Tensor, int]]:
        """:meth:`rows` of each minibatch of an epoch, the rows ``perm[i : i + size]`` for i = 0, size, ...

        Where no row needs context (every episode starts with the rollout, none is kept, or the memory has no
        state), every row of the epoch is gathered at once and each minibatch is a slice of it: one gather per tensor
        an epoch instead of one a minibatch.
        """
        starts = range(0, len(perm), size)
        if self._context(torch.where(b_starts[:, 0], 0, state0.episode_len), state0):  # some row needs context
            return [self.rows(perm[i : i + size], b_obs, b_starts, state0, agent) for i in starts]
        x, state, first = b_obs[perm], state0[perm], b_starts[perm]
        return [(x[i : i + size], state[i : i + size], first[i : i + size], 0) for i in starts]

    def state_dict(self) -> dict:
        """Tensors and plain data, for the checkpoint."""
        return {"obs": self.obs, "starts": self.starts, "states": [s.state_dict() for s in self.states]}

    def load_state_dict(self, data: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.obs, self.starts = data["obs"].to(self.device), data["starts"].to(self.device)
        self.states.clear()
        self.states.extend(MemoryState.from_state_dict(s).to(self.device) for s in data["states"])
