"""Helpers for the trainer tests: a tiny config, the final parameters of a run, the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from ham_rl.checkpoint import load_checkpoint
from ham_rl.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "agent.num_envs=4",
    "agent.num_steps=16",
    "agent.num_minibatches=2",
    "agent.update_epochs=2",
    "agent.embed_size=16",
    "agent.head_size=16",
    "memory.hidden_size=16",
    "progress=false",
    "tensorboard=false",
]


def cfg_of(*overrides: str):
    """The train config with TINY and one torch thread, plus ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, "torch_threads=1", *overrides])


def params(run_dir) -> dict:
    """The agent's parameters in the run's last checkpoint."""
    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["ppo"]["agent"]


def cli(*args: str, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python *args`` with the checkout on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
