"""The mask term of Mask R-CNN distillation (a project choice; issue 16).

On the student's positive RoIs (those its own mask loss trains on), the teacher's mask head scores the same boxes
(proposal sharing, as TAR does for the box head: on a cache, the teacher's mask head runs on the cached FPN features
in the student's worker, so no teacher backbone runs). For each RoI, the channel of its matched ground-truth class
is compared pixel by pixel, as the Mask R-CNN loss compares it with the ground truth:

    L = T^2 * mean over RoIs and pixels of KL( Bernoulli(sigmoid(z_t / T)) || Bernoulli(sigmoid(z_s / T)) )

the binary Hinton KD of the baselines (`binary_kd`) applied to the M x M mask logits. T = 1 by default. It is zero
when the student's logits equal the teacher's, its gradient reaches the student's mask head only, and with no
positive RoI in the batch it is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .baselines import binary_kd
from .common import DistillTerm, check_number, zero_from
from .context import DistillContext


class MaskKD(DistillTerm):
    """Per-pixel binary KD of the mask logits on the student's positive RoIs (see the module docstring)."""

    def __init__(self, *, entry: str = "mask_kd", temperature: float = 1.0) -> None:
        super().__init__(entry)
        self.temperature = check_number(entry, "temperature", temperature, low=0, low_open=True)

    def required_student(self) -> set[str]:
        return {"mask_logits", "mask_labels", "mask_boxes"}

    def required_teacher(self) -> set[str]:
        return {"mask_scorer"}

    def forward(self, ctx: DistillContext) -> Tensor:
        s = ctx.s("mask_logits", self.entry)
        labels = torch.cat(list(ctx.s("mask_labels", self.entry))).long()
        if s.shape[0] == 0:
            return zero_from(s)
        t = ctx.targets.score_masks(list(ctx.s("mask_boxes", self.entry))).to(s.device)
        rows = torch.arange(s.shape[0], device=s.device)
        s_cls, t_cls = s[rows, labels], t[rows, labels]  # [P, M, M]: the matched class's mask
        return binary_kd(s_cls.reshape(-1, 1), t_cls.reshape(-1, 1), self.temperature)
