"""``torchrun --nproc_per_node=2 -m ham_rl.train``: 2 ranks (gloo) keep identical parameters and learn the tiny task,
and a 2-rank run resumes exactly; rank 0 alone writes the run dir, summary.json records world_size."""

import csv
import json
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, cli

from ham_rl.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
COMMON = ["memory=gru", "env=cue-random-d50", "total_timesteps=320", "checkpoint_every=1", *TINY]


def _torchrun(tmp_path, *args: str):
    p = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ham_rl.train", *args, cwd=tmp_path,
            timeout=300)  # fmt: skip
    return p


def test_two_ranks_learn_the_tiny_memory_task(tmp_path, monkeypatch):
    here = Path(__file__).parent  # dp_tiny_env registers tests/agents/tiny_env's RecallFirst (random policy: 0.5)
    monkeypatch.setenv("PYTHONPATH", f"{here.parent / 'agents'}:{here}")
    task = ["env.id=dp_tiny_env:ham_rl_test/RecallFirst-v0", "memory=gru", "memory.hidden_size=32", "agent.num_envs=8"]
    task += ["agent.num_steps=32", "agent.num_minibatches=4", "agent.learning_rate=0.003", "total_timesteps=8192", "seed=1"]
    p = _torchrun(tmp_path, *task, "progress=false", "tensorboard=false", f"run_dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert float(rows[0]["ep_rew_mean"]) < 0.7 and summary["final_return"] > 0.85, (rows[0], summary)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_two_ranks_keep_identical_parameters_and_resume_exactly(tmp_path):
    run, cut = tmp_path / "run", tmp_path / "cut"
    p = _torchrun(tmp_path, f"run_dir={run}", *COMMON)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 1 and ckpt["ppo"]["update"] == 5
    _same(ckpt["ppo"]["agent"], ckpt["ranks"][0]["agent"])  # the same parameters after 5 updates of 2 x 4 envs
    assert not torch.equal(ckpt["ppo"]["venv"]["features"], ckpt["ranks"][0]["venv"]["features"])  # envs of their own
    assert ckpt["ranks"][0]["venv"]["seed"] == 8  # rank 1's envs start from seed + 2 * num_envs

    p = _torchrun(tmp_path, f"run_dir={cut}", "stop_after_updates=2", *COMMON)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _torchrun(tmp_path, f"resume={cut}")
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = load_checkpoint(cut / "checkpoints" / "last.pt")
    _same(resumed["ppo"]["agent"], ckpt["ppo"]["agent"])
    _same(resumed["ranks"][0]["agent"], ckpt["ranks"][0]["agent"])

    p = cli("-m", "ham_rl.train", f"resume={cut}", cwd=tmp_path)
    assert p.returncode == 2 and f"resume={cut} ran on 2 ranks; resume it on as many, not 1" in p.stderr
