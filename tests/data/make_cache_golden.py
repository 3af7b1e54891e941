"""Writes the reference of tests/test_cache_golden.py into OUT: raw teacher rows (cache_golden_rows.npz) and the
sha256 of the shard the cache writes from them under three compression settings (cache_golden.json).

    PYTHONPATH=<checkout of the reference code> python tests/data/make_cache_golden.py OUT

Works with the module layout before and after the cache was split (commit 54d5c16 wrote the files here)."""
import hashlib, json, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
from curriculum.shapes import make_shapes
from curriculum.config import CacheConfig, CompressionConfig
from teachers.zoo import build_detector
try:
    from teachers.cache import encode_shard, table_to_bytes, teacher_outputs, view_sample, open_dataset, target_spec
except ImportError:
    from teachers.cache import table_to_bytes, target_spec
    from teachers.outputs import teacher_outputs
    from teachers.precompute import encode_shard, view_sample, open_dataset
root = out / "data"
make_shapes(root, train_images=3, val_images=1, image_size=96, seed=5)
torch.manual_seed(0)
det = build_detector("fcos_mobilenetv3_micro", 7).eval()
ds = open_dataset(str(root / "train" / "images"), str(root / "train" / "instances.json"), 96)
rows = []
for view_name in ("noflip", "flip"):
    samples = [view_sample(ds, i, view_name) for i in range(3)]
    raws = teacher_outputs(det, [s[0] for s in samples], ["features", "head", "detections"], ["p5", "p6", "p7"])
    for (img, boxes, iid, view), raw in zip(samples, raws):
        rows.append({"image_id": iid, "view": view.to_dict(), "view_key": view.key(), "boxes": boxes,
                     "hw": (view.out_h, view.out_w), "raw": raw})
settings = {
    "fp16+top3": CompressionConfig(dtype="fp16", logits="topk", topk=3),
    "int8+threshold+sparse+region": CompressionConfig(dtype="int8", logits="threshold", score_threshold=0.05,
                                                      boxes="sparse", features_region="boxes"),
    "fp32+pooled": CompressionConfig(dtype="fp32", features_region="pooled", pool=2),
}
arrays, meta_rows = {}, []
for r, row in enumerate(rows):
    meta_rows.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items() if k not in ("raw", "boxes")})
    arrays[f"{r}/boxes"] = row["boxes"]
    for name, a in row["raw"].items():
        arrays[f"{r}/raw/{name}"] = a
np.savez_compressed(out / "cache_golden_rows.npz", **arrays)
golden = {"rows": meta_rows, "columns": [list(r["raw"]) for r in rows], "settings": {}}
for label, comp in settings.items():
    spec = target_spec(CacheConfig(targets=["features", "head", "detections"], levels=["p5", "p6", "p7"],
                                   compression=comp))
    meta = {"key": "golden", "shard": 0}
    data = table_to_bytes(encode_shard(rows, spec), meta)
    golden["settings"][label] = {"spec": spec, "meta": meta, "sha256": hashlib.sha256(data).hexdigest(),
                                 "bytes": len(data)}
(out / "cache_golden.json").write_text(json.dumps(golden, indent=1, default=str))
print({k: v["bytes"] for k, v in golden["settings"].items()}, (out / "cache_golden_rows.npz").stat().st_size)
