"""ham_rl.envs: names (aliases, gymnasium ids, module:EnvId), space encoders, vector env autoreset and features,
exact state round trip as plain data."""

import numpy as np
import pytest
from gymnasium import spaces

from ham_rl.envs import ENV_ALIASES, SpaceEncoder, VecEnv, resolve_env_id


def test_aliases_and_ids_resolve():
    assert resolve_env_id("popgym-repeat") == "popgym-RepeatPreviousEasy-v0"
    assert resolve_env_id("popgym-RepeatFirstMedium-v0") == "popgym-RepeatFirstMedium-v0"
    for alias in ENV_ALIASES:
        resolve_env_id(alias)


def test_unknown_env_lists_valid_names():
    with pytest.raises(ValueError, match="unknown env 'popgym-nope'.*popgym-repeat.*popgym-RepeatPreviousEasy-v0") as e:
        resolve_env_id("popgym-nope")
    assert "\n" not in str(e.value)


def test_module_colon_id_imports_the_users_module(tmp_path, monkeypatch):
    (tmp_path / "user_tasks_for_test.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('UserTask-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv', max_episode_steps=20)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_env_id("user_tasks_for_test:UserTask-v0") == "user_tasks_for_test:UserTask-v0"
    venv = VecEnv("user_tasks_for_test:UserTask-v0", 2, seed=0)
    assert venv.feature_dim == 4 + 2 + 1  # CartPole's observation, one-hot previous action, previous reward
    with pytest.raises(ValueError, match="registered no gymnasium env 'Nope-v0'"):
        resolve_env_id("user_tasks_for_test:Nope-v0")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_here'"):
        resolve_env_id("no_such_module_here:UserTask-v0")
    with pytest.raises(ValueError, match="must be `<module>:<EnvId>`"):
        resolve_env_id(":UserTask-v0")


@pytest.mark.parametrize(
    "space, samples, expected",
    [
        pytest.param(spaces.Discrete(3), [0, 2], [[1, 0, 0], [0, 0, 1]], id="discrete"),
        pytest.param(spaces.Discrete(2, start=1), [1, 2], [[1, 0], [0, 1]], id="discrete-start"),
        pytest.param(spaces.MultiDiscrete([2, 3]), [[1, 0], [0, 2]], [[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], id="multidiscrete"),
        pytest.param(spaces.MultiBinary(3), [[1, 0, 1], [0, 0, 0]], [[1, 0, 1], [0, 0, 0]], id="multibinary"),
        pytest.param(spaces.Box(-1, 1, (2, 2)), [np.full((2, 2), 0.5), np.eye(2)], [[0.5] * 4, [1, 0, 0, 1]], id="box-2d"),
        pytest.param(
            spaces.Tuple((spaces.Discrete(2), spaces.Box(-1, 1, (1,)))),
            [(1, [0.25]), (0, [-1.0])],
            [[0, 1, 0.25], [1, 0, -1]],
            id="tuple",
        ),  # fmt: skip
        pytest.param(
            spaces.Dict({"a": spaces.Discrete(2), "b": spaces.MultiDiscrete([2])}),
            [{"a": 0, "b": [1]}, {"a": 1, "b": [0]}],
            [[1, 0, 0, 1], [0, 1, 1, 0]],
            id="dict",
        ),  # fmt: skip
    ],
)
def test_space_encoder(space, samples, expected):
    enc = SpaceEncoder(space)
    out = enc(samples)
    assert out.dtype == np.float32 and out.shape == (len(samples), enc.dim)
    np.testing.assert_allclose(out, np.asarray(expected, dtype=np.float32))


def test_space_encoder_rejects_unknown_space():
    with pytest.raises(ValueError, match="supported: Discrete"):
        SpaceEncoder(spaces.Text(5))


@pytest.mark.parametrize(
    "env_id", ["popgym-AutoencodeEasy-v0", "popgym-BattleshipEasy-v0", "popgym-ConcentrationEasy-v0",
               "popgym-PositionOnlyPendulumEasy-v0", "popgym-CountRecallEasy-v0", "popgym-PositionOnlyCartPoleEasy-v0"],
)  # fmt: skip
def test_vecenv_runs_every_space_kind(env_id):
    venv = VecEnv(env_id, 3, seed=0)
    x, start = venv.reset()
    assert x.shape == (3, venv.feature_dim) and start.all()
    for _ in range(5):
        a = np.stack([venv.action_space.sample() for _ in range(3)])
        x, r, d, _ = venv.step(a)
        assert x.shape == (3, venv.feature_dim) and r.shape == (3,) and d.dtype == bool


def test_autoreset_same_step_and_prev_features():
    # RepeatPreviousEasy episodes last 51 steps; obs Discrete(4), action Discrete(4) -> features 4 + 4 + 1
    venv = VecEnv("popgym-repeat", 2, seed=0)
    x, start = venv.reset()
    assert venv.feature_dim == 9 and start.all() and (x[:, 4:] == 0).all()
    x, r, d, fin = venv.step(np.array([1, 2]))
    np.testing.assert_array_equal(x[:, 4:8], [[0, 1, 0, 0], [0, 0, 1, 0]])  # one-hot previous action
    np.testing.assert_allclose(x[:, 8], r)  # previous reward
    for t in range(2, 52):
        x, r, d, fin = venv.step(np.array([0, 0]))
        assert d.all() == (t == 51)
    assert [(i, n) for i, _, n in fin] == [(0, 51), (1, 51)]
    assert (x[:, 4:] == 0).all()  # reset observation of the next episode: no previous action/reward
    x, r, d, fin = venv.step(np.array([3, 3]))
    # a real transition right after the reset (no dead step): step 1 of the new episode, action seen as previous
    assert not d.any() and (venv._ep_length == 1).all() and (x[:, 7] == 1).all()


def test_prev_features_switchable():
    assert VecEnv("popgym-repeat", 1, prev_action=False, prev_reward=False).feature_dim == 4
    assert VecEnv("popgym-repeat", 1, prev_action=True, prev_reward=False).feature_dim == 8


def test_state_dict_round_trip_is_exact():
    a = VecEnv("popgym-repeat-first", 3, seed=5)
    a.reset()
    rng = np.random.default_rng(0)
    for _ in range(30):
        a.step(rng.integers(0, 4, 3))
    b = VecEnv("popgym-repeat-first", 3, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(100):
        act = rng.integers(0, 4, 3)
        xa, ra, da, fa = a.step(act)
        xb, rb, db, fb = b.step(act)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ra, rb)
        assert fa == fb


@pytest.mark.parametrize("alias", sorted(ENV_ALIASES))
def test_state_round_trips_as_plain_data_for_every_preset(alias, tmp_path):
    # Through torch.save and torch.load(weights_only=True): no pickled object, and the run continues exactly.
    import torch

    a = VecEnv(alias, 2, seed=3)
    a.reset()
    act_space = a.action_space
    act_space.seed(0)
    for _ in range(40):
        a.step(np.stack([act_space.sample() for _ in range(2)]))
    torch.save(a.state_dict(), tmp_path / "venv.pt")
    b = VecEnv(alias, 2, seed=77)
    assert b.load_state_dict(torch.load(tmp_path / "venv.pt", weights_only=True)) == []
    for _ in range(60):
        act = np.stack([act_space.sample() for _ in range(2)])
        xa, ra, da, fa = a.step(act)
        xb, rb, db, fb = b.step(act)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ra, rb)
        assert fa == fb


def test_an_env_without_a_plain_data_state_restarts_with_a_warning():
    a = VecEnv("popgym-repeat", 2, seed=0)
    a.reset()
    a.envs[1].unwrapped.callback = print.__self__  # a module: no plain-data form
    state = a.state_dict()
    assert state["envs"][1] is None and "callback is a module" in state["unsaved_reasons"][1]
    b = VecEnv("popgym-repeat", 2, seed=0)
    with pytest.warns(UserWarning, match=r"env 1 could not be restored .*callback is a module.*from seed 3"):
        assert b.load_state_dict(state) == [1]
    features, starts = b.current_features()
    assert starts.tolist() == [a.current_features()[1][0], True] and (features[1, 4:] == 0).all()
