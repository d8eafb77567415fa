"""Compile every HAM kernel ahead of time for NVIDIA GPUs (no GPU needed) and report shared memory.

``python -m ham_rl.kernels.aot [--markdown]`` prints one row per (kernel, configuration, target). It must run with
``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled); tests/kernels runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys

TARGETS = ((80, "sm_80"), (90, "sm_90"))


def kernel_specs():
    """``(name, jit_fn, signature, constexprs)`` for each kernel at the head dims we support."""
    from ham_rl.kernels.cache_attention import parallel as ca
    from ham_rl.kernels.gated_delta_rule import chunk as gdr
    from ham_rl.kernels.ham_step import fused as hs

    specs = []
    for D in (16, 24, 32, 64):
        BD = max(16, 1 << (D - 1).bit_length())
        for dt in ("fp32", "bf16"):
            p = f"*{dt}"
            sig = {
                "q": p, "k": p, "v": p, "beta": p, "g": p, "starts": "*i32", "h0": "*fp32", "o": p, "vhat": p,
                "ht": "*fp32", "hs": "*fp32", "T": "i32", "NT": "i32", "scale": "fp32",
            }  # fmt: skip
            cx = dict(H=4, K=D, V=D, BT=32, BK=BD, BV=BD, HAS_STARTS=True, USE_INITIAL_STATE=True)
            specs.append((f"chunk_gated_delta_rule_fwd_kernel D{D} {dt}", gdr.chunk_gated_delta_rule_fwd_kernel, sig, cx))
            sig = {
                "q": p, "k": p, "v": p, "beta": p, "g": p, "starts": "*i32", "hs": "*fp32", "do": p, "dvhat": p,
                "dht": "*fp32", "dq": "*fp32", "dk": "*fp32", "dv": "*fp32", "dbeta": "*fp32", "dg": "*fp32",
                "dh0": "*fp32", "T": "i32", "NT": "i32", "scale": "fp32",
            }  # fmt: skip
            cx = dict(H=4, K=D, V=D, BT=32, BK=BD, BV=BD, HAS_STARTS=True, USE_FINAL_STATE_GRADIENT=True)
            specs.append((f"chunk_gated_delta_rule_bwd_kernel D{D} {dt}", gdr.chunk_gated_delta_rule_bwd_kernel, sig, cx))
            common = {"q": p, "keys": p, "values": p, "visible": "*u8", "tiles": "*i32", "scale": "*fp32"}
            dims = {"T": "i32", "S": "i32", "NT": "i32", "NS": "i32"}
            cx = dict(H=4, K=D, V=D, BM=64, BN=64, BK=BD, BV=BD)
            sig = {**common, "o": p, "lse": "*fp32", **dims}
            specs.append((f"parallel_cache_attention_fwd_kernel D{D} {dt}", ca.parallel_cache_attention_fwd_kernel, sig, cx))
            sig = {**common, "do": p, "lse": "*fp32", "delta": "*fp32", "dk": "*fp32", "dv": "*fp32", **dims}
            specs.append(
                (f"parallel_cache_attention_bwd_dkv_kernel D{D} {dt}", ca.parallel_cache_attention_bwd_dkv_kernel, sig, cx)
            )
            sig = {**common, "do": p, "lse": "*fp32", "delta": "*fp32", "dq": "*fp32", **dims}
            specs.append(
                (f"parallel_cache_attention_bwd_dq_kernel D{D} {dt}", ca.parallel_cache_attention_bwd_dq_kernel, sig, cx)
            )
            sig = {
                "q": p, "k": p, "v": p, "beta": p, "g": p, "gate_rnn": p, "gate_attn": p, "h0": "*fp32", "ht": "*fp32",
                "keys": p, "values": p, "scores": "*fp32", "times": "*i64", "length": "*i64", "start": "*i32",
                "episode_step": "*i64", "router": "*fp32", "attn_scale": "*fp32", "o": "*fp32", "new_length": "*i64",
                "score_out": "*fp32", "routed_out": "*i32", "threshold": "fp32", "capacity": "i32",
                "s_kb": "i64", "s_kl": "i64", "s_kh": "i64", "s_vb": "i64", "s_vl": "i64", "s_vh": "i64",
                "s_sb": "i64", "s_tb": "i64",
            }  # fmt: skip
            cx = dict(
                H=4, K=D, V=D, BH=4, BK=1 << (D - 1).bit_length(), BV=1 << (D - 1).bit_length(), BL=16,
                USE_RNN=True, USE_ATTENTION=True, HAS_ROUTER=False, HAS_CAPACITY=True,
            )  # fmt: skip
            specs.append((f"fused_ham_step_fwd_kernel D{D} {dt}", hs.fused_ham_step_fwd_kernel, sig, cx))
    return specs


def compile_all(only_dtype: str | None = None):
    """Compile every spec for sm_80 and sm_90; returns rows ``(name, target, shared_bytes, num_warps, cubin_bytes)``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ham_rl.kernels.aot needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, fn, sig, cx in kernel_specs():
        if only_dtype and not name.endswith(only_dtype):
            continue
        full_sig = {**sig, **{c: "constexpr" for c in cx}}
        for cap, label in TARGETS:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=full_sig, constexprs=cx), target=GPUTarget("cuda", cap, 32),
                options={"num_warps": 4},
            )  # fmt: skip
            cubin = compiled.asm.get("cubin", b"")
            if not cubin:
                raise RuntimeError(f"{name} produced no cubin for {label}")
            rows.append((name, label, int(compiled.metadata.shared), int(compiled.metadata.num_warps), len(cubin)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="only this input dtype")
    args = parser.parse_args(argv)
    rows = compile_all(args.dtype)
    if args.markdown:
        print("| kernel | target | shared memory (bytes) | warps | cubin (bytes) |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
    else:
        for r in rows:
            print(f"{r[0]:55s} {r[1]} shared={r[2]} warps={r[3]} cubin={r[4]}")
    print(f"compiled {len(rows)} kernels", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
