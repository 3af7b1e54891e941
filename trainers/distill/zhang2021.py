"""Zhang & Ma 2021, "Improve Object Detection with Feature-based Knowledge Distillation: Towards
Accurate and Efficient Detectors" (ICLR 2021). Applied on every FPN output level l.

Attention (per level, N x C x H x W features F)
    spatial ``G_S(F) = mean_C |F|`` (N x H x W), channel ``G_C(F) = mean_HW |F|`` (N x C);
    masks ``M_S = H*W * softmax_HW(G_S / tau)``, ``M_C = C * softmax_C(G_C / tau)``.
    ``mask_mode='code'`` (default, the authors' released code): masks computed from T and from S
    separately and averaged, ``M = (M(T) + M(S)) / 2``; ``'paper'``: the paper's
    ``softmax((G(T) + G(S)) / tau)``; ``'teacher'``: teacher only (project option). Masks are
    detached. *Project choice*: when student and teacher channels differ (the authors' code has equal
    channels), the student's masks are computed from ``adapt(F_S)`` instead of ``F_S``.

Attention-guided feature loss (``ZhangFeatureLoss``)
    ``L_f = w_f * sum_l sqrt( sum_{n,c,h,w} (F_T - adapt(F_S))^2 * M_S * M_C )``, adapt = 1x1 conv;
    the two-stage preset has no channel mask (``channel_mask=False``: ``M_C = 1``), as in the code.

Attention loss (``ZhangAttentionLoss``)
    ``L_a = w_a * sum_l ( ||G_C(F_T) - A_c(G_C(F_S))||_2 + ||G_S(F_T) - A_s(G_S(F_S))||_2 )``,
    ``A_c`` = Linear(C_S, C_T), ``A_s`` = Conv2d(1, 1, 3, padding=1): the authors' small learnable
    adapters. Their code pools the signed features here (``mean``, not ``mean |.|``); the paper writes
    ``|F|``. Default ``attention_abs=False`` follows the code; ``True`` follows the paper.

Non-local distillation (``ZhangNonLocalLoss``)
    ``L_n = w_n * sum_l ||adapt(NL_S(F_S)) - NL_T(F_T)||_2``, NL = embedded dot-product non-local block
    (Wang et al. 2018, ``f = theta(x)^T phi(x) / N``; phi and g max-pooled by ``downsample``;
    ``z = BN(W y) + x`` with the BN zero-initialised, so each block starts as the identity). As in
    the authors' code both blocks are trained: the student's block on ``F_S`` and the teacher's
    block on the (detached, constant) ``F_T``; both are parameters of the distiller, never of the
    exported student. Authors' code: ``inter_channels = C/2`` and ``downsample = 2``, except in the
    two-stage code levels p2 / p3 use ``inter_channels=64`` and ``downsample`` 8 / 4 (preset
    ``two_stage``). *Project choice*: the pooling kernel shrinks to fit maps smaller than it, and
    the BN uses its running statistics when a training batch has a single value per channel.

Presets (authors' code defaults)
    ``one_stage`` (RetinaNet): tau=0.1, w_f=4.2e-4, w_a=2.4e-2, w_n=4.2e-4, channel mask on.
    ``two_stage`` (Faster R-CNN): tau=0.5, w_f=7e-5, w_a=4e-3, w_n=7e-5, no channel mask in the
    feature loss. Default preset: ``two_stage`` (project choice); any value can be overridden.

Scale (``normalize``)
    The authors' losses are L2 norms over the whole batch (``torch.dist``), so their value grows
    like sqrt(batch size x H x W): the weights above are tuned for the authors' batch (2 images per
    GPU) and input size (about 800 x 1333). ``normalize=False`` (default) keeps the authors' form;
    ``normalize=True`` (project option) takes the root of the *mean* instead of the sum
    (a weighted RMS, independent of batch size and resolution; the weights then need re-tuning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curriculum.errors import ConfigError

from .common import FeatureTerm, SmallMapConv2d, check_bool, check_choice, check_level_dict, check_number, safe_sqrt, set_identity_
from .context import DistillContext

PRESETS: dict[str, dict[str, Any]] = {
    "one_stage": {
        "tau": 0.1,
        "w_f": 4.2e-4,
        "w_a": 2.4e-2,
        "w_n": 4.2e-4,
        "channel_mask": True,
        "nl_downsample": {},
        "nl_inter_channels": {},
    },
    "two_stage": {
        "tau": 0.5,
        "w_f": 7e-5,
        "w_a": 4e-3,
        "w_n": 7e-5,
        "channel_mask": False,
        "nl_downsample": {"p2": 8, "p3": 4},
        "nl_inter_channels": {"p2": 64, "p3": 64},
    },
}
DEFAULT_PRESET = "two_stage"
MASK_MODES = ("code", "paper", "teacher")
NL_DEFAULT_DOWNSAMPLE = 2


# --------------------------------------------------------------------------------------------
# Attention and masks
# --------------------------------------------------------------------------------------------


def spatial_attention(f: Tensor, absolute: bool = True) -> Tensor:
    """``mean_C |F|`` (or signed mean) -> ``[N, 1, H, W]``."""
    return (f.abs() if absolute else f).mean(dim=1, keepdim=True)


def channel_attention(f: Tensor, absolute: bool = True) -> Tensor:
    """``mean_HW |F|`` (or signed mean) -> ``[N, C]``."""
    return (f.abs() if absolute else f).mean(dim=(2, 3))


def spatial_mask_from(g: Tensor, tau: float) -> Tensor:
    """``H*W * softmax_HW(g / tau)`` for ``g [N, 1, H, W]``."""
    n, _, h, w = g.shape
    return (torch.softmax(g.reshape(n, -1) / tau, dim=1) * (h * w)).reshape(n, 1, h, w)


def channel_mask_from(g: Tensor, tau: float) -> Tensor:
    """``C * softmax_C(g / tau)`` for ``g [N, C]`` -> ``[N, C, 1, 1]``."""
    n, c = g.shape
    return (torch.softmax(g / tau, dim=1) * c).reshape(n, c, 1, 1)


@torch.no_grad()
def attention_masks(teacher: Tensor, student: Tensor, tau: float, mode: str = "code") -> tuple[Tensor, Tensor]:
    """(spatial ``[N, 1, H, W]``, channel ``[N, C, 1, 1]``) masks, detached. ``student`` must have the
    teacher's shape (the caller passes ``adapt(F_S)`` when channels differ)."""
    t, s = teacher.detach().float(), student.detach().float()
    if mode == "teacher":
        ms = spatial_mask_from(spatial_attention(t), tau)
        mc = channel_mask_from(channel_attention(t), tau)
    elif mode == "paper":
        ms = spatial_mask_from(spatial_attention(t) + spatial_attention(s), tau)
        mc = channel_mask_from(channel_attention(t) + channel_attention(s), tau)
    else:  # "code": average of separately normalised masks (authors' code, s_ratio = 1)
        ms = (spatial_mask_from(spatial_attention(t), tau) + spatial_mask_from(spatial_attention(s), tau)) / 2
        mc = (channel_mask_from(channel_attention(t), tau) + channel_mask_from(channel_attention(s), tau)) / 2
    return ms, mc


def _root(x: Tensor, count: int, normalize: bool) -> Tensor:
    """sqrt of a sum (authors) or of the mean over ``count`` elements (``normalize``)."""
    return safe_sqrt(x / count if normalize else x)


# --------------------------------------------------------------------------------------------
# Non-local block
# --------------------------------------------------------------------------------------------


class NonLocalBlock(nn.Module):
    """Embedded dot-product non-local block (Wang et al. 2018) as in Zhang & Ma's code.

    ``y = (theta(x)^T phi(x) / M) g(x)`` with phi, g max-pooled by ``downsample`` (M positions after
    pooling), ``z = BN(W(y)) + x``; BN (or W when ``bn=False``) is zero-initialised: identity at start.
    """

    def __init__(self, channels: int, inter_channels: int | None = None, downsample: int = 2, bn: bool = True):
        super().__init__()
        self.channels = channels
        self.inter_channels = inter_channels or max(1, channels // 2)
        self.downsample = int(downsample)
        self.theta = SmallMapConv2d(channels, self.inter_channels, 1)
        self.phi = SmallMapConv2d(channels, self.inter_channels, 1)
        self.g = SmallMapConv2d(channels, self.inter_channels, 1)
        self.W = SmallMapConv2d(self.inter_channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels) if bn else None
        if self.bn is not None:
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        else:
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).reshape(n, self.inter_channels, -1).transpose(1, 2)  # N, HW, i
        phi, g = self.phi(x), self.g(x)
        k = min(self.downsample, h, w)
        if k > 1:
            phi, g = F.max_pool2d(phi, k), F.max_pool2d(g, k)
        phi = phi.reshape(n, self.inter_channels, -1)  # N, i, M
        g = g.reshape(n, self.inter_channels, -1).transpose(1, 2)  # N, M, i
        f = torch.matmul(theta, phi) / phi.shape[-1]  # N, HW, M
        y = torch.matmul(f, g).transpose(1, 2).reshape(n, self.inter_channels, h, w)
        wy = self.W(y)
        if self.bn is not None:
            single = self.training and n * h * w == 1
            wy = F.batch_norm(
                wy,
                self.bn.running_mean,
                self.bn.running_var,
                self.bn.weight,
                self.bn.bias,
                training=self.training and not single,
                momentum=self.bn.momentum if self.bn.momentum is not None else 0.1,
                eps=self.bn.eps,
            )
        return wy + x


# --------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------


def _preset(entry: str, preset: str) -> dict[str, Any]:
    check_choice(entry, "preset", preset, tuple(PRESETS))
    return PRESETS[preset]


class _ZhangBase(FeatureTerm):
    def __init__(
        self,
        entry: str,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        levels: Sequence[str] | None,
        preset: str,
        normalize: bool,
        on_size_mismatch: str,
        adapter_init: str,
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, on_size_mismatch, adapter_init)
        self.preset = preset
        self.defaults = _preset(entry, preset)
        self.normalize = check_bool(entry, "normalize", normalize)



    def forward(self, ctx: DistillContext) -> Tensor:
        """The method's weight times the sum of `level_loss` over the configured levels."""
        total = sum(self.level_loss(*self.pair(ctx, lvl), lvl) for lvl in self.levels)
        return self.weight * total

class ZhangFeatureLoss(_ZhangBase):
    """Attention-guided feature loss ``w_f * sum_l sqrt(sum (F_T - adapt(F_S))^2 M_S M_C)``."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "zhang_feature",
        levels: Sequence[str] | None = None,
        preset: str = DEFAULT_PRESET,
        tau: float | None = None,
        w_f: float | None = None,
        channel_mask: bool | None = None,
        mask_mode: str = "code",
        normalize: bool = False,
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, preset, normalize, on_size_mismatch, adapter_init)
        d = self.defaults
        self.tau = check_number(entry, "tau", d["tau"] if tau is None else tau, low=0, low_open=True)
        self.w_f = check_number(entry, "w_f", d["w_f"] if w_f is None else w_f, low=0)
        self.channel_mask = check_bool(entry, "channel_mask", d["channel_mask"] if channel_mask is None else channel_mask)
        self.mask_mode = check_choice(entry, "mask_mode", mask_mode, MASK_MODES)
        self.adapters = self.conv_adapters()

    def level_loss(self, s: Tensor, t: Tensor, level: str) -> Tensor:
        adapted = self.adapters[level](s)
        s_for_mask = s if s.shape[1] == t.shape[1] else adapted
        ms, mc = attention_masks(t, s_for_mask, self.tau, self.mask_mode)
        weight = ms * mc if self.channel_mask else ms
        sq = (t.float() - adapted.float()).pow(2) * weight
        return _root(sq.sum(), sq.numel(), self.normalize)

    @property
    def weight(self) -> float:
        return self.w_f


class ZhangAttentionLoss(_ZhangBase):
    """Attention loss ``w_a * sum_l (||G_C(T) - A_c(G_C(S))|| + ||G_S(T) - A_s(G_S(S))||)``."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "zhang_attention",
        levels: Sequence[str] | None = None,
        preset: str = DEFAULT_PRESET,
        w_a: float | None = None,
        attention_abs: bool = False,
        normalize: bool = False,
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, preset, normalize, on_size_mismatch, adapter_init)
        self.w_a = check_number(entry, "w_a", self.defaults["w_a"] if w_a is None else w_a, low=0)
        self.attention_abs = check_bool(entry, "attention_abs", attention_abs)
        self.channel_adapters = nn.ModuleDict(
            {lvl: nn.Linear(self.student_channels[lvl], self.teacher_channels[lvl]) for lvl in self.levels}
        )
        self.spatial_adapters = nn.ModuleDict(
            {lvl: SmallMapConv2d(1, 1, kernel_size=3, padding=1) for lvl in self.levels}
        )
        if adapter_init == "identity":
            for m in list(self.channel_adapters.values()) + list(self.spatial_adapters.values()):
                set_identity_(m)

    def level_loss(self, s: Tensor, t: Tensor, level: str) -> Tensor:
        gc_t = channel_attention(t, self.attention_abs)
        gc_s = self.channel_adapters[level](channel_attention(s, self.attention_abs))
        gs_t = spatial_attention(t, self.attention_abs)
        gs_s = self.spatial_adapters[level](spatial_attention(s, self.attention_abs))
        dc = (gc_t.float() - gc_s.float()).pow(2)
        ds = (gs_t.float() - gs_s.float()).pow(2)
        return _root(dc.sum(), dc.numel(), self.normalize) + _root(ds.sum(), ds.numel(), self.normalize)

    @property
    def weight(self) -> float:
        return self.w_a


class ZhangNonLocalLoss(_ZhangBase):
    """Non-local distillation ``w_n * sum_l ||adapt(NL_S(F_S)) - NL_T(F_T)||``."""

    def __init__(
        self,
        *,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        entry: str = "zhang_nonlocal",
        levels: Sequence[str] | None = None,
        preset: str = DEFAULT_PRESET,
        w_n: float | None = None,
        nl_downsample: Mapping[str, int] | None = None,
        nl_inter_channels: Mapping[str, int] | None = None,
        nl_bn: bool = True,
        normalize: bool = False,
        on_size_mismatch: str = "resize",
        adapter_init: str = "default",
    ) -> None:
        super().__init__(entry, student_channels, teacher_channels, levels, preset, normalize, on_size_mismatch, adapter_init)
        d = self.defaults
        self.w_n = check_number(entry, "w_n", d["w_n"] if w_n is None else w_n, low=0)
        down = check_level_dict(entry, "nl_downsample", d["nl_downsample"] if nl_downsample is None else nl_downsample, int)
        inter = check_level_dict(
            entry, "nl_inter_channels", d["nl_inter_channels"] if nl_inter_channels is None else nl_inter_channels, int
        )
        for name, mapping in (("nl_downsample", down), ("nl_inter_channels", inter)):
            for lvl, v in mapping.items():
                if v < 1:
                    raise ConfigError(f"distillation entry {entry!r}: {name}[{lvl!r}] must be >= 1, got {v}")
        self.nl_bn = check_bool(entry, "nl_bn", nl_bn)

        def block(channels: int, lvl: str) -> NonLocalBlock:
            ic = inter.get(lvl)
            return NonLocalBlock(channels, min(ic, channels) if ic else None, down.get(lvl, NL_DEFAULT_DOWNSAMPLE), self.nl_bn)

        self.student_nl = nn.ModuleDict({lvl: block(self.student_channels[lvl], lvl) for lvl in self.levels})
        self.teacher_nl = nn.ModuleDict({lvl: block(self.teacher_channels[lvl], lvl) for lvl in self.levels})
        self.adapters = self.conv_adapters()

    def level_loss(self, s: Tensor, t: Tensor, level: str) -> Tensor:
        s_rel = self.adapters[level](self.student_nl[level](s))
        t_rel = self.teacher_nl[level](t.detach())
        d = (s_rel.float() - t_rel.float()).pow(2)
        return _root(d.sum(), d.numel(), self.normalize)

    @property
    def weight(self) -> float:
        return self.w_n
