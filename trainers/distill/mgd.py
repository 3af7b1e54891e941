"""Masked generative distillation (MGD; Yang et al. 2022), the base mechanism of Cao et al. 2023,
"Learning Lightweight Object Detectors via Multi-Teacher Progressive Distillation" (ICML 2023).

Per FPN level:
    ``L = alpha * (1 / N) * sum_{n,c,h,w} (F_T - G(align(F_S) * M))^2``
N the batch size, ``M [N, 1, H, W]`` a random spatial mask that drops each position with
probability ``lambda_mask`` (the authors' code: ``M = 0 where rand > 1 - lambda`` else 1), ``G`` the
generation block conv3x3 -> ReLU -> conv3x3 (teacher channels), ``align`` a 1x1 conv present only
when student and teacher channels differ. Summed over levels.

Authors' defaults (``preset``): "retinanet" alpha=2e-5, lambda=0.65; "mask_rcnn" alpha=5e-7,
lambda=0.45. Default preset: "retinanet" (project choice). The authors also clip gradients at 35
(trainer's business). The loss is a sum over C x H x W (scale grows with resolution), as in the
authors' code.

``forward`` accepts a ``torch.Generator`` (through the distiller) so masks are reproducible in tests
and across restarts; without one the global RNG is used. When the student map is resized to the
teacher's size (``on_size_mismatch='resize'``), the mask is drawn at the teacher's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .common import FeatureTerm, SmallMapConv2d, check_choice, check_number
from .context import DistillContext

PRESETS = {
    "retinanet": {"alpha": 2e-5, "lambda_mask": 0.65},
    "mask_rcnn": {"alpha": 5e-7, "lambda_mask": 0.45},
}
DEFAULT_PRESET = "retinanet"


def random_spatial_mask(
    n: int,
    h: int,
    w: int,
    drop_prob: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[N, 1, H, W]`` of 0/1: 0 where ``rand > 1 - drop_prob`` (authors' rule), drawn from ``generator``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand((n, 1, h, w), generator=generator, device=gen_device)
    keep = (u <= 1.0 - drop_prob).to(dtype)
    return keep.to(device) if device is not None else keep


class MGDGenerator(nn.Sequential):
    """conv3x3 -> ReLU -> conv3x3 (channels -> channels), the authors' generation block."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            SmallMapConv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            SmallMapConv2d(channels, channels, kernel_size=3, padding=1),
        )


def mgd_level_loss(student_aligned: Tensor, teacher: Tensor, mask: Tensor, generator_block: nn.Module) -> Tensor:
    """``sum (F_T - G(S * M))^2 / N`` for one level (alpha applied by the caller)."""
    new = generator_block(student_aligned * mask)
    return (new.float() - teacher.detach().float()).pow(2).sum() / student_aligned.shape[0]


class MGDLoss(FeatureTerm):
    """MGD on FPN levels: ``alpha * sum_l sum (F_T - G(align(F_S) * M))^2 / N``."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "mgd",
        levels: Sequence[str] | None = None,
        preset: str = DEFAULT_PRESET,
        alpha: float | None = None,
        lambda_mask: float | None = None,
        on_size_mismatch: str = "resize",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, on_size_mismatch, "default")
        check_choice(entry, "preset", preset, tuple(PRESETS))
        d = PRESETS[preset]
        self.preset = preset
        self.alpha = check_number(entry, "alpha", d["alpha"] if alpha is None else alpha, low=0)
        self.lambda_mask = check_number(
            entry, "lambda_mask", d["lambda_mask"] if lambda_mask is None else lambda_mask, low=0, high=1, high_open=True
        )
        self.align = nn.ModuleDict(
            {
                lvl: SmallMapConv2d(self.student_channels[lvl], self.teacher_channels[lvl], kernel_size=1)
                for lvl in self.levels
                if self.student_channels[lvl] != self.teacher_channels[lvl]
            }
        )
        self.generation = nn.ModuleDict({lvl: MGDGenerator(self.teacher_channels[lvl]) for lvl in self.levels})

    def stochastic(self) -> bool:
        return self.lambda_mask > 0

    def forward(self, ctx: DistillContext) -> Tensor:
        total = None
        for lvl in self.levels:
            s, t = self.pair(ctx, lvl)
            if lvl in self.align:
                s = self.align[lvl](s)
            n, _, h, w = t.shape
            mask = random_spatial_mask(
                n, h, w, self.lambda_mask, generator=ctx.generator, device=s.device, dtype=s.dtype
            )
            term = mgd_level_loss(s, t, mask, self.generation[lvl])
            total = term if total is None else total + term
        return self.alpha * total
