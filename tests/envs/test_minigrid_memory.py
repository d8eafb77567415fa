"""MiniGrid's memory tasks through the one-hot view: every cell's (object, colour, state) and the direction, exactly."""

import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX  # the minigrid extra, in dev

from ham_rl.envs import VecEnv, make_env
from ham_rl.envs.minigrid_memory import make_minigrid_memory


def test_one_hot_view_decodes_back_to_the_symbolic_view():
    env = make_env("minigrid-memory-s13-random")
    raw = env.unwrapped  # the minigrid env under the wrapper
    obs, _ = env.reset(seed=1)
    sizes = [len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX)]
    for _ in range(5):
        image = raw.gen_obs()["image"]  # what minigrid shows now
        cells = obs[:-4].reshape(49, sum(sizes))
        assert (cells.sum(1) == 3).all()  # one object, one colour, one state per cell
        decoded = np.stack([part.argmax(1) for part in np.split(cells, np.cumsum(sizes)[:-1], axis=1)], 1)
        assert (decoded == image.reshape(49, 3)).all()
        assert obs[-4:].argmax() == raw.agent_dir and obs[-4:].sum() == 1
        obs, *_ = env.step(2)  # forward


def test_presets_run_in_the_vector_env():
    venv = VecEnv("minigrid-memory-s7", 2, seed=0)
    x, starts = venv.reset()
    assert x.shape == (2, 984 + 7 + 1) and starts.all()  # view, previous action (7 actions), previous reward
    x, rewards, dones, _ = venv.step(np.zeros(2, dtype=np.int64))
    assert x.shape == (2, 992) and not dones.any()


def test_the_last_info_says_whether_the_matching_object_was_reached():
    venv = VecEnv("minigrid-memory-s7", 4, seed=0)
    venv.reset()
    rng, ended = np.random.default_rng(0), []
    while len(ended) < 24:  # turning and walking at random reaches one of the two objects about half the time
        _, _, _, finished = venv.step(rng.integers(3, size=4))
        ended += [(ret, venv.final_infos[i]["is_success"]) for i, ret, _ in finished]
    assert all(success == (ret > 0) for ret, success in ended)  # minigrid rewards the matching object only
    assert 0 < sum(success for _, success in ended) < len(ended)


def test_unknown_task_is_one_line():
    with pytest.raises(ValueError, match=r"^`task` must be one of MiniGrid-MemoryS7-v0, .*, got 'MiniGrid-Empty-5x5-v0'$"):
        make_minigrid_memory("MiniGrid-Empty-5x5-v0")


def test_nav_variant_has_the_three_moving_actions_with_minigrid_indices():
    full, nav = make_env("minigrid-memory-s13-random"), make_env("minigrid-memory-s13-random-nav")
    assert nav.action_space.n == 3 and full.action_space.n == 7
    full.reset(seed=3)
    nav.reset(seed=3)
    for action in [0, 2, 1, 1, 2, 2, 0, 2]:  # left, forward, right, ...: the same moves in both
        a, b = full.step(action), nav.step(action)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:4] == b[1:4]
        assert tuple(full.unwrapped.agent_pos) == tuple(nav.unwrapped.agent_pos)
    with pytest.raises(ValueError, match=r"^action must be 0 \(left\), 1 \(right\) or 2 \(forward\), got 3$"):
        nav.step(3)


@pytest.mark.parametrize("preset,actions", [("minigrid-memory-s7", 7), ("minigrid-memory-s7-nav", 3)])
def test_a_checkpoint_after_an_autoreset_continues_exactly(tmp_path, preset, actions):
    # minigrid rebuilds its grid at every reset: the view replays the episode (its reset's generator state, actions)
    import torch

    a = VecEnv(preset, 2, seed=5)
    x, _ = a.reset()
    assert x.shape == (2, 984 + actions + 1)  # view, previous action, previous reward
    rng = np.random.default_rng(0)
    episodes = 0
    while episodes < 3:  # past autoresets without a seed, whose layout comes from the env's own generator
        episodes += len(a.step(rng.integers(actions, size=2))[3])
    torch.save(a.state_dict(), tmp_path / "venv.pt")
    b = VecEnv(preset, 2, seed=99)
    assert b.load_state_dict(torch.load(tmp_path / "venv.pt", weights_only=True)) == []
    for _ in range(300):
        act = rng.integers(actions, size=2)
        for out_a, out_b in zip(a.step(act), b.step(act), strict=True):
            np.testing.assert_array_equal(np.asarray(out_a, dtype=object), np.asarray(out_b, dtype=object))


def test_informative_says_when_the_object_to_remember_is_in_view():
    env = make_env("minigrid-memory-s13-random")
    raw = env.unwrapped
    rng, flags = np.random.default_rng(0), []
    for episode in range(20):
        _, info = env.reset(seed=episode)
        for _ in range(60):  # random turns and steps: the object comes in and out of view
            cue = (1, raw.height // 2 - 1)
            flags.append(info["informative"])
            assert info["informative"] == raw.agent_sees(*cue)  # minigrid's own (slower) check
            _, _, terminated, truncated, info = env.step(int(rng.integers(3)))
            if terminated or truncated:
                break
    assert 0 < sum(flags) < len(flags)
