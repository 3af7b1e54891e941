"""`curriculum export`: a detector checkpoint as a file an edge runtime loads, post-processing in the graph.

The graph takes ``images``: float32 ``[1, 3, H, W]``, RGB in [0, 1], already resized to its input size (the
checkpoint's, or ``--image-size H W``) and returns ``boxes`` ``[K, 4]`` (xyxy, input pixels), ``scores`` ``[K]``,
``labels`` ``[K]``: the detector's own normalisation, score threshold, NMS and top-k, traced at that size. A Mask
R-CNN exports its boxes, scores and labels; its masks stay out of the graph (paste-in-image is a per-box loop).

ONNX export uses torch's TorchScript-based exporter (opset 17) and is checked by onnxruntime against the eager
model on a random input before the file is kept. ``pip install -e .[export]`` installs onnx and onnxruntime.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from curriculum.data import Resize
from curriculum.errors import CurriculumError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OPSET = 17


class ExportError(CurriculumError):
    """A detector that cannot be exported (missing extra, unsupported operator, a mismatch after export)."""


class ExportedDetector(nn.Module):
    """A `teachers.zoo.Detector` on one image ``[1, 3, H, W]`` -> ``(boxes, scores, labels)``, best first."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        # A frozen copy: the graph holds constants, and the caller's model keeps its mode and gradients.
        self.detector = copy.deepcopy(detector).eval().requires_grad_(False)
        self.detector.detect_masks = False  # a Mask R-CNN's masks stay out of the graph (boxes, scores, labels)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector([images[0]], want=("detections",)).detections[0]
        return out["boxes"], out["scores"], out["labels"]


def input_size(ckpt: dict[str, Any], image_size: tuple[int, int] | None) -> tuple[int, int]:
    """``(H, W)`` of the exported graph: given, or the checkpoint's fixed input size."""
    if image_size is not None:
        h, w = (int(v) for v in image_size)
        if h <= 0 or w <= 0:
            raise ExportError(f"--image-size {h} {w}: both must be positive")
        return h, w
    resize = Resize.from_dict(ckpt.get("resize") or {"out_h": ckpt["config"]["image_size"],
                                                       "out_w": ckpt["config"]["image_size"]})
    if resize.mode == "keep_ratio":
        raise ExportError(f"the checkpoint's inputs are keep-ratio views (min_size {list(resize.min_size)}, max_size "
                          f"{resize.max_size}), whose size depends on the image: give --image-size H W, the size "
                          "your frames are resized to (e.g. the view of a camera frame)")
    return resize.size


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: `pip install -e .[export]` (onnx, onnxruntime) adds it") from None


def export_detector(detector: nn.Module, fmt: str, out: str | Path, size: tuple[int, int],
                    check: bool = True) -> dict[str, Any]:
    """Write `detector` as `fmt` to `out` for inputs of `size`; returns the check's figures (the largest box and
    score differences against the eager model on a random input)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: one of {FORMATS}")
    if fmt == "onnx":
        _need("onnx")
        _need("onnxruntime")
    module = ExportedDetector(detector).eval()
    example = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    name = getattr(getattr(detector, "config", None), "name", type(detector).__name__)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the graph: intended
            if fmt == "onnx":
                torch.onnx.export(module, (example,), str(tmp), input_names=["images"],
                                  output_names=["boxes", "scores", "labels"], opset_version=OPSET, dynamo=False)
            else:
                torch.jit.trace(module, (example,), check_trace=False).save(str(tmp))
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(_explain(name, fmt, e)) from e
    try:
        figures = check_export(module, tmp, fmt, example) if check else {}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return {"format": fmt, "file": str(out), "input": [1, 3, *size], "bytes": out.stat().st_size, **figures}


def _explain(name: str, fmt: str, e: Exception) -> str:
    text = str(e)
    op = None
    for marker in ("ONNX export of operator ", "Unsupported: ONNX export of ", "operator "):
        if marker in text:
            op = text.split(marker, 1)[1].split()[0].strip(",.'\"")
            break
    what = f"operator {op}" if op else f"{type(e).__name__}: {text[:300]}"
    return (f"{name} could not be exported to {fmt}: {what}. Try --format torchscript, another opset-compatible "
            "architecture of the zoo, or export the detector without post-processing and run NMS in your runtime")


def run_onnx(path: str | Path, images: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {"images": images}))


def check_export(module: nn.Module, path: Path, fmt: str, example: Tensor) -> dict[str, float]:
    """The exported file against the eager model on `example`: same number of detections, boxes within 0.5 px,
    scores within 1e-3 (else an ExportError)."""
    with torch.no_grad():
        want = [t.numpy() for t in module(example)]
    if fmt == "onnx":
        got = run_onnx(path, example.numpy())
    else:
        with torch.no_grad():
            got = [t.numpy() for t in torch.jit.load(str(path))(example)]
    if len(got[0]) != len(want[0]):
        raise ExportError(f"the exported {fmt} model gives {len(got[0])} detections where the model gives "
                          f"{len(want[0])} on the same input; it was not kept")
    box, score = detection_differences(got, want)
    if box > 0.5 or score > 1e-3:
        raise ExportError(f"the exported {fmt} model differs from the model on the same input (boxes up to {box:.3f}"
                          f" px, scores up to {score:.2e}); it was not kept")
    return {"check_max_box_px": box, "check_max_score": score, "check_detections": int(len(want[0]))}


def detection_differences(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> tuple[float, float]:
    """Largest box and score difference between two detection lists ``(boxes, scores, labels)``, each of `got`
    matched to the detection of `want` with its label nearest in box and score (equal scores may come in either
    order); inf when a label has no counterpart."""
    worst_box = worst_score = 0.0
    for b, s, l in zip(*got):
        same = want[2] == l
        if not same.any():
            return float("inf"), float("inf")
        d_box = np.abs(want[0][same] - b).max(axis=1)
        d_score = np.abs(want[1][same] - s)
        j = int(np.argmin(d_box + 1e3 * d_score))
        worst_box, worst_score = max(worst_box, float(d_box[j])), max(worst_score, float(d_score[j]))
    return worst_box, worst_score


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, image_size: tuple[int, int] | None = None,
                      trust: bool = False) -> dict[str, Any]:
    """`curriculum export`: the checkpoint's detector at its input size (or `image_size`)."""
    from teachers.zoo import load_detector, read_checkpoint

    size = input_size(read_checkpoint(checkpoint, trust), image_size)
    return export_detector(load_detector(checkpoint, trust=trust), fmt, out, size)
