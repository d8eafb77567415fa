"""Config checks shared by ``ham_rl.train`` and ``ham_rl.evaluate``: the root keys, the memory group, config diffs.

The config itself lives in ``configs/`` (Hydra); PPO hyperparameters are checked by ``agents.PPOConfig``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ham_rl.memory import MEMORIES, memory_options

__all__ = [
    "CACHE_FIGURE_EVERY",
    "CONFIG_DIR",
    "CONFIG_PACKAGE",
    "ConfigError",
    "RESUME_MAY_CHANGE",
    "config_diff",
    "memory_kwargs",
    "resolve_device",
    "validate_root",
]

#: Hydra's search path entry for the shipped configs (wherever the package is installed)
CONFIG_PACKAGE = "pkg://ham_rl.configs"
#: the folder of the shipped configs on disk (``configs/`` in a checkout or an editable install)
CONFIG_DIR = Path(str(importlib.resources.files("ham_rl.configs"))).resolve()

#: keys (or dotted leaves) that may differ between a run and its resumption: how it runs, not what it computes
#: (env.workers gives the same trajectories with any number of worker processes; agent.compile the same outputs within
#: round-off), and total_timesteps to extend a run
#: (the learning-rate schedule then anneals over the new length from the resumed update on)
RESUME_MAY_CHANGE = frozenset(
    {"resume", "run_dir", "device", "torch_threads", "progress", "tensorboard", "cache_figure_every", "checkpoint_every",
     "stop_after_updates", "early_stop.at_return", "early_stop.after_steps", "total_timesteps", "env.workers",
     "agent.compile"}
)  # fmt: skip


#: ``cache_figure_every`` of a run whose config.yaml predates the key
CACHE_FIGURE_EVERY = 25


class ConfigError(ValueError):
    """A user error in the config or command line; printed as one line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_root(cfg: DictConfig) -> None:
    """Check the root keys of the train config; raise ConfigError naming the bad value."""
    if not _is_int(cfg.seed) or cfg.seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {cfg.seed!r}")
    if not _is_int(cfg.total_timesteps) or cfg.total_timesteps <= 0:
        raise ConfigError(f"total_timesteps must be an int > 0, got {cfg.total_timesteps!r}")
    if not _is_int(cfg.checkpoint_every) or cfg.checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be an int >= 1, got {cfg.checkpoint_every!r}")
    if cfg.stop_after_updates is not None and (not _is_int(cfg.stop_after_updates) or cfg.stop_after_updates < 1):
        raise ConfigError(f"stop_after_updates must be null or an int >= 1, got {cfg.stop_after_updates!r}")
    at_return = OmegaConf.select(cfg, "early_stop.at_return")
    if at_return is not None and (isinstance(at_return, bool) or not isinstance(at_return, int | float)):
        raise ConfigError(f"early_stop.at_return must be null or a number (a training return), got {at_return!r}")
    after = OmegaConf.select(cfg, "early_stop.after_steps", default=0)
    if not _is_int(after) or after < 0:
        raise ConfigError(f"early_stop.after_steps must be an int >= 0 (env steps), got {after!r}")
    every = cfg.get("cache_figure_every", CACHE_FIGURE_EVERY)
    if not _is_int(every) or every < 0:
        raise ConfigError(f"cache_figure_every must be an int >= 0 (0 = no cache pictures), got {every!r}")
    if not _is_int(cfg.torch_threads) or cfg.torch_threads < 0:
        raise ConfigError(f"torch_threads must be an int >= 0 (0 = torch default), got {cfg.torch_threads!r}")
    for key in ("progress", "tensorboard", "env.prev_action", "env.prev_reward"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    workers, num_envs = OmegaConf.select(cfg, "env.workers", default=0), OmegaConf.select(cfg, "agent.num_envs")
    if not _is_int(workers) or not 0 <= workers <= (num_envs if _is_int(num_envs) else workers):
        raise ConfigError(f"env.workers must be an int from 0 (in-process) to agent.num_envs ({num_envs}), got {workers!r}")
    init_from = cfg.get("init_from")
    if init_from is not None and (not isinstance(init_from, str) or not init_from):
        raise ConfigError(f"init_from must be null or a run directory, got {init_from!r}")
    resolve_device(cfg.device)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (must be available) or ``auto`` (cuda when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or (isinstance(device, str) and device.startswith("cuda")):
        if device != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"device={device} was asked for but CUDA is not available; use device=cpu or device=auto")
        return torch.device(device)
    raise ConfigError(f"device must be one of cpu, cuda, auto, got {device!r}")


def load_run_config(run_dir: str | Path) -> DictConfig:
    """A run dir's ``config.yaml``, with the settings of its time filled in where a default changed since.

    Runs saved before ``memory.conv_path`` existed had the short convolution on q, k, v, and ham runs saved before
    ``memory.score`` existed scored by cosine; without the keys they would be rebuilt with today's defaults and no
    longer fit their checkpoint (or route by another score than they were trained with).
    """
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    mem = cfg.get("memory")
    # the memories that take conv_path are the ones whose saved configs from before it ran the convolution on q, k, v
    if isinstance(mem, DictConfig) and mem.get("name") in MEMORIES and "conv_path" in memory_options(mem.name):
        if "conv_path" not in mem and mem.get("conv_size", 4):
            mem.conv_path = "qkv"
        if mem.get("name") == "ham" and "score" not in mem:
            mem.score = "cosine"
    return cfg


def memory_kwargs(memory_cfg: DictConfig) -> tuple[str, int, dict]:
    """Split the memory group into ``(name, hidden_size, options for make_memory)``; a null option is passed as None
    (``memory.target_fraction=null`` turns ham's feedback rule off rather than falling back to its default)."""
    mem = OmegaConf.to_container(memory_cfg, resolve=True)
    name, hidden = mem.pop("name", None), mem.pop("hidden_size", None)
    if not isinstance(name, str):
        raise ConfigError(f"memory.name must be a string, got {name!r}")
    if not _is_int(hidden) or hidden < 1:
        raise ConfigError(f"memory.hidden_size must be an int >= 1, got {hidden!r}")
    if isinstance(mem.get("threshold"), list):
        raise ConfigError("memory.threshold is a list; a threshold sweep is for ham_rl.evaluate, training takes one value")
    return name, hidden, mem


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(saved: DictConfig | dict, given: DictConfig | dict, ignore: frozenset[str] = RESUME_MAY_CHANGE) -> list[str]:
    """``key: saved -> given`` for every leaf that differs (keys in ``ignore`` and their children skipped)."""
    a = _flatten(OmegaConf.to_container(saved, resolve=True) if isinstance(saved, DictConfig) else saved)
    b = _flatten(OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else given)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or key.split(".")[0] in ignore:
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            out.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return out
