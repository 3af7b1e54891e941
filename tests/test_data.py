"""Tests for curriculum.data: labels, crowd handling, exact box/pixel transforms, validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from curriculum.data import CocoDetection, View, collate_fn, decide_flip
from curriculum.errors import ConfigError, DataError


# ---- helpers ------------------------------------------------------------------------------------


def _write_image(path: Path, w: int, h: int, mode: str = "RGB", square: tuple[int, int, int, int] | None = None) -> None:
    """Black image, optionally with a white square at xyxy ``square`` (pixel bounds)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    if square is not None:
        x1, y1, x2, y2 = square
        a[y1:y2, x1:x2] = 255
    img = Image.fromarray(a, "RGB")
    if mode == "P":
        img = img.convert("P")
    elif mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _make(
    tmp_path: Path,
    images: list[dict[str, Any]] | None = None,
    annotations: list[dict[str, Any]] | None = None,
    categories: list[dict[str, Any]] | None = None,
    write: bool = True,
    name: str = "instances.json",
) -> tuple[Path, Path]:
    """Writes a tiny COCO data set (images drawn to match their width/height); returns (dir, ann)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}]
    if annotations is None:
        annotations = []
    if categories is None:
        categories = [{"id": 1, "name": "thing"}]
    if write:
        for im in images:
            if "file_name" in im and "width" in im and "height" in im:
                _write_image(img_dir / im["file_name"], im["width"], im["height"], im.get("_mode", "RGB"))
    clean = [{k: v for k, v in im.items() if not k.startswith("_")} for im in images]
    ann = tmp_path / name
    ann.write_text(json.dumps({"images": clean, "annotations": annotations, "categories": categories}))
    return img_dir, ann


def _ann(aid: int, image_id: int, bbox: list[float], cat: int = 1, **kw: Any) -> dict[str, Any]:
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


# ---- labels, crowd, empty images, colour modes ----------------------------------------------------


def test_contiguous_labels_from_sparse_category_ids(tmp_path: Path) -> None:
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}]
    anns = [_ann(1, 1, [0, 0, 10, 10], cat=90), _ann(2, 1, [5, 5, 10, 10], cat=3), _ann(3, 1, [1, 1, 5, 5], cat=17)]
    d, a = _make(tmp_path, annotations=anns, categories=cats)
    ds = CocoDetection(d, a, 64)
    assert ds.category_to_label == {3: 1, 17: 2, 90: 3}
    assert ds.label_to_category == {1: 3, 2: 17, 3: 90}
    assert ds.class_names == ["__background__", "car", "cat", "toothbrush"]
    assert ds.num_classes == 4
    _, t = ds[0]
    assert t["labels"].dtype == torch.int64
    assert t["labels"].tolist() == [3, 1, 2]


def test_crowd_excluded_from_targets(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [10, 20, 40, 40]), _ann(2, 1, [0, 0, 100, 50], iscrowd=1)]
    d, a = _make(tmp_path, annotations=anns)
    ds = CocoDetection(d, a, (100, 200))  # identity resize
    _, t = ds[0]
    assert t["boxes"].tolist() == [[10, 20, 50, 60]]
    assert t["labels"].tolist() == [1]
    assert t["crowd_boxes"].tolist() == [[0, 0, 100, 50]]
    # ...but the crowd annotation stays in the COCO object for evaluation.
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2


def test_empty_image_kept(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
        {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
    ]
    d, a = _make(tmp_path, images=images, annotations=[_ann(1, 1, [1, 1, 5, 5])])
    ds = CocoDetection(d, a, 32)
    assert len(ds) == 2 and ds.image_ids == [1, 2]
    img, t = ds[1]
    assert img.shape == (3, 32, 32)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["crowd_boxes"].shape == (0, 4)
    assert t["image_id"] == 2 and isinstance(t["image_id"], int)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_colour_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    d, a = _make(tmp_path, images=[{"id": 1, "file_name": "g.png", "width": 20, "height": 10, "_mode": mode}])
    ds = CocoDetection(d, a, (10, 20))
    img, _ = ds[0]
    assert img.shape == (3, 10, 20) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_sample_format_and_collate(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
        {"id": 2, "file_name": "b.png", "width": 30, "height": 60},
    ]
    d, a = _make(tmp_path, images=images, annotations=[_ann(1, 2, [1, 1, 5, 5])])
    ds = CocoDetection(d, a, (48, 64))
    imgs, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(imgs, list) and isinstance(targets, list)
    assert [tuple(i.shape) for i in imgs] == [(3, 48, 64), (3, 48, 64)]
    assert targets[1]["view"] == View(60, 30, 48, 64, False)
    assert {"boxes", "labels", "image_id", "view", "crowd_boxes"} <= set(targets[0])


# ---- View: exact boxes and pixels -------------------------------------------------------------------


def test_map_boxes_hand_computed() -> None:
    # orig 100 (h) x 200 (w) -> 128 x 128: sx = 0.64, sy = 1.28.
    b = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    v = View(orig_h=100, orig_w=200, out_h=128, out_w=128, flip=False)
    assert torch.allclose(v.map_boxes(b), torch.tensor([[6.4, 25.6, 32.0, 76.8]]), atol=1e-5)
    vf = View(orig_h=100, orig_w=200, out_h=128, out_w=128, flip=True)
    # x' = 128 - x: [128 - 32, 25.6, 128 - 6.4, 76.8]
    assert torch.allclose(vf.map_boxes(b), torch.tensor([[96.0, 25.6, 121.6, 76.8]]), atol=1e-5)
    assert vf.map_boxes(b).dtype == torch.float32


@pytest.mark.parametrize("flip", [False, True])
def test_unmap_inverts_map(flip: bool) -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * torch.tensor([333.0, 217.0])
    wh = torch.rand(50, 2, generator=g) * 50 + 1
    b = torch.cat([xy, xy + wh], dim=1)
    v = View(217, 333, 128, 96, flip)
    assert torch.allclose(v.unmap_boxes(v.map_boxes(b)), b, atol=1e-4)
    b64 = b.double()
    assert torch.allclose(v.unmap_boxes(v.map_boxes(b64)), b64, atol=1e-9, rtol=0)
    assert v.map_boxes(torch.zeros(0, 4)).shape == (0, 4)


def test_view_dict_and_key() -> None:
    v = View(100, 200, 128, 128, True)
    assert v.key() == "h128w128f1"
    assert View(100, 200, 64, 96, False).key() == "h64w96f0"
    assert View.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    with pytest.raises(ValueError):
        View.from_dict({"orig_h": 1})


@pytest.mark.parametrize("flip", ["none", "always"])
def test_pixels_follow_boxes(tmp_path: Path, flip: str) -> None:
    square = (40, 30, 80, 50)  # xyxy pixel bounds of a white square, left half of a 200x100 image
    _write_image(tmp_path / "images" / "s.png", 200, 100, square=square)
    d, a = _make(
        tmp_path,
        images=[{"id": 7, "file_name": "s.png", "width": 200, "height": 100}],
        annotations=[_ann(1, 7, [40, 30, 40, 20])],
        write=False,
    )
    ds = CocoDetection(d, a, 128, flip=flip)
    img, t = ds[0]
    assert t["view"].flip is (flip == "always")
    x1, y1, x2, y2 = t["boxes"][0].tolist()
    # Interior of the mapped box (shrunk by 1 px for the filter's blur) is white...
    inner = img[:, int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1]
    assert float(inner.min()) > 0.95
    # ...and everything beyond 2 px outside it is black.
    mask = torch.ones(128, 128, dtype=torch.bool)
    mask[max(0, int(y1) - 2) : int(y2) + 3, max(0, int(x1) - 2) : int(x2) + 3] = False
    assert float(img[:, mask].max()) < 0.05
    # The brightness centroid equals the box centre.
    w = img[0]
    ys, xs = torch.meshgrid(torch.arange(128.0) + 0.5, torch.arange(128.0) + 0.5, indexing="ij")
    cx, cy = float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())
    assert abs(cx - (x1 + x2) / 2) < 0.05 and abs(cy - (y1 + y2) / 2) < 0.05
    if flip == "always":
        assert x1 > 64  # the square moved to the right half


# ---- random flip determinism ----------------------------------------------------------------------


def test_random_flip_deterministic_and_varies(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 21)]
    d, a = _make(tmp_path, images=images)
    ds1 = CocoDetection(d, a, 8, flip="random", seed=3)
    ds2 = CocoDetection(d, a, 8, flip="random", seed=3)

    def flips(ds: CocoDetection, epoch: int) -> list[bool]:
        ds.set_epoch(epoch)
        return [ds[i][1]["view"].flip for i in range(len(ds))]

    e0 = flips(ds1, 0)
    assert e0 == flips(ds2, 0)  # same (seed, epoch, image) -> same view
    assert e0 == [decide_flip(3, 0, i) for i in range(1, 21)]
    assert e0 == [ds1.view_for(i, epoch=0).flip for i in range(20)]
    assert 0 < sum(e0) < 20
    assert e0 != flips(ds1, 1)  # varies across epochs
    assert e0 != flips(CocoDetection(d, a, 8, flip="random", seed=4), 0)  # and across seeds
    assert all(v for v in flips(CocoDetection(d, a, 8, flip="always"), 5))
    assert not any(flips(CocoDetection(d, a, 8, flip="none"), 5))


# ---- validation errors -------------------------------------------------------------------------------


def _raises(match_all: list[str], *args: Any, **kwargs: Any) -> str:
    with pytest.raises(DataError) as ei:
        ds = CocoDetection(*args, **kwargs)
        ds[0]
    msg = str(ei.value)
    for s in match_all:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def test_missing_annotation_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _raises(["nope.json", "not found"], tmp_path / "images", tmp_path / "nope.json", 32)


def test_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    ann = tmp_path / "broken.json"
    ann.write_text('{\n  "images": [\n    {"id": 1,,}\n  ]\n}')
    _raises(["broken.json", "line 3", "column"], tmp_path / "images", ann, 32)


def test_missing_top_level_key(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    ann = tmp_path / "inst.json"
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    _raises(["inst.json", "categories"], tmp_path / "images", ann, 32)


def test_empty_dataset(tmp_path: Path) -> None:
    d, a = _make(tmp_path, images=[])
    _raises(["instances.json", "empty"], d, a, 32)


@pytest.mark.parametrize("drop", ["file_name", "width", "height"])
def test_image_entry_missing_field(tmp_path: Path, drop: str) -> None:
    im = {"id": 42, "file_name": "a.png", "width": 20, "height": 10}
    _write_image(tmp_path / "images" / "a.png", 20, 10)
    del im[drop]
    d, a = _make(tmp_path, images=[im], write=False)
    _raises(["instances.json", "image id 42", drop], d, a, 32)


def test_image_entry_missing_id(tmp_path: Path) -> None:
    d, a = _make(tmp_path, images=[{"file_name": "a.png", "width": 20, "height": 10}])
    _raises(["instances.json", "images[0]", "'id'"], d, a, 32)


def test_annotation_unknown_image(tmp_path: Path) -> None:
    d, a = _make(tmp_path, annotations=[_ann(55, 999, [1, 1, 2, 2])])
    _raises(["instances.json", "annotation id 55", "image id 999"], d, a, 32)


def test_annotation_unknown_category(tmp_path: Path) -> None:
    d, a = _make(tmp_path, annotations=[_ann(56, 1, [1, 1, 2, 2], cat=12)])
    _raises(["instances.json", "annotation id 56", "category id 12"], d, a, 32)


def test_missing_image_files(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"img{i}.png", "width": 8, "height": 8} for i in range(1, 9)]
    d, a = _make(tmp_path, images=images)
    for i in (2, 5, 7):
        (d / f"img{i}.png").unlink()
    msg = _raises(["instances.json", "3 of 8", "img2.png", "img5.png", "img7.png"], d, a, 32)
    assert "img1.png" not in msg


def test_image_in_subdirectory_found(tmp_path: Path) -> None:
    d, a = _make(tmp_path, images=[{"id": 1, "file_name": "sub/x.png", "width": 8, "height": 8}])
    assert len(CocoDetection(d, a, 8)) == 1


def test_corrupt_image(tmp_path: Path) -> None:
    d, a = _make(tmp_path, images=[{"id": 9, "file_name": "bad.jpg", "width": 8, "height": 8}], write=False)
    (d / "bad.jpg").write_bytes(b"this is not a jpeg")
    ds = CocoDetection(d, a, 8)  # existence is all construction checks
    with pytest.raises(DataError) as ei:
        ds[0]
    assert "bad.jpg" in str(ei.value) and "image id 9" in str(ei.value)
    with pytest.raises(DataError, match="bad.jpg"):
        ds.validate_images()


def test_truncated_image(tmp_path: Path) -> None:
    d, a = _make(tmp_path, images=[{"id": 3, "file_name": "t.png", "width": 64, "height": 64}], write=False)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "t.png")
    data = (d / "t.png").read_bytes()
    (d / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        CocoDetection(d, a, 8)[0]


def test_size_mismatch(tmp_path: Path) -> None:
    d, a = _make(tmp_path, images=[{"id": 4, "file_name": "m.png", "width": 30, "height": 20}], write=False)
    _write_image(d / "m.png", 31, 20)
    ds = CocoDetection(d, a, 8)
    with pytest.raises(DataError) as ei:
        ds[0]
    msg = str(ei.value)
    assert "m.png" in msg and "image id 4" in msg and "31x20" in msg and "30x20" in msg
    with pytest.raises(DataError) as ei:
        ds.validate_images()
    assert "m.png" in str(ei.value) and "31x20" in str(ei.value)


def test_validate_images_ok(tmp_path: Path) -> None:
    d, a = _make(tmp_path)
    CocoDetection(d, a, 8).validate_images()


def test_bad_config(tmp_path: Path) -> None:
    d, a = _make(tmp_path)
    with pytest.raises(ConfigError):
        CocoDetection(d, a, 8, flip="sometimes")
    with pytest.raises(ConfigError):
        CocoDetection(d, a, 8, on_bad_box="ignore")
    with pytest.raises(ConfigError):
        CocoDetection(d, a, (0, 8))


# ---- bad boxes -----------------------------------------------------------------------------------------


def _bad_box_anns() -> list[dict[str, Any]]:
    # Image 1 is 200 (w) x 100 (h).
    return [
        _ann(1, 1, [10, 20, 40, 40]),  # fine
        _ann(2, 1, [-10, 20, 40, 40]),  # partly outside left -> [0, 20, 30, 60]
        _ann(3, 1, [180, 90, 40, 40]),  # partly outside right/bottom -> [180, 90, 200, 100]
        _ann(4, 1, [10, 10, 0, 5]),  # zero width
        _ann(5, 1, [10, 10, 5, -1]),  # negative height
        _ann(6, 1, [300, 10, 5, 5]),  # entirely outside
        _ann(7, 1, [10, 100, 5, 5]),  # touches the bottom edge only: outside
        _ann(8, 1, [0, 0, 200.004, 100]),  # float noise: clipped silently
    ]


def test_bad_boxes_clip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d, a = _make(tmp_path, annotations=_bad_box_anns())
    with caplog.at_level(logging.WARNING, logger="curriculum.data"):
        ds = CocoDetection(d, a, (100, 200), on_bad_box="clip")
    assert ds.box_fixes == {
        "clipped": 2,
        "dropped_partly_outside": 0,
        "dropped_outside": 2,
        "dropped_non_positive": 2,
        "dropped_non_finite": 0,
    }
    _, t = ds[0]
    assert t["boxes"].tolist() == [[10, 20, 50, 60], [0, 20, 30, 60], [180, 90, 200, 100], [0, 0, 200, 100]]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "instances.json" in msg and "2 boxes partly outside the image clipped" in msg
    assert "annotation ids 2, 3" in msg and "annotation ids 4, 5" in msg and "annotation ids 6, 7" in msg


def test_bad_boxes_drop(tmp_path: Path) -> None:
    d, a = _make(tmp_path, annotations=_bad_box_anns())
    ds = CocoDetection(d, a, (100, 200), on_bad_box="drop")
    assert ds.box_fixes["clipped"] == 0 and ds.box_fixes["dropped_partly_outside"] == 2
    assert ds.box_fixes["dropped_outside"] == 2 and ds.box_fixes["dropped_non_positive"] == 2
    _, t = ds[0]
    assert t["boxes"].tolist() == [[10, 20, 50, 60], [0, 0, 200, 100]]


def test_bad_boxes_error(tmp_path: Path) -> None:
    d, a = _make(tmp_path, annotations=[_ann(1, 1, [10, 20, 40, 40]), _ann(77, 1, [190, 10, 20, 5])])
    _raises(["instances.json", "annotation id 77", "a.png"], d, a, 32, on_bad_box="error")


def test_no_warning_for_clean_boxes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d, a = _make(tmp_path, annotations=[_ann(1, 1, [10, 20, 40, 40])])
    with caplog.at_level(logging.WARNING, logger="curriculum.data"):
        ds = CocoDetection(d, a, 32, on_bad_box="error")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert set(ds.box_fixes.values()) == {0}


def test_non_finite_box_dropped(tmp_path: Path) -> None:
    # json writes/reads NaN and Infinity literals, as some exporters do.
    d, a = _make(tmp_path, annotations=[_ann(1, 1, [float("nan"), 2, 3, 4]), _ann(2, 1, [1, 2, float("inf"), 4])])
    ds = CocoDetection(d, a, 32)
    assert ds.box_fixes["dropped_non_finite"] == 2
    assert ds[0][1]["boxes"].shape == (0, 4)


def test_malformed_bbox(tmp_path: Path) -> None:
    d, a = _make(tmp_path, annotations=[_ann(31, 1, [1, 2, 3])])
    _raises(["instances.json", "annotation id 31", "bbox"], d, a, 32)
