"""COCO-format detection data with deterministic, recorded transforms.

Every sample carries the :class:`View` that produced it, so a later reader (a student trained
on cached teacher outputs, the evaluator mapping predictions back to the original image) can
replay or invert the exact transform the teacher saw.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``. Under that
convention a resize with ``align_corners=False`` maps ``x -> x * out_w / orig_w`` and a
horizontal flip of a ``W``-wide image maps ``x -> W - x``, exactly, so boxes follow the pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from curriculum.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FLIP_MODES = ("none", "random", "always")
BAD_BOX_MODES = ("clip", "drop", "error")

# Overhang beyond the image border up to this many pixels is float noise from annotation tools
# (COCO itself has boxes ending at 640.0001): clipped without counting it as a fix, so
# on_bad_box="error" stays usable on real data.
BOX_TOLERANCE_PX = 1e-2

# How many names / ids an error or warning lists before "...".
_LIST_FIRST = 5

BOX_FIX_KINDS = (
    "clipped",  # partly outside the image, clipped to it (on_bad_box="clip")
    "dropped_partly_outside",  # partly outside the image, dropped (on_bad_box="drop")
    "dropped_outside",  # no overlap with the image
    "dropped_non_positive",  # width or height <= 0
    "dropped_non_finite",  # NaN or infinite coordinate
)


# --------------------------------------------------------------------------------------------
# View: the transform of one input
# --------------------------------------------------------------------------------------------


SIZE_DIVISIBLE = 32  # a batch is padded to a multiple of this (torchvision's GeneralizedRCNNTransform default)
INTERPOLATIONS = ("antialias", "torchvision")


@dataclass(frozen=True)
class View:
    """Transform parameters of one model input: resize to ``(out_h, out_w)``, then maybe flip; the batch pads it
    at the bottom and right to a common size divisible by 32 (``padded_size`` for the view alone).

    ``interpolation`` records how the pixels were resampled: ``"antialias"`` (bilinear with antialiasing: the
    fixed-size resize, which may distort the aspect ratio) or ``"torchvision"`` (bilinear without antialiasing,
    exactly ``GeneralizedRCNNTransform``'s resize: the keep-ratio resize). Boxes are scaled per axis by
    ``out / orig`` either way, as torchvision's ``resize_boxes`` does.
    """

    orig_h: int
    orig_w: int
    out_h: int
    out_w: int
    flip: bool
    interpolation: str = "antialias"

    def __post_init__(self) -> None:
        for name in ("orig_h", "orig_w", "out_h", "out_w"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"View.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"View.flip must be a bool, got {self.flip!r}")
        object.__setattr__(self, "flip", bool(self.flip))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"View.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def scale_x(self) -> float:
        return self.out_w / self.orig_w

    @property
    def scale_y(self) -> float:
        return self.out_h / self.orig_h

    def padded_size(self, divisor: int = SIZE_DIVISIBLE) -> tuple[int, int]:
        """``(h, w)`` of this view alone in a batch: the output size rounded up to a multiple of `divisor`."""
        return padded_hw(self.out_h, self.out_w, divisor)

    def key(self) -> str:
        """Short stable id of the output config (e.g. ``h128w128f1``), for cache keys.

        The original size is left out: it is fixed per image, and the key identifies which view
        of that image was produced. A torchvision-interpolated view ends in ``t``.
        """
        return f"h{self.out_h}w{self.out_w}f{int(self.flip)}" + ("t" if self.interpolation == "torchvision" else "")

    def to_dict(self) -> dict[str, Any]:
        """The fields; ``interpolation`` only when not the default (so fixed-size caches keep their format)."""
        d: dict[str, Any] = {"orig_h": self.orig_h, "orig_w": self.orig_w, "out_h": self.out_h,
                             "out_w": self.out_w, "flip": self.flip}
        if self.interpolation != "antialias":
            d["interpolation"] = self.interpolation
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> View:
        keys = {"orig_h", "orig_w", "out_h", "out_w", "flip"}
        if not isinstance(d, dict) or not keys <= set(d) <= keys | {"interpolation"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"View.from_dict needs the keys {sorted(keys)} (and optionally 'interpolation'), "
                             f"got {got}")
        d = dict(d)
        if d.get("interpolation") is None:
            d.pop("interpolation", None)
        return cls(**d)

    def map_boxes(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Original-image xyxy boxes -> view coordinates (scale per axis, then flip ``x -> W - x``)."""
        b = _as_box_tensor(boxes_xyxy)
        out_dtype = b.dtype if b.is_floating_point() else torch.float32
        b = b.to(torch.float64)
        sx, sy = self.scale_x, self.scale_y
        x1, y1, x2, y2 = b.unbind(-1)
        x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        if self.flip:
            x1, x2 = self.out_w - x2, self.out_w - x1
        return torch.stack((x1, y1, x2, y2), dim=-1).to(out_dtype)

    def unmap_boxes(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`map_boxes`: puts predictions back into original-image coordinates."""
        b = _as_box_tensor(boxes_xyxy)
        out_dtype = b.dtype if b.is_floating_point() else torch.float32
        b = b.to(torch.float64)
        x1, y1, x2, y2 = b.unbind(-1)
        if self.flip:
            x1, x2 = self.out_w - x2, self.out_w - x1
        sx, sy = self.scale_x, self.scale_y
        x1, x2, y1, y2 = x1 / sx, x2 / sx, y1 / sy, y2 / sy
        return torch.stack((x1, y1, x2, y2), dim=-1).to(out_dtype)

    def apply_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Instance masks ``[N, orig_h, orig_w]`` into this view, as torchvision's transform resizes them (nearest),
        then flipped with the image; uint8."""
        if masks.shape[-2:] != (self.orig_h, self.orig_w):
            raise ValueError(f"View.apply_masks: masks are {tuple(masks.shape[-2:])} (h, w), the view was made for "
                             f"{(self.orig_h, self.orig_w)}")
        m = masks
        if (self.out_h, self.out_w) != (self.orig_h, self.orig_w) and m.shape[0]:
            m = F.interpolate(m[:, None].float(), size=(self.out_h, self.out_w))[:, 0]
        elif not m.shape[0]:
            m = m.new_zeros((0, self.out_h, self.out_w))
        if self.flip:
            m = torch.flip(m, dims=(-1,))
        return m.to(torch.uint8)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """Transform a float image ``[C, orig_h, orig_w]`` (or ``[B, C, H, W]``) into this view.

        ``align_corners=False`` is what makes the box mapping ``x * scale`` exact. ``antialias``: downscaling
        does not alias; ``torchvision``: the very call of torchvision's detection transform, so a torchvision
        model sees exactly the tensor it would see on its own.
        """
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
            raise ValueError("View.apply expects a tensor [C, H, W] or [B, C, H, W]")
        if not image.is_floating_point():
            raise TypeError(f"View.apply expects a floating-point image, got {image.dtype}")
        if tuple(image.shape[-2:]) != (self.orig_h, self.orig_w):
            raise ValueError(
                f"View.apply: image is {tuple(image.shape[-2:])} (h, w) but the view was made "
                f"for {(self.orig_h, self.orig_w)}"
            )
        x = image
        if (self.out_h, self.out_w) != (self.orig_h, self.orig_w):
            batched = x.dim() == 4
            x4 = x if batched else x.unsqueeze(0)
            x4 = F.interpolate(x4, size=(self.out_h, self.out_w), mode="bilinear", align_corners=False,
                               antialias=self.interpolation == "antialias")
            x = x4 if batched else x4.squeeze(0)
        if self.flip:
            x = torch.flip(x, dims=(-1,))
        return x


def padded_hw(h: int, w: int, divisor: int = SIZE_DIVISIBLE) -> tuple[int, int]:
    """An input of ``h x w`` alone in a batch: padded at the bottom and right to multiples of `divisor`."""
    return -(-int(h) // divisor) * divisor, -(-int(w) // divisor) * divisor


RESIZE_MODES = ("fixed", "keep_ratio")


@dataclass(frozen=True)
class Resize:
    """How an image becomes a model input: ``fixed`` to ``size`` (h, w), or ``keep_ratio`` as torchvision's
    detection transform does it: scale ``min(min_size / shorter side, max_size / longer side)``, output
    ``floor(side * scale)``. ``min_size`` with several values is multi-scale training: one size per image and
    epoch, chosen from (seed, epoch, image id) like the flip (:func:`decide_scale`); evaluation uses the largest.
    """

    mode: str = "fixed"
    size: tuple[int, int] = (128, 128)
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES}, got {self.mode!r}")
        object.__setattr__(self, "size", _resolve_size(self.size))
        mins = (self.min_size,) if _is_int(self.min_size) else tuple(self.min_size)
        if not mins or not all(_is_int(v) and v > 0 for v in mins):
            raise ConfigError(f"min_size must be a positive int or a list of them, got {self.min_size!r}")
        object.__setattr__(self, "min_size", mins)
        if not _is_int(self.max_size) or self.max_size <= 0:
            raise ConfigError(f"max_size must be a positive int, got {self.max_size!r}")
        if self.mode == "keep_ratio" and max(mins) > self.max_size:
            raise ConfigError(f"min_size {max(mins)} is larger than max_size {self.max_size}: the shorter side "
                              "could never reach it; raise max_size or lower min_size")

    @property
    def multi_scale(self) -> bool:
        return self.mode == "keep_ratio" and len(self.min_size) > 1

    def for_eval(self) -> Resize:
        """The evaluation resize: the largest ``min_size``."""
        if self.mode == "fixed":
            return self
        return Resize("keep_ratio", self.size, (max(self.min_size),), self.max_size)

    def scales(self) -> list[Resize]:
        """One single-scale resize per ``min_size`` (what a cache precomputes for multi-scale training)."""
        if self.mode == "fixed":
            return [self]
        return [Resize("keep_ratio", self.size, (m,), self.max_size) for m in self.min_size]

    def out_size(self, orig_h: int, orig_w: int, min_size: int | None = None) -> tuple[int, int]:
        """Output ``(h, w)`` of an ``orig_h x orig_w`` image (keep_ratio: at ``min_size``, default the largest)."""
        if self.mode == "fixed":
            return self.size
        m = max(self.min_size) if min_size is None else min_size
        scale = min(m / min(orig_h, orig_w), self.max_size / max(orig_h, orig_w))
        # torch.nn.functional.interpolate's output size for scale_factor with recompute_scale_factor=True
        return math.floor(float(orig_h) * scale), math.floor(float(orig_w) * scale)

    def view(self, orig_h: int, orig_w: int, flip: bool, min_size: int | None = None) -> View:
        h, w = self.out_size(orig_h, orig_w, min_size)
        if h <= 0 or w <= 0:
            raise ValueError(f"an image of {orig_w}x{orig_h} (w x h) resized with min_size {min_size or max(self.min_size)}"
                             f" and max_size {self.max_size} would be {w}x{h} pixels")
        return View(orig_h, orig_w, h, w, flip, "antialias" if self.mode == "fixed" else "torchvision")

    def to_dict(self) -> dict[str, Any]:
        """The cache's view config form: fixed ``{"out_h", "out_w"}`` (as before keep-ratio existed), keep-ratio
        ``{"resize", "min_size", "max_size"}``."""
        if self.mode == "fixed":
            return {"out_h": self.size[0], "out_w": self.size[1]}
        return {"resize": "keep_ratio", "min_size": list(self.min_size), "max_size": self.max_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Resize:
        if d.get("resize", "fixed") == "fixed":
            return cls("fixed", (int(d["out_h"]), int(d["out_w"])))
        return cls("keep_ratio", min_size=tuple(d["min_size"]), max_size=int(d["max_size"]))

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"{self.size[0]}x{self.size[1]}"
        return f"keep ratio, shorter side {'/'.join(map(str, self.min_size))}, longer side <= {self.max_size}"


def decide_scale(seed: int, epoch: int, image_id: int, count: int) -> int:
    """The multi-scale choice (index into ``min_size``): a pure function of (seed, epoch, image id), drawn from
    a stream apart from the flip's so that adding scales does not change the flips."""
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch) % 2**64, int(image_id) % 2**64, 1])
    return int(rng.integers(count))


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE with string or list counts) as a ``[height, width]`` uint8 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons: the union of the parts
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice, once per call
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why `seg` is not a usable COCO segmentation of a ``height x width`` image (None: it is)."""
    if seg is None:
        return "has no 'segmentation'"
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in seg):
            return ("has a malformed polygon segmentation (a list of [x1, y1, x2, y2, ...] lists of at least 3 points "
                    "is expected)")
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (str, list))):
            return "has a malformed RLE segmentation ({'size': [height, width], 'counts': ...} is expected)"
        if [int(size[0]), int(size[1])] != [height, width]:
            return f"has an RLE segmentation of size {size} for an image of {height}x{width} (h x w)"
        if isinstance(counts, list) and sum(counts) != height * width:
            return f"has RLE counts summing to {sum(counts)}, not height x width = {height * width}"
        return None
    return f"has a segmentation of type {type(seg).__name__} (polygons or RLE expected)"


def _as_box_tensor(boxes: torch.Tensor) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        boxes = torch.as_tensor(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4] (xyxy), got {tuple(boxes.shape)}")
    return boxes


def decide_flip(seed: int, epoch: int, image_id: int) -> bool:
    """The ``flip="random"`` decision: a pure function of (seed, epoch, image id).

    Independent of worker, order and process, so any reader can replay the teacher's view.
    """
    # default_rng needs non-negative entropy words; the modulo maps negative ids one-to-one.
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch) % 2**64, int(image_id) % 2**64])
    return bool(rng.random() < 0.5)


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Torchvision-detection style: images and targets as lists (targets differ in length)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


# --------------------------------------------------------------------------------------------
# Annotation-file validation
# --------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _first(items: Iterable[Any], n: int = _LIST_FIRST) -> str:
    items = list(items)
    s = ", ".join(str(i) for i in items[:n])
    return s + (", ..." if len(items) > n else "")


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise DataError(f"{path}: annotation file not found; check the path (ann_file).")
    if not path.is_file():
        raise DataError(f"{path}: annotation path is not a file; point ann_file at the COCO JSON.")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
            "fix the file (e.g. `python -m json.tool` shows the spot)."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSON.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file: {e.strerror or e}") from None


def _positive_int(x: Any) -> int | None:
    """width/height as written by various tools: ints, or integral floats such as 640.0."""
    if _is_int(x) and x > 0:
        return x
    if isinstance(x, float) and x.is_integer() and x > 0:
        return int(x)
    return None


def _resolve_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if _is_int(image_size):
        h = w = image_size
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(_is_int(v) for v in image_size)
    ):
        h, w = image_size
    else:
        raise ConfigError(f"image_size must be an int or a (height, width) pair of ints, got {image_size!r}")
    if h <= 0 or w <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size!r}")
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection data set whose samples record their transform (:class:`View`).

    - ``resize``: a :class:`Resize`, or an int (square) / ``(height, width)`` for a fixed size (the aspect
      ratio is then not kept). With several ``min_size`` values (multi-scale), each image's scale at an epoch
      comes from :func:`decide_scale`, like the flip.
    - ``flip``: ``"none"``, ``"always"`` or ``"random"``; random is decided by
      :func:`decide_flip` from ``(seed, epoch, image_id)``. Call :meth:`set_epoch` before
      creating the DataLoader iterator of each epoch (non-persistent workers copy the data set
      then).
    - ``on_bad_box``: what to do with a box partly outside its image: ``"clip"`` it to the
      image, ``"drop"`` it, or ``"error"`` (raise on any bad box). Boxes with non-positive size,
      non-finite coordinates or no overlap with the image are always dropped (or raise with
      ``"error"``). Fixes are counted in ``box_fixes`` and summarised in one warning.

    Images are listed in annotation-file order (``image_ids``). ``iscrowd=1`` annotations are
    kept out of ``boxes``/``labels`` and returned as ``crowd_boxes`` so losses can ignore those
    regions; ``coco`` keeps the original annotations (original coordinates) for evaluation.
    EXIF orientation is not applied: COCO boxes refer to the stored pixel grid.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        resize: Resize | int | tuple[int, int],
        flip: str = "none",
        seed: int = 0,
        on_bad_box: str = "clip",
        masks: bool = False,
    ) -> None:
        self.with_masks = bool(masks)
        self.mask_fixes: dict[str, int] = {}
        self.resize = resize if isinstance(resize, Resize) else Resize("fixed", _resolve_size(resize))
        if flip not in FLIP_MODES:
            raise ConfigError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        if on_bad_box not in BAD_BOX_MODES:
            raise ConfigError(f"on_bad_box must be one of {BAD_BOX_MODES}, got {on_bad_box!r}")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self.flip = flip
        self.seed = seed
        self.on_bad_box = on_bad_box
        self.epoch = 0
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)

        data = _load_json(self.ann_file)
        self._validate_top_level(data)
        self._parse_categories(data["categories"])
        self._parse_images(data["images"])
        self._parse_annotations(data["annotations"])
        self._check_image_files()
        self._check_resizable()
        self.coco = self._make_coco(data)

    # ---- construction helpers --------------------------------------------------------------

    def _validate_top_level(self, data: Any) -> None:
        f = self.ann_file
        if not isinstance(data, dict):
            raise DataError(
                f"{f}: the top level must be a JSON object with 'images', 'annotations' and "
                f"'categories', got a {type(data).__name__}; is this a COCO detection file?"
            )
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise DataError(
                f"{f}: missing top-level key(s) {missing}; a COCO detection file needs 'images', "
                "'annotations' and 'categories' (use an empty list for none)."
            )
        for k in ("images", "annotations", "categories"):
            if not isinstance(data[k], list):
                raise DataError(f"{f}: '{k}' must be a list, got a {type(data[k]).__name__}.")
        if not data["images"]:
            raise DataError(f"{f}: empty data set ('images' is empty); nothing to train or evaluate on.")
        if not data["categories"]:
            raise DataError(f"{f}: no categories ('categories' is empty); a detector needs at least one class.")

    def _parse_categories(self, cats: list) -> None:
        f = self.ann_file
        names: dict[int, str] = {}
        for i, c in enumerate(cats):
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise DataError(f"{f}: categories[{i}] has no integer 'id'; give every category an int id.")
            cid = c["id"]
            if cid in names:
                raise DataError(f"{f}: category id {cid} appears twice (categories[{i}]); ids must be unique.")
            name = c.get("name")
            if not isinstance(name, str) or not name:
                raise DataError(f"{f}: category id {cid} (categories[{i}]) has no 'name'; add a name string.")
            names[cid] = name
        cat_ids = sorted(names)
        self.category_to_label: dict[int, int] = {cid: k + 1 for k, cid in enumerate(cat_ids)}
        self.label_to_category: dict[int, int] = {k: cid for cid, k in self.category_to_label.items()}
        self.class_names: list[str] = ["__background__"] + [names[cid] for cid in cat_ids]
        self.num_classes: int = len(cat_ids) + 1

    def _parse_images(self, images: list) -> None:
        f = self.ann_file
        ids: list[int] = []
        files: list[str] = []
        hs: list[int] = []
        ws: list[int] = []
        index: dict[int, int] = {}
        for i, im in enumerate(images):
            if not isinstance(im, dict):
                raise DataError(f"{f}: images[{i}] is not an object.")
            iid = im.get("id")
            if not _is_int(iid):
                raise DataError(f"{f}: images[{i}] has no integer 'id'; give every image an int id.")
            missing = [k for k in ("file_name", "width", "height") if k not in im]
            if missing:
                raise DataError(
                    f"{f}: image id {iid} (images[{i}]) lacks {missing}; every image entry needs "
                    "id, file_name, width and height."
                )
            fn = im["file_name"]
            if not isinstance(fn, str) or not fn:
                raise DataError(f"{f}: image id {iid} (images[{i}]) has an empty or non-string file_name.")
            w, h = _positive_int(im["width"]), _positive_int(im["height"])
            if w is None or h is None:
                raise DataError(
                    f"{f}: image id {iid} ({fn}) has width={im['width']!r}, height={im['height']!r}; "
                    "both must be positive integers (the image's pixel size)."
                )
            if iid in index:
                raise DataError(
                    f"{f}: image id {iid} appears twice (images[{index[iid]}] and images[{i}], "
                    f"{files[index[iid]]} and {fn}); image ids must be unique."
                )
            index[iid] = i
            ids.append(iid)
            files.append(fn)
            hs.append(h)
            ws.append(w)
        self.image_ids: list[int] = ids
        self._index_of: dict[int, int] = index
        self._files: list[str] = files
        self._heights = np.asarray(hs, dtype=np.int64)
        self._widths = np.asarray(ws, dtype=np.int64)

    def _parse_annotations(self, anns: list) -> None:
        f = self.ann_file
        ann_ids: list[int] = []
        img_idx: list[int] = []
        labels: list[int] = []
        crowd: list[bool] = []
        bbox: list[Any] = []
        seen: set[int] = set()
        index_of, cat_to_label = self._index_of, self.category_to_label
        self._filled_area = self._filled_iscrowd = 0
        # Hot loop (COCO: 860k annotations): type checks are inlined; JSON yields exact int/float,
        # and `type(x) is int` also rejects bools.
        num = (int, float)
        for j, a in enumerate(anns):
            if type(a) is not dict:
                raise DataError(f"{f}: annotations[{j}] is not an object.")
            aid = a.get("id")
            if type(aid) is not int:
                raise DataError(f"{f}: annotations[{j}] has no integer 'id'; give every annotation an int id.")
            if aid in seen:
                raise DataError(f"{f}: annotation id {aid} appears twice (annotations[{j}]); ids must be unique.")
            seen.add(aid)
            iid = a.get("image_id")
            if type(iid) is not int or iid not in index_of:
                raise DataError(
                    f"{f}: annotation id {aid} (annotations[{j}]) references unknown image id "
                    f"{iid!r}; add that image to 'images' or remove the annotation."
                )
            cid = a.get("category_id")
            if type(cid) is not int or cid not in cat_to_label:
                raise DataError(
                    f"{f}: annotation id {aid} (annotations[{j}], image id {iid}) references unknown "
                    f"category id {cid!r}; add it to 'categories' or remove the annotation."
                )
            b = a.get("bbox")
            if not (
                type(b) is list
                and len(b) == 4
                and type(b[0]) in num
                and type(b[1]) in num
                and type(b[2]) in num
                and type(b[3]) in num
            ):
                raise DataError(
                    f"{f}: annotation id {aid} (annotations[{j}], image id {iid}) has bbox {b!r}; "
                    "it must be [x, y, width, height] numbers."
                )
            c = a.get("iscrowd", 0)
            if c != 0 and c != 1 or type(c) not in (int, float, bool):
                raise DataError(
                    f"{f}: annotation id {aid} (annotations[{j}], image id {iid}) has iscrowd={c!r}; use 0 or 1."
                )
            # COCOeval reads these from every ground-truth annotation: fill the usual omissions.
            if "iscrowd" not in a:
                a["iscrowd"] = 0
                self._filled_iscrowd += 1
            if "area" not in a:
                a["area"] = float(b[2]) * float(b[3])
                self._filled_area += 1
            ann_ids.append(aid)
            img_idx.append(index_of[iid])
            labels.append(cat_to_label[cid])
            crowd.append(bool(c))
            bbox.append(b)

        ids_a = np.asarray(ann_ids, dtype=np.int64)
        idx_a = np.asarray(img_idx, dtype=np.int64)
        bbox_a = np.asarray(bbox, dtype=np.float64).reshape(-1, 4)
        keep, boxes = self._fix_boxes(ids_a, idx_a, bbox_a)
        if self.with_masks:
            keep &= self._check_segmentations(anns, ids_a, idx_a)
        # Group per image: one stable sort, offsets into flat arrays (cheap to pickle to workers).
        ann_ids, img_idx, boxes = ids_a[keep], idx_a[keep], boxes[keep]
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)[keep]
        crowd = np.asarray(crowd, dtype=bool).reshape(-1)[keep]
        order = np.argsort(img_idx, kind="stable")
        self._ann_ids = ann_ids[order]
        self._labels = labels[order]
        self._crowd = crowd[order]
        self._boxes = boxes[order].astype(np.float32)
        self._offsets = np.searchsorted(img_idx[order], np.arange(len(self.image_ids) + 1))
        if self._filled_area or self._filled_iscrowd:
            logger.info(
                "%s: filled missing 'area' (bbox w*h) in %d and 'iscrowd' (0) in %d annotations for evaluation",
                f, self._filled_area, self._filled_iscrowd,
            )

    def _check_segmentations(self, anns: list, ann_ids: np.ndarray, img_idx: np.ndarray) -> np.ndarray:
        """Keep each annotation's `segmentation` (polygons, RLE, crowd RLE) for `__getitem__`; a missing or malformed
        one is an error (``on_bad_box="error"``) or drops its annotation, counted like a bad box."""
        by_id = {a["id"]: a.get("segmentation") for a in anns}
        ok = np.ones(len(ann_ids), dtype=bool)
        problems: dict[str, list[int]] = {"dropped_no_segmentation": [], "dropped_bad_segmentation": []}
        self._segmentations: dict[int, Any] = {}
        for j, (aid, i) in enumerate(zip(ann_ids.tolist(), img_idx.tolist())):
            seg = by_id[aid]
            h, w = int(self._heights[i]), int(self._widths[i])
            why = _segmentation_problem(seg, h, w)
            if why is None:
                self._segmentations[aid] = seg
                continue
            if self.on_bad_box == "error":
                raise DataError(f"{self.ann_file}: annotation id {aid} (image id {self.image_ids[i]}, {self._files[i]}, "
                                f"{w}x{h}) {why}; fix the segmentation or use on_bad_box='drop' to drop it.")
            ok[j] = False
            problems["dropped_no_segmentation" if seg is None else "dropped_bad_segmentation"].append(aid)
        self.mask_fixes = {k: len(v) for k, v in problems.items()}
        what = {"dropped_no_segmentation": "without a segmentation", "dropped_bad_segmentation": "with a malformed "
                "segmentation"}
        parts = [f"{len(v)} annotation(s) {what[k]} dropped (ids {_first(v)})" for k, v in problems.items() if v]
        if parts:
            logger.warning("%s: %s. Fix the annotations to silence this (masks: on).", self.ann_file.name, "; ".join(parts))
        return ok

    def _fix_boxes(
        self, ann_ids: np.ndarray, img_idx: np.ndarray, bbox: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Classify and fix every box at once; returns (keep mask, xyxy boxes in original pixels)."""
        W = self._widths[img_idx].astype(np.float64)
        H = self._heights[img_idx].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            x1, y1 = bbox[:, 0], bbox[:, 1]
            x2, y2 = x1 + bbox[:, 2], y1 + bbox[:, 3]
            non_finite = ~np.isfinite(np.stack([x1, y1, x2, y2], axis=1)).all(axis=1)
            ok = ~non_finite
            non_positive = ok & ((bbox[:, 2] <= 0) | (bbox[:, 3] <= 0))
            ok &= ~non_positive
            outside = ok & ((x2 <= 0) | (y2 <= 0) | (x1 >= W) | (y1 >= H))
            ok &= ~outside
            overhang = np.maximum.reduce([-x1, -y1, x2 - W, y2 - H])
            partly = ok & (overhang > BOX_TOLERANCE_PX)
        kinds = {
            "dropped_non_finite": non_finite,
            "dropped_non_positive": non_positive,
            "dropped_outside": outside,
            "clipped" if self.on_bad_box == "clip" else "dropped_partly_outside": partly,
        }
        if self.on_bad_box == "error":
            reasons = {
                "dropped_non_finite": "has a non-finite coordinate",
                "dropped_non_positive": "has non-positive width or height",
                "dropped_outside": "lies entirely outside its image",
                "dropped_partly_outside": "extends outside its image",
            }
            for kind, mask in kinds.items():
                if mask.any():
                    j = int(np.flatnonzero(mask)[0])
                    i = int(img_idx[j])
                    raise DataError(
                        f"{self.ann_file}: annotation id {int(ann_ids[j])} (image id {self.image_ids[i]}, "
                        f"{self._files[i]}, {self._widths[i]}x{self._heights[i]}) {reasons[kind]}: "
                        f"bbox {bbox[j].tolist()}; fix the annotation or use on_bad_box='clip' or 'drop'. "
                        f"{int(mask.sum())} box(es) have this problem."
                    )
        self.box_fixes: dict[str, int] = {k: 0 for k in BOX_FIX_KINDS}
        for kind, mask in kinds.items():
            self.box_fixes[kind] = int(mask.sum())
        keep = ok.copy()
        if self.on_bad_box == "drop":
            keep &= ~partly
        boxes = np.stack([np.clip(x1, 0, W), np.clip(y1, 0, H), np.clip(x2, 0, W), np.clip(y2, 0, H)], axis=1)
        self._warn_box_fixes(kinds, ann_ids)
        return keep, boxes

    def _warn_box_fixes(self, kinds: dict[str, np.ndarray], ann_ids: np.ndarray) -> None:
        text = {
            "clipped": ("box partly outside the image clipped to it", "boxes partly outside the image clipped to it"),
            "dropped_partly_outside": ("box partly outside the image dropped", "boxes partly outside the image dropped"),
            "dropped_outside": ("box entirely outside the image dropped", "boxes entirely outside the image dropped"),
            "dropped_non_positive": ("box with non-positive size dropped", "boxes with non-positive size dropped"),
            "dropped_non_finite": ("box with a non-finite coordinate dropped", "boxes with a non-finite coordinate dropped"),
        }
        parts = []
        for kind, mask in kinds.items():
            count = int(mask.sum())
            if count:
                ids = ann_ids[mask][: _LIST_FIRST + 1].tolist()
                word = "id" if count == 1 else "ids"
                parts.append(f"{count} {text[kind][count != 1]} (annotation {word} {_first(ids)})")
        if parts:
            logger.warning(
                "%s: %s. Fix the annotations to silence this (on_bad_box=%r).",
                self.ann_file.name, "; ".join(parts), self.on_bad_box,
            )

    def _check_resizable(self) -> None:
        """Every image gets a positive size under the resize (a very long thin image may not)."""
        for i in range(len(self.image_ids)):
            for m in self.resize.min_size if self.resize.mode == "keep_ratio" else (None,):
                try:
                    self.resize.view(int(self._heights[i]), int(self._widths[i]), False, m)
                except ValueError as e:
                    raise DataError(f"{self.ann_file}: image id {self.image_ids[i]} ({self._files[i]}): {e}; raise "
                                    "max_size, or crop or remove this image") from None

    def _check_image_files(self) -> None:
        """Existence of every image, via one directory listing per folder (cheap at COCO scale)."""
        if not self.image_dir.is_dir():
            raise DataError(
                f"{self.image_dir}: image directory not found (images of {self.ann_file}); check image_dir."
            )
        listings: dict[str, set[str] | None] = {}
        missing: list[str] = []
        for fn in self._files:
            head, tail = os.path.split(fn)
            if head not in listings:
                try:
                    listings[head] = {e.name for e in os.scandir(self.image_dir / head) if not e.is_dir()}
                except OSError:
                    listings[head] = None
            names = listings[head]
            if names is None or tail not in names:
                missing.append(fn)
        if missing:
            raise DataError(
                f"{self.ann_file}: {len(missing)} of {len(self._files)} image file(s) not found in "
                f"{self.image_dir}: {_first(missing)}; check image_dir or remove those images from the annotation file."
            )

    def _make_coco(self, data: dict) -> Any:
        """pycocotools COCO over the already-validated dict (no second parse), quietly."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    # ---- public API ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Selects the random flips of this epoch (see :func:`decide_flip`)."""
        if not _is_int(epoch) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def index_of(self, image_id: int) -> int:
        """Position of an image id in ``image_ids``."""
        try:
            return self._index_of[image_id]
        except KeyError:
            raise DataError(f"{self.ann_file}: no image with id {image_id!r}.") from None

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._files[index]

    def view_for(self, index: int, epoch: int | None = None) -> View:
        """The view of image ``index`` at ``epoch`` (default: current); lets readers replay it."""
        i = self._check_index(index)
        e = self.epoch if epoch is None else epoch
        if self.flip == "none":
            flip = False
        elif self.flip == "always":
            flip = True
        else:
            flip = decide_flip(self.seed, e, self.image_ids[i])
        min_size = None
        if self.resize.multi_scale:
            min_size = self.resize.min_size[decide_scale(self.seed, e, self.image_ids[i], len(self.resize.min_size))]
        return self.resize.view(int(self._heights[i]), int(self._widths[i]), flip, min_size)

    def _check_index(self, index: int) -> int:
        n = len(self.image_ids)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return i

    def _load_image(self, i: int) -> torch.Tensor:
        """Decode to float RGB ``[3, H, W]`` in [0, 1], checking the size against the annotation."""
        path = self.image_path(i)
        iid = self.image_ids[i]
        want_w, want_h = int(self._widths[i]), int(self._heights[i])
        try:
            with Image.open(path) as im:
                if im.size != (want_w, want_h):
                    raise DataError(
                        f"{path}: image id {iid} is {im.size[0]}x{im.size[1]} (w x h) but "
                        f"{self.ann_file.name} says {want_w}x{want_h}; fix width/height in the annotation "
                        "file or replace the image."
                    )
                arr = _to_rgb_array(im)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL raises UnidentifiedImageError (an OSError) for unknown formats, OSError for
            # truncated data, SyntaxError/ValueError from some plugins on broken headers.
            raise DataError(
                f"{path}: cannot read image id {iid} ({type(e).__name__}: {e}); replace the file "
                f"or remove it from {self.ann_file.name}."
            ) from None
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        i = self._check_index(index)
        view = self.view_for(i)
        image = view.apply(self._load_image(i)).clamp_(0.0, 1.0)
        lo, hi = self._offsets[i], self._offsets[i + 1]
        boxes = torch.from_numpy(self._boxes[lo:hi])
        crowd = torch.from_numpy(self._crowd[lo:hi])
        labels = torch.from_numpy(self._labels[lo:hi])
        target = {
            "boxes": view.map_boxes(boxes[~crowd]).reshape(-1, 4),
            "labels": labels[~crowd],
            "image_id": int(self.image_ids[i]),
            "view": view,
            "crowd_boxes": view.map_boxes(boxes[crowd]).reshape(-1, 4),
        }
        if self.with_masks:
            ids = self._ann_ids[lo:hi][~crowd.numpy()]
            target["masks"] = view.apply_masks(self.decode_masks(ids.tolist(), view.orig_h, view.orig_w))
        return image, target

    def decode_masks(self, ann_ids: Sequence[int], height: int, width: int) -> torch.Tensor:
        """The instance masks ``[N, height, width]`` (uint8, 0/1) of these annotations, in the original image."""
        if not ann_ids:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        return torch.from_numpy(np.stack([segmentation_to_mask(self._segmentations[a], height, width)
                                          for a in ann_ids]))

    def validate_images(self) -> None:
        """Checks every image header (size, readability) up front, without decoding pixels.

        ``__getitem__`` checks the same lazily; this finds all problems at once before a long
        run. Raises one DataError listing the first few bad files.
        """
        bad_size: list[str] = []
        unreadable: list[str] = []
        for i, fn in enumerate(self._files):
            path = self.image_dir / fn
            try:
                with Image.open(path) as im:
                    size = im.size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                unreadable.append(f"{fn} (image id {self.image_ids[i]}: {type(e).__name__})")
                continue
            want = (int(self._widths[i]), int(self._heights[i]))
            if size != want:
                bad_size.append(
                    f"{fn} (image id {self.image_ids[i]}: file {size[0]}x{size[1]}, annotation {want[0]}x{want[1]})"
                )
        problems = []
        if unreadable:
            problems.append(f"{len(unreadable)} unreadable: {_first(unreadable)}")
        if bad_size:
            problems.append(f"{len(bad_size)} with a size (w x h) differing from the annotation: {_first(bad_size)}")
        if problems:
            raise DataError(
                f"{self.ann_file}: images in {self.image_dir}: " + "; ".join(problems)
                + ". Replace those files or fix/remove their entries."
            )


def annotation_class_names(ann_file: str | os.PathLike) -> list[str]:
    """Label names of a COCO file as `CocoDetection` numbers them (background, then by category id), read from its
    categories alone (no image is checked)."""
    data = _load_json(Path(ann_file))
    try:
        by_id = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{ann_file}: cannot read the categories ({type(e).__name__}: {e}); each needs an id and a "
                        "name") from None
    return ["__background__"] + [by_id[k] for k in sorted(by_id)]


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [0, 1] from any PIL mode (grayscale, palette, RGBA, 16-bit...).

    Alpha is dropped (the stored colour is kept), as most COCO readers do.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (e.g. PNG): scale the full range instead of clipping at 255.
        a = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(a, 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError("32-bit float images (mode F) are not supported; convert to 8-bit RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids PIL's palette-transparency warning
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) * np.float32(1.0 / 255.0)
