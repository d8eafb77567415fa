"""Trust and failure: loading a run never runs code from it, every way a run stops can be resumed, bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, cfg_of, cli, params

from ham_rl.agents.ppo import PPO
from ham_rl.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from ham_rl.checkpoint import main as checkpoint_main
from ham_rl.config import ConfigError
from ham_rl.evaluate import evaluate_run
from ham_rl.train import TrainingStopped, resume_config, train

GRU = ("memory=gru", "total_timesteps=320", "checkpoint_every=1")


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the canary of every load below."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _finished_run(tmp_path: Path, name: str = "run", *extra: str) -> Path:
    run = tmp_path / name
    train(cfg_of(f"run_dir={run}", *GRU, *extra))
    return run


def _rewrite_checkpoint(run: Path, change) -> Path:
    """Apply ``change`` to the checkpoint's data and write it back as torch.save would (format tag kept)."""
    path = run / "checkpoints" / "last.pt"
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)
    return path


@pytest.mark.parametrize("where", ["top level", "inside the env state", "as pickled bytes in the env state"])
def test_a_crafted_checkpoint_runs_no_code_in_evaluate_or_resume(tmp_path, where):
    run = _finished_run(tmp_path)
    marker = tmp_path / "pwned"

    def plant(data):
        if where == "top level":
            data["extra"] = Payload(marker)
        elif where == "inside the env state":
            data["ppo"]["venv"]["envs"][0] = Payload(marker)
        else:
            import pickle

            data["ppo"]["venv"]["envs"][0] = pickle.dumps(Payload(marker))

    _rewrite_checkpoint(run, plant)
    with pytest.raises(CheckpointError) as e:
        evaluate_run(run, {"episodes": 2}, quiet=True)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        train(cfg_of(f"resume={run}", *GRU, "total_timesteps=384"))
    p = cli("-m", "ham_rl.evaluate", str(run), "episodes=2", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0
    assert not marker.exists()


def test_env_state_that_names_other_classes_creates_no_object(tmp_path):
    # Plain data that describes an object of some class: restoring only assigns fields of objects the rebuilt env has.
    run = _finished_run(tmp_path)

    def plant(data):
        data["ppo"]["venv"]["envs"][1] = {"kind": "object", "ref": 0, "class": "os.system", "fields": {"x": 1}}
        data["checksum"] = None

    path = _rewrite_checkpoint(run, plant)
    data = torch.load(path, weights_only=True)
    data.pop("checksum")
    data.pop("format")
    save_checkpoint(data, path)  # a valid checksum: the attack is in the content, not a corruption
    with pytest.warns(UserWarning, match=r"env 1 could not be restored .*os\.system.*starts a new episode"):
        summary = train(cfg_of(f"resume={run}", *GRU, "total_timesteps=384"))
    assert summary["global_step"] == 384


def test_a_corrupted_tensor_is_reported(tmp_path):
    run = _finished_run(tmp_path)
    path = run / "checkpoints" / "last.pt"
    with zipfile.ZipFile(path) as z:
        members = {info.filename: z.read(info.filename) for info in z.infolist()}
    name = max((n for n in members if "/data/" in n), key=lambda n: len(members[n]))  # the largest tensor storage
    blob = bytearray(members[name])
    blob[len(blob) // 2] ^= 0xFF
    members[name] = bytes(blob)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        evaluate_run(run, {"episodes": 2}, quiet=True)


def test_old_format_is_refused_and_converts_only_when_trusted(tmp_path):
    run = _finished_run(tmp_path)
    path = run / "checkpoints" / "last.pt"
    data = load_checkpoint(path)
    legacy = _as_legacy(data)
    torch.save(legacy, path)
    with pytest.raises(CheckpointError, match="ham_rl-ppo-v1 checkpoint.*--trust-checkpoint"):
        load_checkpoint(path)
    assert checkpoint_main(["convert", str(path)]) == 2  # without the flag nothing is unpickled
    assert checkpoint_main(["convert", str(path), "--trust-checkpoint"]) == 0
    converted = load_checkpoint(path)
    assert converted["format"] == CHECKPOINT_FORMAT
    for k, v in data["ppo"]["agent"].items():
        torch.testing.assert_close(converted["ppo"]["agent"][k], v, rtol=0, atol=0)
    summary = train(cfg_of(f"resume={run}", *GRU, "total_timesteps=384"))  # and the run goes on from it
    assert summary["global_step"] == 384


def _as_legacy(data: dict) -> dict:
    """What a ham_rl-ppo-v1 checkpoint held: pickled env objects and numpy arrays (rebuilt here from a v2 one)."""
    import pickle

    from ham_rl.envs import VecEnv

    cfg = data["config"]
    venv = VecEnv(cfg["env"]["id"], cfg["agent"]["num_envs"], seed=cfg["seed"])
    venv.reset()
    ppo = dict(data["ppo"])
    v = dict(ppo["venv"])
    v["envs"], v["obs"] = pickle.dumps(venv.envs), pickle.dumps(venv._obs)
    for name in ("features", "starts", "ep_return", "ep_length", "rewards"):
        v[name] = v[name].numpy()
    del v["seed"], v["unsaved_reasons"]
    ppo["venv"] = v
    del ppo["context"]
    ppo["next_obs"], ppo["next_start"] = ppo["next_obs"].numpy(), ppo["next_start"].numpy()
    rng = dict(ppo["rng"])
    n = rng["numpy"]
    rng["numpy"] = (n["name"], n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"])
    rng["python"] = (rng["python"][0], tuple(rng["python"][1]), rng["python"][2])
    ppo["rng"] = rng
    return {**{k: v for k, v in data.items() if k != "ppo"}, "ppo": ppo, "format": "ham_rl-ppo-v1"}


def test_sigterm_mid_run_then_resume_alone_gives_the_uninterrupted_parameters(tmp_path, monkeypatch):
    overrides = ["memory=gru", "total_timesteps=320", "checkpoint_every=1", "agent.learning_rate=0.001"]
    straight = tmp_path / "straight"
    train(cfg_of(f"run_dir={straight}", *overrides))
    real, calls = PPO.iterate, {"n": 0}

    def terminated(self):
        calls["n"] += 1
        if calls["n"] == 3:
            self.collect_rollout()
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM or `timeout` sends, mid-update
            time.sleep(1)
        return real(self)

    monkeypatch.setattr(PPO, "iterate", terminated)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingStopped, match=r"SIGTERM: interrupted during update 3; the checkpoint of update 2") as e:
        train(cfg_of(f"run_dir={cut}", *overrides))
    assert e.value.exit_code == 143 and f"resume={cut}" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again
    monkeypatch.setattr(PPO, "iterate", real)
    train(resume_config(cut, []))  # resume=<dir> alone: the saved config, learning rate included
    a, b = params(straight), params(cut)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_cli_sigterm_exits_143_and_resume_alone_finishes(tmp_path):
    run = tmp_path / "run"
    args = ("-m", "ham_rl.train", "memory=gru", "total_timesteps=12800", "checkpoint_every=1", "agent.learning_rate=0.001")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, *args, *TINY, f"run_dir={run}"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and f"resume={run}" in err and "Traceback" not in err
    p = cli("-m", "ham_rl.train", f"resume={run}", cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 12800
    assert _saved_config(run)["agent"]["learning_rate"] == 0.001


def _saved_config(run: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))


def test_stop_before_the_first_checkpoint_restarts_with_the_same_command(tmp_path, monkeypatch):
    real = PPO.iterate

    def interrupted(self):
        raise KeyboardInterrupt

    args = (f"run_dir={tmp_path / 'run'}", *GRU)
    monkeypatch.setattr(PPO, "iterate", interrupted)
    with pytest.raises(TrainingStopped, match="before the first checkpoint; .*the same command starts the run again"):
        train(cfg_of(*args))
    monkeypatch.setattr(PPO, "iterate", real)
    summary = train(cfg_of(*args))  # the same command
    assert summary["global_step"] == 320
    straight = _finished_run(tmp_path, "straight")
    for k, v in params(straight).items():
        torch.testing.assert_close(params(tmp_path / "run")[k], v, rtol=0, atol=0)


def test_resume_alone_restores_the_saved_config_and_records_what_it_changes(tmp_path):
    run = tmp_path / "run"
    out = train(cfg_of(f"run_dir={run}", *GRU, "agent.learning_rate=0.001", "stop_after_updates=2"))
    assert out["stopped"]
    with pytest.raises(ConfigError, match=r"another config: agent.learning_rate: 0.001 -> 0.1"):
        train(resume_config(run, ["agent.learning_rate=0.1"]))
    with pytest.raises(ConfigError, match="'memory=ham' cannot be applied to a saved run"):
        resume_config(run, ["memory=ham"])
    stale = run / "checkpoints" / "last.pt.abc.tmp"
    stale.write_bytes(b"half")  # a writer killed mid-write
    summary = train(resume_config(run, ["total_timesteps=448", "checkpoint_every=2"]))
    assert summary["global_step"] == 448 and summary["total_timesteps"] == 448
    assert not stale.exists()
    (line,) = (run / "resumes.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["global_step"] == 128
    assert record["changed"] == {"checkpoint_every": [1, 2], "stop_after_updates": [2, None], "total_timesteps": [320, 448]}
    assert _saved_config(run)["total_timesteps"] == 448
    with pytest.raises(ConfigError, match="total_timesteps=256 is below the 448 steps"):
        train(resume_config(run, ["total_timesteps=256"]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["env.prev_action=maybe"], "env.prev_action must be true or false, got 'maybe'"),
        (["progress=1"], "progress must be true or false, got 1"),
        (["memory=ham", "memory.threshold_lr=inf"], "`threshold_lr` must be a finite number > 0, got inf"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        train(cfg_of(f"run_dir={tmp_path / 'run'}", *GRU, *overrides))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_an_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="run_dir=.*a_file/run cannot be written") as e:
        train(cfg_of(f"run_dir={tmp_path / 'a_file' / 'run'}", *GRU))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"deterministic": "maybe"}, "deterministic must be true or false"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"torch_threads": "two"}, "torch_threads must be an int"),
        ({"episodes": 0}, "episodes must be an int >= 1"),
    ],
)
def test_bad_evaluate_options_are_one_line(tmp_path, options, match):
    run = tmp_path / "run"
    if not run.exists():
        train(cfg_of(f"run_dir={run}", "memory=gru", "total_timesteps=64"))
    with pytest.raises(ConfigError, match=match):
        evaluate_run(run, options, quiet=True)


def test_a_nan_observation_stops_training_naming_the_env_and_step(tmp_path, monkeypatch):
    from ham_rl.envs import VecEnv

    real, calls = VecEnv.step, {"n": 0}

    def poisoned(self, actions):
        calls["n"] += 1
        x, r, d, f = real(self, actions)
        if calls["n"] == 20:
            x[2, 0] = float("nan")
        return x, r, d, f

    monkeypatch.setattr(VecEnv, "step", poisoned)
    with pytest.raises(
        TrainingStopped, match=r"non-finite observation features from env 2 .*at env step 80 \(update 2, rollout step 4\)"
    ):
        train(cfg_of(f"run_dir={tmp_path / 'run'}", *GRU))


def test_summary_json_is_strict_json(tmp_path):
    from ham_rl.runlog import write_json_atomic

    write_json_atomic({"threshold": float("nan"), "x": [float("inf"), 1.0]}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "threshold": None,
        "x": [None, 1.0],
    }


def test_save_checkpoint_refuses_what_could_not_be_loaded_safely(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a bytes"):
        save_checkpoint({"x": b"pickle"}, tmp_path / "c.pt")
    with pytest.raises(TypeError, match="is a Payload"):
        save_checkpoint({"x": [Payload(tmp_path / "m")]}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written
