"""The CPU path of cache attention (torch's SDPA with a boolean mask) against ``masked_cache_attention``."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close
from test_kernels_cache_attention import ham_visible

from ham_rl.kernels.cache_attention import cache_attention
from ham_rl.kernels.cache_attention.reference import masked_cache_attention
from ham_rl.kernels.cache_attention.sdpa import sdpa_cache_attention


@pytest.mark.parametrize(
    "B, T, S0, H, K, V, dtype",
    [
        pytest.param(2, 1, 0, 2, 16, 16, torch.float32, id="step-empty-cache"),
        pytest.param(3, 37, 5, 2, 24, 24, torch.float32, id="T37-S5-fp32"),
        pytest.param(2, 20, 3, 4, 16, 8, torch.float64, id="T20-K16-V8-fp64"),
    ],
)
@pytest.mark.parametrize("scale_kind", ["none", "float", "per-head-tensor"])
def test_sdpa_matches_reference_with_gradients(B, T, S0, H, K, V, dtype, scale_kind):
    gen = torch.Generator().manual_seed(0)
    S = S0 + T
    q, keys = (torch.randn(B, n, H, K, generator=gen, dtype=dtype).requires_grad_() for n in (T, S))
    values = torch.randn(B, S, H, V, generator=gen, dtype=dtype).requires_grad_()
    scale = {"none": None, "float": 2.5, "per-head-tensor": torch.rand(H, generator=gen, dtype=dtype) * 4}[scale_kind]
    if isinstance(scale, torch.Tensor):
        scale.requires_grad_()
    visible = ham_visible(B, T, S0, 0.3, gen)
    visible[0, -1] = False  # a row that sees nothing gives 0 and no gradient
    do = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    leaves = (q, keys, values) + ((scale,) if isinstance(scale, torch.Tensor) else ())
    results = []
    for fn in (masked_cache_attention, sdpa_cache_attention):
        o = fn(q, keys, values, visible, scale)
        results.append([o, *torch.autograd.grad((o * do).sum(), leaves)])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, ref, got in zip(("o", "dq", "dkeys", "dvalues", "dscale"), *results, strict=False):
        # dscale sums over every logit: float32 summation order alone moves it by a few 1e-5
        assert_close(name, ref, got, tol * (10 if name == "dscale" else 1))
    assert not results[1][0][0, -1].any(), "a row with nothing visible must give 0"


def test_sdpa_handles_an_empty_candidate_list():
    q = torch.randn(2, 3, 2, 8, requires_grad=True)
    empty = torch.zeros(2, 0, 2, 8)
    o = sdpa_cache_attention(q, empty, empty, torch.zeros(2, 3, 0, dtype=torch.bool), 1.0)
    assert o.shape == q.shape and not o.any()
    o.sum().backward()
    assert not q.grad.any()


def test_dispatcher_uses_sdpa_on_cpu(monkeypatch):
    monkeypatch.setenv("HAM_RL_BACKEND", "torch")
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    gen = torch.Generator().manual_seed(1)
    q, keys, values = (torch.randn(1, n, 1, 16, generator=gen) for n in (6, 8, 8))
    visible = ham_visible(1, 6, 2, 0.5, gen)
    got = cache_attention(q, keys, values, visible)
    assert calls, "the CPU path did not call scaled_dot_product_attention"
    assert_close("o", masked_cache_attention(q, keys, values, visible), got, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_with_a_sink_matches_reference_with_gradients(dtype):
    gen = torch.Generator().manual_seed(2)
    B, T, S0, H, K, V = 3, 17, 4, 2, 16, 8
    q, keys = (torch.randn(B, n, H, K, generator=gen, dtype=dtype).requires_grad_() for n in (T, S0 + T))
    values = torch.randn(B, S0 + T, H, V, generator=gen, dtype=dtype).requires_grad_()
    sink = torch.randn(B, H, generator=gen, dtype=dtype).requires_grad_()
    visible = ham_visible(B, T, S0, 0.3, gen)
    visible[0, -1] = False
    do = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    results = []
    for fn in (masked_cache_attention, sdpa_cache_attention):
        o = fn(q, keys, values, visible, 3.0, sink)
        results.append([o, *torch.autograd.grad((o * do).sum(), (q, keys, values, sink))])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, ref, got in zip(("o", "dq", "dkeys", "dvalues", "dsink"), *results, strict=True):
        assert_close(name, ref, got, tol)
    assert sink.grad is None and results[1][4].abs().sum() > 0, "the sink must get a gradient"


def test_a_sink_takes_the_weight_of_an_entry_that_matches_no_better():
    """An entry at the sink's logit is read at half weight; with no entry the output is 0; a very low sink is none."""
    q = torch.tensor([[[[1.0, 0.0]]]])  # [1, 1, 1, 2]
    keys = torch.tensor([[[[1.0, 0.0]]]])
    values = torch.tensor([[[[2.0, -4.0]]]])
    visible = torch.ones(1, 1, 1, dtype=torch.bool)
    logit = 3.0  # q . k * scale
    for fn in (masked_cache_attention, sdpa_cache_attention, cache_attention):
        half = fn(q, keys, values, visible, logit, torch.tensor([[logit]]))
        assert_close("o", values / 2, half, 1e-6)
        assert not fn(q, keys, values, ~visible, logit, torch.tensor([[logit]])).any()
        assert_close("o", values, fn(q, keys, values, visible, logit, torch.tensor([[-1e4]])), 1e-6)
