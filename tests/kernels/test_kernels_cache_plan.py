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
