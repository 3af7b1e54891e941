"""Instance masks in the data (issue 16): COCO polygons, RLE and crowd RLE read into masks that follow every view
transform exactly like the boxes; bad or missing segmentations get the bad-box treatment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curriculum.data import CocoDetection, Resize, View, segmentation_to_mask
from curriculum.errors import DataError
from curriculum.shapes import mask_rle


def _write(tmp_path: Path, anns: list[dict], w: int = 100, h: int = 60) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(images / "a.png")
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, **a} for k, a in enumerate(anns)],
        "categories": [{"id": 1, "name": "thing"}]}))
    return images, ann


SQUARE = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]  # pixels 10..29 x 10..29 (pycocotools' rasteriser)


def test_a_polygon_follows_resize_and_flip_like_its_box(tmp_path):
    ring = np.zeros((60, 100), dtype=bool)
    ring[20:50, 50:90] = True
    ring[30:40, 60:80] = False  # a hole: only RLE says it exactly
    images, ann = _write(tmp_path, [{"bbox": [10, 10, 20, 20], "area": 400.0, "segmentation": SQUARE},
                                    {"bbox": [50, 20, 40, 30], "area": float(ring.sum()), "segmentation": mask_rle(ring)}])
    for resize, flip in [(Resize("keep_ratio", min_size=(30,), max_size=100), "none"),
                         (Resize("keep_ratio", min_size=(30,), max_size=100), "always"),
                         (Resize("fixed", (64, 64)), "always")]:
        ds = CocoDetection(images, ann, resize, flip=flip, masks=True)
        image, target = ds[0]
        view: View = target["view"]
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (2, view.out_h, view.out_w) == (2, *image.shape[-2:])
        # The same masks by hand: decoded in the original image, resized nearest as torchvision does, flipped.
        want = torch.from_numpy(np.stack([segmentation_to_mask(SQUARE, 60, 100), ring.astype(np.uint8)]))
        want = torch.nn.functional.interpolate(want[:, None].float(), size=(view.out_h, view.out_w))[:, 0]
        want = torch.flip(want, dims=(-1,)) if view.flip else want
        assert torch.equal(masks, want.to(torch.uint8))
        # The mask sits inside its box, which follows the same view.
        for m, b in zip(masks, target["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert b[0] - 1 <= xs.min() and xs.max() + 1 <= b[2] + 1 and b[1] - 1 <= ys.min() and ys.max() + 1 <= b[3] + 1
    # keep_ratio at min_size 30: scale 0.5, the square's 20x20 pixels become 10x10, flipped to the right edge.
    ds = CocoDetection(images, ann, Resize("keep_ratio", min_size=(30,), max_size=100), flip="always", masks=True)
    m = ds[0][1]["masks"][0]
    assert m.sum() == 100 and m[5:15, 35:45].all()


def test_crowd_rle_is_read_and_kept_out_of_the_targets(tmp_path):
    crowd = np.zeros((60, 100), dtype=np.uint8)
    crowd[0:10, 0:100] = 1
    counts, prev, run = [], 0, 0
    for v in crowd.flatten(order="F"):  # uncompressed RLE, column-major, starting with zeros
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    counts.append(run)
    images, ann = _write(tmp_path, [{"bbox": [10, 10, 20, 20], "area": 400.0, "segmentation": SQUARE},
                                    {"bbox": [0, 0, 100, 10], "area": 1000.0, "iscrowd": 1,
                                     "segmentation": {"size": [60, 100], "counts": counts}}])
    ds = CocoDetection(images, ann, 60, masks=True)
    target = ds[0][1]
    assert target["masks"].shape[0] == 1 and len(target["crowd_boxes"]) == 1
    assert np.array_equal(segmentation_to_mask({"size": [60, 100], "counts": counts}, 60, 100), crowd)


@pytest.mark.parametrize("seg, why", [
    (None, "has no 'segmentation'"),
    ([[1.0, 2.0, 3.0]], "has a malformed polygon"),
    ({"size": [10, 10], "counts": "abc"}, r"has an RLE segmentation of size \[10, 10\] for an image of 60x100"),
    ("oops", "has a segmentation of type str"),
])
def test_bad_segmentations_are_errors_or_dropped_and_counted(tmp_path, seg, why):
    bad = {"bbox": [50, 20, 10, 10], "area": 100.0}
    if seg is not None:
        bad["segmentation"] = seg
    images, ann = _write(tmp_path, [{"bbox": [10, 10, 20, 20], "area": 400.0, "segmentation": SQUARE}, bad])
    with pytest.raises(DataError, match=rf"instances.json: annotation id 2 \(image id 1, a.png, 100x60\) {why}"):
        CocoDetection(images, ann, 64, on_bad_box="error", masks=True)
    ds = CocoDetection(images, ann, 64, on_bad_box="drop", masks=True)
    assert len(ds[0][1]["boxes"]) == 1 and sum(ds.mask_fixes.values()) == 1
    assert len(CocoDetection(images, ann, 64)[0][1]["boxes"]) == 2  # without masks the box data set is unchanged
