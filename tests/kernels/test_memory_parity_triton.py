"""The memory family's parity tests, run again with every op on the Triton path under the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_ONLY = ("folded_and_plain", "ham-conv-time", "ham-conv-qkv", "ham-no-conv", "ham-readout-clock")


@pytest.mark.slow
def test_memory_parity_on_triton_path():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HAM_RL_BACKEND": "triton"}
    # A fresh interpreter: TRITON_INTERPRET only takes effect if set before triton is first imported. The cases that
    # vary only the short convolution's layout or the clock run the same ops as "ham" after code shared by both paths,
    # so they are left to the plain run (under the interpreter they were 3 of this test's 6.6 minutes).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", f"not ({' or '.join(LAYOUT_ONLY)})"]
    cmd.append(str(ROOT / "tests/ham_rl/test_memory_parity.py"))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
