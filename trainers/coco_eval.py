"""COCO box evaluation with pycocotools.

Detections leave the model as contiguous labels (1..K, 0 = background, see
docs/CONVENTIONS.md) and ``xyxy`` boxes; COCO wants category ids and ``xywh``. This module
does that conversion at the file boundary, writes detections JSON files, and runs
``COCOeval(iouType="bbox")`` with its console output captured.

Metrics are returned as raw fractions in ``[0, 1]`` exactly as pycocotools computes them,
with ``-1.0`` where a metric is undefined (e.g. ``APs`` when the evaluated images hold no
small ground-truth box). Tables elsewhere report them x100; keep the fractions here so
that no caller scales twice.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from curriculum.errors import DataError

__all__ = [
    "COCO_METRICS",
    "COCO_STATS_NAMES",
    "detections_to_coco",
    "evaluate_detections",
    "load_coco_gt",
    "per_class_ap",
    "write_detections",
]

log = logging.getLogger(__name__)

#: What ``eval.json`` keeps of the mask evaluation, under ``"segm"``.
SEGM_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class")

#: The headline box metrics, in the order of ``COCOeval.stats[0:6]``.
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: Names of all 12 numbers of ``COCOeval.stats`` (bbox), in order.
COCO_STATS_NAMES: tuple[str, ...] = COCO_METRICS + (
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

_DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


def _to_numpy(x: Any) -> np.ndarray:
    """Accept torch tensors (any device, with grad), numpy arrays and sequences.

    Duck-typed so this module does not import torch.
    """
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


def detections_to_coco(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    label_to_category: dict[int, int],
    masks: Any = None,
) -> list[dict[str, Any]]:
    """Convert one image's detections into COCO result dicts.

    ``masks`` ``[N, H, W]`` (probabilities or 0/1, in the original image): each result also gets its
    ``segmentation`` as compressed RLE of ``mask >= 0.5`` (what ``COCOeval(iouType="segm")`` reads).

    ``boxes_xyxy`` ``[N, 4]`` must already be in ORIGINAL image pixels (undo the view's
    transform first): COCO matches against the annotation file's coordinates. Each result is
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with python scalars; box
    values are rounded to 2 decimals (sub-pixel noise only inflates the JSON).

    Raises ``ValueError`` on label 0 (background must be filtered out by the detector's
    post-processing), on labels missing from ``label_to_category``, on shape mismatches,
    non-finite values and boxes with ``x2 < x1`` or ``y2 < y1`` (usually ``xywh`` passed
    where ``xyxy`` was expected).
    """
    boxes = _to_numpy(boxes_xyxy).astype(np.float64, copy=False)
    score_arr = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    label_arr = _to_numpy(labels).reshape(-1)

    n = score_arr.shape[0]
    if boxes.size == 0 and n == 0 and label_arr.size == 0:
        return []
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"image {image_id}: boxes_xyxy must have shape [N, 4], got {tuple(boxes.shape)}"
        )
    if boxes.shape[0] != n or label_arr.shape[0] != n:
        raise ValueError(
            f"image {image_id}: {boxes.shape[0]} boxes, {n} scores and {label_arr.shape[0]} "
            "labels; they must have the same length"
        )
    if not np.all(np.isfinite(boxes)) or not np.all(np.isfinite(score_arr)):
        raise ValueError(f"image {image_id}: boxes or scores contain NaN/inf")
    if label_arr.dtype.kind == "f":
        if not np.all(np.isfinite(label_arr)) or np.any(label_arr != np.round(label_arr)):
            raise ValueError(f"image {image_id}: labels must be integers, got {label_arr!r}")
    elif label_arr.dtype.kind not in "iu":
        raise ValueError(f"image {image_id}: labels must be integers, got dtype {label_arr.dtype}")
    label_arr = label_arr.astype(np.int64)

    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    bad = np.flatnonzero((widths < 0) | (heights < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"image {image_id}: detection {i} box {boxes[i].tolist()} has x2 < x1 or y2 < y1; "
            "boxes must be xyxy"
        )

    results: list[dict[str, Any]] = []
    for i in range(n):
        label = int(label_arr[i])
        if label == 0:
            raise ValueError(
                f"image {image_id}: detection {i} has label 0 (background); the detector's "
                "post-processing must drop background before conversion"
            )
        if label not in label_to_category:
            raise ValueError(
                f"image {image_id}: detection {i} has label {label}, which is not in "
                f"label_to_category (known labels {sorted(label_to_category)})"
            )
        x1, y1 = boxes[i, 0], boxes[i, 1]
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_category[label]),
                "bbox": [
                    round(float(x1), 2),
                    round(float(y1), 2),
                    round(float(widths[i]), 2),
                    round(float(heights[i]), 2),
                ],
                "score": float(score_arr[i]),
            }
        )
    if masks is not None:
        from pycocotools import mask as mask_utils

        binary = (_to_numpy(masks) >= 0.5).astype(np.uint8)
        if binary.ndim != 3 or binary.shape[0] != n:
            raise ValueError(f"image {image_id}: masks must have shape [N, H, W] with N = {n}, got {binary.shape}")
        for r, m in zip(results, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            r["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return results


def _json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays through ``json.dump`` (hand-built detections may hold them)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_detections(path: str | os.PathLike[str], detections: Iterable[dict[str, Any]]) -> Path:
    """Write a COCO detections JSON file atomically (`curriculum.files.atomic_write`) and return its path.
    Parent directories are created."""
    from curriculum.files import atomic_write_json

    path = Path(path)
    atomic_write_json(list(detections), path, indent=None, default=_json_default)
    return path


def load_coco_gt(coco_gt: COCO | str | os.PathLike[str]) -> COCO:
    """Return a ``COCO`` object, loading it from a file (quietly) if given a path."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = Path(coco_gt)
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found; check the path in the config")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid COCO annotation JSON file ({e})") from e
    except (KeyError, TypeError, AssertionError) as e:
        raise DataError(
            f"{path}: malformed COCO annotation file ({type(e).__name__}: {e}); it needs "
            "'images', 'annotations' and 'categories' lists"
        ) from e


def _check_detections(detections: Sequence[dict[str, Any]], gt: COCO) -> None:
    """Reject detections COCOeval would crash on or silently drop (unknown image/category)."""
    img_ids = set(gt.getImgIds())
    cat_ids = set(gt.getCatIds())
    for i, det in enumerate(detections):
        if not isinstance(det, dict):
            raise DataError(f"detections[{i}]: expected a dict, got {type(det).__name__}")
        missing = [k for k in _DETECTION_KEYS if k not in det]
        if missing:
            raise DataError(
                f"detections[{i}]: missing key(s) {missing}; COCO box results need "
                f"{list(_DETECTION_KEYS)}"
            )
        bbox = det["bbox"]
        if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
            raise DataError(f"detections[{i}]: bbox {bbox!r} must be 4 finite numbers [x, y, w, h]")
        if det["image_id"] not in img_ids:
            raise DataError(
                f"detections[{i}]: image_id {det['image_id']!r} is not in the ground truth; "
                "evaluate against the annotation file the images came from"
            )
        if det["category_id"] not in cat_ids:
            raise DataError(
                f"detections[{i}]: category_id {det['category_id']!r} is not a ground-truth "
                "category; check the label -> category mapping"
            )


def _empty_results(gt: COCO) -> COCO:
    """A results object with no detections (``COCO.loadRes`` crashes on an empty list).

    COCOeval then scores every category with ground truth as precision 0, and leaves
    undefined cells at -1, exactly as it would for real detections that all missed.
    """
    res = COCO()
    res.dataset = {
        "images": list(gt.dataset.get("images", [])),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def per_class_ap(coco_eval: COCOeval) -> dict[str, float]:
    """AP per category name from an accumulated ``COCOeval``.

    Mean of ``eval["precision"]`` over IoU thresholds and recall thresholds at area ``all``
    and the largest ``maxDets`` (100), ignoring ``-1`` cells. A category with no
    (non-crowd) ground truth in the evaluated images gets ``-1.0``. Names that occur twice
    are disambiguated as ``"name (id)"``.
    """
    if not getattr(coco_eval, "eval", None) or "precision" not in coco_eval.eval:
        raise ValueError("per_class_ap needs a COCOeval on which evaluate() and accumulate() ran")
    params = coco_eval.eval["params"]
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    area_idx = list(params.areaRngLbl).index("all")
    maxdet_idx = int(np.argmax(params.maxDets))
    cats = coco_eval.cocoGt.loadCats(params.catIds)
    names = [str(c.get("name", c["id"])) for c in cats]
    out: dict[str, float] = {}
    for k, (cat, name) in enumerate(zip(cats, names)):
        key = f"{name} ({cat['id']})" if names.count(name) > 1 else name
        p = precision[:, :, k, area_idx, maxdet_idx]
        p = p[p > -1]
        out[key] = float(np.mean(p)) if p.size else -1.0
    return out


def evaluate_detections(
    coco_gt: COCO | str | os.PathLike[str],
    detections: Sequence[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
    per_class: bool = False,
    iou_type: str = "bbox",
) -> dict[str, Any]:
    """Run COCO box evaluation (``iou_type="segm"``: mask evaluation, the detections' ``segmentation``
    against the annotations') and return its metrics as raw fractions.

    ``image_ids`` restricts evaluation (default: every image of the ground truth), so a
    partial pass over the validation set is not charged with misses on unseen images.
    Detections on other images are ignored. An empty ``detections`` list is valid: AP is 0
    wherever ground truth exists.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100": float,
    "stats": list[float] (all 12 numbers of COCOeval.stats)}`` plus ``"per_class":
    dict[str, float]`` when ``per_class`` is true. Values are in ``[0, 1]``, or ``-1.0``
    where undefined. pycocotools' printing is captured and logged at DEBUG level.
    """
    gt = load_coco_gt(coco_gt)
    all_ids = set(gt.getImgIds())
    if image_ids is None:
        eval_ids = sorted(all_ids)
    else:
        eval_ids = sorted({int(i) for i in image_ids})
        unknown = [i for i in eval_ids if i not in all_ids]
        if unknown:
            raise DataError(
                f"image_ids {unknown[:10]} are not in the ground truth; pass ids from the "
                "annotation file being evaluated"
            )
    if not eval_ids:
        raise ValueError("evaluate_detections: no images to evaluate (image_ids is empty)")

    _check_detections(detections, gt)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if detections:
            # loadRes adds keys (area, id, iscrowd, segmentation) in place: give it copies.
            # Masks without their boxes: loadRes then measures each detection's area on its mask (the size
            # buckets of the mask metrics), not on its box.
            dt = gt.loadRes([dict(d, bbox=list(d["bbox"])) if iou_type == "bbox" else
                             {k: v for k, v in d.items() if k != "bbox"} for d in detections])
        else:
            dt = _empty_results(gt)
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type {iou_type!r}: 'bbox' or 'segm'")
        coco_eval = COCOeval(gt, dt, iouType=iou_type)
        coco_eval.params.imgIds = eval_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log.debug("pycocotools output:\n%s", buf.getvalue())

    stats = [float(s) for s in coco_eval.stats]
    result: dict[str, Any] = {name: stats[i] for i, name in enumerate(COCO_STATS_NAMES[:9])}
    result["stats"] = stats
    if per_class:
        result["per_class"] = per_class_ap(coco_eval)
    return result
