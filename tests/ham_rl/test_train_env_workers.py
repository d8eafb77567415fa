"""``env.workers=N``: the trainer learns the same parameters as with in-process envs, and a resume may change N."""

import json

import pytest
import torch
from train_helpers import cfg_of, params

from ham_rl.config import ConfigError
from ham_rl.train import train

COMMON = ["memory=gru", "env=cue-random-d50", "total_timesteps=320", "checkpoint_every=1"]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_worker_envs_train_the_in_process_parameters_and_resume_with_another_count(tmp_path):
    train(cfg_of(f"run_dir={tmp_path / 'inproc'}", *COMMON))
    train(cfg_of(f"run_dir={tmp_path / 'workers'}", "env.workers=2", *COMMON))
    _same(params(tmp_path / "inproc"), params(tmp_path / "workers"))
    train(cfg_of(f"run_dir={tmp_path / 'cut'}", "stop_after_updates=2", *COMMON))
    train(cfg_of(f"resume={tmp_path / 'cut'}", "env.workers=3", *COMMON))
    _same(params(tmp_path / "inproc"), params(tmp_path / "cut"))
    (line,) = (tmp_path / "cut" / "resumes.jsonl").read_text().splitlines()
    assert json.loads(line)["changed"]["env.workers"] == [0, 3]


@pytest.mark.parametrize("bad", ["-1", "5", "1.5"])
def test_bad_worker_count_is_one_line(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"env.workers must be an int from 0 \(in-process\) to agent.num_envs \(4\), got"):
        train(cfg_of(f"run_dir={tmp_path / 'run'}", f"env.workers={bad}", *COMMON))
    assert not (tmp_path / "run").exists()
