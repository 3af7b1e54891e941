"""`curriculum cache verify`: recompute a sample of a cache with the live teacher and compare, within what the
codec and the float noise between machines and thread counts allow."""

from __future__ import annotations

from typing import Any

import numpy as np

from curriculum.config import CompressionConfig
from teachers.cache import TeacherCache, data_fingerprint, teacher_fingerprint
from teachers.codec import FP16_MAX, decode_row, encode_row
from teachers.outputs import load_teacher, teacher_outputs
from teachers.precompute import _work, open_dataset, shard_batches, view_sample
from teachers.readers import CacheReader


def verify_tolerance(codec: str, live: np.ndarray, cached: np.ndarray, atol: float) -> float:
    """How far a sound cached tensor may be from the live one, both decoded through `codec`.

    The live forward here and the precompute's forward (other thread counts, other machine) differ in the last
    float bits, relative `atol` of the largest magnitude; where that noise straddles a rounding boundary of
    the stored representation, the decoded values differ by one step of it: fp16 spacing at the tensor's
    largest magnitude, or int8's largest per-channel scale (max / 127). A corrupt or stale value is off by far
    more than that.
    """
    if not live.size or live.dtype.kind not in "fc":
        return 0.0
    top = max(float(np.abs(live).max()), float(np.abs(cached).max()))
    base = codec.partition("|")[0]
    step = {"fp16": float(np.spacing(np.float16(min(top, FP16_MAX)))), "int8": top / 127.0}.get(base, 0.0)
    return step + atol * max(1.0, top)


def verify_cache(cache_path: str, sample: int = 8, seed: int = 0, atol: float = 1e-4) -> dict[str, Any]:
    """Recompute a random sample of cached rows with the live teacher (in this process) and compare.

    The sampled images are recomputed in the exact forward batches of the precompute, so an fp32 cache matches
    within float noise of the thread count; compressed caches within that plus one step of their codec
    (`verify_tolerance`: the live output goes through the same codec, then both are decoded). Every shard read
    is checksummed.
    """
    cache = TeacherCache.open(cache_path)
    m = cache.manifest
    live_fp = teacher_fingerprint(m["teacher"]["checkpoint"])
    work = _work(cache)
    d = work["data"]
    ds = open_dataset(d["images"], d["annotations"], d["resize"], d["on_bad_box"])
    problems: list[str] = []
    if live_fp != m["key"]["teacher_fp"]:
        problems.append(f"teacher checkpoint changed: fingerprint {live_fp}, cache {m['key']['teacher_fp']}")
    if data_fingerprint(ds) != m["key"]["data_fp"]:
        problems.append("data changed: annotations or image list differ from the cache's")
    if problems:
        return {"ok": False, "problems": problems, "checked": 0}
    projection = cache.projection()
    # compared as stored: a projected cache's components against the live features' components
    reader = CacheReader(cache, memory_bytes=1 << 28, components=projection is not None)
    det = load_teacher(m["teacher"]["checkpoint"])
    comp = CompressionConfig(**m["key"]["spec"]["compression"])
    rng = np.random.default_rng(seed)
    done = [int(k) for k in m["shards"]]
    positions = []
    for s in done:
        a, b = m["shards"][f"{s:05d}"]["images"]
        positions += list(range(a, b))
    chosen = sorted(rng.choice(positions, size=min(sample, len(positions)), replace=False).tolist())
    worst: dict[str, float] = {}
    checked = 0
    loaded: dict = {}
    for p in chosen:
        shard = p // m["shard_size"]
        a, b = m["shards"][f"{shard:05d}"]["images"]
        for idx, view_name in shard_batches(a, b, work["views"], work["batch_size"]):
            if p not in idx:
                continue
            samples = [view_sample(ds, i, view_name, loaded) for i in idx]
            raws = teacher_outputs(det, [s[0] for s in samples], work["spec"]["targets"], work["spec"]["levels"])
            j = idx.index(p)
            image, boxes, iid, view = samples[j]
            cells = encode_row(raws[j], comp, boxes, view.padded_size(), projection)
            live = decode_row(cells)
            stored = reader.rows([iid], [view])[0]
            for name, ref in live.items():
                got = stored.get(name)
                if got is None or got.shape != ref.shape:
                    problems.append(f"image_id {iid} view {view.key()}: {name} shape {None if got is None else got.shape}"
                                    f" cached, {ref.shape} live")
                    continue
                err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
                tol = verify_tolerance(cells[name]["codec"], ref, got, atol)
                worst[name] = max(worst.get(name, 0.0), err)
                if err > tol:
                    problems.append(f"image_id {iid} view {view.key()}: {name} differs by {err:.3g} (> {tol:.3g})")
            checked += 1
    return {"ok": not problems, "problems": problems[:20], "checked": checked, "max_abs_error": worst}
