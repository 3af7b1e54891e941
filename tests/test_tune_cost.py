"""bench/tune_cost.py's figures from made-up arm timings, computed by hand (the sweeps themselves are tested in
tests/test_tune.py)."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("name", ["tune_cost", "tune_cost_pca32_components"])
def test_the_committed_result_has_the_issues_fields(name):
    r = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    fields = {"trials", "teacher", "student", "sweep_s", "precompute_s", "student_alone_s", "inline_sweep_s",
              "ratio_vs_floor", "inline_over_cached"}
    assert fields <= set(r)
    # (student_alone_s is stored rounded to 0.1 s; the ratio was computed before rounding)
    assert r["ratio_vs_floor"] == pytest.approx(r["sweep_s"] / (r["trials"] * r["student_alone_s"] + r["precompute_s"]),
                                                rel=5e-3)
    assert r["inline_over_cached"] == pytest.approx(r["inline_sweep_s"] / r["sweep_s"], abs=2e-3)
