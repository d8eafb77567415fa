"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (a cubin is produced); shared memory is recorded.

Runs ``ham_rl.kernels.aot`` in a subprocess with ``TRITON_INTERPRET`` unset (this session's triton is in interpreter
mode). One representative configuration per kernel (head dim 24, padded to 32; bfloat16 inputs) keeps it
under a minute and a half on 2 cores; ``python -m ham_rl.kernels.aot --markdown`` compiles the full table in
docs/kernels.md (head dims 16, 24, 32, 64; float32 and bfloat16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ham_rl.kernels.backend import triton_available

ROOT = Path(__file__).resolve().parents[2]
KERNELS = (
    "chunk_gated_delta_rule_fwd_kernel",
    "chunk_gated_delta_rule_bwd_kernel",
    "parallel_cache_attention_fwd_kernel",
    "parallel_cache_attention_bwd_dkv_kernel",
    "parallel_cache_attention_bwd_dq_kernel",
    "fused_ham_step_fwd_kernel",
)


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
def test_every_kernel_compiles_for_sm80_and_sm90():
    script = textwrap.dedent(
        """
        import ham_rl.kernels.aot as aot
        specs = [s for s in aot.kernel_specs() if s[0].endswith("D24 bf16")]
        aot.kernel_specs = lambda: specs
        for name, target, shared, warps, cubin in aot.compile_all():
            print(f"AOT|{name}|{target}|{shared}|{cubin}")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stderr[-4000:]}"
    rows = [line.split("|")[1:] for line in proc.stdout.splitlines() if line.startswith("AOT|")]
    for name, target, shared, cubin in rows:
        print(f"{name:50s} {target} shared memory {shared} B, cubin {cubin} B")
        assert int(cubin) > 0
        assert int(shared) <= 99 * 1024, f"{name} on {target} needs {shared} B of shared memory"
    compiled = {(r[0].split()[0], r[1]) for r in rows}
    missing = [(k, t) for k in KERNELS for t in ("sm_80", "sm_90") if (k, t) not in compiled]
    assert not missing, f"kernels without a cubin: {missing}"
