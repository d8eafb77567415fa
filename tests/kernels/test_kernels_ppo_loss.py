"""PPO's loss as one native call (``kernels/ppo_loss/cpu_loss.cpp``) against its reference (CleanRL's ops): the loss, its
parts and statistics, and the gradient of the loss, in every setting and at the ties of its max and clamp."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from ham_rl.kernels import native
from ham_rl.kernels.ppo_loss import cpu_loss, ppo_loss, reference

pytestmark = pytest.mark.skipif(not native.native_available(), reason="the native CPU kernels could not be built here")

NAMES = ("loss", "pg_loss", "v_loss", "entropy_loss", "approx_kl", "clipfrac")


def _inputs(seed: int, shape=(4, 202)):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(shape, generator=g) * 0.3 - 1.2
    ent = torch.rand(shape, generator=g) + 0.5
    v = torch.randn(shape, generator=g)
    old_lp = lp + torch.randn(shape, generator=g) * 0.2
    adv, ret = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    old_v = v + torch.randn(shape, generator=g) * 0.3
    if lp.numel() > 12:
        old_lp.view(-1)[:7] = lp.view(-1)[:7]  # ratio exactly 1: the policy loss's max ties, inside the clip range
        old_lp.view(-1)[7:9] = lp.view(-1)[7:9] + 5.0  # far outside the clip range on both sides
        old_lp.view(-1)[9:11] = lp.view(-1)[9:11] - 5.0
        adv.view(-1)[11] = 0.0  # a zero advantage: both sides of the max equal whatever the ratio
        old_v.view(-1)[12] = float(v.view(-1)[12])  # the value unchanged: inside its clip range
    return [lp, ent, v], [old_lp, adv, ret, old_v]


@pytest.mark.parametrize("norm_adv", [True, False])
@pytest.mark.parametrize("clip_vloss", [True, False])
def test_native_loss_and_gradient_match_the_reference(norm_adv, clip_vloss):
    new, rollout = _inputs(0)
    settings = (0.2, 0.01, 0.5, norm_adv, clip_vloss)
    results = []
    for fn in (reference.ppo_loss, cpu_loss.cpu_ppo_loss):
        leaves = [t.clone().requires_grad_() for t in new]
        out = fn(*leaves, *rollout, *settings)
        out[0].backward()
        results.append(([float(t.detach()) for t in out], [t.grad for t in leaves]))
    (ref_stats, ref_grads), (got_stats, got_grads) = results
    for name, r, o in zip(NAMES, ref_stats, got_stats, strict=True):
        assert o == pytest.approx(r, rel=1e-5, abs=1e-6), name
    assert 0.0 < got_stats[5] < 1.0, "some ratios were clipped and some not"
    for name, r, o in zip(("d newlogprob", "d entropy", "d newvalue"), ref_grads, got_grads, strict=True):
        assert_close(name, r, o, 1e-5)


def test_the_upstream_gradient_scales_the_native_gradient():
    new, rollout = _inputs(1, (3, 17))
    leaves = [t.clone().requires_grad_() for t in new]
    loss = cpu_loss.cpu_ppo_loss(*leaves, *rollout, 0.2, 0.01, 0.5, True, True)[0]
    (3.0 * loss).backward()
    ref = [t.clone().requires_grad_() for t in new]
    (3.0 * reference.ppo_loss(*ref, *rollout, 0.2, 0.01, 0.5, True, True)[0]).backward()
    for r, o in zip(ref, leaves, strict=True):
        assert_close("grad", r.grad, o.grad, 1e-5)


def test_one_token_gives_a_nan_loss_as_the_reference():
    # torch.std of one number is NaN (the unbiased estimate): the trainer's finiteness check then stops the run.
    new, rollout = _inputs(2, (1, 1))
    got = cpu_loss.cpu_ppo_loss(*new, *rollout, 0.2, 0.01, 0.5, True, True)[0]
    with pytest.warns(UserWarning, match="degrees of freedom"):
        want = reference.ppo_loss(*new, *rollout, 0.2, 0.01, 0.5, True, True)[0]
    assert torch.isnan(got) and torch.isnan(want)


def test_dispatcher_runs_the_native_call_for_float32_cpu_and_the_reference_otherwise(monkeypatch):
    calls = []
    native_loss = cpu_loss.cpu_ppo_loss
    monkeypatch.setattr(cpu_loss, "cpu_ppo_loss", lambda *a: calls.append(1) or native_loss(*a))
    new, rollout = _inputs(3, (2, 5))
    ppo_loss(*new, *rollout, 0.2, 0.01, 0.5, True, True)
    assert calls == [1]
    ppo_loss(*[t.double() for t in new], *[t.double() for t in rollout], 0.2, 0.01, 0.5, True, True)
    assert calls == [1], "float64 runs the reference"
