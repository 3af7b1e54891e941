"""Running a teacher: load it frozen, and turn its outputs on a batch into cache columns (`teacher_outputs`).

`teacher_outputs` is the single place teacher outputs become cache columns (named by the schema table,
`teachers.targets`): the precompute actors, the serving actors, the inline teacher and `verify_cache` all call it,
so they agree by construction (up to the codec).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from curriculum.data import padded_hw
from curriculum.errors import CacheError, DataError, ModelError
from teachers.targets import FIELDS, PROPOSAL_BOXES, fields_of


# Full forwards of teachers loaded in this process (`load_teacher`): how a sweep shows that its trials run no
# teacher, and a training report how many the inline mode ran.
_TEACHER_FORWARDS = [0]


def _count_forward(module: torch.nn.Module, args: Any) -> None:
    _TEACHER_FORWARDS[0] += 1


def teacher_forward_counts() -> dict[str, int]:
    """Forwards of teachers loaded with `load_teacher` run in this process so far."""
    return {"teacher": _TEACHER_FORWARDS[0]}


def load_teacher(checkpoint: str, name: str | None = None, device: str | None = None) -> Any:
    """A zoo detector from its checkpoint, in eval mode, without gradients."""
    from teachers.zoo import load_detector

    det = load_detector(checkpoint)
    if name and det.config.name != name:
        raise ModelError(f"teacher checkpoint {checkpoint} holds {det.config.name}, the config names {name}: "
                         "fix the name or the path")
    det.eval().requires_grad_(False)
    det.register_forward_pre_hook(_count_forward)
    if device:
        det.to(device)
    return det


def actor_device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def actor_threads(cpus: float, threads: int) -> int:
    return threads or max(1, int(round(cpus)))


@torch.no_grad()
def teacher_outputs(
    detector: Any, images: Sequence[torch.Tensor], targets: Sequence[str], levels: Sequence[str] | None = None,
    keep: dict[str, Any] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run the teacher once on a batch; per image a dict ``column name -> float32/int64 numpy``.

    The single place teacher outputs are turned into cache columns: the precompute actors, the serving actors
    and the inline reference all call it, so the three agree by construction (up to the codec).
    `keep`: when given, receives the full FPN ``features`` and ``image_sizes`` (the inline teacher binds its
    RoI scorer to them).
    """
    want = set()
    if keep is not None:
        want.add("features")
    if "features" in targets:
        want.add("features")
    if "head" in targets or "proposals" in targets:
        want.add("head")
    if "detections" in targets:
        want.add("detections")
    rows: list[dict[str, np.ndarray]] = [{} for _ in images]
    groups = _by_padded_size(images)
    kept: list[tuple[list[int], Any]] = []
    for members in groups:
        out = _forward(detector, [images[i] for i in members], want)
        for i, row in zip(members, _columns(detector, out, targets, levels, members)):
            rows[i] = row
        kept.append((members, out))
    if keep is not None:
        keep["features"], keep["image_sizes"] = _in_batch_order(kept, len(images))
    return rows


def _by_padded_size(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Batch positions grouped by padded input size, in order of first appearance.

    A view's targets are the teacher's output on that view padded alone (to a multiple of 32), whatever else is in
    the batch: images of one padded size run together, so a cached row never depends on its batch neighbours."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        groups.setdefault(padded_hw(h, w), []).append(i)
    return list(groups.values())


def _forward(detector: Any, images: Sequence[torch.Tensor], want: set[str]) -> Any:
    device = next(detector.parameters()).device
    imgs = [im.to(device, non_blocking=True) for im in images]
    if device.type == "cuda":
        with torch.autocast("cuda"):
            return detector(imgs, want=tuple(sorted(want)))
    return detector(imgs, want=tuple(sorted(want)))


def _in_batch_order(kept: list[tuple[list[int], Any]], n: int) -> tuple[dict[str, torch.Tensor], list]:
    """The groups' FPN features as one batch (zero-padded to the largest) and the image sizes, in batch order."""
    if len(kept) == 1:
        return kept[0][1].features, kept[0][1].image_sizes
    sizes: list[Any] = [None] * n
    per_image: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for members, out in kept:
        for j, i in enumerate(members):
            sizes[i] = out.image_sizes[j]
            per_image[i] = {lvl: f[j] for lvl, f in out.features.items()}
    features = {}
    for lvl in per_image[0]:
        maps = [p[lvl] for p in per_image]
        h, w = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
        features[lvl] = torch.stack([torch.nn.functional.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2])) for m in maps])
    return features, sizes


def _columns(detector: Any, out: Any, targets: Sequence[str], levels: Sequence[str] | None,
             positions: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Per image of one forward, ``column name -> numpy`` (the schema's cache columns); `positions`: the images'
    places in the caller's batch (what an error names)."""
    n = len(out.image_sizes)
    rows: list[dict[str, np.ndarray]] = [{} for _ in range(n)]

    def put(name: str, t: torch.Tensor, i: int) -> None:
        a = t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
        rows[i][name] = a

    if "features" in targets:
        chosen = list(out.features) if levels is None else list(levels)
        missing = [l for l in chosen if l not in out.features]
        if missing:
            raise CacheError(f"{detector.config.name} has no FPN level(s) {missing}; it has {list(out.features)}")
        for lvl in chosen:
            for i in range(n):
                put(f"features/{lvl}", out.features[lvl][i], i)
    if "head" in targets:
        for name in (k for k in fields_of("head", detector.kind) if k in out.head):
            for l, t in enumerate(out.head[name]):
                for i in range(n):
                    put(f"head/{name}/{l}", t[i], i)
    if "detections" in targets:
        for i, d in enumerate(out.detections):
            put("detections/boxes", d["boxes"], i)
            put("detections/scores", d["scores"], i)
            put("detections/labels", d["labels"].to(torch.int64), i)
    if "proposals" in targets:
        if detector.kind != "two_stage":
            raise CacheError(f"target 'proposals' needs a two-stage teacher; {detector.config.name} is one-stage")
        counts = [len(p) for p in out.head["proposals"]]
        cls = out.head["class_logits"].split(counts)
        reg = out.head["box_regression"].split(counts)
        for i in range(n):
            put(PROPOSAL_BOXES, out.head["proposals"][i], i)
            put(FIELDS["roi_class_logits"].column, cls[i], i)
            put(FIELDS["roi_box_regression"].column, reg[i], i)
    for i, row in enumerate(rows):
        for name, a in row.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise DataError(f"teacher {detector.config.name} output {name} is not finite for batch position "
                                f"{positions[i]}: nothing is cached for it (a half-precision teacher overflowing?)")
    return rows
