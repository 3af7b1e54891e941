"""Tests for the built-in synthetic shapes data set (curriculum/shapes.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from curriculum.data import segmentation_to_mask
from curriculum.errors import ConfigError
from curriculum.shapes import (
    CATEGORIES,
    ShapesDifficulty,
    coco_size_bucket,
    ensure_builtin_data,
    image_shape,
    make_shapes,
    mask_bbox,
    render_shapes_image,
    varied_size_bounds,
    visible_masks,
)

TRAIN, VAL, SIZE = 20, 8, 64
VARIED_TRAIN, VARIED_VAL = 24, 8
CLEAN = dict(lines=(0, 0), distractors=(0, 0), noise_std=0.0, texture_amp=0.0, shading=0.0, min_contrast=60.0,
             allow_occlusion=False, max_truncation=0.0)
"""Objects only, whole, on a smooth background: every changed pixel belongs to an annotated object."""


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


# ----------------------------------------------------------------------------- varied sizes

# Computed with the generator before `varied_sizes` existed: the option off must not change a byte.
# Version 3 (masks as RLE): the same images and annotations as version 2 (pins 3b46.., b7f6.., fadc..), each
# annotation with its `segmentation` added and the version in `info` raised.
SQUARE_PINS = {
    "shapes.json": "77aecdc080eed765338860f7794e8c19c37b8b9607c3098a947a652a57b24e2c",
    "train/instances.json": "63d9127d71e582ecb9a7ffa6146963b4254a400cbf8348db9bbb73e97cc96208",
    "val/instances.json": "84a0adb36b9245c9b3b2e9b2e046752b695e43850c8cab9d9b6ff42d8b875278",
}
SQUARE_PIXELS = "6c68b5da8a0c334e7e2429f170ce774fe33f558dec75d7bf8713129fa7583184"


def _pixel_digest(root: Path) -> str:
    """sha256 of the decoded pixels of every image (independent of the PNG encoder)."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for path in sorted((root / split / "images").iterdir()):
            with Image.open(path) as im:
                h.update(np.asarray(im).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes_varied") / "ds"
    make_shapes(out, train_images=VARIED_TRAIN, val_images=VARIED_VAL, image_size=SIZE, seed=3, varied_sizes=True)
    return out


def test_option_off_output_unchanged(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for name, digest in SQUARE_PINS.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert _pixel_digest(out) == SQUARE_PIXELS
    pixels, anns, counts = render_shapes_image(7, "val", seed=3, image_size=SIZE, varied_sizes=False)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels[0, 0].tolist() == [118, 109, 164] and pixels[40, 17].tolist() == [75, 117, 157]
    seg = anns[1].pop("segmentation")
    assert anns[1] == {"category_id": 7, "bbox": [13.0, 14.0, 24.0, 24.0], "area": 175.0}
    assert seg["size"] == [SIZE, SIZE] and segmentation_to_mask(seg, SIZE, SIZE).sum() == 175
    assert counts == {"dropped": 0, "distractors": 1}
    assert "varied_sizes" not in json.loads((out / "shapes.json").read_text())["params"]


def test_varied_sizes_vary_within_bounds(varied: Path) -> None:
    lo, hi = varied_size_bounds(SIZE)
    assert (lo, hi) == (48, 80)
    assert json.loads((varied / "shapes.json").read_text())["params"]["varied_sizes"] is True
    shapes = []
    for split in ("train", "val"):
        coco = json.loads((varied / split / "instances.json").read_text())
        for img in coco["images"]:
            with Image.open(varied / split / "images" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
            index = img["id"] - 1
            assert image_shape(index, split, seed=3, image_size=SIZE, varied_sizes=True) == (img["height"], img["width"])
            shapes.append((img["height"], img["width"]))
    for h, w in shapes:
        short, long = min(h, w), max(h, w)
        assert lo <= short <= hi and short <= long <= 2 * short
    assert len(set(shapes)) > len(shapes) // 2
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)  # both orientations
    assert max(max(s) for s in shapes) > 1.5 * SIZE
    # More draws: the bounds are reached and the aspect ratio spans [1, 2].
    many = [image_shape(i, "train", seed=0, image_size=128, varied_sizes=True) for i in range(300)]
    shorts = [min(s) for s in many]
    ratios = [max(s) / min(s) for s in many]
    assert 96 <= min(shorts) < 100 and 156 < max(shorts) <= 160
    assert min(ratios) < 1.05 and 1.9 < max(ratios) <= 2.0 and max(max(s) for s in many) <= 320
    assert 0.35 < sum(h > w for h, w in many) / len(many) < 0.65


@pytest.mark.parametrize("split", ["train", "val"])
def test_varied_boxes_lie_inside_their_images(varied: Path, split: str) -> None:
    coco = COCO(str(varied / split / "instances.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and len(anns) == len({a["id"] for a in anns})
    for a in anns:
        img = coco.loadImgs(a["image_id"])[0]
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and 0 <= x and 0 <= y
        assert x + w <= img["width"] and y + h <= img["height"]
        assert 0 < a["area"] <= w * h
    for img in coco.loadImgs(coco.getImgIds()):  # stored annotations are the renderer's
        _, rendered, _ = render_shapes_image(img["id"] - 1, split, seed=3, image_size=SIZE, varied_sizes=True)
        assert [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))] == [a["bbox"] for a in rendered]


def test_varied_objects_spread_over_the_whole_canvas(varied: Path) -> None:
    # Box centres along each elongated image's long axis, as a fraction of it: both ends are reached.
    along: dict[str, list[float]] = {"portrait": [], "landscape": []}
    for split in ("train", "val"):
        coco = json.loads((varied / split / "instances.json").read_text())
        sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
        for a in coco["annotations"]:
            width, height = sizes[a["image_id"]]
            x, y, w, h = a["bbox"]
            if height >= 1.4 * width:
                along["portrait"].append((y + h / 2) / height)
            elif width >= 1.4 * height:
                along["landscape"].append((x + w / 2) / width)
    for orientation, fractions in along.items():
        assert len(fractions) >= 8, orientation
        assert min(fractions) < 0.25 and max(fractions) > 0.75, orientation


@pytest.mark.parametrize("varied_sizes", [False, True])
def test_boxes_match_the_drawn_pixels(varied_sizes: bool) -> None:
    # With clutter off, an image rendered with empty_image_prob=1 is the same image's bare background
    # (same stream, same draws); every pixel that differs from it belongs to an object. Each box must
    # touch drawn pixels on all four edges and hold all of its object's drawn pixels, give or take the
    # antialiased rim (alpha < 0.5 is outside the mask; 2 px at the sharp tips of stars).
    objects = ShapesDifficulty(**CLEAN)
    bare = ShapesDifficulty(**CLEAN, empty_image_prob=1.0)
    checked = 0
    for i in range(8):
        kw = dict(seed=4, image_size=SIZE, varied_sizes=varied_sizes)
        pixels, anns, _ = render_shapes_image(i, "train", difficulty=objects, **kw)
        background, none, _ = render_shapes_image(i, "train", difficulty=bare, **kw)
        assert none == [] and background.shape == pixels.shape
        height, width = pixels.shape[:2]
        changed = (pixels != background).any(axis=2)
        covered = np.zeros_like(changed)
        for a in anns:
            x, y, w, h = (int(v) for v in a["bbox"])
            assert x + w <= width and y + h <= height
            inside = changed[y : y + h, x : x + w]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2] = True
            checked += 1
        assert not (changed & ~covered).any()  # no drawn pixel outside every box's rim
    assert checked >= 8


def test_varied_same_seed_gives_identical_files(varied: Path, tmp_path: Path) -> None:
    make_shapes(tmp_path / "again", train_images=VARIED_TRAIN, val_images=VARIED_VAL, image_size=SIZE, seed=3,
                varied_sizes=True)
    assert _files(varied) == _files(tmp_path / "again")


def test_varied_sizes_keep_the_renderer_stream(dataset: tuple[Path, dict]) -> None:
    # The sizes come from a stream of their own: the square set's draws stay the same, and a
    # varied image differs from its square twin only by its canvas.
    for i in range(4):
        square = render_shapes_image(i, "val", seed=3, image_size=SIZE)
        shape = image_shape(i, "val", seed=3, image_size=SIZE, varied_sizes=True)
        assert render_shapes_image(i, "val", seed=3, image_size=SIZE, varied_sizes=True)[0].shape == (*shape, 3)
        assert image_shape(i, "val", seed=3, image_size=SIZE) == (SIZE, SIZE)
        with Image.open(dataset[0] / "val" / "images" / f"{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), square[0])


def test_ensure_builtin_data_regenerates_when_varied_sizes_switch(tmp_path: Path) -> None:
    from curriculum.config import DataConfig, ShapesConfig

    root = tmp_path / "ds"
    data = DataConfig(root=str(root), image_size=32, shapes=ShapesConfig(train=2, val=1, seed=0))
    ensure_builtin_data(data)
    square = _files(root)
    ensure_builtin_data(data)
    assert _files(root) == square  # same settings: nothing rewritten
    data.shapes.varied_sizes = True
    ensure_builtin_data(data)
    assert json.loads((root / "shapes.json").read_text())["params"]["varied_sizes"] is True
    sizes = {(i["width"], i["height"]) for i in json.loads((root / "train" / "instances.json").read_text())["images"]}
    assert sizes != {(32, 32)}
    data.shapes.varied_sizes = False
    ensure_builtin_data(data)
    assert _files(root) == square


@pytest.mark.parametrize("which", ["dataset", "varied"])
def test_every_object_has_its_exact_visible_mask(which: str, request: pytest.FixtureRequest) -> None:
    """The RLE decodes to the visible pixels: their tight box is the bbox, their count the area."""
    root = request.getfixturevalue(which)
    root = root[0] if isinstance(root, tuple) else root
    for split in ("train", "val"):
        coco = json.loads((root / split / "instances.json").read_text())
        size = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
        for a in coco["annotations"]:
            h, w = size[a["image_id"]]
            assert a["segmentation"]["size"] == [h, w]
            m = segmentation_to_mask(a["segmentation"], h, w)
            ys, xs = np.nonzero(m)
            assert [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                    float(ys.max() - ys.min() + 1)] == a["bbox"] and m.sum() == a["area"], a["id"]
