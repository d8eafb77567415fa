"""agents/: the ratio-1 check, action heads, PPO hyperparameter checks, learning on a tiny memory task."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from ham_rl import MEMORIES
from ham_rl.agents import PPO, ActionHead, PPOConfig, RecurrentActorCritic
from ham_rl.envs import VecEnv

sys.path.insert(0, str(Path(__file__).parent))
from tiny_env import register_tiny_env  # noqa: E402


def _ppo(memory: str, env: str, num_envs=4, num_steps=16, total=10**6, seed=0, **ppo):
    torch.manual_seed(seed)
    venv = VecEnv(env, num_envs, seed=seed)
    cfg = PPOConfig(num_envs=num_envs, num_steps=num_steps, embed_size=16, head_size=16, **ppo)
    opts = {"num_heads": 2} if memory not in ("gru", "lstm", "mlp") else {}
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, 16, opts, embed_size=16, head_size=16)
    return PPO(agent, venv, cfg, total)


def _replay(ppo: PPO):
    with torch.no_grad():
        x = torch.from_numpy(ppo.obs).transpose(0, 1)
        starts = torch.from_numpy(ppo.starts).transpose(0, 1)
        return ppo.agent.evaluate_actions(x, ppo.state0, starts, ppo.actions.transpose(0, 1))


@pytest.mark.parametrize("memory", list(MEMORIES))
def test_ratio_is_one_before_the_first_update(memory):
    """Train-path log-probs and values (one sequence call from the stored start state) equal the rollout's.

    Episodes of 5 steps inside 16-step segments: resets mid-segment, and carried-in state in later rollouts.
    """
    ppo = _ppo(memory, register_tiny_env(), num_steps=16)
    for _ in range(3):
        ppo.collect_rollout()
        assert ppo.starts[1:].any(), "the test needs resets inside the segment"
        logp, _, value = _replay(ppo)
        torch.testing.assert_close(logp, ppo.logprobs.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value, ppo.values.T, atol=1e-5, rtol=1e-5)
    # and a minibatch of a subset of env rows (as in the update) replays the same
    mb = torch.tensor([2, 0])
    with torch.no_grad():
        x = torch.from_numpy(ppo.obs).transpose(0, 1)[mb]
        st = torch.from_numpy(ppo.starts).transpose(0, 1)[mb]
        logp, _, _ = ppo.agent.evaluate_actions(x, ppo.state0[mb], st, ppo.actions.transpose(0, 1)[mb])
    torch.testing.assert_close(logp, ppo.logprobs.T[mb], atol=1e-5, rtol=1e-5)


def test_ratio_is_one_on_popgym_with_ham():
    ppo = _ppo("ham", "popgym-repeat", num_envs=4, num_steps=64)
    for _ in range(2):
        ppo.collect_rollout()
        logp, _, value = _replay(ppo)
        torch.testing.assert_close(logp, ppo.logprobs.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value, ppo.values.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "space",
    [spaces.Discrete(5), spaces.MultiDiscrete([3, 4]), spaces.Box(-2, 2, (2,))],
    ids=["discrete", "multidiscrete", "box"],
)
def test_action_head_logp_matches_torch_distributions(space):
    head = ActionHead(space)
    torch.manual_seed(0)
    out = torch.randn(6, head.num_outputs)
    log_std = torch.full((head.num_outputs,), -0.3) if head.kind == "box" else None
    a, logp = head.sample(out, log_std)
    logp2, ent = head.evaluate(out, log_std, a)
    torch.testing.assert_close(logp, logp2)
    if head.kind == "discrete":
        d = torch.distributions.Categorical(logits=out)
        torch.testing.assert_close(logp, d.log_prob(a))
        torch.testing.assert_close(ent, d.entropy())
    elif head.kind == "multidiscrete":
        ds = [torch.distributions.Categorical(logits=o) for o in out.split([3, 4], -1)]
        torch.testing.assert_close(logp, sum(d.log_prob(a[:, i]) for i, d in enumerate(ds)))
    else:
        d = torch.distributions.Normal(out, log_std.exp())
        torch.testing.assert_close(logp, d.log_prob(a).sum(-1))
        torch.testing.assert_close(ent, d.entropy().sum(-1))
    env_a = head.to_env(a * 10)
    assert env_a.shape[0] == 6
    if head.kind == "box":
        assert np.abs(env_a).max() <= 2


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_envs": 6, "num_minibatches": 4}, "divisible"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"gamma": 1.5}, "gamma"),
        ({"num_steps": 0}, "num_steps"),
        ({"clip_coef": 0.0}, "clip_coef"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"bogus": 1}, "unknown agent option"),
    ],
)
def test_bad_hyperparameters(bad, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig.from_dict(bad)


def _mean_return(ppo: PPO, rollouts: int = 4) -> float:
    rets = []
    for _ in range(rollouts):
        ppo.ep_returns.clear()
        ppo.collect_rollout()
        rets += list(ppo.ep_returns)
    return float(np.mean(rets))


@pytest.mark.parametrize("memory", ["gru", "ham"])
def test_learns_tiny_memory_task(memory):
    """RecallFirst (random/no-memory: 0.5, perfect: 1.0): a few seconds of PPO get well above the untrained policy."""
    env = register_tiny_env()
    ppo = _ppo(memory, env, num_envs=16, num_steps=32, total=16_384, learning_rate=3e-3, num_minibatches=4, seed=1)
    before = _ppo(memory, env, num_envs=16, num_steps=16, seed=1)
    untrained = _mean_return(before)
    while ppo.update < ppo.num_updates:
        ppo.iterate()
    trained = _mean_return(ppo)
    assert untrained < 0.6
    assert trained > 0.85, (untrained, trained)


@pytest.mark.parametrize("memory", ["ham", "gru"])
def test_truncated_episodes_bootstrap_from_the_last_observation(memory):
    from tiny_env import TRUNCATED_ENV_ID

    register_tiny_env()
    ppo = _ppo(memory, TRUNCATED_ENV_ID, num_envs=3, num_steps=8)
    raw, finals = [], []
    env_step = ppo.venv.step

    def recording_step(actions):
        out = env_step(actions)
        raw.append(out[1].copy())
        finals.append((ppo.venv.truncated.copy(), ppo.venv.final_features.copy()))
        return out

    ppo.venv.step = recording_step
    ppo.collect_rollout()
    cut = np.stack([c for c, _ in finals])  # [T, B]
    assert cut[2].all() and cut[5].all() and cut.sum() == 6  # every 3rd step is a time-limit cut
    bonus = ppo.rewards - np.stack(raw)
    assert (bonus[~cut] == 0).all()
    # The bootstrap is gamma * V(last observation) from the env's memory state after step t, recomputed here
    # with the sequence form over the rollout so far.
    x = torch.from_numpy(ppo.obs).transpose(0, 1)
    starts = torch.from_numpy(ppo.starts).transpose(0, 1)
    with torch.no_grad():
        for t in (2, 5):
            _, state = ppo.agent.memory(ppo.agent.encoder(x[:, : t + 1]), ppo.state0.clone(), starts[:, : t + 1])
            last = torch.from_numpy(finals[t][1])
            expected = ppo.cfg.gamma * ppo.agent.value(last, state, torch.zeros(3, dtype=torch.bool))
            np.testing.assert_allclose(bonus[t], expected.numpy(), atol=1e-5)
    assert (np.abs(bonus[cut]) > 0).all()


def test_final_features_of_a_truncated_episode():
    from tiny_env import TRUNCATED_ENV_ID

    register_tiny_env()
    venv = VecEnv(TRUNCATED_ENV_ID, 2, seed=0)
    venv.reset()
    for _ in range(2):
        _, _, done, _ = venv.step(np.array([1, 0]))
        assert not done.any() and not venv.truncated.any()
    x, r, done, _ = venv.step(np.array([1, 0]))
    assert done.all() and venv.truncated.all()
    # last observation: the blank symbol 2, then the previous action one-hot and the previous reward
    np.testing.assert_array_equal(venv.final_features[:, :3], [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(venv.final_features[:, 3:5], [[0, 1], [1, 0]])
    np.testing.assert_allclose(venv.final_features[:, 5], r)
    assert (x[:, 3:] == 0).all()  # the returned features already start the next episode


def _long_episode_env() -> str:
    import gymnasium as gym
    from tiny_env import RecallFirst

    env_id = "ham_rl_test/RecallFirstLong-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=RecallFirst, kwargs={"length": 41}, disable_env_checker=True)
    return env_id


def _update_rows(ppo: PPO):
    """The first minibatch's replay inputs as the update builds them, for every env row."""
    b_obs = torch.from_numpy(ppo.obs).transpose(0, 1)
    b_starts = torch.from_numpy(ppo.starts).transpose(0, 1)
    return ppo.context.rows(torch.arange(ppo.cfg.num_envs), b_obs, b_starts, ppo.state0, ppo.agent)


@pytest.mark.parametrize("memory", ["gru", "ham", "attention", "gdn"])
def test_gradient_reaches_the_cue_across_rollout_boundaries(memory):
    # 40-step episodes, 16-step rollouts: the episode in progress at the 4th rollout began 8 steps before it, with the
    # cue (the bit) at its first step. The loss at the rollout's last step must depend on that step's input.
    ppo = _ppo(memory, _long_episode_env(), num_envs=2, num_steps=16, num_minibatches=1)
    for _ in range(3):
        ppo.iterate()
    ppo.collect_rollout()
    x, state, starts, context = _update_rows(ppo)
    assert context == 8 and starts[:, 0].all()  # the replay begins at the episode start, 8 steps before the rollout
    x = x.clone().requires_grad_()
    _, _, value = ppo.agent.evaluate_actions(x, state, starts, ppo.actions.transpose(0, 1), context)
    (grad,) = torch.autograd.grad(value[:, -1].sum(), x)
    assert (grad[:, 0].abs().sum(-1) > 0).all()  # the cue step, in the previous rollout
    # Truncated BPTT (context_steps=0) replays from the rollout start: the cue is not on any gradient path.
    cut = _ppo(memory, _long_episode_env(), num_envs=2, num_steps=16, num_minibatches=1, context_steps=0)
    for _ in range(3):
        cut.iterate()
    cut.collect_rollout()
    assert _update_rows(cut)[3] == 0


def test_episodes_longer_than_the_context_replay_from_the_oldest_kept_state():
    ppo = _ppo("gru", _long_episode_env(), num_envs=2, num_steps=16, num_minibatches=1, context_steps=16)
    for _ in range(2):
        ppo.iterate()
    ppo.collect_rollout()  # steps 32..47: the episode began 32 steps ago, only one rollout (16 steps) is kept
    x, state, starts, context = _update_rows(ppo)
    assert context == 16 and x.shape[1] == 32 and not starts[:, 0].any()
    torch.testing.assert_close(state.rnn[0], ppo.context.states[0].rnn[0], rtol=0, atol=0)


def test_iteration_reports_its_cost_and_the_largest_cache_an_episode_ended_with():
    torch.manual_seed(0)
    venv = VecEnv("cue-first-d50", 4, seed=0)  # 52-step episodes: every env ends one inside a 64-step rollout
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, "attention", 16, {"num_heads": 2})
    ppo = PPO(agent, venv, PPOConfig(num_envs=4, num_steps=64, num_minibatches=2, update_epochs=1), 256)
    stats = ppo.iterate()
    at_end = ppo.cache_len[torch.from_numpy(ppo.dones)]
    assert stats["memory/kv_len_max"] == int(at_end.max()) == 52  # attention caches every step of the episode
    assert stats["memory/kv_len_mean"] == pytest.approx(float(at_end.float().mean()))
    assert stats["time/rollout_s"] > 0 and stats["time/update_s"] > 0


def _cleanrl_gae(rewards, values, next_value, dones, gamma, gae_lambda):
    """CleanRL's GAE loop on torch tensors, as ``PPO.compute_advantages`` ran it before ``gae``."""
    nonterminal = 1.0 - dones.float()
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        nextvalues = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nonterminal[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * nonterminal[t] * lastgaelam
        advantages[t] = lastgaelam
    return advantages


@pytest.mark.parametrize("T,B", [(1, 3), (7, 5), (202, 32)])
def test_gae_equals_cleanrl_loop_bit_for_bit(T, B):
    from ham_rl.agents.ppo import gae

    rng = np.random.default_rng(T * B)
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    values = rng.normal(size=(T, B)).astype(np.float32)
    next_value = rng.normal(size=B).astype(np.float32)
    dones = rng.random((T, B)) < 0.2
    got = gae(rewards, values, next_value, dones, 0.99, 0.95)
    want = _cleanrl_gae(*(torch.from_numpy(a) for a in (rewards, values, next_value, dones)), 0.99, 0.95)
    assert got.dtype == np.float32 and got.shape == (T, B)
    assert torch.equal(torch.from_numpy(got), want)
    # an episode's end stops the recursion: the step before a done does not see what follows it
    if T > 1:
        done_at = np.flatnonzero(dones[:-1, 0])
        for t in done_at:
            assert got[t, 0] == np.float32(rewards[t, 0] - values[t, 0])


def _tensors(state) -> list[torch.Tensor]:
    cache = [] if state.cache is None else [getattr(state.cache, f) for f in ("keys", "values", "scores", "times", "length")]
    return [*state.rnn, *cache, state.episode_len]


# rows of whole (5-step) episodes (one gather an epoch), and episodes across rollouts
@pytest.mark.parametrize("num_steps", [5, 4])
def test_epoch_rows_are_the_minibatches_rows(num_steps):
    register_tiny_env()
    ppo = _ppo("ham", "ham_rl_test/RecallFirst-v0", num_envs=8, num_steps=num_steps, num_minibatches=4, context_steps=8)
    ppo.iterate()
    ppo.collect_rollout()
    b_obs = torch.from_numpy(ppo.obs).transpose(0, 1).contiguous()
    b_starts = torch.from_numpy(ppo.starts).transpose(0, 1).contiguous()
    perm = torch.randperm(8)
    rows = ppo.context.epoch_rows(perm, 2, b_obs, b_starts, ppo.state0, ppo.agent)
    assert len(rows) == 4
    contexts = []
    for (x, state, starts, context), i in zip(rows, range(0, 8, 2), strict=True):
        want = ppo.context.rows(perm[i : i + 2], b_obs, b_starts, ppo.state0, ppo.agent)
        assert torch.equal(x, want[0]) and torch.equal(starts, want[2]) and context == want[3]
        for a, b in zip(_tensors(state), _tensors(want[1]), strict=True):
            assert torch.equal(a, b)
        contexts.append(context)
    assert (max(contexts) > 0) == (num_steps == 4)  # the split episodes replay context, the whole ones none


def test_a_rollout_checks_the_memory_state_it_starts_from():
    # the rollout skips the memory's argument checks after its first step (checked=t > 0), not at it
    register_tiny_env()
    ppo = _ppo("ham", "ham_rl_test/RecallFirst-v0", num_envs=4, num_steps=5)
    ppo.collect_rollout()
    ppo.state = ppo.agent.initial_state(3)  # another number of envs
    with pytest.raises(ValueError, match="MemoryState for B=4 envs"):
        ppo.collect_rollout()
