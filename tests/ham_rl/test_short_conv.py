"""The short convolution's hand-written forward and backward against the masked-slices formula it replaces."""

from __future__ import annotations

import pytest
import torch

from ham_rl.kernels.short_conv import cpu_conv
from ham_rl.kernels.short_conv.cpu_conv import cpu_short_conv
from ham_rl.memory.short_conv import ShortConv, folded_short_conv, short_conv


def masked_slices(x, history, steps, weight, bias):
    """``SiLU(bias + sum_j w_j x_{t-j} [steps_t >= j])`` through autograd: the readable form."""
    T, K = x.shape[1], weight.shape[0]
    padded = torch.cat([history.to(x.dtype), x], 1)
    y = x * weight[0] + bias
    for j in range(1, K):
        in_episode = (steps >= j).to(x.dtype)[..., None]
        y = y + padded[:, K - 1 - j : K - 1 - j + T] * in_episode * weight[j]
    return torch.nn.functional.silu(y), padded[:, T:]


def _inputs(B, T, C, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    history = torch.randn(B, K - 1, C, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(K, C, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)
    # Episode steps with starts inside the rows: step 0 wherever an episode begins.
    starts = torch.rand(B, T, generator=gen) < 0.2
    steps = torch.zeros(B, T, dtype=torch.long)
    running = torch.randint(0, 5, (B,), generator=gen)  # the carried-in episode's age
    for t in range(T):
        running = torch.where(starts[:, t], 0, running)
        steps[:, t] = running
        running = running + 1
    return (x, history, weight, bias), steps


@pytest.mark.parametrize("B, T, C, K", [(3, 20, 8, 4), (2, 1, 5, 4), (2, 2, 5, 4), (1, 7, 3, 1), (2, 9, 4, 2)])
def test_matches_masked_slices_values_and_gradients(B, T, C, K):
    (x, history, weight, bias), steps = _inputs(B, T, C, K)
    want_y, want_history = masked_slices(x, history, steps, weight, bias)
    got_y, got_history = short_conv(x, history, steps, weight, bias)
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=1e-12)
    assert torch.equal(got_history, want_history)
    dy = torch.randn_like(want_y)
    leaves = (x, history, weight, bias)
    want = torch.autograd.grad(want_y, leaves, dy, allow_unused=True)  # K = 1 reads no history
    want = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, want, strict=True)]
    got = torch.autograd.grad(got_y, leaves, dy)
    for name, a, b in zip(("x", "history", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("B, T, F, C, K", [(3, 20, 4, 12, 4), (2, 1, 3, 6, 4), (1, 7, 2, 5, 1), (2, 9, 5, 8, 2)])
def test_folded_equals_convolution_of_the_projection(B, T, F, C, K):
    # The folded form takes the raw inputs (and keeps raw inputs as history); the convolution of W x must come out.
    (x, history, weight, bias), steps = _inputs(B, T, F, K)
    proj = torch.randn(C, F, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(K, C, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    want_y, _ = masked_slices(x @ proj.T, history @ proj.T, steps, weight, bias)
    got_y, got_history = folded_short_conv(x, history, steps, proj, weight, bias)
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=1e-12)
    assert torch.equal(got_history, torch.cat([history, x], 1)[:, T:])
    dy = torch.randn_like(want_y)
    leaves = (x, history, proj, weight, bias)
    want = torch.autograd.grad(want_y, leaves, dy, allow_unused=True)
    want = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, want, strict=True)]
    got = torch.autograd.grad(got_y, leaves, dy, allow_unused=True)
    got = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, got, strict=True)]
    for name, a, b in zip(("x", "history", "proj", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_folded_previous_episode_never_leaks_even_inf_or_nan():
    proj, weight, bias = torch.randn(6, 3), torch.randn(4, 6, requires_grad=True), torch.zeros(6)
    x = torch.randn(1, 5, 3)
    history = torch.full((1, 3, 3), float("nan"))
    history[0, 0] = float("inf")
    fresh = torch.arange(5)[None]
    y, _ = folded_short_conv(x, history, fresh, proj, weight, bias)
    y_zero, _ = folded_short_conv(x, torch.zeros_like(history), fresh, proj, weight, bias)
    assert torch.equal(y, y_zero)
    y.sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_gradcheck_float64():
    (x, history, weight, bias), steps = _inputs(2, 9, 3, 4)
    assert torch.autograd.gradcheck(lambda *a: short_conv(a[0], a[1], steps, *a[2:])[0], (x, history, weight, bias))


def test_previous_episode_never_leaks_even_inf_or_nan():
    conv = ShortConv(6, 4)
    x = torch.randn(1, 5, 6)
    history = torch.full((1, 3, 6), float("nan"))
    history[0, 0] = float("inf")
    fresh = torch.arange(5)[None]  # the row starts a new episode at t = 0
    y, _ = conv(x, history, fresh)
    y_zero, _ = conv(x, torch.zeros_like(history), fresh)
    assert torch.equal(y, y_zero)
    y.sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_no_grad_path_gives_the_same_output():
    (x, history, weight, bias), steps = _inputs(3, 12, 5, 4)
    y, h = short_conv(x, history, steps, weight, bias)
    with torch.no_grad():  # rollouts take the plain forward, without the autograd.Function
        y0, h0 = short_conv(x, history, steps, weight, bias)
    assert torch.equal(y.detach(), y0) and torch.equal(h.detach(), h0)


def test_mixed_precision_gradients_match_input_dtypes():
    # bfloat16 activations with float32 weights (as under autocast): each gradient comes back in its input's dtype.
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 6, requires_grad=True)
    bias = torch.zeros(6, requires_grad=True)
    y, _ = short_conv(x, torch.zeros(2, 3, 6), torch.arange(9)[None].expand(2, -1), weight, bias)
    y.float().sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)


@pytest.mark.parametrize("B, T, C, K", [(3, 20, 8, 4), (2, 1, 5, 4), (2, 2, 5, 4), (1, 7, 3, 1), (2, 9, 4, 2)])
def test_native_form_matches_masked_slices_values_and_gradients(B, T, C, K):
    # The CPU default for float32 (kernels/short_conv/cpu_conv.cpp), against the readable form in float64.
    (x, history, weight, bias), steps = _inputs(B, T, C, K)
    want_y, want_history = masked_slices(x, history, steps, weight, bias)
    dy = torch.randn_like(want_y)
    leaves = (x, history, weight, bias)
    want = torch.autograd.grad(want_y, leaves, dy, allow_unused=True)
    want = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, want, strict=True)]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    got_y, got_history = cpu_short_conv(leaves32[0], leaves32[1], steps, leaves32[2], leaves32[3])
    torch.testing.assert_close(got_y.double(), want_y, rtol=0, atol=1e-5)
    assert torch.equal(got_history, want_history.float())
    got = torch.autograd.grad(got_y, leaves32, dy.float())
    for name, a, b in zip(("x", "history", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4, msg=name)
    with torch.no_grad():  # the rollout's call: no graph, the same numbers
        y_nograd, _ = cpu_short_conv(*(t.detach() for t in leaves32[:2]), steps, *(t.detach() for t in leaves32[2:]))
    assert torch.equal(y_nograd, got_y.detach())


def test_native_form_keeps_a_finished_episodes_nan_out():
    (x, history, weight, bias), steps = _inputs(2, 6, 4, 4)
    x, history, weight, bias = (t.detach().float() for t in (x, history, weight, bias))
    history[0] = float("nan")  # env 0's previous episode ended in NaN ...
    steps[0] = torch.arange(6)  # ... and its new episode starts at this segment's first step
    y, _ = cpu_short_conv(x, history, steps, weight, bias)
    assert torch.isfinite(y[0]).all()


@pytest.mark.parametrize("choice, native_calls", [("native", 1), ("torch", 0)])
def test_short_conv_runs_the_native_form_on_float32_cpu_tensors(monkeypatch, choice, native_calls):
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", choice)
    calls = []
    original = cpu_conv.cpu_short_conv
    monkeypatch.setattr(cpu_conv, "cpu_short_conv", lambda *a: calls.append(1) or original(*a))
    (x, history, weight, bias), steps = _inputs(2, 5, 3, 4)
    want = short_conv(*(t.detach() for t in (x, history)), steps, *(t.detach() for t in (weight, bias)))  # float64
    got = short_conv(*(t.detach().float() for t in (x, history)), steps, *(t.detach().float() for t in (weight, bias)))
    assert len(calls) == native_calls
    torch.testing.assert_close(got[0].double(), want[0], rtol=0, atol=1e-5)
