"""Train a recurrent PPO agent whose memory is HAM (or any memory of the family) on a POPGym task.

    python -m ham_rl.train env=popgym-repeat                        # HAM on RepeatPreviousEasy, 300k steps
    python -m ham_rl.train env.id=popgym-RepeatFirstMedium-v0 memory=gru seed=3
    python -m ham_rl.train --multirun memory=ham,gru seed=0,1,2     # one run dir per job under multirun/
    python -m ham_rl.train --multirun hydra/launcher=joblib memory=ham,gru seed=0,1   # the same, jobs in parallel
    torchrun --standalone --nproc_per_node=2 -m ham_rl.train run_dir=runs/dp2    # 2 data-parallel learners
    python -m ham_rl.train resume=runs/2026-11-21/12-00-00_ham_s0    # continue exactly from the last checkpoint

The run directory (format in ham_rl/runlog.py) gets config.yaml, metrics.csv, summary.json, checkpoints/, tb/.
Every ``cache_figure_every`` updates TensorBoard also gets what the cache kept in that rollout (``ham_rl.routing``):
the picture ``memory/cache`` and the scalars ``memory/cache_recall``, ``memory/cache_episode_recall``,
``memory/cache_precision`` (envs that mark informative steps only), ``memory/step0_cached`` and
``memory/cached_per_episode``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ham_rl import distributed
from ham_rl.agents import PPO, NonFiniteLossError, PPOConfig, RecurrentActorCritic
from ham_rl.checkpoint import CheckpointError, load_checkpoint, remove_stale_temp_files, save_checkpoint
from ham_rl.config import (
    CACHE_FIGURE_EVERY,
    CONFIG_PACKAGE,
    RESUME_MAY_CHANGE,
    ConfigError,
    config_diff,
    load_run_config,
    memory_kwargs,
    resolve_device,
    validate_root,
)
from ham_rl.early_stop import EarlyStop
from ham_rl.envs import make_vec_env, resolve_env_id
from ham_rl.routing import RoutingTrace
from ham_rl.runlog import MetricsCSV, summarise, write_json_atomic

__all__ = ["JobFailed", "TrainingStopped", "build", "main", "prepare_config", "resume_config", "train"]


def _run_dir_resolver(resume, run_dir, default) -> str:
    """hydra.run.dir: the resumed run's dir, else an explicit run_dir, else the timestamped default."""
    return str(resume) if resume else (str(run_dir) if run_dir else str(default))


OmegaConf.register_new_resolver("ham_rl_run_dir", _run_dir_resolver, replace=True)


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss or input, Ctrl-C, SIGTERM); the last good checkpoint is kept.

    :param exit_code: the CLI's exit status (1; 130 for Ctrl-C and 143 for SIGTERM, as shells report them)
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class JobFailed(RuntimeError):
    """One job of a ``--multirun`` failed (its error is printed); Hydra records it and the other jobs still run."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and ``timeout`` send), raised where the training loop is, like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def resume_config(run_dir: str | Path, overrides: list[str]) -> DictConfig:
    """The config to continue ``run_dir`` with: its saved ``config.yaml`` with the command line's ``key=value``
    overrides applied (``train`` then refuses those that may not change on resume, see ``RESUME_MAY_CHANGE``).
    ``stop_after_updates`` counts the updates of one invocation, so it is not carried over from the saved config.

    :raises ConfigError: no config.yaml there, or an override that is not a plain ``key=value``
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume={run_dir}: no config.yaml there, not a ham_rl run directory")
    cfg = load_run_config(run_dir)
    cfg.stop_after_updates = None
    for override in overrides:
        key, sep, _ = override.lstrip("+~").partition("=")
        if not sep or key in ("env", "memory", "agent"):
            raise ConfigError(f"resume={run_dir}: {override!r} cannot be applied to a saved run; give key=value settings")
    cfg.merge_with(OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    cfg.resume = str(run_dir)
    return cfg


def _interrupted(ckpt_path: Path, run_dir: Path, update: int, saved: dict, signal_name: str, exit_code: int):
    if not ckpt_path.exists():
        return TrainingStopped(
            f"{signal_name} before the first checkpoint; nothing to resume, the same command starts the run again",
            exit_code=exit_code,
        )
    return TrainingStopped(
        f"{signal_name}: interrupted during update {update + 1}; the checkpoint of update {saved['update']} "
        f"(step {saved['step']}) is kept at {ckpt_path}; continue with resume={run_dir}",
        exit_code=exit_code,
    )


def prepare_config(cfg: DictConfig) -> tuple[DictConfig, PPOConfig]:
    """A plain (unstructured) copy of ``cfg`` with env.id resolved to the gymnasium id, plus the checked PPOConfig.

    :raises ConfigError: for any bad value (one line, naming the value and the allowed ones)
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    validate_root(cfg)
    try:
        cfg.env.id = resolve_env_id(cfg.env.id)
        ppo_cfg = PPOConfig.from_dict(OmegaConf.to_container(cfg.agent))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    if cfg.total_timesteps < ppo_cfg.batch_size:
        raise ConfigError(
            f"total_timesteps ({cfg.total_timesteps}) must be >= agent.num_envs * agent.num_steps ({ppo_cfg.batch_size})"
        )
    memory_kwargs(cfg.memory)
    return cfg, ppo_cfg


def build(cfg: DictConfig, ppo_cfg: PPOConfig, device: torch.device, rank: int = 0) -> PPO:
    """Seed everything, then build the vector env, the agent and the PPO trainer.

    Rank r of a torchrun run seeds from ``seed + 2 * r * num_envs``: its envs start from seeds no other rank's envs
    start or restart from (rank 0 is the single-process run).
    """
    seed = cfg.seed + 2 * rank * ppo_cfg.num_envs
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    workers = int(cfg.env.get("workers", 0))  # run dirs from before env.workers stepped in-process
    venv = make_vec_env(
        cfg.env.id, ppo_cfg.num_envs, workers, seed, prev_action=cfg.env.prev_action, prev_reward=cfg.env.prev_reward
    )
    name, hidden, options = memory_kwargs(cfg.memory)
    try:
        agent = RecurrentActorCritic(
            venv.feature_dim,
            venv.action_space,
            name,
            hidden,
            options,
            embed_size=ppo_cfg.embed_size,
            head_size=ppo_cfg.head_size,
        ).to(device)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return PPO(agent, venv, ppo_cfg, cfg.total_timesteps, device=device)


def _load_error(e: BaseException) -> str:
    """``load_state_dict``'s error on one line: its heading and the first tensor that does not fit (line 2)."""
    return " ".join(part.strip() for part in str(e).split("\n", 2)[:2])


def _initial_weights(cfg: DictConfig) -> tuple[dict, bool]:
    """The agent weights of ``cfg.init_from``'s last checkpoint, checked against this run's memory (the spaces are
    checked when the weights are loaded into the built agent), and whether its threshold tau is carried over.

    tau is carried only where this run's ``memory.threshold`` is the one the source run was configured with: a
    threshold given for this stage (``memory.threshold=inf``: the cache off) is where this stage's tau starts.

    :raises ConfigError: not a run dir, no readable checkpoint, or another memory (one line, nothing written)
    """
    source = Path(cfg.init_from)
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"init_from={source}: no config.yaml there, not a ham_rl run directory")
    before = load_run_config(source)
    if before.memory.name != cfg.memory.name:
        raise ConfigError(f"init_from={source} trained memory={before.memory.name}, not memory={cfg.memory.name}")
    try:
        ckpt = load_checkpoint(source / "checkpoints" / "last.pt")
    except CheckpointError as e:
        raise ConfigError(f"init_from={source}: {e}") from e
    carry_tau = OmegaConf.select(before, "memory.threshold") == OmegaConf.select(cfg, "memory.threshold")
    return ckpt["ppo"]["agent"], carry_tau


def _changed_settings(saved: DictConfig, cfg: DictConfig) -> dict[str, tuple]:
    """The settings of ``RESUME_MAY_CHANGE`` that this resume changes: ``{key: (saved, given)}``."""
    keys = sorted(RESUME_MAY_CHANGE - {"resume", "run_dir"})
    pairs = {k: (OmegaConf.select(saved, k), OmegaConf.select(cfg, k)) for k in keys}
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}


def _record_resume(run_dir: Path, cfg: DictConfig, step: int, changed: dict) -> None:
    """Append the changed settings to resumes.jsonl and keep config.yaml the run's current config."""
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"global_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed}) + "\n")
    saved = OmegaConf.load(run_dir / "config.yaml")
    for key in changed:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(saved))
    os.replace(tmp, run_dir / "config.yaml")


def _start_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Create (or empty, for a run stopped before its first checkpoint) the run dir and write config.yaml.

    :raises ConfigError: the dir cannot be written (one line, nothing half-written)
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.csv", "resumes.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
        remove_stale_temp_files(run_dir / "checkpoints")
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir} cannot be written: {e.strerror or e}") from None


def _records_routing(ppo: PPO, every: int) -> bool:
    """Whether the next update records routing: the one that logs the cache picture, and as many before it as the
    longest episode so far spans rollouts, so that the episodes ending in that update are recorded from their start."""
    n, steps = ppo.update + 1, ppo.cfg.num_steps
    lead = -(-(max(ppo.ep_lengths, default=steps) - 1) // steps)  # rollouts back to the earliest start
    until_picture = -n % every  # 0 when update n draws one
    return until_picture <= lead


def _arm_routing(ppo: PPO, every: int, due: bool) -> None:
    """Give the next update a routing trace if it records (its finished episodes dropped before a picture's update).

    ``due``: a picture's update ended no episode (fixed-length episodes end in step across the envs), so the next
    update that ends some draws it."""
    if not (due or _records_routing(ppo, every)):
        ppo.routing_trace = None
        return
    if ppo.routing_trace is None:
        ppo.routing_trace = RoutingTrace()
    if (ppo.update + 1) % every == 0:
        ppo.routing_trace.drop_finished()  # the picture shows the episodes that end in its own rollout


def _log_cache_picture(writer, ppo: PPO, title: str) -> bool:
    """``memory/cache`` and its scalars for the episodes the trace holds; False where it holds none."""
    trace = ppo.routing_trace
    if trace is None or trace.num_episodes == 0:
        return False
    writer.add_figure("memory/cache", trace.raster_figure(title=title), ppo.global_step)
    for key, value in trace.summary().items():
        if value is not None:
            writer.add_scalar(f"memory/{key}", value, ppo.global_step)
    trace.drop_finished()
    return True


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _print_summary(summary: dict, run_dir: Path) -> None:
    rows = [(k, _fmt(v) if isinstance(v, float) else str(v)) for k, v in summary.items()]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"run summary: {run_dir}")
        table.add_column("key")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:  # pragma: no cover - rich is installed with the project
        print(f"run summary: {run_dir}")
        for k, v in rows:
            print(f"  {k:16s} {v}")


def train(cfg: DictConfig) -> dict:
    """Run (or resume) one training run as configured; returns the summary (written to summary.json at the end).

    :raises ConfigError: bad config, unknown env/memory, resume dir with another config (nothing written)
    :raises CheckpointError: missing or corrupt checkpoint on resume (nothing written)
    :raises TrainingStopped: non-finite loss or input, Ctrl-C or SIGTERM (the last good checkpoint is kept)
    """
    cfg, ppo_cfg = prepare_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.resume is None and cfg.run_dir is None:
        raise ConfigError("run_dir is not set (the CLI sets it to Hydra's output dir)")
    dp = distributed.init(device)  # None without torchrun
    rank, world_size = (dp.rank, dp.size) if dp else (0, 1)
    if dp is not None and cfg.resume is None:
        cfg.run_dir = dp.share(cfg.run_dir)  # rank 0's: each rank's Hydra timestamp may differ
    run_dir = Path(cfg.resume or cfg.run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    ckpt, changed = None, {}
    unstarted = (run_dir / "config.yaml").is_file() and not ckpt_path.exists() and not (run_dir / "summary.json").exists()
    if cfg.resume is not None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"resume={run_dir}: no config.yaml there, not a ham_rl run directory")
        saved = load_run_config(run_dir)
        diff = config_diff(saved, cfg)
        if diff:
            raise ConfigError(f"resume={run_dir} was run with another config: {'; '.join(diff)} (saved -> given)")
        changed = {k: [v[0], v[1]] for k, v in _changed_settings(saved, cfg).items()}
        if unstarted:
            print(f"{run_dir} stopped before its first checkpoint: starting it again from the beginning", file=sys.stderr)
        else:
            ckpt = load_checkpoint(ckpt_path)
    elif unstarted:
        print(f"{run_dir} holds a run stopped before its first checkpoint: starting it again", file=sys.stderr)
    elif (run_dir / "config.yaml").exists() or ckpt_path.exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with resume={run_dir} or choose another run_dir")
    cfg.run_dir = str(run_dir)
    if ckpt is not None and int(ckpt.get("world_size", 1)) != world_size:
        raise ConfigError(f"resume={run_dir} ran on {ckpt.get('world_size', 1)} ranks; resume it on as many, not {world_size}")
    if dp is not None:
        dp.barrier()  # every rank has checked the run dir before rank 0 writes to it
    if ckpt is not None and cfg.total_timesteps < int(ckpt["ppo"]["global_step"]):
        raise ConfigError(
            f"total_timesteps={cfg.total_timesteps} is below the {ckpt['ppo']['global_step']} steps {run_dir} has done"
        )

    init, carry_tau = _initial_weights(cfg) if ckpt is None and cfg.get("init_from") else (None, True)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ppo = build(cfg, ppo_cfg, device, rank)
    if init is not None:
        if not carry_tau:  # this stage's own starting tau, as built from its config
            own = ppo.agent.state_dict()
            init = {k: own[k] if k.split(".")[-1] == "tau" and k in own else v for k, v in init.items()}
        try:
            ppo.agent.load_state_dict(init)
        except RuntimeError as e:
            raise ConfigError(f"init_from={cfg.init_from} does not fit this run's agent: {_load_error(e)}") from e
    if dp is not None:
        dp.broadcast(ppo.agent)
        ppo.data_parallel = dp
    num_params = sum(p.numel() for p in ppo.agent.parameters())
    elapsed_before = 0.0
    if ckpt is not None:
        try:
            ppo.load_state_dict(ckpt["ppo"] if rank == 0 else ckpt["ranks"][rank - 1])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this config: {str(e).splitlines()[0]}") from e
        elapsed_before = float(ckpt["elapsed_s"])
        remove_stale_temp_files(ckpt_path.parent)  # left by a writer killed mid-write; last.pt itself is whole
        if changed and rank == 0:
            _record_resume(run_dir, cfg, ppo.global_step, changed)
    elif rank == 0:
        _start_run_dir(run_dir, cfg)

    # rank 0 alone logs and checkpoints (its own episodes' returns); the other ranks write nothing
    metrics = (
        MetricsCSV(run_dir / "metrics.csv", resume_step=ppo.global_step if ckpt is not None else None) if rank == 0 else None
    )
    writer = None
    if cfg.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=ppo.global_step + 1 if ckpt is not None else None)
        if ckpt is None:
            writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
    routes = writer is not None and ppo.agent.memory.has_cache  # gru, lstm, mlp, gdn: no cache, no picture
    figure_every = int(cfg.get("cache_figure_every", CACHE_FIGURE_EVERY)) if routes else 0
    picture_due = False

    from tqdm.auto import tqdm

    pbar = tqdm(
        total=ppo.num_updates * ppo_cfg.batch_size,
        initial=ppo.global_step,
        unit="step",
        unit_scale=True,
        disable=not cfg.progress or rank > 0,
        dynamic_ncols=True,
        desc=f"{cfg.memory.name} {cfg.env.id}",
    )

    saved = {"update": ppo.update, "step": ppo.global_step}  # what checkpoints/last.pt holds

    def checkpoint(t_now: float) -> None:
        states = dp.gather(ppo.state_dict()) if dp is not None else [ppo.state_dict()]
        if rank > 0:
            return
        data = {"config": OmegaConf.to_container(cfg), "ppo": states[0], "elapsed_s": elapsed_before + t_now - t0}
        if world_size > 1:  # every other rank's envs, memory state and RNGs, to resume each exactly
            data.update(ranks=states[1:], world_size=world_size)
        save_checkpoint({**data, "num_params": num_params}, ckpt_path)
        saved.update(update=ppo.update, step=ppo.global_step)  # only once the file is whole

    early = EarlyStop(
        OmegaConf.select(cfg, "early_stop.at_return"),
        OmegaConf.select(cfg, "early_stop.after_steps", default=0),
        MetricsCSV.read(run_dir / "metrics.csv") if metrics is not None else (),
    )
    t0 = time.perf_counter()
    start_step, updates_here = ppo.global_step, 0
    cost = _Cost()
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        while ppo.update < ppo.num_updates:
            if figure_every:
                _arm_routing(ppo, figure_every, picture_due)
            try:
                stats = ppo.iterate()
            except NonFiniteLossError as e:
                where = f"last good checkpoint: {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
                raise TrainingStopped(f"{e}; run stopped, {where}") from e
            updates_here += 1
            cost.add(stats)
            now = time.perf_counter()
            fps = (ppo.global_step - start_step) / max(now - t0, 1e-9)
            stats["time/fps"] = fps
            row = {
                "global_step": ppo.global_step,
                "time_s": elapsed_before + now - t0,
                "ep_rew_mean": stats["rollout/ep_rew_mean"],
                "ep_len_mean": stats["rollout/ep_len_mean"],
                "fps": fps,
                "kv_fraction": stats["memory/kv_fraction"],
                "kv_len_mean": stats["memory/kv_len_mean"],
                "threshold": stats["memory/threshold"],
            }
            if metrics is not None:
                metrics.append(row)
            if writer is not None:
                for k, v in stats.items():
                    if v is not None and np.isfinite(v):
                        writer.add_scalar(k, v, ppo.global_step)
                if figure_every and (picture_due or ppo.update % figure_every == 0):
                    title = f"{cfg.memory.name} on {cfg.env.id}, update {ppo.update}"
                    picture_due = not _log_cache_picture(writer, ppo, title)
            pbar.update(ppo_cfg.batch_size)
            pbar.set_postfix(ret=_fmt(stats["rollout/ep_rew_mean"]), sps=f"{fps:.0f}", refresh=False)
            stop = cfg.stop_after_updates is not None and updates_here >= cfg.stop_after_updates
            learned = early.observe(ppo.global_step, row["ep_rew_mean"]) if rank == 0 else False
            if dp is not None:
                learned = dp.share(learned)  # rank 0's returns decide, so that every rank leaves the loop together
            if ppo.update % cfg.checkpoint_every == 0 or ppo.update == ppo.num_updates or stop or learned:
                checkpoint(time.perf_counter())
            if learned:
                break
            if stop and ppo.update < ppo.num_updates:
                pbar.close()
                if rank == 0:
                    print(f"stopped after {updates_here} updates at step {ppo.global_step}; continue with resume={run_dir}")
                if dp is not None:
                    dp.barrier()  # every rank done with its last checkpoint before any leaves the process group
                return {"global_step": ppo.global_step, "stopped": True}
        if dp is not None:
            dp.barrier()  # as above: rank 0 may still be writing when the others reach the end
    # Wherever the signal lands (in an update, logging, or a checkpoint write, which leaves the old file whole), the
    # last complete checkpoint is the state to continue from: a half-done update is not one.
    except _Terminated:
        raise _interrupted(ckpt_path, run_dir, ppo.update, saved, "SIGTERM", 143) from None
    except KeyboardInterrupt:
        raise _interrupted(ckpt_path, run_dir, ppo.update, saved, "Ctrl-C", 130) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_sigterm)
        pbar.close()
        if writer is not None:
            writer.close()
        ppo.venv.close()
        if dp is not None:
            dp.close()

    if rank > 0:
        return {"global_step": ppo.global_step, "rank": rank}
    summary = summarise(
        MetricsCSV.read(run_dir / "metrics.csv"),
        env=cfg.env.id,
        memory=cfg.memory.name,
        seed=cfg.seed,
        total_timesteps=cfg.total_timesteps,
        num_params=num_params,
        threshold=ppo.agent.memory.threshold,
    )
    summary["world_size"] = world_size
    summary["early_stop"] = early.summary()
    summary["cost"] = cost.summary()
    write_json_atomic(summary, run_dir / "summary.json")
    if cfg.progress:
        _print_summary(summary, run_dir)
    return summary


class _Cost:
    """What the run cost besides env steps: seconds per rollout and per update, the largest cache an episode ended
    with, the process's peak memory (this invocation; a resumed run counts from its resume)."""

    def __init__(self):
        self.rollout_s: list[float] = []
        self.update_s: list[float] = []
        self.kv_len_max: int | None = None

    def add(self, stats: dict) -> None:
        self.rollout_s.append(stats["time/rollout_s"])
        self.update_s.append(stats["time/update_s"])
        if stats.get("memory/kv_len_max") is not None:
            self.kv_len_max = max(self.kv_len_max or 0, stats["memory/kv_len_max"])

    def summary(self) -> dict:
        """``{rollout_s_mean, update_s_mean, kv_len_max, peak_rss_mb}`` (None where nothing was measured)."""
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        return {
            "rollout_s_mean": sum(self.rollout_s) / len(self.rollout_s) if self.rollout_s else None,
            "update_s_mean": sum(self.update_s) / len(self.update_s) if self.update_s else None,
            "kv_len_max": self.kv_len_max,
            "peak_rss_mb": peak_kb / 1024,
        }


def _exit_or_fail_job(error: Exception, exit_code: int) -> None:
    """Print ``error`` on one line and exit with ``exit_code``; in a multirun, fail only this job (Hydra's launchers
    run the others and report the failure at the end), unless Ctrl-C or SIGTERM (130, 143) asked the sweep to stop."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    print(f"error: {error}", file=sys.stderr)
    if exit_code not in (130, 143) and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(str(error)) from None
    sys.exit(exit_code)


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="config")
def main(cfg: DictConfig) -> None:
    """CLI entry point (Hydra): ``python -m ham_rl.train [group=option ...] [key=value ...]``.

    ``resume=<dir>`` continues from the dir's own config.yaml; other ``key=value`` given with it are checked against it.
    """
    from hydra.core.hydra_config import HydraConfig

    try:
        if cfg.resume is not None:
            given = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+").startswith("resume=")]
            cfg = resume_config(cfg.resume, given)
        elif cfg.run_dir is None:
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        train(cfg)
    except (ConfigError, CheckpointError) as e:
        _exit_or_fail_job(e, 2)
    except TrainingStopped as e:
        _exit_or_fail_job(e, e.exit_code)


if __name__ == "__main__":
    main()
