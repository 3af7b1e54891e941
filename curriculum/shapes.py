"""Built-in benchmark data set: deterministic synthetic shapes in COCO detection format.

Why a synthetic set: the project needs a detection benchmark that exists on every machine,
costs nothing to download, is byte-for-byte reproducible and is still hard enough that a bigger
detector (or a better distilled student) scores measurably higher than a small one.

Design choices, briefly:

- Six classes that differ in *geometry* only (circle, triangle, square, 5-point star, cross,
  ring). Every object and every distractor draws its colour from the same distribution (uniform
  RGB, re-drawn up to a few times for contrast against what is already under it), so colour
  carries no class information. Objects get a random rotation, a brightness gradient and are
  sometimes drawn as an outline only (circles never: an outlined circle would be a ring).
- Clutter: a smooth two-colour gradient, two octaves of low-frequency colour noise, random line
  segments, un-annotated distractors (hexagons, ellipses, blobs, thin arcs, bars) drawn with the
  same colours, sizes and outline rule as objects, and Gaussian pixel noise on top.
- Sizes: the diameter of an object's circumscribed circle is
  ``min + (max - min) * u ** size_skew`` with ``u ~ U(0, 1)`` (default: uniform, 12 px to 60% of
  the image). Visible areas are far below diameter^2 (stars, crosses, rings and outlines cover
  little of their circle; occlusion removes more), so about two thirds of the annotated objects
  are COCO "small" and the rest "medium", while few are so tiny that their class cannot be
  recovered. COCO "large" (area >= 96^2) is empty at 128 px: such an object would have to cover
  more than half the image, so AP_large is undefined (-1) on this set.
- Occlusion: objects and distractors are drawn in one random order; later layers occlude earlier
  ones. Objects may also stick out of the image by up to ``max_truncation`` of their radius.
  Each object's box is the tight box of its *visible* pixels (its own mask, alpha >= 0.5 after
  supersampling, minus the masks of every later layer, clipped to the image); ``area`` is the
  visible pixel count. An object whose visible fraction (visible pixels / all of its mask pixels,
  including those outside the image) is below ``min_visible`` is NOT annotated: its pixels stay
  in the image as un-annotated clutter. This is deliberate: a shape that is 80% hidden cannot be
  classified, and a box around its remnant would only teach label noise.
- Determinism: image ``i`` of split ``s`` uses ``np.random.default_rng([seed, s, i])`` (train is 0,
  val is 1), so images can be generated independently, in any order or in parallel, and the
  same arguments always give byte-identical PNG and JSON files (given the same numpy, Pillow
  and zlib builds; bump ``SHAPES_VERSION`` whenever a code change alters the output).
  Antialiasing draws every layer at ``supersample`` x resolution and box-filters down (exact
  coverage, fast).
- Image sizes: square ``image_size`` px by default. With ``varied_sizes`` every image gets its own
  height and width (:func:`image_shape`): the shorter side uniform in [0.75, 1.25] x ``image_size``,
  the aspect ratio (long / short) log-uniform in [1, 2], landscape or portrait 50/50, drawn from a
  child of the image's seed sequence so that the square set's draws, and files, stay as they are.
  Object sizes, placement, clutter and the background then follow the image's own canvas;
  ``max_size_frac`` is a fraction of its shorter side.
- Category ids are deliberately non-contiguous (1, 2, 3, 5, 7, 9) so every run exercises the
  loader's mapping of category ids to contiguous labels (see docs/CONVENTIONS.md).

Layout written by :func:`make_shapes`::

    out_dir/shapes.json                 generator, version, all parameters, summary
    out_dir/train/instances.json        COCO: info, licenses, images, annotations, categories
    out_dir/train/images/000000.png ... file_name in the JSON is relative to images/
    out_dir/val/...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from curriculum.errors import ConfigError

if TYPE_CHECKING:
    from curriculum.config import DataConfig

log = logging.getLogger(__name__)

SHAPES_VERSION = 3  # 2: defaults eased (sizes from 12 px, less clutter); 3: every object's visible mask as RLE
"""Bump whenever the generated pixels or annotations change for the same arguments."""

CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "circle"),
    (2, "triangle"),
    (3, "square"),
    (5, "star"),
    (7, "cross"),
    (9, "ring"),
)
"""(COCO category id, name). Ids are non-contiguous on purpose."""

DISTRACTOR_KINDS: tuple[str, ...] = ("hexagon", "ellipse", "blob", "arc", "bar")
SPLITS: tuple[str, ...] = ("train", "val")
SMALL_AREA = 32**2
LARGE_AREA = 96**2
_OUTLINE_MIN_SIZE = 16.0  # px diameter below which an outline would be unreadable
_COLOUR_TRIES = 8
_PLACE_TRIES = 30
_FILE_RE = re.compile(r"^\d{6}\.png$")


@dataclasses.dataclass(frozen=True)
class ShapesDifficulty:
    """Difficulty knobs; pass any of them as keyword arguments to :func:`make_shapes`.

    Pixel intensities are in 0..255 units. Ranges are inclusive ``(low, high)`` pairs.
    """

    max_objects: int = 6
    """Annotated objects are drawn per image uniformly from 1..max_objects (before occlusion drops)."""
    empty_image_prob: float = 0.04
    """Probability that an image gets no objects at all (distractors and clutter only)."""
    min_size_px: float = 12.0
    """Smallest object/distractor diameter (circumscribed circle), in pixels."""
    max_size_frac: float = 0.6
    """Largest diameter as a fraction of the image's shorter side (``image_size`` for square images)."""
    size_skew: float = 1.0
    """Exponent on the uniform draw of the diameter; 1 = uniform, larger = more small objects."""
    distractors: tuple[int, int] = (0, 3)
    """Un-annotated distractor shapes per image."""
    lines: tuple[int, int] = (0, 3)
    """Random background line segments per image."""
    noise_std: float = 5.0
    """Standard deviation of the Gaussian pixel noise added last."""
    texture_amp: float = 20.0
    """Amplitude of the low-frequency background colour noise."""
    outline_prob: float = 0.25
    """Probability that a polygonal object/distractor (>= 16 px) is drawn as an outline only."""
    shading: float = 0.3
    """Maximum relative brightness change across a shape (a linear gradient)."""
    min_contrast: float = 40.0
    """Wanted mean absolute RGB difference between a shape and what is under it (best effort)."""
    allow_occlusion: bool = True
    """If False, shapes are placed without overlapping bounding circles (skipped if no room)."""
    min_visible: float = 0.3
    """Objects with a smaller visible fraction are left un-annotated (see module docstring)."""
    max_truncation: float = 0.3
    """Fraction of an object's radius that may stick out of the image."""
    supersample: int = 4
    """Antialiasing factor: layers are drawn at this multiple of the resolution, then box-filtered."""

    def validate(self) -> None:
        """Raise ConfigError naming the knob and its allowed range."""

        def bad(name: str, rule: str) -> ConfigError:
            value = getattr(self, name)
            return ConfigError(f"shapes data set: knob '{name}' = {value!r} is invalid; it must be {rule}")

        def is_int(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def in_range(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                rule = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise bad(name, rule)

        if not is_int(self.max_objects) or self.max_objects < 1:
            raise bad("max_objects", "an integer >= 1")
        in_range("empty_image_prob", 0.0, 1.0)
        in_range("outline_prob", 0.0, 1.0)
        in_range("min_size_px", 2.0, math.inf)
        in_range("max_size_frac", 0.0, 1.0, low_open=True)
        in_range("size_skew", 0.0, math.inf, low_open=True)
        for name in ("distractors", "lines"):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(is_int(v) for v in pair) or not 0 <= pair[0] <= pair[1]:
                raise bad(name, "a pair of integers (low, high) with 0 <= low <= high")
        in_range("noise_std", 0.0, math.inf)
        in_range("texture_amp", 0.0, math.inf)
        in_range("min_contrast", 0.0, 255.0)
        in_range("shading", 0.0, 1.0, high_open=True)
        if not isinstance(self.allow_occlusion, bool):
            raise bad("allow_occlusion", "true or false")
        in_range("min_visible", 0.0, 1.0, low_open=True)
        in_range("max_truncation", 0.0, 1.0, high_open=True)
        if not is_int(self.supersample) or not 1 <= self.supersample <= 8:
            raise bad("supersample", "an integer in 1..8")


def difficulty_from_knobs(**knobs: Any) -> ShapesDifficulty:
    """Build and validate a ShapesDifficulty, rejecting unknown knob names with ConfigError."""
    fields = {f.name for f in dataclasses.fields(ShapesDifficulty)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ConfigError(
            f"shapes data set: unknown knob(s) {unknown}; valid knobs are {sorted(fields)}"
        )
    for name in ("distractors", "lines"):
        if name in knobs and not isinstance(knobs[name], tuple):
            try:
                knobs[name] = tuple(knobs[name])
            except TypeError:
                raise ConfigError(
                    f"shapes data set: knob '{name}' = {knobs[name]!r} must be a (low, high) pair"
                ) from None
    difficulty = ShapesDifficulty(**knobs)
    difficulty.validate()
    return difficulty


# ----------------------------------------------------------------------------- mask helpers


def mask_bbox(mask: np.ndarray) -> list[float] | None:
    """Tight COCO ``[x, y, w, h]`` box (floats, pixel edges) of the True pixels, None if empty.

    A single pixel at column 3, row 5 gives ``[3.0, 5.0, 1.0, 1.0]``: a box covers whole pixels,
    so width and height are always >= 1 for a non-empty mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """The exact COCO RLE (compressed counts as a string) of a boolean mask: every visible pixel, holes and
    disjoint parts included, which polygons cannot always express."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def visible_masks(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when they are painted in list order (later ones on top).

    ``masks`` are boolean arrays of one shape; the result keeps each mask's pixels that no later
    mask covers.
    """
    if not masks:
        return []
    owner = np.full(masks[0].shape, -1, dtype=np.int32)
    for index, mask in enumerate(masks):
        owner[mask] = index
    return [owner == index for index in range(len(masks))]


def coco_size_bucket(area: float) -> str:
    """'small', 'medium' or 'large' by the COCO area thresholds 32^2 and 96^2."""
    if area < SMALL_AREA:
        return "small"
    if area < LARGE_AREA:
        return "medium"
    return "large"


# ----------------------------------------------------------------------------- geometry


@dataclasses.dataclass
class _Layer:
    """One shape to paint: an object (category_id set) or clutter (category_id None)."""

    kind: str  # "poly", "polyline", "ellipse", "ring"
    points: np.ndarray  # [N, 2] float image coordinates (for ellipse/ring: centre in row 0)
    radius: float  # circumscribed radius (ellipse/ring: outer radius)
    stroke: float = 0.0  # > 0: outline/polyline width in pixels; 0: filled
    inner: float = 0.0  # ring inner radius
    category_id: int | None = None
    total_pixels: int = 0  # mask pixels (alpha >= 0.5), including any outside the image


def _regular(n: int, phase: float) -> np.ndarray:
    angles = phase + np.arange(n) * (2.0 * math.pi / n)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _place(points: np.ndarray, cx: float, cy: float, radius: float, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, s], [-s, c]])
    return points @ rot * radius + np.array([cx, cy])


def _unit_outline(kind: str, rng: np.random.Generator) -> tuple[str, np.ndarray, float, float]:
    """Unit-radius geometry of a shape: (draw kind, points, inner radius, arc stroke fraction)."""
    if kind == "triangle":
        return "poly", _regular(3, -math.pi / 2), 0.0, 0.0
    if kind == "square":
        return "poly", _regular(4, math.pi / 4), 0.0, 0.0
    if kind == "hexagon":
        return "poly", _regular(6, 0.0), 0.0, 0.0
    if kind == "star":
        ratio = rng.uniform(0.38, 0.5)
        pts = _regular(10, -math.pi / 2)
        pts[1::2] *= ratio
        return "poly", pts, 0.0, 0.0
    if kind == "cross":
        w = rng.uniform(0.18, 0.3)
        a = math.sqrt(1.0 - w * w)
        pts = np.array(
            [(w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w),
             (-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w)]
        )
        return "poly", pts, 0.0, 0.0
    if kind == "ellipse":
        b = rng.uniform(0.25, 0.6)
        phi = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        return "poly", np.stack([np.cos(phi), b * np.sin(phi)], axis=1), 0.0, 0.0
    if kind == "bar":
        ratio = rng.uniform(0.12, 0.3)
        a = 1.0 / math.sqrt(1.0 + ratio * ratio)
        w = ratio * a
        return "poly", np.array([(a, w), (-a, w), (-a, -w), (a, -w)]), 0.0, 0.0
    if kind == "blob":
        phi = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
        r = np.ones_like(phi)
        for k in (2, 3, 4):
            r += rng.uniform(-0.2, 0.2) * np.cos(k * phi + rng.uniform(0.0, 2.0 * math.pi))
        r /= r.max()
        return "poly", np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1), 0.0, 0.0
    if kind == "arc":
        span = rng.uniform(math.radians(60), math.radians(240))
        phi = np.linspace(0.0, span, max(8, int(span / math.radians(8))))
        stroke = rng.uniform(0.08, 0.16)
        pts = np.stack([np.cos(phi), np.sin(phi)], axis=1) * (1.0 - stroke / 2.0)
        return "polyline", pts, 0.0, stroke
    if kind == "ring":
        return "ring", np.zeros((1, 2)), rng.uniform(0.45, 0.7), 0.0
    if kind == "circle":
        return "ellipse", np.zeros((1, 2)), 0.0, 0.0
    raise AssertionError(kind)


def _make_layer(
    kind: str,
    category_id: int | None,
    cx: float,
    cy: float,
    radius: float,
    rng: np.random.Generator,
    d: ShapesDifficulty,
) -> _Layer:
    draw_kind, unit, inner, arc_stroke = _unit_outline(kind, rng)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    points = _place(unit, cx, cy, radius, theta)
    stroke = 0.0
    if draw_kind == "polyline":
        stroke = max(1.5, arc_stroke * radius)
    elif (
        draw_kind == "poly"
        and 2.0 * radius >= _OUTLINE_MIN_SIZE
        and rng.random() < d.outline_prob
    ):
        stroke = max(1.5, rng.uniform(0.12, 0.22) * radius)
        # Keep the stroke's outer edge on the circumscribed circle, like a filled shape's.
        points = _place(unit, cx, cy, radius - stroke / 2.0, theta)
    return _Layer(draw_kind, points, radius, stroke, inner * radius, category_id)


# ----------------------------------------------------------------------------- rendering


def _layer_alpha(layer: _Layer, ss: int) -> tuple[int, int, np.ndarray]:
    """Coverage in [0, 1] of a layer on a pixel-aligned crop: (x0, y0, alpha[h, w])."""
    if layer.kind in ("ellipse", "ring"):
        cx, cy = layer.points[0]
        lo = np.array([cx - layer.radius, cy - layer.radius])
        hi = np.array([cx + layer.radius, cy + layer.radius])
    else:
        lo = layer.points.min(axis=0) - layer.stroke
        hi = layer.points.max(axis=0) + layer.stroke
    x0, y0 = (int(math.floor(v)) - 1 for v in lo)
    x1, y1 = (int(math.ceil(v)) + 1 for v in hi)
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    origin = np.array([x0, y0], dtype=np.float64)
    if layer.kind in ("ellipse", "ring"):
        cx, cy = (layer.points[0] - origin) * ss
        r = layer.radius * ss
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if layer.kind == "ring":
            r = layer.inner * ss
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
    else:
        pts = [tuple(p) for p in ((layer.points - origin) * ss).tolist()]
        width = max(1, int(round(layer.stroke * ss)))
        if layer.kind == "polyline":
            draw.line(pts, fill=255, width=width, joint="curve")
        elif layer.stroke > 0:
            draw.line(pts + pts[:2], fill=255, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=255)
    if ss > 1:
        canvas = canvas.reduce(ss)
    return x0, y0, np.asarray(canvas, dtype=np.float32) * (1.0 / 255.0)


def _centred(n: int, scale: int) -> np.ndarray:
    """Pixel-centre coordinates of an axis of ``n`` pixels, centred on 0, in units of ``scale`` px."""
    return (np.arange(n, dtype=np.float32) + 0.5) / scale - 0.5 * n / scale


def _background(rng: np.random.Generator, height: int, width: int, d: ShapesDifficulty) -> np.ndarray:
    """Smooth gradient between two random colours plus two octaves of low-frequency noise."""
    c0 = rng.uniform(0.0, 255.0, 3)
    c1 = rng.uniform(0.0, 255.0, 3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    short = min(height, width)
    proj = math.cos(angle) * _centred(width, short)[None, :] + math.sin(angle) * _centred(height, short)[:, None]
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    t = t.astype(np.float32)[..., None]
    img = (c0.astype(np.float32) * (1.0 - t) + c1.astype(np.float32) * t).astype(np.float32)
    for grid_range, amp in (((2, 6), d.texture_amp), ((10, 24), d.texture_amp * 0.5)):
        g = int(rng.integers(grid_range[0], grid_range[1] + 1))  # cells along the shorter side
        gh, gw = max(1, round(g * height / short)), max(1, round(g * width / short))
        grid = rng.normal(0.0, 1.0, (3, gh, gw)).astype(np.float32) * amp
        for ch in range(3):
            up = Image.fromarray(grid[ch]).resize((width, height), Image.Resampling.BICUBIC)
            img[..., ch] += np.asarray(up)
    return img


def _diameter(rng: np.random.Generator, short: int, d: ShapesDifficulty) -> float:
    lo = float(d.min_size_px)
    hi = max(lo, float(d.max_size_frac) * short)
    return lo + (hi - lo) * float(rng.random()) ** float(d.size_skew)


def _centre(
    rng: np.random.Generator,
    radius: float,
    height: int,
    width: int,
    d: ShapesDifficulty,
    placed: list[tuple[float, float, float]],
) -> tuple[float, float] | None:
    inset_x = min(radius * (1.0 - d.max_truncation), width / 2.0)
    inset_y = min(radius * (1.0 - d.max_truncation), height / 2.0)
    for _ in range(1 if d.allow_occlusion else _PLACE_TRIES):
        cx = rng.uniform(inset_x, width - inset_x)
        cy = rng.uniform(inset_y, height - inset_y)
        if d.allow_occlusion or all(
            math.hypot(cx - px, cy - py) > radius + pr + 1.0 for px, py, pr in placed
        ):
            return cx, cy
    return None


def _paint(
    img: np.ndarray,
    layer: _Layer,
    rng: np.random.Generator,
    d: ShapesDifficulty,
) -> np.ndarray:
    """Composite a layer onto ``img`` in place; return its full-frame mask (alpha >= 0.5).

    Also records on the layer the mask pixel count including pixels outside the image.
    """
    height, width = img.shape[:2]
    x0, y0, alpha = _layer_alpha(layer, d.supersample)
    full = alpha >= 0.5
    layer.total_pixels = int(full.sum())
    h, w = alpha.shape
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + w, width), min(y0 + h, height)
    frame = np.zeros((height, width), dtype=bool)
    if ix0 >= ix1 or iy0 >= iy1:
        return frame
    a = alpha[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    m = full[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    region = img[iy0:iy1, ix0:ix1]
    under = region[m].mean(axis=0) if m.any() else region.reshape(-1, 3).mean(axis=0)
    best, best_contrast = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        contrast = float(np.abs(colour - under).mean())
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
        if contrast >= d.min_contrast:
            break
    assert best is not None
    # Linear brightness gradient across the shape.
    cx, cy = layer.points.mean(axis=0) if layer.kind not in ("ellipse", "ring") else layer.points[0]
    direction = rng.uniform(0.0, 2.0 * math.pi)
    strength = rng.uniform(0.0, d.shading)
    ys = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5 - cy
    xs = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5 - cx
    gain = 1.0 + strength * (math.cos(direction) * xs + math.sin(direction) * ys) / max(layer.radius, 1.0)
    colour_map = np.clip(best[None, None, :] * gain[..., None], 0.0, 255.0)
    a3 = a[..., None]
    region *= 1.0 - a3
    region += colour_map * a3
    frame[iy0:iy1, ix0:ix1] = m
    return frame


def _seed_sequence(image_index: int, split: str, seed: int) -> np.random.SeedSequence:
    """The image's own seed sequence: ``[seed, split index, image index]``."""
    if split not in SPLITS:
        raise ConfigError(f"shapes data set: unknown split '{split}'; use one of {list(SPLITS)}")
    return np.random.SeedSequence([int(seed), SPLITS.index(split), int(image_index)])


def varied_size_bounds(image_size: int) -> tuple[int, int]:
    """(smallest, largest) shorter side of a varied-size image; the longer side is at most twice it."""
    return math.ceil(0.75 * image_size), math.floor(1.25 * image_size)


def image_shape(
    image_index: int,
    split: str = "train",
    *,
    seed: int = 0,
    image_size: int = 128,
    varied_sizes: bool = False,
) -> tuple[int, int]:
    """(height, width) of an image: square ``image_size``, or its own varied size (module docstring).

    The varied draw uses a spawned child of the image's seed sequence, never the renderer's stream.
    """
    ss = _seed_sequence(image_index, split, seed)
    size = int(image_size)
    if not varied_sizes:
        return size, size
    rng = np.random.default_rng(ss.spawn(1)[0])
    lo, hi = varied_size_bounds(size)
    short = int(rng.integers(lo, hi + 1))
    long = round(short * 2.0 ** float(rng.random()))  # aspect ratio log-uniform in [1, 2]
    return (long, short) if rng.random() < 0.5 else (short, long)


def render_shapes_image(
    image_index: int,
    split: str = "train",
    *,
    seed: int = 0,
    image_size: int = 128,
    difficulty: ShapesDifficulty | None = None,
    varied_sizes: bool = False,
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, int]]:
    """Render one image independently of all others.

    Returns ``(pixels uint8 [H, W, 3], annotations, counts)`` where each annotation has
    ``category_id``, ``bbox`` (COCO xywh floats of the visible pixels) and ``area`` (visible
    pixel count), and ``counts`` has ``dropped`` (objects left un-annotated for low visibility
    or no room) and ``distractors``. ``H, W`` are :func:`image_shape`'s.
    """
    d = difficulty if difficulty is not None else ShapesDifficulty()
    height, width = image_shape(image_index, split, seed=seed, image_size=image_size, varied_sizes=varied_sizes)
    rng = np.random.default_rng(_seed_sequence(image_index, split, seed))
    short = min(height, width)
    img = _background(rng, height, width, d)

    # Background line segments: under every shape, not part of the visibility bookkeeping.
    extent = np.array([width, height], dtype=np.float64)
    for _ in range(int(rng.integers(d.lines[0], d.lines[1] + 1))):
        p = rng.uniform(-0.1 * extent, 1.1 * extent, (2, 2))
        stroke = rng.uniform(1.0, 3.0)
        _paint(img, _Layer("polyline", p, float(np.linalg.norm(p[1] - p[0])) / 2.0, stroke), rng, d)

    n_objects = 0 if rng.random() < d.empty_image_prob else int(rng.integers(1, d.max_objects + 1))
    n_distractors = int(rng.integers(d.distractors[0], d.distractors[1] + 1))
    kinds: list[tuple[str, int | None]] = []
    for _ in range(n_objects):
        cid, name = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        kinds.append((name, cid))
    for _ in range(n_distractors):
        kinds.append((DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))], None))
    order = rng.permutation(len(kinds))

    layers: list[_Layer] = []
    frames: list[np.ndarray] = []
    placed: list[tuple[float, float, float]] = []
    dropped = 0
    for k in order:
        name, cid = kinds[int(k)]
        radius = _diameter(rng, short, d) / 2.0
        centre = _centre(rng, radius, height, width, d, placed)
        if centre is None:
            dropped += cid is not None
            continue
        placed.append((centre[0], centre[1], radius))
        layer = _make_layer(name, cid, centre[0], centre[1], radius, rng, d)
        frames.append(_paint(img, layer, rng, d))
        layers.append(layer)

    if d.noise_std > 0:
        img += rng.normal(0.0, d.noise_std, img.shape).astype(np.float32)
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    annotations: list[dict[str, Any]] = []
    for layer, visible in zip(layers, visible_masks(frames)):
        if layer.category_id is None:
            continue
        area = int(visible.sum())
        total = layer.total_pixels
        box = mask_bbox(visible)
        if total == 0 or box is None or area / total < d.min_visible:
            dropped += 1
            continue
        annotations.append({"category_id": layer.category_id, "bbox": box, "area": float(area),
                            "segmentation": mask_rle(visible)})
    return pixels, annotations, {"dropped": dropped, "distractors": n_distractors}


# ----------------------------------------------------------------------------- data set writer


def _prepare_out_dir(out: Path) -> None:
    """Refuse to write into a non-empty directory that is not a shapes data set; clear our files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"shapes data set: output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "shapes.json").is_file():
        raise ConfigError(
            f"shapes data set: output directory {out} is not empty and holds no shapes.json; "
            "choose an empty or new directory (existing shapes data sets are regenerated in place)"
        )
    for split in SPLITS:
        images = out / split / "images"
        if images.is_dir():
            for f in images.iterdir():
                if _FILE_RE.match(f.name) and f.is_file():
                    f.unlink()
        ann = out / split / "instances.json"
        if ann.is_file():
            ann.unlink()


def make_shapes(
    out_dir: str | Path,
    train_images: int = 1200,
    val_images: int = 300,
    image_size: int = 128,
    seed: int = 0,
    *,
    varied_sizes: bool = False,
    workers: int = 1,
    **knobs: Any,
) -> dict[str, Any]:
    """Write the synthetic shapes detection data set (COCO format) under ``out_dir``.

    ``knobs`` are the fields of :class:`ShapesDifficulty` (e.g. ``noise_std=12``,
    ``distractors=(2, 8)``, ``allow_occlusion=False``); unknown names raise ConfigError.
    ``varied_sizes`` gives every image its own height and width (:func:`image_shape`); it is
    recorded in shapes.json's params only when true, so square sets keep their files. Same
    arguments give byte-identical files. An existing shapes data set in ``out_dir`` is
    regenerated in place; any other non-empty directory is refused. ``workers > 1`` renders
    images in that many spawned processes (a calling script then needs the usual
    ``if __name__ == "__main__":`` guard); the output does not depend on it.

    Returns a summary: ``version``, ``out_dir``, and per split (``train``, ``val``) plus
    ``total``: ``images``, ``empty_images``, ``objects``, ``per_class`` (name -> count),
    ``small``/``medium``/``large`` (COCO area buckets), ``dropped`` (objects left un-annotated),
    ``distractors``.
    """
    for name, value, low in (("train_images", train_images, 0), ("val_images", val_images, 0),
                             ("image_size", image_size, 16), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"shapes data set: '{name}' = {value!r} must be an integer >= {low}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"shapes data set: 'workers' = {workers!r} must be an integer >= 1")
    if not isinstance(varied_sizes, bool):
        raise ConfigError(f"shapes data set: 'varied_sizes' = {varied_sizes!r} must be true or false")
    difficulty = difficulty_from_knobs(**knobs)
    short = varied_size_bounds(image_size)[0] if varied_sizes else image_size
    if difficulty.max_size_frac * short < difficulty.min_size_px:
        raise ConfigError(
            f"shapes data set: max_size_frac * shortest image side ({short} px) = "
            f"{difficulty.max_size_frac * short:g} px is below min_size_px = {difficulty.min_size_px:g}; "
            "raise image_size or max_size_frac"
        )
    out = Path(out_dir)
    _prepare_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    params: dict[str, Any] = {
        "train_images": int(train_images),
        "val_images": int(val_images),
        "image_size": int(image_size),
        "seed": int(seed),
        **({"varied_sizes": True} if varied_sizes else {}),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(difficulty).items()},
    }
    meta: dict[str, Any] = {"generator": "curriculum.shapes", "version": SHAPES_VERSION, "params": params}
    # Written first (then again with the summary) so an interrupted run can be regenerated in place.
    _write_json(out / "shapes.json", meta, indent=2)

    summary: dict[str, Any] = {}
    pool = None
    if workers > 1:
        # spawn, not fork: the caller may be a Ray driver with threads running.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for split, count in (("train", int(train_images)), ("val", int(val_images))):
            split_dir = out / split
            (split_dir / "images").mkdir(parents=True, exist_ok=True)
            jobs = [(split_dir / "images", split, i, int(seed), int(image_size), varied_sizes, difficulty)
                    for i in range(count)]
            if pool is None:
                results = map(_render_to_file, jobs)
            else:
                results = pool.map(_render_to_file, jobs, chunksize=max(1, min(32, count // (4 * workers))))
            summary[split] = _write_split(split_dir, split, int(seed), results)
    finally:
        if pool is not None:
            pool.shutdown()

    total = _empty_stats()
    for stats in summary.values():
        for key, value in stats.items():
            if key == "per_class":
                for name, n in value.items():
                    total["per_class"][name] += n
            else:
                total[key] += value
    summary["total"] = total
    meta["summary"] = summary
    _write_json(out / "shapes.json", meta, indent=2)
    return {"version": SHAPES_VERSION, "out_dir": str(out), **summary}


_Rendered = tuple[str, tuple[int, int], list[dict[str, Any]], dict[str, int]]
"""(file name, (height, width), annotations, counts) of one written image."""


def _render_to_file(job: tuple[Path, str, int, int, int, bool, ShapesDifficulty]) -> _Rendered:
    """Render one image and write its PNG (runs in a worker process when workers > 1)."""
    images_dir, split, index, seed, size, varied_sizes, difficulty = job
    pixels, anns, counts = render_shapes_image(index, split, seed=seed, image_size=size, difficulty=difficulty,
                                               varied_sizes=varied_sizes)
    file_name = f"{index:06d}.png"
    Image.fromarray(pixels).save(images_dir / file_name, format="PNG")
    return file_name, (pixels.shape[0], pixels.shape[1]), anns, counts


def _write_split(split_dir: Path, split: str, seed: int, results: Iterable[_Rendered]) -> dict[str, Any]:
    """Assemble and write one split's instances.json (in image order); return its statistics."""
    names = dict(CATEGORIES)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in CATEGORIES]
    stats = _empty_stats()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, (file_name, (height, width), anns, counts) in enumerate(results):
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann, "iscrowd": 0})
            stats["per_class"][names[ann["category_id"]]] += 1
            stats[coco_size_bucket(ann["area"])] += 1
        stats["images"] += 1
        stats["objects"] += len(anns)
        stats["empty_images"] += not anns
        stats["dropped"] += counts["dropped"]
        stats["distractors"] += counts["distractors"]
    coco = {
        "info": {
            "description": f"curriculum synthetic shapes benchmark ({split})",
            "version": str(SHAPES_VERSION),
            "generator": "curriculum.shapes",
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    _write_json(split_dir / "instances.json", coco, indent=None)
    return stats


def _empty_stats() -> dict[str, Any]:
    return {
        "images": 0,
        "empty_images": 0,
        "objects": 0,
        "per_class": {name: 0 for _, name in CATEGORIES},
        "small": 0,
        "medium": 0,
        "large": 0,
        "dropped": 0,
        "distractors": 0,
    }


def _write_json(path: Path, payload: dict[str, Any], indent: int | None) -> None:
    text = json.dumps(payload, indent=indent, separators=None if indent else (",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


def ensure_builtin_data(data: DataConfig) -> None:
    """Generate the built-in data set under `data.root` when the config asks for it and it is missing."""
    if data.builtin != "shapes":
        return
    root = Path(data.root)
    want = {"train_images": data.shapes.train, "val_images": data.shapes.val, "image_size": data.image_size,
            "seed": data.shapes.seed, "varied_sizes": data.shapes.varied_sizes}
    meta = root / "shapes.json"
    if meta.is_file() and (root / "train" / "instances.json").is_file() and (root / "val" / "instances.json").is_file():
        have = json.loads(meta.read_text())
        params = {"varied_sizes": False, **have["params"]}  # recorded only when true
        if have.get("version") == SHAPES_VERSION and all(params.get(k) == v for k, v in want.items()):
            return
        log.warning("%s holds the shapes data set of other parameters or generator version; regenerating it", root)
    else:
        log.info("generating the built-in shapes data set in %s", root)
    make_shapes(root, **want)
