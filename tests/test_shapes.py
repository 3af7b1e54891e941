"""Tests for the built-in synthetic shapes data set (curriculum/shapes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from curriculum.errors import ConfigError
from curriculum.shapes import (
    CATEGORIES,
    ShapesDifficulty,
    coco_size_bucket,
    make_shapes,
    mask_bbox,
    render_shapes_image,
    visible_masks,
)

TRAIN, VAL, SIZE = 20, 8, 64


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    summary = make_shapes(out, train_images=TRAIN, val_images=VAL, image_size=SIZE, seed=3)
    return out, summary


def test_layout_and_determinism(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = dataset
    again = make_shapes(tmp_path / "again", train_images=TRAIN, val_images=VAL, image_size=SIZE, seed=3)
    first, second = _files(out), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert first == second  # byte-identical PNGs and JSON
    assert "shapes.json" in first
    assert "train/instances.json" in first and "val/instances.json" in first
    assert sum(k.startswith("train/images/") for k in first) == TRAIN
    assert sum(k.startswith("val/images/") for k in first) == VAL
    assert {k: v for k, v in again.items() if k != "out_dir"} == {
        k: v for k, v in summary.items() if k != "out_dir"
    }


def test_shapes_json_records_parameters(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    meta = json.loads((out / "shapes.json").read_text())
    assert meta["generator"] == "curriculum.shapes" and meta["version"] == summary["version"]
    params = meta["params"]
    assert (params["train_images"], params["val_images"], params["image_size"], params["seed"]) == (TRAIN, VAL, SIZE, 3)
    for field in ShapesDifficulty.__dataclass_fields__:
        assert field in params
    assert meta["summary"]["total"]["images"] == TRAIN + VAL


@pytest.mark.parametrize("split, count", [("train", TRAIN), ("val", VAL)])
def test_coco_loads_and_boxes_are_valid(dataset: tuple[Path, dict], split: str, count: int) -> None:
    out, summary = dataset
    coco = COCO(str(out / split / "instances.json"))
    assert sorted(coco.getCatIds()) == [cid for cid, _ in CATEGORIES]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [n for _, n in CATEGORIES]
    assert len(coco.getImgIds()) == count
    data = json.loads((out / split / "instances.json").read_text())
    assert data["licenses"] == [] and "info" in data
    for img in coco.loadImgs(coco.getImgIds()):
        path = out / split / "images" / img["file_name"]
        assert "/" not in img["file_name"] and path.is_file()
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.format == "PNG"
            assert im.size == (img["width"], img["height"]) == (SIZE, SIZE)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == summary[split]["objects"]
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert w > 0 and h > 0
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
        assert a["iscrowd"] == 0
        assert 0 < a["area"] <= w * h
    classes = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds())}
    if split == "train":
        assert len(classes) >= 4
    assert sum(summary[split]["per_class"].values()) == summary[split]["objects"]
    buckets = [coco_size_bucket(a["area"]) for a in anns]
    for bucket in ("small", "medium", "large"):
        assert summary[split][bucket] == buckets.count(bucket)


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = make_shapes(tmp_path / "a", train_images=3, val_images=1, image_size=SIZE, seed=0)
    b = make_shapes(tmp_path / "b", train_images=3, val_images=1, image_size=SIZE, seed=1)
    assert a["total"]["images"] == b["total"]["images"] == 4
    for i in range(3):
        name = f"train/images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


def test_images_render_independently_of_order(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for index in (7, 0):
        pixels, anns, _ = render_shapes_image(index, "val", seed=3, image_size=SIZE)
        with Image.open(out / "val" / "images" / f"{index:06d}.png") as im:
            assert np.array_equal(np.asarray(im), pixels)
        coco = json.loads((out / "val" / "instances.json").read_text())
        stored = [a["bbox"] for a in coco["annotations"] if a["image_id"] == index + 1]
        assert stored == [a["bbox"] for a in anns]


def test_workers_do_not_change_output(tmp_path: Path) -> None:
    make_shapes(tmp_path / "one", train_images=6, val_images=2, image_size=48, seed=5)
    make_shapes(tmp_path / "two", train_images=6, val_images=2, image_size=48, seed=5, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_mask_bbox_hand_constructed() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    assert mask_bbox(mask) is None
    mask[5, 3] = True
    assert mask_bbox(mask) == [3.0, 5.0, 1.0, 1.0]
    mask[2:4, 7:10] = True  # rows 2..3, cols 7..9
    assert mask_bbox(mask) == [3.0, 2.0, 7.0, 4.0]


def test_visible_masks_later_layers_occlude() -> None:
    # Layer 0: a 6x6 square at rows/cols 2..7. Layer 1 (drawn later) covers its right half.
    bottom = np.zeros((10, 10), dtype=bool)
    bottom[2:8, 2:8] = True
    top = np.zeros((10, 10), dtype=bool)
    top[0:10, 5:10] = True
    vis_bottom, vis_top = visible_masks([bottom, top])
    assert np.array_equal(vis_top, top)
    assert int(vis_bottom.sum()) == 6 * 3
    assert mask_bbox(vis_bottom) == [2.0, 2.0, 3.0, 6.0]
    # A third layer hiding the rest of layer 0 leaves nothing visible.
    cover = np.zeros((10, 10), dtype=bool)
    cover[2:8, 2:5] = True
    assert not visible_masks([bottom, top, cover])[0].any()
    assert visible_masks([]) == []


def test_occlusion_threshold_drops_objects() -> None:
    strict = ShapesDifficulty(min_visible=1.0)
    loose = ShapesDifficulty(min_visible=0.01)
    n_strict = n_loose = 0
    for i in range(10):
        n_strict += len(render_shapes_image(i, seed=1, image_size=SIZE, difficulty=strict)[1])
        n_loose += len(render_shapes_image(i, seed=1, image_size=SIZE, difficulty=loose)[1])
    assert n_strict < n_loose


def test_no_occlusion_mode_keeps_objects_whole() -> None:
    # Without overlap or truncation no object is partly hidden, so the visibility threshold
    # cannot change which objects are annotated, nor their boxes.
    whole = dict(allow_occlusion=False, max_truncation=0.0)
    for i in range(6):
        strict = render_shapes_image(i, seed=2, image_size=SIZE, difficulty=ShapesDifficulty(min_visible=1.0, **whole))
        loose = render_shapes_image(i, seed=2, image_size=SIZE, difficulty=ShapesDifficulty(min_visible=0.01, **whole))
        assert strict[1] == loose[1]
        assert np.array_equal(strict[0], loose[0])


def test_bad_arguments_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown knob"):
        make_shapes(tmp_path / "x", train_images=1, val_images=0, noise=3)
    with pytest.raises(ConfigError, match="min_visible"):
        make_shapes(tmp_path / "x", train_images=1, val_images=0, min_visible=0.0)
    with pytest.raises(ConfigError, match="distractors"):
        make_shapes(tmp_path / "x", train_images=1, val_images=0, distractors=(3, 1))
    with pytest.raises(ConfigError, match="seed"):
        make_shapes(tmp_path / "x", train_images=1, val_images=0, seed=-1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        make_shapes(foreign, train_images=1, val_images=0)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_regenerating_in_place_removes_stale_images(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    make_shapes(out, train_images=5, val_images=2, image_size=32)
    make_shapes(out, train_images=2, val_images=1, image_size=32)
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (out / "val" / "images").iterdir()) == ["000000.png"]


def test_coco_size_buckets() -> None:
    assert coco_size_bucket(1023) == "small"
    assert coco_size_bucket(1024) == "medium"
    assert coco_size_bucket(9215) == "medium"
    assert coco_size_bucket(9216) == "large"
