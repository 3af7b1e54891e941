"""bench/step_cost.py end to end on the tiniest setting: every arm runs and the report has what the issue asks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step_cost", ROOT / "bench" / "step_cost.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_step_cost_smoke(shapes_root, tmp_path, ray_session):
    bench = _bench()
    out = tmp_path / "out"
    argv = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1", "--teacher", "fcos_resnet_mini",
            "--serve-cpus", "0.5", "--shard-size", "8", "--data-root", str(shapes_root), "--out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads((out / "step_cost_cpu.json").read_text())
    assert summary["data"]["images"] == 16 and summary["data"]["batches"] == 2
    assert summary["machine"]["cpu_count"] and summary["ray"]["serving"]["actors"] == 1
    (res,) = summary["results"]
    assert res["weights"] == "random weights"
    assert set(res["arms"]) == {"a", "b", "c", "d"}
    assert all(v["steps_per_s"] > 0 for v in res["arms"].values())
    assert res["ratios"]["a"] == 1.0 and all(res["ratios"][k] > 0 for k in "bcd")
    assert res["cache"]["targets"] == ["features"] and res["cache"]["views"] == ["noflip", "flip"]
    b, a = res["breakdown_b"]["ms"]["b"], res["breakdown_b"]["ms"]["a"]
    assert b["targets"] > 0 and b["losses"] > 0 and b["forward"] > 0 and b["backward"] > 0
    assert a["targets"] == a["losses"] == 0.0
    parts = ("targets", "move", "losses", "forward", "backward", "other")
    assert abs(sum(b[k] for k in parts) - b["step"]) < 1e-6
    # the background reads, beside the parts of the step: their time, their thread's CPU within it
    assert b["read"] >= b["read_cpu"] > 0 and a["read"] == a["read_cpu"] == 0.0
    table = (out / "step_cost_cpu.md").read_text()
    assert "(b) from the cache" in table and "Where the time of (b) goes" in table
    assert f"took {b['read']:.2f} ms per step, {b['read_cpu']:.2f} ms of it the thread's own CPU" in table
    # by default (b) reads as runs and sweeps do: through Ray's object store
    assert res["breakdown_b"]["reader"] == "object_store"
    assert "waiting for the targets (ObjectStoreReader, read one batch ahead)" in table


def test_step_cost_from_principal_components(shapes_root, tmp_path, ray_session):
    """--pca R --components: the cache is projected and arm (b) distils from its components."""
    bench = _bench()
    out = tmp_path / "out"
    argv = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1", "--teacher", "fcos_resnet_mini",
            "--serve-cpus", "0.5", "--shard-size", "8", "--data-root", str(shapes_root), "--out", str(out),
            "--arms", "a,b,e,f,g", "--pca", "8", "--components", "--reader", "parquet"]
    assert bench.main(argv) == 0
    (res,) = json.loads((out / "step_cost_cpu.json").read_text())["results"]
    assert res["cache"]["pca"] == 8 and res["cache"]["components"] is True
    assert set(res["arms"]) == {"a", "b", "e", "f", "g"} and all(res["ratios"][k] > 0 for k in "befg")
    # (e): (b) with the connectors' small convolutions on PyTorch's default path, compared within each round
    b, e = res["arms"]["b"]["rounds"], res["arms"]["e"]["rounds"]
    assert res["b_over_e"] == pytest.approx(b[0] / e[0])
    # (f): (b)'s loss on targets held in memory; (b)/(f) is what reading costs the step, within each round
    assert res["b_over_f"] == pytest.approx(b[0] / res["arms"]["f"]["rounds"][0])
    # (g): (b)'s reads in the step, no read-ahead thread: its "targets" part is the read itself
    assert res["b_over_g"] == pytest.approx(b[0] / res["arms"]["g"]["rounds"][0])
    assert res["arms"]["g"]["parts_ms"]["targets"] > 0
    assert res["breakdown_b"]["reader"] == "parquet"
    table = (out / "step_cost_cpu.md").read_text()
    assert "(e) (b), small connector convs on oneDNN" in table and f"speed {res['b_over_e']:.3f}" in table
    assert "waiting for the targets (CacheReader, read one batch ahead)" in table
    assert "(f) (b)'s loss, targets read beforehand" in table and f"(b)/(f) speed {res['b_over_f']:.3f}" in table
    assert "(g) (b), read in the step, no thread" in table and f"(b)/(g) speed {res['b_over_g']:.3f}" in table


def test_held_feed_reads_every_batch_before_the_first_step():
    """Arm (f)'s feed: each batch's targets read once, all before the first step, and given back in batch order
    (cycling over the batches as the other feeds do)."""
    bench = _bench()
    calls = []

    class Reader:  # the feed's only use of a reader: targets_for
        def targets_for(self, targets):
            calls.append(targets[0]["image_id"])
            return {"for": targets[0]["image_id"]}

    batches = [([None], [{"image_id": i}]) for i in (7, 8)]
    feed = bench.held_feed(batches, 5, Reader())
    images, targets, teacher = next(feed)
    assert calls == [7, 8]  # both read before the first step
    got = [teacher(images, targets)] + [t(i, tg) for i, tg, t in feed]
    assert calls == [7, 8] and [g["for"] for g in got] == [7, 8, 7, 8, 7]
