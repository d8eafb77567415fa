"""The HAM layer's native step (``cpu_layer_step``, the CPU default) equals its PyTorch step and its sequence form:
outputs, RNN state, convolution history, cache contents, routing; and it runs exactly where its layout fits."""

from __future__ import annotations

import math

import pytest
import torch
from memory_helpers import assert_states_close, random_starts, run_steps

from ham_rl import make_memory
from ham_rl.kernels.ham_step import cpu_step

B, T, IN, D = 6, 30, 40, 64  # 40 inputs: the convolution runs on the local projection, not folded into it

VARIANTS = {
    "defaults": {},
    "cosine-score": {"score": "cosine", "threshold": 0.5, "target_fraction": None},
    "caching-all-capacity": {"threshold": -math.inf, "capacity": 3},
    "error-capacity": {"threshold": 0.1, "capacity": 2},
    "relative-score": {"score": "relative", "threshold": 0.9},
    "sink": {"attn_sink": 1.0, "threshold": 0.1},
    "gate-bias-conv2": {"gate_bias": 2.0, "conv_size": 2, "threshold": 0.2},
    "readout-clock": {"time_feature": "readout", "threshold": 0.2},
}


def _count_native_steps(monkeypatch) -> list:
    calls = []
    original = cpu_step.cpu_layer_step
    monkeypatch.setattr(cpu_step, "cpu_layer_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _memory(options: dict, seed: int = 0):
    torch.manual_seed(seed)
    mem = make_memory("ham", IN, D, **options)
    with torch.no_grad():  # trained-looking readout: larger gates and a spread of conv weights
        for p in mem.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mem


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_step_equals_the_torch_step_and_the_sequence_form(monkeypatch, variant):
    mem = _memory(VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    warm, x = torch.randn(B, T, IN, generator=gen), torch.randn(B, T, IN, generator=gen)
    _, state = mem(warm, mem.initial_state(B), random_starts(B, T, generator=gen))  # a carried-in RNN state and cache
    starts = random_starts(B, T, p=0.1, generator=gen)
    starts[0] = False
    starts[1, T // 2] = True
    calls = _count_native_steps(monkeypatch)
    mem.end_update()  # the warm-up's sequence form counts nothing; start the step counts from zero anyway
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "native")
    y_native, s_native = run_steps(mem, x, state, starts)
    assert len(calls) == T, "the native step did not run for this layout"
    tau = mem.threshold
    counted_native = mem.end_update()["kv_fraction"]
    mem.set_threshold(tau)  # end_update's feedback rule moved it
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "torch")
    y_torch, s_torch = run_steps(mem, x, state, starts)
    assert len(calls) == T
    # the native step counts the routed steps itself (the feedback rule moves tau by them)
    assert counted_native == mem.end_update()["kv_fraction"] > 0
    mem.set_threshold(tau)
    torch.testing.assert_close(y_native, y_torch, atol=2e-5, rtol=0)
    assert_states_close(s_native, s_torch, atol=2e-5)
    y_seq, s_seq = mem(x, state, starts)
    torch.testing.assert_close(y_native, y_seq, atol=2e-5, rtol=0)
    assert_states_close(s_native, s_seq, atol=2e-5)
    cached = int(s_native.cache_len.sum())
    assert 0 < cached, "nothing was cached: the case does not exercise the cache"


@pytest.mark.parametrize(
    "name, options, input_size, grad",
    [
        ("gdn", {}, IN, False),  # no attention path
        ("attention", {}, IN, False),  # no RNN path
        ("ham-learned", {}, IN, False),  # a learned router
        ("ham", {"conv_path": "qkv"}, IN, False),
        ("ham", {"fixed_decay": True}, IN, False),
        ("ham", {}, 7, False),  # narrow inputs: the convolution is folded into its projection
        ("ham", {}, IN, True),  # a step that records a graph
    ],
)
def test_native_step_runs_only_where_its_layout_fits(monkeypatch, name, options, input_size, grad):
    mem = make_memory(name, input_size, D, **options)
    calls = _count_native_steps(monkeypatch)
    state = mem.initial_state(B)
    with torch.set_grad_enabled(grad):
        mem.step(torch.randn(B, input_size), state, torch.ones(B, dtype=torch.bool))
    assert calls == []


def test_native_step_is_the_default_for_ham(monkeypatch):
    monkeypatch.delenv("HAM_RL_CPU_KERNEL", raising=False)
    calls = _count_native_steps(monkeypatch)
    mem = make_memory("ham", IN, D)
    with torch.no_grad():
        mem.step(torch.randn(B, IN), mem.initial_state(B), torch.ones(B, dtype=torch.bool), inplace=True)
    assert calls == [1]


@pytest.mark.parametrize("variant", ["defaults", "error-capacity", "sink"])
def test_checked_steps_equal_checked_ones(variant):
    # Memory.step(checked=True), as a rollout's later steps run: the same outputs and state, bit for bit
    mem = _memory(VARIANTS[variant])
    gen = torch.Generator().manual_seed(2)
    x, starts = torch.randn(B, T, IN, generator=gen), random_starts(B, T, p=0.1, generator=gen)
    results = []
    for checked in (False, True):
        state, ys = mem.initial_state(B), []
        with torch.no_grad():
            for t in range(T):
                y, state = mem.step(x[:, t], state, starts[:, t], inplace=True, checked=checked and t > 0)
                ys.append(y)
        results.append((torch.stack(ys, 1), state))
    (y0, s0), (y1, s1) = results
    assert torch.equal(y0, y1)
    assert_states_close(s0, s1, atol=0)
    assert int(s1.cache_len.sum()) > 0
