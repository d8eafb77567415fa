"""ham_rl.train / ham_rl.evaluate: run dir format, exact resume, bad input, NaN stop, CLI smoke runs."""

import csv
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from train_helpers import TINY, cfg_of, cli, params

from ham_rl.agents import RecurrentActorCritic
from ham_rl.checkpoint import CheckpointError, load_checkpoint
from ham_rl.config import ConfigError
from ham_rl.envs import VecEnv
from ham_rl.evaluate import Episodes, evaluate_policy, evaluate_run
from ham_rl.runlog import METRICS_HEADER
from ham_rl.train import TrainingStopped, train


def test_run_dir_format(tmp_path):
    run = tmp_path / "run"
    summary = train(cfg_of(f"run_dir={run}", "total_timesteps=192", "memory.num_heads=2", "tensorboard=true"))
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.pt", "tb"):
        assert (run / name).exists(), name
    rows = list(csv.reader(open(run / "metrics.csv")))
    assert rows[0] == METRICS_HEADER and len(rows) == 1 + 3
    # ham's threshold after the first update's feedback step: tau <- 0.15 + 0.1 * (kv_fraction - 0.05)
    assert float(rows[1][7]) == pytest.approx(0.15 + 0.1 * (float(rows[1][5]) - 0.05), abs=1e-6)
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert set(saved) == {
        "env",
        "memory",
        "seed",
        "total_timesteps",
        "global_step",
        "num_params",
        "final_return",
        "mmer",
        "kv_fraction",
        "steps_per_s",
        "wall_time_s",
        "threshold",
        "world_size",
        "cost",
        "early_stop",
    }
    cost = saved["cost"]
    assert set(cost) == {"rollout_s_mean", "update_s_mean", "kv_len_max", "peak_rss_mb"}
    assert cost["rollout_s_mean"] > 0 and cost["update_s_mean"] > 0 and cost["peak_rss_mb"] > 50
    assert cost["kv_len_max"] is None  # no episode ended in these 192 steps (tests/agents/test_ppo.py has one that does)
    assert saved["env"] == "popgym-RepeatPreviousEasy-v0" and saved["memory"] == "ham" and saved["global_step"] == 192
    assert "id: popgym-RepeatPreviousEasy-v0" in (run / "config.yaml").read_text()
    # evaluate: one threshold, then a sweep writing sweep.csv / sweep.png
    res = evaluate_run(run, {"episodes": 4, "memory.threshold": 0.2}, quiet=True)
    assert res[0]["episodes"] == 4 and res[0]["threshold"] == 0.2 and res[0]["kv_fraction"] is not None
    assert res[0]["cache_recall"] is None and res[0]["step0_cached"] is not None  # POPGym marks no informative steps
    assert (run / "cache.png").stat().st_size > 0
    # "inf" as the CLI's list grammar leaves it: a string
    evaluate_run(run, {"episodes": 2, "memory.threshold": [0.0, 0.5, "inf"]}, quiet=True)
    rows = list(csv.reader(open(run / "sweep.csv")))
    assert rows[0][:5] == ["threshold", "mean_return", "std_return", "kv_fraction", "episodes"] and len(rows) == 4
    assert rows[0][5:] == ["cache_recall", "cache_precision", "step0_cached", "cached_per_episode", "success_rate",
                           "cache_episode_recall", "informed_rate", "success_informed", "success_uninformed"]  # fmt: skip
    assert rows[1][5] == "" and rows[1][7] != ""  # POPGym marks no informative steps: no recall; step 0 is known
    assert rows[1][9] == "" and res[0]["success_rate"] is None  # nor says what a success is
    assert float(rows[1][3]) >= float(rows[2][3]) >= float(rows[3][3]) == 0.0  # a higher threshold stores fewer tokens
    assert (run / "sweep.png").stat().st_size > 0
    assert float(params(run)["memory.tau"]) == pytest.approx(saved["threshold"])  # evaluate never writes the checkpoint
    both = evaluate_run(run, {"episodes": 2, "memory.threshold": [None, "inf"]}, quiet=True)  # null: the trained tau
    assert both[0]["threshold"] == pytest.approx(saved["threshold"]) and both[1]["kv_fraction"] == 0.0


def test_evaluate_counts_the_successes_the_env_reports(tmp_path):
    # a one-cell T-Maze, so that an untrained, sampling agent reaches the junction and picks the goal arm now and then
    if "ham_rl_test/TMaze1-v0" not in gym.registry:
        gym.register("ham_rl_test/TMaze1-v0", entry_point="ham_rl.envs.tmaze:TMazeEnv", kwargs=dict(corridor_length=1))
    venv = VecEnv("ham_rl_test/TMaze1-v0", 8, seed=0)
    torch.manual_seed(0)
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, "ham", 16, {"num_heads": 2})
    seen = evaluate_policy(agent, venv, 200, deterministic=False)
    # the T-Maze ends each episode with is_success: the goal arm, and only it, gives a positive return
    assert seen.successes == [r > 0 for r in seen.returns] and 0 < sum(seen.successes) < 200
    assert seen.success_rate() == pytest.approx(sum(seen.successes) / 200)
    assert Episodes([1.0], [None]).success_rate() is None  # an env that does not say
    assert seen.informed_rate() == 1.0 and seen.success_rate_where(False) is None  # the cue is every episode's step 0
    assert seen.success_rate_where(True) == seen.success_rate()

    run = tmp_path / "run"
    train(cfg_of(f"run_dir={run}", "env=tmaze-l50", "total_timesteps=64", "memory.num_heads=2"))
    res = evaluate_run(run, {"episodes": 8}, quiet=True, pictures=False)[0]
    assert not (run / "cache.png").exists()  # a caller that only wants the numbers leaves the run dir as it was
    assert res["episodes"] == 8 and res["success_rate"] is not None
    assert res["success_rate"] >= (res["mean_return"] + 1) / 2 - 1e-9  # a return is <= 1 at a success, <= -1 else


class _PeekEnv(gym.Env):
    """One step; the cue is shown (``informative``) in the episodes that succeed, whatever the agent does."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.shown = bool(self.np_random.integers(2))
        return np.array([float(self.shown)], np.float32), {"informative": self.shown}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, True, False, {"informative": False, "is_success": self.shown}


def test_evaluate_splits_the_successes_by_whether_the_cue_was_shown(tmp_path):
    if "ham_rl_test/Peek-v0" not in gym.registry:
        gym.register("ham_rl_test/Peek-v0", entry_point=_PeekEnv)
    venv = VecEnv("ham_rl_test/Peek-v0", 4, seed=0)
    torch.manual_seed(0)
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, "gru", 8, {})
    seen = evaluate_policy(agent, venv, 64)  # a memory without a cache router: no trace, and still the split
    assert seen.informed == seen.successes and 0.2 < seen.informed_rate() < 0.8
    assert seen.success_rate_where(True) == 1.0 and seen.success_rate_where(False) == 0.0


@pytest.mark.parametrize("memory", ["gru", "ham"])
def test_resume_continues_exactly(tmp_path, memory):
    common = [f"memory={memory}", "total_timesteps=320", "checkpoint_every=1"]
    if memory == "ham":
        common += ["memory.num_heads=2", "memory.target_fraction=0.3"]  # tau moves: it must be restored too
    train(cfg_of(f"run_dir={tmp_path / 'straight'}", *common))
    out = train(cfg_of(f"run_dir={tmp_path / 'cut'}", "stop_after_updates=2", *common))
    assert out["stopped"] and out["global_step"] == 128
    train(cfg_of(f"resume={tmp_path / 'cut'}", *common))
    a, b = params(tmp_path / "straight"), params(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    rb = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [(r["global_step"], r["ep_rew_mean"], r["threshold"]) for r in ra] == [
        (r["global_step"], r["ep_rew_mean"], r["threshold"]) for r in rb
    ]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["env.id=popgym-Nope-v0"], "unknown env 'popgym-Nope-v0'.*popgym-repeat"),
        (["memory.name=nope"], "unknown memory 'nope'; allowed: ham"),
        (["+memory.bogus_option=1"], "unknown option"),
        (["agent.learning_rate=-1"], "learning_rate"),
        (["agent.num_minibatches=3"], "divisible"),
        (["total_timesteps=10"], "total_timesteps"),
        (["device=tpu"], "device"),
        (["memory.threshold=[0.1,0.2]"], "sweep is for ham_rl.evaluate"),
        (["cache_figure_every=-1"], r"cache_figure_every must be an int >= 0 \(0 = no cache pictures\), got -1"),
        (["early_stop.at_return=high"], r"early_stop.at_return must be null or a number \(a training return\), got 'high'"),
        (["early_stop.after_steps=-5"], r"early_stop.after_steps must be an int >= 0 \(env steps\), got -5"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, overrides, match):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=match) as e:
        train(cfg_of(f"run_dir={run}", "total_timesteps=64", *overrides))
    assert "\n" not in str(e.value)
    assert not run.exists()


def test_resume_errors_overwrite_nothing(tmp_path):
    run = tmp_path / "run"
    train(cfg_of(f"run_dir={run}", "memory=gru", "total_timesteps=128"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="another config: agent.learning_rate"):
        train(cfg_of(f"resume={run}", "memory=gru", "total_timesteps=128", "agent.learning_rate=0.1"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg_of(f"run_dir={run}", "memory=gru", "total_timesteps=128"))
    with pytest.raises(ConfigError, match="no config.yaml"):
        train(cfg_of(f"resume={tmp_path / 'missing'}", "memory=gru", "total_timesteps=128"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    (run / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        train(cfg_of(f"resume={run}", "memory=gru", "total_timesteps=128"))
    (run / "checkpoints" / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(cfg_of(f"resume={run}", "memory=gru", "total_timesteps=128"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from ham_rl.agents.policy import RecurrentActorCritic

    run = tmp_path / "run"
    real = RecurrentActorCritic.evaluate_actions
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        logp, ent, v = real(self, *a, **k)
        return (logp, ent, v * float("nan")) if calls["n"] > 8 else (logp, ent, v)  # update 3 (4 minibatches each)

    monkeypatch.setattr(RecurrentActorCritic, "evaluate_actions", poisoned)
    with pytest.raises(TrainingStopped, match="non-finite PPO loss at update 3.*last good checkpoint"):
        train(cfg_of(f"run_dir={run}", "memory=gru", "total_timesteps=640", "checkpoint_every=1"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["ppo"]["update"] == 2
    assert not (run / "summary.json").exists()


def test_cli_smoke_train_evaluate_and_errors(tmp_path):
    run = tmp_path / "cli_run"
    p = cli("-m", "ham_rl.train", "memory=gru", "total_timesteps=128", *TINY, f"run_dir={run}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "summary.json").read_text())["global_step"] == 128
    p = cli("-m", "ham_rl.evaluate", str(run), "episodes=2", cwd=tmp_path)
    assert p.returncode == 0 and "mean return" in p.stdout, p.stderr
    p = cli("-m", "ham_rl.train", "env.id=popgym-Nope-v0", f"run_dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "valid names" in p.stderr
    assert not (tmp_path / "bad" / "config.yaml").exists()
    p = cli("-m", "ham_rl.evaluate", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert p.returncode == 2 and "not a ham_rl run directory" in p.stderr


def test_cli_multirun_one_dir_per_job(tmp_path):
    p = cli(
        "-m",
        "ham_rl.train",
        "--multirun",
        "memory=gru,mlp",
        "seed=0,1",
        "total_timesteps=64",
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    dirs = sorted(d.name for d in (tmp_path / "sweep").iterdir() if d.is_dir())
    assert dirs == ["0_gru_s0", "1_gru_s1", "2_mlp_s0", "3_mlp_s1"]
    assert all((tmp_path / "sweep" / d / "summary.json").exists() for d in dirs)


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch):
    from ham_rl.agents.ppo import PPO

    run = tmp_path / "run"
    real = PPO.iterate
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 3:
            self.collect_rollout()  # part of an update has run when the user presses Ctrl-C
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(PPO, "iterate", interrupted)
    args = (f"run_dir={run}", "memory=gru", "total_timesteps=320", "checkpoint_every=1")
    with pytest.raises(TrainingStopped, match=r"interrupted during update 3; the checkpoint of update 2 \(step 128\)") as e:
        train(cfg_of(*args))
    assert e.value.exit_code == 130 and f"resume={run}" in str(e.value)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["ppo"]["update"] == 2
    monkeypatch.setattr(PPO, "iterate", real)
    summary = train(cfg_of(*args[1:], f"resume={run}"))
    assert summary["global_step"] == 320


def test_init_from_starts_from_another_runs_weights_and_checks_they_fit(tmp_path):
    first = tmp_path / "first"
    train(cfg_of(f"run_dir={first}", "env=cue-random-d50", "memory=ham", "total_timesteps=64"))
    # a second stage on another task with the same spaces; at a learning rate of 1e-12 its update moves nothing
    second, fresh = tmp_path / "second", tmp_path / "fresh"
    stage = ["env=cue-random-d50", "memory=ham", "total_timesteps=64", "agent.learning_rate=1e-12", "seed=3"]
    train(cfg_of(f"run_dir={second}", f"init_from={first}", *stage))
    train(cfg_of(f"run_dir={fresh}", *stage))
    a, b, c = params(first), params(second), params(fresh)
    weights = [k for k in a if k != "memory.tau"]  # tau moves by the feedback rule whatever the learning rate
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-8) for k in weights)
    kv = float(list(csv.DictReader(open(second / "metrics.csv")))[0]["kv_fraction"])  # the one feedback step from a's
    assert float(b["memory.tau"]) == pytest.approx(float(a["memory.tau"]) + 0.1 * (kv - 0.05), abs=1e-6)
    assert not all(torch.allclose(a[k].float(), c[k].float(), atol=1e-3) for k in weights)
    with pytest.raises(ConfigError, match=r"^init_from=.*nowhere: no config.yaml there, not a ham_rl run directory$"):
        train(cfg_of(f"run_dir={tmp_path / 'x'}", f"init_from={tmp_path / 'nowhere'}", *stage))
    with pytest.raises(ConfigError, match=r"^init_from=.*first trained memory=ham, not memory=gru$"):
        train(cfg_of(f"run_dir={tmp_path / 'y'}", f"init_from={first}", "memory=gru", "total_timesteps=64"))
    with pytest.raises(ConfigError, match=r"^init_from=.*first does not fit this run's agent: .*size mismatch"):
        other_task = ["env=popgym-repeat", "memory=ham", "total_timesteps=64"]  # another observation size
        train(cfg_of(f"run_dir={tmp_path / 'z'}", f"init_from={first}", *other_task))
    assert not (tmp_path / "z").exists() and not (tmp_path / "y").exists()  # nothing written


def test_init_from_takes_this_stages_threshold_when_one_is_given(tmp_path):
    first = tmp_path / "first"
    train(cfg_of(f"run_dir={first}", "env=cue-random-d50", "memory=ham", "memory.threshold=-1", "total_timesteps=64"))
    assert float(params(first)["memory.tau"]) < 0  # the first stage cached every step and kept a low tau
    off = tmp_path / "off"
    stage = ["env=cue-random-d50", "memory=ham", "total_timesteps=128", "memory.target_fraction=null"]
    train(cfg_of(f"run_dir={off}", f"init_from={first}", "memory.threshold=inf", *stage))
    rows = list(csv.DictReader(open(off / "metrics.csv")))
    assert [float(r["kv_fraction"]) for r in rows] == [0.0, 0.0]  # the cache off, as asked, not the first stage's tau
    assert float(params(off)["memory.tau"]) == float("inf")
