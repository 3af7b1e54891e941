"""The teacher pool on Ray: precompute (resume, killed actors), serving == inline, CLI (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from curriculum.config import (
    CacheConfig, CompressionConfig, DataConfig, PrecomputeJobConfig, TeacherSpec, load_config,
)
from curriculum.errors import ConfigError, DataError
from curriculum.errors import CacheLockedError, CorruptShardError
from teachers.cache import TeacherCache, find_caches
from teachers.lock import LOCK_NAME
from teachers.precompute import ActorSlots, open_dataset, precompute, rebuild
from teachers.readers import CacheReader
from teachers.serving import InlineTeacher, TeacherServer, prefetch
from teachers.verify import verify_cache
from test_cache import make_subset, one_thread, reference_rows, save_teacher  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def setup(shapes_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    images, ann = make_subset(shapes_root, d / "instances.json", 8)
    save_teacher(d / "teacher.pt")
    return d, images, ann


def job(d: Path, images: str, ann: str, root: str, actors: int = 1, spec_kw: dict | None = None, **cache_kw
        ) -> PrecomputeJobConfig:
    cache_kw.setdefault("targets", ["features", "head", "detections"])
    cache_kw.setdefault("compression", CompressionConfig(dtype="fp16", logits="topk", topk=3))
    return PrecomputeJobConfig(
        data=DataConfig(root=str(d), builtin="none", train_images=images, train_annotations=ann, image_size=128),
        teachers=[TeacherSpec(checkpoint=str(d / "teacher.pt"), actors=actors, cpus_per_actor=0.5, threads=1,
                              batch_size=2, **(spec_kw or {}))],
        cache=CacheConfig(root=root, shard_size=2, views=["noflip", "flip"], **cache_kw),
    )


def shard_files(cache_uri: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(cache_uri, "shards").iterdir())}


@pytest.fixture(scope="module")
def reference(setup, ray_session):
    """An uninterrupted precompute: what every interrupted or faulty run must end with, byte for byte."""
    d, images, ann = setup
    (report,) = precompute(job(d, images, ann, str(d / "ref")), progress=False)
    return report, shard_files(report.cache), json.loads(Path(report.cache, "manifest.json").read_text())


def test_precompute_matches_in_process_teacher(setup, reference):
    d, images, ann = setup
    report, files, manifest = reference
    assert manifest["complete"] and report.shards == 4 and sorted(report.computed) == [0, 1, 2, 3]
    assert sorted(files) == [f"shard-0000{i}.parquet" for i in range(4)]  # no temporary files left
    assert not Path(report.cache, LOCK_NAME).exists()  # the writer lock is released at the end
    cfg = job(d, images, ann, "x").cache
    from teachers.zoo import load_detector

    ref = reference_rows(load_detector(d / "teacher.pt").eval(), images, ann, cfg, batch_size=2)
    reader = CacheReader(report.cache)
    for (iid, _), (raw, _, _, view) in ref.items():
        got = reader.rows([iid], [view])[0]
        for col, a in raw.items():
            if col.startswith("head/cls_logits/"):
                order = np.argsort(-a, axis=1)[:, :3]
                assert np.allclose(np.take_along_axis(got[col], order, 1), np.take_along_axis(a, order, 1),
                                   rtol=2.0**-11, atol=1e-7)
            elif col.startswith("detections/"):
                assert np.array_equal(got[col], a)
            else:
                assert np.all(np.abs(got[col] - a) <= np.abs(a) * 2.0**-11 + 1e-7), col


class Crash(Exception):
    pass


def test_io_workers_and_shards_in_flight_change_nothing_in_the_cache(setup, reference, tmp_path):
    """Three I/O processes and three shards in flight (what a GPU teacher needs) write the same bytes."""
    d, images, ann = setup
    (report,) = precompute(job(d, images, ann, str(tmp_path / "c"), spec_kw={"io_workers": 3, "shards_in_flight": 3}),
                           progress=False)
    assert shard_files(report.cache) == reference[1] and sorted(report.computed) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"teachers\[\]\.io_workers: must be at least 1, got 0"):
        TeacherSpec(checkpoint="t.pt", io_workers=0)


def test_resume_after_a_crash_ends_with_the_same_cache(setup, reference, tmp_path):
    d, images, ann = setup
    _, ref_files, ref_manifest = reference
    commits = []

    def crash_after_two(teacher, shard):
        commits.append(shard)
        if len(commits) == 2:
            raise Crash("driver killed")

    with pytest.raises(Crash):
        precompute(job(d, images, ann, str(tmp_path)), progress=False, on_commit=crash_after_two)
    (cache_dir,) = find_caches(str(tmp_path))
    assert not Path(cache_dir, LOCK_NAME).exists()  # released by the failed run too
    partial = TeacherCache.open(cache_dir)
    assert len(partial.manifest["shards"]) == 2 and not partial.complete
    (report,) = precompute(job(d, images, ann, str(tmp_path)), progress=False)
    assert sorted(report.computed) == sorted(set(range(4)) - set(commits))  # finished shards not recomputed
    assert report.already_done == 2
    assert shard_files(report.cache) == ref_files
    got = json.loads(Path(report.cache, "manifest.json").read_text())
    assert got["shards"] == ref_manifest["shards"] and got["complete"]


def test_killed_actor_is_replaced_and_no_shard_is_lost_or_written_twice(setup, reference, tmp_path, ray_session):
    d, images, ann = setup
    _, ref_files, ref_manifest = reference
    killed = []

    def kill_second(teacher, shard, actor):
        if not killed and shard == 1:
            ray_session.kill(actor, no_restart=True)  # dies mid-shard, before it could return
            killed.append(shard)

    (report,) = precompute(job(d, images, ann, str(tmp_path), actors=2), progress=False, on_dispatch=kill_second)
    assert killed == [1]
    # Every shard the killed actor held (two in flight per actor) was handed out again; one replacement actor.
    retried = [s for s, _ in report.retried]
    assert report.actors_replaced == 1 and 1 in retried and len(set(retried)) == len(retried)
    assert sorted(report.computed) == [0, 1, 2, 3]  # each shard committed exactly once
    assert shard_files(report.cache) == ref_files
    assert json.loads(Path(report.cache, "manifest.json").read_text())["shards"] == ref_manifest["shards"]


def test_a_replaced_actor_takes_no_shard_before_it_starts():
    # The case a CI run met on a 3-node cluster: the lost node's actor finished a shard (a free place queued), then
    # failed its other one; the retried shard must go to a live actor, not to the replacement the cluster may
    # never find room for.
    slots = ActorSlots(3, 2)
    taken = [slots.take() for _ in range(6)]
    assert taken == [0, 1, 2, 0, 1, 2] and not slots
    slots.release(0)  # actor 0 returned a shard: one free place
    slots.hold(0)  # then its node was lost: a replacement is starting in slot 0
    slots.release(0)  # its other shard failed
    assert not slots  # neither place of slot 0 can be taken
    slots.release(2)
    assert slots.take() == 2 and not slots
    slots.started(0)  # the replacement answered ready(): both places are free again
    assert [slots.take(), slots.take()] == [0, 0] and not slots
    slots.hold(1)
    slots.started(1)  # a replacement that held nothing frees nothing
    assert not slots


def test_corrupt_image_stops_precompute_naming_it_and_keeps_finished_shards(setup, reference, tmp_path):
    # The image is decoded in the actor's I/O process: its DataError must come back through the actor and Ray
    # to the driver, naming the file, not be retried (a retry cannot help) nor become a dead-actor error.
    import shutil

    from curriculum.errors import DataError

    d, images, ann = setup
    _, ref_files, _ = reference
    folder = tmp_path / "images"
    folder.mkdir()
    files = [im["file_name"] for im in json.loads(Path(ann).read_text())["images"]]
    for f in files:
        shutil.copy(Path(images, f), folder / f)
    bad = folder / files[6]  # shard 3 of 4 (two images per shard)
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        precompute(job(d, str(folder), ann, str(tmp_path / "cache")), progress=False)
    assert str(bad) in str(e.value) and "shard 3" in str(e.value), e.value
    (cache_dir,) = [p.parent for p in (tmp_path / "cache").rglob("manifest.json")]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert not manifest["complete"]
    done = shard_files(str(cache_dir))
    assert "shard-00000.parquet" in done and "shard-00003.parquet" not in done
    # The shards finished before the error are kept and are the fault-free run's bytes.
    assert all(done[name] == ref_files[name] for name in done if name.endswith(".parquet")), sorted(done)
    # Once the image is replaced, a second run computes only what is missing.
    shutil.copy(Path(images, files[6]), bad)
    (report,) = precompute(job(d, str(folder), ann, str(tmp_path / "cache")), progress=False)
    assert report.already_done + len(report.adopted) >= 1 and 3 in report.computed
    assert shard_files(report.cache) == ref_files


def test_rebuild_and_verify(setup, reference, tmp_path):
    import shutil

    d, images, ann = setup
    report, ref_files, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(report.cache, copy)
    v = verify_cache(str(copy), sample=3)
    assert v["ok"] and v["checked"] >= 3, v
    p = copy / "shards" / "shard-00002.parquet"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CorruptShardError, match="shard-00002"):
        CacheReader(str(copy)).rows([open_dataset(images, ann, 128).image_ids[4]], ["h128w128f0"])
    r = rebuild(str(copy), [2])
    assert r.computed == [2] and not (copy / LOCK_NAME).exists()
    assert shard_files(str(copy)) == ref_files


def _rewrite_cell(cache_dir: Path, shard: int, column: str, change) -> None:
    """Change one tensor of every row of a shard and commit the shard as if a teacher had written it (checksum
    and manifest updated): what verify must catch by value, not by checksum."""
    import pyarrow as pa

    from teachers.cache import shard_entry, table_to_bytes
    from teachers.codec import decode, encode

    cache = TeacherCache.open(str(cache_dir))
    table = cache.read_shard(shard)
    cells = []
    for cell in table.column(column).to_pylist():
        cells.append(encode(change(decode(cell)), cell["codec"]))
    arr = pa.StructArray.from_arrays(
        [pa.array([c[k] for c in cells], table.schema.field(column).type.field(k).type)
         for k in ("codec", "shape", "data", "aux", "index")],
        fields=list(table.schema.field(column).type))
    table = table.set_column(table.schema.get_field_index(column), column, arr)
    data = table_to_bytes(table, cache.shard_meta(shard))
    entry = cache.manifest["shards"][f"{shard:05d}"]
    (cache_dir / "shards" / entry["file"]).write_bytes(data)
    cache.manifest["shards"][f"{shard:05d}"] = shard_entry(shard, data, entry["rows"], tuple(entry["images"]))
    cache.write_manifest(force=True)


def test_verify_passes_a_sound_fp16_cache_from_other_threads_and_catches_a_changed_value(setup, reference, tmp_path):
    """The precompute ran with 1 thread; verify recomputes with 2, whose last float bits differ: a sound cache
    still verifies. A value changed by a little more than one fp16 step at its magnitude is caught, and so is a
    changed teacher."""
    import shutil

    d, images, ann = setup
    report, _, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(report.cache, copy)
    torch.set_num_threads(2)
    v = verify_cache(str(copy), sample=8)
    assert v["ok"] and v["checked"] == 16, v  # 8 images x 2 views
    assert 0 < v["max_abs_error"]["features/p3"] < 0.05

    def bump(x):
        x = x.copy()
        x.flat[int(np.argmax(np.abs(x)))] *= 1.01  # about 4 fp16 steps at the largest magnitude
        return x

    _rewrite_cell(copy, 1, "features/p3", bump)
    v = verify_cache(str(copy), sample=8)
    assert not v["ok"] and any("features/p3 differs" in p for p in v["problems"]), v
    assert all("features/p3" in p for p in v["problems"]), v["problems"]  # nothing else is blamed
    # The teacher retrained in place (the manifest's checkpoint path now holds other weights).
    save_teacher(tmp_path / "retrained.pt", seed=1)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["teacher"]["checkpoint"] = str(tmp_path / "retrained.pt")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    v = verify_cache(str(copy), sample=2)
    assert not v["ok"] and "teacher checkpoint changed" in v["problems"][0], v


def test_a_projected_cache_from_the_actors_verifies_rebuilds_alike_and_a_changed_component_is_caught(
        setup, tmp_path, ray_session):
    """compression.pca on Ray: the driver fits the projection once, the actors' I/O processes encode with it,
    verify compares in the stored components, and a rebuilt shard is byte for byte the one it replaces."""
    import shutil

    d, images, ann = setup
    comp = CompressionConfig(dtype="int8", pca=4, pca_images=8)
    (report,) = precompute(job(d, images, ann, str(tmp_path / "pca"), targets=["features"], compression=comp),
                           progress=False)
    cache = TeacherCache.open(report.cache)
    assert cache.projection().channels == 4 and set(cache.manifest["projection"]["residual"]) == {
        "p3", "p4", "p5", "p6", "p7"}
    v = verify_cache(report.cache, sample=4)
    assert v["ok"] and v["checked"] == 8, v
    # Through Ray's object store the shards are held as components; readers give either space.
    from teachers.readers import ObjectStoreShards

    ids, view = cache.image_ids()[:3], ["h128w128f0"] * 3
    with ObjectStoreShards(report.cache, budget_bytes=1 << 24) as store:
        teacher_space = store.reader().rows(ids, view)
        components = store.reader(components=True).rows(ids, view)
    for a, b, c in zip(CacheReader(report.cache).rows(ids, view), teacher_space, components):
        assert np.array_equal(a["features/p3"], b["features/p3"]) and c["features/p3"].shape[0] == 4
        assert np.allclose(cache.projection().reconstruct("p3", c["features/p3"]), a["features/p3"], atol=1e-6)
    files = shard_files(report.cache)
    copy = tmp_path / "copy"
    shutil.copytree(report.cache, copy)
    (copy / "shards" / "shard-00001.parquet").unlink()
    TeacherCache.open(str(copy)).invalidate(1)
    rebuild(str(copy), [1])
    assert shard_files(str(copy)) == files

    def bump(z):  # one stored component, by far more than its int8 step
        z = z.copy()
        z.flat[int(np.argmax(np.abs(z)))] *= 1.2
        return z

    _rewrite_cell(copy, 1, "features/p3", bump)
    v = verify_cache(str(copy), sample=8)
    assert not v["ok"] and all("features/p3" in p for p in v["problems"]), v


def test_second_writer_is_refused_and_a_stale_lock_taken_over(setup, reference, tmp_path, caplog):
    import shutil
    import socket
    import subprocess

    d, images, ann = setup
    report, ref_files, _ = reference
    shutil.copytree(d / "ref", tmp_path / "root")  # a complete cache: a precompute that gets the lock is quick
    (cache_dir,) = find_caches(str(tmp_path / "root"))
    lock_file = Path(cache_dir, LOCK_NAME)
    other = subprocess.Popen(["sleep", "120"])  # stands for another precompute process on this host
    try:
        lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                         "started": "2030-01-01T00:00:00+0000", "command": "curriculum precompute x"}))
        with pytest.raises(CacheLockedError) as e:
            precompute(job(d, images, ann, str(tmp_path / "root")), progress=False)
        msg = str(e.value)
        assert cache_dir in msg and f"pid {other.pid}" in msg and "2030-01-01" in msg and "Wait for that writer" in msg
        with pytest.raises(CacheLockedError, match=f"pid {other.pid}"):
            rebuild(cache_dir, [0])
        assert json.loads(lock_file.read_text())["pid"] == other.pid  # the holder's lock is left alone
        assert CacheReader(cache_dir).rows([open_dataset(images, ann, 128).image_ids[0]], ["h128w128f0"])  # readers
    finally:
        other.kill()
        other.wait()
    # The holder died without releasing: its lock is stale, taken over with a warning, released at the end.
    with caplog.at_level("WARNING", logger="teachers.cache"):
        (again,) = precompute(job(d, images, ann, str(tmp_path / "root")), progress=False)
    assert "taking over the writer lock" in caplog.text and again.computed == [] and again.already_done == 4
    assert not lock_file.exists() and shard_files(cache_dir) == ref_files


def test_serving_equals_inline_and_survives_a_killed_actor(setup, ray_session):
    d, images, ann = setup
    from teachers.zoo import load_detector

    targets = ["features", "head", "detections"]
    inline = InlineTeacher(load_detector(d / "teacher.pt"), targets)
    ds = open_dataset(images, ann, 128)
    batches = []
    for b in range(0, 8, 2):
        samples = [ds[i] for i in range(b, b + 2)]
        batches.append(([s[0] for s in samples], [s[1] for s in samples]))
    server = TeacherServer(str(d / "teacher.pt"), targets, actors=2, cpus_per_actor=0.5, threads=1)
    try:
        seen = []
        for step, (imgs, tgts, tt) in enumerate(prefetch(server, batches)):
            ids = [t["image_id"] for t in tgts]
            assert tt.image_ids == ids  # never another image's targets
            ref = inline(imgs, ids)
            for lvl in ref.features:
                assert torch.equal(tt.features[lvl], ref.features[lvl])
            for a, b in zip(tt.cls_logits, ref.cls_logits):
                assert torch.equal(a, b)
            for a, b in zip(tt.detections, ref.detections):
                assert all(torch.equal(a[k], b[k]) for k in a)
            seen += ids
            if step == 0:
                # Kill the actor that the batch after next goes to (round robin): that request fails and is resent
                # to another actor; the dead one is replaced.
                ray_session.kill(server.actors[1], no_restart=True)
        assert seen == [int(i) for i in ds.image_ids]
        assert server.retries >= 1 and server.replaced >= 1
        # An answer for other images is refused.
        r1 = server.submit(batches[0][0], [t["image_id"] for t in batches[0][1]], [t["view"] for t in batches[0][1]])
        r2 = server.submit(batches[1][0], [t["image_id"] for t in batches[1][1]], [t["view"] for t in batches[1][1]])
        r1.ref = r2.ref
        with pytest.raises(DataError, match="another batch"):
            r1.result()
    finally:
        server.shutdown()


def test_cli_precompute_inspect_verify(setup, tmp_path, capsys, ray_session):
    from curriculum.cli import main

    d, images, ann = setup
    cfg = {
        "data": {"root": str(d), "builtin": "none", "train_images": images, "train_annotations": ann},
        "teachers": [{"checkpoint": str(d / "teacher.pt"), "actors": 1, "cpus_per_actor": 0.5, "threads": 1}],
        "cache": {"root": str(tmp_path / "cache"), "shard_size": 4, "targets": ["features", "detections"],
                  "levels": ["p4"], "compression": {"dtype": "int8", "features_region": "boxes"}},
    }
    path = tmp_path / "precompute.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path, PrecomputeJobConfig).teachers[0].actors == 1
    assert main(["precompute", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    (cache_dir,) = find_caches(str(tmp_path / "cache"))
    assert cache_dir in out
    assert main(["cache", "inspect", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "features" in out and "KiB per image" in out
    assert main(["cache", "verify", cache_dir, "--sample", "2"]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "cache": {**cfg["cache"], "targets": ["logits"]}}))
    assert main(["precompute", str(bad)]) == 2
    assert "cache.targets" in capsys.readouterr().err
