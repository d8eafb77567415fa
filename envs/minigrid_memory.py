"""MiniGrid's memory tasks (the ``minigrid`` package) with an encoder for their symbolic 7×7×3 view.

In ``MiniGrid-Memory*`` the agent sees an object in a small room, walks down a corridor and must step next to the
matching one of two objects at its end (reward ``1 - 0.9 * steps / max_steps``; 0 for the wrong one or running out
of time). The view is 7×7 cells of (object, colour, state) indices; :class:`OneHotView` turns each index into a
one-hot, adds the one-hot facing direction and drops the mission string (the same sentence in every episode of these
tasks), so the observation is a flat binary vector the agent's linear encoder reads without confusing index
arithmetic with similarity (index 5, a key, is not "between" a door and a ball).

``ham_rl/MiniGrid-MemoryS13Random-v0`` and the others are the minigrid ids with this wrapper; ``minigrid`` is a
dependency of the ``minigrid`` extra (``pip install "ham_rl[minigrid]"``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["MINIGRID_MEMORY_TASKS", "OneHotView", "make_minigrid_memory", "register_minigrid_envs"]

#: the minigrid memory tasks wrapped here (ham_rl/<id> for each)
MINIGRID_MEMORY_TASKS = (
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-MemoryS9-v0",
    "MiniGrid-MemoryS11-v0",
    "MiniGrid-MemoryS13-v0",
    "MiniGrid-MemoryS13Random-v0",
    "MiniGrid-MemoryS17Random-v0",
)


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
        self._cells = int(np.prod(image.shape[:2]))
        self._per_cell = int(self._sizes.sum())
        n = self._cells * self._per_cell + 4
        self.observation_space = spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)

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


def make_minigrid_memory(task: str, **kwargs: Any) -> gym.Env:
    """The minigrid env ``task`` (one of ``MINIGRID_MEMORY_TASKS``) inside :class:`OneHotView`."""
    if task not in MINIGRID_MEMORY_TASKS:
        raise ValueError(f"`task` must be one of {', '.join(MINIGRID_MEMORY_TASKS)}, got {task!r}")
    try:
        import minigrid  # noqa: F401  (registers the MiniGrid-* ids)
    except ImportError as e:
        raise ImportError(f'{task} needs the minigrid package: pip install "ham_rl[minigrid]" ({e})') from e
    return OneHotView(gym.make(task, **kwargs))


def register_minigrid_envs() -> None:
    """Register ``ham_rl/<task>`` for every wrapped task (idempotent; minigrid is imported only when one is made)."""
    for task in MINIGRID_MEMORY_TASKS:
        env_id = f"ham_rl/{task}"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{__name__}:make_minigrid_memory", kwargs=dict(task=task))


register_minigrid_envs()
