"""Step and sequence cost of every memory, as ratios to gru, measured side by side in one run.

    python bench/memory.py [--repeats 7] [--threads 2] [--compile]

Step: one batched ``mem.step`` for B = 64 envs, each already 64 steps into its episode (so caches hold
entries), no grad, in steady state: the cache has room for the timed steps' entries, as a rollout's live cache does
once it has grown to its working size (it doubles, so it grows seldom, and the trainer never shrinks it). The rows
"..., growing" time the same steps with the cache full at the first one, so that one doubling (64 to 128 slots,
into freshly mapped memory) falls in every 20 timed steps: the cost a cache pays while it grows. The untrained
routers of ham and ham-learned cache nearly every step of these random inputs, so their main rows read a cache of
64-84 entries per env (as attention's); the row "ham, 5% cached" sets ham's threshold to the 95% quantile of its
warm-up scores, the cache that ham's default target fraction (5%) keeps, 3-4 entries per env here.
Sequence: ``mem(x, state, starts)`` for B = 16, T = 128, forward + backward. Every repeat
times every memory in turn (interleaved, so drifts of this noisy machine hit all alike); the table shows
medians over repeats divided by gru's median. ``--compile`` adds a step row for each memory whose step
``Memory.compile_step`` compiles (the hybrids; ``agent.compile=true`` in the trainer), compiled before the timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from ham_rl import MEMORIES, make_memory
from ham_rl.memory.base import Memory

INPUT, HIDDEN = 32, 64


def step_timer(
    name: str,
    envs: int = 64,
    warm: int = 64,
    calls: int = 20,
    compiled: bool = False,
    grow: bool = False,
    fraction: float | None = None,
):
    """A function that times ``calls`` batched steps and returns seconds per step (``grow``: with the cache full
    before the first, so that it grows inside the timing; ``fraction``: ham's threshold where that share of the
    warm-up steps scores above it)."""
    mem = make_memory(name, INPUT, HIDDEN)
    warm_xs = torch.randn(warm, envs, INPUT)
    if fraction is not None:
        mem.set_threshold(_quantile_threshold(mem, warm_xs, fraction))
    if compiled:
        mem.compile_step()  # its graphs are built in the warm-up steps below, as the cache grows
    with torch.no_grad():
        state = mem.initial_state(envs)
        no_start = torch.zeros(envs, dtype=torch.bool)
        for x in warm_xs:
            _, state = mem.step(x, state, no_start)
    if state.cache is not None:
        full = state.cache.compact()
        state = replace(state, cache=full if grow else full.reserve(full.slots + calls))
    xs = torch.randn(calls, envs, INPUT)

    def run() -> float:
        s = state.clone()
        with torch.no_grad():
            t0 = time.perf_counter()
            for i in range(calls):
                _, s = mem.step(xs[i], s, no_start, inplace=True)  # as the rollout loops step
            return (time.perf_counter() - t0) / calls

    return run


def _quantile_threshold(mem: Memory, warm_xs: torch.Tensor, fraction: float) -> float:
    """The (1 - fraction) quantile of the router's scores over the warm-up steps ``warm_xs`` ``[T, envs, input]``."""
    with torch.no_grad():
        state, no_start, scores = mem.initial_state(warm_xs.shape[1]), torch.zeros(warm_xs.shape[1], dtype=torch.bool), []
        for x in warm_xs:
            _, state = mem.step(x, state, no_start)
            scores.append(mem.last_routing[0])
    return float(torch.quantile(torch.cat(scores), 1.0 - fraction))


def sequence_timer(name: str, envs: int = 16, steps: int = 128):
    """A function that times one forward + backward over a [16, 128] segment with episode starts inside."""
    mem = make_memory(name, INPUT, HIDDEN)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(envs, steps, INPUT, generator=g)
    starts = torch.rand(envs, steps, generator=g) < 1 / 50  # episodes of ~50 steps, as in POPGym's easy tasks
    state = mem.initial_state(envs)

    def run() -> float:
        mem.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        y, _ = mem(x, state, starts)
        y.square().mean().backward()
        return time.perf_counter() - t0

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memories", nargs="*", default=list(MEMORIES))
    parser.add_argument("--compile", action="store_true", help="also time the compiled step of the hybrid memories")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = list(dict.fromkeys(["gru", *args.memories]))
    timers = {n: (step_timer(n), sequence_timer(n)) for n in names}
    if args.compile:  # the memories that override compile_step: the others' step stays the library call
        compiled = [n for n in names if type(make_memory(n, INPUT, HIDDEN)).compile_step is not Memory.compile_step]
        timers.update({f"{n}, compiled": (step_timer(n, compiled=True), None) for n in compiled})
    if "ham" in names:
        timers["ham, 5% cached"] = (step_timer("ham", fraction=0.05), None)
    cached = [n for n in names if make_memory(n, INPUT, HIDDEN).has_cache]
    timers.update({f"{n}, growing": (step_timer(n, grow=True), None) for n in cached})
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in timers}
    for step, seq in timers.values():  # one untimed pass: allocations, lazy init
        step()
        if seq is not None:
            seq()
    for _ in range(args.repeats):
        for n, (step, seq) in timers.items():
            times[n][0].append(step())
            if seq is not None:
                times[n][1].append(seq())
    med = {n: (statistics.median(s), statistics.median(q) if q else None) for n, (s, q) in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.repeats} interleaved repeats")
    print("step: B=64, 64 steps into the episode, no grad, the cache with room for the timed steps (growing: full at")
    print("the first, one doubling per 20 steps); sequence: B=16, T=128, forward + backward")
    print(f"{'memory':<20} {'step / gru':>11} {'sequence / gru':>15}")
    for n, (step, seq) in med.items():
        seq_ratio = "" if seq is None else f"{seq / med['gru'][1]:.2f}"
        print(f"{n:<20} {step / med['gru'][0]:>11.2f} {seq_ratio:>15}")


if __name__ == "__main__":
    main()
