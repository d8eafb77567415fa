"""Envs in worker processes (``env.workers=N``) give the in-process VecEnv's rollout, checkpoint and restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ham_rl.envs import VecEnv, WorkerVecEnv
from ham_rl.envs.workers import make_vec_env

CUT = "cut_env:ham_rl_test/RepeatPreviousCut-v0"  # POPGym with a time limit: autoresets after truncations too


def _plain(infos: list[dict]) -> list[dict]:
    return [{k: np.asarray(v).tolist() for k, v in info.items()} for info in infos]


def _steps(venv, actions: np.ndarray) -> list:
    """Every output of each step: features, rewards, dones, finished, truncated, final features where cut, infos,
    and the last infos of the episodes that ended."""
    out = []
    for a in actions:
        features, rewards, dones, finished = venv.step(a)
        cut = venv.truncated.copy()
        final = {i: _plain([info])[0] for i, info in sorted(venv.final_infos.items())}
        out.append((features, rewards, dones, finished, cut, venv.final_features[cut].copy(), _plain(venv.infos), final))
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        for j, (u, v) in enumerate(zip(x, y, strict=True)):
            if isinstance(u, np.ndarray):
                np.testing.assert_array_equal(u, v, err_msg=f"step {t}, output {j}")
            else:
                assert u == v, f"step {t}, output {j}"


def _random_actions(venv, steps: int, seed: int) -> np.ndarray:
    venv.action_space.seed(seed)
    return np.array([[venv.action_space.sample() for _ in range(venv.num_envs)] for _ in range(steps)])


@pytest.mark.parametrize("env_id", [CUT, "cue-random-d50", "tmaze-l50"])
def test_workers_give_the_in_process_rollout(env_id):
    ref = VecEnv(env_id, 5, seed=7)
    par = WorkerVecEnv(env_id, 5, workers=2, seed=7)
    try:
        assert par.feature_dim == ref.feature_dim and par.bounds == [(0, 3), (3, 5)]
        for x, y in zip(ref.reset(), par.reset(), strict=True):
            np.testing.assert_array_equal(x, y)
        assert _plain(par.infos) == _plain(ref.infos)
        actions = _random_actions(ref, 300, seed=1)
        a, b = _steps(ref, actions), _steps(par, actions)
        _assert_same(a, b)
        assert sum(len(s[3]) for s in a) > 10  # episodes ended and were reset along the way
        if env_id == CUT:
            assert sum(s[4].sum() for s in a) > 10  # ... by truncation too, with the final features compared
        else:
            assert any(info.get("informative") for s in a for info in s[6])
        assert all(sorted(s[7]) == [i for i, _, _ in s[3]] for s in a)  # a last info for every episode that ended
        if env_id == "tmaze-l50":
            assert all("is_success" in info for s in a for info in s[7].values())
        saved_ref, saved_par = ref.state_dict(), par.state_dict()
        assert saved_par.keys() == saved_ref.keys()
        for key in saved_ref:
            if isinstance(saved_ref[key], torch.Tensor):
                torch.testing.assert_close(saved_par[key], saved_ref[key], rtol=0, atol=0)
        for x, y in zip(ref.current_features(), par.current_features(), strict=True):
            np.testing.assert_array_equal(x, y)
    finally:
        par.close()


def test_a_checkpoint_moves_between_in_process_and_worker_envs():
    ref = VecEnv("cue-random-d50", 4, seed=3)
    ref.reset()
    _steps(ref, _random_actions(ref, 70, seed=2))
    saved = ref.state_dict()
    later = _random_actions(ref, 120, seed=4)
    expected = _steps(ref, later)
    par = WorkerVecEnv("cue-random-d50", 4, workers=3, seed=3)  # groups of 2, 1, 1
    try:
        assert par.load_state_dict(saved) == []
        for x, y in zip(par.current_features(), (saved["features"].numpy(), saved["starts"].numpy()), strict=True):
            np.testing.assert_array_equal(x, y)
        _assert_same(_steps(par, later), expected)
        back = VecEnv("cue-random-d50", 4, seed=3)
        back.load_state_dict(par.state_dict())  # and back into the in-process envs
        _assert_same(_steps(back, later[:20]), _steps(par, later[:20]))
    finally:
        par.close()


def test_an_env_that_cannot_be_restored_restarts_as_in_process():
    ref = VecEnv(CUT, 4, seed=5)
    ref.reset()
    _steps(ref, _random_actions(ref, 10, seed=0))
    saved = ref.state_dict()
    saved["envs"][2], saved["unsaved_reasons"][2] = None, "test: no plain form"
    fresh = VecEnv(CUT, 4, seed=5)
    with pytest.warns(UserWarning, match="env 2 could not be restored .*test: no plain form.* from seed 11,") as w_ref:
        assert fresh.load_state_dict(saved) == [2]
    par = WorkerVecEnv(CUT, 4, workers=2, seed=5)
    try:
        with pytest.warns(UserWarning) as w_par:
            assert par.load_state_dict(saved) == [2]
        assert [str(w.message) for w in w_par] == [str(w.message) for w in w_ref]
        for x, y in zip(fresh.current_features(), par.current_features(), strict=True):
            np.testing.assert_array_equal(x, y)
        later = _random_actions(ref, 40, seed=9)
        _assert_same(_steps(par, later), _steps(fresh, later))
    finally:
        par.close()


def test_bad_worker_counts_and_worker_errors_are_one_line():
    assert isinstance(make_vec_env(CUT, 2, workers=0), VecEnv)
    for bad in (-1, 3, 1.5, True):
        with pytest.raises(ValueError, match=rf"env.workers must be an int from 1 to num_envs \(2\) here, got {bad!r}"):
            WorkerVecEnv(CUT, 2, workers=bad)
    with pytest.raises(Exception, match="Nope"):
        WorkerVecEnv("ham_rl_test/Nope-v0", 2, workers=1)
    par = WorkerVecEnv(CUT, 2, workers=2)
    try:
        par.reset()
        with pytest.raises(ValueError, match="env state is for"):
            par.load_state_dict({"env_id": "other", "num_envs": 2})
        par._procs[1].kill()
        par._procs[1].join()
        with pytest.raises(RuntimeError, match=r"env worker 1 \(envs 1 to 1\) died"):
            par.step(np.zeros(2, dtype=np.int64))
    finally:
        par.close()
