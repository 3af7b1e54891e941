"""Sun et al. 2020, "Distilling Object Detectors with Task Adaptive Regularization" (TAR, arXiv:2006.13108).

The authors released no code. What the paper states, and what this module does:

Region proposal sharing
    The student's proposals are scored by both R-CNN heads, so T and S answer on the same regions.
    Here: the teacher's RoI head, bound to the teacher's features of the batch, is
    ``TeacherTargets.roi_scorer``; the distiller calls it once per step on the student's sampled
    ``proposals`` (or reads stored ``roi_class_logits`` / ``roi_box_regression`` computed on them).

Adaptive transfer at three levels (the masks, gates and weights are *project choices*; the paper
gives the idea, not the formulas):

1. Backbone features, within object regions (``TARFeatureLoss``)
   ``L_feat = w_feat * sum_l  sum_{n,c,h,w} M (adapt(F_S) - F_T)^2 / (C * sum_{n,h,w} M)``,
   adapt = 1x1 conv. *Project choice*: ``M`` is a Gaussian around each ground-truth box,
   ``exp(-(x - cx)^2 / (2 sx^2) - (y - cy)^2 / (2 sy^2))`` with ``sx = sigma_scale * w``,
   ``sy = sigma_scale * h`` (``sigma_scale=0.5``: 0.61 at the box edge), evaluated at the feature
   cell centres ``(j + 0.5) * stride`` (stride ``2**k`` for level ``p<k>``, or the ``strides``
   option), maximum over the boxes of an image. Normalised by the mask's mass, per level; an image
   without objects contributes nothing, a batch without objects gives 0 (not NaN).

2. Classification head, where the teacher is the more reasonable one (``TARClassificationLoss``)
   ``L_cls = w_cls * T^2 * sum_{r in gate} KL(P_T^r || P_S^r) / R`` over the R shared RoIs.
   *Project choice* for the gate (``gate``): "teacher_better" (default) keeps RoI r when the teacher's
   probability of r's matched label (background for negatives) exceeds the student's;
   "teacher_correct": the teacher's arg-max is the matched label; "none": every RoI.
   ``temperature=1.0`` (project choice).

3. Box head, only where the teacher's refined box beats the proposal (``TARBoxLoss``)
   For a positive RoI r of class y with matched GT box g: decode the teacher's class-y deltas on the
   proposal (torchvision box coder, weights (10, 10, 5, 5)); keep r when
   ``IoU(teacher box, g) > IoU(proposal, g)`` (the paper's rule). Loss on the kept RoIs:
   ``w_box * sum smoothL1_beta(R_S^y - R_T^y) / R`` (*project choice*: the student's deltas pulled
   to the teacher's, smooth L1 with torchvision's RoI-head ``beta=1/9``, normalised by the sampled
   RoIs as torchvision's box loss; ``box_loss='l2'`` alternative).

Distillation decay
    Every distillation term is multiplied by ``r(t) = 1 - (t - 1) / t_max`` (t = epoch 1..t_max):
    ``schedules.decay_factor`` computes it; the trainer passes it as ``Distiller.forward(decay=...)``.

Weights ``w_feat = w_cls = w_box = 1.0`` are project choices (the paper tunes them per setting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from curriculum.errors import ConfigError, DataError

from .common import (
    ROI_BOX_CODER_WEIGHTS,
    DistillTerm,
    FeatureTerm,
    check_choice,
    check_level_dict,
    check_number,
    decode_deltas,
    level_stride,
    paired_iou,
    zero_from,
)
from .context import DistillContext, pick_class_deltas

TAR_DEFAULTS = {
    "sigma_scale": 0.5,
    "temperature": 1.0,
    "w_feat": 1.0,
    "w_cls": 1.0,
    "w_box": 1.0,
    "beta": 1.0 / 9.0,
}
CLS_GATES = ("teacher_better", "teacher_correct", "none")
BOX_LOSSES = ("smooth_l1", "l2")


def gaussian_object_mask(
    boxes: Sequence[Tensor],
    size_hw: tuple[int, int],
    stride_hw: tuple[float, float],
    sigma_scale: float = TAR_DEFAULTS["sigma_scale"],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian object mask ``[N, 1, H, W]`` in [0, 1]; all zeros for an image without boxes.

    Cell (i, j) sits at input pixel ``((j + 0.5) * stride_w, (i + 0.5) * stride_h)``; each box gives
    ``exp(-dx^2 / (2 (s w)^2) - dy^2 / (2 (s h)^2))`` (sigma at least 1 pixel); the maximum over boxes.
    """
    h, w = size_hw
    sh, sw = stride_hw
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * sh
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * sw
    out = torch.zeros(len(boxes), 1, h, w, device=device, dtype=dtype)
    for n, b in enumerate(boxes):
        b = b.to(device=device, dtype=dtype).reshape(-1, 4)
        if b.shape[0] == 0:
            continue
        cx = (b[:, 0] + b[:, 2]) / 2
        cy = (b[:, 1] + b[:, 3]) / 2
        sx = ((b[:, 2] - b[:, 0]) * sigma_scale).clamp_min(1.0)
        sy = ((b[:, 3] - b[:, 1]) * sigma_scale).clamp_min(1.0)
        gx = ((xs[None, :] - cx[:, None]) ** 2) / (2 * sx[:, None] ** 2)  # M, W
        gy = ((ys[None, :] - cy[:, None]) ** 2) / (2 * sy[:, None] ** 2)  # M, H
        g = torch.exp(-(gy[:, :, None] + gx[:, None, :]))  # M, H, W
        out[n, 0] = g.max(dim=0).values
    return out


def masked_feature_loss(adapted_student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``sum M (S - T)^2 / (C * sum M)``; 0 (still in the graph) when the mask is empty."""
    sq = (adapted_student.float() - teacher.detach().float()).pow(2) * mask.float()
    mass = mask.sum() * adapted_student.shape[1]
    if float(mass) <= 0.0:
        return zero_from(sq)
    return sq.sum() / mass


def soft_kl_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per row ``T^2 KL(softmax(Z_T/T) || softmax(Z_S/T))`` -> ``[R]``."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1) * temperature**2


@torch.no_grad()
def cls_gate(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, mode: str) -> Tensor:
    """Bool ``[R]``: RoIs where the teacher's classification is the more reasonable one."""
    r = torch.arange(labels.shape[0], device=labels.device)
    if mode == "none":
        return torch.ones_like(labels, dtype=torch.bool)
    if mode == "teacher_correct":
        return teacher_logits.argmax(dim=-1) == labels
    pt = torch.softmax(teacher_logits.float(), dim=-1)[r, labels]
    ps = torch.softmax(student_logits.detach().float(), dim=-1)[r, labels]
    return pt > ps


@torch.no_grad()
def box_gate(
    teacher_deltas: Tensor,
    proposals: Tensor,
    matched_gt: Tensor,
    weights: Sequence[float] = ROI_BOX_CODER_WEIGHTS,
) -> Tensor:
    """Bool ``[P]``: the teacher's refined box overlaps the GT more than the proposal does."""
    refined = decode_deltas(teacher_deltas.to(proposals.dtype), proposals, weights)
    return paired_iou(refined, matched_gt) > paired_iou(proposals, matched_gt)


class TARFeatureLoss(FeatureTerm):
    """TAR backbone-feature transfer inside Gaussian object regions (see module docstring)."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "tar_feature",
        levels: Sequence[str] | None = None,
        w_feat: float = TAR_DEFAULTS["w_feat"],
        sigma_scale: float = TAR_DEFAULTS["sigma_scale"],
        strides: Mapping[str, int] | None = None,
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, on_size_mismatch, adapter_init)
        self.w_feat = check_number(entry, "w_feat", w_feat, low=0)
        self.sigma_scale = check_number(entry, "sigma_scale", sigma_scale, low=0, low_open=True)
        self.strides = check_level_dict(entry, "strides", strides, int)
        for lvl in self.levels:
            try:
                level_stride(lvl, self.strides)
            except ConfigError as exc:
                raise ConfigError(f"distillation entry {entry!r}: {exc}") from None
        self.adapters = self.conv_adapters()

    def forward(self, ctx: DistillContext) -> Tensor:
        boxes = ctx.gt_boxes(self.entry)
        total = None
        for lvl in self.levels:
            raw_s, _ = ctx.feature_pair(lvl, self.entry)
            s, t = self.pair(ctx, lvl)
            if len(boxes) != s.shape[0]:
                raise DataError(
                    f"distillation entry {self.entry!r}: gt has {len(boxes)} images, the features {s.shape[0]}"
                )
            stride = level_stride(lvl, self.strides)
            hs, ws = raw_s.shape[-2:]
            ht, wt = t.shape[-2:]
            mask = gaussian_object_mask(
                boxes, (ht, wt), (stride * hs / ht, stride * ws / wt), self.sigma_scale, device=s.device, dtype=s.dtype
            )
            term = masked_feature_loss(self.adapters[lvl](s), t, mask)
            total = term if total is None else total + term
        return self.w_feat * total


class TARClassificationLoss(DistillTerm):
    """TAR classification-head transfer on shared proposals, gated per RoI."""

    def __init__(
        self,
        *,
        entry: str = "tar_cls",
        w_cls: float = TAR_DEFAULTS["w_cls"],
        temperature: float = TAR_DEFAULTS["temperature"],
        gate: str = "teacher_better",
    ) -> None:
        super().__init__(entry)
        self.w_cls = check_number(entry, "w_cls", w_cls, low=0)
        self.temperature = check_number(entry, "temperature", temperature, low=0, low_open=True)
        self.gate = check_choice(entry, "gate", gate, CLS_GATES)

    def required_student(self) -> set[str]:
        return {"roi_class_logits", "roi_labels", "proposals"}

    def required_teacher(self) -> set[str]:
        return {"roi_scorer"}

    def forward(self, ctx: DistillContext) -> Tensor:
        s = ctx.s("roi_class_logits", self.entry)
        t, _ = ctx.teacher_roi(self.entry)
        if s.shape[0] == 0:
            return zero_from(s)
        labels = ctx.s("roi_labels", self.entry).reshape(-1).long()
        keep = cls_gate(s, t, labels, self.gate)
        rows = soft_kl_rows(s, t, self.temperature) * keep.to(s.dtype)
        return self.w_cls * rows.sum() / s.shape[0]


class TARBoxLoss(DistillTerm):
    """TAR box-head transfer where the teacher's refined box beats the proposal."""

    def __init__(
        self,
        *,
        entry: str = "tar_box",
        w_box: float = TAR_DEFAULTS["w_box"],
        beta: float = TAR_DEFAULTS["beta"],
        box_loss: str = "smooth_l1",
        box_coder_weights: Sequence[float] = ROI_BOX_CODER_WEIGHTS,
    ) -> None:
        super().__init__(entry)
        self.w_box = check_number(entry, "w_box", w_box, low=0)
        self.beta = check_number(entry, "beta", beta, low=0)
        self.box_loss = check_choice(entry, "box_loss", box_loss, BOX_LOSSES)
        if (
            not isinstance(box_coder_weights, Sequence)
            or len(box_coder_weights) != 4
            or not all(isinstance(v, (int, float)) and v > 0 for v in box_coder_weights)
        ):
            raise ConfigError(
                f"distillation entry {entry!r}: box_coder_weights must be 4 positive numbers, got {box_coder_weights!r}"
            )
        self.box_coder_weights = tuple(float(v) for v in box_coder_weights)

    def required_student(self) -> set[str]:
        return {"roi_box_regression", "roi_class_logits", "roi_labels", "proposals"}

    def required_teacher(self) -> set[str]:
        return {"roi_scorer"}

    def forward(self, ctx: DistillContext) -> Tensor:
        s_all = ctx.s("roi_box_regression", self.entry)
        _, t_all = ctx.teacher_roi(self.entry)
        labels = ctx.s("roi_labels", self.entry).reshape(-1).long()
        r = labels.shape[0]
        pos = torch.nonzero(labels > 0).flatten()
        if pos.numel() == 0:
            return zero_from(s_all)
        proposals = torch.cat(list(ctx.s("proposals", self.entry)), 0).reshape(-1, 4)
        matched = ctx.roi_matched_gt(self.entry, self.box_coder_weights)
        s_d = pick_class_deltas(s_all, pos, labels[pos])
        t_d = pick_class_deltas(t_all, pos, labels[pos])
        keep = box_gate(t_d, proposals[pos].to(t_d.dtype), matched[pos].to(t_d.dtype), self.box_coder_weights)
        if self.box_loss == "smooth_l1":
            per = F.smooth_l1_loss(s_d.float(), t_d.detach().float(), beta=self.beta, reduction="none").sum(dim=-1)
        else:
            per = (s_d.float() - t_d.detach().float()).pow(2).sum(dim=-1)
        return self.w_box * (per * keep.to(per.dtype)).sum() / max(1, r)
