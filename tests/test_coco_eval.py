"""Tests for trainers.coco_eval: metric values checked against hand-computed COCO AP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from curriculum.errors import DataError
from trainers.coco_eval import (
    COCO_METRICS,
    COCO_STATS_NAMES,
    detections_to_coco,
    evaluate_detections,
    load_coco_gt,
    per_class_ap,
    write_detections,
)

# Non-contiguous category ids, as in real COCO (1..90 with gaps).
CATEGORIES = [
    {"id": 3, "name": "car"},
    {"id": 7, "name": "train"},
    {"id": 18, "name": "dog"},
]
LABEL_TO_CATEGORY = {1: 3, 2: 7, 3: 18}


def _ann(ann_id: int, image_id: int, cat: int, xywh: list[float], crowd: int = 0) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": xywh,
        "area": float(xywh[2] * xywh[3]),
        "iscrowd": crowd,
    }


def _write_gt(tmp_path: Path, annotations: list[dict[str, Any]], image_ids: tuple[int, ...] = (1,),
              name: str = "gt.json") -> Path:
    gt = {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in image_ids],
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = tmp_path / name
    path.write_text(json.dumps(gt))
    return path


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    """Three images, non-contiguous categories, one iscrowd=1 region (image 5)."""
    anns = [
        _ann(1, 1, 3, [10, 20, 100, 80]),      # car, area 8000 -> medium
        _ann(2, 1, 18, [300, 200, 150, 120]),  # dog, area 18000 -> large
        _ann(3, 2, 7, [50, 50, 200, 150]),     # train, large
        _ann(4, 2, 3, [400, 300, 20, 15]),     # car, area 300 -> small
        _ann(5, 5, 18, [100, 100, 60, 50]),    # dog, medium
        _ann(6, 5, 3, [300, 100, 200, 200], crowd=1),  # crowd of cars
    ]
    return _write_gt(tmp_path, anns, image_ids=(1, 2, 5))


def _gt_as_detections(path: Path) -> list[dict[str, Any]]:
    """Non-crowd GT boxes converted through detections_to_coco (score 1.0)."""
    gt = json.loads(path.read_text())
    cat_to_label = {c: l for l, c in LABEL_TO_CATEGORY.items()}
    dets: list[dict[str, Any]] = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        if not anns:
            continue
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        labels = np.array([cat_to_label[a["category_id"]] for a in anns])
        dets += detections_to_coco(img["id"], xyxy, np.ones(len(anns)), labels, LABEL_TO_CATEGORY)
    return dets


def _det(image_id: int, cat: int, xywh: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": xywh, "score": score}


# --------------------------------------------------------------------------- evaluation


def test_ground_truth_as_detections_scores_perfect(gt_path: Path) -> None:
    dets = _gt_as_detections(gt_path)
    before = json.dumps(dets)
    m = evaluate_detections(gt_path, dets)
    # pycocotools' precision is tp / (tp + fp + eps), so "1.0" is 1 - 2e-16.
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert m[key] == pytest.approx(1.0, abs=1e-6), key
    assert len(m["stats"]) == 12
    assert m["stats"][: len(COCO_METRICS)] == [m[k] for k in COCO_METRICS]
    assert set(COCO_STATS_NAMES[:9]) <= set(m)
    assert json.dumps(dets) == before, "evaluate_detections must not mutate its input"


def test_accepts_coco_object_and_captures_output(gt_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = load_coco_gt(gt_path)
    m = evaluate_detections(gt, _gt_as_detections(gt_path))
    assert m["AP"] == pytest.approx(1.0, abs=1e-6)
    out = capsys.readouterr().out
    assert out == "", f"pycocotools printed: {out!r}"


def test_hand_computed_interpolated_ap(tmp_path: Path) -> None:
    # Two GT cars (one per image). Detections sorted by score:
    #   0.9 perfect on GT a      -> TP  precision 1/1, recall 1/2
    #   0.8 no overlap with any  -> FP  precision 1/2, recall 1/2
    #   0.7 perfect on GT b      -> TP  precision 2/3, recall 2/2
    # Interpolated (max precision at recall >= r): 1.0 for r in {0.00..0.50} (51 points),
    # 2/3 for r in {0.51..1.00} (50 points). Matches are exact (IoU 1 or 0), so all 10 IoU
    # thresholds agree: AP = AP50 = AP75 = (51 * 1.0 + 50 * 2/3) / 101.
    path = _write_gt(tmp_path, [_ann(1, 1, 3, [10, 10, 100, 100]), _ann(2, 2, 3, [200, 200, 100, 100])],
                     image_ids=(1, 2))
    dets = [
        _det(1, 3, [10, 10, 100, 100], 0.9),
        _det(1, 3, [400, 300, 100, 100], 0.8),
        _det(2, 3, [200, 200, 100, 100], 0.7),
    ]
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    m = evaluate_detections(path, dets)
    for key in ("AP", "AP50", "AP75"):
        assert m[key] == pytest.approx(expected, abs=1e-6), key
    assert m["AR100"] == pytest.approx(1.0)
    # All boxes are 100x100 = 10000 px^2 > 96^2: "large" in COCO's area ranges. (An unmatched
    # detection outside an area range is ignored for that range, so the FP must be large too.)
    assert m["APl"] == pytest.approx(expected, abs=1e-6)
    assert m["APs"] == -1.0 and m["APm"] == -1.0  # no GT of those sizes: undefined


def test_iou_between_050_and_075(tmp_path: Path) -> None:
    # GT [0, 0, 100, 100] (xywh); detection [0, 0, 100, 64] lies inside it:
    # IoU = (100*64) / (100*100) = 0.64. Matched at IoU thresholds 0.50, 0.55, 0.60 (TP, AP 1),
    # missed at 0.65..0.95 (AP 0). So AP50 = 1, AP75 = 0 and AP = 3/10 = 0.3.
    path = _write_gt(tmp_path, [_ann(1, 1, 7, [0, 0, 100, 100])])
    m = evaluate_detections(path, [_det(1, 7, [0, 0, 100, 64], 0.9)])
    assert m["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(0.3, abs=1e-6)


def test_detection_on_crowd_region_is_not_a_false_positive(tmp_path: Path) -> None:
    normal = _ann(1, 1, 3, [10, 10, 100, 100])
    crowd = _ann(2, 1, 3, [300, 200, 300, 250], crowd=1)
    dets = [
        _det(1, 3, [10, 10, 100, 100], 0.9),   # TP on the normal car
        _det(1, 3, [350, 250, 80, 60], 0.95),  # inside the crowd region, ranked first
    ]
    with_crowd = evaluate_detections(_write_gt(tmp_path, [normal, crowd], name="crowd.json"), dets)
    assert with_crowd["AP"] == pytest.approx(1.0, abs=1e-6)

    # Control: without the crowd annotation the same detection is a top-ranked FP:
    # precision 1/2 at recall 1 for every recall threshold -> AP = 0.5.
    without = evaluate_detections(_write_gt(tmp_path, [normal], name="nocrowd.json"), dets)
    assert without["AP"] == pytest.approx(0.5, abs=1e-6)


def test_empty_detections_give_zero_ap(gt_path: Path) -> None:
    m = evaluate_detections(gt_path, [])
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert m[key] == 0.0, key  # GT exists in every size range of the fixture
    assert len(m["stats"]) == 12


def test_empty_detections_leave_undefined_metrics_at_minus_one(tmp_path: Path) -> None:
    path = _write_gt(tmp_path, [_ann(1, 1, 3, [0, 0, 200, 200])])  # large only
    m = evaluate_detections(path, [])
    assert m["AP"] == 0.0 and m["APl"] == 0.0
    assert m["APs"] == -1.0 and m["APm"] == -1.0


def test_image_ids_restrict_evaluation(gt_path: Path) -> None:
    dets = [d for d in _gt_as_detections(gt_path) if d["image_id"] == 1]
    assert evaluate_detections(gt_path, dets)["AP"] < 0.99  # misses on images 2 and 5
    m = evaluate_detections(gt_path, dets, image_ids=[1])
    assert m["AP"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_detections(gt_path, dets, image_ids=[1, 99])


def test_per_class_ap(gt_path: Path) -> None:
    # Perfect on every image except image 2's train, which is missed.
    dets = [d for d in _gt_as_detections(gt_path) if d["category_id"] != 7]
    m = evaluate_detections(gt_path, dets, per_class=True)
    pc = m["per_class"]
    assert set(pc) == {"car", "train", "dog"}
    assert pc["car"] == pytest.approx(1.0, abs=1e-6)
    assert pc["dog"] == pytest.approx(1.0, abs=1e-6)
    assert pc["train"] == 0.0
    assert m["AP"] == pytest.approx(np.mean(list(pc.values())), abs=1e-9)

    # A category without GT in the evaluated images is undefined (-1), not 0.
    m1 = evaluate_detections(gt_path, dets, image_ids=[5], per_class=True)
    assert m1["per_class"]["train"] == -1.0
    assert "per_class" not in evaluate_detections(gt_path, dets)


def test_per_class_ap_needs_accumulated_eval() -> None:
    class NotRun:
        eval: dict[str, Any] = {}

    with pytest.raises(ValueError, match="accumulate"):
        per_class_ap(NotRun())  # type: ignore[arg-type]


def test_bad_detections_raise(gt_path: Path) -> None:
    with pytest.raises(DataError, match="image_id 42"):
        evaluate_detections(gt_path, [_det(42, 3, [0, 0, 1, 1], 0.5)])
    with pytest.raises(DataError, match="category_id 1"):
        evaluate_detections(gt_path, [_det(1, 1, [0, 0, 1, 1], 0.5)])
    with pytest.raises(DataError, match="missing key"):
        evaluate_detections(gt_path, [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])


def test_missing_or_bad_gt_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        evaluate_detections(tmp_path / "nope.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid"):
        evaluate_detections(bad, [])


# --------------------------------------------------------------------------- conversion


def test_detections_to_coco_converts_boxes_and_labels() -> None:
    boxes = np.array([[10.0, 20.0, 110.0, 100.0], [1.234, 5.678, 11.0, 15.5]], dtype=np.float32)
    dets = detections_to_coco(9, boxes, np.array([0.9, 0.25]), np.array([1, 3]), LABEL_TO_CATEGORY)
    assert [d["category_id"] for d in dets] == [3, 18]
    assert dets[0] == {"image_id": 9, "category_id": 3, "bbox": [10.0, 20.0, 100.0, 80.0],
                       "score": pytest.approx(0.9)}
    assert dets[1]["bbox"] == pytest.approx([1.23, 5.68, 9.77, 9.82], abs=1e-9)
    for d in dets:
        assert type(d["image_id"]) is int and type(d["category_id"]) is int
        assert type(d["score"]) is float and all(type(v) is float for v in d["bbox"])
    json.dumps(dets)  # plain python types only


def test_detections_to_coco_label_zero_raises() -> None:
    with pytest.raises(ValueError, match="background"):
        detections_to_coco(1, [[0, 0, 5, 5], [1, 1, 4, 4]], [0.9, 0.8], [2, 0], LABEL_TO_CATEGORY)


def test_detections_to_coco_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not in label_to_category"):
        detections_to_coco(1, [[0, 0, 5, 5]], [0.9], [4], LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match="same length"):
        detections_to_coco(1, [[0, 0, 5, 5]], [0.9, 0.1], [1], LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match="xyxy"):
        detections_to_coco(1, [[10, 10, 5, 5]], [0.9], [1], LABEL_TO_CATEGORY)


def test_detections_to_coco_empty() -> None:
    assert detections_to_coco(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64),
                              LABEL_TO_CATEGORY) == []


def test_detections_to_coco_accepts_tensors() -> None:
    torch = pytest.importorskip("torch")
    boxes = torch.tensor([[0.0, 0.0, 4.0, 6.0]], requires_grad=True)
    dets = detections_to_coco(2, boxes, torch.tensor([0.5]), torch.tensor([2]), LABEL_TO_CATEGORY)
    assert dets == [{"image_id": 2, "category_id": 7, "bbox": [0.0, 0.0, 4.0, 6.0], "score": 0.5}]


# --------------------------------------------------------------------------- file output


def test_write_detections_is_atomic_and_round_trips(tmp_path: Path, gt_path: Path) -> None:
    dets = _gt_as_detections(gt_path)
    dets[0]["score"] = np.float32(0.5)  # numpy scalars are accepted
    out = write_detections(tmp_path / "sub" / "dets.json", dets)
    assert out == tmp_path / "sub" / "dets.json"
    loaded = json.loads(out.read_text())
    assert loaded[0]["score"] == 0.5 and len(loaded) == len(dets)
    assert [p.name for p in out.parent.iterdir()] == ["dets.json"]  # no temp file left
    write_detections(out, [])  # overwrite in place
    assert json.loads(out.read_text()) == []
    # All detections are still true positives (no FP ranks above them): AP stays 1.
    assert evaluate_detections(gt_path, loaded)["AP"] == pytest.approx(1.0, abs=1e-6)
