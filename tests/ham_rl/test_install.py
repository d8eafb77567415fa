"""The wheel as a user gets it: one top-level package, configs inside, training from any directory.

Builds the wheel, installs it into a fresh virtual environment (torch==2.13.0 first, as the README says), and runs
short trainings from an empty directory outside the checkout: a POPGym preset, an env defined in a user's module
(``env.id=my_module:MyEnv-v0``) and an env preset from a user's own config folder (``--config-dir``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = ["total_timesteps=1024", "agent.num_envs=4", "agent.num_steps=64", "agent.num_minibatches=2", "progress=false"]
USER_MODULE = '''
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class EchoFirst(gym.Env):
    """A bit shown at step 0, asked for after 4 blank steps."""

    observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.bit = 0, int(self.np_random.integers(2))
        return np.array([self.bit, 1.0], np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t == 5
        return np.zeros(2, np.float32), float(done and action == self.bit), done, False, {}


gym.register("MyEnv-v0", entry_point=EchoFirst)
'''

pytestmark = pytest.mark.slow


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # From a copy of the files git tracks (or would): a build/ folder left in the checkout could add stale modules.
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    listed = _run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", dist], source)
    (path,) = dist.glob("ham_rl-*.whl")
    return path


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", venv], venv)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], venv)
    _run([python, "-m", "pip", "install", "-q", wheel], venv)
    return python


def test_wheel_holds_one_top_level_package_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"ham_rl", wheel.name.split("-py3")[0] + ".dist-info"}
    for needed in ("ham_rl/configs/config.yaml", "ham_rl/configs/memory/ham.yaml", "ham_rl/configs/env/popgym-repeat.yaml",
                   "ham_rl/envs/vector.py", "ham_rl/agents/ppo.py", "ham_rl/kernels/ham_step/reference.py",
                   "ham_rl/configs/hydra/launcher/slurm.yaml", "ham_rl/envs/workers.py",
                   "ham_rl/kernels/gated_delta_rule/cpu_recurrent.cpp", "ham_rl/kernels/ham_step/cpu_step.cpp",
                   "ham_rl/kernels/short_conv/cpu_conv.cpp", "ham_rl/kernels/vec16.h"):  # fmt: skip
        assert needed in names


def test_installed_wheel_trains_from_an_empty_directory(venv_python, tmp_path):
    out = _run([venv_python, "-m", "ham_rl.train", *SHORT, "run_dir=run"], tmp_path)
    assert "could not build" not in out.stderr, out.stderr[-3000:]  # the native CPU kernels build from the wheel
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    out = _run([venv_python, "-m", "ham_rl.evaluate", "run", "episodes=4"], tmp_path)
    assert re.search(r"^ham popgym-RepeatPreviousEasy-v0 threshold=[0-9.]+: mean return", out.stdout), out.stdout
    assert "(std over 4 episodes)" in out.stdout
    code = "import importlib.util as u; print([n for n in ('envs', 'agents', 'kernels', 'configs') if u.find_spec(n)])"
    assert _run([venv_python, "-c", code], tmp_path).stdout.strip() == "[]"


def test_installed_wheel_trains_on_a_user_env_and_a_user_config_folder(venv_python, tmp_path):
    (tmp_path / "my_module.py").write_text(USER_MODULE)
    _run([venv_python, "-m", "ham_rl.train", "env.id=my_module:MyEnv-v0", *SHORT, "run_dir=from_module"], tmp_path)
    assert "my_module:MyEnv-v0" in (tmp_path / "from_module" / "summary.json").read_text()
    (tmp_path / "my_configs" / "env").mkdir(parents=True)
    preset = "id: my_module:MyEnv-v0\nprev_action: true\nprev_reward: false\n"
    (tmp_path / "my_configs" / "env" / "echo.yaml").write_text(preset)
    _run([venv_python, "-m", "ham_rl.train", "--config-dir", "my_configs", "env=echo", *SHORT, "run_dir=from_cfg"], tmp_path)
    assert "prev_reward: false" in (tmp_path / "from_cfg" / "config.yaml").read_text()
