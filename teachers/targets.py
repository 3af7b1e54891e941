"""What a teacher says about a batch: the target schema (one table) and `TeacherTargets`.

`TARGETS` is the one table of teacher targets: for each field of `TeacherTargets`, its tensor layout, the cache
target kind that stores it, its cache columns, which detectors produce it and which losses read it. The zoo's
recording (`teachers.zoo.DetectorOutput`), the cache's columns (`teachers.precompute.teacher_outputs`, the readers'
`collate_targets`), the plan's cache needs (`curriculum.plan.cache_needs`) and the losses (`trainers.distill`)
derive from it: adding a target kind is one row here plus its producer.

`TeacherTargets` is one batch of targets, whatever produced it: the cache readers, the serving actors and the
inline teacher build it; the losses only read it. A cache that stores fewer fields leaves them ``None`` and a loss
that needs a missing field says which one (``ConfigError`` from the distiller).

Targets are constants: every tensor is detached when the object is built, and ``score_rois`` runs the teacher's
RoI head under ``torch.no_grad``. No gradient ever flows into a teacher. N images in the batch, in the student's
batch order; ``roi_counts`` (RoI rows per image) lets an error name the image of a bad row; ``roi_scorer`` is the
teacher's RoI head bound to its features of this batch: given boxes per image (xyxy, input pixels) it returns
``(class_logits [R, K], box_regression [R, 4K])``, which TAR's proposal sharing uses to score the student's
proposals.

The inline source: ``TeacherTargets.inline(teacher, images)`` runs a zoo teacher in eval mode under
``torch.no_grad`` on the student's batch and wraps its output with ``from_output``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from curriculum.data import padded_hw
from curriculum.errors import ConfigError, DataError

RoIScorer = Callable[[list[Tensor]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class TargetField:
    """One row of the schema. `column`: the cache column, ``{level}`` for FPN levels and ``{i}`` for the level
    index of per-level head outputs. `detectors`: ``one_stage``, ``two_stage`` or ``any``. `read_by`: registry
    names of the losses that read the field (tests/test_targets.py checks it against the losses themselves)."""

    name: str
    layout: str
    kind: str
    column: str
    detectors: str
    read_by: tuple[str, ...]


TARGETS: tuple[TargetField, ...] = (
    TargetField("features", "{level: [N, C, H, W]}, p3..p7 one-stage, p2..p6 two-stage", "features",
                "features/{level}", "any",
                ("chen_hint", "fitnet", "mgd", "tar_feature", "zhang_attention", "zhang_feature", "zhang_nonlocal")),
    TargetField("cls_logits", "per level [N, HWA_l, K] (K includes the unused background 0)", "head",
                "head/cls_logits/{i}", "one_stage", ("chen_cls", "hinton_kd")),
    TargetField("bbox_regression", "per level [N, HWA_l, 4]", "head", "head/bbox_regression/{i}", "one_stage",
                ("chen_reg",)),
    TargetField("bbox_ctrness", "per level [N, HW_l, 1] (FCOS)", "head", "head/bbox_ctrness/{i}", "one_stage",
                ("hinton_kd",)),
    TargetField("objectness", "per level [N, A, H, W]", "head", "head/objectness/{i}", "two_stage",
                ("chen_cls", "hinton_kd")),
    TargetField("rpn_deltas", "per level [N, 4A, H, W]", "head", "head/rpn_deltas/{i}", "two_stage", ("chen_reg",)),
    TargetField("roi_class_logits", "[R, K]: the teacher's RoI head on R boxes", "proposals",
                "proposals/class_logits", "two_stage", ("chen_cls", "hinton_kd")),
    TargetField("roi_box_regression", "[R, 4K]", "proposals", "proposals/box_regression", "two_stage",
                ("chen_reg",)),
    TargetField("detections", "per image {boxes [D, 4], scores [D], labels [D]} after NMS, view pixels",
                "detections", "detections/{boxes,scores,labels}", "any", ()),
    TargetField("roi_scorer", "the teacher's RoI head bound to this batch's features (not a tensor)", "features",
                "features/{level}", "two_stage", ("tar_box", "tar_cls")),
    TargetField("mask_scorer", "a Mask R-CNN teacher's mask head bound to this batch's features: boxes per image -> "
                "mask logits [R, K, M, M] (not a tensor)", "features", "features/{level}", "two_stage", ("mask_kd",)),
)
SCORERS = ("roi_scorer", "mask_scorer")  # heads bound to features, not tensors
FIELDS: dict[str, TargetField] = {f.name: f for f in TARGETS}
PROPOSAL_BOXES = "proposals/boxes"  # the boxes (view pixels) the cached RoI rows of an image belong to


def fields_of(kind: str, detector: str | None = None) -> tuple[str, ...]:
    """Tensor fields stored under cache kind `kind`, of a `detector` kind (``one_stage``/``two_stage``) if given."""
    return tuple(f.name for f in TARGETS if f.kind == kind and f.name not in SCORERS
                 and (detector is None or f.detectors in (detector, "any")))


def cache_kind(field_name: str) -> str:
    """The cache target kind that holds `field_name` (``roi_scorer`` is bound to the cached features)."""
    return FIELDS[field_name].kind


_PER_LEVEL_FIELDS = fields_of("head")
_ROI_FIELDS = fields_of("proposals")


def detached(x: Any) -> Any:
    """`x` (tensors in dicts, lists and tuples) with every tensor detached from the graph."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(detached(v) for v in x)
    return x


def _to(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _all_finite(tensors: Sequence[Any]) -> bool:
    """True when every floating tensor given is free of NaN and inf, in one reduction per tensor (this runs every
    step): a sum is finite when all its values are. False also when a sum of finite values overflows, so a False
    only sends the caller to its exact, per-image search."""
    sums = [t.sum(dtype=torch.float32) for t in tensors
            if isinstance(t, Tensor) and torch.is_floating_point(t) and t.numel()]
    if not sums:
        return True
    return bool(torch.isfinite(torch.stack([x.to(sums[0].device) for x in sums])).all())


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
    mask_scorer: Callable[[list[Tensor]], Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Targets are constants: detach once here so no loss can reach the teacher's graph.
        for f in fields(self):
            if f.name in (*SCORERS, "image_ids", "roi_counts"):
                continue
            setattr(self, f.name, detached(getattr(self, f.name)))
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
        kwargs: dict[str, Any] = {name: head.get(name) for name in _PER_LEVEL_FIELDS}
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
            if getattr(teacher, "has_masks", False):
                kwargs["mask_scorer"] = lambda boxes: teacher.score_masks(feats, boxes, sizes)
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
        if len({padded_hw(*im.shape[-2:]) for im in images}) > 1:
            return cls._inline_by_view(teacher, images, image_ids, keep)
        with torch.no_grad():
            out = teacher(list(images), want=("features", "head"))
        return cls.from_output(out, teacher, image_ids, keep)

    @classmethod
    def _inline_by_view(cls, teacher: Any, images: Sequence[Tensor], image_ids: Sequence[int] | None,
                        keep: Collection[str] | None) -> TeacherTargets:
        """A batch of keep-ratio views of different padded sizes: each view's targets as the cache holds them (the
        teacher on the view padded alone), laid out on the batch's padded grid like the cache's."""
        from teachers.outputs import teacher_outputs
        from teachers.readers import collate_targets

        kinds = ["features", "head"]
        held: dict[str, Any] = {}
        rows = teacher_outputs(teacher, list(images), kinds, keep=held)
        scorer = masks = None
        if getattr(teacher, "kind", None) == "two_stage":
            feats, sizes = held["features"], held["image_sizes"]
            scorer = lambda boxes: teacher.score_boxes(feats, list(boxes), sizes)  # noqa: E731
            if getattr(teacher, "has_masks", False):
                masks = lambda boxes: teacher.score_masks(feats, list(boxes), sizes)  # noqa: E731
        padded = [padded_hw(*im.shape[-2:]) for im in images]
        ids = list(image_ids) if image_ids is not None else list(range(len(images)))
        tt = collate_targets(rows, ids, roi_scorer=scorer, sizes=padded).to(images[0].device)
        tt.mask_scorer = masks
        if image_ids is None:
            tt.image_ids = None
        if keep is not None:
            wanted = set(keep) | ({"roi_scorer"} if set(keep) & set(_ROI_FIELDS) else set())
            for f in fields(tt):
                if f.name not in wanted | {"image_ids", "roi_counts"}:
                    setattr(tt, f.name, None)
        return tt

    def to(self, device: torch.device | str) -> TeacherTargets:
        """A copy with every tensor on ``device`` (the scorer is kept as is)."""
        kwargs = {f.name: _to(getattr(self, f.name), device) for f in fields(self) if f.name not in SCORERS}
        return TeacherTargets(**kwargs, roi_scorer=self.roi_scorer, mask_scorer=self.mask_scorer)

    def present(self) -> set[str]:
        """Names of the fields that are set."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}

    def score_masks(self, boxes: Sequence[Tensor]) -> Tensor:
        """Run a Mask R-CNN teacher's mask head on ``boxes`` (per image): mask logits ``[R, K, M, M]``, constants."""
        if self.mask_scorer is None:
            raise DataError(
                "the teacher targets have no mask_scorer; the mask term needs a Mask R-CNN teacher's mask head bound "
                "to its features (inline teacher, serving actor, or a cache of every RoI level)")
        with torch.no_grad():
            return self.mask_scorer([b.detach() for b in boxes]).detach()

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
        maps = [(f"features[{lvl}]", t) for lvl, t in (self.features or {}).items()]
        maps += [(f"{name}[{i}]", t) for name in _PER_LEVEL_FIELDS for i, t in enumerate(getattr(self, name) or [])]
        if _all_finite([t for _, t in maps] + [getattr(self, name) for name in _ROI_FIELDS]
                       + [t for det in self.detections or [] for t in det.values()]):
            return
        for label, t in maps:
            bad = _bad_images(t)
            if bad:
                self._raise(f"'{label}'", bad[0], image_ids)
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
