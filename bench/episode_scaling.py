"""Peak memory and time of one update's sequence pass against episode length: ham, attention and gru.

A PPO update runs each minibatch's rows (4 env rows of the trainer's defaults) through the memory's sequence form,
forward and backward. With rows of one whole episode, its cost grows with the episode: attention reads every earlier
step at every step, ham only the steps it cached, gru none. For each memory and length, one fresh process builds the
memory (hidden 64, 4 heads), runs forward + backward of ``[4, T]`` inputs from an initial state, and reports

- **live**: the peak of the bytes held by tensors during the pass, over those held before it (torch's profiler
  counts every allocation and free; what ``torch.cuda.max_memory_allocated`` reports on a GPU),
- **RSS**: the growth of the process's peak resident memory over its state before the pass: the live peak plus
  what the C allocator keeps of freed blocks (glibc keeps freed large blocks in its heap once its mmap threshold
  has grown; ``MALLOC_MMAP_THRESHOLD_=65536`` brings RSS down to about the live peak),
- and the pass's time (median of repeats, without the profiler).

ham runs at τ set so that 5% of the steps are cached (what the trainer's feedback rule keeps): the 95th percentile
of its router scores on these inputs.

    python bench/episode_scaling.py                                 # 256, 1024, 4096 steps
    python bench/episode_scaling.py --lengths 4096 --memories ham attention
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(memory: str, length: int, repeats: int) -> dict:
    """Peak live-tensor and RSS growth (MiB), median seconds of one forward + backward over ``[4, length]``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ham_rl import make_memory

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mem = make_memory(memory, input_size=64, hidden_size=64, **({} if memory == "gru" else {"num_heads": 4}))
    x = torch.randn(4, length, 64)
    starts = torch.zeros(4, length, dtype=torch.bool)
    starts[:, 0] = True
    kv = None
    if memory == "ham":
        with torch.no_grad():  # τ at the 95th percentile of the scores: 5% of the steps cached
            scores = []
            state = mem.initial_state(4)
            for t in range(min(length, 512)):
                mem.step(x[:, t], state, starts[:, t], inplace=True)
                scores.append(mem.last_routing[0])
            mem.set_threshold(float(torch.quantile(torch.cat(scores), 0.95)))

    def one_pass():
        y, state = mem(x.clone().requires_grad_(True), mem.initial_state(4), starts)
        y.square().mean().backward()
        return state

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state = one_pass()
        times.append(time.perf_counter() - t)
        if state.cache is not None:
            kv = float(state.cache.length.float().mean()) / length
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    del state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one_pass()
    live = peak = 0  # running sum of the allocations (+) and frees (-) in time order
    events = prof.profiler.kineto_results.events()
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return {"live_mib": peak / 2**20, "rss_mib": rss, "seconds": statistics.median(times), "kv": kv}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memories", nargs="+", default=["gru", "attention", "ham"])
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("MEMORY", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return
    print("one sequence pass (forward + backward) of 4 rows, hidden 64; peak live tensors / peak RSS growth, MiB\n")
    head = " | ".join(f"{m} MiB | {m} s" for m in args.memories)
    print(f"| episode | {head} | ham / attention, live | ham / attention, RSS | ham KV |")
    print("|---:|" + "---:|---:|" * len(args.memories) + "---:|---:|---:|")
    for length in args.lengths:
        res = {}
        for memory in args.memories:
            cmd = [sys.executable, __file__, "--one", memory, str(length), "--repeats", str(args.repeats)]
            res[memory] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        cells = " | ".join(
            f"{res[m]['live_mib']:,.0f} / {res[m]['rss_mib']:,.0f} | {res[m]['seconds']:.2f}" for m in args.memories
        )
        live = rss = kv = "—"
        if "ham" in res and "attention" in res:
            ham, att = res["ham"], res["attention"]
            live = f"{ham['live_mib'] / max(att['live_mib'], 1e-9):.2f}"
            rss = f"{ham['rss_mib'] / max(att['rss_mib'], 1e-9):.2f}"
            kv = f"{ham['kv']:.3f}"
        print(f"| {length} | {cells} | {live} | {rss} | {kv} |", flush=True)


if __name__ == "__main__":
    main()
