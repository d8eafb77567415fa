"""Shared helpers for the kernel tests: one ``assert_close`` and a skip marker for the interpreter."""

from __future__ import annotations

import pytest
import torch

from ham_rl.kernels.backend import interpreter_active, triton_available

needs_interpreter = pytest.mark.skipif(
    not (triton_available() and interpreter_active()),
    reason="needs triton imported with TRITON_INTERPRET=1 (tests/kernels/conftest.py sets it unless triton was "
    "imported before; run `TRITON_INTERPRET=1 python -m pytest tests/kernels`)",
)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    """NaN first, then shape, then max abs error <= tol * max(1, max |ref|) (relative for large tensors)."""
    ref = ref.detach().double().cpu()
    got = got.detach().double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN in result ({int(torch.isnan(got).sum())} entries)"
    assert not torch.isnan(ref).any(), f"{name}: NaN in reference"
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = (ref - got).abs().max().item() if ref.numel() else 0.0
    bound = tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{name}: max abs diff {err:.3g} > {bound:.3g} (tol {tol:g}, max |ref| {ref.abs().max().item():.3g})"
