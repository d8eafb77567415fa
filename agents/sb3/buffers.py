"""Rollout buffers for HAMRecurrentPPO: the memory state is stored once per rollout, minibatches are whole env rows.

RecurrentRolloutBuffer stores the LSTM's (h, c) at every step, because its minibatches may begin in the middle of an
episode. A memory with a growing KV cache cannot afford that. Here each minibatch is a set of whole env rows
(all ``n_steps`` steps of some envs), so the only state ever needed is each env's state at the start of the
rollout; resets inside a row come from ``episode_starts``. The classes subclass the sb3-contrib buffers so that
RecurrentPPO's type checks accept them; the per-step state arrays are never allocated.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.type_aliases import (
    RecurrentDictRolloutBufferSamples,
    RecurrentRolloutBufferSamples,
    RNNStates,
)
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer

__all__ = ["HAMDictRolloutBuffer", "HAMRolloutBuffer", "envs_per_minibatch"]


def envs_per_minibatch(batch_size: int | None, n_steps: int, n_envs: int, warn: bool = False) -> int:
    """
    Env rows per minibatch: ``batch_size // n_steps``, at least 1 and at most ``n_envs``.

    :param batch_size: RecurrentPPO's ``batch_size`` in steps (None: all envs in one minibatch)
    :param n_steps: steps per env per rollout (the row length)
    :param n_envs: number of envs
    :param warn: warn when ``batch_size`` is not a whole number of rows or the rows do not split evenly
    :return: number of env rows per minibatch
    """
    if batch_size is None:
        return n_envs
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}")
    rows = min(n_envs, max(1, batch_size // n_steps))
    if warn and (batch_size % n_steps or batch_size > n_envs * n_steps):
        warnings.warn(
            f"HAMRecurrentPPO forms minibatches of whole env rows of `n_steps`={n_steps} steps, so `batch_size`="
            f"{batch_size} becomes {rows} row(s) = {rows * n_steps} steps (n_envs={n_envs}); pass a multiple of "
            f"n_steps up to n_envs * n_steps to silence this",
            stacklevel=3,
        )
    elif warn and n_envs % rows:
        warnings.warn(
            f"n_envs={n_envs} is not a multiple of {rows} rows per minibatch (`batch_size`={batch_size} // "
            f"`n_steps`={n_steps}), so the last minibatch of each epoch holds {n_envs % rows} row(s)",
            stacklevel=3,
        )
    return rows


class _EnvRowsMixin:
    """What both buffers share: keep the rollout's initial state, yield minibatches of whole env rows."""

    initial_states: RNNStates | None
    _rows: dict | None
    #: the SB3 buffer below the sb3-contrib recurrent one (stores everything but the memory state)
    _storage_class: type[RolloutBuffer] | type[DictRolloutBuffer]

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1,
        gamma: float = 0.99,
        n_envs: int = 1,
    ):
        # hidden_state_shape=(0,): the parent's four per-step state arrays are allocated empty.
        super().__init__(  # type: ignore[call-arg]
            buffer_size, observation_space, action_space, (0,), device, gae_lambda=gae_lambda, gamma=gamma, n_envs=n_envs
        )

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.initial_states = None
        self._rows = None

    def add(self, *args, lstm_states: RNNStates, **kwargs) -> None:
        """
        Add one step (RolloutBuffer.add's arguments).

        :param lstm_states: the memory states of all envs *before the rollout's first step*; kept at the first
            add of a rollout and ignored afterwards. The caller must pass a state the rollout does not modify
            (the memories' step form writes into its state in place).
        """
        if self.pos == 0:  # type: ignore[attr-defined]
            self.initial_states = lstm_states
        self._storage_class.add(self, *args, **kwargs)  # skip the parent's per-step (h, c) arrays

    def _env_major(self, array: np.ndarray) -> th.Tensor:
        """``[n_steps, n_envs, ...]`` -> tensor ``[n_envs, n_steps, ...]`` (each env's row contiguous)."""
        return self.to_torch(np.ascontiguousarray(array.swapaxes(0, 1)))  # type: ignore[attr-defined]

    def _prepare_rows(self) -> dict:
        rows = {
            name: self._env_major(getattr(self, name))
            for name in ("actions", "values", "log_probs", "advantages", "returns", "episode_starts")
        }
        if isinstance(self.observations, dict):  # type: ignore[attr-defined]
            rows["observations"] = {k: self._env_major(v) for k, v in self.observations.items()}  # type: ignore[attr-defined]
        else:
            rows["observations"] = self._env_major(self.observations)  # type: ignore[attr-defined]
        return rows

    def observation_rows(self, n_steps: int | None = None) -> tuple[th.Tensor | dict[str, th.Tensor], th.Tensor]:
        """
        The first ``n_steps`` steps (default: all) of every env row, env-major: what a memory's sequence form
        reads.

        :return: observations ``[n_envs * n_steps, ...]`` (a dict of those for Dict spaces) and episode starts
            ``[n_envs * n_steps]``
        """
        n_steps = self.buffer_size if n_steps is None else n_steps  # type: ignore[attr-defined]

        def rows(array: np.ndarray) -> th.Tensor:
            t = self._env_major(array[:n_steps])
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

        if isinstance(self.observations, dict):  # type: ignore[attr-defined]
            obs = {key: rows(value) for key, value in self.observations.items()}  # type: ignore[attr-defined]
        else:
            obs = rows(self.observations)  # type: ignore[attr-defined]
        return obs, rows(self.episode_starts)  # type: ignore[attr-defined]

    def get(self, batch_size: int | None = None) -> Generator[RecurrentRolloutBufferSamples, None, None]:
        """
        Minibatches of whole env rows, in a random env order (one pass over all envs).

        :param batch_size: steps per minibatch; rounded to whole rows of ``buffer_size`` steps (see
            :func:`envs_per_minibatch`)
        """
        if not self.full:  # type: ignore[attr-defined]
            raise RuntimeError("the rollout buffer must be full before sampling from it")
        if self.initial_states is None:
            raise RuntimeError("no memory state was stored at the start of the rollout (add() was never called)")
        if self._rows is None:
            self._rows = self._prepare_rows()
        n_envs = self.n_envs  # type: ignore[attr-defined]
        rows = envs_per_minibatch(batch_size, self.buffer_size, n_envs)  # type: ignore[attr-defined]
        order = th.as_tensor(np.random.permutation(n_envs), device=self.device)  # type: ignore[attr-defined]
        for start in range(0, n_envs, rows):
            yield self._get_samples(order[start : start + rows])

    def _get_samples(self, envs: th.Tensor) -> RecurrentRolloutBufferSamples:  # type: ignore[override]
        """The rows of ``envs`` (an index tensor), flattened env-major to ``[len(envs) * n_steps, ...]``."""
        n = len(envs) * self.buffer_size  # type: ignore[attr-defined]

        def take(t: th.Tensor) -> th.Tensor:
            return t[envs].reshape(n, *t.shape[2:])

        r = self._rows  # set by get()
        pi, vf = self.initial_states.pi, self.initial_states.vf  # type: ignore[union-attr]
        state_envs = envs.to(pi.device)
        pi_rows = pi[state_envs]
        vf_rows = None if vf is None else (pi_rows if vf is pi else vf[state_envs])
        if isinstance(r["observations"], dict):
            obs = {key: take(value) for key, value in r["observations"].items()}
        else:
            obs = take(r["observations"])
        samples_class = RecurrentDictRolloutBufferSamples if isinstance(obs, dict) else RecurrentRolloutBufferSamples
        return samples_class(
            observations=obs,
            actions=take(r["actions"]),
            old_values=take(r["values"]).flatten(),
            old_log_prob=take(r["log_probs"]).flatten(),
            advantages=take(r["advantages"]).flatten(),
            returns=take(r["returns"]).flatten(),
            lstm_states=RNNStates(pi_rows, vf_rows),
            episode_starts=take(r["episode_starts"]).flatten(),
            mask=th.ones(n, device=self.device),  # type: ignore[attr-defined]  # no padding: every row is full
        )


class HAMRolloutBuffer(_EnvRowsMixin, RecurrentRolloutBuffer):
    """
    Rollout buffer for HAMRecurrentPPO (Box, Discrete, ... observations).

    :param buffer_size: steps per env per rollout (``n_steps``)
    :param observation_space: Observation space
    :param action_space: Action space
    :param device: PyTorch device
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param gamma: Discount factor
    :param n_envs: Number of parallel environments
    """

    _storage_class = RolloutBuffer


class HAMDictRolloutBuffer(_EnvRowsMixin, RecurrentDictRolloutBuffer):
    """
    Rollout buffer for HAMRecurrentPPO with Dict observations; same parameters as :class:`HAMRolloutBuffer`.
    """

    _storage_class = DictRolloutBuffer
