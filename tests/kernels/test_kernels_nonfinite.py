"""A NaN or inf input stays inside its episode in every kernel: the torch paths and Triton (under the interpreter).

Each test runs a kernel on clean inputs and again with one env's token, carried-in state or cache entry made
non-finite, then checks: the other envs come out bitwise the same; that env's outputs before the bad input are
bitwise the same; after its next reset they are finite and equal to the clean run's (to round-off: the chunked
forms' chunk-local cumsum of log decays runs over the whole chunk, so a reset inside a chunk sees the earlier g).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import needs_interpreter

from ham_rl.kernels.cache_attention.reference import masked_cache_attention
from ham_rl.kernels.cache_attention.sdpa import sdpa_cache_attention
from ham_rl.kernels.gated_delta_rule.cpu_recurrent import cpu_recurrent_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.naive_chunk import naive_chunk_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.reference import naive_recurrent_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.torch_chunk import torch_chunk_gated_delta_rule
from ham_rl.kernels.ham_step import plan_cache
from ham_rl.kernels.ham_step.cpu_step import cpu_ham_step
from ham_rl.kernels.ham_step.reference import ham_step as reference_ham_step

BAD = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")]
ENV = 0  # the env that gets the bad input; envs 1 and 2 must not notice
B, T, H, K, V, C = 3, 40, 2, 16, 16, 16
#: (bad step, reset step) of env ENV: inside one chunk of C tokens, and across chunks
SPANS = [pytest.param(5, 11, id="one-chunk"), pytest.param(14, 35, id="across-chunks")]


def _triton_chunk(*args):
    from ham_rl.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule

    return chunk_gated_delta_rule(*args, chunk_size=C)


def _triton_attention(*args):
    from ham_rl.kernels.cache_attention.parallel import parallel_cache_attention

    return parallel_cache_attention(*args, block_m=16, block_n=16)


def _triton_step(*args, **kwargs):
    from ham_rl.kernels.ham_step.fused import fused_ham_step

    return fused_ham_step(*args, **kwargs)


DELTA_RULES = [
    pytest.param(naive_recurrent_gated_delta_rule, id="recurrent"),
    pytest.param(partial(naive_chunk_gated_delta_rule, chunk_size=C), id="naive_chunk"),
    pytest.param(partial(torch_chunk_gated_delta_rule, chunk_size=C), id="torch_chunk"),
    pytest.param(partial(cpu_recurrent_gated_delta_rule, block=8), id="cpu_recurrent"),
    pytest.param(_triton_chunk, id="triton_chunk", marks=needs_interpreter),
]
CONTAINED = DELTA_RULES[1:]  # the recurrent reference's backward runs through the NaN state (0 * NaN): not contained
ATTENTIONS = [
    pytest.param(masked_cache_attention, id="reference"),
    pytest.param(sdpa_cache_attention, id="sdpa"),
    pytest.param(_triton_attention, id="triton", marks=needs_interpreter),
]
STEPS = [
    pytest.param(reference_ham_step, id="reference"),
    pytest.param(cpu_ham_step, id="native"),
    pytest.param(_triton_step, id="triton", marks=needs_interpreter),
]


def _assert_contained(clean: torch.Tensor, bad: torch.Tensor, before: int, after: int | None, name: str) -> None:
    """Other envs bitwise equal, env ENV bitwise equal before step ``before`` and finite and close from ``after``."""
    others = [b for b in range(clean.shape[0]) if b != ENV]
    assert torch.equal(clean[others], bad[others]), f"{name}: another env changed"
    assert torch.equal(clean[ENV, :before], bad[ENV, :before]), f"{name}: steps before the bad input changed"
    if after is not None:
        assert torch.isfinite(bad[ENV, after:]).all(), f"{name}: non-finite after the reset"
        torch.testing.assert_close(bad[ENV, after:], clean[ENV, after:], atol=1e-6, rtol=0, msg=name)


# -- gated delta rule --------------------------------------------------------------------------------------------
def _delta_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 0.4
    h0 = torch.randn(B, H, K, V, generator=gen)
    starts = torch.rand(B, T, generator=gen) < 0.08
    starts[ENV] = False
    return [q, k, v, beta, g, h0], starts


def _spoil(xs: list, which: str, t: int, value: float) -> list:
    """A copy of the inputs with env ENV's step t of ``which`` (or all five per-token inputs) set to ``value``."""
    xs = [x.clone() for x in xs]
    for i, name in enumerate(("q", "k", "v", "beta", "g")):
        if which in ("all", name):
            xs[i][ENV, t] = value
    return xs


#: (form, which input of the token is bad); the Triton kernel sees the same sanitised token whichever it was
DELTA_RULE_CASES = [
    pytest.param(fn.values[0], which, id=f"{fn.id}-{which}", marks=fn.marks)
    for fn in DELTA_RULES
    for which in ("all", "k", "v", "g", "q")
    if fn.id != "triton_chunk" or which in ("all", "q")
]


@pytest.mark.parametrize("fn, which", DELTA_RULE_CASES)
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("t_bad, t_reset", SPANS)
def test_delta_rule_bad_token_stays_in_its_episode(fn, which, value, t_bad, t_reset):
    xs, starts = _delta_inputs()
    starts[ENV, t_reset] = True
    clean = fn(*xs[:5], starts, xs[5], 0.7)
    bad = fn(*_spoil(xs, which, t_bad, value)[:5], starts, xs[5], 0.7)
    for name, a, b in zip(("o", "v_hat"), clean[:2], bad[:2], strict=True):
        _assert_contained(a, b, t_bad, t_reset, name)
    assert torch.isnan(bad[0][ENV, t_reset - 1]).any() == (which != "q"), "the bad episode's NaN is not hidden"
    _assert_contained(clean[2][:, None], bad[2][:, None], 0, 0, "final_state")


@pytest.mark.parametrize("fn", DELTA_RULES)
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("t_reset", [0, 3, 20])
def test_delta_rule_bad_carried_state_is_forgotten_at_the_reset(fn, value, t_reset):
    xs, starts = _delta_inputs()
    starts[ENV, t_reset] = True
    bad_h0 = xs[5].clone()
    bad_h0[ENV, 1, 2, 3] = value
    clean = fn(*xs[:5], starts, xs[5], 0.7)
    bad = fn(*xs[:5], starts, bad_h0, 0.7)
    for name, a, b in zip(("o", "v_hat"), clean[:2], bad[:2], strict=True):
        _assert_contained(a, b, 0, t_reset, name)
    _assert_contained(clean[2][:, None], bad[2][:, None], 0, 0, "final_state")


@pytest.mark.parametrize("fn", CONTAINED)
@pytest.mark.parametrize("t_bad, t_reset", SPANS)
def test_gradients_of_the_clean_steps_are_contained(fn, t_bad, t_reset):
    # A loss on every output outside the bad episode's poisoned steps: its gradients are finite and those of the
    # clean run, except the bad token's own inputs, which get 0 (they were replaced by a no-op token).
    xs, starts = _delta_inputs()
    starts[ENV, t_reset] = True
    keep = torch.ones(B, T, 1, 1, dtype=torch.bool)
    keep[ENV, t_bad:t_reset] = False
    weight = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(1))
    grads = []
    for inputs in (xs, _spoil(xs, "all", t_bad, float("nan"))):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, _, state = fn(*leaves[:5], starts, leaves[5], 0.7)
        loss = (torch.where(keep, o, 0.0) * weight).sum() + state.sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), *grads, strict=True):
        assert torch.isfinite(b).all(), f"{name}: non-finite gradient"
        if name != "dh0":
            assert (b[ENV, t_bad] == 0).all(), f"{name}: the bad token got a gradient"
            a, b = a.clone(), b.clone()
            a[ENV, t_bad] = b[ENV, t_bad] = 0
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


# -- cache attention ---------------------------------------------------------------------------------------------
S0, TA, RESET_A = 4, 20, 8  # carried-in slots (slot 3 past env ENV's length), segment steps, env ENV's reset


def _attention_inputs():
    """q, keys, values and ``visible`` as HAM's sequence form builds them; env ENV holds 3 carried-in entries."""
    gen = torch.Generator().manual_seed(0)
    S = S0 + TA
    q = F.normalize(torch.randn(B, TA, H, K, generator=gen), dim=-1) * 4
    keys = F.normalize(torch.randn(B, S, H, K, generator=gen), dim=-1)
    values = torch.randn(B, S, H, V, generator=gen)
    starts = torch.rand(B, TA, generator=gen) < 0.1
    starts[ENV] = False
    starts[ENV, RESET_A] = True
    routed = torch.rand(B, TA, generator=gen) < 0.5
    routed[ENV, 3] = True  # the segment token spoiled below is in the cache
    ep = starts.long().cumsum(1)
    length = torch.tensor([3, S0, 2])
    carried = (ep == 0)[:, :, None] & (torch.arange(S0) < length[:, None])[:, None, :]
    t = torch.arange(TA)
    own = (ep[:, :, None] == ep[:, None, :]) & (t[None, :, None] >= t[None, None, :]) & routed[:, None, :]
    return q, keys, values, torch.cat([carried, own], 2)


#: (what is spoiled, the first step that sees it, the first step after env ENV's reset) of env ENV
ATTENTION_CASES = [
    pytest.param("carried-value", 0, RESET_A, id="carried-value"),
    pytest.param("carried-key", 0, RESET_A, id="carried-key"),
    pytest.param("stale-slot", TA, 0, id="stale-slot-never-visible"),
    pytest.param("segment-token", 3, RESET_A, id="segment-token"),
    pytest.param("query", 5, 6, id="query"),
]


def _spoil_attention(q, keys, values, case, value):
    q, keys, values = q.clone(), keys.clone(), values.clone()
    if case == "carried-value":
        values[ENV, 1, 0, 2] = value
    elif case == "carried-key":
        keys[ENV, 1, 1] = value
    elif case == "stale-slot":
        keys[ENV, 3], values[ENV, 3] = value, value
    elif case == "segment-token":
        keys[ENV, S0 + 3], values[ENV, S0 + 3] = value, value
    else:
        q[ENV, 5] = value
    return q, keys, values


@pytest.mark.parametrize("fn", ATTENTIONS)
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("case, first_seen, after", ATTENTION_CASES)
def test_attention_bad_entry_reaches_only_the_queries_that_see_it(fn, value, case, first_seen, after):
    q, keys, values, visible = _attention_inputs()
    clean = fn(q, keys, values, visible, 0.5)
    bad = fn(*_spoil_attention(q, keys, values, case, value), visible, 0.5)
    _assert_contained(clean, bad, first_seen, after, "o")
    if first_seen < TA:
        assert torch.isnan(bad[ENV, first_seen]).any(), "a query that sees the bad entry hides it"


@pytest.mark.parametrize("fn", ATTENTIONS)
def test_attention_gradients_of_the_clean_queries_are_contained(fn):
    q, keys, values, visible = _attention_inputs()
    keep = torch.ones(B, TA, 1, 1, dtype=torch.bool)
    keep[ENV, :RESET_A] = False  # the queries that see the spoiled carried-in entry
    weight = torch.randn(B, TA, H, V, generator=torch.Generator().manual_seed(1))
    grads = []
    for inputs in ((q, keys, values), _spoil_attention(q, keys, values, "carried-value", float("nan"))):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o = fn(*leaves, visible, 0.5)
        grads.append(torch.autograd.grad((torch.where(keep, o, 0.0) * weight).sum(), leaves))
    for name, a, b in zip(("dq", "dkeys", "dvalues"), *grads, strict=True):
        assert torch.isfinite(b).all(), f"{name}: non-finite gradient"
        if name != "dq":
            a, b = a.clone(), b.clone()
            a[ENV, 1] = b[ENV, 1] = 0  # the spoiled entry: its gradient is 0 (it was replaced)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


# -- the fused rollout step --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", STEPS)
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("capacity", [0, 3])
def test_step_reset_forgets_a_bad_state_and_cache(fn, value, capacity):
    # Env ENV's RNN state and its 3 cache entries are bad and it starts an episode; env 1 has bad garbage in the
    # slots past its length (a finished episode's); env 2 is clean. Three steps must match the clean run.
    gen = torch.Generator().manual_seed(0)
    L = 6
    clean = dict(
        rnn=torch.randn(B, H, K, V, generator=gen),
        keys=F.normalize(torch.randn(B, L, H, K, generator=gen), dim=-1),
        values=torch.randn(B, L, H, V, generator=gen),
        scores=torch.rand(B, L, generator=gen),
        times=torch.arange(L).expand(B, L).clone(),
        length=torch.tensor([3, 2, 3]),
    )
    bad = {n: t.clone() for n, t in clean.items()}
    bad["rnn"][ENV, 0, 1, 2] = value
    for name in ("keys", "values", "scores"):
        bad[name][ENV, :3] = value
        bad[name][1, 2:] = value
    runs = []
    for state in (clean, bad):
        s, outs = {n: t.clone() for n, t in state.items()}, []
        step_gen = torch.Generator().manual_seed(1)
        for t in range(3):
            q, k = (F.normalize(torch.randn(B, H, K, generator=step_gen), dim=-1) for _ in range(2))
            v = torch.randn(B, H, V, generator=step_gen)
            beta, gr, ga = (torch.rand(B, H, generator=step_gen) for _ in range(3))
            g = -torch.rand(B, H, generator=step_gen) * 0.3
            start = torch.tensor([t == 0, False, False])
            step = torch.full((B,), 10 + t)
            o, s["rnn"], s["length"], score, routed = fn(
                q, k, v, beta, g, gr, ga, s["rnn"], s["keys"], s["values"], s["scores"], s["times"], s["length"],
                start, step, -1.0 if capacity else 0.5, capacity=capacity,
            )  # fmt: skip
            outs += [o, s["rnn"], s["length"], score, routed.long()]
        runs.append(outs)
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(a, b), f"output {i % 5} of step {i // 5} differs"


def test_plan_ignores_bad_scores_past_the_carried_length():
    gen = torch.Generator().manual_seed(0)
    scores, times = torch.rand(B, 5, generator=gen), torch.arange(5).expand(B, 5).clone()
    length = torch.tensor([2, 5, 0])
    starts = torch.rand(B, 12, generator=gen) < 0.2
    steps = torch.arange(5, 17).expand(B, 12).clone()
    score = torch.rand(B, 12, generator=gen)
    routed = score > 0.3
    bad = scores.clone()
    bad[0, 2:] = float("nan")
    bad[2] = float("inf")
    for capacity in (0, 3):
        a = plan_cache(scores, times, length, starts, steps, score, routed, capacity)
        b = plan_cache(bad, times, length, starts, steps, score, routed, capacity)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.final_length, b.final_length)
        assert torch.equal(a.final_source, b.final_source)


@pytest.mark.parametrize("fn", STEPS)
def test_step_does_not_hide_a_bad_entry_of_the_episode(fn):
    # Without a reset, a NaN entry the env's cache holds makes its attention readout NaN, as in the reference.
    gen = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(B, 4, H, K, generator=gen), dim=-1)
    values = torch.randn(B, 4, H, V, generator=gen)
    values[ENV, 1] = float("nan")
    q, k = (F.normalize(torch.randn(B, H, K, generator=gen), dim=-1) for _ in range(2))
    v, beta, gr, ga = torch.randn(B, H, V, generator=gen), *(torch.rand(B, H, generator=gen) for _ in range(3))
    o, *_ = fn(
        q, k, v, beta, -beta, gr, ga, torch.zeros(B, H, K, V), keys, values, torch.rand(B, 4, generator=gen),
        torch.arange(4).expand(B, 4).clone(), torch.full((B,), 3), torch.zeros(B, dtype=torch.bool), torch.full((B,), 5), 0.5,
        use_rnn=False,
    )  # fmt: skip
    assert torch.isnan(o[ENV]).all() and torch.isfinite(o[1:]).all()
