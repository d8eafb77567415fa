"""The rollout step's fast forms, the native CPU step and the fused Triton step (under the interpreter), against
``ham_rl.kernels.ham_step.reference.ham_step``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, needs_interpreter

from ham_rl.kernels import native
from ham_rl.kernels.ham_step import cpu_step
from ham_rl.kernels.ham_step.cpu_step import cpu_ham_step
from ham_rl.kernels.ham_step.reference import ham_step as reference_ham_step

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


#: the native step takes float32 only; it also has the error score, the attention's null entry (sink) and a cache
#: that is a slice of a larger reservation, as the memories' step hands it over
NATIVE_CASES = [c for c in CASES if c.values[6] == torch.float32] + [
    pytest.param(16, 4, 16, 16, 0, 9, torch.float32, "error", id="B16-H4-D16-unbounded-error-score"),
    pytest.param(16, 4, 16, 16, 0, 9, torch.float32, "relative", id="B16-H4-D16-unbounded-relative-score"),
    pytest.param(16, 2, 16, 16, 3, 8, torch.float32, "sink", id="B16-H2-D16-cap3-sink-per-head-scale"),
    pytest.param(8, 2, 16, 32, 0, 6, torch.float32, "strided", id="B8-H2-K16-V32-unbounded-strided-cache"),
    # caches past 16 entries: the logits run in blocks of 16 entries, then a tail
    pytest.param(8, 2, 16, 16, 0, 40, torch.float32, "long", id="B8-H2-D16-unbounded-40-entries"),
    pytest.param(4, 2, 32, 16, 0, 36, torch.float32, "long", id="B4-H2-K32-V16-unbounded-36-entries"),
]


@needs_interpreter
@pytest.mark.parametrize("B, H, K, V, capacity, steps, dtype, mode", CASES)
def test_fused_step_matches_reference(B, H, K, V, capacity, steps, dtype, mode):
    from ham_rl.kernels.ham_step.fused import fused_ham_step

    _compare_with_reference(fused_ham_step, B, H, K, V, capacity, steps, dtype, mode)


@pytest.mark.parametrize("B, H, K, V, capacity, steps, dtype, mode", NATIVE_CASES)
def test_native_step_matches_reference(B, H, K, V, capacity, steps, dtype, mode):
    _compare_with_reference(cpu_ham_step, B, H, K, V, capacity, steps, dtype, mode)


def _compare_with_reference(step_fn, B, H, K, V, capacity, steps, dtype, mode):
    gen = torch.Generator().manual_seed(0)
    L = (capacity + 1) if capacity else steps + 2
    spare = 5 if mode == "strided" else 0  # the cache is the first L slots of L + 5
    cache = dict(
        keys=torch.zeros(B, L + spare, H, K, dtype=dtype),
        values=torch.zeros(B, L + spare, H, V, dtype=dtype),
        scores=torch.zeros(B, L + spare),
        times=torch.zeros(B, L + spare, dtype=torch.long),
    )
    caches = {side: {n: t.clone()[:, :L] for n, t in cache.items()} for side in ("ref", "tri")}
    state = {"ref": torch.randn(B, H, K, V, generator=gen), "tri": None}
    state["tri"] = state["ref"].clone()
    length = {"ref": torch.zeros(B, dtype=torch.long), "tri": torch.zeros(B, dtype=torch.long)}
    episode_step = torch.zeros(B, dtype=torch.long)
    use_rnn = mode != "router-ties"
    use_attention = mode != "gdn"
    scale = torch.tensor([0.5, 0.25])[:H] if mode in ("router-ties", "sink") else None
    threshold = {"surprise": 0.95, "error": 1.0, "relative": 1.3, "sink": 0.9, "long": 0.0}.get(mode, 0.3)
    score_kind = mode if mode in ("error", "relative") else "cosine"
    sink = torch.randn(B, H, generator=gen) if mode == "sink" else None
    saw = {"evict": False, "empty": False, "reject": False}
    for t in range(steps):
        x = _inputs(B, H, K, V, dtype, gen)
        start = torch.rand(B, generator=gen) < (0.02 if mode == "long" else 0.15)
        if t == 0:
            start[: B // 2] = True
        episode_step = torch.where(start, 0, episode_step + 1)
        router = None
        if mode == "router-ties":  # few distinct values: ties in score, evictions of the oldest
            router = torch.tensor([0.2, 0.5, 0.8])[torch.randint(0, 3, (B,), generator=gen)]
        outs = {}
        for side in ("ref", "tri"):
            fn = reference_ham_step if side == "ref" else step_fn
            c = caches[side]
            extra = {} if score_kind == "cosine" and sink is None else {"score_kind": score_kind, "sink": sink}
            outs[side] = fn(
                *x, state[side], c["keys"], c["values"], c["scores"], c["times"], length[side], start, episode_step,
                threshold, capacity=capacity, router_score=router, use_rnn=use_rnn, use_attention=use_attention,
                scale=scale, **extra,
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
        saw["long"] = max(saw.get("long", 0), int(n_r.max()))
        state = {"ref": s_r, "tri": s_t}
        length = {"ref": n_r, "tri": n_t}
    if mode in ("surprise", "sink") and capacity:
        assert saw["evict"] and saw["empty"], f"the case did not exercise eviction and empty caches: {saw}"
    if mode == "long":
        assert saw["long"] > 32, f"the longest cache held {saw['long']} entries: no block of 16 and tail"
    if mode in ("error", "relative", "strided"):
        assert 0 < int(length["ref"].sum()) < B * steps, "the case routed every step or none"


@needs_interpreter
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


def _step_args(B=2, H=2, D=16, L=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = _inputs(B, H, D, D, torch.float32, gen)
    rest = (
        torch.zeros(B, H, D, D), torch.zeros(B, L, H, D), torch.zeros(B, L, H, D), torch.zeros(B, L),
        torch.zeros(B, L, dtype=torch.long), torch.tensor([0, 2]), torch.tensor([True, False]), torch.tensor([0, 2]),
    )  # fmt: skip
    return (*x, *rest)


def _count_native_calls(monkeypatch) -> list:
    calls = []
    original = cpu_step.cpu_ham_step
    monkeypatch.setattr(cpu_step, "cpu_ham_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("choice, grad, native_calls", [("native", False, 1), ("torch", False, 0), ("native", True, 0)])
def test_dispatcher_runs_the_native_step_on_cpu_without_grad(monkeypatch, choice, grad, native_calls):
    import ham_rl.kernels.ham_step as ops

    monkeypatch.setenv("HAM_RL_BACKEND", "auto")
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", choice)
    calls = _count_native_calls(monkeypatch)
    checks = []
    supports = cpu_step.supports
    monkeypatch.setattr(cpu_step, "supports", lambda *a: checks.append(1) or supports(*a))
    args = list(_step_args())
    if grad:
        args[0] = args[0].clone().requires_grad_()  # a step that needs a gradient runs the reference, which has one
    with torch.set_grad_enabled(grad):
        got = ops.ham_step(*args, 0.5, capacity=2)
    ref = reference_ham_step(*_step_args(), 0.5, capacity=2)
    assert len(calls) == native_calls
    assert len(checks) == native_calls  # the layout is checked once a step, by the dispatcher, not again in the call
    for name, a, b in zip(("o", "state", "length", "score", "routed"), ref, got, strict=False):
        assert_close(name, a.float(), b.float(), 1e-5)


def test_dispatcher_runs_the_reference_where_the_native_step_cannot_build(monkeypatch):
    import ham_rl.kernels.ham_step as ops

    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "native")
    monkeypatch.setattr(native, "_ops", None)
    monkeypatch.setattr(native, "_error", "could not build the native CPU kernels (no ninja)")
    monkeypatch.setattr(native, "_warned", False)
    calls = _count_native_calls(monkeypatch)
    with pytest.warns(UserWarning, match="no ninja.*running the PyTorch forms"), torch.no_grad():
        got = ops.ham_step(*_step_args(), 0.5)
    assert calls == []
    for name, a, b in zip(("o", "length"), reference_ham_step(*_step_args(), 0.5), got, strict=False):
        assert_close(name, a.float(), b.float(), 1e-5)


def test_native_step_refuses_what_it_does_not_take():
    args = list(_step_args())
    args[8] = args[8].double()  # a float64 cache
    with pytest.raises(ValueError, match="float32 tensors, int64 times and a cache with contiguous rows"):
        cpu_ham_step(*args, 0.5)
    with pytest.raises(ValueError, match="score_kind='l1': allowed cosine, error, relative"):
        cpu_ham_step(*_step_args(), 0.5, score_kind="l1")
