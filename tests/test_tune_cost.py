"""bench/tune_cost.py's figures from made-up arm timings, computed by hand (the sweeps themselves are tested in
tests/test_tune.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("tune_cost")


def test_the_sweep_is_set_against_n_times_the_student_alone_plus_the_precompute(tmp_path):
    bench = _bench()
    cache = {"sweep_s": 300.0, "precompute_s": 60.0}
    inline = {"sweep_s": 750.0, "precompute_s": 0.0}
    r = bench.summarise(8, "fcos_resnet50", "fcos_mobilenetv3_micro", cache, inline, alone_s=25.0)
    # floor = 8 x 25 + 60 = 260
    assert r == {"trials": 8, "teacher": "fcos_resnet50", "student": "fcos_mobilenetv3_micro", "sweep_s": 300.0,
                 "precompute_s": 60.0, "student_alone_s": 25.0, "inline_sweep_s": 750.0,
                 "ratio_vs_floor": pytest.approx(300 / 260, abs=1e-3), "inline_over_cached": 2.5}
    bench.plot(r, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0
    # The overrides run one trial at a time on the given threads, with the given teacher.
    o = bench.bench_overrides("t", 3)
    assert "tune.max_concurrent=1" in o and "tune.threads_per_trial=3" in o and o[0].startswith("teachers=[{name: t")


@pytest.mark.parametrize("name", ["tune_cost", "tune_cost_pca32_components", "tune_cost_fitnet_pca16_components",
                                  "tune_cost_fitnet_pca16_components_run2"])
def test_the_committed_result_has_the_issues_fields(name):
    r = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    fields = {"trials", "teacher", "student", "sweep_s", "precompute_s", "student_alone_s", "inline_sweep_s",
              "ratio_vs_floor", "inline_over_cached"}
    assert fields <= set(r)
    # (student_alone_s is stored rounded to 0.1 s; the ratio was computed before rounding)
    assert r["ratio_vs_floor"] == pytest.approx(r["sweep_s"] / (r["trials"] * r["student_alone_s"] + r["precompute_s"]),
                                                rel=5e-3)
    assert r["inline_over_cached"] == pytest.approx(r["inline_sweep_s"] / r["sweep_s"], abs=2e-3)


def test_a_cached_trials_time_is_split_into_its_fixed_cost_and_its_epochs_excess_over_the_student_alone(tmp_path):
    bench = _bench()
    # Tune's result.json: one row per report, time_this_iter_s each
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / "result.json").write_text(
        "\n".join(json.dumps({"epoch": i + 1, "time_this_iter_s": s}) for i, s in enumerate([13.0, 11.0])) + "\n")
    assert bench.iteration_seconds(str(trial_dir)) == [13.0, 11.0]
    assert bench.iteration_seconds(str(tmp_path / "none")) == [] and bench.iteration_seconds(None) == []
    arm = {"trials_s": 100.0, "trials": [{"seconds": 24.0, "iterations_s": [13.0, 11.0]},
                                         {"seconds": 24.5, "iterations_s": [13.5, 11.0]},
                                         {"seconds": 25.0, "iterations_s": [13.0, 12.0]},
                                         {"seconds": 24.5, "iterations_s": [13.5, 11.0]}]}
    b = bench.trial_breakdown(arm, [[12.0, 10.0], [11.5, 10.0], [13.0, 10.5]])
    # later epochs 11, 11, 12, 11 (mean 11.25); set-up 2, 2.5, 1, 2.5 (mean 2); gap (100 - 98) / 4 = 0.5;
    # S: later epochs 10, 10, 10.5 (median 10), set-ups 2, 1.5, 2.5 (median 2)
    assert b == {"trial_s": 25.0, "trial_setup_s": 2.0, "between_trials_s": 0.5, "fixed_s": 2.5, "fixed_share": 0.1,
                 "trial_epoch_s": 11.25, "student_alone_epoch_s": 10.0, "student_alone_setup_s": 2.0,
                 "epoch_excess": 0.125}
    # a trial of one epoch has no later epoch to set its first against
    assert bench.trial_breakdown({"trials_s": 10.0, "trials": [{"seconds": 10.0, "iterations_s": [10.0]}]},
                                 [[12.0, 10.0]]) == {}


def test_the_epoch_clock_times_each_report_of_a_training():
    bench = _bench()

    def train(session):
        time.sleep(0.05)
        session.report({"epoch": 1}, None)
        time.sleep(0.15)
        session.report({"epoch": 2}, None)

    total, epochs = bench.timed_by_epoch(train)
    assert len(epochs) == 2
    assert 0.05 <= epochs[0] < 0.15 and 0.15 <= epochs[1] < 0.3
    assert total == pytest.approx(sum(epochs), abs=0.02)
