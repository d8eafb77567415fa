"""ham_rl.evaluate: ``load_run_agent`` rebuilds a run's trained agent; ``drop=`` leaves the cache exactly the entries
it keeps, the memory reads only those; what a user can get wrong is one line."""

import json
import math

import numpy as np
import pytest
import torch
from train_helpers import cfg_of

from ham_rl.checkpoint import CheckpointError, load_checkpoint
from ham_rl.config import ConfigError, load_run_config
from ham_rl.envs import VecEnv
from ham_rl.evaluate import EVALUATIONS, _drop_entries, evaluate_run, load_run_agent
from ham_rl.memory import make_memory
from ham_rl.report.evaluations import EVALUATIONS as REPORT_EVALUATIONS
from ham_rl.train import train

FLAGS = np.array([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]], np.int8)  # [B, T]: informative steps of two envs


def _rollout(drop: str | None, seed: int = 0):
    """Six steps of an every-token-cached ham over fixed inputs: ``(outputs [T, B, D], final state)``."""
    torch.manual_seed(seed)
    mem = make_memory("ham", input_size=8, hidden_size=16, num_heads=2, threshold=-math.inf).eval()
    x = torch.randn(FLAGS.shape[1], FLAGS.shape[0], 8)
    state = mem.initial_state(FLAGS.shape[0])
    start = torch.tensor([True, True])
    ys = []
    with torch.no_grad():
        for t in range(FLAGS.shape[1]):
            y, state = mem.step(x[t], state, start, inplace=True)
            if drop is not None:
                _drop_entries(state, mem.last_routing, FLAGS[:, t], drop)
            ys.append(y)
            start = torch.tensor([False, False])
    return torch.stack(ys), state


@pytest.mark.parametrize("drop, kept", [("informative", FLAGS == 0), ("uninformative", FLAGS == 1)])
def test_drop_leaves_exactly_the_kept_entries_in_the_cache(drop, kept):
    ys_all, full = _rollout(None)
    ys, cut = _rollout(drop)
    assert full.cache.length.tolist() == [6, 6]
    assert cut.cache.length.tolist() == kept.sum(1).tolist()
    for b in range(FLAGS.shape[0]):
        n = int(cut.cache.length[b])
        # the entries left are the kept steps' own, in order: nothing of a dropped step is read again
        torch.testing.assert_close(cut.cache.keys[b, :n], full.cache.keys[b, torch.from_numpy(kept[b]).nonzero()[:, 0]])
        torch.testing.assert_close(cut.cache.values[b, :n], full.cache.values[b, torch.from_numpy(kept[b]).nonzero()[:, 0]])
    torch.testing.assert_close(ys[0], ys_all[0])  # nothing dropped before step 0 is read
    assert not torch.allclose(ys[-1], ys_all[-1])  # the attention read changed


def test_drop_on_a_trained_run_removes_what_it_says(tmp_path):
    run = tmp_path / "run"
    train(cfg_of(f"run_dir={run}", "env=cue-random-d50", "total_timesteps=128", "memory.num_heads=2"))
    every = {"episodes": 4, "memory.threshold": -math.inf}
    both = evaluate_run(run, every, quiet=True, pictures=False)[0]
    no_cue = evaluate_run(run, {**every, "drop": "informative"}, quiet=True, pictures=False)[0]
    cue_only = evaluate_run(run, {**every, "drop": "uninformative"}, quiet=True, pictures=False)[0]
    assert both["cached_per_episode"] == 52.0 and both["cache_recall"] == 1.0  # one cue in 52 steps
    assert no_cue["cached_per_episode"] == 51.0 and no_cue["cache_recall"] == 0.0 and no_cue["cache_precision"] == 0.0
    assert cue_only["cached_per_episode"] == 1.0 and cue_only["cache_recall"] == 1.0 and cue_only["cache_precision"] == 1.0
    assert cue_only["kv_fraction"] == pytest.approx(1 / 52) and cue_only["drop"] == "uninformative"
    evaluate_run(run, {"episodes": 2, "drop": "uninformative"}, quiet=True)
    assert (run / "cache_drop-uninformative.png").stat().st_size > 0 and not (run / "cache.png").exists()
    # every evaluation appended its result, with what the report needs to tell the kinds apart
    records = [json.loads(line) for line in (run / EVALUATIONS).read_text().splitlines()]
    assert [r["drop"] for r in records] == [None, "informative", "uninformative", "uninformative"]
    assert [r["mean_return"] for r in records[:3]] == [both["mean_return"], no_cue["mean_return"], cue_only["mean_return"]]
    assert [r["threshold"] for r in records[:3]] == ["-inf"] * 3 and records[-1]["episodes"] == 2
    assert records[-1]["threshold"] == records[-1]["trained_threshold"]  # no threshold given: the trained one
    summary = json.loads((run / "summary.json").read_text())
    assert all(r["checkpoint_step"] == summary["global_step"] for r in records)
    assert all(r["trained_threshold"] == pytest.approx(summary["threshold"]) for r in records)
    assert REPORT_EVALUATIONS == EVALUATIONS


def test_drop_errors_name_the_bad_value(tmp_path):
    run = tmp_path / "run"
    train(cfg_of(f"run_dir={run}", "env=cue-random-d50", "total_timesteps=128", "memory.num_heads=2"))
    with pytest.raises(ConfigError, match="drop must be one of informative, uninformative, got 'cue'"):
        evaluate_run(run, {"episodes": 2, "drop": "cue"}, quiet=True)
    gru = tmp_path / "gru"
    train(cfg_of(f"run_dir={gru}", "env=cue-random-d50", "memory=gru", "total_timesteps=128"))
    with pytest.raises(ConfigError, match="unbounded KV cache .* not 'gru'"):
        evaluate_run(gru, {"episodes": 2, "drop": "informative"}, quiet=True)
    window = tmp_path / "window"
    train(cfg_of(f"run_dir={window}", "env=cue-random-d50", "memory=window", "total_timesteps=128"))
    with pytest.raises(ConfigError, match="unbounded KV cache .* not 'window'"):  # a full window evicts: no append
        evaluate_run(window, {"episodes": 2, "drop": "informative"}, quiet=True)
    popgym = tmp_path / "popgym"
    train(cfg_of(f"run_dir={popgym}", "env=popgym-repeat", "total_timesteps=128", "memory.num_heads=2"))
    with pytest.raises(ConfigError, match="needs an env that marks informative steps"):
        evaluate_run(popgym, {"episodes": 2, "drop": "informative"}, quiet=True)


def test_load_run_agent_is_the_checkpoints_agent(tmp_path):
    run = tmp_path / "run"
    train(cfg_of(f"run_dir={run}", "env=cue-random-d50", "total_timesteps=128", "memory.num_heads=2"))
    cfg = load_run_config(run)
    venv = VecEnv(cfg.env.id, 2, seed=0, prev_action=cfg.env.prev_action, prev_reward=cfg.env.prev_reward)
    agent = load_run_agent(run, venv)
    assert not agent.training
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["ppo"]["agent"]
    for key, value in agent.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    cfg.memory.hidden_size = 32  # a config that no longer describes the saved weights
    with pytest.raises(CheckpointError, match=f"checkpoint of {run} does not fit its config.yaml"):
        load_run_agent(run, venv, cfg)
    venv.close()
