"""MemoryState and KVCache: indexing, concatenation, detach, devices, stats, save/load."""

import io

import pytest
import torch
from memory_helpers import assert_states_close, random_starts

from ham_rl import MEMORIES, KVCache, MemoryState, make_memory

B, T, IN, D = 4, 12, 5, 8


def warm_state(name: str) -> tuple:
    mem = make_memory(name, IN, D, **({"threshold": 0.0} if name.startswith("ham") else {}))
    x = torch.randn(B, T, IN, requires_grad=True)
    return mem, mem(x, mem.initial_state(B), random_starts(B, T))[1]


@pytest.mark.parametrize("name", list(MEMORIES))
def test_index_and_cat_round_trip(name):
    mem, state = warm_state(name)
    parts = [state[0], state[1:3], state[torch.tensor([3])]]
    assert [len(p) for p in parts] == [1, 2, 1]
    assert_states_close(MemoryState.cat(parts), state, atol=0)
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(state[mask].episode_len, state.episode_len[mask])


@pytest.mark.parametrize("name", list(MEMORIES))
def test_stats_detach_clone_to(name):
    mem, state = warm_state(name)
    assert state.cache_len.dtype == torch.long and state.cache_len.shape == (B,)
    assert state.episode_len.dtype == torch.long and state.episode_len.shape == (B,)
    if not mem.has_cache:
        assert state.cache_len.tolist() == [0] * B
    detached = state.detach()
    assert all(not t.requires_grad for t in detached.rnn)
    assert state.to("cpu").device.type == "cpu"
    clone = state.clone()
    if state.cache is not None:
        clone.cache.keys.add_(1.0)
        assert not torch.equal(clone.cache.keys, state.cache.keys)


def test_cat_pads_caches_of_different_allocations():
    a = KVCache.empty(1, 2, 4, 4, slots=3)
    b = KVCache.empty(2, 2, 4, 4, slots=9)
    joined = KVCache.cat([a, b])
    assert joined.keys.shape == (3, 9, 2, 4) and joined.length.shape == (3,)


def test_state_save_load_round_trip():
    mem, state = warm_state("ham")
    buffer = io.BytesIO()
    torch.save(state.detach().state_dict(), buffer)
    buffer.seek(0)
    loaded = MemoryState.from_state_dict(torch.load(buffer))
    assert_states_close(loaded, state.detach(), atol=0)


def test_memory_save_load_keeps_threshold(tmp_path):
    mem = make_memory("ham", IN, D, target_fraction=0.2)
    mem.set_threshold(0.77)
    torch.save(mem.state_dict(), tmp_path / "m.pt")
    other = make_memory("ham", IN, D, target_fraction=0.2)
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert other.threshold == pytest.approx(0.77)
    x, starts = torch.randn(B, T, IN), random_starts(B, T)
    torch.testing.assert_close(mem(x, mem.initial_state(B), starts)[0], other(x, other.initial_state(B), starts)[0])


def test_cat_rejects_mixed_memories():
    _, ham_state = warm_state("ham")
    _, gru_state = warm_state("gru")
    with pytest.raises(ValueError, match="different kinds of memory"):
        MemoryState.cat([ham_state, gru_state])
