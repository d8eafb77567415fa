"""Score a trained run again, optionally at other thresholds tau (HAM family), without retraining.

    python -m ham_rl.evaluate <run dir>                                 # at the trained tau, 100 episodes
    python -m ham_rl.evaluate <run dir> memory.threshold=0.3 episodes=200
    python -m ham_rl.evaluate <run dir> memory.threshold=[0.1,0.3,0.6]  # sweep: writes sweep.csv and sweep.png

Other keys: num_envs (parallel eval envs), seed (eval env seed; default: the run's seed + 1000, so the episodes
differ from training's), deterministic (argmax actions, default true), device, torch_threads.

Which cached steps the answer is read from: ``drop=informative`` removes each informative step's entry from the cache
right after its step (the step itself still reads it), ``drop=uninformative`` removes every other entry, so the
cache holds the informative steps only. A policy that answers from its cache's cue falls to a guess under the first
and keeps its success under the second; one that answers from step 0 or from the RNN path does not. Needs an
unbounded cache (ham, ham-learned, attention at ``capacity`` 0) and an env that marks informative steps.

    python -m ham_rl.evaluate <run dir> drop=informative episodes=200

Every result is also appended to ``<run dir>/evaluations.jsonl`` (one JSON object per line: the numbers below, the
options, the checkpoint's step and the trained threshold); ``python -m ham_rl.report`` turns them into a table per env
of what each run's answer is read from (the trained threshold, the cache off, each drop).

What the cache kept (``ham_rl.routing``), for memories that route steps to a cache (ham, ham-learned, attention,
window, hqlt): each result reports ``step0_cached`` (episodes whose first step was cached) and
``cached_per_episode``, and, where the env marks informative steps (``info["informative"]``: the recall envs, the
T-Maze, MiniGrid's memory rooms), ``cache_recall`` (informative steps cached), ``cache_episode_recall`` (episodes with
an informative step in which one was cached) and ``cache_precision`` (cached steps that were informative); None
elsewhere. ``cache.png`` in the run dir shows the episodes (step across, episode down, cached filled, informative
outlined) at the first threshold evaluated (the trained one by default); a sweep adds ``cache_tau<tau>.png`` per
threshold. Where the env ends its episodes with ``info["is_success"]`` (the T-Maze, MiniGrid's memory rooms), each
result also reports ``success_rate``; where it also marks informative steps, ``informed_rate`` (episodes in which the
agent was shown one) and the success rate in those episodes and in the rest, which tells a memory that forgot the cue
from a policy that never looked at it (MiniGrid's S13Random).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ham_rl.agents import RecurrentActorCritic
from ham_rl.checkpoint import CheckpointError, load_checkpoint
from ham_rl.config import ConfigError, load_run_config, memory_kwargs, resolve_device
from ham_rl.envs import VecEnv
from ham_rl.routing import RoutingTrace, informative_flags

__all__ = ["EVALUATIONS", "Episodes", "evaluate_policy", "evaluate_run", "load_run_agent", "main"]

EVAL_KEYS = ("memory.threshold", "episodes", "num_envs", "seed", "deterministic", "device", "torch_threads", "drop")
DROPS = ("informative", "uninformative")  # which cache entries ``drop=`` removes
#: file in the run dir to which every evaluation appends one JSON object per result (``ham_rl.report`` tabulates them)
EVALUATIONS = "evaluations.jsonl"


class Episodes(NamedTuple):
    """What :func:`evaluate_policy` saw of each episode, in the same order."""

    returns: list[float]
    #: the env's ``info["is_success"]`` at each episode's end; None where the env does not say
    successes: list[bool | None]
    #: whether the agent was shown an informative step (``info["informative"]``: MiniGrid's cue in view, T-Maze's
    #: cue) in each episode; None where the env does not say
    informed: tuple[bool | None, ...] | list[bool | None] = ()

    def success_rate(self) -> float | None:
        """The fraction of successful episodes, or None unless every episode said."""
        if not self.successes or any(s is None for s in self.successes):
            return None
        return float(np.mean(self.successes))

    def informed_rate(self) -> float | None:
        """The fraction of episodes in which an informative step was shown, or None unless every episode said."""
        if not self.informed or any(i is None for i in self.informed):
            return None
        return float(np.mean(self.informed))

    def success_rate_where(self, informed: bool) -> float | None:
        """The success rate over the episodes that were (or were not) shown an informative step; None where none
        was, or the env does not say: it separates a memory that forgets from a policy that never looked."""
        if self.success_rate() is None or self.informed_rate() is None:
            return None
        picked = [s for s, i in zip(self.successes, self.informed, strict=True) if i == informed]
        return float(np.mean(picked)) if picked else None


def evaluate_policy(
    agent: RecurrentActorCritic,
    venv: VecEnv,
    episodes: int,
    deterministic: bool = True,
    device: torch.device | str = "cpu",
    trace: RoutingTrace | None = None,
    drop: str | None = None,
) -> Episodes:
    """``episodes`` complete episodes; env i contributes ``episodes // B`` (+1 for the first remainder).

    Each env's quota is fixed up front, so short episodes are not over-represented. ``trace``: record the routing
    of the same episodes into it (nothing is recorded for a memory without a cache router); with ``drop`` (one of
    ``DROPS``) the entries it removed are not recorded as cached.
    """
    b = venv.num_envs
    quota = np.array([episodes // b + (1 if i < episodes % b else 0) for i in range(b)])
    got: list[list[tuple[float, bool | None, bool | None]]] = [[] for _ in range(b)]
    x, start = venv.reset()
    state = agent.initial_state(b, device=device)
    shown = np.zeros(b, np.int8)  # per env, this episode so far: 1 an informative step, 0 none, -1 the env does not say
    with torch.no_grad():
        while any(len(got[i]) < quota[i] for i in range(b)):
            informative = informative_flags(venv.infos)  # of the observation x
            shown = np.where(start, informative, np.where(informative == 1, 1, shown))
            action, _, _, state = agent.step(
                torch.from_numpy(x).to(device), state, torch.from_numpy(start).to(device), deterministic=deterministic
            )
            routing = agent.memory.last_routing
            if drop is not None:
                routing = _drop_entries(state, routing, informative, drop)
            was_start = start
            x, _, start, finished = venv.step(agent.action_head.to_env(action))
            if trace is not None and routing is not None:
                score, routed = (t.cpu().numpy()[None] for t in routing)
                active = np.array([len(got[i]) < quota[i] for i in range(b)])  # envs whose episode still counts
                trace.add_steps(routed, was_start[None], start[None], informative[None], score, active=active)
            for i, ret, _ in finished:
                if len(got[i]) < quota[i]:
                    success = venv.final_infos[i].get("is_success")
                    informed = None if shown[i] < 0 else bool(shown[i])
                    got[i].append((ret, None if success is None else bool(success), informed))
    seen = [episode for per_env in got for episode in per_env]
    return Episodes([r for r, _, _ in seen], [s for _, s, _ in seen], [i for _, _, i in seen])


def _drop_entries(state, routing: tuple[torch.Tensor, torch.Tensor], informative: np.ndarray, drop: str):
    """Undo this step's cache write where ``drop`` says: an unbounded cache appends at its length, so one less forgets
    it (the slot is written over by the next append). Returns the routing with the dropped writes unset."""
    if (informative < 0).any():
        raise ConfigError("drop= needs an env that marks informative steps (info['informative']); this one does not")
    score, routed = routing
    flags = torch.from_numpy(informative == 1).to(routed.device)
    undo = routed & (flags if drop == "informative" else ~flags)
    state.cache.length = state.cache.length - undo.long()
    return score, routed & ~undo


def _parse(argv: list[str]) -> tuple[Path, dict]:
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise ConfigError("usage: python -m ham_rl.evaluate <run dir> [memory.threshold=TAU|[T1,T2,...]] [episodes=N] ...")
    run_dir = Path(argv[0])
    try:
        over = OmegaConf.to_container(OmegaConf.from_dotlist(argv[1:]))
    except Exception as e:  # noqa: BLE001 - omegaconf grammar errors
        raise ConfigError(f"cannot parse overrides {argv[1:]}: {str(e).splitlines()[0]}") from e
    flat = {}
    for k, v in over.items():
        if k == "memory" and isinstance(v, dict):
            flat.update({f"memory.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    unknown = sorted(set(flat) - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(f"unknown evaluate option(s) {', '.join(unknown)}; allowed: {', '.join(EVAL_KEYS)}")
    return run_dir, flat


def load_run_agent(
    run_dir: str | Path,
    venv: VecEnv,
    cfg: DictConfig | None = None,
    ckpt: dict | None = None,
    device: torch.device | str = "cpu",
) -> RecurrentActorCritic:
    """The agent of ``run_dir``'s last checkpoint, built from its config.yaml for ``venv``'s spaces, in eval mode.

    :param cfg: the run's config, when the caller has loaded it already (else read from ``run_dir``)
    :param ckpt: the run's last checkpoint, when the caller has loaded it already (else read from ``run_dir``)
    :raises CheckpointError: the checkpoint's weights do not fit the agent that the config describes
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir) if cfg is None else cfg
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt") if ckpt is None else ckpt
    name, hidden, mem_options = memory_kwargs(cfg.memory)
    agent = RecurrentActorCritic(
        venv.feature_dim,
        venv.action_space,
        name,
        hidden,
        mem_options,
        embed_size=int(cfg.agent.embed_size),
        head_size=int(cfg.agent.head_size),
    ).to(device)
    try:
        agent.load_state_dict(ckpt["ppo"]["agent"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint of {run_dir} does not fit its config.yaml: {str(e).splitlines()[0]}") from e
    return agent.eval()


def evaluate_run(
    run_dir: str | Path, options: dict | None = None, quiet: bool = False, pictures: bool = True, record: bool = True
) -> list[dict]:
    """Evaluate the last checkpoint of ``run_dir`` at one or several thresholds.

    :param options: keys of ``EVAL_KEYS``; ``memory.threshold`` may be a float or a list of floats
    :param pictures: write ``cache.png`` (and a sweep's ``sweep.csv``, ``sweep.png``) into the run dir
    :param record: append each result to ``<run_dir>/evaluations.jsonl`` with the checkpoint's step, the trained
        threshold and the evaluation's seed (what ``python -m ham_rl.report`` reads)
    :return: one dict per threshold: threshold, mean_return, std_return, kv_fraction, episodes, success_rate (the
        share of episodes whose last ``info`` said ``is_success``: T-Maze, MiniGrid), informed_rate (episodes shown an
        informative step), success_informed and success_uninformed (the success rate in those and in the others),
        and what the cache kept:
        cache_recall, cache_episode_recall, cache_precision, step0_cached, cached_per_episode (None where not
        applicable)
    """
    run_dir, opts = Path(run_dir), dict(options or {})
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a ham_rl run directory (no config.yaml)")
    cfg = load_run_config(run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    episodes = opts.get("episodes", 100)
    if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
        raise ConfigError(f"episodes must be an int >= 1, got {episodes!r}")
    num_envs = opts.get("num_envs", min(episodes, int(cfg.agent.num_envs)))
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ConfigError(f"num_envs must be an int >= 1, got {num_envs!r}")
    seed = opts.get("seed", int(cfg.seed) + 1000)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    deterministic = opts.get("deterministic", True)
    if not isinstance(deterministic, bool):
        raise ConfigError(f"deterministic must be true or false, got {deterministic!r}")
    device = resolve_device(opts.get("device", "cpu"))
    threads = opts.get("torch_threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"torch_threads must be an int >= 0 (0 = torch default), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)

    venv = VecEnv(cfg.env.id, num_envs, seed=seed, prev_action=cfg.env.prev_action, prev_reward=cfg.env.prev_reward)
    agent = load_run_agent(run_dir, venv, cfg, ckpt, device)
    name = cfg.memory.name
    mem = agent.memory
    trained_tau = mem.threshold
    taus = opts.get("memory.threshold", trained_tau)
    taus = list(taus) if isinstance(taus, (list, tuple)) else [taus]
    # inside a list the override grammar leaves inf as a string: [0.1,inf] means the same as a lone inf
    taus = [float(t) if isinstance(t, str) and t.strip().lower() in ("inf", "+inf", "-inf") else t for t in taus]
    taus = [trained_tau if t is None else t for t in taus]  # null in a sweep ([null,inf]): the trained tau
    if trained_tau is None and any(t is not None for t in taus):
        raise ConfigError(f"memory {name!r} has no threshold (no router); drop memory.threshold")
    drop = opts.get("drop")
    if drop is not None and drop not in DROPS:
        raise ConfigError(f"drop must be one of {', '.join(DROPS)}, got {drop!r}")
    if drop is not None and (not getattr(mem, "use_attention", False) or getattr(mem, "capacity", 0)):
        raise ConfigError(f"drop= needs a memory with an unbounded KV cache (ham, ham-learned, attention), not {name!r}")
    for tau in taus:
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau)):
            raise ConfigError(f"memory.threshold must be a number (inf allowed) or a list of numbers, got {tau!r}")
    results = []
    for tau in taus:
        if tau is not None:
            mem.set_threshold(float(tau))
        mem.end_update()  # reset the routing counters
        torch.manual_seed(seed)
        trace = RoutingTrace()
        seen = evaluate_policy(agent, venv, episodes, deterministic=deterministic, device=device, trace=trace, drop=drop)
        returns = seen.returns
        stats = mem.end_update()
        if tau is not None:
            mem.set_threshold(float(tau))  # undo a target-fraction feedback step
        res = {
            "threshold": None if tau is None else float(tau),
            "mean_return": float(np.mean(returns)),
            "std_return": float(np.std(returns)),
            # dropped entries were written, then removed: what the cache held is the trace's
            "kv_fraction": stats.get("kv_fraction") if drop is None else trace.kv_fraction,
            "drop": drop,
            "episodes": len(returns),
            "success_rate": seen.success_rate(),
            "informed_rate": seen.informed_rate(),
            "success_informed": seen.success_rate_where(True),
            "success_uninformed": seen.success_rate_where(False),
            **trace.summary(),
        }
        results.append(res)
        tau_s = "-" if tau is None else f"{float(tau):g}"
        names = (["cache.png"] if len(results) == 1 else []) + ([f"cache_tau{tau_s}.png"] if len(taus) > 1 else [])
        names = [n.replace("cache", f"cache_drop-{drop}", 1) for n in names] if drop else names  # keep cache.png
        names = names if pictures else []  # a caller that wants the numbers only (bench/return_against.py --success)
        written = _write_cache_pictures(trace, f"{name} on {cfg.env.id}, threshold {tau_s}", [run_dir / n for n in names])
        if not quiet:
            kv = "-" if res["kv_fraction"] is None else f"{res['kv_fraction']:.4f}"
            kept = (
                f"; cache recall {_fmt(res['cache_recall'])} (episodes {_fmt(res['cache_episode_recall'])}) "
                f"precision {_fmt(res['cache_precision'])} "
                f"step0_cached {_fmt(res['step0_cached'])} cached/episode {_fmt(res['cached_per_episode'], '.2f')}"
                if trace.num_episodes
                else ""
            )
            dropped = "" if drop is None else f" drop={drop}"
            success = "" if res["success_rate"] is None else f", success rate {res['success_rate']:.3f}"
            if res["success_rate"] is not None and res["informed_rate"] is not None:
                success += (
                    f" (informative step shown in {res['informed_rate']:.3f} of episodes; success "
                    f"{_fmt(res['success_informed'])} there, {_fmt(res['success_uninformed'])} elsewhere)"
                )
            print(
                f"{name} {cfg.env.id} threshold={tau_s}{dropped}: mean return {res['mean_return']:.4f} "
                f"± {res['std_return']:.4f} (std over {res['episodes']} episodes){success}, kv_fraction {kv}{kept}"
            )
            for path in written:
                print(f"wrote {path}")
    venv.close()
    if record:
        context = {"checkpoint_step": int(ckpt["ppo"]["global_step"]), "trained_threshold": trained_tau, "eval_seed": seed}
        _append_records(run_dir / EVALUATIONS, [{**context, "deterministic": deterministic, **r} for r in results])
    if len(results) > 1 and pictures:
        _write_sweep(run_dir, results, title=f"{name} on {cfg.env.id}")
        if not quiet:
            print(f"wrote {run_dir / 'sweep.csv'} and {run_dir / 'sweep.png'}")
    return results


def _json_number(value: object) -> object:
    """JSON has no infinity or NaN: a threshold of +-inf is written as the string "inf" / "-inf", a NaN as null."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None if isinstance(value, float) and math.isnan(value) else value


def _append_records(path: Path, records: list[dict]) -> None:
    """Add one JSON line per record to ``path``, replacing the file whole so that no line is ever half-written."""
    old = path.read_text() if path.is_file() else ""
    new = "".join(json.dumps({k: _json_number(v) for k, v in r.items()}, allow_nan=False) + "\n" for r in records)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(old + new)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _write_cache_pictures(trace: RoutingTrace, title: str, paths: list[Path]) -> list[Path]:
    """The trace's raster at each of ``paths``; none where no routing was recorded (a memory without a router)."""
    if trace.num_episodes == 0 or not paths:
        return []
    fig = trace.raster_figure(title=title)
    for path in paths:
        fig.savefig(path, dpi=110)
    return paths


def _write_sweep(run_dir: Path, results: list[dict], title: str) -> None:
    cols = ["threshold", "mean_return", "std_return", "kv_fraction", "episodes", "cache_recall", "cache_precision",
            "step0_cached", "cached_per_episode", "success_rate", "cache_episode_recall", "informed_rate",
            "success_informed", "success_uninformed"]  # fmt: skip
    with open(run_dir / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow(["" if r[c] is None else r[c] for c in cols])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["kv_fraction"] if r["kv_fraction"] is not None else math.nan for r in results]
    ax.errorbar(xs, [r["mean_return"] for r in results], yerr=[r["std_return"] for r in results], marker="o", capsize=3)
    for x, r in zip(xs, results, strict=False):
        ax.annotate(f"τ={r['threshold']:g}", (x, r["mean_return"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KV fraction (stored / seen tokens)")
    ax.set_ylabel("mean episodic return")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "sweep.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m ham_rl.evaluate <run dir> [key=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_dir, opts = _parse(argv)
        evaluate_run(run_dir, opts)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a run dir that cannot take sweep.csv
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
