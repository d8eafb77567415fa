"""ham_rl.routing: recall / precision / step-0 / per-episode counts on hand-made traces, episode assembly from
rollout arrays, the raster picture; what ham_rl.evaluate and the trainer's TensorBoard make of it on tiny runs."""

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_helpers import cfg_of, params

from ham_rl.evaluate import evaluate_run
from ham_rl.routing import RoutingTrace, informative_flags
from ham_rl.train import _records_routing, train


def trace_of(*episodes) -> RoutingTrace:
    tr = RoutingTrace()
    for cached, informative in episodes:
        tr.add_episode(np.array(cached, bool), None if informative is None else np.array(informative))
    return tr


def test_recall_and_precision_count_the_right_steps():
    # episode 1: informative at 1 and 3, cached 1 and 2; episode 2: informative at 0, cached 0 and 4
    tr = trace_of(([0, 1, 1, 0, 0], [0, 1, 0, 1, 0]), ([1, 0, 0, 0, 1], [1, 0, 0, 0, 0]))
    assert tr.recall == pytest.approx(2 / 3)  # steps 1 and 0 of 3 informative ones
    assert tr.precision == pytest.approx(2 / 4)  # of 4 cached steps
    assert tr.kv_fraction == pytest.approx(4 / 10)
    assert tr.step0_cached == pytest.approx(1 / 2) and tr.cached_per_episode == pytest.approx(2.0)
    assert tr.episode_recall == 1.0  # each episode kept one of its informative steps
    assert tr.summary() == {
        "cache_recall": tr.recall,
        "cache_episode_recall": 1.0,
        "cache_precision": tr.precision,
        "step0_cached": 0.5,
        "cached_per_episode": 2.0,
    }


def test_no_informative_steps_gives_none_and_unknown_flags_do_not_count():
    popgym = trace_of(([1, 0, 1], None), ([0, 0, 1], None))  # the env reports nothing
    assert popgym.recall is None and popgym.precision is None and popgym.episode_recall is None
    assert popgym.kv_fraction == pytest.approx(3 / 6) and popgym.step0_cached == 0.5
    none_informative = trace_of(([1, 1], [0, 0]))  # reported, but none informative
    assert none_informative.recall is None and none_informative.precision is None
    # an unknown step (-1) is neither a hit nor a false positive
    partly = trace_of(([1, 1, 1], [1, -1, 0]))
    assert partly.recall == 1.0 and partly.precision == pytest.approx(1 / 2)


def test_nothing_cached_and_only_step0_cached():
    nothing = trace_of(([0, 0, 0], [0, 1, 0]), ([0, 0, 0], [1, 0, 0]))
    assert nothing.recall == 0.0 and nothing.precision is None  # nothing cached: precision undefined
    assert nothing.step0_cached == 0.0 and nothing.cached_per_episode == 0.0 and nothing.kv_fraction == 0.0
    # the pathology: only step 0 of each episode cached while the cue is elsewhere
    step0 = trace_of(([1, 0, 0, 0], [0, 0, 1, 0]), ([1, 0, 0, 0], [0, 1, 0, 0]))
    assert step0.step0_cached == 1.0 and step0.recall == 0.0 and step0.precision == 0.0
    assert step0.cached_per_episode == 1.0 and step0.episode_recall == 0.0
    # the same cue in view over several steps: one of them cached is enough for the episode
    seen_twice = trace_of(([0, 1, 0, 0], [0, 1, 1, 0]), ([0, 0, 0, 1], [1, 1, 0, 0]), ([1, 0, 0], [0, 0, 0]))
    assert seen_twice.episode_recall == pytest.approx(1 / 2) and seen_twice.recall == pytest.approx(1 / 4)
    empty = RoutingTrace()
    assert empty.num_episodes == 0 and all(v is None for v in empty.summary().values()) and empty.kv_fraction is None


def test_informative_flags_from_infos():
    flags = informative_flags([{"informative": True}, {"informative": False}, {}, {"step": 3}])
    assert flags.dtype == np.int8 and flags.tolist() == [1, 0, -1, -1]


def test_add_steps_assembles_whole_episodes_across_calls():
    # 2 envs over 2 calls of T=4; env 0: episode [0..2], then [3..6] (over the boundary), then one in progress
    # env 1: in progress at the first step (start unseen, so dropped), its next episode starts at step 2, ends at 5
    cached = np.array([[1, 0], [0, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 0], [1, 1]], bool)
    starts = np.zeros((8, 2), bool)
    dones = np.zeros((8, 2), bool)
    starts[[0, 3, 7], 0] = True
    dones[[2, 6], 0] = True
    starts[[2, 6], 1] = True
    dones[[1, 5], 1] = True
    informative = np.zeros((8, 2), np.int8)
    informative[4, 0] = 1
    tr = RoutingTrace()
    tr.add_steps(cached[:4], starts[:4], dones[:4], informative[:4])
    cached[:4] = False  # the caller reuses its buffers: the trace must have copied the open episodes
    tr.add_steps(cached[4:], starts[4:], dones[4:], informative[4:])
    got = [e.cached.astype(int).tolist() for e in tr.episodes]
    assert got == [[1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]  # env 0's two, then env 1's: per call, env by env
    assert tr.episodes[2].informative.tolist() == [0, 0, 0, 0] and tr.episodes[1].informative.tolist() == [0, 1, 0, 0]
    assert np.isnan(tr.episodes[0].scores).all()  # no scores given
    tr.drop_finished()
    assert tr.num_episodes == 0
    # the episode env 0 started at step 7 goes on; steps of an inactive env are skipped and its episode dropped
    tr.add_steps(np.ones((2, 2), bool), np.zeros((2, 2), bool), np.ones((2, 2), bool), active=np.array([True, False]))
    assert [e.cached.tolist() for e in tr.episodes] == [[True, True], [True]]


def test_add_episode_checks_lengths():
    with pytest.raises(ValueError, match=r"informative \(2\) and scores \(3\) must have one value per step \(3\)"):
        RoutingTrace().add_episode(np.ones(3, bool), np.zeros(2), np.zeros(3))


def test_raster_figure(tmp_path):
    rng = np.random.default_rng(0)
    tr = RoutingTrace()
    for n in rng.integers(5, 40, size=12):
        inf = np.zeros(n, np.int8)
        inf[rng.integers(n)] = 1
        tr.add_episode(rng.random(n) < 0.2, inf, rng.random(n))
    fig = tr.raster_figure(max_episodes=8, max_steps=30, title="ham on cue")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "episode step (first 30)" and ax.get_ylabel() == "episode (first 8 of 12)"
    assert ax.get_title().startswith("ham on cue\ncache recall ") and "12 episodes" in ax.get_title()
    grid = ax.images[0].get_array()
    assert grid.shape == (8, 30)
    first = tr.episodes[0].cached[:30]
    np.testing.assert_array_equal(grid[0, : len(first)], first)
    assert len(ax.collections) == 1  # the informative outlines
    fig.savefig(tmp_path / "cache.png")
    assert (tmp_path / "cache.png").stat().st_size > 0
    # nothing informative, nothing recorded: still a figure, no outlines
    assert not RoutingTrace().raster_figure().axes[0].collections
    with pytest.raises(ValueError, match="max_episodes and max_steps must be >= 1, got 0 and 10"):
        tr.raster_figure(max_episodes=0, max_steps=10)


def test_evaluate_reports_what_the_cache_kept_on_a_cue_env(tmp_path, capsys):
    run = tmp_path / "run"
    spec_router = ("memory.score=cosine", "memory.threshold=0.5", "memory.target_fraction=null")
    train(cfg_of(f"run_dir={run}", "env=cue-random-d50", "total_timesteps=128", "memory.num_heads=2", *spec_router))
    res = evaluate_run(run, {"episodes": 4}, quiet=False)[0]
    # with the spec's cosine score an episode's first step is always cached at tau 0.5: nothing is in the RNN yet, so
    # its score is 1
    assert res["threshold"] == 0.5 and res["step0_cached"] == 1.0 and res["cached_per_episode"] >= 1
    assert 0 <= res["cache_recall"] <= 1 and 0 <= res["cache_precision"] <= 1
    out = capsys.readouterr().out
    assert "cache recall" in out and "step0_cached 1.000" in out and f"wrote {run / 'cache.png'}" in out
    assert (run / "cache.png").stat().st_size > 0
    # the ends of the threshold: everything cached (recall 1, precision 1 cue in 52 steps), then nothing cached
    (run / "cache.png").unlink()
    low, mid, high = evaluate_run(run, {"episodes": 4, "memory.threshold": [-math.inf, 0.5, math.inf]}, quiet=True)
    assert low["cache_recall"] == 1.0 and low["cache_precision"] == pytest.approx(1 / 52)
    assert low["cached_per_episode"] == 52.0 and low["step0_cached"] == 1.0
    assert mid["cache_recall"] == res["cache_recall"] and mid["cache_precision"] == res["cache_precision"]
    assert high["cache_recall"] == 0.0 and high["cache_precision"] is None and high["cached_per_episode"] == 0.0
    for name in ("cache.png", "cache_tau-inf.png", "cache_tau0.5.png", "cache_tauinf.png"):
        assert (run / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(run / "sweep.csv")))
    assert [r["cache_recall"] for r in rows] == ["1.0", str(res["cache_recall"]), "0.0"] and rows[2]["cache_precision"] == ""


def test_a_memory_without_a_router_reports_none_and_draws_nothing(tmp_path):
    run = tmp_path / "run"
    train(cfg_of(f"run_dir={run}", "env=cue-random-d50", "memory=gru", "total_timesteps=128", "tensorboard=true",
                 "cache_figure_every=1"))  # fmt: skip
    res = evaluate_run(run, {"episodes": 2}, quiet=True)[0]
    keys = ("cache_recall", "cache_episode_recall", "cache_precision", "step0_cached", "cached_per_episode")
    assert [res[k] for k in keys] == [None] * 5
    assert not (run / "cache.png").exists()
    assert "memory/cache" not in _tb_tags(run)["images"]


def _tb_tags(run) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_training_logs_the_cache_picture_and_recording_changes_nothing(tmp_path):
    common = ["env=cue-random-d50", "agent.num_steps=32", "total_timesteps=256", "memory.num_heads=2"]
    train(cfg_of(f"run_dir={tmp_path / 'tb'}", *common, "tensorboard=true", "cache_figure_every=1"))
    tags = _tb_tags(tmp_path / "tb")
    assert "memory/cache" in tags["images"]  # update 2: the 4 episodes that began at step 0 end at step 51
    assert {"memory/cache_recall", "memory/cache_precision", "memory/step0_cached"} <= set(tags["scalars"])
    train(cfg_of(f"run_dir={tmp_path / 'plain'}", *common))
    a, b = params(tmp_path / "tb"), params(tmp_path / "plain")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "update, longest, every, records",
    [
        (0, None, 25, False),  # update 1: the picture is at 25, the episodes seen so far span one rollout
        (23, [40], 25, True),  # update 24 records for 25's episodes that began in 24
        (24, [40], 25, True),
        (25, [40], 25, False),
        (20, [200], 25, True),  # 200-step episodes over 64-step rollouts: from 4 updates before the picture
        (19, [200], 25, False),
        (23, [65], 25, True),  # a 65-step episode ending at update 25's first step began at update 24's first
        (22, [65], 25, False),
        (22, [66], 25, True),  # one step longer: at update 23's last
        (7, None, 1, True),  # every update logs: always recording
    ],
)
def test_routing_is_recorded_only_around_the_picture_updates(update, longest, every, records):
    ppo = SimpleNamespace(update=update, ep_lengths=longest or [], cfg=SimpleNamespace(num_steps=64))
    assert _records_routing(ppo, every) is records
