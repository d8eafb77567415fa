"""ham_rl.envs.recall_tasks: informative flags, answerability, chance level, oracle, seeding, presets."""

import gymnasium as gym
import numpy as np
import pytest

from ham_rl.envs import ENV_ALIASES, AssociativeRecallEnv, CueRecallEnv, VecEnv, make_env
from ham_rl.envs.recall_tasks import PRESETS, associative_recall_batch, chance_return, cue_recall_batch


def rollout(env: gym.Env, seed: int, policy) -> tuple[float, list[dict], list[np.ndarray]]:
    """One episode; ``policy(obs, info, memory)`` picks the action. Returns the return, the infos, the observations."""
    obs, info = env.reset(seed=seed)
    total, infos, seen, memory, done = 0.0, [info], [obs], {}, False
    while not done:
        obs, r, term, trunc, info = env.step(policy(obs, info, memory))
        total += r
        done = term or trunc
        if not done:
            infos.append(info)
            seen.append(obs)
    return total, infos, seen


def cue_oracle(num_cues: int):
    def policy(obs, info, memory):
        if info["informative"]:
            memory["cue"] = int(np.argmax(obs[:num_cues]))
        return memory.get("cue", 0)

    return policy


def ar_oracle(num_keys: int, num_values: int):
    def policy(obs, info, memory):
        key = int(np.argmax(obs[:num_keys]))
        if info["informative"]:
            memory[key] = int(np.argmax(obs[num_keys : num_keys + num_values]))
        return memory.get(key, 0) if info["question"] else 0

    return policy


def test_cue_flags_mark_exactly_the_cue_step_and_only_it_carries_the_answer():
    b = cue_recall_batch(np.random.default_rng(0), 500, num_cues=4, delay=30, cue_steps=15, distractors="random")
    assert b.obs.shape == (500, 32, 4 + 1 + 8)
    assert (b.informative.sum(1) == 1).all() and (np.flatnonzero(b.informative.any(0)) < 15).all()
    cue_channels = b.obs[:, :, :4]
    assert (cue_channels.sum(2) > 0).tolist() == b.informative.tolist()  # the cue is on no other step
    at = b.informative.argmax(1)
    assert (cue_channels[np.arange(500), at].argmax(1) == b.answers[:, -1]).all()
    assert (b.answers[:, :-1] == -1).all() and (b.obs[:, -1, 4] == 1).all() and (b.obs[:, :-1, 4] == 0).all()


def test_periodic_distractors_repeat_with_their_period():
    b = cue_recall_batch(np.random.default_rng(1), 8, delay=40, distractors="periodic", distractor_width=5)
    sym = b.obs[:, 1:-1, 5:].argmax(2)  # steps after the step-0 cue, before the question
    assert (sym[:, 5:] == sym[:, :-5]).all() and (sym[:, 1:] != sym[:, :-1]).all()


def test_associative_flags_mark_exactly_the_pair_steps_and_answers_come_from_them():
    kw = dict(num_pairs=6, num_keys=16, num_values=5, context_len=20, num_questions=7, distractors="random")
    b = associative_recall_batch(np.random.default_rng(0), 300, **kw)
    assert b.obs.shape == (300, 27, 16 + 5 + 1 + 8)
    assert (b.informative.sum(1) == 6).all() and not b.informative[:, 20:].any()
    has_value = b.obs[:, :, 16:21].sum(2) > 0
    assert has_value.tolist() == b.informative.tolist()  # a value is shown on the pair steps only
    for i in range(300):
        pairs = {int(np.argmax(o[:16])): int(np.argmax(o[16:21])) for o in b.obs[i, b.informative[i]]}
        assert len(pairs) == 6  # distinct keys: every question has one answer
        asked = b.obs[i, 20:, :16].argmax(1)
        assert [pairs[k] for k in asked] == b.answers[i, 20:].tolist()


@pytest.mark.parametrize("env_id, oracle, chance, informative", [
    ("cue-random-d50", cue_oracle(4), chance_return("cue", num_cues=4), 1),
    ("ar-4", ar_oracle(32, 8), chance_return("associative", num_values=8), 4),
    ("ar-8", ar_oracle(32, 8), chance_return("associative", num_values=8), 8),
    ("ar-16", ar_oracle(32, 8), chance_return("associative", num_values=8), 16),
    ("ar-16-dense", ar_oracle(32, 8), chance_return("associative", num_values=8), 16),
])  # fmt: skip
def test_env_flags_oracle_and_chance_level(env_id, oracle, chance, informative):
    env = make_env(env_id)
    for seed in range(5):
        ret, infos, _ = rollout(env, seed, oracle)
        assert ret == pytest.approx(1.0)
        assert [i["step"] for i in infos] == list(range(env.unwrapped.episode_len))
        questions = [i["question"] for i in infos]
        assert sum(i["informative"] for i in infos) == informative and any(questions)
        assert questions[-1] and not any(i["informative"] and i["question"] for i in infos)
    env.action_space.seed(0)
    returns = [rollout(env, 100 + s, lambda *_: env.action_space.sample())[0] for s in range(300)]
    spread = 4 * np.std(returns) / np.sqrt(len(returns))  # four standard errors
    assert abs(np.mean(returns) - chance) < spread, (np.mean(returns), chance)
    assert chance == pytest.approx(-0.5 if env_id.startswith("cue") else 0.125)


def test_reward_only_at_questions_and_terminates_at_the_end():
    env = CueRecallEnv(delay=5)
    env.reset(seed=0)
    rewards = []
    for _ in range(7):
        _, r, term, trunc, _ = env.step(0)
        rewards.append((r, term, trunc))
    assert [x[0] for x in rewards[:-1]] == [0.0] * 6 and rewards[-1][0] in (1.0, -1.0)
    assert [x[1] for x in rewards] == [False] * 6 + [True] and not any(x[2] for x in rewards)
    with pytest.raises(RuntimeError, match="after the episode terminated"):
        env.step(0)


def test_seeding_reproduces_episodes():
    for env in (CueRecallEnv(cue_steps=20, distractors="random"), AssociativeRecallEnv(num_pairs=8)):
        policy = lambda obs, info, memory, n=int(env.action_space.n): int(obs.argmax()) % n
        a, b, c = rollout(env, 3, policy), rollout(env, 3, policy), rollout(env, 4, policy)
        assert a[0] == b[0] and np.array_equal(np.stack(a[2]), np.stack(b[2]))
        assert not np.array_equal(np.stack(a[2]), np.stack(c[2]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_cues=1), r"`num_cues` must be an int >= 2, got 1"),
    (dict(delay=10, cue_steps=12), r"`cue_steps` must be an int in \[1, 11\], got 12"),
    (dict(distractors="noise"), r"`distractors` must be one of periodic, random, got 'noise'"),
    (dict(delay=2.5), r"`delay` must be an int >= 0, got 2.5"),
])  # fmt: skip
def test_bad_cue_parameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CueRecallEnv(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pairs=40, num_keys=32), r"`num_pairs` must be an int in \[1, 32\], got 40"),
    (dict(num_pairs=8, context_len=4), r"`context_len` must be an int >= 8, got 4"),
    (dict(num_questions=0), r"`num_questions` must be an int >= 1, got 0"),
])  # fmt: skip
def test_bad_associative_parameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AssociativeRecallEnv(**kwargs)


@pytest.mark.parametrize("alias", sorted(PRESETS))
def test_vecenv_runs_each_preset(alias):
    assert ENV_ALIASES[alias] == PRESETS[alias][0]
    venv = VecEnv(alias, 2, seed=0)
    feats, starts = venv.reset()
    steps = venv.envs[0].unwrapped.episode_len
    assert feats.shape == (2, venv.feature_dim) and starts.all()
    done_count = 0
    for _ in range(steps):
        feats, rewards, dones, finished = venv.step(np.zeros(2, dtype=np.int64))
        done_count += len(finished)
    assert done_count == 2 and dones.all()  # fixed-length episodes: both end on the same step


def test_vecenv_infos_are_those_of_the_current_observation_and_the_reset_after_an_autoreset():
    venv = VecEnv("cue-first-d50", 2, seed=0)
    assert venv.infos == [{}, {}]  # before the first reset
    feats, _ = venv.reset()
    assert [i["step"] for i in venv.infos] == [0, 0] and all(i["informative"] for i in venv.infos)  # the cue is step 0
    steps = venv.envs[0].unwrapped.episode_len
    for t in range(1, steps):
        before = venv.infos
        venv.step(np.zeros(2, dtype=np.int64))
        assert venv.infos is not before  # a new list each step: a caller may keep the old one
        assert [i["step"] for i in venv.infos] == [t, t] and not any(i["informative"] for i in venv.infos)
        assert all(i["question"] == (t == steps - 1) for i in venv.infos)
    _, _, dones, _ = venv.step(np.zeros(2, dtype=np.int64))
    assert dones.all() and [i["step"] for i in venv.infos] == [0, 0] and all(i["informative"] for i in venv.infos)
    # a random cue step: the flag is the episode's own at the current step
    venv = VecEnv("cue-random-d50", 3, seed=1)
    venv.reset()
    for _ in range(30):
        for env, info in zip(venv.envs, venv.infos, strict=True):
            assert info["informative"] == bool(env.unwrapped._episode.informative[0, info["step"]])
        venv.step(np.zeros(3, dtype=np.int64))
    b = VecEnv("cue-random-d50", 3, seed=1)
    b.load_state_dict(venv.state_dict())
    assert b.infos == [{}, {}, {}]  # infos are not saved: unknown until the next step


def test_blank_episodes_show_no_cue_and_ask_for_the_extra_action():
    batch = cue_recall_batch(np.random.default_rng(0), 2000, delay=20, cue_steps=10, blank_fraction=0.3)
    blank = batch.answers[:, -1] == 4
    assert 0.25 < blank.mean() < 0.35
    assert not batch.informative[blank].any() and (batch.informative[~blank].sum(1) == 1).all()
    assert batch.obs[blank][:, :, :4].sum() == 0 and (batch.obs[~blank][:, :, :4].sum((1, 2)) == 1).all()
    assert chance_return("cue", num_cues=4, blank_fraction=0.3) == -0.6


def test_blank_fraction_zero_draws_the_episodes_of_before():
    a = cue_recall_batch(np.random.default_rng(3), 8, delay=10, cue_steps=5)
    b = cue_recall_batch(np.random.default_rng(3), 8, delay=10, cue_steps=5, blank_fraction=0.0)
    assert np.array_equal(a.obs, b.obs) and np.array_equal(a.answers, b.answers)


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.2", True])
def test_bad_blank_fraction_is_one_line(bad):
    with pytest.raises(ValueError, match=r"`blank_fraction` must be a number in \[0, 1\), got"):
        cue_recall_batch(np.random.default_rng(0), 2, blank_fraction=bad)
