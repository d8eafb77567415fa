"""In-process vector env with same-step autoreset and the agent's input features.

popgym envs step in microseconds, so subprocess vectorisation only adds overhead (notes §5.3: 7-8x slower);
this is a plain Python loop over the envs, which also lets us control autoreset. The recall tasks' envs, whose step
is a lookup in an episode drawn at reset, step together as arrays instead (``recall_stepper.py``), with the same
results.

Autoreset: when env b terminates or truncates at step t, its episode statistics are recorded, it is reset in the
same call, and the features returned for b are those of the reset observation with ``starts[b] = True``. There is
no "dead" transition (gymnasium 1.x vector envs default to NEXT_STEP autoreset, whose step after a done returns
the reset observation with reward 0; we never produce that step). A truncated episode (a time limit, not a terminal
state) also ends there, and its last observation's features stay readable in ``final_features`` (where
``truncated`` is True) so that the trainer can bootstrap the value of the state the time limit cut off.

Infos: ``infos[b]`` is the info dict that env b returned with its current observation (the one whose features
``reset``/``step`` returned last): after an autoreset, the reset's info. The recall envs put ``informative`` there
(``ham_rl.routing`` reads it). The info of an episode's last step, which the autoreset replaces, is in
``final_infos[b]`` after the ``step`` that ended it (``is_success`` there: the T-Maze and MiniGrid envs).

Features per env (``[B, feature_dim]`` float32): the encoded observation, then (switchable) the one-hot previous
action and the previous reward; both are zero at the first step of an episode.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from ham_rl.envs.encoding import SpaceEncoder
from ham_rl.envs.env_state import EnvStateError, encode_envs, restore
from ham_rl.envs.recall_stepper import RecallStepper
from ham_rl.envs.registry import make_env, resolve_env_id

__all__ = ["VecEnv"]


class VecEnv:
    """``num_envs`` copies of one env, stepped in a loop.

    :param env_id: alias or gymnasium id (see :func:`ham_rl.envs.resolve_env_id`)
    :param num_envs: number of envs (>= 1)
    :param seed: env i is reset with ``seed + i`` the first time; later resets continue each env's own RNG
    :param prev_action: append the one-hot previous action to the features
    :param prev_reward: append the previous reward to the features
    """

    def __init__(self, env_id: str, num_envs: int, seed: int = 0, prev_action: bool = True, prev_reward: bool = True):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_id = resolve_env_id(env_id)
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self.envs = [make_env(self.env_id) for _ in range(self.num_envs)]
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self.obs_encoder = SpaceEncoder(self.observation_space)
        self.prev_action = bool(prev_action)
        self.prev_reward = bool(prev_reward)
        self.act_encoder = SpaceEncoder(self.action_space) if self.prev_action else None
        self.obs_dim = self.obs_encoder.dim
        self.act_dim = self.act_encoder.dim if self.act_encoder else 0
        self.feature_dim = self.obs_dim + self.act_dim + int(self.prev_reward)
        b = self.num_envs
        self._features = np.zeros((b, self.feature_dim), dtype=np.float32)
        self._starts = np.ones(b, dtype=bool)
        self._ep_return = np.zeros(b, dtype=np.float64)
        self._ep_length = np.zeros(b, dtype=np.int64)
        self._obs: list[Any] = [None] * b
        self._actions: list[Any] = [None] * b
        self._rewards = np.zeros(b, dtype=np.float32)
        #: after each step: which envs were cut off by truncation (not terminated), and the features of their
        #: last observation (before the reset), valid where ``truncated`` is True
        self.truncated = np.zeros(b, dtype=bool)
        self.final_features = np.zeros((b, self.feature_dim), dtype=np.float32)
        #: the info dict of each env's current observation (a new list every reset/step; ``{}`` before the first
        #: reset and after a checkpoint restore, which does not save infos)
        self.infos: list[dict] = [{} for _ in range(b)]
        #: env index -> the info of its episode's last step, for the episodes the last ``step`` ended
        self.final_infos: dict[int, dict] = {}
        self._stepper = RecallStepper.of(self.envs)  # None unless every env is a recall task's

    # ------------------------------------------------------------------------------------------------------------
    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        """Reset every env (env i with ``seed + i``).

        :return: features ``[B, feature_dim]`` float32 and starts ``[B]`` bool (all True)
        """
        infos: list[dict] = [{}] * self.num_envs
        for i, env in enumerate(self.envs):
            self._obs[i], infos[i] = env.reset(seed=self.seed + i)
        self.infos, self.final_infos = infos, {}
        if self._stepper is not None:
            self._stepper.reload()
        self._starts[:] = True
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._rewards[:] = 0.0
        return self._make_features(), self._starts.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, float, int]]]:
        """Step every env with its action and autoreset finished ones in the same call.

        :param actions: ``[B]`` ints (Discrete), ``[B, k]`` ints (MultiDiscrete) or ``[B, *shape]`` floats (Box)
        :return: features ``[B, feature_dim]`` of the next observations, rewards ``[B]`` float32, dones ``[B]``
            bool (the episode ended with this action; the next features start a new episode, so they equal the
            next ``starts``), and finished episodes as ``(env_index, return, length)``
        """
        act_list = actions.tolist()
        finished = []
        dones = np.zeros(self.num_envs, dtype=bool)
        self.truncated[:] = False
        final_obs: dict[int, Any] = {}
        self.final_infos = {}
        if self._stepper is not None:  # every env a recall task's: one array step, then the resets one by one
            self._obs, rewards, dones[:], infos = self._stepper.step(actions)
            ended = np.flatnonzero(dones).tolist()
            for i in ended:
                self.final_infos[i] = infos[i]
                self._obs[i], infos[i] = self.envs[i].reset()
                self._stepper.load(i)
        else:
            infos = [{}] * self.num_envs
            rewards = [0.0] * self.num_envs
            for i, env in enumerate(self.envs):
                obs, r, term, trunc, infos[i] = env.step(act_list[i])
                rewards[i] = float(r)
                if term or trunc:
                    dones[i] = True
                    self.final_infos[i] = infos[i]
                    if trunc and not term:
                        self.truncated[i] = True
                        final_obs[i] = obs
                    obs, infos[i] = env.reset()
                self._obs[i] = obs
            ended = np.flatnonzero(dones).tolist()
        # the episode counters once for all envs (per env, three numpy scalar updates cost more than its step)
        self._rewards[:] = rewards
        self._ep_return += rewards
        self._ep_length += 1
        if ended:
            for i in ended:
                finished.append((i, float(self._ep_return[i]), int(self._ep_length[i])))
            self._ep_return[ended] = 0.0
            self._ep_length[ended] = 0
        self.infos = infos
        self._actions = act_list
        rewards = self._rewards.copy()
        if final_obs:  # the cut-off episodes' last observations, as if no reset had happened
            as_if_running = [final_obs.get(i, o) for i, o in enumerate(self._obs)]
            self.final_features[:] = self._make_features(actions, as_if_running, np.zeros(self.num_envs, dtype=bool))
        self._starts = dones
        return self._make_features(actions), rewards, dones.copy(), finished

    def _make_features(
        self, actions: np.ndarray | None = None, obs: list | None = None, starts: np.ndarray | None = None
    ) -> np.ndarray:
        """Features of ``obs`` (default: the current observations) after ``actions``; zero extras where ``starts``."""
        obs = self._obs if obs is None else obs
        starts = self._starts if starts is None else starts
        f = self._features
        self.obs_encoder(obs, out=f[:, : self.obs_dim])
        col = self.obs_dim
        if self.act_encoder is not None:
            if actions is None:
                f[:, col : col + self.act_dim] = 0.0
            else:
                self.act_encoder(self._encodable_actions(actions), out=f[:, col : col + self.act_dim])
            col += self.act_dim
        if self.prev_reward:
            f[:, col] = self._rewards
        # a new episode has no previous action or reward
        if self.feature_dim > self.obs_dim:
            f[starts, self.obs_dim :] = 0.0
        return f.copy()

    def _encodable_actions(self, actions: np.ndarray) -> np.ndarray | list:
        # the encoder takes an array as the list of its rows: no list of numpy scalars to convert back every step
        if isinstance(self.action_space, spaces.Box):
            return np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)
        if isinstance(self.action_space, (spaces.Discrete, spaces.MultiDiscrete)):
            return np.asarray(actions)
        return list(np.asarray(actions))

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly, as plain data (no pickles): each env's state (``env_state.encode``),
        its current observation and the per-env counters. An env whose state has no plain-data form is stored as
        ``None`` with the reason; loading restarts it."""
        if self._stepper is not None:
            self._stepper.sync()  # the envs' step counters, which the array steps keep
        return {
            "env_id": self.env_id,
            "num_envs": self.num_envs,
            "seed": self.seed,
            **encode_envs(self.envs, list(self._obs)),
            **{name: torch.from_numpy(getattr(self, f"_{name}").copy()) for name in self.COUNTERS},
        }

    #: per-env arrays saved with the env states (as tensors)
    COUNTERS = ("features", "starts", "ep_return", "ep_length", "rewards")

    def load_state_dict(self, data: dict) -> list[int]:
        """Restore what :meth:`state_dict` saved into this VecEnv's freshly built envs (same env id and number).

        :return: the envs that could not be restored and were restarted from a new episode instead (with a warning)
        """
        if data["env_id"] != self.env_id or data["num_envs"] != self.num_envs:
            raise ValueError(
                f"env state is for {data['env_id']} x{data['num_envs']}, this VecEnv is {self.env_id} x{self.num_envs}"
            )
        for name in self.COUNTERS:
            setattr(self, f"_{name}", data[name].numpy().copy())
        self.infos = [{} for _ in range(self.num_envs)]
        restarted = []
        for i, (env_data, obs_data) in enumerate(zip(data["envs"], data["obs"], strict=True)):
            reason = data["unsaved_reasons"][i]
            if env_data is not None:
                try:
                    restore(self.envs[i], env_data)
                    self._obs[i] = restore(self._obs[i], obs_data)
                    continue
                except EnvStateError as e:
                    self.envs[i] = make_env(self.env_id)  # a half-restored env is not a state to continue from
                    reason = str(e)
            self._restart(i, reason)
            restarted.append(i)
        self._stepper = RecallStepper.of(self.envs)  # an env may have been rebuilt; takes the restored episodes
        return restarted

    def _restart(self, i: int, reason: str) -> None:
        """Start env i on a new episode from a seed of its own (its saved state could not be restored)."""
        seed = self._restart_seed(i)
        warnings.warn(
            f"{self.env_id} env {self._index_in_run(i)} could not be restored from the checkpoint ({reason}); it starts a "
            f"new episode from seed {seed}, so this resumed run does not continue exactly",
            stacklevel=3,
        )
        self._obs[i], self.infos[i] = self.envs[i].reset(seed=seed)
        self._starts[i] = True
        self._ep_return[i] = 0.0
        self._ep_length[i] = 0
        self._rewards[i] = 0.0
        self._features[i] = 0.0
        self.obs_encoder([self._obs[i]], out=self._features[i : i + 1, : self.obs_dim])

    def _restart_seed(self, i: int) -> int:
        """The seed env i restarts from: not a seed any env of this run was reset with at the start."""
        return self.seed + self.num_envs + i

    def _index_in_run(self, i: int) -> int:
        """Env i's index among the run's envs (a worker process's group holds a slice of them)."""
        return i

    def current_features(self) -> tuple[np.ndarray, np.ndarray]:
        """The features and starts that the last ``reset``/``step`` returned (or a restore set)."""
        return self._features.copy(), self._starts.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()
