"""bench/cache_frontier.py's figures from made-up runs, computed by hand (the caches and runs themselves are tested
in tests/test_cache.py, tests/test_pool.py and tests/test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _size(features: float, projected: bool = False) -> dict:
    return {"bytes_per_image": features + 100.0, "features_bytes": features, "other_bytes": 100.0, "channels": 64,
            "pixels": 128 * 128, "projected": projected}


def test_rows_keep_the_gain_against_the_same_losss_fp32_row_and_project_to_coco():
    bench = load_bench("cache_frontier")
    baseline = {0: 0.08, 1: 0.10}
    runs = {("mgd", "fp32"): {"aps": {0: 0.12, 1: 0.15}, "size": _size(4000.0)},
            ("mgd", "int8"): {"aps": {0: 0.11, 1: 0.14}, "size": _size(1000.0)},
            ("mgd", "int8+pca16"): {"aps": {0: 0.13}, "size": _size(250.0, projected=True)},
            ("fitnet", "int8"): {"aps": {0: 0.09}, "size": _size(1000.0)}}
    rows = {(r["loss"], r["setting"]): r for r in bench.frontier_rows(runs, baseline)}
    # gain of fp32 over both seeds: mean(0.04, 0.05) = 0.045; int8 keeps mean(0.03, 0.04) / 0.045
    assert rows[("mgd", "fp32")]["ap_gain_kept"] == 1.0
    assert rows[("mgd", "int8")]["ap_gain_kept"] == pytest.approx(0.035 / 0.045, abs=1e-3)
    assert rows[("mgd", "int8")]["ap"] == pytest.approx(0.125)
    # a setting run on seed 0 only is set against fp32 on seed 0 only: (0.13 - 0.08) / (0.12 - 0.08)
    assert rows[("mgd", "int8+pca16")]["ap_gain_kept"] == pytest.approx(1.25)
    assert rows[("fitnet", "int8")]["ap_gain_kept"] is None  # no fp32 reference for this loss
    # COCO: features x (800 x 1333) / 128^2 x 256 / 64 channels, + the index bytes; a projection keeps its channels
    assert rows[("mgd", "int8")]["bytes_per_image_coco"] == round(1000 * 800 * 1333 / 128 ** 2 * 4 + 100)
    assert rows[("mgd", "int8+pca16")]["bytes_per_image_coco"] == round(250 * 800 * 1333 / 128 ** 2 + 100)
    assert rows[("mgd", "int8")]["bytes_per_image"] == 1100


def test_the_recommendation_is_the_smallest_setting_keeping_90_percent_within_the_budget(tmp_path):
    bench = load_bench("cache_frontier")
    rows = [{"loss": "mgd", "setting": "a", "ap_gain_kept": 1.0, "bytes_per_image_coco": 3 << 20},
            {"loss": "mgd", "setting": "b", "ap_gain_kept": 0.95, "bytes_per_image_coco": 1 << 19},
            {"loss": "mgd", "setting": "c", "ap_gain_kept": 0.5, "bytes_per_image_coco": 1 << 10},
            {"loss": "fitnet", "setting": "d", "ap_gain_kept": 0.92, "bytes_per_image_coco": 2 << 20}]
    assert bench.recommend(rows, "mgd")["setting"] == "b"
    assert bench.recommend(rows, "fitnet")["setting"] == "d"  # none fits: the smallest that keeps the gain
    assert bench.recommend(rows, "zhang") is None
    result = {"student": "s", "teacher": "t", "epochs": 9, "seeds": [0, 1], "baseline": [0.08, 0.09],
              "rows": [dict(r, ap=0.1, aps=[0.1], seeds=[0] if r["setting"] == "c" else [0, 1],
                            bytes_per_image=1000) for r in rows]}
    text = bench.summarize(result)
    assert "- mgd: b keeps 95% of the gain at 0.50 MiB" in text and "(OVER the 1 MiB goal)" in text
    bench.plot(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_the_variance_other_teachers_leave_outside_r_components_shrinks_with_r(shapes_root, tmp_path):
    import torch

    from curriculum.config import DataConfig
    from teachers.zoo import build_detector

    bench = load_bench("cache_frontier")
    torch.manual_seed(0)
    torch.save(build_detector("fcos_resnet_mini", 7).checkpoint(), tmp_path / "t.pt")
    data = DataConfig(root=str(shapes_root), builtin="none")
    (v,) = bench.variance_left_out([str(tmp_path / "t.pt")], data, ranks=(8, 16, 64), images=8).values()
    assert v["channels"] == 64 and set(v["left_out"]) == {"8", "16"}  # r below the channels only
    for level, x in v["left_out"]["8"].items():
        assert 0 <= v["left_out"]["16"][level] <= x < 1
    text = bench.summarize({"student": "s", "teacher": "t", "epochs": 1, "seeds": [0], "baseline": [0.1],
                            "rows": [], "variance_left_out": {"fcos_resnet_mini": v}})
    assert "fcos_resnet_mini (64 channels): variance outside r components, per level: r 8: p3" in text


@pytest.mark.parametrize("name", ["cache_frontier", "cache_frontier_components16", "cache_frontier_mgd_components"])
def test_the_committed_result_has_the_issues_fields(name):
    path = ROOT / "bench" / "results" / f"{name}.json"
    r = json.loads(path.read_text())
    fields = {"setting", "bytes_per_image", "bytes_per_image_coco", "ap", "ap_gain_kept"}
    assert r["rows"] and all(fields <= set(row) for row in r["rows"])
    for row in r["rows"]:
        assert row["ap"] == pytest.approx(sum(row["aps"]) / len(row["aps"]))
        if row["setting"] == "fp32":
            assert row["ap_gain_kept"] == 1.0
    assert path.with_suffix(".png").exists()
