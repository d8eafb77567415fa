"""Which implementation an op runs, decided in one place: ``HAM_RL_BACKEND=auto|triton|torch`` (default auto).

auto: Triton kernels on CUDA tensors, the PyTorch reference elsewhere. triton: Triton everywhere (on CPU tensors only
under ``TRITON_INTERPRET=1``). torch: the reference everywhere.

Triton decides at *decoration* time whether ``@triton.jit`` compiles for a GPU or runs under its NumPy interpreter
(``TRITON_INTERPRET=1``), and its own standard library (``tl.sum``, ``tl.max``...) is decorated when ``triton`` is
first imported. So the interpreter is on for a process only if ``TRITON_INTERPRET=1`` was set before ``triton`` was
first imported (``torch._dynamo``, e.g. ``torch.compile``, imports it too). ham_rl imports its kernel modules lazily,
on the first Triton call, and checks which mode triton is in before launching.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["BACKENDS", "TritonBackendError", "interpreter_active", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "triton", "torch")


class TritonBackendError(RuntimeError):
    """The Triton backend was asked for but cannot run here."""


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not, e.g., on macOS)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreter_active() -> bool:
    """True when triton was imported with ``TRITON_INTERPRET=1``, so kernels run on CPU tensors."""
    if not triton_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def resolve_backend(tensor: torch.Tensor, needs_float32_or_less: bool = True) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensor``; raises ``TritonBackendError`` if Triton is forced but cannot run.

    ``auto`` silently falls back to torch when triton is missing, when the tensor is float64 (the Triton kernels
    compute in float32; float64 is for gradcheck), or when a CUDA tensor meets an interpreter-mode triton.
    """
    choice = os.environ.get("HAM_RL_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"HAM_RL_BACKEND={choice!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    if choice == "torch" or (choice == "auto" and not tensor.is_cuda):
        return "torch"
    forced = choice == "triton"
    if not triton_available():
        if forced:
            raise TritonBackendError(
                "HAM_RL_BACKEND=triton, but the `triton` package cannot be imported on this platform; "
                "set HAM_RL_BACKEND=auto or torch to use the PyTorch path"
            )
        return "torch"
    if needs_float32_or_less and tensor.dtype == torch.float64:
        return "torch"
    interpreting = interpreter_active()
    if tensor.device.type == "cpu" and not interpreting:
        if forced:
            raise TritonBackendError(
                "HAM_RL_BACKEND=triton on CPU tensors runs Triton's interpreter, which needs TRITON_INTERPRET=1 "
                "set before `triton` is first imported (in the environment, or at the top of a conftest.py); "
                f"got TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} with triton already in compiled mode"
            )
        return "torch"
    if tensor.device.type == "cuda" and interpreting and not forced:
        return "torch"
    return "triton"
