"""The actor-critic heads' native calls (``kernels/actor_critic/cpu_heads.cpp``) against their PyTorch reference: the
rollout step (values, log-probs, and the same actions from the same generator state) and the update's log-probs,
entropies and values with every gradient; and the policy running them where they fit, with the same results as its
PyTorch ops."""

from __future__ import annotations

import pytest
import torch
from gymnasium import spaces
from kernel_testing import assert_close

from ham_rl.agents import RecurrentActorCritic
from ham_rl.kernels import native
from ham_rl.kernels.actor_critic import cpu_heads, reference

pytestmark = pytest.mark.skipif(not native.native_available(), reason="the native CPU kernels could not be built here")


def _heads(D: int, M: int, A: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (0.4 * torch.randn(*shape, generator=gen)).requires_grad_()

    return (w(M, D), w(M), w(A, M), w(A)), (w(M, D), w(M), w(1, M), w(1))


# hidden 64 with heads of 64 (the trainer's), and widths off the 16-float vectors (the scalar tails)
SHAPES = [(32, 64, 64, 4), (5, 40, 24, 7), (1, 16, 16, 2), (3, 64, 70, 3)]


@pytest.mark.parametrize("B,D,M,A", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_step_matches_the_reference(B, D, M, A, deterministic):
    actor, critic = _heads(D, M, A)
    y = 2 * torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(7)
        ref = reference.actor_critic_step(y, actor, critic, deterministic)
        ref_next = torch.rand(4)
        torch.manual_seed(7)
        got = cpu_heads.cpu_actor_critic_step(y, actor, critic, deterministic)
        got_next = torch.rand(4)
    assert torch.equal(got[0], ref[0]), "the sample is not the reference's (same generator state)"
    assert torch.equal(got_next, ref_next), "the step drew another number of values from the default generator"
    assert got[0].dtype == torch.long and got[0].shape == (B,)
    assert_close("logp", ref[1], got[1], 1e-6)
    assert_close("value", ref[2], got[2], 1e-6)


def test_step_samples_follow_the_probabilities():
    # Many draws from one row: frequencies near the softmax (the sample uses the probabilities, not the logits).
    actor, critic = _heads(8, 16, 3)
    y = torch.randn(1, 8).expand(20000, 8).contiguous()
    with torch.no_grad():
        torch.manual_seed(3)
        action, logp, _ = cpu_heads.cpu_actor_critic_step(y, actor, critic)
    freq = torch.bincount(action, minlength=3).double() / len(action)
    probs = torch.zeros(3, dtype=torch.float64)
    probs[action] = logp.double().exp()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_step_refuses_nan_probabilities_as_multinomial_does():
    actor, critic = _heads(16, 16, 3)
    y = torch.randn(4, 16)
    y[2, 5] = float("nan")
    with torch.no_grad(), pytest.raises(RuntimeError, match="probability tensor contains either `inf`, `nan`"):
        reference.actor_critic_step(y, actor, critic)
    with torch.no_grad(), pytest.raises(RuntimeError, match="probability tensor contains either `inf`, `nan`"):
        cpu_heads.cpu_actor_critic_step(y, actor, critic)


@pytest.mark.parametrize("N,D,M,A", [(808, 64, 64, 4), (37, 40, 24, 7), (9, 16, 70, 2)])
def test_evaluate_matches_the_reference_with_every_gradient(N, D, M, A):
    actor, critic = _heads(D, M, A)
    gen = torch.Generator().manual_seed(2)
    y = (2 * torch.randn(N, D, generator=gen)).requires_grad_()
    actions = torch.randint(0, A, (N,), generator=gen)
    inputs = [y, *actor, *critic]
    ref = reference.actor_critic_evaluate(y, actions, actor, critic)
    got = cpu_heads.cpu_actor_critic_evaluate(y, actions, actor, critic)
    for name, r, o in zip(("logp", "entropy", "value"), ref, got, strict=True):
        assert_close(name, r, o, 1e-6)
    weights = [torch.randn(N, generator=gen) for _ in range(3)]

    def grads(outs):
        return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights, strict=True)), inputs)

    names = ("dy", "d actor w1", "d actor b1", "d actor w2", "d actor b2", "d critic w1", "d critic b1", "d critic w2",
             "d critic b2")  # fmt: skip
    for name, r, o in zip(names, grads(ref), grads(got), strict=True):
        assert_close(name, r, o, 1e-5)


@pytest.mark.parametrize("used", ["logp", "entropy", "value"])
def test_evaluate_with_one_output_in_the_loss(used):
    # The outputs that reach no loss get no gradient (None in the backward), which the call treats as zero.
    actor, critic = _heads(16, 16, 3)
    y = torch.randn(11, 16).requires_grad_()
    actions = torch.randint(0, 3, (11,))
    i = ("logp", "entropy", "value").index(used)
    inputs = [y, *actor, *critic]
    ref = reference.actor_critic_evaluate(y, actions, actor, critic)[i]
    got = cpu_heads.cpu_actor_critic_evaluate(y, actions, actor, critic)[i]
    g_ref = torch.autograd.grad(ref.sum(), inputs, allow_unused=True)
    g_got = torch.autograd.grad(got.sum(), inputs, allow_unused=True)
    for r, o in zip(g_ref, g_got, strict=True):
        assert_close(used, torch.zeros_like(o) if r is None else r, o, 1e-5)


def test_evaluate_refuses_an_action_outside_the_logits():
    actor, critic = _heads(8, 16, 3)
    with pytest.raises(RuntimeError, match="action 3 outside"):
        cpu_heads.cpu_actor_critic_evaluate(torch.randn(4, 8), torch.tensor([0, 1, 3, 2]), actor, critic)


def test_a_nan_stays_in_its_row():
    actor, critic = _heads(8, 16, 3)
    y = torch.randn(4, 8)
    y[2, 5] = float("nan")
    logp, ent, value = cpu_heads.cpu_actor_critic_evaluate(y, torch.zeros(4, dtype=torch.long), actor, critic)
    for t in (logp, ent, value):
        assert t[2].isnan() and not t[[0, 1, 3]].isnan().any()


def _count_native(monkeypatch) -> dict:
    calls = {"step": 0, "evaluate": 0}
    step, evaluate = cpu_heads.cpu_actor_critic_step, cpu_heads.cpu_actor_critic_evaluate

    def counted_step(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    def counted_evaluate(*a, **k):
        calls["evaluate"] += 1
        return evaluate(*a, **k)

    monkeypatch.setattr(cpu_heads, "cpu_actor_critic_step", counted_step)
    monkeypatch.setattr(cpu_heads, "cpu_actor_critic_evaluate", counted_evaluate)
    return calls


def _agent_outputs(agent, x, starts, actions):
    state = agent.initial_state(x.shape[0])
    with torch.no_grad():
        torch.manual_seed(5)
        step = agent.step(x[:, 0], state, starts[:, 0])
    out = agent.evaluate_actions(x, agent.initial_state(x.shape[0]), starts, actions)
    grads = torch.autograd.grad(sum(o.sum() for o in out), list(agent.parameters()), allow_unused=True)
    return step[:3], out, grads


@pytest.mark.parametrize("memory", ["ham", "gru"])
def test_policy_runs_the_native_heads_with_the_results_of_its_torch_ops(monkeypatch, memory):
    torch.manual_seed(0)
    agent = RecurrentActorCritic(10, spaces.Discrete(5), memory, 32)
    x, starts = torch.randn(3, 12, 10), torch.zeros(3, 12, dtype=torch.bool)
    starts[:, 0] = True
    actions = torch.randint(0, 5, (3, 12))
    calls = _count_native(monkeypatch)
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "native")
    native_out = _agent_outputs(agent, x, starts, actions)
    assert calls == {"step": 1, "evaluate": 1}, "the policy did not run the native heads"
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "torch")
    torch_out = _agent_outputs(agent, x, starts, actions)
    assert calls == {"step": 1, "evaluate": 1}, "HAM_RL_CPU_KERNEL=torch still ran the native heads"
    assert torch.equal(native_out[0][0], torch_out[0][0])
    for name, r, o in zip(("logp", "value"), torch_out[0][1:], native_out[0][1:], strict=True):
        assert_close(f"step {name}", r, o, 1e-5)
    for name, r, o in zip(("logp", "entropy", "value"), torch_out[1], native_out[1], strict=True):
        assert_close(name, r, o, 1e-5)
    for (name, _), r, o in zip(agent.named_parameters(), torch_out[2], native_out[2], strict=True):
        if r is not None:
            assert_close(f"grad {name}", r, o, 1e-4)


def test_other_action_spaces_keep_the_torch_heads(monkeypatch):
    calls = _count_native(monkeypatch)
    agent = RecurrentActorCritic(6, spaces.MultiDiscrete([3, 2]), "gru", 16)
    x, starts = torch.randn(2, 5, 6), torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        agent.step(x[:, 0], agent.initial_state(2), starts[:, 0])
    agent.evaluate_actions(x, agent.initial_state(2), starts, torch.zeros(2, 5, 2, dtype=torch.long))
    assert calls == {"step": 0, "evaluate": 0}


def test_the_policy_under_autocast_keeps_the_torch_heads():
    # The update's native call runs its matmuls inside C++, where autocast would hand its float32 loops bfloat16
    # tensors; under autocast the policy evaluates with its own ops.
    torch.manual_seed(0)
    agent = RecurrentActorCritic(10, spaces.Discrete(4), "gru", 64)
    x, starts = torch.randn(3, 5, 10), torch.zeros(3, 5, dtype=torch.bool)
    starts[:, 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent, value = agent.evaluate_actions(x, agent.initial_state(3), starts, torch.zeros(3, 5, dtype=torch.long))
    assert logp.shape == ent.shape == value.shape == (3, 5)
    assert torch.isfinite(logp).all() and torch.isfinite(value).all()
