"""Tensor cells of the teacher cache: `encode` / `decode` one tensor, `encode_row` / `decode_row` one (image,
view)'s teacher outputs with the configured compression.

Compression and its cost (``CompressionConfig``; see `bench/precompute.py` for measured bytes):

- ``fp32``: exact. 4 bytes per value before zstd.
- ``fp16``: 2 bytes per value; relative rounding error <= 2**-11 (values beyond +-65504 are refused rather
  than stored as inf).
- ``int8``: 1 byte per value plus one float32 scale per channel (axis 0 of maps, last axis of row tensors);
  absolute error <= scale / 2, scale = max|x_c| / 127.
- ``topk`` (class logits of dense heads and of the RoI head): k values (fp32 or fp16; int8 falls back to
  fp16) + k uint16 indices + one float32 per location. Kept logits are exact up to their dtype; every dropped
  logit decodes to the (k+1)-th largest logit of its location, an upper bound of the true value, so the top-k
  order is kept and a dropped class never looks less likely than it was.
- ``threshold`` (dense class logits only): only locations whose best class has sigmoid score >= t are stored
  (one bit per location for the mask); the others decode to the largest dropped logit, whose sigmoid is < t.
- ``boxes=sparse`` (one-stage ``bbox_regression`` [HWA, 4] and FCOS ``bbox_ctrness`` [HW, 1]): rows kept only
  at the locations whose best class has sigmoid score >= ``score_threshold`` (the locations ``threshold``
  logits keep; with ``topk`` or dense logits the same rule): one bit per location, one float32 fill, and the
  kept rows in the dtype (int8 scales are taken over the kept rows). Kept rows: the dtype's bound. Dropped
  rows decode to the fill: 0 for regression (no offset from the anchor), the mean of the level's dropped
  logits for centerness. The cost: a loss reading the regression where the teacher's score is below the
  threshold (a ground-truth positive the teacher misses) sees the fill, not the teacher's box; choose
  ``score_threshold`` below the scores the losses weigh. Two-stage ``rpn_deltas`` and
  ``proposals/box_regression`` stay dense.
- ``features_region=boxes``: feature cells outside the ground-truth boxes of the view (dilated by
  ``box_dilation`` of the box's size per side, plus one cell) are dropped and decode to 0; one bit per cell
  for the mask. Exact (up to dtype) inside the region.
- ``features_region=pooled``: average pooling by ``pool`` (ceil mode): ``pool**2`` times smaller; the decoded
  map has the pooled size (the losses resize the student's map to the teacher's).
- ``pca: r``: FPN feature maps are projected to their top r principal components per level before any of the
  above (``teachers/projection.py``) and reconstructed on decode; the loss is the variance outside them.
- Detections and proposal boxes are always fp32 (they are small).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from curriculum.config import CompressionConfig
from curriculum.errors import DataError

if TYPE_CHECKING:
    from teachers.projection import Projection

FP16_MAX = 65504.0


def _base_encode(x: np.ndarray, base: str, channel_axis: int) -> tuple[bytes, bytes | None]:
    if base == "fp32":
        return np.ascontiguousarray(x, dtype=np.float32).tobytes(), None
    if base == "fp16":
        big = np.abs(x) > FP16_MAX
        if big.any():
            raise DataError(
                f"a teacher output holds {float(np.abs(x).max()):.3g}, beyond float16's range (65504): "
                "cache it with compression.dtype fp32 or int8"
            )
        return np.ascontiguousarray(x, dtype=np.float16).tobytes(), None
    if base == "int8":
        if x.ndim == 0 or x.size == 0:
            return b"", np.ones(x.shape[channel_axis] if x.ndim else 0, np.float32).tobytes()
        axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
        amax = np.abs(x).max(axis=axes).astype(np.float32)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        q = np.clip(np.rint(x / scale.reshape(shape)), -127, 127).astype(np.int8)
        return q.tobytes(), scale.tobytes()
    if base == "i64":
        return np.ascontiguousarray(x, dtype=np.int64).tobytes(), None
    raise ValueError(f"unknown base codec {base!r}")


def _base_decode(data: bytes, aux: bytes | None, base: str, shape: Sequence[int], channel_axis: int) -> np.ndarray:
    if base == "fp32":
        return np.frombuffer(data, np.float32).reshape(shape).copy()
    if base == "fp16":
        return np.frombuffer(data, np.float16).reshape(shape).astype(np.float32)
    if base == "int8":
        q = np.frombuffer(data, np.int8).reshape(shape).astype(np.float32)
        if q.size == 0:
            return q
        scale = np.frombuffer(aux, np.float32)
        s = [1] * len(shape)
        s[channel_axis] = -1
        return q * scale.reshape(s)
    if base == "i64":
        return np.frombuffer(data, np.int64).reshape(shape).copy()
    raise ValueError(f"unknown base codec {base!r}")


def _check_size(what: str, got: int, want: int) -> None:
    if got != want:
        raise DataError(f"cache cell {what}: {got} bytes where {want} were expected (truncated or corrupt)")


def _channel_axis(ndim: int) -> int:
    """int8 scales: per column (class / box coordinate) of 2-D row tensors [R, K], per channel (axis 0) of maps."""
    return -1 if ndim == 2 else 0


def score_keep(cls_logits: np.ndarray, score_threshold: float) -> np.ndarray:
    """Locations [R] of dense class logits [R, K] whose best class has sigmoid score >= `score_threshold`: what
    ``logits: threshold`` keeps, and where ``boxes: sparse`` keeps the box regression."""
    x = np.asarray(cls_logits)
    if x.ndim != 2 or not x.shape[1]:
        return np.zeros(x.shape[0] if x.ndim else 0, bool)
    t = float(score_threshold)
    return x.max(axis=1) >= math.log(t / (1.0 - t))


def encode(x: np.ndarray, codec: str, mask: np.ndarray | None = None, fill: float = 0.0) -> dict[str, Any]:
    """Encode one tensor into a cache cell ``{codec, shape, data, aux, index}``.

    codec: a base (``fp32``, ``fp16``, ``int8``, ``i64``) optionally followed by one modifier:
    ``|topk=K`` (2-D [R, K] logits), ``|thresh=T`` (2-D [R, K] sigmoid logits), ``|region`` (3-D [C, H, W] with
    a boolean ``mask`` [H, W]), ``|rows`` (2-D [R, D] with a boolean ``mask`` [R]: the kept rows; the others
    decode to `fill`). The module docstring states the error of each.
    """
    x = np.asarray(x)
    base, _, mod = codec.partition("|")
    if not mod:
        data, aux = _base_encode(x, base, _channel_axis(x.ndim))
        return {"codec": codec, "shape": list(x.shape), "data": data, "aux": aux, "index": None}
    name, _, arg = mod.partition("=")
    if name == "topk":
        if x.ndim != 2:
            raise ValueError(f"topk needs [R, K] logits, got shape {x.shape}")
        base = "fp16" if base == "int8" else base
        r, k_all = x.shape
        k = min(int(arg), k_all)
        if k >= k_all:  # nothing to drop: store dense
            return encode(x, base)
        order = np.argsort(-x, axis=1, kind="stable")
        idx = order[:, :k].astype(np.uint16)
        vals = np.take_along_axis(x, order[:, :k], axis=1)
        fill = np.take_along_axis(x, order[:, k : k + 1], axis=1)[:, 0].astype(np.float32)
        data, _ = _base_encode(vals, base, -1)
        return {"codec": f"{base}|topk={k}", "shape": list(x.shape), "data": data, "aux": fill.tobytes(),
                "index": idx.tobytes()}
    if name == "thresh":
        if x.ndim != 2:
            raise ValueError(f"thresh needs [R, K] logits, got shape {x.shape}")
        keep = score_keep(x, float(arg))
        dropped = x[~keep]
        fill = np.float32(dropped.max() if dropped.size else 0.0)
        data, aux = _base_encode(x[keep], base, -1)
        aux = fill.tobytes() + (aux or b"")
        return {"codec": codec, "shape": list(x.shape), "data": data, "aux": aux,
                "index": np.packbits(keep).tobytes()}
    if name == "region":
        if x.ndim != 3 or mask is None or mask.shape != x.shape[1:]:
            raise ValueError(f"region needs [C, H, W] and a mask [H, W], got {x.shape} and "
                             f"{None if mask is None else mask.shape}")
        kept = x[:, mask]  # [C, n]
        data, aux = _base_encode(kept, base, 0)
        return {"codec": codec, "shape": list(x.shape), "data": data, "aux": aux,
                "index": np.packbits(mask.ravel()).tobytes()}
    if name == "rows":
        if x.ndim != 2 or mask is None or mask.shape != x.shape[:1]:
            raise ValueError(f"rows needs [R, D] and a mask [R], got {x.shape} and "
                             f"{None if mask is None else mask.shape}")
        mask = mask.astype(bool)
        data, aux = _base_encode(x[mask], base, -1)  # int8: scales over the kept rows only
        return {"codec": codec, "shape": list(x.shape), "data": data,
                "aux": np.float32(fill).tobytes() + (aux or b""), "index": np.packbits(mask).tobytes()}
    raise ValueError(f"unknown codec modifier {mod!r}")


def decode(cell: dict[str, Any], what: str = "cell") -> np.ndarray:
    """Inverse of `encode` (within the codec's stated error). Raises DataError on a damaged cell."""
    codec, shape = cell["codec"], [int(s) for s in cell["shape"]]
    base, _, mod = codec.partition("|")
    data, aux, index = cell["data"], cell["aux"], cell["index"]
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1, "i64": 8}[base]
    if not mod:
        _check_size(what, len(data), itemsize * math.prod(shape))
        return _base_decode(data, aux, base, shape, _channel_axis(len(shape)))
    name, _, arg = mod.partition("=")
    if name == "topk":
        r, k_all = shape
        k = int(arg)
        _check_size(what, len(data), itemsize * r * k)
        _check_size(what + " (index)", len(index), 2 * r * k)
        vals = _base_decode(data, None, base, (r, k), -1)
        idx = np.frombuffer(index, np.uint16).reshape(r, k).astype(np.int64)
        fill = np.frombuffer(aux, np.float32)
        out = np.repeat(fill[:, None], k_all, axis=1)
        np.put_along_axis(out, idx, vals, axis=1)
        return out
    if name == "thresh":
        r, k_all = shape
        keep = np.unpackbits(np.frombuffer(index, np.uint8), count=r).astype(bool)
        n = int(keep.sum())
        _check_size(what, len(data), itemsize * n * k_all)
        fill = np.frombuffer(aux[:4], np.float32)[0]
        out = np.full((r, k_all), fill, np.float32)
        out[keep] = _base_decode(data, aux[4:], base, (n, k_all), -1)
        return out
    if name == "region":
        c, h, w = shape
        mask = np.unpackbits(np.frombuffer(index, np.uint8), count=h * w).astype(bool).reshape(h, w)
        n = int(mask.sum())
        _check_size(what, len(data), itemsize * c * n)
        out = np.zeros((c, h, w), np.float32)
        out[:, mask] = _base_decode(data, aux, base, (c, n), 0)
        return out
    if name == "rows":
        r, d = shape
        _check_size(what + " (index)", len(index), (r + 7) // 8)
        keep = np.unpackbits(np.frombuffer(index, np.uint8), count=r).astype(bool)
        n = int(keep.sum())
        _check_size(what, len(data), itemsize * n * d)
        out = np.full((r, d), np.frombuffer(aux[:4], np.float32)[0], np.float32)
        out[keep] = _base_decode(data, aux[4:], base, (n, d), -1)
        return out
    raise DataError(f"cache cell {what}: unknown codec {codec!r} (written by a newer version?)")


def region_mask(boxes: np.ndarray, hw: tuple[int, int], image_hw: tuple[int, int], dilation: float) -> np.ndarray:
    """Feature cells [H, W] inside any box dilated by `dilation` of its size per side plus one cell."""
    h, w = hw
    sy, sx = image_hw[0] / h, image_hw[1] / w
    mask = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        bw, bh = x2 - x1, y2 - y1
        x1, x2 = x1 - dilation * bw - sx, x2 + dilation * bw + sx
        y1, y2 = y1 - dilation * bh - sy, y2 + dilation * bh + sy
        c1, c2 = max(0, int(math.floor(x1 / sx))), min(w, int(math.ceil(x2 / sx)))
        r1, r2 = max(0, int(math.floor(y1 / sy))), min(h, int(math.ceil(y2 / sy)))
        mask[r1:r2, c1:c2] = True
    return mask


def encode_row(
    raw: dict[str, np.ndarray], comp: CompressionConfig, boxes: np.ndarray | None = None,
    image_hw: tuple[int, int] | None = None, projection: Projection | None = None,
) -> dict[str, dict[str, Any]]:
    """Encode one (image, view)'s teacher outputs with the configured compression (`projection`: the cache's,
    needed when `comp.pca` is set)."""
    cells: dict[str, dict[str, Any]] = {}
    for name, a in raw.items():
        if name.startswith("detections/") or name == "proposals/boxes":
            cells[name] = encode(a, "i64" if a.dtype.kind in "iu" else "fp32")
        elif name.startswith("features/"):
            if comp.pca:
                if projection is None:
                    raise ValueError("compression.pca needs the cache's fitted projection")
                a = projection.project(name.split("/", 1)[1], a)
            if comp.features_region == "pooled" and comp.pool > 1:
                t = torch.from_numpy(a)[None]
                a = torch.nn.functional.avg_pool2d(t, comp.pool, comp.pool, ceil_mode=True)[0].numpy()
                cells[name] = encode(a, comp.dtype)  # a pooled map decodes at its pooled size
            elif comp.features_region == "boxes":
                if boxes is None or image_hw is None:
                    raise ValueError("features_region=boxes needs the view's boxes")
                m = region_mask(boxes, a.shape[1:], image_hw, comp.box_dilation)
                cells[name] = encode(a, f"{comp.dtype}|region", mask=m)
            else:
                cells[name] = encode(a, comp.dtype)
        elif name.startswith("head/cls_logits/") and comp.logits != "dense":
            mod = f"topk={comp.topk}" if comp.logits == "topk" else f"thresh={comp.score_threshold!r}"
            cells[name] = encode(a, f"{comp.dtype}|{mod}")
        elif name == "proposals/class_logits" and comp.logits == "topk":
            cells[name] = encode(a, f"{comp.dtype}|topk={comp.topk}")
        elif getattr(comp, "boxes", "dense") == "sparse" and name.split("/")[:2] in (
                ["head", "bbox_regression"], ["head", "bbox_ctrness"]):
            cells[name] = _encode_sparse_box(name, a, raw, comp)
        else:
            cells[name] = encode(a, comp.dtype)
    return cells


def _encode_sparse_box(name: str, a: np.ndarray, raw: dict[str, np.ndarray], comp: CompressionConfig
                       ) -> dict[str, Any]:
    """``boxes: sparse``: a level's box regression (or FCOS centerness) kept at the rows where the same level's
    best class score is >= score_threshold. Fill: 0 for regression (no offset from the anchor / location);
    for centerness the mean of the dropped logits, a better stand-in for distillation than a fixed value."""
    level = name.rsplit("/", 1)[1]
    cls = raw.get(f"head/cls_logits/{level}")
    if cls is None or cls.shape[0] != a.shape[0]:
        raise ValueError(f"compression.boxes=sparse: {name} {a.shape} needs head/cls_logits/{level} with as many rows "
                         f"(got {None if cls is None else cls.shape}); use boxes: dense for this teacher")
    keep = score_keep(cls, comp.score_threshold)
    fill = 0.0
    if name.startswith("head/bbox_ctrness/") and (~keep).any():
        fill = float(a[~keep].mean(dtype=np.float64))
    return encode(a, f"{comp.dtype}|rows", mask=keep, fill=fill)


def decode_row(cells: dict[str, dict[str, Any]], where: str = "") -> dict[str, np.ndarray]:
    """Decode one row as stored (a `pca` cache's features as their components: `Projection.teacher_space`)."""
    return {name: decode(c, f"{name}{where}") for name, c in cells.items()}
