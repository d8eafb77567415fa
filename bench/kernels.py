"""Benchmark the HAM kernels.

On CUDA: the Triton path against the PyTorch reference and against full (dense causal) attention, for episode
lengths 128..4096 (training: chunked delta rule + block-sparse cache attention, forward + backward) and 64..4096
envs (rollout step), printed as ratios of medians over repeats. On CPU the Triton part needs a GPU; it times the
gated delta rule's CPU forms instead (the time loop, both chunked forms and the native kernel, the default).

    python bench/kernels.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (compiles on GPU)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def delta_rule_inputs(B, T, H, D, device, dtype=torch.float32, p_start=0.01):
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, D, device=device).to(dtype).requires_grad_()
    beta = torch.rand(B, T, H, device=device).to(dtype).requires_grad_()
    g = (-torch.rand(B, T, H, device=device) * 0.1).to(dtype).requires_grad_()
    starts = torch.rand(B, T, device=device) < p_start
    return q, k, v, beta, g, starts


def fwd_bwd(fn, *args):
    def run():
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in out).backward()

    return run


def cpu_section(repeats: int) -> None:
    from ham_rl.kernels.gated_delta_rule.cpu_recurrent import cpu_recurrent_gated_delta_rule
    from ham_rl.kernels.gated_delta_rule.naive_chunk import naive_chunk_gated_delta_rule
    from ham_rl.kernels.gated_delta_rule.reference import naive_recurrent_gated_delta_rule
    from ham_rl.kernels.gated_delta_rule.torch_chunk import torch_chunk_gated_delta_rule

    print("CPU: the Triton kernels need a GPU (CUDA); timing the CPU forms of gated_delta_rule instead.")
    print("Forward + backward, loss on every output; ms are medians, ratios are against the native kernel, and the")
    print("forms are timed in turn, repeat after repeat, so machine load hits all alike.")
    forms = {
        "loop": naive_recurrent_gated_delta_rule,
        "naive_chunk": naive_chunk_gated_delta_rule,
        "torch_chunk": torch_chunk_gated_delta_rule,
        "native": cpu_recurrent_gated_delta_rule,
    }
    print(
        f"{'B':>4} {'T':>6} {'H':>3} {'D':>4} | "
        + " ".join(f"{n + ' ms':>15}" for n in forms)
        + " | "
        + " ".join(f"{n + '/native':>18}" for n in list(forms)[:-1])
    )
    # (8, 202, 4, 16): one PPO minibatch of the d200 preset, actor and critic rows together
    for B, T, H, D in ((8, 202, 4, 16), (16, 128, 4, 32), (8, 512, 4, 16)):
        x = delta_rule_inputs(B, T, H, D, "cpu")
        runs = {n: fwd_bwd(fn, *x) for n, fn in forms.items()}
        for run in runs.values():
            run()  # warm-up (the native kernel builds on its first call)
        times = {n: [] for n in forms}
        for _ in range(repeats):
            for n, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        row = " ".join(f"{med[n] * 1e3:15.2f}" for n in forms)
        ratios = " ".join(f"{med[n] / med['native']:17.1f}x" for n in list(forms)[:-1])
        print(f"{B:>4} {T:>6} {H:>3} {D:>4} | {row} | {ratios}")


def cuda_section(repeats: int) -> None:
    from ham_rl.kernels.cache_attention.parallel import parallel_cache_attention
    from ham_rl.kernels.cache_attention.reference import masked_cache_attention
    from ham_rl.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
    from ham_rl.kernels.gated_delta_rule.reference import naive_recurrent_gated_delta_rule
    from ham_rl.kernels.ham_step.fused import fused_ham_step
    from ham_rl.kernels.ham_step.reference import ham_step

    sync = torch.cuda.synchronize
    dev = "cuda"
    H, D = 4, 32
    print("Training forward+backward, B=8 episodes, H=4, D=32, 10% of tokens routed (ratios: reference / Triton)")
    print(f"{'T':>6} | {'triton ms':>10} {'ref ms':>10} {'full attn ms':>13} | {'ref/triton':>10} {'full/triton':>11}")
    for T in (128, 256, 512, 1024, 2048, 4096):
        B = 8
        x = delta_rule_inputs(B, T, H, D, dev)
        routed = torch.rand(B, T, device=dev) < 0.1
        t = torch.arange(T, device=dev)
        visible = routed[:, None, :] & (t[None, :, None] >= t[None, None, :])
        kv = [torch.randn(B, T, H, D, device=dev, requires_grad=True) for _ in range(2)]

        def triton_path():
            o, vh, s = chunk_gated_delta_rule(*x[:5], x[5])
            a = parallel_cache_attention(x[0], kv[0], kv[1], visible)
            (o.sum() + vh.sum() + s.sum() + a.sum()).backward()

        def ref_path():
            o, vh, s = naive_recurrent_gated_delta_rule(*x[:5], x[5])
            a = masked_cache_attention(x[0], kv[0], kv[1], visible)
            (o.sum() + vh.sum() + s.sum() + a.sum()).backward()

        def full_attention():
            a = F.scaled_dot_product_attention(*(y.transpose(1, 2) for y in (x[0], kv[0], kv[1])), is_causal=True)
            a.sum().backward()

        tt = median_time(triton_path, repeats, sync)
        tr = median_time(ref_path, max(1, repeats // 2), sync) if T <= 1024 else float("nan")
        tf = median_time(full_attention, repeats, sync)
        print(f"{T:>6} | {tt * 1e3:10.2f} {tr * 1e3:10.2f} {tf * 1e3:13.2f} | {tr / tt:10.1f} {tf / tt:11.2f}")

    print("Rollout step, H=4, D=32, cache capacity 256, cache full (ratios: reference / Triton)")
    print(f"{'envs':>6} | {'triton ms':>10} {'ref ms':>10} {'full attn ms':>13} | {'ref/triton':>10} {'full/triton':>11}")
    L = 257
    with torch.no_grad():
        for B in (64, 256, 1024, 4096):
            q, k = (F.normalize(torch.randn(B, H, D, device=dev), dim=-1) for _ in range(2))
            v = torch.randn(B, H, D, device=dev)
            small = [torch.rand(B, H, device=dev) for _ in range(4)]
            small[1] = -small[1] * 0.1
            state = torch.randn(B, H, D, D, device=dev)
            keys, values = torch.randn(B, L, H, D, device=dev), torch.randn(B, L, H, D, device=dev)
            scores, times = torch.rand(B, L, device=dev), torch.arange(L, device=dev).expand(B, L).contiguous()
            length = torch.full((B,), 256, device=dev, dtype=torch.long)
            start = torch.zeros(B, dtype=torch.bool, device=dev)
            step = torch.full((B,), 300, device=dev, dtype=torch.long)
            args = (q, k, v, small[0], small[1], small[2], small[3], state, keys, values, scores, times, length, start, step)
            tt = median_time(lambda: fused_ham_step(*args, 0.5, capacity=256), repeats, sync)
            tr = median_time(lambda: ham_step(*args, 0.5, capacity=256), repeats, sync)
            qf = q[:, :, None]
            tf = median_time(
                lambda: F.scaled_dot_product_attention(qf, keys.transpose(1, 2), values.transpose(1, 2)), repeats, sync
            )
            print(f"{B:>6} | {tt * 1e3:10.3f} {tr * 1e3:10.3f} {tf * 1e3:13.3f} | {tr / tt:10.1f} {tf / tt:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        cuda_section(args.repeats)
    else:
        cpu_section(args.repeats)


if __name__ == "__main__":
    main()
