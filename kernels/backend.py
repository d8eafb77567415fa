"""Which implementation an op runs: ``HAM_RL_BACKEND=auto|triton|torch`` (default auto).

auto: Triton kernels on CUDA tensors, the PyTorch reference elsewhere. triton: Triton everywhere (on CPU
tensors only under ``TRITON_INTERPRET=1``). torch: the reference everywhere.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "backend_for"]

BACKENDS = ("auto", "triton", "torch")


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: what an op called on ``tensor`` should run now."""
    choice = os.environ.get("HAM_RL_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"HAM_RL_BACKEND={choice!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return choice
