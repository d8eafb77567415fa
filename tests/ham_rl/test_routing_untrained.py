"""What an untrained HAM caches at its default options: a new symbol amid a periodic stream, and little else."""

import numpy as np
import pytest
import torch
from memory_helpers import run_steps

from ham_rl import make_memory
from ham_rl.envs.recall_tasks import novelty_stream

PERIOD, VOCAB, T, EPISODES = 8, 12, 200, 200


def periodic_stream_with_cue(seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """One-hot symbols cycling with period 8 (random phase), one of 4 new symbols at a step in [20, 100]."""
    x, cue_at = novelty_stream(np.random.default_rng(seed), EPISODES, T, PERIOD, VOCAB, cue_steps=(20, 100))
    return torch.from_numpy(x), cue_at


def cached_steps(mem, x: torch.Tensor) -> np.ndarray:
    """``[episodes, T]`` bool: the steps the step form routed to the cache, one episode per row."""
    starts = torch.zeros(x.shape[:2], dtype=torch.bool)
    starts[:, 0] = True
    state, routed = mem.initial_state(x.shape[0]), []
    with torch.no_grad():
        for t in range(T):
            _, state = mem.step(x[:, t], state, starts[:, t], inplace=True)
            routed.append(mem.last_routing[1].clone())
    return torch.stack(routed, 1).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_ham_caches_the_cue_and_not_the_predictable_steps(seed):
    torch.manual_seed(seed)
    mem = make_memory("ham", VOCAB, 64)
    x, cue_at = periodic_stream_with_cue(seed)
    cached = cached_steps(mem, x)
    rows = np.arange(EPISODES)
    assert cached[rows, cue_at].mean() >= 0.9
    predictable = np.ones_like(cached)
    predictable[:, : 2 * PERIOD] = False  # the first periods are new to the RNN too
    predictable[rows, cue_at] = False
    assert cached[predictable].mean() <= 0.05


def test_the_convolution_on_qkv_blurs_the_score():
    # The layout before 2026-12-01 mixes each step with its neighbours before the score: the cue is mostly missed.
    torch.manual_seed(0)
    x, cue_at = periodic_stream_with_cue(0)
    old = make_memory("ham", VOCAB, 64, conv_path="qkv", score="cosine", threshold=0.5, target_fraction=None)
    cached = cached_steps(old, x)
    assert cached[np.arange(EPISODES), cue_at].mean() < 0.5


def test_step_and_sequence_forms_cache_the_same_steps():
    torch.manual_seed(0)
    mem = make_memory("ham", VOCAB, 64)
    x, _ = periodic_stream_with_cue(1)
    x = x[:16]
    starts = torch.zeros(x.shape[:2], dtype=torch.bool)
    starts[:, 0] = True
    _, state_seq = mem(x, mem.initial_state(16), starts)
    _, state_step = run_steps(mem, x, mem.initial_state(16), starts)
    assert torch.equal(state_seq.cache_len, state_step.cache_len)
    for env, n in enumerate(state_seq.cache_len.tolist()):
        assert torch.equal(state_seq.cache.times[env, :n], state_step.cache.times[env, :n])
