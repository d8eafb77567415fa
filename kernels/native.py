"""Native CPU kernels (C++ beside their op's reference), built on first use, and the switch that picks them.

Each ``kernels/<op>/cpu_*.cpp`` registers its ops as ``torch.ops.ham_rl.<name>``. The first call of any of them builds
all of them into one library with torch's C++ extension loader (a C++ compiler and ninja, which ham_rl depends on),
for this machine's CPU (``-march=native``), once per machine, sources and torch version: 20-60 s (ATen's headers, not
pybind's; ninja compiles the sources side by side), then cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``, one build per checkout). Where they cannot be built, each op's dispatcher warns once
and runs its PyTorch form, which gives the same results to float32 round-off.

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
#: every native kernel's source; they build into one library
SOURCES = tuple(
    (Path(__file__).parent / name).resolve()
    for name in ("gated_delta_rule/cpu_recurrent.cpp", "ham_step/cpu_step.cpp", "short_conv/cpu_conv.cpp")
)

_built: dict[Path, Any] = {}
_errors: dict[Path, str] = {}
_warned: set[Path] = set()


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


def load_native(source: Path) -> Any:
    """``torch.ops.ham_rl`` once ``source`` (one of ``SOURCES``) is built and loaded, with the other kernels (on the first
    call); ``RuntimeError`` saying why where they cannot be."""
    source = source.resolve()
    if source in _built:
        return _built[source]
    if source in _errors:
        raise RuntimeError(_errors[source])
    if source not in SOURCES:
        raise ValueError(f"{source} is not a native kernel source; allowed: {', '.join(s.name for s in SOURCES)}")
    if os.name != "posix":
        error = f"the native CPU kernels build with GCC or clang flags; not on os.name={os.name!r}"
        _errors.update(dict.fromkeys(SOURCES, error))
        raise RuntimeError(error)
    from torch.utils.cpp_extension import load

    try:
        texts = [s.read_text() for s in SOURCES]
        # The folder too: ninja rebuilds when the sources' paths change, so two checkouts on one machine each keep
        # their own build instead of rebuilding each other's.
        key = "\n".join([*texts, str(SOURCES[0].parent), " ".join(FLAGS), torch.__version__, _cpu_signature()])
        name = f"ham_rl_native_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=FLAGS, is_python_module=False, verbose=False)
    except Exception as err:  # no source, compiler, ninja or Python headers: the PyTorch forms run instead
        error = f"could not build the native CPU kernels ({type(err).__name__}: {str(err).strip()[-500:]})"
        _errors.update(dict.fromkeys(SOURCES, error))
        raise RuntimeError(error) from err
    _built.update(dict.fromkeys(SOURCES, torch.ops.ham_rl))
    return _built[source]


def native_available(source: Path) -> bool:
    """True when the kernels are built or build now; False, with one warning per kernel and process, when they cannot."""
    try:
        load_native(source)
    except RuntimeError as err:
        if source not in _warned:
            _warned.add(source)
            warnings.warn(f"{err}; running the PyTorch form (HAM_RL_CPU_KERNEL=torch silences this)", stacklevel=3)
        return False
    return True


def as_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` contiguous in ``dtype``, as the kernels read it; ``t`` itself when it already is (no needless op: this
    runs every rollout step)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def use_native(source: Path, tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the kernel built from ``source``: a CPU tensor, ``HAM_RL_CPU_KERNEL=native``,
    not being traced by ``torch.compile`` (an opaque call would break the graph; the PyTorch forms trace), and built."""
    return (
        tensor.device.type == "cpu"
        and cpu_kernel_choice() == "native"
        and not torch.compiler.is_compiling()
        and native_available(source)
    )
