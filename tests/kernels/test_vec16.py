"""The native kernels' vector header (``kernels/vec16.h``) gives the same values in each of its three forms.

Without AVX-512 a ``Float16`` is a struct of narrower vectors (docs/performance.md, "The native kernels on a CPU
without AVX-512"); which form a user gets depends on their CPU, so each is built here from ``vec16_check.cpp`` with
the flags that select it and run where this CPU can: 4 lanes (SSE2, the form NEON gets too), 8 (AVX2) and 16
(AVX-512). The checks are exact where both forms promise the same summation order.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import ham_rl.kernels

HERE = Path(__file__).resolve().parent
HEADER_DIR = Path(ham_rl.kernels.__file__).resolve().parent
CXX = os.environ.get("CXX", "c++")
FORMS = {"x86-64": (4, None), "x86-64-v3": (8, "avx2"), "x86-64-v4": (16, "avx512f")}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX}); the native kernels need one too")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the three forms are selected by x86 flags")
@pytest.mark.parametrize("march", list(FORMS))
def test_each_vector_form_matches_scalar_loops(march, tmp_path):
    lanes, flag = FORMS[march]
    exe = tmp_path / "vec16_check"
    cmd = [
        CXX,
        "-O2",
        "-std=c++17",
        f"-march={march}",
        "-ffp-contract=off",
        f"-I{HEADER_DIR}",
        str(HERE / "vec16_check.cpp"),
        "-o",
        str(exe),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    if flag is not None and flag not in _cpu_flags():
        pytest.skip(f"-march={march} builds; this CPU has no {flag} to run it")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == f"lanes={lanes}"
