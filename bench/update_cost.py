"""Cost of a PPO update with the episode context (agent.context_steps) against truncated BPTT (context_steps=0).

For each memory and episode length, one process per setting builds the trainer at its defaults (32 envs, 64-step
rollouts) on the cue task with that episode length, fills the context with a few iterations, then times the update
(``train_step``, median of repeats) and reads the process's peak resident memory (the same process structure for
both settings, so their difference is the context's). Prints one markdown table: time per update and peak RSS for both
settings, and the ratio of the times.

    python bench/update_cost.py                                  # gru, attention, ham at episodes of 52, 202, 1002
    python bench/update_cost.py --memories ham --lengths 102 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(memory: str, length: int, context_steps: int, repeats: int) -> dict:
    """Median update time and peak-RSS growth of one setting (run inside its own process)."""
    import gymnasium as gym
    import torch

    from ham_rl.agents import PPO, PPOConfig, RecurrentActorCritic
    from ham_rl.envs import VecEnv

    torch.set_num_threads(1)
    torch.manual_seed(0)
    env_id = f"bench/CueRecallLen{length}-v0"
    delay = length - 2  # the cue at step 0 (cue_steps=1), the question at the last step
    gym.register(env_id, entry_point="ham_rl.envs.recall_tasks:CueRecallEnv", kwargs=dict(delay=delay))
    venv = VecEnv(env_id, 32, seed=0)
    cfg = PPOConfig(context_steps=context_steps)
    options = {} if memory in ("gru", "lstm", "mlp") else {"time_feature": False}
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, 128, options)
    ppo = PPO(agent, venv, cfg, total_timesteps=10**7)
    for _ in range(max(2, -(-context_steps // cfg.num_steps) + 1)):  # fill the context
        ppo.iterate()
    times = []
    for _ in range(repeats):
        ppo.collect_rollout()
        advantages, returns = ppo.compute_advantages()
        t0 = time.perf_counter()
        ppo.train_step(advantages, returns)
        times.append(time.perf_counter() - t0)
        ppo.context.push(ppo.obs, ppo.starts, ppo.state0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"update_s": statistics.median(times), "peak_mib": peak / 1024}


def main() -> None:
    """Run every (memory, length) with and without the context, each in a subprocess; print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memories", nargs="+", default=["gru", "attention", "ham"])
    p.add_argument("--lengths", nargs="+", type=int, default=[52, 202, 1002])
    p.add_argument("--context-steps", type=int, default=256, help="the setting compared against 0")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=3, metavar=("MEMORY", "LENGTH", "CONTEXT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        memory, length, context = args.one
        print(json.dumps(measure(memory, int(length), int(context), args.repeats)))
        return
    print(f"| memory | episode length | update s, context {args.context_steps} | update s, context 0 | ratio | "
          f"peak MiB, context {args.context_steps} | peak MiB, context 0 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for memory in args.memories:
        for length in args.lengths:
            out = {}
            for context in (args.context_steps, 0):
                cmd = [sys.executable, __file__, "--one", memory, str(length), str(context), "--repeats", str(args.repeats)]
                run = subprocess.run(cmd, capture_output=True, text=True, check=True)
                out[context] = json.loads(run.stdout.strip().splitlines()[-1])
            a, b = out[args.context_steps], out[0]
            ratio = a["update_s"] / b["update_s"]
            cells = [memory, length, f"{a['update_s']:.2f}", f"{b['update_s']:.2f}", f"{ratio:.2f}x", f"{a['peak_mib']:.0f}",
                     f"{b['peak_mib']:.0f}"]  # fmt: skip
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
