"""Instrumented recall tasks: cue recall and associative recall (MQAR-style), as gymnasium envs and numpy batches.

Both tasks are generated a whole episode at a time by the batch generators below (``cue_recall_batch``,
``associative_recall_batch``); the gymnasium envs draw one episode with their own RNG at ``reset`` and serve it a
step at a time, and ``bench/recall.py`` draws 32 at once from the same functions, so both see the same task.

An episode is a fixed number of observations. The agent acts on every one; only actions on question steps are
rewarded, and the episode terminates after the last question. ``info`` says what the observation just returned
is: ``informative`` (the cue, or a (key, value) pair: the only steps a question can be answered from),
``question``, and ``step`` (its index in the episode).

Cue recall: observation ``[cue one-hot (num_cues) | question flag | distractor one-hot (distractor_width)]``,
``delay + 2`` steps; the cue at a step drawn uniformly from ``[0, cue_steps)`` (``cue_steps=1``: step 0), the
question at the last step, distractors everywhere else. Reward +1 right, -1 wrong, so a policy that guesses
scores ``(1/k)(+1) + (1 - 1/k)(-1) = (2 - k)/k`` (k = num_cues; -0.5 for 4 cues, 0 for 2).
With one cue in every episode an agent need not store the last of the k cues: "none of the others" names it, so
a trained agent keeps k - 1 of them and the cache recall of a router cannot reach 1. ``blank_fraction`` > 0 shows
no cue in that fraction of episodes, whose answer is an extra action k ("no cue"): every cue must then be kept,
and the informative steps are exactly the ones the answer needs (k + 1 actions; chance ``(1 - k)/(k + 1)``).

Associative recall: observation ``[key one-hot (num_keys) | value one-hot (num_values) | question flag |
distractor one-hot]``; ``num_pairs`` distinct keys with values (drawn with replacement) at random distinct steps
of the first ``context_len`` steps, distractors elsewhere in it, then ``num_questions`` question steps, each
showing one of the stored keys. Reward ``1/num_questions`` per right answer, 0 per wrong one: the return is the
fraction answered right, comparable across Q, and a guessing policy scores ``1/num_values`` (a -1 per wrong answer
would put chance at ``2/V - 1``, which moves with V and hides how far above it an agent is).

Distractors: ``periodic`` cycles through the distractor symbols (random phase per episode), predictable after one
period; ``random`` draws a new symbol every step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = [
    "DISTRACTORS",
    "PRESETS",
    "AssociativeRecallEnv",
    "CueRecallEnv",
    "RecallBatch",
    "associative_recall_batch",
    "chance_return",
    "cue_recall_batch",
    "novelty_stream",
    "register_recall_envs",
]

DISTRACTORS = ("periodic", "random")


class RecallBatch(NamedTuple):
    """``n`` whole episodes: observations, answers and which steps carry the information."""

    obs: np.ndarray  # [n, T, obs_dim] float32
    answers: np.ndarray  # [n, T] int64, the right action at question steps, -1 elsewhere
    informative: np.ndarray  # [n, T] bool, the steps a question can be answered from


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, or a one-line ValueError naming it."""
    bad = isinstance(value, bool) or not isinstance(value, (int, np.integer))
    if bad or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an int {allowed}, got {value!r}")
    return int(value)


def _check_distractors(distractors: Any) -> str:
    if distractors not in DISTRACTORS:
        raise ValueError(f"`distractors` must be one of {', '.join(DISTRACTORS)}, got {distractors!r}")
    return distractors


def _distractor_symbols(rng: np.random.Generator, n: int, steps: int, kind: str, width: int) -> np.ndarray:
    """``[n, steps]`` distractor symbol per step."""
    if kind == "periodic":
        phase = rng.integers(width, size=(n, 1))
        return (np.arange(steps)[None, :] + phase) % width
    return rng.integers(width, size=(n, steps))


def cue_recall_batch(
    rng: np.random.Generator,
    n: int,
    num_cues: int = 4,
    delay: int = 50,
    cue_steps: int = 1,
    distractors: str = "periodic",
    distractor_width: int = 8,
    blank_fraction: float = 0.0,
) -> RecallBatch:
    """``n`` cue-recall episodes of ``delay + 2`` steps (see the module docstring)."""
    bad = isinstance(blank_fraction, bool) or not isinstance(blank_fraction, (int, float))
    if bad or not 0.0 <= blank_fraction < 1.0:
        raise ValueError(f"`blank_fraction` must be a number in [0, 1), got {blank_fraction!r}")
    num_cues, delay = _check_int("num_cues", num_cues, 2), _check_int("delay", delay, 0)
    cue_steps = _check_int("cue_steps", cue_steps, 1, delay + 1)
    width, kind = _check_int("distractor_width", distractor_width, 1), _check_distractors(distractors)
    steps = delay + 2
    rows = np.arange(n)
    obs = np.zeros((n, steps, num_cues + 1 + width), dtype=np.float32)
    sym = _distractor_symbols(rng, n, steps - 1, kind, width)
    obs[rows[:, None], np.arange(steps - 1)[None, :], num_cues + 1 + sym] = 1.0
    cue = rng.integers(num_cues, size=n)
    cue_at = rng.integers(cue_steps, size=n)
    # Drawn for every n (even at 0) so that blank_fraction=0 gives the episodes of before it existed.
    shown = rng.random(n) >= blank_fraction if blank_fraction > 0 else np.ones(n, dtype=bool)
    obs[rows[shown], cue_at[shown]] = 0.0  # the cue replaces that step's distractor
    obs[rows[shown], cue_at[shown], cue[shown]] = 1.0
    obs[:, -1, num_cues] = 1.0
    answers = np.full((n, steps), -1, dtype=np.int64)
    answers[:, -1] = np.where(shown, cue, num_cues)
    informative = np.zeros((n, steps), dtype=bool)
    informative[rows[shown], cue_at[shown]] = True
    return RecallBatch(obs, answers, informative)


def associative_recall_batch(
    rng: np.random.Generator,
    n: int,
    num_pairs: int = 4,
    num_keys: int = 32,
    num_values: int = 8,
    context_len: int = 64,
    num_questions: int = 8,
    distractors: str = "periodic",
    distractor_width: int = 8,
) -> RecallBatch:
    """``n`` associative-recall episodes of ``context_len + num_questions`` steps (see the module docstring)."""
    num_keys, num_values = _check_int("num_keys", num_keys, 1), _check_int("num_values", num_values, 2)
    num_pairs = _check_int("num_pairs", num_pairs, 1, num_keys)
    context_len = _check_int("context_len", context_len, num_pairs)
    num_questions = _check_int("num_questions", num_questions, 1)
    width, kind = _check_int("distractor_width", distractor_width, 1), _check_distractors(distractors)
    steps = context_len + num_questions
    vflag, qflag, dist = num_keys, num_keys + num_values, num_keys + num_values + 1
    rows = np.arange(n)[:, None]
    obs = np.zeros((n, steps, dist + width), dtype=np.float32)
    sym = _distractor_symbols(rng, n, context_len, kind, width)
    obs[rows, np.arange(context_len)[None, :], dist + sym] = 1.0
    # distinct keys and distinct pair steps per episode: the first num_pairs of a random permutation
    keys = np.argsort(rng.random((n, num_keys)), axis=1)[:, :num_pairs]
    values = rng.integers(num_values, size=(n, num_pairs))
    pair_at = np.argsort(rng.random((n, context_len)), axis=1)[:, :num_pairs]
    obs[rows, pair_at] = 0.0
    obs[rows, pair_at, keys] = 1.0
    obs[rows, pair_at, vflag + values] = 1.0
    asked = rng.integers(num_pairs, size=(n, num_questions))
    q_steps = np.arange(context_len, steps)[None, :]
    obs[rows, q_steps, np.take_along_axis(keys, asked, axis=1)] = 1.0
    obs[:, context_len:, qflag] = 1.0
    answers = np.full((n, steps), -1, dtype=np.int64)
    answers[:, context_len:] = np.take_along_axis(values, asked, axis=1)
    informative = np.zeros((n, steps), dtype=bool)
    informative[rows, pair_at] = True
    return RecallBatch(obs, answers, informative)


def novelty_stream(
    rng: np.random.Generator,
    n: int,
    steps: int = 200,
    period: int = 8,
    vocab: int = 12,
    cue_steps: tuple[int, int] = (20, 100),
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` one-hot streams for router probes: symbols cycling with ``period`` (random phase), one new symbol (of the
    ``vocab - period`` others) at a step drawn from ``cue_steps`` (inclusive) -> ``(x [n, steps, vocab], cue step [n])``."""
    sym = (np.arange(steps)[None] + rng.integers(period, size=(n, 1))) % period
    cue_at = rng.integers(cue_steps[0], cue_steps[1] + 1, size=n)
    sym[np.arange(n), cue_at] = rng.integers(period, vocab, size=n)
    return np.eye(vocab, dtype=np.float32)[sym], cue_at


def chance_return(task: str, **kwargs: Any) -> float:
    """Expected episode return of a uniformly random policy on ``task`` ("cue" or "associative")."""
    if task == "cue":
        k = kwargs.get("num_cues", 4) + (1 if kwargs.get("blank_fraction", 0.0) > 0 else 0)
        return (2 - k) / k
    if task == "associative":
        return 1.0 / kwargs.get("num_values", 8)
    raise ValueError(f"`task` must be 'cue' or 'associative', got {task!r}")


class _RecallEnv(gym.Env):
    """One episode drawn at reset from a batch generator, served a step at a time."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, generate, kwargs: dict[str, Any], num_actions: int, reward_right: float, reward_wrong: float):
        self._generate, self._kwargs = generate, kwargs
        self._episode = generate(np.random.default_rng(0), 1, **kwargs)  # checks the parameters before any reset
        self.episode_len = self._episode.obs.shape[1]
        obs_dim = self._episode.obs.shape[2]
        self.observation_space = spaces.Box(0.0, 1.0, shape=(obs_dim,), dtype=np.float32)
        self.action_space = spaces.Discrete(num_actions)
        self._reward_right, self._reward_wrong = reward_right, reward_wrong
        self._t = 0

    def _info(self) -> dict[str, Any]:
        if self._t >= self.episode_len:
            return {"informative": False, "question": False, "step": self._t}
        return {
            "informative": bool(self._episode.informative[0, self._t]),
            "question": bool(self._episode.answers[0, self._t] >= 0),
            "step": self._t,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._episode = self._generate(self.np_random, 1, **self._kwargs)
        self._t = 0
        return self._episode.obs[0, 0].copy(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._t >= self.episode_len:
            raise RuntimeError("step() called after the episode terminated; call reset() first")
        answer = int(self._episode.answers[0, self._t])
        reward = 0.0 if answer < 0 else (self._reward_right if int(action) == answer else self._reward_wrong)
        self._t += 1
        terminated = self._t == self.episode_len
        obs = np.zeros(self.observation_space.shape, np.float32) if terminated else self._episode.obs[0, self._t].copy()
        return obs, reward, terminated, False, self._info()


class CueRecallEnv(_RecallEnv):
    """Name the cue (one of ``num_cues``, or "no cue" where ``blank_fraction`` > 0) shown once, ``delay`` steps or
    fewer before the question; +1 / -1."""

    def __init__(
        self,
        num_cues: int = 4,
        delay: int = 50,
        cue_steps: int = 1,
        distractors: str = "periodic",
        distractor_width: int = 8,
        blank_fraction: float = 0.0,
    ):
        kwargs = dict(num_cues=num_cues, delay=delay, cue_steps=cue_steps, distractors=distractors,
                      distractor_width=distractor_width, blank_fraction=blank_fraction)  # fmt: skip
        super().__init__(cue_recall_batch, kwargs, num_cues + (1 if blank_fraction > 0 else 0), 1.0, -1.0)


class AssociativeRecallEnv(_RecallEnv):
    """Answer the value of each asked key among ``num_pairs`` (key, value) pairs; 1/Q per right answer."""

    def __init__(
        self,
        num_pairs: int = 4,
        num_keys: int = 32,
        num_values: int = 8,
        context_len: int = 64,
        num_questions: int = 8,
        distractors: str = "periodic",
        distractor_width: int = 8,
    ):
        kwargs = dict(num_pairs=num_pairs, num_keys=num_keys, num_values=num_values, context_len=context_len,
                      num_questions=num_questions, distractors=distractors, distractor_width=distractor_width)  # fmt: skip
        super().__init__(associative_recall_batch, kwargs, num_values, 1.0, 0.0)
        self._reward_right = 1.0 / num_questions  # after the parameters were checked


_ENTRY = {"cue": f"{__name__}:CueRecallEnv", "associative": f"{__name__}:AssociativeRecallEnv"}

#: alias -> (gymnasium id, task, kwargs); ``configs/env/<alias>.yaml`` picks one. The env config has no kwargs
#: field (VecEnv calls ``gym.make(id)``), so every preset is a gymnasium id of its own.
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cue-recall": ("ham_rl/CueRecall-v0", "cue", {}),
    "associative-recall": ("ham_rl/AssociativeRecall-v0", "associative", {}),
    "cue-first-d50": ("ham_rl/CueRecallFirstD50-v0", "cue", dict(delay=50)),
    "cue-random-d50": ("ham_rl/CueRecallRandomD50-v0", "cue", dict(delay=50, cue_steps=25)),
    "cue-random-d50-noise": ("ham_rl/CueRecallRandomD50Noise-v0", "cue", dict(delay=50, cue_steps=25, distractors="random")),
    "cue-blank-d50": ("ham_rl/CueRecallBlankD50-v0", "cue", dict(delay=50, cue_steps=25, blank_fraction=0.2)),
    "cue-blank-d50-noise": (
        "ham_rl/CueRecallBlankD50Noise-v0",
        "cue",
        dict(delay=50, cue_steps=25, blank_fraction=0.2, distractors="random"),
    ),
    "cue-random-d200": ("ham_rl/CueRecallRandomD200-v0", "cue", dict(delay=200, cue_steps=100)),
    "cue-random-d1000": ("ham_rl/CueRecallRandomD1000-v0", "cue", dict(delay=1000, cue_steps=500)),
    "ar-2": ("ham_rl/AssociativeRecall2-v0", "associative", dict(num_pairs=2, context_len=32, num_questions=32)),
    "ar-4": ("ham_rl/AssociativeRecall4-v0", "associative", dict(num_pairs=4, context_len=64, num_questions=32)),
    "ar-8": ("ham_rl/AssociativeRecall8-v0", "associative", dict(num_pairs=8, context_len=128, num_questions=32)),
    "ar-16": ("ham_rl/AssociativeRecall16-v1", "associative", dict(num_pairs=16, context_len=256, num_questions=32)),
    # The first 16-pair layout (100 steps, 4 questions), kept so that issue 20's notes reproduce (all at chance in PPO).
    "ar-16-dense": ("ham_rl/AssociativeRecall16-v0", "associative", dict(num_pairs=16, context_len=100, num_questions=4)),
}


def register_recall_envs() -> None:
    """Register every preset's gymnasium id (idempotent)."""
    for env_id, task, kwargs in PRESETS.values():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=_ENTRY[task], kwargs=kwargs)


register_recall_envs()
