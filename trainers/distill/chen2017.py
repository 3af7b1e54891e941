"""Chen et al. 2017, "Learning Efficient Object Detection Models with Knowledge Distillation" (NeurIPS).

Three terms, applied in the paper to the RPN and to the RoI box head ("RCN") of Faster R-CNN:

Class-weighted soft cross-entropy (``ChenClassification``)
    ``L_cls = mu * CE(P_S, y) + (1 - mu) * L_soft``,
    ``L_soft = - mean_rows sum_c w_c * P_T^c * log P_S^c``, ``P = softmax(Z / T)``,
    ``w_0 = 1.5`` (background), ``w_c = 1`` otherwise; T = 1 works best (paper). mu is not given in the
    paper; 0.5 is the usual choice (authors' defaults: ``bg_weight=1.5, temperature=1.0, mu=0.5``).
    The hard term is the detector's own classification loss: by default
    (``hard_from_detector=True``, project choice) the distiller returns ``(1 - mu) * L_soft`` and
    ``detector_loss_scales()`` tells the trainer to multiply the detector's classification loss
    ("loss_classifier" / "loss_objectness" / "classification") by mu, so the detector's sampling and
    normalisation are kept. With ``hard_from_detector=False`` the distiller adds ``mu * CE`` itself
    from ``roi_labels`` / ``rpn_labels`` and asks for the detector's term to be scaled by 0.
    Rows: every RoI; for the RPN the sampled anchors (``rpn_labels >= 0``) when given, else all.

    Sigmoid heads (*project choice*): the RPN's single objectness logit is the two-class softmax
    ``[0, z]`` in disguise, so its soft CE is ``-(p_T log p_S + w_0 (1 - p_T) log(1 - p_S))``, exactly the
    paper's form. A one-stage sigmoid head (RetinaNet, FCOS) gets the same binary form per class
    (``w_fg = 1`` on the "is class c" part, ``w_0 = 1.5`` on the "not class c" part, which plays the
    background's role), summed over classes 1..K-1 (column 0 unused, ``skip_background_column``),
    averaged over the non-ignored anchors (``dense_labels >= 0``).

Teacher-bounded regression (``ChenBoundedRegression``)
    ``L_reg = smoothL1(R_S, y) + nu * L_b``, per positive sample
    ``L_b = ||R_S - y||^2`` if ``||R_S - y||^2 + m > ||R_T - y||^2`` else 0.
    The teacher only gates; the gradient pulls towards the ground truth. Authors' defaults
    ``nu=0.5``; the margin m is not given (``margin=0.0``). The smooth-L1 part is the detector's own
    box loss; the distiller returns ``nu * L_b``. Normalisation (*project choice*, as torchvision
    normalises the detector's own box loss): sum over positives divided by the sampled rows for the
    RoI head and the RPN ("samples"), by the positives for a dense head ("positives");
    ``normalizer='auto'`` picks that, or force either. No positives -> 0.
    RoI head: deltas of the matched GT class (class-specific ``[R, 4K]``); RPN and dense heads:
    deltas w.r.t. the same anchors (student and teacher must share the anchor configuration).

Hint with adaptation layer (``ChenHint``)
    ``L_hint = ||adapt(F_S) - F_T||^2`` (an L1 variant exists, ``norm='l1'``), adapt = 1x1 conv, useful
    even when channels match; total ``L = L_RPN + L_RCN + gamma * L_hint`` with ``gamma=0.5``.
    *Project choice*: the hint is applied to every configured FPN level (the paper used one
    intermediate layer) and reduced by a per-element mean (``reduction='mean'``; ``'sum_per_image'``
    sums and divides by the batch size), summed over levels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from curriculum.errors import ConfigError

from .common import DistillTerm, FeatureTerm, check_bool, check_choice, check_number, zero_from
from .context import DETECTOR_CLS_LOSS, HEADS, DistillContext

CHEN_DEFAULTS = {
    "bg_weight": 1.5,
    "temperature": 1.0,
    "mu": 0.5,
    "nu": 0.5,
    "margin": 0.0,
    "gamma": 0.5,
}
NORMALIZERS = ("auto", "samples", "positives")
HINT_NORMS = ("l2", "l1")
HINT_REDUCTIONS = ("mean", "sum_per_image")


def class_weights(num_classes: int, bg_weight: float = 1.5, *, like: Tensor | None = None) -> Tensor:
    """``w_0 = bg_weight``, ``w_c = 1`` for c >= 1."""
    w = torch.ones(num_classes, dtype=like.dtype if like is not None else torch.float32)
    w[0] = bg_weight
    return w.to(like.device) if like is not None else w


def weighted_soft_ce(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float = 1.0
) -> Tensor:
    """``- mean_rows sum_c w_c softmax(Z_T/T)_c log softmax(Z_S/T)_c`` for ``[M, K]``; 0 if M = 0."""
    if student_logits.shape[0] == 0:
        return zero_from(student_logits)
    pt = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(weights.float() * pt * log_ps).sum(dim=-1).mean()


def binary_weighted_soft_ce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    bg_weight: float = 1.5,
    fg_weight: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """``- mean_rows sum_c [fg_w p_T log p_S + bg_w (1 - p_T) log(1 - p_S)]``, ``p = sigmoid(z/T)``."""
    if student_logits.shape[0] == 0:
        return zero_from(student_logits)
    zs = student_logits.float() / temperature
    pt = torch.sigmoid(teacher_logits.detach().float() / temperature)
    per = fg_weight * pt * F.logsigmoid(zs) + bg_weight * (1 - pt) * F.logsigmoid(-zs)
    return -per.sum(dim=-1).mean()


def bounded_regression(
    student_reg: Tensor, teacher_reg: Tensor, targets: Tensor, margin: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Per positive sample ``L_b`` and the gate (bool ``[P]``).

    ``d_S = ||R_S - y||^2``, ``d_T = ||R_T - y||^2`` (sum over the 4 coordinates);
    ``L_b = d_S`` where ``d_S + m > d_T`` else 0. The gate is a constant.
    """
    y = targets.detach().float()
    d_s = (student_reg.float() - y).pow(2).sum(dim=-1)
    d_t = (teacher_reg.detach().float() - y).pow(2).sum(dim=-1)
    gate = (d_s.detach() + margin > d_t).detach()
    return d_s * gate.to(d_s.dtype), gate


def hint_distance(adapted_student: Tensor, teacher: Tensor, norm: str = "l2", reduction: str = "mean") -> Tensor:
    diff = adapted_student.float() - teacher.detach().float()
    per = diff.pow(2) if norm == "l2" else diff.abs()
    if reduction == "mean":
        return per.mean()
    return per.sum() / max(1, adapted_student.shape[0])


class ChenClassification(DistillTerm):
    """Chen et al. class-weighted soft cross-entropy on one head (see module docstring)."""

    def __init__(
        self,
        *,
        entry: str = "chen_cls",
        head: str = "roi",
        bg_weight: float = CHEN_DEFAULTS["bg_weight"],
        temperature: float = CHEN_DEFAULTS["temperature"],
        mu: float = CHEN_DEFAULTS["mu"],
        hard_from_detector: bool = True,
        skip_background_column: bool = True,
        detector_loss_name: str | None = None,
    ) -> None:
        super().__init__(entry)
        self.head = check_choice(entry, "head", head, HEADS)
        self.bg_weight = check_number(entry, "bg_weight", bg_weight, low=0)
        self.temperature = check_number(entry, "temperature", temperature, low=0, low_open=True)
        self.mu = check_number(entry, "mu", mu, low=0, high=1)
        self.hard_from_detector = check_bool(entry, "hard_from_detector", hard_from_detector)
        self.skip_background_column = check_bool(entry, "skip_background_column", skip_background_column)
        if not hard_from_detector and head == "dense":
            raise ConfigError(
                f"distillation entry {entry!r}: hard_from_detector=false is supported for heads 'roi' and "
                f"'rpn' only; a dense head's hard loss is its focal loss, keep hard_from_detector=true"
            )
        if detector_loss_name is not None and not isinstance(detector_loss_name, str):
            raise ConfigError(f"distillation entry {entry!r}: detector_loss_name must be a string")
        self.detector_loss_name = detector_loss_name or DETECTOR_CLS_LOSS[self.head]

    def required_student(self) -> set[str]:
        base = {"roi": {"roi_class_logits"}, "rpn": {"objectness"}, "dense": {"cls_logits"}}[self.head]
        if not self.hard_from_detector:
            base = base | {"roi": {"roi_labels"}, "rpn": {"rpn_labels"}, "dense": set()}[self.head]
        return base

    def required_teacher(self) -> set[str]:
        return {"roi": {"roi_class_logits"}, "rpn": {"objectness"}, "dense": {"cls_logits"}}[self.head]

    def detector_loss_scales(self) -> dict[str, float]:
        return {self.detector_loss_name: self.mu if self.hard_from_detector else 0.0}

    def forward(self, ctx: DistillContext) -> Tensor:
        view = ctx.head(self.head, self.entry)
        s, t, labels = view.s_logits, view.t_logits, view.labels
        if view.kind == "softmax":
            soft = weighted_soft_ce(s, t, class_weights(s.shape[-1], self.bg_weight, like=s), self.temperature)
        else:
            if labels is not None:
                keep = labels >= 0
                s, t = s[keep], t[keep]
            if self.head == "dense" and self.skip_background_column and s.shape[-1] > 1:
                s, t = s[:, 1:], t[:, 1:]
            soft = binary_weighted_soft_ce(s, t, self.bg_weight, 1.0, self.temperature)
            soft = soft + zero_from(view.s_logits)
        loss = (1.0 - self.mu) * soft
        if not self.hard_from_detector:
            if labels is None:
                key = "roi_labels" if self.head == "roi" else "rpn_labels"
                ctx.s(key, self.entry)  # raises ConfigError naming the key
            loss = loss + self.mu * self._hard(view.s_logits, labels)
        return loss

    def _hard(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.head == "roi":
            if logits.shape[0] == 0:
                return zero_from(logits)
            return F.cross_entropy(logits.float(), labels.long())
        keep = labels >= 0
        if not bool(keep.any()):
            return zero_from(logits)
        return F.binary_cross_entropy_with_logits(logits[keep, 0].float(), labels[keep].float())


class ChenBoundedRegression(DistillTerm):
    """Chen et al. teacher-bounded L2 regression: returns ``nu * L_b`` (see module docstring)."""

    def __init__(
        self,
        *,
        entry: str = "chen_reg",
        head: str = "roi",
        nu: float = CHEN_DEFAULTS["nu"],
        margin: float = CHEN_DEFAULTS["margin"],
        normalizer: str = "auto",
    ) -> None:
        super().__init__(entry)
        self.head = check_choice(entry, "head", head, HEADS)
        self.nu = check_number(entry, "nu", nu, low=0)
        self.margin = check_number(entry, "margin", margin)
        self.normalizer = check_choice(entry, "normalizer", normalizer, NORMALIZERS)

    def required_student(self) -> set[str]:
        return {
            "roi": {"roi_box_regression", "roi_labels", "roi_reg_targets", "roi_class_logits"},
            "rpn": {"rpn_deltas", "rpn_labels", "rpn_reg_targets"},
            "dense": {"bbox_regression", "dense_labels", "dense_reg_targets"},
        }[self.head]

    def required_teacher(self) -> set[str]:
        return {"roi": {"roi_box_regression"}, "rpn": {"rpn_deltas"}, "dense": {"bbox_regression"}}[self.head]

    def forward(self, ctx: DistillContext) -> Tensor:
        view = ctx.regression(self.head, self.entry)
        per, _ = bounded_regression(view.s_reg, view.t_reg, view.targets, self.margin)
        mode = self.normalizer
        if mode == "auto":
            mode = "positives" if self.head == "dense" else "samples"
        denom = view.num_samples if mode == "samples" else per.shape[0]
        return self.nu * per.sum() / max(1, denom)


class ChenHint(FeatureTerm):
    """Chen et al. hint: ``gamma * sum_l dist(adapt(F_S), F_T)`` through 1x1 adapters."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "chen_hint",
        levels: Sequence[str] | None = None,
        gamma: float = CHEN_DEFAULTS["gamma"],
        norm: str = "l2",
        reduction: str = "mean",
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, on_size_mismatch, adapter_init)
        self.gamma = check_number(entry, "gamma", gamma, low=0)
        self.norm = check_choice(entry, "norm", norm, HINT_NORMS)
        self.reduction = check_choice(entry, "reduction", reduction, HINT_REDUCTIONS)
        self.adapters = self.conv_adapters()

    def forward(self, ctx: DistillContext) -> Tensor:
        total = None
        for lvl in self.levels:
            s, t = self.pair(ctx, lvl)
            term = hint_distance(self.adapters[lvl](s), t, self.norm, self.reduction)
            total = term if total is None else total + term
        return self.gamma * total
