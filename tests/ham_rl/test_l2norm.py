"""l2norm (queries and keys of the HAM layer) against F.normalize."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ham_rl.memory.l2norm import l2norm


def test_matches_normalize_values_and_gradients_including_a_zero_vector():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 4, 8, generator=gen, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0  # F.normalize clamps its norm at eps: y = x / eps
    x.requires_grad_()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    want, got = F.normalize(x, dim=-1), l2norm(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    (got_dx,) = torch.autograd.grad(got, x, dy)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2norm, (x,))


def test_no_grad_path_gives_the_same_output():
    x = torch.randn(5, 2, 7, requires_grad=True)
    with torch.no_grad():
        y0 = l2norm(x)
    assert torch.equal(l2norm(x).detach(), y0)
