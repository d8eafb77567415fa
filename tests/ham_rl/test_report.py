"""Tests of ham_rl.report on small synthetic run directories whose numbers are known."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ham_rl.report import ReportError, curves_on_grid, find_runs, load_run, main, mean_ci, read_table, summarize, t_quantile
from ham_rl.report.plots import _sweep_points

HEADER = "global_step,time_s,ep_rew_mean,ep_len_mean,fps,kv_fraction,kv_len_mean,threshold"
ENV_A, ENV_B = "popgym-RepeatPreviousEasy-v0", "popgym-CountRecallEasy-v0"
T_975_2 = 4.302652729749433  # t_{0.975, 2}, from tables


def _cell(v: float | None) -> str:
    return "" if v is None else repr(v)


def make_run(
    path: Path,
    env: str,
    memory: str,
    seed: int,
    returns: list[float | None],
    steps: list[int] | None = None,
    kv: float | None = None,
    steps_per_s: float = 1000.0,
    num_params: int = 5000,
    finished: bool = True,
    final_return: float | None = None,
    budget: int = 400,
    sweep: list[tuple[float, float, float]] | None = None,
) -> Path:
    """Write config.yaml, metrics.csv and (if finished) summary.json as ham_rl.train does."""
    path.mkdir(parents=True)
    steps = steps or [100 * (i + 1) for i in range(len(returns))]
    (path / "config.yaml").write_text(
        f"env:\n  id: {env}\nmemory:\n  name: {memory}\n  threshold: 0.5\nseed: {seed}\ntotal_timesteps: {budget}\n"
    )
    lines = [HEADER]
    for step, ret in zip(steps, returns, strict=True):
        time_s = step / steps_per_s
        lines.append(f"{step},{time_s!r},{_cell(ret)},10.0,{steps_per_s!r},{_cell(kv)},,")
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    if finished:
        last = [r for r in returns if r is not None][-1]
        summary = {
            "env": env, "memory": memory, "seed": seed, "total_timesteps": budget, "global_step": steps[-1],
            "num_params": num_params, "final_return": last if final_return is None else final_return,
            "mmer": max(r for r in returns if r is not None), "kv_fraction": kv, "steps_per_s": steps_per_s,
            "wall_time_s": steps[-1] / steps_per_s, "threshold": 0.5,
        }  # fmt: skip
        (path / "summary.json").write_text(json.dumps(summary))
    if sweep is not None:
        rows = ["threshold,mean_return,std_return,kv_fraction,episodes"]
        rows += [f"{tau!r},{ret!r},0.1,{frac!r},20" for tau, frac, ret in sweep]
        (path / "sweep.csv").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    """A Hydra-multirun-like tree: ham (3 seeds, MMER 1, 2, 3), gru (2 seeds), gdn, attention; a second env."""
    root = tmp_path / "multirun" / "2026-11-21" / "12-00-00"
    job = iter(range(100))
    for seed, peak in enumerate([1.0, 2.0, 3.0]):  # MMER = peak, reached mid-training; kv 0.2, 0.3, 0.4
        make_run(root / str(next(job)), ENV_A, "ham", seed, [None, peak - 1, peak, peak - 0.5], kv=0.2 + 0.1 * seed,
                 steps_per_s=900.0 + 100 * seed, sweep=[(0.1, 0.8, 2.5), (1.0, 0.1, 1.0 + seed)])  # fmt: skip
    make_run(root / str(next(job)), ENV_A, "gru", 0, [0.0, 0.5, 0.25], num_params=7000)
    make_run(root / str(next(job)), ENV_A, "gru", 1, [0.0, 0.7, 0.5], num_params=7000)
    make_run(root / str(next(job)), ENV_A, "gdn", 0, [0.0, 1.5])
    make_run(root / str(next(job)), ENV_A, "attention", 0, [0.0, 2.5])
    make_run(root / str(next(job)), ENV_B, "ham", 0, [0.1, 0.2], kv=0.5)
    make_run(root / str(next(job)), ENV_B, "ham", 1, [0.3, 0.9], finished=False)  # unfinished: skipped by default
    (root / "0" / "checkpoints").mkdir()  # a run's own subfolders are not searched
    return tmp_path / "multirun"


def test_t_quantile_matches_tables() -> None:
    table = {(0.975, 1): 12.706, (0.975, 2): 4.303, (0.975, 3): 3.182, (0.975, 4): 2.776, (0.975, 9): 2.262,
             (0.975, 30): 2.042, (0.975, 1000): 1.962, (0.95, 5): 2.015, (0.995, 10): 3.169}  # fmt: skip
    for (p, df), expected in table.items():
        assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3), (p, df)
    assert t_quantile(0.025, 2) == pytest.approx(-4.303, abs=1e-3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_mean_ci_hand_computed() -> None:
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)  # 2.484
    assert half == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-9)
    assert mean_ci([2.0, float("nan")])[1:] == (pytest.approx(float("nan"), nan_ok=True), 1)
    assert math.isnan(mean_ci([])[0])


def test_mmer_is_max_over_training_from_metrics(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "r", ENV_A, "ham", 0, [None, 0.2, 0.9, 0.4], final_return=0.35, kv=0.25))
    assert run.mmer == 0.9  # the maximum of ep_rew_mean, not the last value
    assert run.final_return == 0.35  # summary.json's
    assert run.kv_fraction == 0.25
    assert run.steps_per_s == 1000.0
    unfinished = load_run(make_run(tmp_path / "u", ENV_A, "ham", 0, [0.1, 0.7, 0.3], finished=False, kv=0.4))
    assert (unfinished.mmer, unfinished.final_return, unfinished.finished) == (0.7, 0.3, False)
    assert unfinished.kv_fraction == pytest.approx(0.4)  # from metrics.csv
    assert unfinished.steps_per_s == pytest.approx(1000.0)  # last global_step / last time_s
    assert math.isnan(unfinished.num_params)


def test_summarize_groups_by_env_and_memory(multirun: Path) -> None:
    with pytest.warns(UserWarning, match="1 unfinished"):
        table = summarize(find_runs([multirun]))
    assert list(table) == [ENV_B, ENV_A]
    rows = {r.memory: r for r in table[ENV_A]}
    assert [r.memory for r in table[ENV_A]] == ["ham", "gdn", "attention", "gru"]  # the project's memory order
    ham = rows["ham"]
    assert (ham.n_seeds, ham.seeds, ham.steps_budget, ham.steps_reached) == (3, "0 1 2", 400.0, 400.0)
    assert ham.mmer_mean == pytest.approx(2.0)
    assert ham.mmer_ci95 == pytest.approx(T_975_2 * 1.0 / math.sqrt(3))  # 2.484
    assert ham.final_return_mean == pytest.approx(1.5)  # 0.5, 1.5, 2.5
    assert ham.kv_fraction_mean == pytest.approx(0.3)
    assert ham.kv_fraction_ci95 == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    assert ham.steps_per_s_mean == pytest.approx(1000.0)
    assert ham.num_params == 5000
    gru = rows["gru"]
    assert (gru.n_seeds, gru.mmer_mean, gru.num_params) == (2, pytest.approx(0.6), 7000)
    assert gru.mmer_ci95 == pytest.approx(12.7062047 * np.std([0.5, 0.7], ddof=1) / math.sqrt(2))
    assert math.isnan(gru.kv_fraction_mean)  # no cache
    assert (rows["gdn"].kv_fraction_mean, rows["attention"].kv_fraction_mean) == (0.0, 1.0)  # by definition
    assert math.isnan(rows["gdn"].mmer_ci95)  # one seed: no interval
    (b_ham,) = table[ENV_B]
    assert (b_ham.n_seeds, b_ham.mmer_mean, b_ham.kv_fraction_mean) == (1, 0.2, 0.5)


def test_find_runs_recursive_and_unfinished(multirun: Path) -> None:
    with pytest.warns(UserWarning, match="skipped 1 unfinished run"):
        runs = find_runs([multirun])
    assert len(runs) == 8
    runs_all = find_runs([multirun], include_unfinished=True)
    assert len(runs_all) == 9
    (b_ham,) = [r for r in summarize(runs_all)[ENV_B]]
    assert (b_ham.n_seeds, b_ham.mmer_mean) == (2, pytest.approx(0.55))
    single = multirun / "2026-11-21" / "12-00-00" / "5"
    assert [r.memory for r in find_runs([single])] == ["gdn"]  # a run dir itself is accepted


def test_curves_on_common_grid() -> None:
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 2.0]))
    b = (np.array([0.0, 5.0, 10.0]), np.array([np.nan, 0.5, 1.0]))  # different steps, an empty cell, shorter
    grid, values = curves_on_grid([a, b], num=5)
    np.testing.assert_allclose(grid, [0, 5, 10, 15, 20])
    np.testing.assert_allclose(values[0], [0, 0.5, 1, 1.5, 2])
    np.testing.assert_allclose(values[1], [np.nan, 0.5, 1.0, np.nan, np.nan])  # not extrapolated


def test_sweep_points_average_over_seeds(multirun: Path) -> None:
    with pytest.warns(UserWarning):
        runs = [r for r in find_runs([multirun]) if r.memory == "ham" and r.env == ENV_A]
    taus, kv, mean, ci = _sweep_points(runs)
    np.testing.assert_allclose(taus, [1.0, 0.1])  # sorted by kv fraction
    np.testing.assert_allclose(kv, [0.1, 0.8])
    np.testing.assert_allclose(mean, [2.0, 2.5])  # (1 + 2 + 3) / 3 at tau 1.0
    np.testing.assert_allclose(ci, [T_975_2 / math.sqrt(3), 0.0])


def test_cli_writes_tables_and_plots(multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    main([str(multirun), "--out", str(out)])
    for name in [f"{ENV_A}.md", f"{ENV_A}.csv", f"{ENV_A}_curves.png", f"{ENV_A}_kv.png", f"{ENV_B}.md", "steps_per_s.png"]:
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / f"{ENV_B}_kv.png").exists()  # one memory, no sweep: nothing to plot
    assert not list(out.glob("*.tmp*"))
    stdout, stderr = capsys.readouterr()
    assert "best MMER: attention 2.500" in stdout and "unfinished" in stderr

    with pytest.warns(UserWarning):
        expected = summarize(find_runs([multirun]))[ENV_A]
    rows = read_table(out / f"{ENV_A}.csv")
    assert [r.memory for r in rows] == [r.memory for r in expected]
    for got, want in zip(rows, expected, strict=True):
        for name, value in vars(want).items():
            assert getattr(got, name) == value or (value != value and getattr(got, name) != getattr(got, name)), name
    with open(out / f"{ENV_A}.csv", newline="") as f:
        ham = next(csv.DictReader(f))
    assert (ham["memory"], float(ham["mmer_mean"]), ham["n_seeds"]) == ("ham", 2.0, "3")
    assert float(ham["mmer_ci95"]) == pytest.approx(2.484, abs=1e-3)
    md = (out / f"{ENV_A}.md").read_text()
    # steps to 0.5 and 0.9: ham's seeds first reach both at steps 300, 200, 200 (mean 233, t(0.975, 2) * 57.7 / 3 ** 0.5)
    assert "| ham | 3 | 400 | 2.000 ± 2.484 | 1.500 ± 2.484 | 233 ± 143 (3/3) | 233 ± 143 (3/3) | 0.300 ± 0.248 |" in md
    assert "| gru | 2 | 300 of 400 | 0.600 ± 1.271 | 0.375 ± 1.588 | 200 ± 0 (2/2) | not reached (0/2) |" in md
    assert "| attention | 1 | 200 of 400 | **2.500** | 2.500 | 200 (1/1) | 200 (1/1) | 1.000 |" in md  # best MMER in bold


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "no runs found under"),
        ("missing", "no such directory"),
        ("bad_number", "metrics.csv line 3: column ep_rew_mean: 'oops' is not a number"),
        ("missing_column", "metrics.csv: missing column(s) ep_rew_mean"),
        ("ragged", "metrics.csv line 2: 3 fields, the header has 8"),
        ("no_memory", "config.yaml: no `memory.name`"),
        ("all_unfinished", "pass --include-unfinished"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, setup: str, message: str) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    if setup not in ("empty", "missing"):
        run = make_run(root / "r", ENV_A, "ham", 0, [0.1, 0.2], finished=setup != "all_unfinished")
        metrics = (run / "metrics.csv").read_text().splitlines()
        if setup == "bad_number":
            fields = metrics[2].split(",")
            metrics[2] = ",".join([*fields[:2], "oops", *fields[3:]])
        elif setup == "missing_column":
            metrics[0] = metrics[0].replace("ep_rew_mean", "reward")
        elif setup == "ragged":
            metrics[1] = "100,0.1,0.1"
        elif setup == "no_memory":
            (run / "config.yaml").write_text(f"env:\n  id: {ENV_A}\nseed: 0\ntotal_timesteps: 400\n")
            (run / "summary.json").unlink()  # summary.json's "memory" would stand in for it
        (run / "metrics.csv").write_text("\n".join(metrics) + "\n")
    target = root / "nope" if setup == "missing" else root
    with pytest.raises(SystemExit) as exc, pytest.warns(UserWarning) if setup == "all_unfinished" else _nothing():
        main([str(target), "--out", str(tmp_path / "out")])
    text = str(exc.value.code)
    assert text.startswith("ham_rl.report: error: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-written


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_load_run_keeps_last_row_of_a_repeated_step(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", ENV_A, "gru", 0, [0.1, 0.5, 0.2], steps=[100, 200, 200])
    loaded = load_run(run)
    np.testing.assert_array_equal(loaded.steps, [100, 200])
    np.testing.assert_array_equal(loaded.returns, [0.1, 0.2])
    with pytest.raises(ReportError, match="no such directory"):
        find_runs([tmp_path / "absent"])


def test_report_skips_dead_and_unreadable_runs_and_reports_the_rest(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    make_run(root / "good", ENV_A, "ham", 0, [0.1, 0.4])
    dead = root / "dead"  # died in its first update: a header-only metrics.csv (and, say, a partial summary)
    dead.mkdir(parents=True)
    (dead / "config.yaml").write_text((root / "good" / "config.yaml").read_text())
    (dead / "metrics.csv").write_text(HEADER + "\n")
    (dead / "summary.json").write_text('{"env": "' + ENV_A + '"}')
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("env: [unclosed\n")
    (broken / "metrics.csv").write_text(HEADER + "\n")
    main([str(root), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()  # the report's warnings: one line per skipped run
    assert any(f"skipped {broken}" in m and "not a readable YAML config" in m for m in lines)
    assert any(str(dead) in m and "no episode has ended" in m for m in lines)
    rows = read_table(tmp_path / "out" / f"{ENV_A}.csv")
    assert [r.memory for r in rows] == ["ham"] and rows[0].n_seeds == 1


def _evaluation(step: int, threshold, drop: str | None, ret: float, trained=0.25, **extra) -> str:
    record = {"checkpoint_step": step, "trained_threshold": trained, "threshold": threshold, "drop": drop,
              "mean_return": ret, "success_rate": None, "episodes": 8, "kv_fraction": 0.1, "cached_per_episode": 4.0,
              "cache_recall": 0.9, "step0_cached": 0.5, **extra}  # fmt: skip
    return json.dumps(record) + "\n"


def test_evaluations_table_has_each_runs_latest_record_of_each_kind(tmp_path: Path) -> None:
    ham = make_run(tmp_path / "runs" / "ham", ENV_A, "ham", 0, [0.1, 0.9])
    (ham / "evaluations.jsonl").write_text(
        _evaluation(100, 0.25, None, 0.11)  # an older checkpoint: ignored
        + _evaluation(200, 0.25, None, 0.50)  # overwritten by the later record of its kind
        + _evaluation(200, 0.25, None, 0.95)
        + _evaluation(200, "inf", None, 0.12)
        + _evaluation(200, 0.6, None, 0.70)  # a sweep's other threshold: sweep.csv's business
        + _evaluation(200, 0.25, "informative", 0.13)
    )
    att = make_run(tmp_path / "runs" / "att", ENV_A, "attention", 0, [0.1, 0.8])
    (att / "evaluations.jsonl").write_text(
        _evaluation(200, None, None, 0.90, trained=None, success_rate=1.0)
        + _evaluation(200, None, "uninformative", 0.85, trained=None, success_rate=0.5)
    )
    make_run(tmp_path / "runs" / "gru", ENV_A, "gru", 0, [0.1, 0.3])  # never evaluated: no row
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / f"{ENV_A.replace('/', '_')}_evaluations.md").read_text()
    assert "| ham | 0 | 200 | 8 | 0.950 | 0.120 | 0.130 | — | 0.100 | 4.0 | 0.900 | 0.500 |" in md
    assert "| attention | 0 | 200 | 8 | 1.000 | — | — | 0.500 |" in md  # success rate where the env reports one
    assert "| gru |" not in md and md.index("| ham |") < md.index("| attention |")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json\n", "evaluations.jsonl line 2: not valid JSON"),
        ('{"mean_return": 1.0}\n', "evaluations.jsonl line 2: expected a JSON object with checkpoint_step, threshold"),
        ("[1, 2]\n", "evaluations.jsonl line 2: expected a JSON object with checkpoint_step"),
    ],
)
def test_a_bad_evaluations_file_is_one_line_and_nothing_is_written(tmp_path: Path, line: str, message: str) -> None:
    run = make_run(tmp_path / "runs" / "ham", ENV_A, "ham", 0, [0.1, 0.9])
    (run / "evaluations.jsonl").write_text(_evaluation(200, 0.25, None, 0.9) + line)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    text = str(exc.value.code)
    assert text.startswith("ham_rl.report: error: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()
