"""One batch as the distillation losses see it: student outputs, teacher targets, ground truth.

The training step hands the distiller a plain dict of student outputs. Keys (all optional; a loss
that needs a missing one raises ConfigError naming the entry and the key):

Features
    ``features``: ``{level: [N, C, H, W]}``.
One-stage dense head (per level lists, same layout as the teacher's)
    ``cls_logits [N, HWA_l, K]``, ``bbox_regression [N, HWA_l, 4]``, ``bbox_ctrness [N, HW_l, 1]``;
    for the losses that need the anchor matching: ``dense_labels [N, HWA_l]`` (int: class > 0 for a
    positive anchor, 0 background, -1 ignored) and ``dense_reg_targets [N, HWA_l, 4]`` (encoded like
    ``bbox_regression``).
RPN (per level lists)
    ``objectness [N, A, H, W]``, ``rpn_deltas [N, 4A, H, W]`` (channel ``4a + j`` is coordinate j of
    anchor a, torchvision's layout); ``rpn_labels [N, A, H, W]`` (1 positive, 0 negative, -1 not in
    the sampled mini-batch) and ``rpn_reg_targets [N, 4A, H, W]``.
RoI head (R sampled proposals of the whole batch, image by image)
    ``proposals``: list of ``[R_i, 4]`` xyxy; ``roi_class_logits [R, K]``, ``roi_box_regression
    [R, 4K]``, ``roi_labels [R]`` (matched GT class, 0 background), ``roi_reg_targets [R, 4]``
    (encoded targets for the matched class) and optionally ``roi_matched_gt_boxes [R, 4]``.

Ground truth: a list with one dict per image, ``{"boxes": [M, 4] xyxy input pixels, "labels": [M]}``
and optionally ``"image_size": (H_img, W_img)`` and ``"image_id"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curriculum.errors import ConfigError, DataError

from .common import ROI_BOX_CODER_WEIGHTS, decode_deltas, pairwise_iou
from teachers.targets import TeacherTargets, check_rows_finite

HEADS = ("roi", "rpn", "dense")

# torchvision's loss names of the detector's own terms, per head (used by detector_loss_scales).
DETECTOR_CLS_LOSS = {"roi": "loss_classifier", "rpn": "loss_objectness", "dense": "classification"}
DETECTOR_REG_LOSS = {"roi": "loss_box_reg", "rpn": "loss_rpn_box_reg", "dense": "bbox_regression"}


def pick_class_deltas(box_regression: Tensor, rows: Tensor, labels: Tensor) -> Tensor:
    """Deltas of class ``labels`` at ``rows`` from ``[R, 4K]`` (class-specific) or ``[R, 4]`` (agnostic)."""
    per_class = box_regression.reshape(box_regression.shape[0], -1, 4)
    if per_class.shape[1] == 1:
        return per_class[rows, 0]
    return per_class[rows, labels.long()]


@dataclass
class HeadView:
    """A head's outputs flattened to rows: one row per RoI / anchor.

    ``kind`` is "softmax" (RoI head, K columns incl. background 0) or "sigmoid" (RPN objectness,
    one column; dense head, K columns with column 0 unused).
    """

    kind: str
    s_logits: Tensor
    t_logits: Tensor
    labels: Tensor | None  # [M] (None when the training step gave none)


@dataclass
class RegView:
    """Regression rows of the positive samples of a head."""

    s_reg: Tensor  # [P, 4]
    t_reg: Tensor  # [P, 4]
    targets: Tensor  # [P, 4]
    num_samples: int  # rows in the sampled mini-batch (RoIs, sampled anchors, non-ignored anchors)


def student_device(student: Mapping[str, Any]) -> torch.device:
    """Device of the first tensor among the student outputs (CPU if there is none)."""
    for v in student.values():
        if isinstance(v, Tensor):
            return v.device
        if isinstance(v, dict) and v:
            first = next(iter(v.values()))
            if isinstance(first, Tensor):
                return first.device
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], Tensor):
            return v[0].device
    return torch.device("cpu")


class DistillContext:
    """Gathers and checks what the losses of one forward pass read; caches shared work."""

    def __init__(
        self,
        student: Mapping[str, Any],
        targets: TeacherTargets,
        gt: Sequence[Mapping[str, Any]] | None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(targets, TeacherTargets):
            raise ConfigError(
                f"the distiller needs a TeacherTargets, got {type(targets).__name__}; wrap the teacher "
                f"outputs (cache, actors or inline teacher) in trainers.distill.TeacherTargets"
            )
        self.student = student
        self.targets = targets
        self.gt = list(gt) if gt is not None else None
        self.generator = generator
        self._teacher_roi: tuple[Tensor, Tensor] | None = None

    # --------------------------------------------------------------------------------------
    def s(self, key: str, entry: str) -> Any:
        value = self.student.get(key)
        if value is None:
            raise ConfigError(
                f"distillation entry {entry!r} needs the student output {key!r}, which the training step "
                f"did not give (it gave {sorted(k for k, v in self.student.items() if v is not None)})"
            )
        return value

    def t(self, key: str, entry: str) -> Any:
        value = getattr(self.targets, key)
        if value is None:
            raise ConfigError(
                f"distillation entry {entry!r} needs the teacher target {key!r}, absent from this batch's "
                f"targets (present: {sorted(self.targets.present())}); configure the teacher or the cache "
                f"to provide it, or drop the entry"
            )
        return value

    def device(self) -> torch.device:
        return student_device(self.student)

    def image_ids(self) -> list[int] | None:
        if self.targets.image_ids is not None:
            return self.targets.image_ids
        if self.gt is not None and all("image_id" in g for g in self.gt):
            return [int(g["image_id"]) for g in self.gt]
        return None

    # --------------------------------------------------------------------------------------
    def feature_pair(self, level: str, entry: str) -> tuple[Tensor, Tensor]:
        s_feats = self.s("features", entry)
        t_feats = self.t("features", entry)
        if level not in s_feats:
            raise ConfigError(
                f"distillation entry {entry!r}: the student features have no level {level!r} "
                f"(they have {list(s_feats)})"
            )
        if level not in t_feats:
            raise ConfigError(
                f"distillation entry {entry!r}: the teacher features have no level {level!r} "
                f"(they have {list(t_feats)}); the teacher or cache must provide every level in 'levels'"
            )
        return s_feats[level], t_feats[level]

    def gt_boxes(self, entry: str) -> list[Tensor]:
        if self.gt is None:
            raise ConfigError(f"distillation entry {entry!r} needs the ground truth (gt) of the batch")
        out = []
        for i, g in enumerate(self.gt):
            boxes = g.get("boxes")
            if boxes is None:
                raise DataError(f"distillation entry {entry!r}: gt[{i}] has no 'boxes'")
            out.append(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        return out

    # --------------------------------------------------------------------------------------
    def _levels_pair(self, s_key: str, t_key: str, entry: str) -> tuple[list[Tensor], list[Tensor]]:
        s_lv = list(self.s(s_key, entry))
        t_lv = list(self.t(t_key, entry))
        if len(s_lv) != len(t_lv):
            raise DataError(
                f"distillation entry {entry!r}: the student gives {s_key!r} on {len(s_lv)} levels but the "
                f"teacher on {len(t_lv)}; head distillation needs the same levels and anchors"
            )
        for i, (a, b) in enumerate(zip(s_lv, t_lv)):
            if a.shape != b.shape:
                raise DataError(
                    f"distillation entry {entry!r}: {s_key!r} level {i} is {tuple(a.shape)} for the student "
                    f"but {tuple(b.shape)} for the teacher; head distillation needs the same input size, "
                    f"anchors and classes"
                )
        return s_lv, t_lv

    @staticmethod
    def _rpn_deltas_rows(levels: Sequence[Tensor]) -> Tensor:
        rows = []
        for t in levels:
            n, a4, h, w = t.shape
            rows.append(t.reshape(n, a4 // 4, 4, h, w).permute(0, 1, 3, 4, 2).reshape(-1, 4))
        return torch.cat(rows, 0)

    def head(self, head: str, entry: str) -> HeadView:
        if head == "roi":
            s = self.s("roi_class_logits", entry)
            t, _ = self.teacher_roi(entry)
            labels = self.student.get("roi_labels")
            return HeadView("softmax", s, t, None if labels is None else labels.reshape(-1))
        if head == "rpn":
            s_lv, t_lv = self._levels_pair("objectness", "objectness", entry)
            s = torch.cat([x.reshape(-1, 1) for x in s_lv], 0)
            t = torch.cat([x.reshape(-1, 1) for x in t_lv], 0)
            lab = self.student.get("rpn_labels")
            labels = None if lab is None else torch.cat([x.reshape(-1) for x in lab], 0)
            return HeadView("sigmoid", s, t, labels)
        if head == "dense":
            s_lv, t_lv = self._levels_pair("cls_logits", "cls_logits", entry)
            k = s_lv[0].shape[-1]
            s = torch.cat([x.reshape(-1, k) for x in s_lv], 0)
            t = torch.cat([x.reshape(-1, k) for x in t_lv], 0)
            lab = self.student.get("dense_labels")
            labels = None if lab is None else torch.cat([x.reshape(-1) for x in lab], 0)
            return HeadView("sigmoid", s, t, labels)
        raise ConfigError(f"distillation entry {entry!r}: head {head!r} unknown; use one of {list(HEADS)}")

    def ctrness(self, entry: str) -> tuple[Tensor, Tensor]:
        s_lv, t_lv = self._levels_pair("bbox_ctrness", "bbox_ctrness", entry)
        return (torch.cat([x.reshape(-1, 1) for x in s_lv], 0), torch.cat([x.reshape(-1, 1) for x in t_lv], 0))

    def regression(self, head: str, entry: str) -> RegView:
        """Positive rows of a head's regression, with the teacher's and the targets."""
        if head == "roi":
            labels = self.s("roi_labels", entry).reshape(-1).long()
            s_all = self.s("roi_box_regression", entry)
            _, t_all = self.teacher_roi(entry)
            targets = self.s("roi_reg_targets", entry)
            pos = torch.nonzero(labels > 0).flatten()
            lab = labels[pos]
            s_reg = pick_class_deltas(s_all, pos, lab)
            t_reg = pick_class_deltas(t_all, pos, lab)
            return RegView(s_reg, t_reg, targets.reshape(-1, 4)[pos], int(labels.numel()))
        if head == "rpn":
            s_lv, t_lv = self._levels_pair("rpn_deltas", "rpn_deltas", entry)
            s = self._rpn_deltas_rows(s_lv)
            t = self._rpn_deltas_rows(t_lv)
            y = self._rpn_deltas_rows(self.s("rpn_reg_targets", entry))
            labels = torch.cat([x.reshape(-1) for x in self.s("rpn_labels", entry)], 0)
            pos = labels == 1
            return RegView(s[pos], t[pos], y[pos], int((labels >= 0).sum()))
        if head == "dense":
            s_lv, t_lv = self._levels_pair("bbox_regression", "bbox_regression", entry)
            s = torch.cat([x.reshape(-1, 4) for x in s_lv], 0)
            t = torch.cat([x.reshape(-1, 4) for x in t_lv], 0)
            y = torch.cat([x.reshape(-1, 4) for x in self.s("dense_reg_targets", entry)], 0)
            labels = torch.cat([x.reshape(-1) for x in self.s("dense_labels", entry)], 0)
            pos = labels > 0
            return RegView(s[pos], t[pos], y[pos], int((labels >= 0).sum()))
        raise ConfigError(f"distillation entry {entry!r}: head {head!r} unknown; use one of {list(HEADS)}")

    # --------------------------------------------------------------------------------------
    def teacher_roi(self, entry: str) -> tuple[Tensor, Tensor]:
        """The teacher's RoI head on the student's RoIs: stored rows, or proposal sharing.

        Stored ``roi_class_logits`` / ``roi_box_regression`` win when present (they must have the
        student's R rows); otherwise ``roi_scorer`` scores the student's ``proposals``. Computed once
        per forward pass and shared by every entry.
        """
        if self._teacher_roi is not None:
            return self._teacher_roi
        s_cls = self.s("roi_class_logits", entry)
        r = s_cls.shape[0]
        tg = self.targets
        if tg.roi_class_logits is not None and tg.roi_box_regression is not None:
            cls, reg = tg.roi_class_logits, tg.roi_box_regression
            if cls.shape[0] != r or reg.shape[0] != r:
                raise DataError(
                    f"distillation entry {entry!r}: the teacher RoI outputs have {cls.shape[0]} rows but the "
                    f"student scored {r} RoIs; stored teacher RoI outputs must be computed on the student's "
                    f"sampled proposals (or give roi_scorer for proposal sharing)"
                )
        elif tg.roi_scorer is not None:
            proposals = self.s("proposals", entry)
            cls, reg = tg.score_rois(list(proposals))
            cls, reg = cls.to(s_cls.device), reg.to(s_cls.device)
            counts = [int(p.shape[0]) for p in proposals]
            check_rows_finite("roi_scorer class_logits", cls, counts, self.image_ids())
            check_rows_finite("roi_scorer box_regression", reg, counts, self.image_ids())
            if cls.shape[0] != r:
                raise DataError(
                    f"distillation entry {entry!r}: roi_scorer returned {cls.shape[0]} rows for "
                    f"{sum(counts)} proposals while the student scored {r} RoIs"
                )
        else:
            raise ConfigError(
                f"distillation entry {entry!r} needs the teacher's RoI head outputs: give "
                f"'roi_class_logits' and 'roi_box_regression' in the targets, or a 'roi_scorer' "
                f"(present: {sorted(tg.present())})"
            )
        if cls.shape != s_cls.shape:
            raise DataError(
                f"distillation entry {entry!r}: teacher RoI class logits are {tuple(cls.shape)}, the "
                f"student's {tuple(s_cls.shape)}; the two detectors must share the label set"
            )
        self._teacher_roi = (cls, reg)
        return self._teacher_roi

    def roi_matched_gt(self, entry: str, weights: Sequence[float] = ROI_BOX_CODER_WEIGHTS) -> Tensor:
        """GT box of each RoI: ``roi_matched_gt_boxes`` if given, else decoded from the targets,
        else the highest-IoU GT box of the same image."""
        given = self.student.get("roi_matched_gt_boxes")
        if given is not None:
            return given.reshape(-1, 4)
        proposals = torch.cat(list(self.s("proposals", entry)), 0)
        targets = self.student.get("roi_reg_targets")
        if targets is not None:
            return decode_deltas(targets.reshape(-1, 4).to(proposals.dtype), proposals, weights)
        boxes = self.gt_boxes(entry)
        out = []
        for p, g in zip(self.s("proposals", entry), boxes):
            g = g.to(p.device, p.dtype)
            if g.shape[0] == 0:
                out.append(p.clone())
            else:
                out.append(g[pairwise_iou(p, g).argmax(dim=1)])
        return torch.cat(out, 0) if out else proposals
