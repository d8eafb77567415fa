"""HAMRecurrentPPO: sb3-contrib's RecurrentPPO with memories of the ham_rl family (issue 5)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import popgym  # noqa: F401  (registers popgym-*-v0)
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv
from stable_baselines3.common.evaluation import evaluate_policy

from ham_rl.memory.state import MemoryState
from ham_rl.sb3 import HAMRecurrentPPO

pytestmark = pytest.mark.filterwarnings("ignore:.*render_mode")

ENV_ID = "popgym-RepeatPreviousEasy-v0"  # obs Discrete(4), act Discrete(4), 51 steps; chance return about -0.5
# Small and fast: 4 envs x 64 steps (episodes straddle rollouts, so carried-in states are exercised).
SMALL = dict(n_steps=64, batch_size=128, n_epochs=2, seed=0, device="cpu")
# threshold 0 caches most tokens, so carried-in KV caches are non-trivial
HAM_KWARGS = dict(num_heads=2, threshold=0.0)


def make_env(n_envs: int = 4, seed: int = 0, **kwargs):
    return make_vec_env(ENV_ID, n_envs=n_envs, seed=seed, **kwargs)


def make_model(memory: str = "ham", memory_kwargs: dict | None = None, env=None, **policy_kwargs) -> HAMRecurrentPPO:
    if memory_kwargs is None:
        memory_kwargs = HAM_KWARGS if memory == "ham" else {}
    policy_kwargs = dict(memory=memory, memory_kwargs=memory_kwargs, hidden_size=16, net_arch=[32], **policy_kwargs)
    return HAMRecurrentPPO("MlpHamPolicy", env or make_env(), policy_kwargs=policy_kwargs, **SMALL)


class CountMemoryCalls(BaseCallback):
    """Counts sequence calls (alone, or grouped with the critic's memory) and step calls of the actor memory inside
    train()."""

    def __init__(self):
        super().__init__()
        self.in_train = False
        self.sequence_calls = 0
        self.grouped_calls = 0
        self.steps_in_train = 0

    def _on_training_start(self):
        memory = self.model.policy.memory_actor
        forward, step, grouped = memory.forward, memory.step, memory._forward_group

        def counted_forward(*args, **kwargs):
            self.sequence_calls += 1
            return forward(*args, **kwargs)

        def counted_grouped(memories, *args, **kwargs):
            self.sequence_calls += int(memory in memories)
            self.grouped_calls += 1
            return grouped(memories, *args, **kwargs)

        def counted_step(*args, **kwargs):
            self.steps_in_train += int(self.in_train)
            return step(*args, **kwargs)

        memory.forward, memory.step, memory._forward_group = counted_forward, counted_step, counted_grouped

    def _on_rollout_start(self):
        self.in_train = False

    def _on_rollout_end(self):
        self.in_train = True

    def _on_step(self):
        return True


@pytest.mark.parametrize("memory, steps", [("ham", 8192), ("gru", 10240)], ids=["ham", "gru"])
def test_learns_repeat_previous_above_chance(memory, steps):
    """Seeded runs: the greedy return rises well above chance (about -0.5; ham reaches ~0.8, gru ~0.0)."""
    model = HAMRecurrentPPO(
        "MlpHamPolicy",
        make_env(n_envs=8),
        n_steps=64,
        batch_size=128,
        n_epochs=8,
        learning_rate=2e-3,
        seed=0,
        device="cpu",
        policy_kwargs=dict(memory=memory, hidden_size=32, net_arch=[64]),
    )
    model.learn(steps)
    mean_return, _ = evaluate_policy(model, make_env(n_envs=4, seed=1), n_eval_episodes=8)
    assert mean_return > -0.2, f"{memory}: greedy return {mean_return:.3f} is not above chance (-0.5)"


@pytest.mark.parametrize(
    "memory, policy_kwargs",
    [
        ("ham", {}),
        ("ham", dict(shared_memory=True, enable_critic_memory=False)),
        ("ham", dict(enable_critic_memory=False)),
        ("ham", dict(memory_kwargs=dict(HAM_KWARGS, capacity=4))),
        ("ham-learned", {}),
        ("gdn", {}),
        ("hqlt", {}),
        ("gru", {}),
        ("lstm", {}),
        ("window", {}),
        ("mlp", {}),
    ],
    ids=["ham", "ham-shared", "ham-ffcritic", "ham-capacity", "ham-learned", "gdn", "hqlt", "gru", "lstm", "window", "mlp"],
)
def test_log_probs_before_update_match_rollout(memory, policy_kwargs):
    """Before any update, the training pass (one sequence call per minibatch, from the state stored at rollout
    start) gives the rollout's log-probs and values: PPO's ratio is 1."""
    model = make_model(memory, **policy_kwargs)
    _, callback = model._setup_learn(10**6, None)
    for _ in range(3):  # 3 rollouts of 64 steps: episodes of 51 steps straddle every boundary
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        model.policy.set_training_mode(True)
        with th.no_grad():
            for data in model.rollout_buffer.get(model.batch_size):
                values, log_prob, _ = model.policy.evaluate_actions(
                    data.observations, data.actions.long().flatten(), data.lstm_states, data.episode_starts
                )
                th.testing.assert_close(log_prob, data.old_log_prob, rtol=0, atol=1e-5)
                th.testing.assert_close(values.flatten(), data.old_values, rtol=0, atol=1e-5)
    if memory == "ham":
        assert model.rollout_buffer.initial_states.pi.cache_len.min() > 0, "the test should carry a KV cache in"


def test_training_is_one_memory_call_per_minibatch():
    model = make_model("ham")
    counter = CountMemoryCalls()
    model.learn(2 * 4 * 64, callback=counter)  # 2 rollouts x 2 epochs x 2 minibatches (2 env rows each)
    assert counter.sequence_calls == 2 * 2 * 2
    assert counter.grouped_calls == 2 * 2 * 2  # the actor's and the critic's memory in one call per minibatch
    assert counter.steps_in_train == 0


def test_save_load_predict_same_actions(tmp_path):
    model = make_model("ham")
    model.learn(256)
    model.save(tmp_path / "model.zip")
    loaded = HAMRecurrentPPO.load(tmp_path / "model.zip", device="cpu")

    assert loaded.policy.memory == "ham" and loaded.policy.memory_kwargs == HAM_KWARGS
    for (name, p), (_, q) in zip(model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True):
        th.testing.assert_close(p, q, msg=f"parameter {name} differs after load")

    env = make_env(n_envs=2, seed=3)
    obs = env.reset()
    states = [None, None]
    starts = np.ones(2, dtype=bool)
    for _ in range(60):  # past an episode end: episode_start resets the memory
        actions = []
        for i, m in enumerate((model, loaded)):
            action, states[i] = m.predict(obs, state=states[i], episode_start=starts, deterministic=True)
            actions.append(action)
        np.testing.assert_array_equal(actions[0], actions[1])
        obs, _, starts, _ = env.step(actions[0])
    assert isinstance(states[0], MemoryState) and states[0].batch_size == 2


class _Payload:
    """Unpickling this creates the marker file: the canary of the safe-load test."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace_data(path, change) -> None:
    """Rewrite the JSON ``data`` entry of an SB3 zip with ``change(data)`` applied."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    data = json.loads(members["data"])
    change(data)
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


@pytest.mark.parametrize("entry", ["policy_class", "observation_space", "_last_obs", "clip_range", "a_new_entry"])
def test_load_never_unpickles_a_crafted_file(tmp_path, entry):
    import base64

    import cloudpickle

    model = make_model("ham")
    model.learn(128)
    path = tmp_path / "model.zip"
    model.save(path)
    marker = tmp_path / "pwned"
    payload = {":type:": "<class 'x'>", ":serialized:": base64.b64encode(cloudpickle.dumps(_Payload(marker))).decode()}
    _replace_data(path, lambda data: data.__setitem__(entry, payload))
    if entry == "a_new_entry":  # no plain-data replacement: refused, with the way out named
        with pytest.raises(ValueError, match="`a_new_entry` is stored pickled.*trust_pickle=True"):
            HAMRecurrentPPO.load(path, device="cpu")
    else:
        loaded = HAMRecurrentPPO.load(path, env=make_env(), device="cpu")
        assert loaded.observation_space == model.observation_space and loaded.clip_range(1.0) == model.clip_range(1.0)
        loaded.learn(128)  # rebuilt entries (the last observation) come back with the first rollout
    assert not marker.exists()
    try:  # the explicit opt-in is what unpickles (the payload then stands where SB3 expects a class or a space)
        HAMRecurrentPPO.load(path, device="cpu", trust_pickle=True, custom_objects={"a_new_entry": None})
    except Exception:  # noqa: BLE001 - only whether the payload ran matters here
        pass
    assert marker.exists() == (entry != "a_new_entry")


def test_predict_leaves_state_unchanged_and_single_obs():
    model = make_model("ham")
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=0)
    action, state = model.predict(obs, episode_start=np.array([True]), deterministic=True)
    assert np.ndim(action) == 0 and state.batch_size == 1
    before = state.clone()
    a1, s1 = model.predict(obs, state=state, deterministic=True)
    a2, s2 = model.predict(obs, state=state, deterministic=True)  # same input state: same output
    assert a1 == a2
    assert th.equal(state.episode_len, before.episode_len) and th.equal(state.cache_len, before.cache_len)
    assert int(s1.episode_len) == 2


def test_evaluate_policy_passes_state_through():
    model = make_model("ham")
    calls = []
    predict = model.predict

    def spy(observation, state=None, episode_start=None, deterministic=False):
        action, new_state = predict(observation, state, episode_start, deterministic)
        calls.append((state, new_state, np.array(episode_start)))
        return action, new_state

    model.predict = spy
    rewards, lengths = evaluate_policy(model, make_env(n_envs=2, seed=5), n_eval_episodes=2, return_episode_rewards=True)
    assert len(rewards) == 2 and all(length == 51 for length in lengths)
    assert calls[0][0] is None and calls[0][2].all()
    for (_, out, _), (given, _, _) in zip(calls[:-1], calls[1:], strict=True):
        assert given is out  # evaluate_policy hands back exactly what predict returned
    assert max(int(s.episode_len.max()) for _, s, _ in calls) == 51


def _rollouts(model: HAMRecurrentPPO, n: int) -> list[dict[str, np.ndarray]]:
    """Collect ``n`` rollouts (no training); each buffer's values, rewards and episode starts."""
    _, callback = model._setup_learn(10**6, None)
    out = []
    for _ in range(n):
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        buf = model.rollout_buffer
        out.append({name: getattr(buf, name).copy() for name in ("values", "rewards", "episode_starts")})
    return out


def test_truncated_episodes_bootstrap():
    """Episodes cut by a TimeLimit add gamma * V(terminal obs) to their last reward, V read from that env's critic
    state after its last step: one extra value per truncated episode."""
    env = make_env(wrapper_class=gym.wrappers.TimeLimit, wrapper_kwargs=dict(max_episode_steps=10))
    model = make_model("ham", env=env)
    bootstrapped = []
    bootstrap = model._bootstrap_truncations

    def spy(rollout_buffer, vf, obs, starts, n_steps, truncations):
        bootstrapped.extend(truncations)
        return bootstrap(rollout_buffer, vf, obs, starts, n_steps, truncations)

    model._bootstrap_truncations = spy
    model.learn(2 * 4 * 64)
    assert len(bootstrapped) >= 2 * 4 * 6  # one bootstrap per truncated episode (6 per env per rollout)
    assert model._last_lstm_states.pi.episode_len.max() <= 10


@pytest.mark.parametrize("time_limit", [None, 10], ids=["terminations", "truncations"])
def test_deferred_critic_matches_stepped_critic(time_limit):
    """The critic's rollout values (and time-limit bootstraps), from one sequence call after the rollout, equal
    those of stepping the critic's memory with the actor's at every step, as RecurrentPPO does."""
    wrapper = dict(wrapper_class=gym.wrappers.TimeLimit, wrapper_kwargs=dict(max_episode_steps=time_limit))
    results = {}
    for defer in (True, False):
        model = make_model("ham", env=make_env(**(wrapper if time_limit else {})))
        model.defer_critic = defer
        results[defer] = _rollouts(model, 3)  # episodes straddle rollouts: carried-in critic states
    for deferred, stepped in zip(results[True], results[False], strict=True):
        np.testing.assert_array_equal(deferred["episode_starts"], stepped["episode_starts"])  # same actions
        np.testing.assert_allclose(deferred["values"], stepped["values"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(deferred["rewards"], stepped["rewards"], rtol=0, atol=1e-5)


class DictObs(gym.ObservationWrapper):
    """RepeatPrevious with a Dict observation (one-hot card plus a constant)."""

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = spaces.Dict(
            {"card": spaces.Box(0.0, 1.0, (4,), np.float32), "bias": spaces.Box(0.0, 1.0, (1,), np.float32)}
        )

    def observation(self, obs):
        return {"card": np.eye(4, dtype=np.float32)[int(obs)], "bias": np.ones(1, np.float32)}


def test_multi_input_policy_dict_observations():
    env = make_env(wrapper_class=DictObs)
    model = HAMRecurrentPPO(
        "MultiInputHamPolicy", env, policy_kwargs=dict(memory="ham", memory_kwargs=HAM_KWARGS, hidden_size=16), **SMALL
    )
    model.learn(256)
    action, state = model.predict(env.reset(), deterministic=True)
    assert action.shape == (4,) and state.batch_size == 4


def test_cnn_policy_image_observations():
    env = make_vec_env(FakeImageEnv, n_envs=2, seed=0, env_kwargs=dict(screen_height=36, screen_width=36, discrete=True))
    model = HAMRecurrentPPO(
        "CnnHamPolicy",
        env,
        n_steps=16,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=dict(
            memory="ham", memory_kwargs=HAM_KWARGS, hidden_size=16, features_extractor_kwargs=dict(features_dim=32)
        ),
    )
    model.learn(64)
    action, state = model.predict(env.reset(), deterministic=True)
    assert action.shape == (2,) and state.batch_size == 2


def test_logging_tensorboard_and_callbacks(tmp_path):
    policy_kwargs = dict(memory="ham", memory_kwargs=dict(num_heads=2, target_fraction=0.2), hidden_size=16)
    model = HAMRecurrentPPO("MlpHamPolicy", make_env(), policy_kwargs=policy_kwargs, tensorboard_log=str(tmp_path), **SMALL)

    class Count(BaseCallback):
        n = 0

        def _on_step(self):
            Count.n += 1
            return True

    evaluation = EvalCallback(make_env(n_envs=2, seed=7), n_eval_episodes=2, eval_freq=64, log_path=str(tmp_path / "eval"))
    checkpoints = CheckpointCallback(save_freq=64, save_path=str(tmp_path / "ckpt"), name_prefix="ham")
    # 3 iterations; SB3 dumps each update's stats at the start of the next iteration
    model.learn(3 * 256, callback=[Count(), evaluation, checkpoints])
    assert Count.n == 3 * 256 // 4
    assert (tmp_path / "eval" / "evaluations.npz").exists() and len(evaluation.evaluations_results) == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "ham_256_steps.zip",
        "ham_512_steps.zip",
        "ham_768_steps.zip",
    ]
    HAMRecurrentPPO.load(tmp_path / "ckpt" / "ham_512_steps.zip", device="cpu")
    runs = list(tmp_path.glob("HAMRecurrentPPO_*"))
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = ("rollout/ep_rew_mean", "train/approx_kl", "eval/mean_reward", "memory/kv_fraction", "memory/threshold")
    for tag in (*expected, "memory/kv_len_mean", "memory/critic_threshold"):
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"
    thresholds = [e.value for e in events.Scalars("memory/threshold")]
    assert len(thresholds) == 2 and thresholds[0] != thresholds[1], "end_update() feedback should move tau"


def test_unknown_memory_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown memory 'hamm'.*allowed: .*ham.*gru"):
        make_model("hamm", memory_kwargs={})


def test_unknown_memory_option_lists_allowed():
    with pytest.raises(ValueError, match="unknown option.*'heads'.*allowed: .*num_heads"):
        make_model("ham", memory_kwargs=dict(heads=4))


def test_lstm_arguments_name_their_replacement():
    with pytest.raises(ValueError, match="lstm_hidden_size.*-> hidden_size"):
        HAMRecurrentPPO("MlpHamPolicy", make_env(), policy_kwargs=dict(lstm_hidden_size=64), **SMALL)


def test_unknown_policy_alias_lists_allowed():
    allowed = "MlpHamPolicy, CnnHamPolicy, MultiInputHamPolicy"
    with pytest.raises(ValueError, match=f"unknown policy 'MlpLstmPolicy'.*allowed: {allowed}"):
        HAMRecurrentPPO("MlpLstmPolicy", make_env(), **SMALL)


def test_predict_rejects_lstm_state():
    model = make_model("gru")
    obs = make_env().reset()
    with pytest.raises(ValueError, match="MemoryState"):
        model.predict(obs, state=(np.zeros((1, 4, 16)), np.zeros((1, 4, 16))))


def test_batch_size_not_whole_rows_warns():
    with pytest.warns(UserWarning, match="whole env rows"):
        HAMRecurrentPPO("MlpHamPolicy", make_env(), policy_kwargs=dict(memory="gru"), **{**SMALL, "batch_size": 100})


def test_adam_is_fused_unless_the_user_says_otherwise():
    assert make_model("gru").policy.optimizer.param_groups[0]["fused"] is True
    plain = make_model("gru", optimizer_kwargs=dict(eps=1e-5, fused=False))
    assert plain.policy.optimizer.param_groups[0]["fused"] is False
    sgd = make_model("gru", optimizer_class=th.optim.SGD, optimizer_kwargs=dict(momentum=0.9))
    assert isinstance(sgd.policy.optimizer, th.optim.SGD)


def test_policy_file_load_is_refused_unless_trusted(tmp_path):
    model = make_model("ham")
    model.policy.save(tmp_path / "policy.pth")
    with pytest.raises(ValueError, match="would unpickle it.*trust_pickle=True"):
        type(model.policy).load(tmp_path / "policy.pth")
    loaded = type(model.policy).load(tmp_path / "policy.pth", device="cpu", trust_pickle=True)
    for (name, p), (_, q) in zip(model.policy.state_dict().items(), loaded.state_dict().items(), strict=True):
        th.testing.assert_close(p, q, msg=name)
