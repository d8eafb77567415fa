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


def test_a_checkpoint_after_an_autoreset_continues_exactly(tmp_path):
    # minigrid rebuilds its grid at every reset: the view replays the episode (its reset's generator state, actions)
    import torch

    a = VecEnv("minigrid-memory-s7", 2, seed=5)
    a.reset()
    rng = np.random.default_rng(0)
    episodes = 0
    while episodes < 3:  # past autoresets without a seed, whose layout comes from the env's own generator
        episodes += len(a.step(rng.integers(7, size=2))[3])
    torch.save(a.state_dict(), tmp_path / "venv.pt")
    b = VecEnv("minigrid-memory-s7", 2, seed=99)
    assert b.load_state_dict(torch.load(tmp_path / "venv.pt", weights_only=True)) == []
    for _ in range(300):
        act = rng.integers(7, size=2)
        for out_a, out_b in zip(a.step(act), b.step(act), strict=True):
            np.testing.assert_array_equal(np.asarray(out_a, dtype=object), np.asarray(out_b, dtype=object))
