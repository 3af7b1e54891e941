"""`curriculum predict`: a detector's boxes on the user's own images, in original-image pixels.

The detector comes from a project checkpoint (which records the resize its inputs were made with) or from a YAML
whose ``model`` section names a detector and its weights and whose ``data`` section gives the resize. Each image
is resized exactly as in training and evaluation (`curriculum.data.Resize`, the largest ``min_size``), and the
boxes are mapped back to the image as stored (EXIF orientation is not applied, as for COCO data).

Writes ``DIR/predictions.json`` (one entry per image) and ``DIR/<image stem>.png`` with the boxes drawn.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from curriculum.config import TrainJobConfig, apply_overrides, config_from_dict, load_config
from curriculum.data import Resize, _to_rgb_array, annotation_class_names
from curriculum.errors import ConfigError, DataError
from curriculum.files import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Predictor:
    """A detector in eval mode, the resize of its inputs and its label names."""

    detector: Any
    resize: Resize
    class_names: tuple[str, ...]

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections of one float RGB image ``[3, H, W]`` in [0, 1], boxes in its own pixels, best first."""
        view = self.resize.view(int(image.shape[-2]), int(image.shape[-1]), flip=False)
        det = self.detector.predict([view.apply(image).clamp_(0.0, 1.0)])[0]
        order = torch.argsort(det["scores"], descending=True, stable=True)
        boxes = view.unmap_boxes(det["boxes"][order])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, view.orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, view.orig_h)
        return {"boxes": boxes, "scores": det["scores"][order], "labels": det["labels"][order]}

    def name_of(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class {label}"


def load_predictor(source: str | Path, overrides: Sequence[str] = (), score_thresh: float | None = None,
                   trust: bool = False) -> Predictor:
    """The detector of a checkpoint or of a YAML's ``model`` section (weights included), with its resize.

    `overrides`: ``section.key=value`` (``data.min_size=640``, ``model.nms_thresh=0.6``) on top of the YAML, or of
    what the checkpoint recorded."""
    from teachers.zoo import build_detector, coco_class_names, read_checkpoint, TORCHVISION_PREFIX

    source = Path(source)
    if source.suffix in (".yaml", ".yml"):
        job = load_config(source, TrainJobConfig, list(overrides))
        name = job.model.name
        num_classes = job.model.num_classes
        _, ann = job.data.split_paths("train")
        names = annotation_class_names(ann) if ann.is_file() else None
        if num_classes is None:
            if name.startswith(TORCHVISION_PREFIX) and job.model.weights == "torchvision":
                num_classes = 91
            elif names is not None:
                num_classes = len(names)
            else:
                raise ConfigError(f"{source}: model.num_classes is not given and no annotation file tells the classes; "
                                  "set model.num_classes (label slots, background included)")
        kw = job.model.overrides()
        if name.startswith(TORCHVISION_PREFIX):
            kw = {k: v for k, v in kw.items() if k not in ("fpn_channels", "head_convs", "anchor_scale")}
        if names is not None and len(names) == num_classes:
            kw["class_names"] = tuple(names)
        detector = build_detector(name, num_classes, image_size=job.data.image_size, **kw)
        if detector.config.class_names is None and name.startswith(TORCHVISION_PREFIX) and num_classes == 91:
            detector.config = dataclasses.replace(detector.config, class_names=coco_class_names(name))
    else:
        from teachers.zoo import load_detector

        ckpt = read_checkpoint(source, trust)
        recorded = ckpt.get("resize") or {"out_h": ckpt["config"]["image_size"], "out_w": ckpt["config"]["image_size"]}
        base = {"data": _data_keys(Resize.from_dict(recorded)),
                "model": {k: ckpt["config"][k] for k in ("score_thresh", "nms_thresh", "detections_per_img")}}
        job = config_from_dict(TrainJobConfig, apply_overrides(base, list(overrides)), f"{source} (recorded settings)")
        detector = load_detector(source, trust=trust)
    detector.set_thresholds(score_thresh if score_thresh is not None else job.model.score_thresh,
                            job.model.nms_thresh, job.model.detections_per_img)
    names = detector.config.class_names or tuple(f"class {k}" for k in range(detector.config.num_classes))
    return Predictor(detector.eval(), job.data.resize_spec("val"), tuple(names))


def _data_keys(resize: Resize) -> dict[str, Any]:
    if resize.mode == "fixed":
        if resize.size[0] != resize.size[1]:
            raise ConfigError(f"a checkpoint recorded a {resize.size[0]}x{resize.size[1]} input: non-square fixed "
                              "sizes are not a data setting; pass a YAML with the data section")
        return {"resize": "fixed", "image_size": resize.size[0]}
    return {"resize": "keep_ratio", "min_size": list(resize.min_size), "max_size": resize.max_size}


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The images named, and those in the folders named (recursively, sorted); an error names what is missing."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such image or folder")
    stems = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise DataError(f"{f} and {stems[f.stem]} would both be drawn as {f.stem}.png; predict them into separate "
                            "--out folders")
        stems[f.stem] = f
    return files


def read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            arr = _to_rgb_array(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def draw(image: torch.Tensor, pred: dict[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """The image with its boxes and ``label score`` captions (torchvision's `draw_bounding_boxes`), HWC uint8."""
    from torchvision.utils import draw_bounding_boxes

    img = (image * 255).round().clamp(0, 255).to(torch.uint8)
    captions = [f"{n} {s:.2f}" for n, s in zip(names, pred["scores"].tolist())]
    width = max(1, round(max(image.shape[-2:]) / 400))
    out = draw_bounding_boxes(img, pred["boxes"], labels=captions, width=width) if len(captions) else img
    return out.permute(1, 2, 0).numpy()


def predict(source: str | Path, inputs: Sequence[str | Path], out: str | Path, score_thresh: float | None = None,
            overrides: Sequence[str] = (), trust: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Predict every image; write ``predictions.json`` and one PNG per image into `out`; return the entries."""
    predictor = load_predictor(source, overrides, score_thresh, trust)
    files = image_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    it = files
    if progress and len(files) > 1:
        from tqdm import tqdm

        it = tqdm(files, desc="predict", unit="img")
    for f in it:
        image = read_image(f)
        pred = predictor(image)
        labels = [int(v) for v in pred["labels"]]
        names = [predictor.name_of(v) for v in labels]
        entries.append({"file_name": str(f), "width": int(image.shape[-1]), "height": int(image.shape[-2]),
                        "boxes": [[round(float(x), 2) for x in b] for b in pred["boxes"]],
                        "scores": [round(float(s), 5) for s in pred["scores"]], "labels": labels, "label_names": names})
        buf = _png_bytes(draw(image, pred, names))
        atomic_write(out / f"{f.stem}.png", buf)
    atomic_write_json(entries, out / "predictions.json")
    return entries


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()
