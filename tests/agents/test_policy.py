"""The policy's building blocks that are not plain torch: the heads' tanh."""

from __future__ import annotations

import torch

from ham_rl.agents.policy import Tanh


def test_heads_tanh_is_torch_tanh_in_value_and_gradient():
    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([0.0, 1e-6, -1e-6, float("inf"), -float("inf")])])
    x.requires_grad_()
    mine, ref = Tanh()(x), torch.tanh(x)
    torch.testing.assert_close(mine, ref, atol=3e-7, rtol=0)
    (g_mine,) = torch.autograd.grad(mine[:-2].sum(), x)
    (g_ref,) = torch.autograd.grad(ref[:-2].sum(), x)
    torch.testing.assert_close(g_mine, g_ref, atol=1e-6, rtol=0)
    assert Tanh()(torch.tensor([float("nan")])).isnan().all()
