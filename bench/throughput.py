"""Training throughput, side by side in one process: our PPO with ham and with gru vs sb3-contrib RecurrentPPO (LSTM).

Every contender trains for the same number of env steps, with the same env, number of envs, rollout length and
memory size. RecurrentPPO runs in one or both of two settings (--sb3-settings):

- matched: the same PPO work as ours (minibatch count --minibatches, 4 epochs, lr, entropy coefficient) and the same
  architecture (one LSTM shared by actor and critic, as our policy shares its memory). The ratio is then the
  implementation alone.
- defaults: RecurrentPPO as ``RecurrentPPO("MlpLstmPolicy", env, n_steps=..., policy_kwargs=dict(lstm_hidden_size=...))``
  gives it: batch_size 128, 10 epochs, a second LSTM for the critic. The ratio is then what a user switching trainers
  sees, including the difference in gradient work per env step.

Our trainer is timed after one untimed warm-up iteration (``agent.compile`` compiles there). Prints the median
env-steps/s over the repeats (contenders interleaved so that machine load hits all alike) and the
ratios to each RecurrentPPO setting; for the ratios the issue names, also the ratio within each repeat and their
median (the contenders of one repeat run back to back, so a drift of the machine's speed between repeats cancels).

    python bench/throughput.py                  # the trainer's defaults: 32 envs x 64 steps, 8 minibatches; 3 repeats
    python bench/throughput.py --num-envs 8 --num-steps 128 --minibatches 4 --sb3-settings matched

``--baseline COMMIT`` adds our trainer as it was at that commit (ham, with that commit's ham config), run from a
temporary ``git worktree`` of it in a subprocess per repeat, on the same env: an env this checkout defines
(``envs/recall_tasks.py``, which imports only gymnasium and numpy) is registered there from this checkout's file, so
a commit from before the env existed can still be timed on it. The table then has the ratio to it too (issue 19).

    python bench/throughput.py --env cue-random-d200 --num-steps 202 --steps 19392 --baseline 44ed554 --compile

``--torch-kernels`` adds ham with ``HAM_RL_CPU_KERNEL=torch`` (the PyTorch forms of the ops that have a native CPU
kernel, ``kernels/native.py``), so the native kernels' share of the speed-up is read from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python bench/<name>.py`: bench.contenders comes from the checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
from omegaconf import OmegaConf

from bench.contenders import SB3_SETTINGS, make_ours, make_recurrent_ppo
from ham_rl.agents import PPOConfig
from ham_rl.config import CONFIG_DIR, memory_kwargs
from ham_rl.envs import recall_tasks, resolve_env_id

ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess inside the baseline's worktree: that commit's PPO and ham (its configs/memory/ham.yaml), timed
# as ours() times this checkout's; prints {"sps": ...}. Before the package layout agents and envs were top-level
# modules; after it they are ham_rl.agents and ham_rl.envs, whose folders (pyproject's package-dir) are mapped to the
# worktree's here, ahead of this checkout's editable install, which would otherwise answer for them. The run refuses
# to time a trainer from outside the worktree.
BASELINE_RUN = r"""
import importlib.abc, importlib.util, inspect, json, os, sys, time, warnings
import torch, yaml
root, tasks, env_id, hidden, num_envs, num_steps, minibatches, steps, threads = sys.argv[1:]
sys.path.insert(0, root)


class WorktreePackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        head, _, sub = name.partition(".")
        folder = os.path.join(root, sub)
        if head != "ham_rl" or not sub or "." in sub or os.path.isdir(os.path.join(root, "ham_rl", sub)):
            return None
        if not os.path.isfile(os.path.join(folder, "__init__.py")):
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


sys.meta_path.insert(0, WorktreePackages())
spec = importlib.util.spec_from_file_location("_recall_tasks", tasks)
tasks_module = sys.modules["_recall_tasks"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tasks_module)  # registers this checkout's env ids
warnings.filterwarnings("ignore")
torch.set_num_threads(int(threads))
if "package-dir" in open(os.path.join(root, "pyproject.toml")).read():
    from ham_rl.agents import PPO, PPOConfig, RecurrentActorCritic
    from ham_rl.envs import VecEnv
else:
    from agents import PPO, PPOConfig, RecurrentActorCritic
    from envs import VecEnv
for obj in (PPO, VecEnv):
    if not os.path.realpath(inspect.getfile(obj)).startswith(os.path.realpath(root) + os.sep):
        sys.exit(f"the baseline's {obj.__name__} came from {inspect.getfile(obj)}, outside its worktree {root}")
options = yaml.safe_load(open(f"{root}/configs/memory/ham.yaml"))
name, _ = options.pop("name"), options.pop("hidden_size")
cfg = PPOConfig(num_envs=int(num_envs), num_steps=int(num_steps), num_minibatches=int(minibatches), update_epochs=4,
                learning_rate=5e-4, anneal_lr=False, ent_coef=0.01)
torch.manual_seed(0)
venv = VecEnv(env_id, cfg.num_envs, seed=0)
agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, name, int(hidden), options)
ppo = PPO(agent, venv, cfg, total_timesteps=int(steps) + cfg.num_envs * cfg.num_steps)
ppo.iterate()  # warm-up, untimed, as for this checkout's contenders
t, start = time.perf_counter(), ppo.global_step
while ppo.update < ppo.num_updates:
    ppo.iterate()
print(json.dumps({"sps": (ppo.global_step - start) / (time.perf_counter() - t)}))
"""


def _config(args, compile: bool = False) -> PPOConfig:
    return PPOConfig(
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        num_minibatches=args.minibatches,
        update_epochs=4,
        learning_rate=5e-4,
        anneal_lr=False,
        ent_coef=0.01,
        compile=compile,
    )


def trainer_options(memory: str) -> dict:
    """The options of ``configs/memory/<memory>.yaml``: the trainer's memory, as ``python -m ham_rl.train`` builds it."""
    return memory_kwargs(OmegaConf.load(CONFIG_DIR / "memory" / f"{memory}.yaml"))[2]


def ours(memory: str, args, compile: bool = False, cpu_kernel: str = "native") -> float:
    """Env-steps/s of our trainer after one untimed warm-up iteration (where ``agent.compile`` compiles), with the CPU
    ops ``cpu_kernel`` picks (``HAM_RL_CPU_KERNEL``, read by the dispatchers at every call)."""
    previous = os.environ.get("HAM_RL_CPU_KERNEL")
    os.environ["HAM_RL_CPU_KERNEL"] = cpu_kernel
    try:
        return _ours(memory, args, compile)
    finally:
        if previous is None:
            del os.environ["HAM_RL_CPU_KERNEL"]
        else:
            os.environ["HAM_RL_CPU_KERNEL"] = previous


def _ours(memory: str, args, compile: bool) -> float:
    cfg = _config(args, compile)
    ppo = make_ours(args.env, memory, args.hidden, cfg, args.steps + cfg.batch_size, seed=0, options=trainer_options(memory))
    ppo.iterate()
    t, start = time.perf_counter(), ppo.global_step
    while ppo.update < ppo.num_updates:
        ppo.iterate()
    return (ppo.global_step - start) / (time.perf_counter() - t)


def recurrent_ppo(args, settings: str) -> float:
    model = make_recurrent_ppo(args.env, settings, args.hidden, _config(args), seed=0)
    t = time.perf_counter()
    model.learn(args.steps)
    return model.num_timesteps / (time.perf_counter() - t)


def baseline(worktree: Path, args) -> float:
    """Env-steps/s of the baseline commit's trainer with ham, in a fresh process inside its worktree."""
    argv = [str(worktree), recall_tasks.__file__, resolve_env_id(args.env), args.hidden,
            args.num_envs, args.num_steps, args.minibatches, args.steps, args.threads]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, "-c", BASELINE_RUN, *map(str, argv)], cwd=worktree, env=env,
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"the baseline run failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["sps"]


def add_worktree(commit: str, parent: str) -> Path:
    """``git worktree add --detach`` of ``commit`` under ``parent``; one line naming the commit if git refuses."""
    path = Path(parent) / "baseline"
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode:
        raise SystemExit(f"--baseline {commit!r}: git worktree add failed: {out.stderr.strip().splitlines()[-1]}")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="popgym-repeat")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument(
        "--minibatches", type=int, default=8, help="minibatches per epoch (RecurrentPPO: batch_size = envs*steps/this)"
    )
    p.add_argument("--steps", type=int, default=16384, help="env steps per contender per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every contender")
    p.add_argument(
        "--sb3-settings",
        nargs="*",
        choices=SB3_SETTINGS,
        default=list(SB3_SETTINGS),
        help="RecurrentPPO settings to time (none: skip it)",
    )
    p.add_argument("--memories", nargs="*", default=["ham", "gru", "attention"], help="memories of our trainer to time")
    p.add_argument("--compile", action="store_true", help="also time ham with agent.compile=true")
    p.add_argument(
        "--torch-kernels", action="store_true", help="also time ham with HAM_RL_CPU_KERNEL=torch (no native CPU kernels)"
    )
    p.add_argument("--baseline", metavar="COMMIT", help="also time ham with the trainer of this commit (a worktree)")
    args = p.parse_args()
    if args.steps < args.num_envs * args.num_steps:
        p.error("--steps must be >= num_envs * num_steps")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    contenders = {f"ours-{m}": lambda m=m: ours(m, args) for m in args.memories}
    if args.compile:
        contenders["ours-ham-compile"] = lambda: ours("ham", args, compile=True)
    if args.torch_kernels:
        contenders["ours-ham-torch-kernels"] = lambda: ours("ham", args, cpu_kernel="torch")
    for settings in args.sb3_settings:
        contenders[f"RecurrentPPO-{settings}"] = lambda settings=settings: recurrent_ppo(args, settings)
    with tempfile.TemporaryDirectory() as tmp:
        worktree = None
        if args.baseline:
            worktree = add_worktree(args.baseline, tmp)
            # right after ours-ham, so that the two run back to back in every repeat (their ratio is the issue's)
            run_baseline = {f"{args.baseline}-ham": lambda: baseline(worktree, args)}
            at = list(contenders).index("ours-ham") + 1 if "ours-ham" in contenders else len(contenders)
            items = list(contenders.items())
            contenders = dict(items[:at] + list(run_baseline.items()) + items[at:])
        try:
            results: dict[str, list[float]] = {k: [] for k in contenders}
            for r in range(args.repeats):
                for name, fn in contenders.items():
                    results[name].append(fn())
                    print(f"repeat {r + 1}/{args.repeats} {name:24s} {results[name][-1]:10.0f} steps/s", flush=True)
        finally:
            if worktree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nenv={args.env} num_envs={args.num_envs} num_steps={args.num_steps} hidden={args.hidden} "
        f"steps={args.steps} repeats={args.repeats} threads={args.threads}"
    )
    bases = {k: v for k, v in med.items() if k.startswith("RecurrentPPO")}
    print(f"{'contender':24s} {'steps/s (median)':>18s}" + "".join(f" {'x ' + k:>24s}" for k in bases))
    for k, v in med.items():
        print(f"{k:24s} {v:18.0f}" + "".join(f" {v / b:24.2f}" for b in bases.values()))
    if "ours-ham" in med:
        for k, b in bases.items():
            print(f"\nours-ham / {k} = {med['ours-ham'] / b:.2f}x (issue 19: >= 4x matched){paired(results, 'ours-ham', k)}")
        if args.baseline:
            base = f"{args.baseline}-ham"
            for k in ("ours-ham", "ours-ham-compile", "ours-ham-torch-kernels"):
                if k in med:
                    print(f"{k} / {base} = {med[k] / med[base]:.2f}x (issue 19: >= 3x){paired(results, k, base)}")


def paired(results: dict[str, list[float]], ours: str, base: str) -> str:
    """The ratio within each repeat (run back to back, so the machine's drift between repeats cancels), and their
    median: a steadier measure than the ratio of the medians where the machine's speed moves between repeats."""
    ratios = [a / b for a, b in zip(results[ours], results[base], strict=True)]
    return f"; per repeat {', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f}x"


if __name__ == "__main__":
    main()
