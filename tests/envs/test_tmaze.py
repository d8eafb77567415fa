"""The passive T-Maze: what a walking, remembering policy scores, and where the cue falls."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ham_rl.envs import TMazeEnv, make_env
from ham_rl.envs.tmaze import BACK, DOWN, FORWARD, UP


def play(env, seed, choose):
    """One episode; ``choose(t, obs, goal_seen)`` gives the action. Returns (return, steps, cue step, goal seen)."""
    obs, info = env.reset(seed=seed)
    ret, t, cue_at, goal = 0.0, 0, None, None
    while True:
        if info["informative"]:
            cue_at, goal = t, (UP if obs[0] else DOWN)
        obs, r, term, trunc, info = env.step(choose(t, obs, goal))
        ret, t = ret + r, t + 1
        if term or trunc:
            # success is the goal arm, which is also the only way to a positive return
            assert info["is_success"] == (ret > 0), (ret, info)
            return ret, t, cue_at, goal
        assert "is_success" not in info  # only the episode's last step says


def walk_and(choice):
    return lambda t, obs, goal: choice(goal) if obs[3] else FORWARD


def test_remembering_the_cue_scores_one_guessing_zero_and_walking_into_the_wall_minus_one():
    env = TMazeEnv(corridor_length=7, preamble=5)
    remembered = [play(env, s, walk_and(lambda goal: goal))[0] for s in range(200)]
    assert remembered == [1.0] * 200
    guessed = [play(env, s, walk_and(lambda goal: UP))[0] for s in range(200)]
    assert set(guessed) == {-1.0, 1.0} and -0.2 < np.mean(guessed) < 0.2
    assert [play(env, s, walk_and(lambda goal: FORWARD))[0] for s in range(20)] == [-1.0] * 20


def test_the_cue_falls_at_a_random_step_of_the_waiting_room_and_episodes_are_wait_plus_walk():
    env = TMazeEnv(corridor_length=7, preamble=5)
    cues, lengths = zip(*[play(env, s, walk_and(lambda goal: goal))[2:0:-1] for s in range(300)], strict=True)
    assert set(cues) == set(range(6))  # every wait in [0, preamble]
    assert all(n == c + 7 + 1 for c, n in zip(cues, lengths, strict=True))


def test_dawdling_costs_per_step_and_running_out_of_time_as_much_as_a_wrong_arm():
    env = TMazeEnv(corridor_length=4, preamble=0)
    ret, steps, _, _ = play(env, 0, lambda t, obs, goal: BACK)
    assert steps == 5 and ret == pytest.approx(-5 / 4 - 1)  # every step of the walk, then out of time
    # one wasted step: the agent is one cell short when time runs out, which is worse than guessing an arm
    ret, steps, _, _ = play(env, 0, lambda t, obs, goal: UP if t == 0 else FORWARD)
    assert steps == 5 and ret == pytest.approx(-1 / 4 - 1)


def test_waiting_steps_are_free_and_ignore_the_action():
    env = TMazeEnv(corridor_length=3, preamble=20)
    obs, info = env.reset(seed=3)
    wait = 0
    while obs[4]:
        obs, r, term, _, info = env.step(BACK)
        assert r == 0.0 and not term
        wait += 1
    assert info["informative"] and obs[:2].sum() == 1 and wait <= 20


def test_presets_and_gymnasium_checker():
    env = make_env("tmaze-l100")
    assert env.unwrapped.corridor_length == 100 and env.unwrapped.preamble == 20
    check_env(TMazeEnv(corridor_length=5, preamble=3), skip_render_check=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(corridor_length=0), r"`corridor_length` must be an int >= 1, got 0$"),
        (dict(preamble=-1), r"`preamble` must be an int >= 0 \(the longest wait before the cue\), got -1$"),
    ],
)
def test_bad_parameters_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TMazeEnv(**kwargs)
