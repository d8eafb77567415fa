"""The recall tasks' envs stepped as arrays (``envs/recall_stepper.py``) give what each env's own ``step`` gives:
features, rewards, dones, finished episodes, infos and final infos, step after step across autoresets, and through a
saved and restored state."""

from __future__ import annotations

import numpy as np
import pytest

from ham_rl.envs import VecEnv
from ham_rl.envs.recall_stepper import RecallStepper


def _pair(env_id: str, num_envs: int, seed: int) -> tuple[VecEnv, VecEnv]:
    fast, loop = VecEnv(env_id, num_envs, seed=seed), VecEnv(env_id, num_envs, seed=seed)
    loop._stepper = None  # each env's own step, in the loop
    assert fast._stepper is not None
    return fast, loop


def _assert_same_step(a: tuple, b: tuple, fast: VecEnv, loop: VecEnv, t: int) -> None:
    for name, x, y in zip(("features", "rewards", "dones"), a[:3], b[:3], strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{name} differ at step {t}"
    assert a[3] == b[3], f"finished episodes differ at step {t}"
    assert fast.infos == loop.infos, f"infos differ at step {t}"
    assert fast.final_infos == loop.final_infos, f"final infos differ at step {t}"


# cue recall (rewards +1 / -1, a question at the end) and associative recall (1/Q per right answer, 32 questions)
@pytest.mark.parametrize("env_id", ["cue-random-d50", "ar-2"])
def test_array_steps_equal_each_envs_step(env_id):
    fast, loop = _pair(env_id, 6, seed=3)
    r_fast, r_loop = fast.reset(), loop.reset()
    assert all(np.array_equal(x, y) for x, y in zip(r_fast, r_loop, strict=True)) and fast.infos == loop.infos
    rng = np.random.default_rng(0)
    episodes, rewards = 0, set()
    for t in range(300):  # several episodes per env (52 and 64 steps)
        actions = rng.integers(0, fast.action_space.n, 6)
        a, b = fast.step(actions), loop.step(actions)
        _assert_same_step(a, b, fast, loop, t)
        episodes += len(a[3])
        rewards |= set(a[1].tolist())
    assert episodes >= 6 * 4
    assert len(rewards - {0.0}) == 2 if env_id == "cue-random-d50" else len(rewards) == 2, "right and wrong answers"


def test_array_steps_continue_exactly_through_a_saved_state():
    fast, loop = _pair("cue-random-d50", 4, seed=1)
    fast.reset(), loop.reset()
    rng = np.random.default_rng(1)
    for _ in range(70):  # into the second episode
        actions = rng.integers(0, 4, 4)
        fast.step(actions), loop.step(actions)
    saved_fast, saved_loop = fast.state_dict(), loop.state_dict()
    for key in ("envs", "obs"):
        assert str(saved_fast[key]) == str(saved_loop[key]), f"saved {key} differ"
    resumed = VecEnv("cue-random-d50", 4, seed=99)
    assert resumed.load_state_dict(saved_fast) == []
    assert resumed._stepper is not None
    for t in range(120):
        actions = rng.integers(0, 4, 4)
        _assert_same_step(resumed.step(actions), loop.step(actions), resumed, loop, t)


def test_only_the_recall_tasks_envs_step_as_arrays():
    assert VecEnv("popgym-repeat", 2)._stepper is None
    assert RecallStepper.of([]) is None


def test_a_step_after_the_end_is_refused():
    fast = VecEnv("cue-random-d50", 2, seed=0)
    fast.reset()
    fast._stepper.t[:] = fast._stepper.obs.shape[1]
    with pytest.raises(RuntimeError, match="after the episode terminated"):
        fast.step(np.zeros(2, dtype=np.int64))
