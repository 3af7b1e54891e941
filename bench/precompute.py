"""Benchmark of the teacher pool's precompute (issue 3), measured side by side in one run.

1. Throughput: `curriculum precompute` (Ray actor: image decode, forward, encode, zstd Parquet, atomic commit)
   against the bare teacher forward on the same batches (images already decoded in memory, outputs dropped),
   with the same number of torch threads. Goal: ratio >= 0.9.
2. Bytes per image for each target kind and compression setting (the cache's own encoder and Parquet writer;
   a `pca` setting's projection fitted on the same images), and the same figure projected to COCO train2017 at
   800x1333 (118,287 images): dense maps scale with the pixel count, detections and proposals do not.

    python bench/precompute.py [--images 200] [--teacher retinanet_resnet18_half] [--checkpoint model.pt]
                               [--threads 1] [--batch-size 8] [--views noflip]

Random weights are used without --checkpoint: throughput does not depend on them, but sparsity and entropy
do (a trained teacher's logits are more peaked, so top-k/threshold and zstd do better than printed here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curriculum.config import (  # noqa: E402
    CacheConfig, CompressionConfig, DataConfig, PrecomputeJobConfig, RayInitConfig, TeacherSpec,
)
from teachers.cache import column_bytes, rows_to_table, shard_ranges, table_to_bytes  # noqa: E402
from teachers.codec import encode_row  # noqa: E402
from teachers.outputs import teacher_outputs  # noqa: E402
from teachers.precompute import fit_teacher_projection, open_dataset, shard_batches, view_sample  # noqa: E402

COCO_IMAGES = 118_287
COCO_HW = (800, 1333)

SETTINGS = {
    "fp32": CompressionConfig(dtype="fp32"),
    "fp16": CompressionConfig(dtype="fp16"),
    "int8": CompressionConfig(dtype="int8"),
    "fp16+top3": CompressionConfig(dtype="fp16", logits="topk", topk=3),
    "fp16+thr0.05": CompressionConfig(dtype="fp16", logits="threshold", score_threshold=0.05),
    "fp16+boxes": CompressionConfig(dtype="fp16", features_region="boxes", box_dilation=0.5),
    "fp16+pool2": CompressionConfig(dtype="fp16", features_region="pooled", pool=2),
    "int8+top3+boxes": CompressionConfig(dtype="int8", logits="topk", topk=3, features_region="boxes"),
    # features as their principal components, fitted on the bytes table's own images (`teachers/projection.py`)
    "int8+top3+pca32": CompressionConfig(dtype="int8", logits="topk", topk=3, pca=32),
    "int8+top3+pca16": CompressionConfig(dtype="int8", logits="topk", topk=3, pca=16),
}


def subset_annotations(src: Path, out: Path, n: int) -> None:
    data = json.loads(src.read_text())
    data["images"] = data["images"][:n]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(data))


def io_worker_pace(det, ds, kinds: list[str], views: list[str], args, forward_rows_s: float) -> None:
    """What one I/O worker of a precompute actor does per row, alone on one thread: decode (load_samples),
    encode (encode_shard), Parquet + zstd (table_to_bytes) and the write; hence how many workers
    (`teachers[].io_workers`) keep up with a given forward rate, e.g. a GPU teacher's."""
    from concurrent.futures import Future

    from teachers.cache import target_spec
    from teachers.precompute import encode_shard, load_samples, produce_shard

    spec = target_spec(CacheConfig(targets=kinds, views=views, compression=SETTINGS["fp16+top3"]))
    t = {"decode": 0.0, "encode": 0.0, "parquet+zstd": 0.0, "write": 0.0}

    def load_batch(idx: list[int], view: str) -> Future:  # decoded here, on the spot, and timed
        t0 = time.perf_counter()
        f: Future = Future()
        f.set_result(load_samples(ds, idx, view))
        t["decode"] += time.perf_counter() - t0
        return f

    out = Path(tempfile.mkdtemp(prefix="bench_io_"))
    n_rows, n_bytes = 0, 0
    for k, (s, e) in enumerate(shard_ranges(len(ds), args.shard_size)):
        raw_rows = produce_shard(det, s, e, views, spec, args.batch_size, load_batch)
        if k == 0:  # Arrow's one-time set-up, untimed
            table_to_bytes(encode_shard(raw_rows, spec), {})
        t0 = time.perf_counter()
        table = encode_shard(raw_rows, spec)
        t1 = time.perf_counter()
        data = table_to_bytes(table, {})
        t2 = time.perf_counter()
        (out / f"shard-{s}.parquet").write_bytes(data)
        t3 = time.perf_counter()
        t["encode"] += t1 - t0
        t["parquet+zstd"] += t2 - t1
        t["write"] += t3 - t2
        n_rows, n_bytes = n_rows + len(raw_rows), n_bytes + len(data)
    per = {k: v / n_rows * 1e3 for k, v in t.items()}
    pace = n_rows / sum(t.values())
    print(f"\n## one I/O worker alone (1 thread, {n_rows} rows, fp16 + top-3 logits): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in per.items()) + f" per row; {pace:.0f} rows/s, {n_bytes / n_rows / 1024:.0f} "
        f"KiB written per row")
    print(f"the bare forward above ran at {forward_rows_s:.0f} rows/s (median): {forward_rows_s / pace:.2f} of one "
          f"worker's time; a forward of F rows/s needs io_workers >= F / {pace:.0f} (and shards_in_flight >= "
          f"io_workers + 1)")
    area = COCO_HW[0] * COCO_HW[1] / (128 * 128)
    enc_ms = per["encode"] + per["parquet+zstd"] + per["write"]
    print(f"projection to 800x1333 (encode, zstd and write scale with the dense bytes, x{area:.0f}; decoding of "
          f"large JPEGs not included): about {1e3 / (enc_ms * area):.1f} rows/s per worker with these settings")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--teacher", default="retinanet_resnet18_half")
    ap.add_argument("--checkpoint", help="a trained teacher (default: the zoo's random weights)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, bare forward and actor alike")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=40)
    ap.add_argument("--views", default="noflip", help="comma separated: noflip,flip")
    ap.add_argument("--in-flight", type=int, default=2, help="shards in flight per actor (TeacherSpec)")
    ap.add_argument("--repeats", type=int, default=3, help="precompute runs, interleaved with bare-forward runs")
    ap.add_argument("--size-images", type=int, default=48, help="images used for the bytes table")
    ap.add_argument("--data", default="data/shapes", help="built-in data root (generated when missing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    views = args.views.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_"))

    from teachers.zoo import build_detector, load_detector

    root = Path(args.data)
    if not (root / "train" / "instances.json").is_file():
        from curriculum.shapes import make_shapes

        make_shapes(root, train_images=max(args.images, 200), val_images=40, image_size=128, seed=0)
    ann = work / "instances.json"
    subset_annotations(root / "train" / "instances.json", ann, args.images)
    images = str(root / "train" / "images")
    ds = open_dataset(images, str(ann), 128)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        torch.manual_seed(0)
        ckpt = work / "teacher.pt"
        torch.save(build_detector(args.teacher, ds.num_classes).checkpoint(), ckpt)
    det = load_detector(ckpt).eval().requires_grad_(False)
    kinds = ["features", "head", "detections"] + (["proposals"] if det.kind == "two_stage" else [])
    n = len(ds)
    print(f"teacher {det.config.name} ({'checkpoint ' + str(ckpt) if args.checkpoint else 'random weights'}), "
          f"{n} images x {len(views)} view(s) at 128x128, batch {args.batch_size}, {args.threads} torch thread(s), "
          f"targets {kinds}, fp16 + top-3 logits in the throughput run")

    # ---- 1. throughput, side by side -------------------------------------------------------------------
    batches = [b for s, e in shard_ranges(n, args.shard_size) for b in shard_batches(s, e, views, args.batch_size)]
    loaded: dict = {}
    inputs = [[view_sample(ds, i, v, loaded)[0] for i in idx] for idx, v in batches]
    want = ("features", "head", "detections")

    def bare_forward() -> float:
        with torch.no_grad():
            det(inputs[0], want=want)  # warm-up
            t0 = time.perf_counter()
            for x in inputs:
                det(x, want=want)
            return time.perf_counter() - t0

    rows = n * len(views)
    import ray

    ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, logging_level="warning")
    from teachers.precompute import precompute

    # Interleaved, bare / precompute / bare / ...: the load of a shared machine drifts by tens of percent within
    # a minute, so each precompute run is compared with the mean of the bare runs around it.
    bare_runs, pre_runs = [bare_forward()], []
    for r in range(args.repeats):
        job = PrecomputeJobConfig(
            data=DataConfig(root=str(root), builtin="none", train_images=images, train_annotations=str(ann)),
            teachers=[TeacherSpec(checkpoint=str(ckpt), actors=1, cpus_per_actor=1, threads=args.threads,
                                  batch_size=args.batch_size, shards_in_flight=args.in_flight)],
            cache=CacheConfig(root=str(work / f"cache{r}"), targets=kinds, views=views, shard_size=args.shard_size,
                              compression=SETTINGS["fp16+top3"]),
            ray=RayInitConfig(),
        )
        (rep,) = precompute(job, progress=False)
        pre_runs.append(rep)
        bare_runs.append(bare_forward())
    ray.shutdown()
    print("\n## throughput (rows = images x views per second; steady state, actor start excluded)")
    ratios = []
    for r, rep in enumerate(pre_runs):
        bare_s = (bare_runs[r] + bare_runs[r + 1]) / 2
        ratio = (rows / rep.seconds) / (rows / bare_s)
        ratios.append(ratio)
        print(f"run {r}: bare forward {rows / bare_s:6.1f} rows/s ({bare_runs[r]:.2f} s / {bare_runs[r + 1]:.2f} s "
              f"around it) | precompute {rows / rep.seconds:6.1f} rows/s ({rep.seconds:.2f} s; forward inside the "
              f"actor {rep.forward_seconds:.2f} s; actor start {rep.startup_seconds:.1f} s) | ratio {ratio:.3f}")
    print(f"ratio precompute / bare: median {float(np.median(ratios)):.3f} over {len(ratios)} runs (goal >= 0.9)")
    io_worker_pace(det, ds, kinds, views, args, rows / float(np.median(bare_runs)))

    # ---- 2. bytes per image ------------------------------------------------------------------------------
    m = min(args.size_images, n)
    samples = [view_sample(ds, i, "noflip") for i in range(m)]
    raws = []
    for b in range(0, m, args.batch_size):
        chunk = samples[b : b + args.batch_size]
        raws += teacher_outputs(det, [s[0] for s in chunk], kinds)
    area = COCO_HW[0] * COCO_HW[1] / (128 * 128)
    print(f"\n## bytes per image per view (zstd Parquet, {m} images); COCO train2017 projection at 800x1333 = "
          f"x{area:.1f} for dense maps (features, head), x1 for detections/proposals, x{COCO_IMAGES:,} images")
    header = f"{'setting':18s}" + "".join(f"{k:>13s}" for k in kinds) + f"{'total':>13s}{'COCO/img':>12s}{'COCO total':>12s}"
    print(header + "\n" + "-" * len(header))
    for name, comp in SETTINGS.items():
        projection = (fit_teacher_projection(det, ds, comp.pca, m, det.level_names)
                      if comp.pca and comp.pca < det.backbone.out_channels else None)
        if comp.pca and projection is None:
            print(f"{name:18s} skipped: the teacher has {det.backbone.out_channels} channels")
            continue
        table = rows_to_table([{"image_id": 0, "view_key": "k", "view": {"orig_h": 1, "orig_w": 1, "out_h": 1,
                                                                          "out_w": 1, "flip": False},
                                **encode_row(r, comp, s[1], (128, 128), projection)} for r, s in zip(raws, samples)])
        kb = column_bytes(table_to_bytes(table, {}))
        per = {k: kb.get(k, 0) / m for k in kinds}
        coco = sum(v * (area if k in ("features", "head") else 1.0) for k, v in per.items())
        print(f"{name:18s}" + "".join(f"{per[k] / 1024:10.1f} KiB" for k in kinds)
              + f"{sum(per.values()) / 1024:9.1f} KiB{coco / 2**20:8.2f} MiB{coco * COCO_IMAGES / 2**40:9.2f} TiB")
    c = det.backbone.out_channels
    hw = sum(int(np.ceil(COCO_HW[0] / s)) * int(np.ceil(COCO_HW[1] / s)) for s in (8, 16, 32, 64, 128))
    print(f"\nanalytic check: dense fp16 P3-P7 features at 800x1333 are {c * hw * 2 / 2**20:.1f} MiB/image with "
          f"{c} channels, {256 * hw * 2 / 2**20:.1f} MiB with RetinaNet-R50's 256 (METHODS.md: about 11 MB)")


if __name__ == "__main__":
    main()
