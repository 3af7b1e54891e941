"""Baselines: Hinton et al. 2015 knowledge distillation and the FitNets hint (Romero et al. 2015).

Hinton KD, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531)
    Softmax heads (the RoI head's K classes incl. background 0):
        ``L = T^2 * mean_rows KL(P_T || P_S)``, ``P = softmax(Z / T)``.
    The ``T^2`` factor keeps the gradient scale independent of T (Hinton et al., section 2).
    KL equals the soft cross-entropy minus the teacher's entropy: same gradient, but 0 at a match.

    Sigmoid heads (RPN objectness, RetinaNet/FCOS classification, FCOS centerness) have no
    distribution over classes: each column is an independent binary problem. *Project choice*:
    per-class binary KD,
        ``L = T^2 * mean_rows sum_c [ p_T log(p_T / p_S) + (1 - p_T) log((1 - p_T) / (1 - p_S)) ]``,
    ``p = sigmoid(z / T)``. Column 0 of a torchvision one-stage head (the background index, never a
    positive) is skipped (``skip_background_column=True``, project choice).

    Rows (project choice): every RoI of the RoI head; for the RPN and the dense head the anchors
    whose label is not -1 when the training step gives ``rpn_labels`` / ``dense_labels`` (the
    sampled or non-ignored anchors), else every anchor.

    Temperature: Hinton et al. tune T per task and give no default; ``temperature=1.0`` is a project
    choice (the value Chen et al. 2017 found best for detectors).

FitNets hint, "FitNets: Hints for Thin Deep Nets" (arXiv:1412.6550)
    ``L = sum_levels mean((adapt(F_S) - F_T)^2)``, adapt = 1x1 conv (the paper's regressor is a conv
    layer; 1x1 is this project's instance). The paper writes ``1/2 ||.||^2``; *project choice*: a
    per-element mean (so the scale does not grow with resolution), summed over FPN levels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from curriculum.errors import ConfigError

from .common import DistillTerm, FeatureTerm, check_bool, check_choice, check_number, zero_from
from .context import HEADS, DistillContext

HINTON_DEFAULTS = {"temperature": 1.0}


def softmax_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean_rows KL(softmax(Z_T/T) || softmax(Z_S/T))`` for ``[M, K]`` logits; 0 if M = 0."""
    if student_logits.shape[0] == 0:
        return zero_from(student_logits)
    t = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return kl.mean() * (t * t)


def binary_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-class binary KD for sigmoid logits ``[M, K]``: ``T^2 * mean_rows sum_c KL_bin``; 0 if M = 0."""
    if student_logits.shape[0] == 0:
        return zero_from(student_logits)
    t = float(temperature)
    zs = student_logits.float() / t
    zt = teacher_logits.detach().float() / t
    pt = torch.sigmoid(zt)
    log_pt, log_1m_pt = F.logsigmoid(zt), F.logsigmoid(-zt)
    log_ps, log_1m_ps = F.logsigmoid(zs), F.logsigmoid(-zs)
    kl = pt * (log_pt - log_ps) + (1 - pt) * (log_1m_pt - log_1m_ps)
    return kl.sum(dim=-1).mean() * (t * t)


def hint_mse(adapted_student: Tensor, teacher: Tensor) -> Tensor:
    """Per-element mean squared error (FitNets hint, project normalisation)."""
    return (adapted_student.float() - teacher.detach().float()).pow(2).mean()


class HintonKD(DistillTerm):
    """Hinton KD on one head ("roi" softmax, "rpn" / "dense" per-class binary). See module docstring."""

    def __init__(
        self,
        *,
        entry: str = "hinton_kd",
        head: str = "roi",
        temperature: float = HINTON_DEFAULTS["temperature"],
        skip_background_column: bool = True,
        include_ctrness: bool = False,
    ) -> None:
        super().__init__(entry)
        self.head = check_choice(entry, "head", head, HEADS)
        self.temperature = check_number(entry, "temperature", temperature, low=0, low_open=True)
        self.skip_background_column = check_bool(entry, "skip_background_column", skip_background_column)
        self.include_ctrness = check_bool(entry, "include_ctrness", include_ctrness)
        if include_ctrness and head != "dense":
            raise ConfigError(f"distillation entry {entry!r}: include_ctrness applies to head 'dense' only")

    def required_student(self) -> set[str]:
        return {"roi": {"roi_class_logits"}, "rpn": {"objectness"}, "dense": {"cls_logits"}}[self.head] | (
            {"bbox_ctrness"} if self.include_ctrness else set()
        )

    def required_teacher(self) -> set[str]:
        return {"roi": {"roi_class_logits"}, "rpn": {"objectness"}, "dense": {"cls_logits"}}[self.head] | (
            {"bbox_ctrness"} if self.include_ctrness else set()
        )

    def forward(self, ctx: DistillContext) -> Tensor:
        view = ctx.head(self.head, self.entry)
        s, t = view.s_logits, view.t_logits
        if view.kind == "softmax":
            return softmax_kd(s, t, self.temperature)
        if view.labels is not None:
            keep = view.labels >= 0
            s, t = s[keep], t[keep]
        if self.head == "dense" and self.skip_background_column and s.shape[-1] > 1:
            s, t = s[:, 1:], t[:, 1:]
        loss = binary_kd(s, t, self.temperature) + zero_from(view.s_logits)
        if self.include_ctrness:
            cs, ct = ctx.ctrness(self.entry)
            if view.labels is not None and view.labels.shape[0] == cs.shape[0]:
                keep = view.labels >= 0
                cs, ct = cs[keep], ct[keep]
            loss = loss + binary_kd(cs, ct, self.temperature)
        return loss


class FitNetHint(FeatureTerm):
    """FitNets hint through a 1x1 adapter per level: ``sum_l mean((adapt(F_S) - F_T)^2)``."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "fitnet",
        levels: Sequence[str] | None = None,
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, on_size_mismatch, adapter_init)
        self.adapters = self.conv_adapters()

    def forward(self, ctx: DistillContext) -> Tensor:
        total = None
        for lvl in self.levels:
            s, t = self.pair(ctx, lvl)
            term = hint_mse(self.adapters[lvl](s), t)
            total = term if total is None else total + term
        return total
