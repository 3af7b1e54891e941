"""What the teacher says about a batch, whatever produced it.

One interface for teacher targets whether they come from a cache on disk, from serving actors on
other machines or from a teacher run inline in the training step. The losses in this package read
only this object, so a cache that stores fewer fields simply leaves them ``None`` and a loss that
needs a missing field says which one (``ConfigError`` from the distiller).

Targets are constants: every tensor is detached when the object is built, and ``score_rois`` runs
the teacher's RoI head under ``torch.no_grad``. No gradient ever flows into a teacher.

Layouts (N images in the batch, in the same order as the student's batch):

- ``features``: ``{level: [N, C, H, W]}`` FPN outputs ("p3".."p7" one-stage, "p2".."p6" two-stage).
- ``cls_logits`` / ``bbox_regression`` / ``bbox_ctrness``: per level lists of the one-stage head,
  ``[N, HWA_l, K]`` / ``[N, HWA_l, 4]`` / ``[N, HW_l, 1]`` (K includes the unused background index 0).
- ``objectness`` / ``rpn_deltas``: per level RPN maps ``[N, A, H, W]`` / ``[N, 4A, H, W]``.
- ``roi_class_logits [R, K]`` / ``roi_box_regression [R, 4K]``: the teacher's RoI head on the R boxes the
  student's RoI head scored (rows in the same order); ``roi_counts`` (rows per image) lets an error
  name the image of a bad row.
- ``detections``: per image ``{"boxes" [D, 4], "scores" [D], "labels" [D]}``.
- ``roi_scorer``: the teacher's RoI head bound to its features of this batch; given boxes per image
  (xyxy, input pixels) it returns ``(class_logits [R, K], box_regression [R, 4K])``. TAR's proposal
  sharing uses it to score the student's proposals.

The inline source: ``TeacherTargets.inline(teacher, images)`` runs a zoo teacher (``teachers.zoo``) in eval
mode under ``torch.no_grad`` on the student's batch and wraps its output with ``from_output``. The cache
and the serving actors build the same object from what they stored or received.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from curriculum.errors import ConfigError, DataError

RoIScorer = Callable[[list[Tensor]], tuple[Tensor, Tensor]]

_PER_LEVEL_FIELDS = ("cls_logits", "bbox_regression", "bbox_ctrness", "objectness", "rpn_deltas")
_ROI_FIELDS = ("roi_class_logits", "roi_box_regression")
# DetectorOutput.head keys (teachers.zoo) that are teacher targets as they are.
_HEAD_FIELDS = ("cls_logits", "bbox_regression", "bbox_ctrness", "objectness", "rpn_deltas")


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def _to(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _bad_images(t: Tensor) -> list[int]:
    """Batch positions (dim 0) whose slice holds NaN or inf."""
    if t.numel() == 0 or not torch.is_floating_point(t):
        return []
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return []
    return [int(i) for i in torch.nonzero(bad).flatten().tolist()]


@dataclass
class TeacherTargets:
    """Teacher outputs for one batch; every field optional (see the module docstring for layouts)."""

    features: dict[str, Tensor] | None = None
    cls_logits: list[Tensor] | None = None
    bbox_regression: list[Tensor] | None = None
    bbox_ctrness: list[Tensor] | None = None
    objectness: list[Tensor] | None = None
    rpn_deltas: list[Tensor] | None = None
    roi_class_logits: Tensor | None = None
    roi_box_regression: Tensor | None = None
    roi_counts: list[int] | None = None
    detections: list[dict[str, Tensor]] | None = None
    image_ids: list[int] | None = None
    roi_scorer: RoIScorer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Targets are constants: detach once here so no loss can reach the teacher's graph.
        for f in fields(self):
            if f.name in ("roi_scorer", "image_ids", "roi_counts"):
                continue
            setattr(self, f.name, _detach(getattr(self, f.name)))
        if self.image_ids is not None:
            self.image_ids = [int(i) for i in self.image_ids]

    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_output(
        cls,
        out: Any,
        teacher: Any = None,
        image_ids: Sequence[int] | None = None,
        keep: Collection[str] | None = None,
    ) -> TeacherTargets:
        """Targets from a teacher's ``DetectorOutput`` (``teachers.zoo``) on the student's batch.

        ``out`` should come from ``teacher(images, want=("features", "head"))`` in eval mode under
        ``torch.no_grad`` (``inline`` does that), on the same images, in the same order and at the same input
        size as the student's. Taken: ``features``; one-stage ``cls_logits`` / ``bbox_regression`` /
        ``bbox_ctrness``; two-stage ``objectness`` / ``rpn_deltas``; ``detections`` when recorded. A two-stage
        teacher's own RoI outputs are not taken: they score the teacher's proposals, not the student's RoIs.
        Give ``teacher`` (a two-stage ``Detector``) for ``roi_scorer``: its RoI head bound to these features
        (``Detector.score_boxes``), for proposal sharing. ``keep``: only these fields (e.g.
        ``distiller.required_teacher_targets()``), so nothing unused is kept or checked.
        """
        head = out.head or {}
        kwargs: dict[str, Any] = {name: head.get(name) for name in _HEAD_FIELDS}
        kwargs["features"] = out.features
        kwargs["detections"] = out.detections
        if teacher is not None and getattr(teacher, "kind", None) == "two_stage":
            if out.features is None:
                raise ConfigError(
                    "TeacherTargets.from_output: a roi_scorer needs the teacher's features; run the teacher with "
                    "want=('features', 'head')"
                )
            feats = {k: v.detach() for k, v in out.features.items()}
            sizes = [tuple(s) for s in out.image_sizes]
            kwargs["roi_scorer"] = lambda boxes: teacher.score_boxes(feats, boxes, sizes)
        if keep is not None:
            keep = set(keep)
            if keep & set(_ROI_FIELDS):  # the RoI losses take stored RoI rows or, inline, the scorer
                keep.add("roi_scorer")
            kwargs = {k: v for k, v in kwargs.items() if k in keep}
        return cls(**kwargs, image_ids=list(image_ids) if image_ids is not None else None)

    @classmethod
    def inline(
        cls,
        teacher: Any,
        images: Sequence[Tensor],
        image_ids: Sequence[int] | None = None,
        keep: Collection[str] | None = None,
    ) -> TeacherTargets:
        """Run a zoo teacher on the student's batch (eval mode, no grad) and wrap it (``from_output``).

        The teacher is put in eval mode and left there: a teacher is frozen (BatchNorm statistics included).
        """
        teacher.eval()
        with torch.no_grad():
            out = teacher(list(images), want=("features", "head"))
        return cls.from_output(out, teacher, image_ids, keep)

    def to(self, device: torch.device | str) -> TeacherTargets:
        """A copy with every tensor on ``device`` (the scorer is kept as is)."""
        kwargs = {f.name: _to(getattr(self, f.name), device) for f in fields(self) if f.name != "roi_scorer"}
        return TeacherTargets(**kwargs, roi_scorer=self.roi_scorer)

    def present(self) -> set[str]:
        """Names of the fields that are set."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}

    def score_rois(self, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Run the teacher's RoI head on ``boxes`` (per image); constants, no graph."""
        if self.roi_scorer is None:
            raise DataError(
                "the teacher targets have no roi_scorer; proposal sharing needs the teacher's RoI head "
                "bound to its features (inline teacher or serving actor), which a feature cache cannot give"
            )
        with torch.no_grad():
            cls, reg = self.roi_scorer([b.detach() for b in boxes])
        return cls.detach(), reg.detach()

    # ----------------------------------------------------------------------------------------

    def _image_name(self, pos: int, image_ids: Sequence[int] | None) -> str:
        ids = image_ids if image_ids is not None else self.image_ids
        if ids is not None and 0 <= pos < len(ids):
            return f"image_id {ids[pos]} (batch position {pos})"
        return f"batch position {pos} (image id unknown)"

    def _raise(self, what: str, pos: int | None, image_ids: Sequence[int] | None, extra: str = "") -> None:
        where = self._image_name(pos, image_ids) if pos is not None else "an unknown image"
        raise DataError(
            f"teacher target {what} holds NaN or inf for {where}{extra}; the teacher output or the "
            f"cache entry of this image is corrupt: re-run the teacher on it or delete its cache entry "
            f"(a half-precision teacher overflowing is a common cause)"
        )

    def check_finite(self, image_ids: Sequence[int] | None = None) -> None:
        """Raise DataError naming the field and the image if any target holds NaN or inf.

        ``image_ids`` overrides ``self.image_ids`` for the message. RoI rows are mapped to images
        through ``roi_counts``; without it the error says which rows are bad.
        """
        if self.features is not None:
            for lvl, t in self.features.items():
                bad = _bad_images(t)
                if bad:
                    self._raise(f"'features[{lvl}]'", bad[0], image_ids)
        for name in _PER_LEVEL_FIELDS:
            levels = getattr(self, name)
            if levels is None:
                continue
            for i, t in enumerate(levels):
                bad = _bad_images(t)
                if bad:
                    self._raise(f"'{name}[{i}]'", bad[0], image_ids)
        for name in _ROI_FIELDS:
            t = getattr(self, name)
            if t is None:
                continue
            bad_rows = _bad_images(t)
            if bad_rows:
                self._raise_rows(name, bad_rows, image_ids)
        if self.detections is not None:
            for pos, det in enumerate(self.detections):
                for key, t in det.items():
                    if isinstance(t, Tensor) and torch.is_floating_point(t) and t.numel():
                        if not bool(torch.isfinite(t).all()):
                            self._raise(f"'detections[{pos}][{key}]'", pos, image_ids)

    def _raise_rows(self, name: str, bad_rows: list[int], image_ids: Sequence[int] | None) -> None:
        row = bad_rows[0]
        if self.roi_counts is not None:
            start = 0
            for pos, n in enumerate(self.roi_counts):
                if start <= row < start + n:
                    self._raise(f"'{name}'", pos, image_ids, extra=f" (RoI row {row})")
                start += n
        ids = image_ids if image_ids is not None else self.image_ids
        self._raise(
            f"'{name}'",
            None,
            image_ids,
            extra=f": rows {bad_rows[:10]} of the batch with image ids {ids} (give roi_counts to name the image)",
        )


def check_rows_finite(
    name: str, t: Tensor, counts: Sequence[int], image_ids: Sequence[int] | None
) -> None:
    """Finite check for teacher RoI outputs computed on the fly (proposal sharing)."""
    holder = TeacherTargets(roi_counts=list(counts), image_ids=list(image_ids) if image_ids else None)
    bad = _bad_images(t)
    if bad:
        holder._raise_rows(name, bad, None)
