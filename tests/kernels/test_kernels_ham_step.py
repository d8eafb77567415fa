"""The fused Triton rollout step against ``ham_rl.kernels.ham_step.reference.ham_step`` under the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, needs_interpreter

from ham_rl.kernels.ham_step.reference import ham_step as reference_ham_step

pytestmark = needs_interpreter

CASES = [
    # B, H, K, V, capacity, steps, dtype, mode
    pytest.param(64, 2, 16, 16, 4, 7, torch.float32, "surprise", id="B64-H2-D16-cap4-fp32-surprise"),
    pytest.param(3, 3, 24, 24, 0, 4, torch.float16, "surprise", id="B3-H3-D24-unbounded-fp16-surprise"),
    pytest.param(5, 2, 32, 32, 3, 6, torch.float32, "router-ties", id="B5-H2-D32-cap3-fp32-router-ties-no-rnn"),
    pytest.param(4, 1, 64, 64, 2, 3, torch.float32, "gdn", id="B4-H1-D64-fp32-gdn-no-attention"),
]


def _inputs(B, H, K, V, dtype, gen):
    q = F.normalize(torch.randn(B, H, K, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, H, K, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, H, V, generator=gen).to(dtype)
    beta = torch.rand(B, H, generator=gen).to(dtype)
    g = (-torch.rand(B, H, generator=gen) * 0.3).to(dtype)
    gr = torch.rand(B, H, generator=gen).to(dtype)
    ga = torch.rand(B, H, generator=gen).to(dtype)
    return q, k, v, beta, g, gr, ga


@pytest.mark.parametrize("B, H, K, V, capacity, steps, dtype, mode", CASES)
def test_fused_step_matches_reference(B, H, K, V, capacity, steps, dtype, mode):
    from ham_rl.kernels.ham_step.fused import fused_ham_step

    gen = torch.Generator().manual_seed(0)
    L = (capacity + 1) if capacity else steps + 2
    cache = dict(
        keys=torch.zeros(B, L, H, K, dtype=dtype),
        values=torch.zeros(B, L, H, V, dtype=dtype),
        scores=torch.zeros(B, L),
        times=torch.zeros(B, L, dtype=torch.long),
    )
    caches = {"ref": {n: t.clone() for n, t in cache.items()}, "tri": {n: t.clone() for n, t in cache.items()}}
    state = {"ref": torch.randn(B, H, K, V, generator=gen), "tri": None}
    state["tri"] = state["ref"].clone()
    length = {"ref": torch.zeros(B, dtype=torch.long), "tri": torch.zeros(B, dtype=torch.long)}
    episode_step = torch.zeros(B, dtype=torch.long)
    use_rnn = mode != "router-ties"
    use_attention = mode != "gdn"
    scale = torch.tensor([0.5, 0.25])[:H] if mode == "router-ties" else None
    threshold = 0.95 if mode == "surprise" else 0.3
    saw = {"evict": False, "empty": False, "reject": False}
    for t in range(steps):
        x = _inputs(B, H, K, V, dtype, gen)
        start = torch.rand(B, generator=gen) < 0.15
        if t == 0:
            start[: B // 2] = True
        episode_step = torch.where(start, 0, episode_step + 1)
        router = None
        if mode == "router-ties":  # few distinct values: ties in score, evictions of the oldest
            router = torch.tensor([0.2, 0.5, 0.8])[torch.randint(0, 3, (B,), generator=gen)]
        outs = {}
        for side in ("ref", "tri"):
            fn = reference_ham_step if side == "ref" else fused_ham_step
            c = caches[side]
            outs[side] = fn(
                *x, state[side], c["keys"], c["values"], c["scores"], c["times"], length[side], start, episode_step,
                threshold, capacity=capacity, router_score=router, use_rnn=use_rnn, use_attention=use_attention,
                scale=scale,
            )  # fmt: skip
        (o_r, s_r, n_r, sc_r, m_r), (o_t, s_t, n_t, sc_t, m_t) = outs["ref"], outs["tri"]
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert_close(f"step{t}.o", o_r, o_t, tol)
        assert_close(f"step{t}.state", s_r, s_t, tol)
        assert_close(f"step{t}.score", sc_r, sc_t, tol)
        assert torch.equal(m_r, m_t), f"step{t}.routed differs: {m_r.tolist()} vs {m_t.tolist()}"
        assert torch.equal(n_r, n_t), f"step{t}.length differs: {n_r.tolist()} vs {n_t.tolist()}"
        for name in cache:
            assert_close(f"step{t}.cache.{name}", caches["ref"][name], caches["tri"][name], tol)
        if capacity:
            full = length["ref"] * (~start) >= capacity
            saw["evict"] |= bool((full & m_r).any())
        saw["empty"] |= bool((n_r == 0).any())
        state = {"ref": s_r, "tri": s_t}
        length = {"ref": n_r, "tri": n_t}
    if mode == "surprise" and capacity:
        assert saw["evict"] and saw["empty"], f"the case did not exercise eviction and empty caches: {saw}"


@pytest.mark.parametrize("capacity", [0, 2], ids=["unbounded", "cap2"])
def test_dispatcher_runs_triton_on_cpu_when_forced(monkeypatch, capacity):
    import ham_rl.kernels.ham_step as ops

    gen = torch.Generator().manual_seed(1)
    B, H, D, L = 2, 2, 16, 3
    x = _inputs(B, H, D, D, torch.float32, gen)
    args = lambda: (  # noqa: E731
        torch.zeros(B, H, D, D), torch.zeros(B, L, H, D), torch.zeros(B, L, H, D), torch.zeros(B, L),
        torch.zeros(B, L, dtype=torch.long), torch.tensor([0, 2]), torch.tensor([True, False]), torch.tensor([0, 2]),
    )  # fmt: skip
    monkeypatch.setenv("HAM_RL_BACKEND", "triton")
    with torch.no_grad():
        got = ops.ham_step(*x, *args(), 0.5, capacity=capacity)
    monkeypatch.setenv("HAM_RL_BACKEND", "torch")
    ref = ops.ham_step(*x, *args(), 0.5, capacity=capacity)
    for name, a, b in zip(("o", "state", "length", "score", "routed"), ref, got, strict=False):
        assert_close(name, a.float(), b.float(), 1e-5)
