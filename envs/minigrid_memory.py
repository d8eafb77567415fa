"""MiniGrid's memory tasks (the ``minigrid`` package) with an encoder for their symbolic 7×7×3 view.

In ``MiniGrid-Memory*`` the agent sees an object in a small room, walks down a corridor and must step next to the
matching one of two objects at its end (reward ``1 - 0.9 * steps / max_steps``; 0 for the wrong one or running out
of time; ``info["is_success"]`` at the episode's end says which). ``info["informative"]`` at every step says whether
the object to remember is in view, so ``ham_rl.evaluate`` can say whether the cache kept such a step. The agent
starts facing east, away from the object it must remember (in MemoryS13Random it is in view at step 0 in about 14% of
episodes), so it has to turn round and look first. The view is 7×7 cells of (object, colour, state) indices;
:class:`OneHotView` turns each index into a one-hot, adds the one-hot facing direction and drops the mission string
(the same sentence in every episode of these tasks), so the observation is a flat binary vector the agent's linear
encoder reads without confusing index arithmetic with similarity (index 5, a key, is not "between" a door and a ball).

``ham_rl/MiniGrid-MemoryS13Random-v0`` and the others are the minigrid ids with this wrapper; ``minigrid`` is a
dependency of the ``minigrid`` extra (``pip install "ham_rl[minigrid]"``). ``ham_rl/MiniGrid-MemoryS13Random-Nav-v0``
and the other ``-Nav`` ids keep only the three actions that move the agent (turn left, turn right, forward), as
recurrent-PPO baselines of this task do (MarcoMeter/recurrent-ppo-truncated-bptt): the other four (pick up, drop,
toggle, done) change nothing in these rooms, and a policy that samples them turns round to look at the object less
often. The task, its rewards and its optimum are the same.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = [
    "MINIGRID_MEMORY_TASKS",
    "NavigationActions",
    "OneHotView",
    "make_minigrid_memory",
    "nav_id",
    "register_minigrid_envs",
]

#: the minigrid memory tasks wrapped here (ham_rl/<id> for each)
MINIGRID_MEMORY_TASKS = (
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-MemoryS9-v0",
    "MiniGrid-MemoryS11-v0",
    "MiniGrid-MemoryS13-v0",
    "MiniGrid-MemoryS13Random-v0",
    "MiniGrid-MemoryS17Random-v0",
)


def nav_id(task: str) -> str:
    """``MiniGrid-MemoryS13Random-v0`` -> ``MiniGrid-MemoryS13Random-Nav-v0`` (the three-action variant's name)."""
    return task.removesuffix("-v0") + "-Nav-v0"


class NavigationActions(gym.ActionWrapper):
    """Only MiniGrid's first three actions: ``0`` turn left, ``1`` turn right, ``2`` forward.

    The indices are minigrid's own, so the episode that :class:`OneHotView` replays for a checkpoint is the same."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.action_space = spaces.Discrete(3)

    def action(self, action: Any) -> int:
        """The minigrid action of the same index."""
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (left), 1 (right) or 2 (forward), got {action!r}")
        return int(action)


class OneHotView(gym.ObservationWrapper):
    """MiniGrid's ``{"image": [7, 7, 3] indices, "direction", "mission"}`` -> one flat 0/1 vector.

    ``[one-hot object (11) | one-hot colour (6) | one-hot state (3)]`` for each of the 7×7 cells, then the facing
    direction (4): 984 floats for the default view size.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

        image = env.observation_space["image"]
        self._sizes = np.array([len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX)])
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])
        self._object_index = OBJECT_TO_IDX
        self._cells = int(np.prod(image.shape[:2]))
        self._per_cell = int(self._sizes.sum())
        n = self._cells * self._per_cell + 4
        self.observation_space = spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)

    # -- checkpoints: minigrid builds its grid of objects at every reset, which no field-by-field restore can
    # rebuild, so the state is the episode itself: how its reset drew the layout and the actions since, replayed
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the minigrid env, remembering how (for :meth:`plain_state`)."""
        rng = None if seed is not None else self.unwrapped.np_random.bit_generator.state
        self._episode = {"seed": seed, "rng": rng, "actions": []}
        raw, info = self.env.reset(seed=seed, options=options)
        return self.observation(raw), {**info, "informative": self._sees_cue(raw["image"])}

    def step(self, action: Any):
        """One minigrid step, remembered for :meth:`plain_state`; its info says ``informative``, and the episode's last
        step's ``is_success``."""
        self._episode["actions"].append(int(action))
        raw, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "informative": self._sees_cue(raw["image"])}
        if terminated or truncated:  # minigrid rewards only the matching object, with 1 - 0.9 * steps / max_steps > 0
            info["is_success"] = bool(reward > 0)
        return self.observation(raw), reward, terminated, truncated, info

    def _sees_cue(self, image: np.ndarray) -> bool:
        """Whether the view ``image`` shows the object to remember (the start room's, at its west wall)."""
        env = self.unwrapped
        x, y = 1, env.height // 2 - 1  # where minigrid's MemoryEnv puts it
        at = env.relative_coords(x, y)
        return at is not None and int(image[at[0], at[1], 0]) == self._object_index[env.grid.get(x, y).type]

    def plain_state(self) -> dict[str, Any]:
        """The episode so far as plain data: the reset's seed or generator state, and the actions since."""
        episode = getattr(self, "_episode", None)
        if episode is None:
            return {"seed": None, "rng": None, "actions": None}  # never reset
        return {**episode, "actions": list(episode["actions"])}

    def load_plain_state(self, data: dict[str, Any]) -> None:
        """Put this (rebuilt) env into the state :meth:`plain_state` described, by replaying the episode."""
        if data["actions"] is None:
            return
        if data["seed"] is None:
            self.unwrapped.np_random.bit_generator.state = data["rng"]
        self.reset(seed=data["seed"])
        for action in data["actions"]:
            self.step(action)

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        """The one-hot encoding of one MiniGrid observation."""
        idx = np.asarray(observation["image"], dtype=np.int64).reshape(self._cells, 3)
        if (idx >= self._sizes).any():
            raise ValueError(f"MiniGrid view index out of range: max per channel {idx.max(0)}, sizes {self._sizes}")
        out = np.zeros(self.observation_space.shape, np.float32)
        cells = out[:-4].reshape(self._cells, self._per_cell)
        cells[np.arange(self._cells)[:, None], self._offsets + idx] = 1.0
        out[-4 + int(observation["direction"])] = 1.0
        return out


def make_minigrid_memory(task: str, navigation_only: bool = False, **kwargs: Any) -> gym.Env:
    """The minigrid env ``task`` (one of ``MINIGRID_MEMORY_TASKS``) inside :class:`OneHotView`, with only
    :class:`NavigationActions` when ``navigation_only``."""
    if task not in MINIGRID_MEMORY_TASKS:
        raise ValueError(f"`task` must be one of {', '.join(MINIGRID_MEMORY_TASKS)}, got {task!r}")
    try:
        import minigrid  # noqa: F401  (registers the MiniGrid-* ids)
    except ImportError as e:
        raise ImportError(f'{task} needs the minigrid package: pip install "ham_rl[minigrid]" ({e})') from e
    env = OneHotView(gym.make(task, **kwargs))
    return NavigationActions(env) if navigation_only else env


def register_minigrid_envs() -> None:
    """Register ``ham_rl/<task>`` and ``ham_rl/<task>-Nav`` for every wrapped task (idempotent; minigrid is imported
    only when one is made)."""
    for task in MINIGRID_MEMORY_TASKS:
        for env_id, nav in ((f"ham_rl/{task}", False), (f"ham_rl/{nav_id(task)}", True)):
            if env_id not in gym.registry:
                kwargs = dict(task=task, navigation_only=nav)
                gym.register(env_id, entry_point=f"{__name__}:make_minigrid_memory", kwargs=kwargs)


register_minigrid_envs()
