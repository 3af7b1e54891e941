"""The teacher cache without Ray: codecs, shards, manifest, reader, stale and corrupt caches (issue 3)."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from curriculum.config import CacheConfig, CompressionConfig
from curriculum.data import View
from curriculum.errors import CacheError, CacheLockedError, ConfigError, CorruptShardError, DataError, StaleCacheError
from curriculum.files import resolve_fs
from teachers.cache import (
    CacheKey, TeacherCache, data_fingerprint, format_inspect, inspect_cache, shard_entry, shard_ranges, table_to_bytes,
    target_spec, teacher_fingerprint, view_config,
)
from teachers.codec import decode, encode, region_mask, score_keep
from teachers.lock import LOCK_NAME, CacheWriterLock
from teachers.outputs import teacher_outputs
from teachers.precompute import (
    encode_shard, ensure_projection, load_samples, open_dataset, produce_shard, shard_batches, view_sample,
)
from teachers.readers import CacheReader
from teachers.zoo import build_detector

K = 7


def make_subset(shapes_root: Path, out: Path, n: int) -> tuple[str, str]:
    """The first `n` training images of the shapes data set as their own annotation file (same image folder)."""
    data = json.loads((shapes_root / "train" / "instances.json").read_text())
    data["images"] = data["images"][:n]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return str(shapes_root / "train" / "images"), str(out)


def save_teacher(path: Path, name: str = "retinanet_mobilenetv3_micro", seed: int = 0):
    torch.manual_seed(seed)
    det = build_detector(name, K)
    torch.save(det.checkpoint(), path)
    return det.eval()


def build_cache(root: Path, ckpt: Path, images: str, ann: str, cfg: CacheConfig, batch_size: int = 2,
                only: list[int] | None = None, resize=128) -> TeacherCache:
    """What the Ray driver does, in process: every shard produced, written under a temporary name, committed."""
    det = save_or_load(ckpt)
    ds = open_dataset(images, ann, resize)
    key = CacheKey(det.config.name, teacher_fingerprint(ckpt), data_fingerprint(ds), view_config(resize, cfg.views),
                   target_spec(cfg))
    header = {"teacher": {"name": det.config.name, "checkpoint": str(ckpt), "fingerprint": key.teacher_fp,
                          "kind": det.kind},
              "data": {"images": images, "annotations": ann, "fingerprint": key.data_fp, "on_bad_box": "clip"},
              "batch_size": batch_size}
    cache = TeacherCache.create_or_resume(str(root), key, header, ds.image_ids, cfg.shard_size)
    ranges = shard_ranges(len(ds), cfg.shard_size)
    spec = target_spec(cfg)
    projection = ensure_projection(cache, det, ds)
    for i in (only if only is not None else cache.missing_shards()):
        s, e = ranges[i]
        with ThreadPoolExecutor(max_workers=1) as io:  # the actor's I/O process, as a thread
            rows = produce_shard(det, s, e, cfg.views, spec, batch_size,
                                 lambda idx, view: io.submit(load_samples, ds, idx, view))
            table = encode_shard(rows, spec, projection)
        data = table_to_bytes(table, cache.shard_meta(i))
        cache.commit(i, cache.write_tmp(i, data), shard_entry(i, data, table.num_rows, (s, e)))
    cache.write_manifest(force=True)  # the driver's `finally` (commits throttle manifest writes)
    return cache


def save_or_load(ckpt: Path):
    from teachers.zoo import load_detector

    return load_detector(ckpt).eval()


def reference_rows(det, images: str, ann: str, cfg: CacheConfig, batch_size: int) -> dict[tuple[int, str], dict]:
    """The same teacher in process, on the same forward batches: (image id, view key) -> raw outputs."""
    ds = open_dataset(images, ann, 128)
    out = {}
    for s, e in shard_ranges(len(ds), cfg.shard_size):
        for idx, vname in shard_batches(s, e, cfg.views, batch_size):
            samples = [view_sample(ds, i, vname) for i in idx]
            with torch.no_grad():
                raws = teacher_outputs(det, [x[0] for x in samples], cfg.targets, cfg.levels)
            for (img, boxes, iid, view), raw in zip(samples, raws):
                out[(iid, view.key())] = (raw, boxes, img, view)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~100x faster than two when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def subset(shapes_root, tmp_path_factory):
    return make_subset(shapes_root, tmp_path_factory.mktemp("subset") / "instances.json", 6)


# ------------------------------------------------------------------------------------------------ codecs


@pytest.mark.parametrize("shape", [(8, 5, 6), (40, 7), (0, 7)])
def test_codec_bounds(shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    assert np.array_equal(decode(encode(x, "fp32")), x)
    y = decode(encode(x, "fp16"))
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-11 + 1e-7)
    cell = encode(x, "int8")
    y = decode(cell)
    if x.size:
        ax = -1 if x.ndim == 2 else 0
        other = tuple(a for a in range(x.ndim) if a != ax % x.ndim)
        scale = np.abs(x).max(axis=other, keepdims=True) / 127
        assert np.all(np.abs(y - x) <= scale / 2 * (1 + 1e-5) + 1e-7)
        assert len(cell["data"]) == x.size  # one byte per value


def test_codec_topk_threshold_region_ints():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 9)) * 4 - 3).astype(np.float32)
    y = decode(encode(x, "fp32|topk=3"))
    order = np.argsort(-x, axis=1)
    top = np.take_along_axis(x, order[:, :3], 1)
    assert np.array_equal(np.take_along_axis(y, order[:, :3], 1), top)  # kept: exact
    fill = np.take_along_axis(x, order[:, 3:4], 1)
    rest = np.take_along_axis(y, order[:, 3:], 1)
    assert np.all(rest == fill) and np.all(rest >= np.take_along_axis(x, order[:, 3:], 1))  # upper bound
    y16 = decode(encode(x, "fp16|topk=3"))
    assert np.allclose(np.take_along_axis(y16, order[:, :3], 1), top, rtol=2.0**-11, atol=0)
    assert np.array_equal(decode(encode(x, "fp16|topk=20")), x.astype(np.float16).astype(np.float32))  # k >= K

    t = 0.2
    cell = encode(x, f"fp32|thresh={t}")
    y = decode(cell)
    keep = 1 / (1 + np.exp(-x.max(1))) >= t
    assert 0 < keep.sum() < len(x)
    assert np.array_equal(y[keep], x[keep])
    assert np.all(y[~keep] >= x[~keep]) and np.all(1 / (1 + np.exp(-y[~keep])) < t)
    yq = decode(encode(x, f"int8|thresh={t}"))
    assert np.allclose(yq[keep], x[keep], atol=np.abs(x[keep]).max() / 127)

    f = rng.standard_normal((4, 16, 16)).astype(np.float32)
    m = region_mask(np.array([[10.0, 20.0, 40.0, 50.0]]), (16, 16), (128, 128), 0.5)
    assert m.any() and not m.all()
    y = decode(encode(f, "fp32|region", mask=m))
    assert np.array_equal(y[:, m], f[:, m]) and np.all(y[:, ~m] == 0)
    assert np.all(np.abs(decode(encode(f, "int8|region", mask=m))[:, m] - f[:, m]) <= np.abs(f).max() / 254 + 1e-6)

    ints = np.array([1, 5, 6], np.int64)
    assert np.array_equal(decode(encode(ints, "i64")), ints)


def test_fp16_overflow_is_refused():
    with pytest.raises(DataError, match="float16"):
        encode(np.array([1e6], np.float32), "fp16")


def test_truncated_cell_is_an_error():
    cell = encode(np.ones((3, 4), np.float32), "fp32")
    cell["data"] = cell["data"][:-4]
    with pytest.raises(DataError, match="truncated"):
        decode(cell, "features/p3")


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name,targets", [
    ("retinanet_mobilenetv3_micro", ["features", "head", "detections"]),
    ("fcos_mobilenetv3_micro", ["head"]),
    ("fasterrcnn_mobilenetv3_micro", ["features", "head", "detections", "proposals"]),
])
def test_fp32_cache_equals_in_process_teacher(tmp_path, subset, name, targets):
    images, ann = subset
    det = save_teacher(tmp_path / "t.pt", name)
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=targets, views=["noflip", "flip"], shard_size=4,
                      compression=CompressionConfig(dtype="fp32"))
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg, batch_size=2)
    assert cache.complete and cache.manifest["num_shards"] == 2
    ref = reference_rows(det, images, ann, cfg, batch_size=2)
    reader = CacheReader(cache)
    for (iid, vkey), (raw, _, _, view) in ref.items():
        got = reader.rows([iid], [view])[0]
        assert sorted(got) == sorted(raw)
        for col, a in raw.items():
            assert got[col].dtype == a.dtype and np.array_equal(got[col], a), (iid, vkey, col)
    # A flipped view is the teacher's output on the flipped image, not a flipped output.
    ds = open_dataset(images, ann, 128)
    img, boxes, iid, view = view_sample(ds, 0, "flip")
    assert view.flip and view.key() == "h128w128f1"
    with torch.no_grad():
        direct = teacher_outputs(det, [torch.flip(ds[0][0], dims=(-1,))] + [view_sample(ds, 1, "flip")[0]],
                                 targets)[0]
    got = reader.rows([iid], [view])[0]
    for col in direct:
        assert np.array_equal(got[col], direct[col])

    # TeacherTargets for a batch: batch order, image ids, layouts of teachers/targets.py.
    ids = [int(i) for i in ds.image_ids[:3]]
    views = [ds.view_for(i) for i in range(3)]
    tt = reader.targets(ids, views)
    assert tt.image_ids == ids
    if "features" in targets:
        lvl = next(iter(tt.features))
        assert tt.features[lvl].shape[0] == 3
    if "head" in targets:
        field = "objectness" if name.startswith("faster") else "cls_logits"
        assert len(getattr(tt, field)) == 5 and getattr(tt, field)[0].shape[0] == 3
    if "proposals" in targets:
        assert sum(tt.roi_counts) == tt.roi_class_logits.shape[0] == tt.roi_box_regression.shape[0]
        assert tt.roi_class_logits.shape[1] == K
        props = reader.proposals(ids, views)
        assert [len(p) for p in props] == tt.roi_counts
        # With the teacher's RoI head at hand, cached features of every RoI level give the proposal-sharing scorer.
        scoring = CacheReader(cache, roi_head=det).targets(ids, views)
        cls, reg = scoring.score_rois(props)
        assert torch.allclose(cls, tt.roi_class_logits, atol=1e-5)
    tt.check_finite()


def test_produce_shard_loads_two_batches_ahead_of_the_forward(tmp_path, subset):
    """While the teacher runs batch b, batches b+1 and b+2 are being decoded (LOAD_AHEAD); rows come back in
    table order."""
    images, ann = subset
    det = save_teacher(tmp_path / "t.pt")
    ds = open_dataset(images, ann, 128)
    requested, at_forward = [], []

    class CountingLock:  # entered around each forward: records how many loads were requested by then
        def __enter__(self):
            at_forward.append(len(requested))

        def __exit__(self, *exc):
            return False

    spec = target_spec(CacheConfig(targets=["head"], views=["noflip", "flip"]))
    with ThreadPoolExecutor(max_workers=1) as io:
        def load(idx, view):
            requested.append((list(idx), view))
            return io.submit(load_samples, ds, idx, view)

        rows = produce_shard(det, 0, 6, ["noflip", "flip"], spec, 2, load, forward_lock=CountingLock())
    batches = shard_batches(0, 6, ["noflip", "flip"], 2)
    assert requested == [(list(i), v) for i, v in batches]  # each batch loaded once, in forward order
    assert at_forward == [min(b + 3, len(batches)) for b in range(len(batches))]
    assert [(r["image_id"], r["view"]["flip"]) for r in rows] == [
        (int(ds.image_ids[i]), f) for i in range(6) for f in (False, True)]


@pytest.mark.parametrize("comp", [
    CompressionConfig(dtype="fp16"),
    CompressionConfig(dtype="int8"),
    CompressionConfig(dtype="fp16", logits="topk", topk=2),
    CompressionConfig(dtype="fp32", logits="threshold", score_threshold=0.3),
    CompressionConfig(dtype="fp32", features_region="boxes", box_dilation=0.25),
    CompressionConfig(dtype="fp32", features_region="pooled", pool=2),
], ids=["fp16", "int8", "topk", "threshold", "boxes", "pooled"])
def test_compressed_cache_within_stated_rounding(tmp_path, subset, comp):
    images, ann = subset
    det = save_teacher(tmp_path / "t.pt")
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=["features", "head", "detections"], views=["noflip"],
                      shard_size=6, levels=["p3", "p4"], compression=comp)
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg, batch_size=3)
    reader = CacheReader(cache)
    checked = 0
    for (iid, _), (raw, boxes, _, view) in reference_rows(det, images, ann, cfg, 3).items():
        got = reader.rows([iid], [view])[0]
        assert not any(c.startswith("features/p5") for c in got)  # levels honoured
        for col, a in raw.items():
            g = got[col]
            if col.startswith("detections/"):
                assert np.array_equal(g, a)
                continue
            if col.startswith("features/") and comp.features_region == "pooled":
                pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(a)[None], 2, 2, ceil_mode=True)[0].numpy()
                assert g.shape == pooled.shape and np.allclose(g, pooled, atol=1e-6)
                continue
            if col.startswith("features/") and comp.features_region == "boxes":
                m = region_mask(boxes, a.shape[1:], (128, 128), 0.25)
                assert np.array_equal(g[:, m], a[:, m]) and np.all(g[:, ~m] == 0)
                continue
            if col.startswith("head/cls_logits/") and comp.logits == "topk":
                order = np.argsort(-a, axis=1)
                kept_g, kept_a = np.take_along_axis(g, order[:, :2], 1), np.take_along_axis(a, order[:, :2], 1)
                assert np.allclose(kept_g, kept_a, rtol=2.0**-11, atol=1e-7)
                assert np.all(np.take_along_axis(g, order[:, 2:], 1) >= np.take_along_axis(a, order[:, 2:], 1))
                continue
            if col.startswith("head/cls_logits/") and comp.logits == "threshold":
                keep = a.max(1) >= math.log(0.3 / 0.7)
                assert np.array_equal(g[keep], a[keep]) and np.all(g[~keep] >= a[~keep])
                continue
            if comp.dtype == "fp16":
                assert np.all(np.abs(g - a) <= np.abs(a) * 2.0**-11 + 1e-7), col
            elif comp.dtype == "int8":
                ax = -1 if a.ndim == 2 else 0
                other = tuple(d for d in range(a.ndim) if d != ax % a.ndim)
                scale = np.abs(a).max(axis=other, keepdims=True) / 127 if a.size else 0
                assert np.all(np.abs(g - a) <= scale / 2 * (1 + 1e-5) + 1e-7), col
            else:
                assert np.array_equal(g, a), col
        checked += 1
    assert checked == 6
    info = inspect_cache(cache.uri)
    assert info["complete"] and info["images_done"] == 6
    assert set(info["bytes_per_image_by_kind"]) >= {"features", "head", "detections"}
    assert "KiB per image" in format_inspect(info)


def _hand_pca(maps: list[np.ndarray], r: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, projector onto the top r principal directions and the variance share left out, by an SVD of the
    centred cells (the code under test uses an eigendecomposition of accumulated second moments)."""
    x = np.concatenate([m.reshape(m.shape[0], -1).T for m in maps]).astype(np.float64)  # cells x C
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, vt[:r].T @ vt[:r], float((s[r:] ** 2).sum() / (s ** 2).sum())


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_pca_cache_keeps_the_teachers_features_in_the_fitted_subspace(tmp_path, subset, dtype):
    """compression.pca: 4 of the teacher's channels stored per level, fitted on all 6 images; the features read
    back are the live ones projected on the principal subspace of those images (by hand), in the teacher's
    channels; verify's comparison space gives the stored maps back; a damaged projection file is named."""
    images, ann = subset
    det = save_teacher(tmp_path / "t.pt")
    comp = CompressionConfig(dtype=dtype, pca=4, pca_images=6)
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=["features", "head"], views=["noflip", "flip"],
                      shard_size=3, levels=["p3", "p4"], compression=comp)
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg, batch_size=3)
    ref = reference_rows(det, images, ann, cfg, 3)
    reader = CacheReader(TeacherCache.open(cache.uri))
    p = reader.cache.projection()
    for level in ("p3", "p4"):
        mu, proj, left_out = _hand_pca([raw[f"features/{level}"] for raw, _, _, v in ref.values() if not v.flip], 4)
        assert p.residual[level] == pytest.approx(left_out, rel=1e-4, abs=1e-7)
        assert np.allclose(p.mean[level], mu, atol=1e-5)
        for (iid, _), (raw, _, _, view) in ref.items():
            a = raw[f"features/{level}"]
            want = (mu[:, None] + proj @ (a.reshape(a.shape[0], -1) - mu[:, None])).reshape(a.shape)
            got = reader.rows([iid], [view])[0][f"features/{level}"]
            assert got.shape == a.shape  # the teacher's channels, not 4
            z = p.project(level, a)
            step = np.abs(z).max(axis=(1, 2)).max() / 127 if dtype == "int8" else 0.0
            # int8 rounds the stored components by half a step each; the basis' columns have unit norm
            assert np.abs(got - want).max() <= 2 * step + 1e-4 * max(1.0, np.abs(a).max()), (level, iid)
            assert np.allclose(p.project(level, got), p.project(level, p.reconstruct(level, z)), atol=2 * step + 1e-4)
    assert "pca" not in target_spec(CacheConfig())["compression"]  # keys (so folders) of existing caches kept
    info = inspect_cache(cache.uri)
    assert info["projection"]["channels"] == 4 and "variance left out: p3" in format_inspect(info)
    # The stored maps have 4 channels: smaller than the plain cache of the same dtype.
    plain = build_cache(tmp_path / "plain", tmp_path / "t.pt", images, ann,
                        CacheConfig(**{**cfg.__dict__, "compression": CompressionConfig(dtype=dtype)}), batch_size=3)
    assert inspect_cache(cache.uri)["bytes_per_image_by_kind"]["features"] < \
        0.5 * inspect_cache(plain.uri)["bytes_per_image_by_kind"]["features"]
    path = Path(cache.uri) / "projection.npz"
    path.write_bytes(path.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(CacheError, match="projection.npz: the feature projection does not match its checksum"):
        CacheReader(TeacherCache.open(cache.uri)).rows([iid], [view])


def test_a_student_distils_from_the_principal_components_with_adapters_of_as_many_channels(tmp_path, subset):
    """cache.features: components: the reader gives the stored components (r channels, the live features
    projected, within half int8's step), the link says r channels, MGD's generation blocks are built with r outputs,
    and its loss on a real batch against the components trains them."""
    from trainers.distillation import DistillStep, build_student, open_teacher, stage_source

    images, ann = subset
    det = save_teacher(tmp_path / "t.pt")
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=["features"], views=["noflip"], shard_size=6,
                      levels=["p3", "p4"], compression=CompressionConfig(dtype="int8", pca=4, pca_images=6))
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg, batch_size=3)
    reader = CacheReader(cache.uri, components=True)
    p = reader.projection
    (iid, _), (raw, _, _, view) = next(iter(reference_rows(det, images, ann, cfg, 3).items()))
    z = reader.rows([iid], [view])[0]["features/p3"]
    live = p.project("p3", raw["features/p3"])
    assert z.shape == live.shape == (4, 16, 16)
    assert np.abs(z - live).max() <= np.abs(live).max(axis=(1, 2)).max() / 127 * 0.5 * (1 + 1e-5) + 1e-6
    assert reader.feature_channels() == {"p3": 4, "p4": 4}
    with pytest.raises(CacheError, match="no compression.pca"):
        plain = build_cache(tmp_path / "plain", tmp_path / "t.pt", images, ann,
                            CacheConfig(**{**cfg.__dict__, "compression": CompressionConfig(dtype="fp16")}))
        CacheReader(plain.uri, components=True)

    link = open_teacher({"name": det.config.name, "checkpoint": str(tmp_path / "t.pt"), "cache": cache.uri,
                         "components": True})
    assert link.level_channels == {"p3": 4, "p4": 4}
    student, distiller = build_student("fcos_mobilenetv3_micro", det.config.class_names or ["bg"] + ["c"] * (K - 1),
                                       0, image_size=128, overrides={}, losses=[{"name": "mgd", "levels": ["p3"]}],
                                       teachers=[link])
    term = next(iter(distiller.terms.values()))
    assert term.generation["p3"][-1].out_channels == 4
    ds = open_dataset(images, ann, 128)
    image, target = ds[0]
    step = DistillStep(stage_source([link], distiller), distiller, generator=torch.Generator().manual_seed(0))
    out = student([image], [target], want=("losses", "features", "head"))
    terms = step(out, [target], [image])
    (name,) = [k for k in terms if k.startswith("distill_")]
    assert torch.isfinite(terms[name]) and terms[name] > 0
    terms[name].backward()
    assert term.generation["p3"][-1].weight.grad.abs().sum() > 0


def test_pca_needs_fewer_channels_than_the_teacher_and_is_refused_with_box_regions():
    from teachers.projection import fit_projection

    with pytest.raises(CacheError, match="compression.pca: 8 channels is not fewer than the teacher's 8 at p3"):
        fit_projection(lambda pos: [{"features/p3": np.ones((8, 2, 2), np.float32)} for _ in pos], [0], 8)
    with pytest.raises(ConfigError, match="features_region: boxes is not supported"):
        CompressionConfig(pca=4, features_region="boxes")


# ------------------------------------------------------------------------------------------------ stale, corrupt


def test_stale_cache_is_never_used(tmp_path, subset):
    images, ann = subset
    save_teacher(tmp_path / "t.pt", seed=0)
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=["detections"], shard_size=6)
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg)
    key = CacheKey(**{k: v for k, v in cache.manifest["key"].items()})
    assert TeacherCache.open_for(str(tmp_path / "cache"), key).complete

    save_teacher(tmp_path / "t.pt", seed=1)  # retrained teacher, same path
    newkey = CacheKey(key.teacher, teacher_fingerprint(tmp_path / "t.pt"), key.data_fp, key.views, key.spec)
    with pytest.raises(StaleCacheError, match="teacher checkpoint changed"):
        TeacherCache.open_for(str(tmp_path / "cache"), newkey)
    with pytest.raises(StaleCacheError, match="teacher_fp"):
        cache.check_key(newkey)

    data = json.loads(Path(ann).read_text())
    data["annotations"] = data["annotations"][1:]
    ann2 = tmp_path / "changed.json"
    ann2.write_text(json.dumps(data))
    dkey = CacheKey(key.teacher, key.teacher_fp, data_fingerprint(open_dataset(images, str(ann2), 128)), key.views,
                    key.spec)
    assert dkey.data_fp != key.data_fp
    with pytest.raises(StaleCacheError, match="the data changed"):
        TeacherCache.open_for(str(tmp_path / "cache"), dkey)
    with pytest.raises(CacheError, match="no teacher cache"):
        TeacherCache.open_for(str(tmp_path / "elsewhere"), key)


def test_corrupt_or_truncated_shard_is_named(tmp_path, subset):
    images, ann = subset
    save_teacher(tmp_path / "t.pt")
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=["features"], levels=["p5"], shard_size=2,
                      compression=CompressionConfig(dtype="fp32"))
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg)
    ds = open_dataset(images, ann, 128)
    ids = [int(i) for i in ds.image_ids]
    good = CacheReader(cache).rows(ids, [ds.view_for(i) for i in range(6)])
    p = Path(cache.shard_path(1))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet.*truncated") as e:
        CacheReader(TeacherCache.open(cache.uri)).rows([ids[2]], [ds.view_for(2)])
    assert e.value.shard == 1 and "rebuild" in str(e.value)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(flipped))
    with pytest.raises(CorruptShardError, match="checksum"):
        CacheReader(TeacherCache.open(cache.uri)).rows([ids[3]], [ds.view_for(3)])
    # Shard 0 still reads; rebuilding shard 1 alone restores the same bytes.
    assert np.array_equal(CacheReader(TeacherCache.open(cache.uri)).rows([ids[0]], [ds.view_for(0)])[0]["features/p5"],
                          good[0]["features/p5"])
    cache = TeacherCache.open(cache.uri)
    cache.invalidate(1)
    assert cache.missing_shards() == [1] and not p.exists()
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg)
    assert p.read_bytes() == raw


def test_reader_errors_and_orphan_adoption(tmp_path, subset):
    images, ann = subset
    save_teacher(tmp_path / "t.pt")
    cfg = CacheConfig(root=str(tmp_path / "cache"), targets=["detections"], shard_size=4)
    cache = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg, only=[0])
    with pytest.raises(CacheError, match="not complete"):
        CacheReader(cache)
    # A shard renamed into place whose manifest entry was lost (driver killed between rename and manifest write).
    full = build_cache(tmp_path / "cache", tmp_path / "t.pt", images, ann, cfg, only=[1])
    entry = full.manifest["shards"].pop("00001")
    full.write_manifest(force=True)
    reopened = TeacherCache.open(full.uri)
    assert reopened.missing_shards() == [1]
    assert reopened.adopt_orphans() == [1]
    assert reopened.manifest["shards"]["00001"]["sha256"] == entry["sha256"] and reopened.complete
    assert not list(Path(reopened.path, "shards").glob("*.tmp-*"))
    reader = CacheReader(reopened)
    ds = open_dataset(images, ann, 128)
    with pytest.raises(CacheError, match="no view h128w128f1"):
        reader.rows([ds.image_ids[0]], [View(128, 128, 128, 128, True)])
    with pytest.raises(DataError, match="not in teacher cache"):
        reader.rows([10**9], ["h128w128f0"])
    with pytest.raises(StaleCacheError, match="cached for view"):
        reader.rows([ds.image_ids[0]], [View(64, 64, 128, 128, False)])


# ------------------------------------------------------------------------------------------------ sparse boxes


def test_codec_rows_keeps_rows_and_fills_the_rest():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((60, 4)) * 2).astype(np.float32)
    keep = rng.random(60) < 0.3
    assert 0 < keep.sum() < 60
    cell = encode(x, "fp32|rows", mask=keep, fill=0.0)
    y = decode(cell)
    assert np.array_equal(y[keep], x[keep]) and np.all(y[~keep] == 0.0)
    assert len(cell["data"]) == 4 * 4 * keep.sum() and len(cell["index"]) == 8  # kept rows + one bit per row
    y = decode(encode(x, "fp16|rows", mask=keep, fill=-1.5))
    assert np.all(np.abs(y[keep] - x[keep]) <= np.abs(x[keep]) * 2.0**-11 + 1e-7) and np.all(y[~keep] == -1.5)
    y = decode(encode(x, "int8|rows", mask=keep))
    scale = np.abs(x[keep]).max(axis=0) / 127  # per column, over the kept rows only
    assert np.all(np.abs(y[keep] - x[keep]) <= scale / 2 * (1 + 1e-5) + 1e-7) and np.all(y[~keep] == 0)
    for m in (np.zeros(60, bool), np.ones(60, bool)):
        assert np.array_equal(decode(encode(x, "fp32|rows", mask=m))[m], x[m])
    assert np.all(decode(encode(x, "int8|rows", mask=np.zeros(60, bool))) == 0)
    with pytest.raises(ValueError, match="rows needs"):
        encode(x, "fp32|rows", mask=keep[:10])
    cell = encode(x, "fp32|rows", mask=keep)
    cell["data"] = cell["data"][:-4]
    with pytest.raises(DataError, match="truncated"):
        decode(cell, "head/bbox_regression/0")


def test_sparse_boxes_round_trip_and_are_smaller(tmp_path, subset):
    images, ann = subset
    det = save_teacher(tmp_path / "t.pt", "fcos_mobilenetv3_micro")
    base = dict(targets=["head"], views=["noflip"], shard_size=6)
    ref = reference_rows(det, images, ann, CacheConfig(root="x", **base), 3)
    # A threshold that keeps about half the locations of this (untrained) teacher, so both sides are tested.
    best = np.concatenate([raw[c].max(1) for raw, *_ in ref.values() for c in raw if c.startswith("head/cls_logits/")])
    t = float(1 / (1 + np.exp(-np.median(best))))
    comp = dict(dtype="fp16", logits="threshold", score_threshold=t)
    dense_cfg = CacheConfig(root=str(tmp_path / "dense"), compression=CompressionConfig(**comp), **base)
    sparse_cfg = CacheConfig(root=str(tmp_path / "sparse"), compression=CompressionConfig(**comp, boxes="sparse"),
                             **base)
    assert "boxes" not in target_spec(dense_cfg)["compression"]  # keys of caches written before the option
    assert target_spec(sparse_cfg)["compression"]["boxes"] == "sparse"
    dense = build_cache(tmp_path / "dense", tmp_path / "t.pt", images, ann, dense_cfg, batch_size=3)
    sparse = build_cache(tmp_path / "sparse", tmp_path / "t.pt", images, ann, sparse_cfg, batch_size=3)
    reader = CacheReader(sparse)
    kept = total = 0
    for (iid, _), (raw, _, _, view) in ref.items():
        got = reader.rows([iid], [view])[0]
        assert sorted(got) == sorted(raw)
        for col, a in raw.items():
            g = got[col]
            kind, field, level = col.split("/")
            if field == "cls_logits":
                continue  # the threshold codec, tested above
            assert field in ("bbox_regression", "bbox_ctrness"), col
            keep = score_keep(raw[f"head/cls_logits/{level}"], t)
            assert g.shape == a.shape and keep.shape == (a.shape[0],)
            kept, total = kept + keep.sum(), total + keep.size
            assert np.all(np.abs(g[keep] - a[keep]) <= np.abs(a[keep]) * 2.0**-11 + 1e-7), col  # fp16 bound
            if field == "bbox_regression":
                assert np.all(g[~keep] == 0.0), col  # the documented fill
            elif (~keep).any():
                assert np.all(g[~keep] == np.float32(a[~keep].mean(dtype=np.float64))), col
    assert 0.2 < kept / total < 0.8
    d, s = inspect_cache(dense.uri), inspect_cache(sparse.uri)
    assert s["bytes_per_image_by_kind"]["head"] < 0.9 * d["bytes_per_image_by_kind"]["head"]
    assert s["bytes_per_image"] < d["bytes_per_image"]


# ------------------------------------------------------------------------------------------------ writer lock


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_writer_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path, caplog):
    import os
    import socket
    import subprocess
    import sys

    folder = tmp_path / "cache"
    fs, path = resolve_fs(str(folder))
    lock_file = folder / LOCK_NAME

    # Another live process holds it: refused, naming the folder and the holder; readers never look at it.
    code = ("import sys, time; from teachers.lock import CacheWriterLock; from curriculum.files import resolve_fs; "
            "CacheWriterLock(*resolve_fs(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
    try:
        assert holder.stdout.readline().strip() == "locked"
        rec = json.loads(lock_file.read_text())
        assert rec["pid"] == holder.pid and rec["host"] == socket.gethostname() and rec["started"]
        with pytest.raises(CacheLockedError) as e:
            CacheWriterLock(fs, path).acquire()
        msg = str(e.value)
        assert str(folder) in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert rec["started"] in msg and "Wait for that writer" in msg and str(lock_file) in msg
        # Killed without a chance to clean up: its lock is stale and the next writer takes it over.
        holder.kill()
        holder.wait()
        with caplog.at_level("WARNING", logger="teachers.cache"):
            with CacheWriterLock(fs, path) as lock:
                assert json.loads(lock_file.read_text())["pid"] == os.getpid() and lock.held
        assert "taking over the writer lock" in caplog.text and f"pid {holder.pid}" in caplog.text
        assert not lock_file.exists()  # released
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    # The same process twice (e.g. the same teacher named twice): refused, with that hint.
    first = CacheWriterLock(fs, path).acquire()
    with pytest.raises(CacheLockedError, match="This process holds it already"):
        CacheWriterLock(fs, path).acquire()
    first.release()
    first.release()  # idempotent
    assert not lock_file.exists()

    # A pid that no longer exists on this host: stale. A lock of another host is never judged from here.
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
    CacheWriterLock(fs, path).acquire().release()
    assert not lock_file.exists()
    lock_file.write_text(json.dumps({"host": "elsewhere.example", "pid": _dead_pid(), "started": "then"}))
    with pytest.raises(CacheLockedError, match="host elsewhere.example.*delete .*writer.lock"):
        CacheWriterLock(fs, path).acquire()
    # An empty lock file: a writer between creating and filling it (refused), or one that died there (stale).
    lock_file.write_text("")
    with pytest.raises(CacheLockedError):
        CacheWriterLock(fs, path).acquire()
    os.utime(lock_file, (1, 1))
    CacheWriterLock(fs, path).acquire().release()
    assert not lock_file.exists()
