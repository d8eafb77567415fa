"""The sequence form equals T calls of the step form: outputs, final state, cache contents and lengths."""

import math
from dataclasses import replace

import pytest
import torch
from memory_helpers import assert_states_close, random_starts, run_steps

from ham_rl import MEMORIES, make_memory

B, T, IN, D = 5, 24, 7, 16

HAM_VARIANTS = {
    "ham": {},
    "ham-learned": {},
    "ham-tau-inf": {"threshold": math.inf},
    "ham-tau-neg-inf": {"threshold": -math.inf},
    "ham-capacity": {"capacity": 3, "threshold": -math.inf},
    "ham-capacity-surprise": {"capacity": 2, "threshold": 0.3},
    "ham-learned-capacity": {"capacity": 3, "threshold": 0.4},
    "ham-fixed-decay": {"fixed_decay": True},
    "ham-conv-time": {"conv_size": 4, "conv_path": "qkv", "time_feature": True},  # the defaults before 2026-12-01
    "ham-conv-qkv": {"conv_size": 4, "conv_path": "qkv"},
    "ham-no-conv": {"conv_size": 0},
    "ham-readout-clock": {"time_feature": "readout"},
    "ham-cosine-score": {"score": "cosine", "threshold": 0.5, "target_fraction": None},  # the spec's router
    "ham-error-score-capacity": {"threshold": 0.1, "capacity": 2},
    "ham-sink": {"attn_sink": 1.0, "threshold": 0.1},
    "ham-sink-capacity": {"attn_sink": -0.5, "threshold": 0.1, "capacity": 2},
}


# Windows shorter than a segment, so the oldest entries are evicted inside it and across the carried-in cache.
SMALL_WINDOWS = {"window-evicting": ("window", {"window": 5}), "hqlt-evicting": ("hqlt", {"window": 3})}


def build(case: str):
    if case in MEMORIES:
        return make_memory(case, IN, D)
    if case in SMALL_WINDOWS:
        name, options = SMALL_WINDOWS[case]
        return make_memory(name, IN, D, **options)
    name = "ham-learned" if case.startswith("ham-learned") else "ham"
    return make_memory(name, IN, D, **HAM_VARIANTS[case])


CASES = list(MEMORIES) + [c for c in HAM_VARIANTS if c not in MEMORIES] + list(SMALL_WINDOWS)


@pytest.mark.parametrize("case", CASES)
def test_sequence_equals_steps_with_carried_state(case):
    mem = build(case)
    # A first segment builds a carried-in state (RNN state and a non-empty cache), the second is compared.
    warm = torch.randn(B, T, IN)
    _, state = mem(warm, mem.initial_state(B), random_starts(B, T))
    x = torch.randn(B, T, IN)
    starts = random_starts(B, T, p=0.1)
    starts[0] = False  # env 0 carries its episode through the whole segment
    starts[1, T // 2] = True  # env 1 restarts mid-segment
    y_seq, state_seq = mem(x, state, starts)
    y_step, state_step = run_steps(mem, x, state, starts)
    torch.testing.assert_close(y_seq, y_step, atol=1e-5, rtol=0)
    assert_states_close(state_seq, state_step)


@pytest.mark.parametrize("conv_path", ["local", "qkv"])
@pytest.mark.parametrize("input_size, folded", [(IN, True), (40, False)])
def test_folded_and_plain_convolution_agree(input_size, folded, conv_path):
    # Narrow inputs run the short convolution folded into its projection, wide ones on the projections; both
    # forms (and their different conv histories) must give the same memory, step by step and over carried state.
    torch.manual_seed(0)
    mem = make_memory("ham", input_size, D, conv_size=4, conv_path=conv_path)
    assert mem.conv_folded is folded
    other = make_memory("ham", input_size, D, conv_size=4, conv_path=conv_path)
    other.load_state_dict(mem.state_dict())
    other.conv_folded = not folded
    xs = [torch.randn(B, T, input_size) for _ in range(2)]
    starts = [random_starts(B, T, p=0.15) for _ in range(2)]
    outs = []
    for m in (mem, other):
        state, ys = m.initial_state(B), []
        for x, s in zip(xs, starts, strict=True):
            y, state = m(x, state, s)
            ys.append(y)
        y_step, _ = run_steps(m, xs[1], m(xs[0], m.initial_state(B), starts[0])[1], starts[1])
        torch.testing.assert_close(ys[1], y_step, atol=1e-5, rtol=0)
        outs.append(torch.cat(ys, 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_capacity_case_really_evicts():
    mem = build("ham-capacity")
    x = torch.randn(B, T, IN)
    _, state = run_steps(mem, x, mem.initial_state(B), torch.zeros(B, T, dtype=torch.bool))
    assert state.cache_len.tolist() == [3] * B  # every token routed, only 3 kept
    assert (state.cache.times[:, :3] > 2).any()  # later tokens replaced earlier ones


def test_sequence_form_leaves_input_state_untouched():
    mem = make_memory("ham", IN, D, threshold=-math.inf)
    _, state = mem(torch.randn(B, T, IN), mem.initial_state(B), random_starts(B, T))
    before = state.clone()
    mem(torch.randn(B, T, IN), state, random_starts(B, T))
    assert_states_close(before, state, atol=0)


@pytest.mark.parametrize("name", list(MEMORIES))
def test_one_step_segment(name):
    mem = make_memory(name, IN, D)
    x, starts = torch.randn(B, 1, IN), torch.ones(B, 1, dtype=torch.bool)
    y_seq, s_seq = mem(x, mem.initial_state(B), starts)
    y_step, s_step = run_steps(mem, x, mem.initial_state(B), starts)
    torch.testing.assert_close(y_seq, y_step, atol=1e-5, rtol=0)
    assert_states_close(s_seq, s_step)


def _all_tensors(state):
    cache = () if state.cache is None else (state.cache.keys, state.cache.values, state.cache.scores, state.cache.times)
    return (*state.rnn, *cache, state.cache_len, state.episode_len)


@pytest.mark.parametrize("case", ["ham-capacity", "window-evicting", "attention", "gdn", "gru"])
def test_step_leaves_its_input_state_alone_unless_inplace(case):
    # A full cache (evictions) and a reset in the stepped batch: the two writes that overwrite entries in place.
    mem = build(case)
    _, state = run_steps(mem, torch.randn(B, 8, IN), mem.initial_state(B), torch.zeros(B, 8, dtype=torch.bool))
    if state.cache is not None:
        state = replace(state, cache=state.cache.reserve(state.cache.slots + 1))  # room: no reallocation inside step
    x, start = torch.randn(B, IN), torch.tensor([True] + [False] * (B - 1))
    before = state.clone()
    with torch.no_grad():
        y, new = mem.step(x, state, start)
        for a, b in zip(_all_tensors(state), _all_tensors(before), strict=True):
            assert torch.equal(a, b)  # every allocated slot, not only the valid ones
        y_inplace, new_inplace = mem.step(x, state, start, inplace=True)
    torch.testing.assert_close(y, y_inplace, atol=0, rtol=0)
    assert_states_close(new, new_inplace, atol=0)
    if state.cache is not None:
        # in place: the returned cache is the input's storage, and the input's entries were overwritten
        assert new_inplace.cache.keys.data_ptr() == state.cache.keys.data_ptr()
        assert new.cache.keys.data_ptr() != state.cache.keys.data_ptr()
        assert not torch.equal(state.cache.keys, before.cache.keys)
