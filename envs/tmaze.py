"""Passive T-Maze (Ni et al. 2023, "When do Transformers shine in RL? Decoupling memory from credit assignment"),
reimplemented from the paper's description, with a waiting room of random length before the cue.

The agent stands at the foot of a corridor of ``corridor_length`` cells and is shown, once, which arm of the T at
the far end is the goal (up or down). It then walks the corridor; at the junction its action is scored: +1 for the
goal arm, -1 for the other arm or for no arm (forward, back). A step in the corridor that does not move forward
costs ``1 / corridor_length``, and the episode ends ``corridor_length + 1`` steps after the cue, so the walk is
learned from dense feedback and only the junction's choice needs memory: the memory length is the corridor's, the
credit-assignment length one step. Running out of time before the junction also scores -1. A policy that walks and
guesses scores 0 (success rate 0.5); every other policy without memory scores less.

The paper scores a wrong arm 0 and says nothing of no arm or of running out of time; both gave PPO a way around the
junction that memory never beats early in training: with 0 for a wrong arm and for no arm, a policy that has learned
to walk forward keeps walking into the junction's wall (ham at L = 50: return 0 for 600k steps); with -1 for them
but nothing for running out of time, it wastes one corridor step and never reaches the junction (-1/L: ham at
L = 50, 1M steps).

The paper shows the cue at step 0. Here a waiting room of a random number of steps in ``[0, preamble]`` comes first
(observation "waiting", actions without effect or cost), so the cue falls at an unknown step and a memory that
keeps the episode's first step, or one that keys on the clock, does not solve the task by that alone.

Observation ``[goal up, goal down, corridor, junction, waiting]`` (one-hot; the goal entries only at the cue step).
Actions: 0 forward, 1 up, 2 down, 3 back (one cell towards the foot). ``info`` says what the observation just returned
is: ``informative`` (the cue), ``question`` (the junction) and ``step`` (its index in the episode); the episode's last
step adds ``is_success`` (the goal arm was chosen; Stable-Baselines3's key), the paper's success rate.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ham_rl.envs.recall_tasks import _check_int

__all__ = ["PRESETS", "TMazeEnv", "register_tmaze_envs"]

FORWARD, UP, DOWN, BACK = range(4)


class TMazeEnv(gym.Env):
    """Passive T-Maze: remember the goal arm shown at the foot of a ``corridor_length``-cell corridor."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, corridor_length: int = 50, preamble: int = 0):
        corridor_length = _check_int("corridor_length", corridor_length, 1)
        if isinstance(preamble, bool) or not isinstance(preamble, int) or preamble < 0:
            raise ValueError(f"`preamble` must be an int >= 0 (the longest wait before the cue), got {preamble!r}")
        self.corridor_length, self.preamble = corridor_length, preamble
        self.observation_space = spaces.Box(0.0, 1.0, shape=(5,), dtype=np.float32)
        self.action_space = spaces.Discrete(4)
        self._wait = self._t = self._cell = self._goal = 0

    @property
    def max_episode_steps(self) -> int:
        """The longest episode: the longest wait, the cue step and the walk."""
        return self.preamble + self.corridor_length + 1

    def _obs(self) -> np.ndarray:
        obs = np.zeros(5, np.float32)
        if self._t < self._wait:
            obs[4] = 1.0
        elif self._t == self._wait:
            obs[self._goal] = 1.0  # the cue, at the foot of the corridor
        elif self._cell == self.corridor_length:
            obs[3] = 1.0
        else:
            obs[2] = 1.0
        return obs

    def _info(self) -> dict[str, Any]:
        at_junction = self._wait < self._t <= self._wait + self.corridor_length and self._cell == self.corridor_length
        return {"informative": self._t == self._wait, "question": at_junction, "step": self._t}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._wait = int(self.np_random.integers(self.preamble + 1))
        self._goal = int(self.np_random.integers(2))  # 0: up, 1: down
        self._t, self._cell = 0, 0
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._t > self._wait + self.corridor_length:
            raise RuntimeError("step() called after the episode terminated; call reset() first")
        action, reward = int(action), 0.0
        if self._t >= self._wait:  # waiting steps have no effect and no cost
            if self._cell == self.corridor_length:  # at the junction: the choice ends the episode
                self._t += 1
                success = action == (UP if self._goal == 0 else DOWN)
                return np.zeros(5, np.float32), 1.0 if success else -1.0, True, False, {**self._info(), "is_success": success}
            if action == FORWARD:
                self._cell += 1
            else:
                reward = -1.0 / self.corridor_length
                if action == BACK:
                    self._cell = max(self._cell - 1, 0)
        self._t += 1
        # out of time: the walk has one step per cell, so an agent that dawdled has no step left to choose an arm
        terminated = self._t > self._wait + self.corridor_length
        if not terminated:
            return self._obs(), reward, False, False, self._info()
        # as bad as a wrong arm, so that avoiding the junction never pays
        return np.zeros(5, np.float32), reward - 1.0, True, False, {**self._info(), "is_success": False}


#: alias -> (gymnasium id, kwargs); ``configs/env/<alias>.yaml`` picks one
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    f"tmaze-l{n}": (f"ham_rl/TMaze{n}-v0", dict(corridor_length=n, preamble=max(n // 5, 10)))
    for n in (50, 100, 200, 500, 1000)
}


def register_tmaze_envs() -> None:
    """Register every preset's gymnasium id (idempotent)."""
    for env_id, kwargs in PRESETS.values():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{__name__}:TMazeEnv", kwargs=kwargs)


register_tmaze_envs()
