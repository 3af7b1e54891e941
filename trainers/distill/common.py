"""Pieces shared by the distillation losses: option checks, adapters, resizing, box maths.

Everything here is pure torch on tensors. Teacher tensors reaching these helpers are constants
(``TeacherTargets`` detaches them); nothing here creates a path for gradients into a teacher.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curriculum.errors import ConfigError, DataError, ModelError

SIZE_MISMATCH_MODES = ("resize", "error")
ADAPTER_INITS = ("default", "identity")

# torchvision's Faster R-CNN box coder weights for the RoI head; the RPN uses (1, 1, 1, 1).
ROI_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


# --------------------------------------------------------------------------------------------
# Option checks: every bad value names the entry, the option and what is allowed.
# --------------------------------------------------------------------------------------------


def check_choice(entry: str, option: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``; otherwise raise ConfigError naming both."""
    if value not in allowed:
        raise ConfigError(
            f"distillation entry {entry!r}: option {option!r} = {value!r} is not allowed; "
            f"use one of {list(allowed)}"
        )
    return value


def check_number(
    entry: str,
    option: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as float after checking type and range; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"distillation entry {entry!r}: option {option!r} must be a finite number, got {value!r}"
        )
    v = float(value)
    bad = (
        (low is not None and (v <= low if low_open else v < low))
        or (high is not None and (v >= high if high_open else v > high))
    )
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(
            f"distillation entry {entry!r}: option {option!r} = {value!r} is out of range; "
            f"allowed range {rng}"
        )
    return v


def check_bool(entry: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"distillation entry {entry!r}: option {option!r} must be true or false, got {value!r}")
    return value


def check_level_dict(entry: str, option: str, value: Any, kind: type) -> dict[str, Any]:
    """A per-level mapping such as ``{"p2": 8}``; ``None`` means empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ConfigError(
            f"distillation entry {entry!r}: option {option!r} must map level names to "
            f"{kind.__name__} values, got {value!r}"
        )
    return dict(value)


def resolve_levels(
    entry: str,
    levels: Sequence[str] | None,
    student_channels: Mapping[str, int],
    teacher_channels: Mapping[str, int],
) -> list[str]:
    """Levels a feature loss works on: the configured ones, or every level both sides have."""
    if levels is None:
        chosen = [lvl for lvl in teacher_channels if lvl in student_channels]
        if not chosen:
            raise ConfigError(
                f"distillation entry {entry!r}: student levels {list(student_channels)} and teacher "
                f"levels {list(teacher_channels)} have no name in common; give 'levels' explicitly"
            )
        return chosen
    if isinstance(levels, str) or not isinstance(levels, Sequence) or not levels:
        raise ConfigError(
            f"distillation entry {entry!r}: option 'levels' must be a non-empty list of level names, "
            f"got {levels!r}"
        )
    for lvl in levels:
        if lvl not in student_channels or lvl not in teacher_channels:
            raise ConfigError(
                f"distillation entry {entry!r}: level {lvl!r} is not in both the student levels "
                f"{list(student_channels)} and the teacher levels {list(teacher_channels)}"
            )
    if len(set(levels)) != len(levels):
        raise ConfigError(f"distillation entry {entry!r}: option 'levels' repeats a level: {list(levels)}")
    return list(levels)


def check_channels(entry: str, channels: Mapping[str, int], side: str) -> dict[str, int]:
    if not isinstance(channels, Mapping) or not channels:
        raise ConfigError(f"distillation entry {entry!r}: {side} channels must be a non-empty dict level -> int")
    for lvl, c in channels.items():
        if not isinstance(c, int) or isinstance(c, bool) or c <= 0:
            raise ConfigError(
                f"distillation entry {entry!r}: {side} channels for level {lvl!r} must be a positive int, got {c!r}"
            )
    return dict(channels)


def level_stride(level: str, strides: Mapping[str, int] | None = None) -> int:
    """Stride of an FPN level in input pixels: ``strides[level]`` or ``2**k`` for a name ``p<k>`` (``p<k>_<j>``: the
    j-th further level at that stride, as torchvision's MobileNetV3 FPN has)."""
    if strides and level in strides:
        return int(strides[level])
    m = re.fullmatch(r"[pP](\d+)(?:_\d+)?", level)
    if m is None:
        raise ConfigError(
            f"cannot tell the stride of FPN level {level!r} from its name; give the option "
            f"'strides' (level -> stride in pixels)"
        )
    return 2 ** int(m.group(1))


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


# Below this many multiply-adds a CPU convolution is dominated by oneDNN's fixed cost per call, and PyTorch's
# own im2col kernel is faster (bench/step_cost.py: arm (e) runs the loss without it, beside (b) with it).
SMALL_CONV_MACS = 1 << 22


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) that runs a small CPU convolution with PyTorch's im2col
    kernel (``thnn_conv2d``, forward and backward) instead of oneDNN; the result is the same convolution.

    Distillation connectors run on every FPN level, and on the coarse ones (P5..P7 of a small input, a few
    cells) with few channels (principal components) each call is tiny: there oneDNN's fixed cost per call,
    not the arithmetic, is the time. Larger calls, other devices and tracing go through ``nn.Conv2d``."""

    max_macs: int = SMALL_CONV_MACS

    @classmethod
    @contextlib.contextmanager
    def bound(cls, max_macs: int) -> Iterator[None]:
        """Within the block, calls of at least `max_macs` take ``nn.Conv2d``'s path (0: every call; the benchmarks
        compare with it)."""
        saved, cls.max_macs = cls.max_macs, max_macs
        try:
            yield
        finally:
            cls.max_macs = saved

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if input.device.type == "cpu" and input.dim() == 4 and self._plain() and not torch.jit.is_tracing() \
                and input.dtype in (torch.float32, torch.float64) and self._macs(input) < self.max_macs:
            return torch._C._nn.thnn_conv2d(input, weight, self.kernel_size, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)

    def _plain(self) -> bool:
        return self.groups == 1 and self.padding_mode == "zeros" and self.dilation == (1, 1) \
            and not isinstance(self.padding, str)

    def _macs(self, input: Tensor) -> int:
        n, _, h, w = input.shape
        kh, kw = self.kernel_size
        out_h = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return n * out_h * out_w * self.out_channels * self.in_channels * kh * kw


def conv1x1(in_channels: int, out_channels: int, init: str = "default") -> nn.Conv2d:
    """The 1x1 adapter of Chen et al., FitNets, Zhang & Ma; ``init='identity'`` needs equal channels."""
    conv = SmallMapConv2d(in_channels, out_channels, kernel_size=1)
    if init == "identity":
        set_identity_(conv)
    return conv


@torch.no_grad()
def set_identity_(module: nn.Module) -> nn.Module:
    """Make a square adapter the identity map (centre tap 1, bias 0).

    Works on ``nn.Conv2d`` of any odd kernel with ``in == out`` channels and on square ``nn.Linear``.
    Used by the ``adapter_init='identity'`` option and by tests.
    """
    if isinstance(module, nn.Conv2d):
        if module.in_channels != module.out_channels or module.groups != 1:
            raise ModelError(
                f"cannot make a {module.in_channels}->{module.out_channels} channel conv an identity; "
                f"use adapter_init='default' when student and teacher channels differ"
            )
        kh, kw = module.kernel_size
        module.weight.zero_()
        idx = torch.arange(module.in_channels, device=module.weight.device)
        module.weight[idx, idx, kh // 2, kw // 2] = 1.0
    elif isinstance(module, nn.Linear):
        if module.in_features != module.out_features:
            raise ModelError(
                f"cannot make a {module.in_features}->{module.out_features} linear layer an identity"
            )
        module.weight.copy_(torch.eye(module.in_features, device=module.weight.device))
    else:
        raise ModelError(f"set_identity_ does not know {type(module).__name__}")
    if module.bias is not None:
        module.bias.zero_()
    return module


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


def match_size(student: Tensor, teacher: Tensor, mode: str, *, what: str) -> Tensor:
    """Bring a student map to the teacher's H x W.

    ``mode='resize'`` (default everywhere): bilinear interpolation, ``align_corners=False``; this is
    differentiable, so gradients still reach the student. ``mode='error'``: raise DataError. Batch
    sizes must agree in either mode.
    """
    if student.shape[0] != teacher.shape[0]:
        raise DataError(
            f"{what}: the student batch has {student.shape[0]} images but the teacher targets have "
            f"{teacher.shape[0]}; the targets must come from the same batch, in the same order"
        )
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    if mode == "error":
        raise DataError(
            f"{what}: the student map is {tuple(student.shape[-2:])} (H, W) but the teacher's is "
            f"{tuple(teacher.shape[-2:])}; feed both the same input size or set on_size_mismatch='resize'"
        )
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at 0, so a loss that is exactly 0 still backpropagates."""
    positive = x > 0
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box of ``a [A, 4]`` with every box of ``b [B, 4]`` (xyxy) -> ``[A, B]``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` -> ``[R]``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def decode_deltas(
    deltas: Tensor, boxes: Tensor, weights: Sequence[float] = ROI_BOX_CODER_WEIGHTS
) -> Tensor:
    """torchvision ``BoxCoder.decode_single``: deltas ``[R, 4]`` w.r.t. ``boxes [R, 4]`` -> xyxy."""
    wx, wy, ww, wh = weights
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx = deltas[:, 0] / wx
    dy = deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[:, 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    px = dx * widths + ctr_x
    py = dy * heights + ctr_y
    pw = torch.exp(dw) * widths
    ph = torch.exp(dh) * heights
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=1)


def zero_from(*tensors: Tensor) -> Tensor:
    """A scalar 0 still attached to the graph of the given (student) tensors.

    Keeps ``sum(losses).backward()`` valid and every adapter in the graph when a term has nothing to
    work on (no positives, no objects).
    """
    total = None
    for t in tensors:
        if t is None:
            continue
        z = t.sum() * 0.0
        total = z if total is None else total + z
    if total is None:
        return torch.zeros(())
    return torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------------------------
# Base classes of the loss terms
# --------------------------------------------------------------------------------------------


class DistillTerm(nn.Module):
    """One configured loss term. ``forward(ctx)`` returns a scalar (before the entry's weight).

    Subclasses list the student outputs and teacher fields they read, so a trainer or a cache can
    ask the distiller what to produce.
    """

    def __init__(self, entry: str) -> None:
        super().__init__()
        self.entry = entry

    def required_student(self) -> set[str]:
        return set()

    def required_teacher(self) -> set[str]:
        return set()

    def detector_loss_scales(self) -> dict[str, float]:
        """Factors the trainer applies to the detector's own loss terms (e.g. Chen's mu)."""
        return {}

    def stochastic(self) -> bool:
        return False


class FeatureTerm(DistillTerm):
    """A loss on FPN features: levels, channel bookkeeping and the size policy.

    ``on_size_mismatch``: "resize" (default) bilinearly resizes the student map to the teacher's
    H x W (``align_corners=False``, differentiable); "error" raises DataError instead.
    """

    def __init__(
        self,
        entry: str,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        levels: Sequence[str] | None,
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry)
        s_ch = check_channels(entry, student_channels, "student")
        t_ch = check_channels(entry, teacher_channels, "teacher")
        self.levels = resolve_levels(entry, levels, s_ch, t_ch)
        self.student_channels = {lvl: s_ch[lvl] for lvl in self.levels}
        self.teacher_channels = {lvl: t_ch[lvl] for lvl in self.levels}
        self.on_size_mismatch = check_choice(entry, "on_size_mismatch", on_size_mismatch, SIZE_MISMATCH_MODES)
        self.adapter_init = check_choice(entry, "adapter_init", adapter_init, ADAPTER_INITS)
        if adapter_init == "identity":
            for lvl in self.levels:
                if self.student_channels[lvl] != self.teacher_channels[lvl]:
                    raise ConfigError(
                        f"distillation entry {entry!r}: adapter_init='identity' needs equal student and "
                        f"teacher channels, level {lvl!r} has {self.student_channels[lvl]} -> "
                        f"{self.teacher_channels[lvl]}; use adapter_init='default'"
                    )

    def conv_adapters(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                lvl: conv1x1(self.student_channels[lvl], self.teacher_channels[lvl], self.adapter_init)
                for lvl in self.levels
            }
        )

    def required_student(self) -> set[str]:
        return {"features"}

    def required_teacher(self) -> set[str]:
        return {"features"}

    def pair(self, ctx: Any, level: str) -> tuple[Tensor, Tensor]:
        """(student map resized to the teacher's H x W, teacher map), channels checked."""
        s, t = ctx.feature_pair(level, self.entry)
        if s.dim() != 4 or t.dim() != 4:
            raise DataError(
                f"distillation entry {self.entry!r}: features at level {level!r} must be [N, C, H, W], got "
                f"student {tuple(s.shape)} and teacher {tuple(t.shape)}"
            )
        if s.shape[1] != self.student_channels[level] or t.shape[1] != self.teacher_channels[level]:
            raise ModelError(
                f"distillation entry {self.entry!r}: level {level!r} has {s.shape[1]} student / {t.shape[1]} "
                f"teacher channels but the distiller was built for {self.student_channels[level]} / "
                f"{self.teacher_channels[level]}; rebuild it with the detectors' channel counts"
            )
        s = match_size(s, t, self.on_size_mismatch, what=f"distillation entry {self.entry!r}, level {level!r}")
        return s, t.to(s.dtype)
