"""Block-sparse Triton cache attention against ``masked_cache_attention`` under the interpreter."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, needs_interpreter

from ham_rl.kernels.cache_attention import cache_attention
from ham_rl.kernels.cache_attention.reference import masked_cache_attention

pytestmark = needs_interpreter


def ham_visible(B, T, S0, p_route, gen):
    """``[B, T, S0 + T]`` as HAM's sequence form builds it: carried-in entries until the first start, then the
    routed tokens of the same episode written at or before t. Env 0 starts at t = 0 (nothing carried in)."""
    starts = torch.rand(B, T, generator=gen) < 0.1
    starts[0, 0] = True
    routed = torch.rand(B, T, generator=gen) < p_route
    ep = starts.long().cumsum(1)  # [B, T]
    carried = (ep == 0)[:, :, None].expand(B, T, S0)  # carried-in cache visible until the first start
    t = torch.arange(T)
    own = (ep[:, :, None] == ep[:, None, :]) & (t[None, :, None] >= t[None, None, :]) & routed[:, None, :]
    return torch.cat([carried, own], 2)


CASES = [
    pytest.param(2, 1, 0, 2, 16, 16, torch.float32, 16, id="B2-T1-S0-H2-D16-empty"),
    pytest.param(2, 37, 5, 2, 24, 24, torch.float32, 16, id="B2-T37-S5-H2-D24-fp32"),
    pytest.param(1, 40, 8, 1, 64, 32, torch.float16, 16, id="B1-T40-S8-H1-K64-V32-fp16"),
    pytest.param(2, 20, 3, 2, 32, 32, torch.float32, 32, id="B2-T20-S3-H2-D32-fp32-block32-tensor-scale"),
]


@pytest.mark.parametrize("B, T, S0, H, K, V, dtype, block", CASES)
def test_triton_cache_attention_matches_reference(B, T, S0, H, K, V, dtype, block):
    from ham_rl.kernels.cache_attention.parallel import parallel_cache_attention, tile_map

    gen = torch.Generator().manual_seed(0)
    S = S0 + T
    q = torch.randn(B, T, H, K, generator=gen).to(dtype).requires_grad_()
    keys = torch.randn(B, S, H, K, generator=gen).to(dtype).requires_grad_()
    values = torch.randn(B, S, H, V, generator=gen).to(dtype).requires_grad_()
    visible = ham_visible(B, T, S0, 0.3, gen)
    visible[0, -1] = False  # a row that sees nothing gives 0
    scale = torch.tensor([0.3, 0.2])[:H] if T == 20 else None  # the per-head tensor scale case
    do = torch.randn(B, T, H, V, generator=gen)
    outs = []
    for fn in (masked_cache_attention, lambda *a: parallel_cache_attention(*a, block_m=block, block_n=block)):
        o = fn(q, keys, values, visible, scale)
        outs.append([o, *torch.autograd.grad((o.float() * do).sum(), (q, keys, values))])
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, a, b in zip(("o", "dq", "dkeys", "dvalues"), *outs, strict=False):
        assert_close(name, a, b, tol)
    assert not outs[1][0][0, -1].any(), "a row with nothing visible must give 0"
    if T > block:  # the kernel does skip tiles: the HAM pattern leaves some (T-block, S-block) tiles empty
        assert (tile_map(visible, block, block) == 0).any()


def test_dispatcher_runs_triton_when_forced(monkeypatch):
    import ham_rl.kernels.cache_attention.parallel as parallel

    calls = []
    original = parallel.ParallelCacheAttentionFunction.apply
    monkeypatch.setattr(parallel.ParallelCacheAttentionFunction, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("HAM_RL_BACKEND", "triton")
    gen = torch.Generator().manual_seed(2)
    q, keys, values = (
        torch.randn(1, 6, 1, 16, generator=gen),
        torch.randn(1, 8, 1, 16, generator=gen),
        torch.randn(1, 8, 1, 16, generator=gen),
    )
    visible = ham_visible(1, 6, 2, 0.5, gen)
    got = cache_attention(q, keys, values, visible)
    assert calls, "HAM_RL_BACKEND=triton did not run the Triton kernel"
    assert_close("o", masked_cache_attention(q, keys, values, visible), got, 1e-5)
