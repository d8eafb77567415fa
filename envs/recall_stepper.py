"""The recall tasks' envs stepped together as numpy arrays: ``VecEnv``'s path for them.

A recall env serves an episode drawn at its reset (``recall_tasks._RecallEnv``): a step is a lookup, which costs less
than the Python call around it, so ``VecEnv``'s loop over 32 envs spent more on calls than on the tasks. Here their
episodes are kept stacked, ``[B, T, ...]``, and a step of all of them is a few array operations with the same
observations, rewards, terminations and infos as each env's ``step``. Resets still go through each env (its own RNG
draws the next episode), after which ``load`` copies the new episode in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.wrappers import OrderEnforcing

from ham_rl.envs.recall_tasks import _RecallEnv

__all__ = ["RecallStepper"]


class RecallStepper:
    """Steps ``envs`` (each a recall env behind gymnasium's ``OrderEnforcing`` alone, all of one task) as arrays.

    The envs' step counters are this object's while it steps them: ``sync`` writes them back (``VecEnv`` does before it
    saves the envs), ``reload`` reads everything back in (after a reset or a restore).
    """

    def __init__(self, envs: list):
        self.envs = [env.env for env in envs]  # the recall envs themselves
        first = self.envs[0]
        self.right, self.wrong = first._reward_right, first._reward_wrong
        B, T, D = len(envs), first.episode_len, first.observation_space.shape[0]
        self.rows = np.arange(B)
        self.obs = np.zeros((B, T, D), dtype=np.float32)
        self.answers = np.zeros((B, T), dtype=np.int64)
        self.informative = np.zeros((B, T), dtype=bool)
        self.t = np.zeros(B, dtype=np.int64)
        self.reload()

    @classmethod
    def of(cls, envs: list) -> RecallStepper | None:
        """A stepper for ``envs`` where every one is a recall env of the same task and episode shape, else None."""
        if not envs or not all(type(e) is OrderEnforcing and type(e.env) in _RECALL_TYPES for e in envs):
            return None
        inner = [e.env for e in envs]
        first = inner[0]
        alike = all(
            type(e) is type(first)
            and e.episode_len == first.episode_len
            and e.observation_space.shape == first.observation_space.shape
            and (e._reward_right, e._reward_wrong) == (first._reward_right, first._reward_wrong)
            for e in inner
        )
        return cls(envs) if alike else None

    def load(self, i: int) -> None:
        """Take env i's current episode and step counter."""
        env = self.envs[i]
        self.obs[i] = env._episode.obs[0]
        self.answers[i] = env._episode.answers[0]
        self.informative[i] = env._episode.informative[0]
        self.t[i] = env._t

    def reload(self) -> None:
        """Take every env's episode and step counter."""
        for i in range(len(self.envs)):
            self.load(i)

    def sync(self) -> None:
        """Write the step counters back into the envs."""
        for env, t in zip(self.envs, self.t.tolist(), strict=True):
            env._t = t

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """``_RecallEnv.step`` of every env with its action: ``(obs [B, D], rewards [B] float64, terminated [B],
        infos)``."""
        T, rows = self.obs.shape[1], self.rows
        if (self.t >= T).any():
            raise RuntimeError("step() called after the episode terminated; call reset() first")
        answer = self.answers[rows, self.t]
        actions = np.asarray(actions).reshape(len(rows))
        rewards = np.where(answer < 0, 0.0, np.where(actions == answer, self.right, self.wrong))
        self.t += 1
        terminated = self.t == T
        at = np.minimum(self.t, T - 1)
        obs = self.obs[rows, at]
        obs[terminated] = 0.0
        informative = (self.informative[rows, at] & ~terminated).tolist()
        question = ((self.answers[rows, at] >= 0) & ~terminated).tolist()
        infos = [
            {"informative": i, "question": q, "step": s}
            for i, q, s in zip(informative, question, self.t.tolist(), strict=True)
        ]
        return obs, rewards, terminated, infos


_RECALL_TYPES = tuple(_RecallEnv.__subclasses__())  # the tasks defined here; a subclass elsewhere may change step()
