"""Native CPU kernels (C++ beside their op's reference), built on first use, and the switch that picks them.

Each ``kernels/<op>/cpu_*.cpp`` registers its ops as ``torch.ops.ham_rl.<name>``. The first call of any of them builds
all of them into one library with torch's C++ extension loader (a C++ compiler and ninja, which ham_rl depends on),
for this machine's CPU (``-march=native``), once per machine, sources and torch version: 20-60 s (ATen's headers, not
pybind's; ninja compiles the sources side by side), then cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``, one build per checkout). Where they cannot be built, the dispatchers warn once
and run the PyTorch forms, which gives the same results to float32 round-off.

``HAM_RL_CPU_KERNEL=native`` (the default) runs the native kernels on CPU tensors; ``torch`` runs the PyTorch forms
without trying to build anything.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CPU_KERNELS",
    "FLAGS",
    "HEADERS",
    "SOURCES",
    "as_contiguous",
    "cpu_kernel_choice",
    "load_native",
    "native_available",
    "use_native",
]

#: the CPU implementations, as ``HAM_RL_CPU_KERNEL`` names them
CPU_KERNELS = ("native", "torch")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast"]
#: what the sources share (16-float vectors, the cache slot rule); a change to one rebuilds them
HEADERS = tuple(
    (Path(__file__).parent / name).resolve() for name in ("vec16.h", "ham_step/slot_rule.h", "ham_step/columns.h")
)
#: every native kernel's source; they build into one library
SOURCES = tuple(
    (Path(__file__).parent / name).resolve()
    for name in (
        "actor_critic/cpu_heads.cpp",
        "gated_delta_rule/cpu_recurrent.cpp",
        "ham_layer/cpu_layer.cpp",
        "ham_layer/cpu_sequence.cpp",
        "ham_step/cpu_plan.cpp",
        "ham_step/cpu_step.cpp",
        "ppo_loss/cpu_loss.cpp",
        "short_conv/cpu_conv.cpp",
    )
)

#: the loaded ops (``torch.ops.ham_rl``) once built, or why they could not be; one library, so one state for all kernels
_ops: Any = None
_error: str | None = None
_warned = False


def cpu_kernel_choice() -> str:
    """``HAM_RL_CPU_KERNEL`` (default ``native``), checked against ``CPU_KERNELS``."""
    choice = os.environ.get("HAM_RL_CPU_KERNEL", "native").lower()
    if choice not in CPU_KERNELS:
        raise ValueError(f"HAM_RL_CPU_KERNEL={choice!r} is not a CPU kernel choice; allowed: {', '.join(CPU_KERNELS)}")
    return choice


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's feature flags where Linux lists them, else the processor name,
    so that a cache shared between unlike machines (one home directory on a cluster) never loads a foreign build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def load_native() -> Any:
    """``torch.ops.ham_rl`` with every native kernel built and loaded (on the first call); ``RuntimeError`` saying why
    where they cannot be."""
    global _ops, _error
    if _ops is not None:
        return _ops
    if _error is not None:
        raise RuntimeError(_error)
    if os.name != "posix":
        _error = f"the native CPU kernels build with GCC or clang flags; not on os.name={os.name!r}"
        raise RuntimeError(_error)
    from torch.utils.cpp_extension import load

    try:
        texts = [s.read_text() for s in (*SOURCES, *HEADERS)]
        # The folder too: ninja rebuilds when the sources' paths change, so two checkouts on one machine each keep
        # their own build instead of rebuilding each other's.
        key = "\n".join([*texts, str(SOURCES[0].parent), " ".join(FLAGS), torch.__version__, _cpu_signature()])
        name = f"ham_rl_native_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=FLAGS, is_python_module=False, verbose=False)
    except Exception as err:  # no source, compiler, ninja or Python headers: the PyTorch forms run instead
        _error = f"could not build the native CPU kernels ({type(err).__name__}: {str(err).strip()[-500:]})"
        raise RuntimeError(_error) from err
    _ops = torch.ops.ham_rl
    return _ops


def native_available() -> bool:
    """True when the kernels are built or build now; False, with one warning per process, when they cannot."""
    global _warned
    try:
        load_native()
    except RuntimeError as err:
        if not _warned:
            _warned = True
            warnings.warn(f"{err}; running the PyTorch forms (HAM_RL_CPU_KERNEL=torch silences this)", stacklevel=3)
        return False
    return True


def as_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` contiguous in ``dtype``, as the kernels read it; ``t`` itself when it already is (no needless op: this
    runs every rollout step)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def use_native(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its native kernel: a CPU tensor, ``HAM_RL_CPU_KERNEL=native``, not being traced
    by ``torch.compile`` (an opaque call would break the graph; the PyTorch forms trace), and the kernels built."""
    return (
        tensor.device.type == "cpu"
        and cpu_kernel_choice() == "native"
        and not torch.compiler.is_compiling()
        and native_available()
    )
