"""Bad input raises ValueError naming the bad value and what is allowed."""

import pytest
import torch

from ham_rl import make_memory


def test_unknown_memory_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown memory 'transformer'.*allowed: ham, ham-learned, gdn"):
        make_memory("transformer", 4, 8)


def test_unknown_option_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'capcity'.*allowed:.*capacity"):
        make_memory("ham", 4, 8, capcity=3)


@pytest.mark.parametrize("capacity", [-1, -10, 1.5, True])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match=rf"`capacity` must be an int >= 0.*got {capacity!r}"):
        make_memory("ham", 4, 8, capacity=capacity)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_heads": 3}, r"`num_heads` must be a positive int dividing hidden_size=8, got 3"),
    ({"target_fraction": 1.5}, r"`target_fraction` must be in \[0, 1\].*got 1.5"),
    ({"threshold": float("nan")}, r"`threshold` must be a number"),
])  # fmt: skip
def test_bad_ham_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_memory("ham", 4, 8, **kwargs)


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match=rf"`input_size` must be a positive int, got {size!r}"):
        make_memory("gru", size, 8)


@pytest.mark.parametrize("name", ["ham", "gru", "mlp"])
def test_wrong_input_size(name):
    mem = make_memory(name, 4, 8)
    state = mem.initial_state(2)
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, T, input_size\] with input_size=4, got \(2, 3, 5\)"):
        mem(torch.randn(2, 3, 5), state, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, input_size\] with input_size=4, got \(2, 5\)"):
        mem.step(torch.randn(2, 5), state, torch.zeros(2, dtype=torch.bool))


def test_starts_of_wrong_dtype_or_shape():
    mem = make_memory("ham", 4, 8)
    state, x = mem.initial_state(2), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"`starts` must be a bool tensor.*got dtype torch.float32; pass `starts.bool\(\)`"):
        mem(x, state, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`starts` must have shape \[B, T\] = \(2, 3\) to match x, got \(3, 2\)"):
        mem(x, state, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`start` must be a bool tensor of shape \[B\], got dtype torch.int64"):
        mem.step(x[:, 0], state, torch.zeros(2, dtype=torch.long))


def test_state_of_wrong_batch_size():
    mem = make_memory("gdn", 4, 8)
    with pytest.raises(ValueError, match=r"`state` must be a MemoryState for B=2 envs, got 3"):
        mem(torch.randn(2, 3, 4), mem.initial_state(3), torch.zeros(2, 3, dtype=torch.bool))


def test_threshold_on_memory_without_router():
    with pytest.raises(ValueError, match=r"GRUMemory has no router"):
        make_memory("gru", 4, 8).set_threshold(0.3)
    assert make_memory("gdn", 4, 8).threshold is None
    assert make_memory("ham", 4, 8, threshold=0.25).threshold == 0.25
