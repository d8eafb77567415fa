"""Environment names: project aliases (``popgym-repeat``), any registered gymnasium id (``popgym-RepeatFirstMedium-v0``),
and gymnasium's ``module:EnvId`` form for an env that a user's module registers when imported
(``my_pkg.tasks:MyEnv-v0``)."""

from __future__ import annotations

import difflib
import importlib

import gymnasium as gym

from ham_rl.envs.minigrid_memory import MINIGRID_MEMORY_TASKS, nav_id  # registers ham_rl/MiniGrid-Memory*
from ham_rl.envs.recall_tasks import PRESETS as RECALL_PRESETS  # importing it registers the ham_rl/* ids
from ham_rl.envs.tmaze import PRESETS as TMAZE_PRESETS

__all__ = ["ENV_ALIASES", "make_env", "resolve_env_id", "valid_env_names"]


def _minigrid_alias(task: str) -> str:
    """``MiniGrid-MemoryS13Random-v0`` -> ``minigrid-memory-s13-random``."""
    size = task.removeprefix("MiniGrid-Memory").removesuffix("-v0")
    return "minigrid-memory-" + size.lower().replace("random", "-random")


#: Short names used by ``configs/env/*.yaml`` and accepted anywhere a gymnasium id is.
ENV_ALIASES: dict[str, str] = {
    "popgym-repeat": "popgym-RepeatPreviousEasy-v0",
    "popgym-repeat-first": "popgym-RepeatFirstEasy-v0",
    "popgym-count-recall": "popgym-CountRecallEasy-v0",
    "popgym-autoencode": "popgym-AutoencodeEasy-v0",
    "popgym-higher-lower": "popgym-HigherLowerEasy-v0",
    "popgym-bandit": "popgym-MultiarmedBanditEasy-v0",
    "popgym-cartpole": "popgym-PositionOnlyCartPoleEasy-v0",
    "popgym-battleship": "popgym-BattleshipEasy-v0",
    "popgym-minesweeper": "popgym-MineSweeperEasy-v0",
    "popgym-concentration": "popgym-ConcentrationEasy-v0",
    "popgym-pendulum": "popgym-PositionOnlyPendulumEasy-v0",
    # the memory tasks at Medium and Hard (popgym-repeat-medium is RepeatPrevious Medium)
    "popgym-repeat-medium": "popgym-RepeatPreviousMedium-v0",
    "popgym-repeat-hard": "popgym-RepeatPreviousHard-v0",
    "popgym-repeat-first-medium": "popgym-RepeatFirstMedium-v0",
    "popgym-repeat-first-hard": "popgym-RepeatFirstHard-v0",
    "popgym-count-recall-medium": "popgym-CountRecallMedium-v0",
    "popgym-count-recall-hard": "popgym-CountRecallHard-v0",
    # the project's recall tasks (envs/recall_tasks.py): cue-recall, cue-random-d50, ar-4, ...
    **{alias: env_id for alias, (env_id, _, _) in RECALL_PRESETS.items()},
    # passive T-Maze (envs/tmaze.py): tmaze-l50 ... tmaze-l1000
    **{alias: env_id for alias, (env_id, _) in TMAZE_PRESETS.items()},
    # MiniGrid's memory tasks with a one-hot view (envs/minigrid_memory.py): minigrid-memory-s7, -s13-random, ...
    **{_minigrid_alias(task): f"ham_rl/{task}" for task in MINIGRID_MEMORY_TASKS},
    # ... and with only the three actions that move the agent: minigrid-memory-s13-random-nav, ...
    **{_minigrid_alias(task) + "-nav": f"ham_rl/{nav_id(task)}" for task in MINIGRID_MEMORY_TASKS},
}


def _register_popgym() -> None:
    try:
        import popgym  # noqa: F401  (registers the popgym-*-v0 ids)
    except ImportError:  # pragma: no cover - popgym is a declared dependency
        pass


def valid_env_names() -> list[str]:
    """Aliases plus every registered popgym id (any other registered gymnasium id is accepted too)."""
    _register_popgym()
    return sorted(ENV_ALIASES) + sorted(i for i in gym.registry if i.startswith("popgym-"))


def resolve_env_id(name: str) -> str:
    """Map an alias or a gymnasium id to a registered gymnasium id.

    :raises ValueError: for a name that is neither an alias nor a registered id; the message lists the valid names.
    """
    _register_popgym()
    if not isinstance(name, str) or not name:
        raise ValueError(f"env id must be a non-empty string, got {name!r}")
    if ":" in name:
        return _resolve_module_env(name)
    env_id = ENV_ALIASES.get(name, name)
    if env_id in gym.registry:
        return env_id
    close = difflib.get_close_matches(name, valid_env_names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown env {name!r}{hint}; valid names: {', '.join(valid_env_names())}")


def _resolve_module_env(name: str) -> str:
    """``module:EnvId``: import the module (which registers its envs), check the id; the name itself is returned, so
    that ``gym.make`` imports the module again wherever the env is built (worker processes, evaluation)."""
    module, _, env_id = name.partition(":")
    if not module or not env_id:
        raise ValueError(f"env id {name!r} must be `<module>:<EnvId>` with both parts non-empty, e.g. my_pkg.tasks:MyEnv-v0")
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"env id {name!r}: cannot import module {module!r} ({e}); is it on PYTHONPATH?") from e
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"env id {name!r}: importing {module!r} registered no gymnasium env {env_id!r}{hint}")
    return name


def make_env(name: str, **kwargs) -> gym.Env:
    """One gymnasium env (no env checker, no vector wrapper)."""
    return gym.make(resolve_env_id(name), disable_env_checker=True, **kwargs)
