"""The sequence form's cache plan: which candidates each token sees, against a step-by-step replay."""

import torch

from ham_rl.kernels.ham_step import plan_cache


def replay(length0: torch.Tensor, L0: int, starts: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """``[B, T, L0 + T]`` bool by walking the segment a step at a time: the unbounded cache's contents after step t."""
    B, T = starts.shape
    seen = torch.zeros(B, T, L0 + T, dtype=torch.bool)
    for b in range(B):
        cache = list(range(int(length0[b])))
        for t in range(T):
            if starts[b, t]:
                cache = []
            if routed[b, t]:
                cache.append(L0 + t)
            seen[b, t, cache] = True
    return seen


def test_unbounded_plan_sees_what_a_step_by_step_cache_holds_through_columns_of_routed_tokens_only():
    torch.manual_seed(0)
    B, T, L0 = 3, 40, 5
    starts = torch.rand(B, T) < 0.08
    routed = torch.rand(B, T) < 0.1
    length0 = torch.tensor([5, 2, 0])
    scores, times = torch.rand(B, L0), torch.arange(L0).expand(B, L0)
    steps = torch.arange(T).expand(B, T)
    plan = plan_cache(scores, times, length0, starts, steps, torch.rand(B, T), routed, capacity=0)
    # the masks' width follows the cache: the carried slots plus the most routed tokens of any env, not T
    assert plan.visible.shape == (B, T, L0 + int(routed.sum(1).max()))
    full = torch.zeros(B, T, L0 + T, dtype=torch.bool)
    full.scatter_(2, plan.columns[:, None, :].expand(-1, T, -1), plan.visible)  # columns -> candidate numbers
    assert torch.equal(full, replay(length0, L0, starts, routed))
    final = replay(length0, L0, starts, routed)[:, -1]
    for b in range(B):
        n = int(plan.final_length[b])
        assert plan.final_source[b, :n].tolist() == final[b].nonzero().flatten().tolist()


def test_capacity_plan_native_equals_the_pytorch_replay(monkeypatch):
    # The native replay (cpu_plan.cpp) against _plan_with_capacity's loop over time: the same visible masks, final
    # slots and lengths, with carried caches (one past capacity's room), resets, ties of scores (the oldest goes),
    # a new score below all (not stored) and NaN scores.
    from ham_rl.kernels import native
    from ham_rl.kernels.ham_step import cache_plan

    if not native.native_available():
        import pytest

        pytest.skip("the native CPU kernels could not be built here")
    torch.manual_seed(1)
    B, T, L0, capacity = 5, 60, 4, 3
    starts = torch.rand(B, T) < 0.05
    score = torch.randint(0, 4, (B, T)).float() / 4  # few values: many ties
    score[1, 7] = float("nan")
    routed = torch.rand(B, T) < 0.5
    routed[1, 7] = True
    scores = torch.randint(0, 4, (B, L0)).float() / 4
    scores[2, 0] = float("nan")  # a NaN carried in: every later comparison with it is false
    times = torch.randint(0, 20, (B, L0))
    length0 = torch.tensor([3, 2, 3, 0, 1])
    steps = torch.arange(T).expand(B, T) + 20
    calls = []
    load = native.load_native
    monkeypatch.setattr(native, "load_native", lambda: calls.append(1) or load())
    got = cache_plan.plan_cache(scores, times, length0, starts, steps, score, routed, capacity)
    assert calls, "the float32 CPU plan did not run the native replay"
    ref = cache_plan._plan_with_capacity(scores, times, length0, starts, steps, score, routed, capacity)
    assert torch.equal(got.visible, ref.visible)
    assert torch.equal(got.final_length, ref.final_length)
    assert torch.equal(got.final_source, ref.final_source)
    assert int(got.visible.sum(2).max()) == capacity, "the cache filled to capacity, so eviction was exercised"


def test_attention_plan_native_equals_the_pytorch_plan_and_candidates(monkeypatch):
    # Without a capacity the plan and the attention's candidates are one native call (cpu_plan.cpp's plan_unbounded):
    # the same candidates, masks, final slots and lengths as plan_cache + seen_candidates, element for element (the
    # padding columns and slots too), across no routed token, all routed, a carried cache or none, one step, resets.
    import itertools

    import pytest

    from ham_rl.kernels import native
    from ham_rl.kernels.ham_step import attention_plan, seen_candidates

    if not native.native_available():
        pytest.skip("the native CPU kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    calls, load = [], native.load_native
    monkeypatch.setattr(native, "load_native", lambda: calls.append(1) or load())
    cases = itertools.product((1, 3), (1, 5, 40), (0, 1, 7), (0.0, 0.1, 1.0), (0.0, 0.1, 0.5))
    for B, T, L0, p_route, p_start in cases:
        length0 = torch.randint(0, L0 + 1, (B,), generator=g)
        starts, routed = torch.rand(B, T, generator=g) < p_start, torch.rand(B, T, generator=g) < p_route
        score, steps = torch.rand(B, T, generator=g), torch.arange(T).expand(B, T)
        scores, times = torch.rand(B, L0, generator=g), torch.randint(0, 9, (B, L0), generator=g)
        calls.clear()
        got = attention_plan(scores, times, length0, starts, steps, score, routed, 0)
        assert calls, "the CPU plan without a capacity did not run the native call"
        plan = plan_cache(scores, times, length0, starts, steps, score, routed, 0)
        index, seen = seen_candidates(plan.visible)
        want = (plan.candidates(index), seen, plan.final_source, plan.final_length)
        for name, a, b in zip(("candidates", "seen", "final_source", "final_length"), got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs at B={B} T={T} L0={L0}"
        assert got[1].shape[-1] % 16 == 0
