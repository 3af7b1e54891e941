"""torchvision's COCO detectors through the project (issue 14): parity with torchvision's own forward, and the cache
cost of keep-ratio views.

1. Parity: each `torchvision:<builder>` with the same (random, saved and reloaded) weights as torchvision's own model,
   on random images of COCO's usual sizes: the project's keep-ratio view, `Detector.predict`, boxes mapped back,
   against torchvision's forward at the same ``min_size``/``max_size``. Detections are matched by label and score.
   COCO weights cannot be downloaded here: random weights, made to score boxes unlike each other (`spread_scores`).
2. Cache bytes: RetinaNet-R50 (`torchvision:retinanet_resnet50_fpn_v2`) on keep-ratio views of COCO-sized images at
   ``min_size`` 512 and 800 (``max_size`` 853 / 1333): the encoded cells of every FPN level and the dense head outputs
   in fp16, and the Parquet shard bytes (zstd on top) per image.

    python bench/torchvision_teachers.py [--sizes 800 512] [--out bench/results/torchvision_teachers.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models import get_model_builder

from curriculum.config import CompressionConfig
from curriculum.data import Resize
from curriculum.export import detection_differences
from teachers.cache import table_to_bytes
from teachers.codec import encode_row
from teachers.outputs import teacher_outputs
from teachers.precompute import encode_shard
from teachers.zoo import TORCHVISION_BUILDERS, build_detector

COCO_SIZES = [(480, 640), (427, 640), (640, 480), (640, 427)]  # (h, w): the most common COCO image sizes
MAX_FOR = {512: 853, 800: 1333}


def reference(builder: str, min_size: int, max_size: int) -> torch.nn.Module:
    prefix = "box_" if builder.startswith(("fasterrcnn", "maskrcnn")) else ""
    torch.manual_seed(0)
    model = get_model_builder(builder)(weights=None, weights_backbone=None, num_classes=91, min_size=min_size,
                                       max_size=max_size, **{f"{prefix}score_thresh": 0.01,
                                                             f"{prefix}detections_per_img": 100}).eval()
    spread_scores(model)
    return model


@torch.no_grad()
def spread_scores(model: torch.nn.Module) -> None:
    """BatchNorm statistics off their defaults, so that a random network's scores vary over the image."""
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            b.uniform_(0.5, 1.5)


def structured_image(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Blobs at several scales plus a little noise: features that vary over the image, as a photo's do (uniform
    noise gives a random network near-constant maps at stride 32, and so tied scores)."""
    img = torch.zeros(3, h, w)
    for cells in (4, 12, 40):
        low = torch.rand(1, 3, cells, max(1, cells * w // h), generator=g)
        img += torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0] / 3
    return (img + 0.05 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def matched_differences(got: dict, want: dict, boxes: torch.Tensor) -> tuple[float, float]:
    """Largest box (original pixels) and score difference, each of ours matched to the reference detection of its
    label nearest in box and score (`curriculum.export.detection_differences`)."""
    return detection_differences([boxes.numpy(), got["scores"].numpy(), got["labels"].numpy()],
                                 [want[k].numpy() for k in ("boxes", "scores", "labels")])


def parity(builder: str, min_size: int, max_size: int, tmp: Path, images: list[torch.Tensor]) -> dict:
    ref = reference(builder, min_size, max_size)
    path = tmp / f"{builder}.pth"
    torch.save(ref.state_dict(), path)
    det = build_detector(f"torchvision:{builder}", 91, weights=str(path), score_thresh=0.01).eval()
    resize = Resize("keep_ratio", min_size=(min_size,), max_size=max_size)
    rows = []
    for img in images:
        view = resize.view(*img.shape[-2:], flip=False)
        with torch.no_grad():
            want = ref([img])[0]
            got = det.predict([view.apply(img)])[0]
            logits = max_logit_difference(ref, det, img, view)
        boxes = view.unmap_boxes(got["boxes"])
        box, score = matched_differences(got, want, boxes)
        rows.append({"image": list(img.shape[-2:]), "detections": len(want["boxes"]), "same_count":
                     len(got["boxes"]) == len(want["boxes"]), "max_box_px": box, "max_score": score,
                     "identical_fraction": identical_fraction(got, want, boxes), "max_logit": logits})
    return {"builder": builder, "min_size": min_size, "max_size": max_size, "images": rows,
            "max_box_px": max(r["max_box_px"] for r in rows), "max_score": max(r["max_score"] for r in rows),
            "identical_fraction": min(r["identical_fraction"] for r in rows),
            "max_logit": max(r["max_logit"] for r in rows)}


def identical_fraction(got: dict, want: dict, boxes: torch.Tensor) -> float:
    """Share of our detections that torchvision also gives: same label, score within 1e-3, box within 0.5 px."""
    if not len(boxes):
        return 1.0 if not len(want["boxes"]) else 0.0
    same = ((boxes[:, None] - want["boxes"][None]).abs().amax(-1) < 0.5)
    same &= (got["labels"][:, None] == want["labels"][None])
    same &= ((got["scores"][:, None] - want["scores"][None]).abs() < 1e-3)
    return float(same.any(dim=1).float().mean())


def max_logit_difference(ref: torch.nn.Module, det, img: torch.Tensor, view) -> float:
    """The head's raw outputs (one-stage class logits; RPN objectness) of torchvision's own modules on its own
    transform, against the project's recording on the keep-ratio view: the computation, before any selection."""
    images, _ = ref.transform([img])
    feats = list(ref.backbone(images.tensors).values())
    out = det([view.apply(img)], want=("head",))
    if det.kind == "one_stage":
        theirs, ours = ref.head(feats)["cls_logits"], torch.cat(out.head["cls_logits"], dim=1)
        return float((theirs - ours).abs().max())
    theirs = ref.rpn.head(feats)[0]
    return max(float((a - b).abs().max()) for a, b in zip(theirs, out.head["objectness"]))


def cache_bytes(min_size: int, images: list[torch.Tensor]) -> dict:
    torch.manual_seed(0)
    det = build_detector("torchvision:retinanet_resnet50_fpn_v2", 91).eval()
    resize = Resize("keep_ratio", min_size=(min_size,), max_size=MAX_FOR[min_size])
    comp = CompressionConfig(dtype="fp16")
    spec = {"targets": ["features", "head"], "levels": None, "compression": comp.__dict__}
    cells_by_kind = {"features": 0, "head": 0}
    rows, t_fwd = [], 0.0
    for i, img in enumerate(images):
        view = resize.view(*img.shape[-2:], flip=False)
        t0 = time.perf_counter()
        (raw,) = teacher_outputs(det, [view.apply(img)], spec["targets"], None)
        t_fwd += time.perf_counter() - t0
        for name, cell in encode_row(raw, comp, np.zeros((0, 4)), view.padded_size()).items():
            cells_by_kind[name.split("/")[0]] += len(cell["data"]) + len(cell.get("aux") or b"")
        rows.append({"image_id": i, "view_key": view.key(), "view": view.to_dict(), "boxes": np.zeros((0, 4)),
                     "hw": view.padded_size(), "raw": raw})
    shard = table_to_bytes(encode_shard(rows, spec), {})
    n = len(images)
    return {"teacher": "torchvision:retinanet_resnet50_fpn_v2", "min_size": min_size, "max_size": MAX_FOR[min_size],
            "dtype": "fp16", "views": [r["view_key"] for r in rows],
            "cells_bytes_per_image": {k: v / n for k, v in cells_by_kind.items()},
            "cells_bytes_per_image_total": sum(cells_by_kind.values()) / n,
            "parquet_bytes_per_image": len(shard) / n, "forward_s_per_image": t_fwd / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[800, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/torchvision_teachers.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = [structured_image(h, w, g) for h, w in COCO_SIZES]
    tmp = Path(args.out).parent / "tmp_weights"
    tmp.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "parity": [], "cache": []}
    for size in args.sizes:
        for builder in TORCHVISION_BUILDERS:
            r = parity(builder, size, MAX_FOR[size], tmp, images[:2])
            result["parity"].append(r)
            print(f"parity {builder:40s} {size}/{MAX_FOR[size]}: identical {100 * r['identical_fraction']:.0f}%, "
                  f"max box {r['max_box_px']:.4f} px, max score {r['max_score']:.2e}, max logit {r['max_logit']:.1e}, "
                  f"detections {[i['detections'] for i in r['images']]}", flush=True)
        c = cache_bytes(size, images)
        result["cache"].append(c)
        print(f"cache RetinaNet-R50 fp16 at {size}/{MAX_FOR[size]}: {c['cells_bytes_per_image_total'] / 2**20:.2f} MiB "
              f"encoded, {c['parquet_bytes_per_image'] / 2**20:.2f} MiB in Parquet per image "
              f"(features {c['cells_bytes_per_image']['features'] / 2**20:.2f}, head "
              f"{c['cells_bytes_per_image']['head'] / 2**20:.2f})", flush=True)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
