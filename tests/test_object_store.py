"""Hot teacher targets through Ray's object store within a byte budget (`ObjectStoreShards`, issue 3)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from curriculum.config import CacheConfig, CompressionConfig
from curriculum.errors import CacheError, CorruptShardError
from teachers.cache import TeacherCache
from teachers.precompute import open_dataset
import teachers.readers
from teachers.readers import CacheReader, ObjectStoreReader, ObjectStoreShards, decode_shard
from test_cache import build_cache, make_subset, one_thread, save_teacher  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def cache(shapes_root, tmp_path_factory):
    """6 images x 2 views in 3 shards of 2 images: features (two levels), head, detections; fp16, top-3 logits."""
    d = tmp_path_factory.mktemp("object_store")
    images, ann = make_subset(shapes_root, d / "instances.json", 6)
    save_teacher(d / "t.pt")
    cfg = CacheConfig(root=str(d / "cache"), targets=["features", "head", "detections"], levels=["p3", "p4"],
                      views=["noflip", "flip"], shard_size=2,
                      compression=CompressionConfig(dtype="fp16", logits="topk", topk=3))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = build_cache(d / "cache", d / "t.pt", images, ann, cfg, batch_size=2)
    finally:
        torch.set_num_threads(n)
    return c, open_dataset(images, ann, 128)


def every_row(ds) -> list[tuple[int, object]]:
    """(image id, View) of every image in both cached views."""
    out = []
    for i in range(len(ds)):
        v = ds.view_for(i)
        out.append((int(ds.image_ids[i]), v))
        out.append((int(ds.image_ids[i]), type(v)(v.orig_h, v.orig_w, v.out_h, v.out_w, True)))
    return out


def assert_rows_equal(got: dict, want: dict, what: object) -> None:
    assert sorted(got) == sorted(want), what
    for col, a in want.items():
        assert got[col].dtype == a.dtype and np.array_equal(got[col], a), (what, col)


def test_object_store_serves_what_the_cache_reader_serves(cache, ray_session):
    c, ds = cache
    direct = CacheReader(c)
    with ObjectStoreShards(c, budget_bytes=1 << 30) as store:
        reader = store.reader()
        assert reader.manifest == direct.manifest and reader.image_ids() == direct.image_ids()
        assert reader.view_keys == direct.view_keys
        for iid, view in every_row(ds):
            (got,), (want,) = reader.rows([iid], [view]), direct.rows([iid], [view])
            assert_rows_equal(got, want, (iid, view))
            # Zero copy: the arrays are read-only views of the object store's shared memory.
            assert not any(a.flags.writeable for a in got.values() if a.size)
        # The batch interface a trainer calls, for a collated batch across two shards.
        batch = [ds[i][1] for i in (5, 0, 3)]
        tt, ref = reader.targets_for(batch), direct.targets_for(batch)
        assert tt.image_ids == ref.image_ids == [int(t["image_id"]) for t in batch]
        for lvl in ref.features:
            assert torch.equal(tt.features[lvl], ref.features[lvl])
        for a, b in zip(tt.cls_logits + tt.bbox_regression, ref.cls_logits + ref.bbox_regression):
            assert torch.equal(a, b)
        for a, b in zip(tt.detections, ref.detections):
            assert all(torch.equal(a[k], b[k]) for k in a)
        tt.cls_logits[0].add_(1.0)  # targets are the batch's own tensors: writable, the store is untouched
        assert_rows_equal(reader.rows([batch[0]["image_id"]], [batch[0]["view"]])[0],
                          direct.rows([batch[0]["image_id"]], [batch[0]["view"]])[0], "after a write")
        stats = store.stats()
        assert stats["loads"] == 3 and stats["evictions"] == 0  # each shard decoded once

        # A training worker is another process: it finds the store by name and reads the same rows.
        @ray_session.remote(num_cpus=0.5)
        def worker(name: str, keys: list) -> list:
            from teachers.readers import ObjectStoreReader

            r = ObjectStoreReader(name)
            return [r.rows([iid], [view])[0] for iid, view in keys] + [r.fetches]

        keys = every_row(ds)[::3]
        *rows, fetches = ray_session.get(worker.remote(store.name, keys))
        for (iid, view), got in zip(keys, rows):
            assert_rows_equal(got, direct.rows([iid], [view])[0], (iid, view))
        assert fetches == 3 and store.stats()["loads"] == 3  # served from the store, not decoded again


def test_a_reader_given_memory_keeps_the_shards_that_fit_when_images_come_in_random_order(cache, ray_session):
    """A training worker's images come in random order across its shards: a reader holding one shard fetched a
    shard again for nearly every image; one holding what fits in its memory fetches each shard once."""
    c, ds = cache
    keys = every_row(ds)
    order = np.random.default_rng(0).permutation(len(keys))
    sizes = [decode_shard(c, i)["nbytes"] for i in range(c.manifest["num_shards"])]
    with ObjectStoreShards(c, budget_bytes=1 << 30) as store:
        one, fits = store.reader(), store.reader(memory_bytes=sum(sizes))
        two = store.reader(memory_bytes=max(sizes) + min(sizes))
        for j in order:
            iid, view = keys[j]
            for r in (one, fits, two):
                r.rows([iid], [view])
        assert fits.fetches == len(sizes) == 3
        assert one.fetches > 2 * len(sizes)
        assert len(sizes) < two.fetches <= one.fetches and len(two._local) == 2  # the two it read last


def test_a_cache_bigger_than_the_budget_is_streamed_within_it(cache, ray_session):
    c, ds = cache
    sizes = [decode_shard(c, i)["nbytes"] for i in range(c.manifest["num_shards"])]
    budget = int(1.5 * max(sizes))
    assert budget < 2 * min(sizes)  # room for one shard only: the cache (3 shards) is 2x the budget
    direct = CacheReader(c)
    rng = np.random.default_rng(0)
    keys = every_row(ds)
    with ObjectStoreShards(c, budget_bytes=budget) as store:
        reader = store.reader()
        for epoch in range(2):
            order = rng.permutation(len(keys))  # every (image, view) once per epoch, shards interleaved
            for b in range(0, len(order), 3):
                batch = [keys[j] for j in order[b:b + 3]]
                ids, views = [k[0] for k in batch], [k[1] for k in batch]
                for got, want, k in zip(reader.rows(ids, views), direct.rows(ids, views), batch):
                    assert_rows_equal(got, want, k)
                stats = store.stats()
                assert stats["resident_bytes"] <= budget and len(stats["resident_shards"]) <= 1
        stats = store.stats()
        assert stats["max_resident_bytes"] <= budget
        assert stats["evictions"] > 0 and stats["loads"] > 3  # streamed: shards dropped and decoded again
        assert stats["max_shard_bytes"] == max(sizes)

    # A budget smaller than one shard still works: the store holds the one shard being read (budget + one shard).
    with ObjectStoreShards(c, budget_bytes=1) as store:
        reader = store.reader()
        for iid, view in keys[::2]:
            assert_rows_equal(reader.rows([iid], [view])[0], direct.rows([iid], [view])[0], (iid, view))
        stats = store.stats()
        assert stats["max_resident_bytes"] <= 1 + max(sizes) and len(stats["resident_shards"]) == 1


def test_a_released_store_holds_nothing_and_serves_the_same_rows_again(cache, ray_session):
    """What a sequence does when no later stage reads a teacher: the store drops its shards (found by name, as a
    training worker finds it) and stays up; a shard asked again is decoded again, identical."""
    from teachers.readers import release_shard_store

    c, ds = cache
    keys = every_row(ds)
    direct = CacheReader(c)
    with ObjectStoreShards(c, budget_bytes=1 << 30) as store:
        ids, views = [k[0] for k in keys[:4]], [k[1] for k in keys[:4]]
        store.reader().rows(ids, views)
        held = store.stats()["resident_shards"]
        assert held
        assert release_shard_store(store.name) == len(held)
        stats = store.stats()
        assert stats["resident_bytes"] == 0 and stats["resident_shards"] == []
        for got, want, k in zip(store.reader().rows(ids, views), direct.rows(ids, views), keys[:4]):
            assert_rows_equal(got, want, k)
        assert store.stats()["loads"] == stats["loads"] + len(held)
    assert release_shard_store(store.name) == 0  # closed: nothing to release, no error


def test_a_filling_store_decodes_every_shard_before_any_reader_asks_and_serves_the_same_rows(cache, ray_session):
    """`fill`: the shards are decoded at the start, so a first epoch's reads are all hits; within a budget, the
    fill stops before the next shard would not fit and never evicts."""
    c, ds = cache
    keys = every_row(ds)
    direct = CacheReader(c)
    sizes = [decode_shard(c, i)["nbytes"] for i in range(c.manifest["num_shards"])]
    with ObjectStoreShards(c, budget_bytes=1 << 30, fill=True) as store:
        assert store.filled() == 3
        stats = store.stats()
        assert (stats["loads"], stats["filled"], stats["hits"], stats["resident_shards"]) == (3, 3, 0, [0, 1, 2])
        reader = store.reader()
        for iid, view in keys:
            assert_rows_equal(reader.rows([iid], [view])[0], direct.rows([iid], [view])[0], (iid, view))
        stats = store.stats()
        assert stats["loads"] == 3 and stats["hits"] == 3 and stats["evictions"] == 0  # nothing decoded again
    budget = sizes[0] + sizes[1] + min(sizes) // 2  # two shards fit, the third would not
    with ObjectStoreShards(c, budget_bytes=budget, fill=True) as store:
        assert store.filled() == 2
        stats = store.stats()
        assert stats["resident_shards"] == [0, 1] and stats["evictions"] == 0
        assert stats["resident_bytes"] == sizes[0] + sizes[1] <= budget
    with ObjectStoreShards(c, budget_bytes=1 << 30) as store:  # without fill: nothing until asked
        assert store.filled() == 0 and store.stats()["loads"] == 0


def test_a_release_during_a_fill_keeps_nothing_the_fill_was_decoding(cache, ray_session, monkeypatch):
    """A `release` that overtakes the fill's decode of a shard: the fill stops and the shard is not kept, so the
    store holds nothing after the release (the store's class run in this process, its decode held at shard 0)."""
    c, _ = cache
    decoding, go = threading.Event(), threading.Event()
    real = teachers.readers.decode_shard

    def held_decode(cache_, i, check_sha=True):
        decoding.set()
        assert go.wait(30)
        return real(cache_, i, check_sha)

    monkeypatch.setattr(teachers.readers, "decode_shard", held_decode)
    store = teachers.readers._ShardStoreActor(c.uri, 1 << 30, True)
    filled = []
    fill = threading.Thread(target=lambda: filled.append(store.fill()))
    fill.start()
    assert decoding.wait(30)
    assert store.release() == 0  # nothing decoded yet
    go.set()
    fill.join(30)
    stats = store.stats()
    assert filled == [0] and stats["resident_shards"] == [] and stats["resident_bytes"] == 0
    assert stats["loads"] == 0
    monkeypatch.undo()  # the real decode back
    assert len(store.shard(0)) == 1 and store.stats()["resident_shards"] == [0]  # a reader's ask still decodes


def test_object_store_errors_name_what_to_do(cache, ray_session, tmp_path):
    c, ds = cache
    with pytest.raises(CacheError, match="no teacher shard store named 'nobody'"):
        ObjectStoreReader("nobody")
    # A corrupt shard comes out as the cache's own error (named, with the rebuild command), not a Ray traceback.
    shutil.copytree(c.path, tmp_path / "copy")
    p = tmp_path / "copy" / "shards" / "shard-00001.parquet"
    p.write_bytes(p.read_bytes()[:200])
    with ObjectStoreShards(str(tmp_path / "copy"), budget_bytes=1 << 30) as store:
        reader = store.reader()
        assert reader.rows([ds.image_ids[0]], [ds.view_for(0)])
        with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet.*rebuild"):
            reader.rows([ds.image_ids[2]], [ds.view_for(2)])
    # A fill stops at the corrupt shard, quietly: the reader that asks for it gets the same named error.
    with ObjectStoreShards(str(tmp_path / "copy"), budget_bytes=1 << 30, fill=True) as store:
        assert store.filled() == 1 and store.stats()["fill_error"].startswith("shard 1: CorruptShardError")
        with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet.*rebuild"):
            store.reader().rows([ds.image_ids[2]], [ds.view_for(2)])
    # The owner closed before the readers finished: a clear error, not a hang.
    with pytest.raises(CacheError, match="is gone.*keep ObjectStoreShards open"):
        reader.rows([ds.image_ids[4]], [ds.view_for(4)])
    # An incomplete cache is refused in the driver, before any actor starts.
    partial = TeacherCache.open(str(tmp_path / "copy"))
    partial.invalidate(2)
    with pytest.raises(CacheError, match="not complete"):
        ObjectStoreShards(partial, budget_bytes=1 << 30)
    assert not Path(partial.shard_path(2)).exists()
