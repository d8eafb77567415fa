"""forward_group: several memories over the same rows in one batched call equal the separate calls."""

import pytest
import torch
from memory_helpers import assert_states_close, random_starts

from ham_rl import make_memory
from ham_rl.memory import forward_group

B, T, IN, D = 3, 20, 7, 16

# (name, options): HAM-family configurations; each memory projects its own rows, so every one of them groups
GROUPED = [
    ("ham", {}),
    ("ham-learned", {}),
    ("ham", {"conv_size": 3, "input_size": 40}),  # wide input: the convolution runs on the projections, not folded
    ("ham", {"capacity": 3, "threshold": 0.3}),
    ("ham", {"fixed_decay": True}),
    ("ham", {"attn_sink": 1.0, "threshold": 0.1}),  # each memory's own sink reaches its own rows
    ("ham", {"conv_size": 4}),
    ("ham", {"time_feature": True}),
    ("ham", {"time_feature": "readout"}),
    ("ham", {"conv_size": 4, "conv_path": "qkv", "time_feature": True}),  # the defaults before 2026-12-01
    ("ham", {"conv_size": 3, "conv_path": "qkv", "input_size": 40}),
    ("gdn", {}),
    ("attention", {}),
    ("window", {"window": 5}),
    ("hqlt", {"window": 3}),
]


IDS = [f"{name}-{'-'.join(map(str, options.values())) or 'default'}" for name, options in GROUPED]


def _pair_with_carried_states(name, options, seed=0):
    torch.manual_seed(seed)
    options = dict(options)
    input_size = options.pop("input_size", IN)
    memories = [make_memory(name, input_size, D, **options) for _ in range(2)]
    states = []
    for m in memories:  # a first segment gives each memory its own carried state (RNN, conv history, cache)
        with torch.no_grad():
            warm_starts = random_starts(B, T, p=0.1)
            _, state = m(torch.randn(B, T, input_size), m.initial_state(B), warm_starts)
        states.append(state)
    return memories, states


@pytest.mark.parametrize(
    "name, options", GROUPED, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in GROUPED]
)
def test_grouped_equals_separate_calls(name, options):
    memories, states = _pair_with_carried_states(name, options)
    with torch.no_grad():  # different taus, so the two memories route differently
        memories[1].tau.fill_(0.2) if memories[1].threshold is not None else None
    assert memories[0]._groupable(memories)
    x, starts = torch.randn(B, T, memories[0].input_size), random_starts(B, T, p=0.15)
    starts[1, T // 2] = True
    separate = [m(x, s, starts) for m, s in zip(memories, states, strict=True)]
    grouped = forward_group(memories, x, states, starts)
    for (y_sep, s_sep), (y_grp, s_grp) in zip(separate, grouped, strict=True):
        torch.testing.assert_close(y_grp, y_sep, atol=1e-5, rtol=0)
        assert_states_close(s_grp, s_sep)
    # Gradients reach each memory's own parameters as in the separate calls.
    weights = [torch.randn_like(y) for y, _ in separate]
    params = [p for m in memories for p in m.parameters()]
    want = torch.autograd.grad(
        sum((y * w).sum() for (y, _), w in zip(separate, weights, strict=True)), params, allow_unused=True
    )
    got = torch.autograd.grad(
        sum((y * w).sum() for (y, _), w in zip(grouped, weights, strict=True)), params, allow_unused=True
    )
    for (pname, _), a, b in zip([np for m in memories for np in m.named_parameters()], got, want, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, pname
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=pname)


def test_grouped_input_states_are_untouched():
    memories, states = _pair_with_carried_states("ham", {})
    before = [s.clone() for s in states]
    forward_group(memories, torch.randn(B, T, IN), states, random_starts(B, T))
    for a, b in zip(states, before, strict=True):
        assert_states_close(a, b, atol=0)


def test_memories_with_different_input_stages_group():
    # The input stage (time feature, convolution, gates) is each memory's own code; only the delta rule's and the
    # attention's settings must agree.
    torch.manual_seed(0)
    memories = [make_memory("ham", IN, D), make_memory("ham", IN, D, conv_size=0, time_feature=False, fixed_decay=True)]
    memories.append(make_memory("ham", IN, D, conv_path="qkv", time_feature=True))
    assert memories[0]._groupable(memories)
    states = [m.initial_state(B) for m in memories]
    x, starts = torch.randn(B, T, IN), random_starts(B, T)
    for (y_grp, s_grp), m, s in zip(forward_group(memories, x, states, starts), memories, states, strict=True):
        y_sep, s_sep = m(x, s, starts)
        torch.testing.assert_close(y_grp, y_sep, atol=1e-5, rtol=0)
        assert_states_close(s_grp, s_sep)


@pytest.mark.parametrize(
    "case", ["different head counts", "different capacities", "one with a sink", "ham and attention", "gru"]
)
def test_falls_back_to_separate_calls(case):
    torch.manual_seed(0)
    if case == "different head counts":
        memories = [make_memory("ham", IN, D, num_heads=2), make_memory("ham", IN, D, num_heads=4)]
    elif case == "different capacities":
        memories = [make_memory("ham", IN, D, capacity=4), make_memory("ham", IN, D)]
    elif case == "one with a sink":
        memories = [make_memory("ham", IN, D, attn_sink=0.0), make_memory("ham", IN, D)]
    elif case == "ham and attention":
        memories = [make_memory("ham", IN, D), make_memory("attention", IN, D)]
    else:
        memories = [make_memory("gru", IN, D) for _ in range(2)]
    assert not memories[0]._groupable(memories)
    states = [m.initial_state(B) for m in memories]
    x, starts = torch.randn(B, T, IN), random_starts(B, T)
    for (y_grp, _), m, s in zip(forward_group(memories, x, states, starts), memories, states, strict=True):
        torch.testing.assert_close(y_grp, m(x, s, starts)[0])


def test_bad_input_is_rejected_like_a_single_call():
    memories, states = _pair_with_carried_states("ham", {})
    with pytest.raises(ValueError, match="memories but"):
        forward_group(memories, torch.randn(B, T, IN), states[:1], random_starts(B, T))
    with pytest.raises(ValueError, match="bool tensor"):
        forward_group(memories, torch.randn(B, T, IN), states, torch.zeros(B, T))
