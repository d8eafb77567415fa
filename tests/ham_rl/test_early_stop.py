"""ham_rl.early_stop and the trainer's ``early_stop``: a run ends a set number of steps after it reached a return."""

import json

from train_helpers import cfg_of

from ham_rl.early_stop import EarlyStop
from ham_rl.runlog import MetricsCSV
from ham_rl.train import train


def test_it_stops_after_steps_past_the_first_step_at_the_return():
    stop = EarlyStop(0.9, after_steps=200)
    seen = [stop.observe(step, ret) for step, ret in [(100, None), (200, 0.95), (300, 0.5), (400, 0.2), (500, 0.1)]]
    # reached at 200 (a later fall does not reset it), so the first step >= 400 ends the run
    assert seen == [False, False, False, True, True] and stop.reached_at == 200
    assert stop.summary() == {"at_return": 0.9, "after_steps": 200, "reached_at": 200}


def test_off_never_stops_and_nan_is_not_a_return():
    off = EarlyStop(None, after_steps=0)
    assert not any(off.observe(s, 1e9) for s in range(5)) and off.summary() is None
    nan = EarlyStop(-1.0, after_steps=0)
    assert not nan.observe(1, float("nan")) and nan.reached_at is None
    assert nan.observe(2, -1.0)  # at the level counts; after_steps=0 ends at that update


def test_a_resumed_run_counts_the_level_reached_before_the_resume():
    rows = [{"global_step": 64, "ep_rew_mean": 0.1}, {"global_step": 128, "ep_rew_mean": 0.92}]
    stop = EarlyStop(0.9, after_steps=100, rows=rows)
    assert stop.reached_at == 128 and not stop.observe(192, 0.5) and stop.observe(256, 0.5)


def _first_return_step(run) -> int:
    return next(int(r["global_step"]) for r in MetricsCSV.read(run / "metrics.csv") if r["ep_rew_mean"] is not None)


def test_train_ends_the_run_with_a_summary_once_the_return_was_reached_and_held(tmp_path):
    run = tmp_path / "run"
    common = ["memory=gru", "total_timesteps=1280", "early_stop.after_steps=128"]
    # any return reaches -1e9: the run ends two updates (128 steps) after the first update whose episodes ended
    summary = train(cfg_of(f"run_dir={run}", *common, "early_stop.at_return=-1e9"))
    reached = _first_return_step(run)
    assert reached < 1280 - 128
    assert summary["global_step"] == reached + 128 and summary["total_timesteps"] == 1280
    assert summary["early_stop"] == {"at_return": -1e9, "after_steps": 128, "reached_at": reached}
    assert json.loads((run / "summary.json").read_text()) == summary
    assert len(MetricsCSV.read(run / "metrics.csv")) == (reached + 128) // 64
    # a level never reached leaves the budget whole
    full = train(cfg_of(f"run_dir={tmp_path / 'full'}", *common, "early_stop.at_return=1e9"))
    assert full["global_step"] == 1280 and full["early_stop"]["reached_at"] is None


def test_a_resume_stops_where_the_straight_run_did(tmp_path):
    common = ["memory=gru", "total_timesteps=1280", "checkpoint_every=1", "early_stop.at_return=-1e9"]
    common += ["early_stop.after_steps=256"]
    straight = train(cfg_of(f"run_dir={tmp_path / 'straight'}", *common))
    reached = straight["early_stop"]["reached_at"]
    cut_at = reached // 64 + 1  # an update after the level was reached, before the run ends
    train(cfg_of(f"run_dir={tmp_path / 'cut'}", *common, f"stop_after_updates={cut_at}"))
    resumed = train(cfg_of(f"resume={tmp_path / 'cut'}", *common))
    assert resumed["global_step"] == straight["global_step"] == reached + 256
    assert resumed["early_stop"] == straight["early_stop"]
