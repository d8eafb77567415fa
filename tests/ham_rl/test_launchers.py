"""Sweeps through Hydra's launcher plugins: the same run dirs as a sequential multirun, failed jobs lose no others.

The plugins come with the ``dev`` extra (and ``ham_rl[joblib]``, ``[ray]``, ``[slurm]`` for users); a test of one that
is not installed is skipped with the reason.
"""

from __future__ import annotations

import ast
import csv
import fnmatch
import importlib.util
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from train_helpers import REPO, TINY, cli

from ham_rl.config import CONFIG_DIR
from ham_rl.report import find_runs

JOBS = ["memory=gru,mlp", "seed=0", "total_timesteps=256", *TINY]  # 64 steps per env: episodes end


def _needs(module: str, extra: str):
    found = importlib.util.find_spec(module) is not None
    return pytest.mark.skipif(not found, reason=f"{module} is not installed (pip install 'ham_rl[{extra}]')")


def _sweep(tmp_path: Path, name: str, *args: str):
    """A --multirun of ``args`` into ``tmp_path/name``; returns the process and the sweep dir."""
    out = tmp_path / name
    p = cli("-m", "ham_rl.train", "--multirun", *args, f"hydra.sweep.dir={out}", cwd=tmp_path, timeout=300)
    return p, out


def _runs(sweep: Path) -> dict[str, tuple[dict, list]]:
    """Per job dir: its config without run_dir, and its metrics rows without the timings."""
    runs = {}
    for d in sorted(p for p in sweep.iterdir() if p.is_dir()):
        cfg = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))
        assert cfg.pop("run_dir") == str(d)
        rows = [(r["global_step"], r["ep_rew_mean"], r["kv_fraction"]) for r in csv.DictReader(open(d / "metrics.csv"))]
        runs[d.name] = (cfg, rows)
    return runs


def test_launcher_configs_ship_in_the_wheel():
    line = re.search(r'^"ham_rl.configs" = (\[.*\])$', (REPO / "pyproject.toml").read_text(), re.M)  # package-data
    patterns = ast.literal_eval(line.group(1))
    shipped = [p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")]
    assert {"hydra/launcher/ray_local.yaml", "hydra/launcher/slurm.yaml"} <= set(shipped)
    assert [n for n in shipped if not any(fnmatch.fnmatch(n, pat) for pat in patterns)] == []


@_needs("hydra_plugins.hydra_joblib_launcher", "joblib")
def test_joblib_sweep_writes_the_run_dirs_of_a_sequential_sweep(tmp_path):
    p, seq = _sweep(tmp_path, "sequential", *JOBS)
    assert p.returncode == 0, p.stderr
    p, par = _sweep(tmp_path, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *JOBS)
    assert p.returncode == 0, p.stderr
    a, b = _runs(seq), _runs(par)
    assert list(a) == ["0_gru_s0", "1_mlp_s0"] and list(b) == list(a)
    assert a == b  # same configs and, the seeds being the same, the same learning curves
    assert sorted(r.path.name for r in find_runs([par])) == sorted(r.path.name for r in find_runs([seq])) == list(a)


@_needs("hydra_plugins.hydra_joblib_launcher", "joblib")
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failed_job_loses_none_of_the_others(tmp_path, launcher):
    jobs = ["agent.learning_rate=-1,0.00025", "memory=gru", *JOBS[1:]]
    p, out = _sweep(tmp_path, launcher, f"hydra/launcher={launcher}", *jobs)
    assert p.returncode == 1
    assert "error: agent.learning_rate must be a finite float > 0, got -1" in p.stderr
    assert not (out / "0_gru_s0" / "config.yaml").exists()
    assert (out / "1_gru_s0" / "summary.json").is_file()  # the job after the failed one ran to its end


@pytest.mark.slow
@_needs("hydra_plugins.hydra_ray_launcher", "ray")
def test_ray_sweep_on_a_local_instance_bound_to_localhost(tmp_path):
    p, out = _sweep(tmp_path, "ray", "hydra/launcher=ray_local", "hydra.launcher.ray.init.num_cpus=2", *JOBS)
    assert p.returncode == 0, p.stderr
    p, seq = _sweep(tmp_path, "sequential", *JOBS)
    assert p.returncode == 0, p.stderr
    assert _runs(out) == _runs(seq)
    assert sorted(r.path.name for r in find_runs([out])) == ["0_gru_s0", "1_mlp_s0"]


@_needs("hydra_plugins.hydra_submitit_launcher", "slurm")
def test_slurm_choice_composes_to_submitit():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.cpus_per_task, launcher.timeout_min) == ("gpu", 1, 1440)
