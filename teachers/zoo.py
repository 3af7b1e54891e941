"""The detector zoo: one front door, `build_detector(name, num_classes, **overrides)`.

A detector name is ``<head>_<backbone>``: a torchvision head (``retinanet``, ``fcos``, ``fasterrcnn``, ``maskrcnn``) on a
timm backbone built with ``features_only=True`` and a torchvision FPN. Full-size backbones (ResNet-18/34/50/101,
MobileNetV3, ConvNeXt, Swin T/S/B) sit beside width- and depth-reduced members that train on a 2-core CPU
in minutes at the built-in data set's 128 px: these are the built-in teachers and students.

Every detector is a `Detector` whose `forward` returns a `DetectorOutput` holding what distillation needs
(FPN features per level; dense head outputs per level with their anchors or points; RPN outputs, proposals and
RoI-head outputs) beside the usual losses and detections. It composes torchvision's public sub-modules
(transform, backbone, head, anchor generator, RPN, RoI heads) instead of patching their forward.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import timm
import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_inference, maskrcnn_loss, paste_masks_in_image
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from curriculum.errors import ModelError

HEADS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
TWO_STAGE_HEADS = ("fasterrcnn", "maskrcnn")
CHECKPOINT_FORMAT = "curriculum.detector/1"
TORCHVISION_PREFIX = "torchvision:"
# torchvision's COCO detectors the zoo wraps as they are (`torchvision:<builder>`).
TORCHVISION_BUILDERS = (
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
)
# Options of the zoo's own detectors that a torchvision builder fixes itself.
_OWN_ARCHITECTURE_OPTIONS = ("fpn_channels", "head_convs", "anchor_scale")


@dataclass(frozen=True)
class BackboneSpec:
    """A timm backbone and the neck/head sizes that suit it.

    `timm_kwargs` reduce width and depth for the built-in members; `fpn_channels` and `head_convs` are the
    defaults of detectors on this backbone (overridable per build).
    """

    timm_name: str
    family: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    fpn_channels: int = 256
    head_convs: int = 4
    builtin: bool = False  # a reduced member: built-in teacher or student
    torchvision_weights: str | None = None  # torchvision ImageNet weights whose keys fit this timm body


BACKBONES: dict[str, BackboneSpec] = {
    # Full-size members (pretrained weights exist for these in timm; not used offline).
    "resnet18": BackboneSpec("resnet18", "resnet", torchvision_weights="ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": BackboneSpec("resnet34", "resnet", torchvision_weights="ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": BackboneSpec("resnet50", "resnet", torchvision_weights="ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101": BackboneSpec("resnet101", "resnet", torchvision_weights="ResNet101_Weights.IMAGENET1K_V1"),
    "mobilenetv3_small": BackboneSpec("mobilenetv3_small_100", "mobilenetv3", fpn_channels=128, head_convs=2),
    "mobilenetv3_large": BackboneSpec("mobilenetv3_large_100", "mobilenetv3", fpn_channels=128, head_convs=2),
    "convnext_tiny": BackboneSpec("convnext_tiny", "convnext"),
    "convnext_small": BackboneSpec("convnext_small", "convnext"),
    "swin_t": BackboneSpec("swin_tiny_patch4_window7_224", "swin"),
    "swin_s": BackboneSpec("swin_small_patch4_window7_224", "swin"),
    "swin_b": BackboneSpec("swin_base_patch4_window7_224", "swin"),
    # Reduced members: the built-in ladder, from the smallest student to a Swin teacher.
    "mobilenetv3_micro": BackboneSpec(
        "mobilenetv3_small_050", "mobilenetv3", fpn_channels=32, head_convs=1, builtin=True
    ),
    "resnet_mini": BackboneSpec(
        "resnet18", "resnet",
        dict(layers=(1, 1, 1, 1), channels=(24, 48, 96, 192), stem_width=24),
        fpn_channels=64, head_convs=2, builtin=True,
    ),
    "resnet18_half": BackboneSpec(
        "resnet18", "resnet", dict(channels=(32, 64, 128, 256), stem_width=32),
        fpn_channels=96, head_convs=2, builtin=True,
    ),
    "convnext_mini": BackboneSpec(
        "convnext_atto", "convnext", dict(depths=(1, 1, 3, 1), dims=(32, 64, 128, 256)),
        fpn_channels=96, head_convs=2, builtin=True,
    ),
    "swin_mini": BackboneSpec(
        "swin_tiny_patch4_window7_224", "swin",
        dict(embed_dim=48, depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.05),
        fpn_channels=96, head_convs=2, builtin=True,
    ),
}


@dataclass(frozen=True)
class DetectorConfig:
    """Everything `build_detector` needs; stored in checkpoints so a detector rebuilds from its file alone."""

    name: str
    num_classes: int  # including background (label 0), torchvision's convention
    image_size: int = 128
    fpn_channels: int | None = None  # None: the backbone's default
    head_convs: int | None = None
    anchor_scale: float = 2.0  # anchor side = anchor_scale * stride (torchvision uses 4 at 800 px)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    weights: str = "random"  # "random" | "timm" | "torchvision" (backbone ImageNet weights) | checkpoint path
    class_names: tuple[str, ...] | None = None  # per label, index 0 the background; None: unnamed

    def __post_init__(self) -> None:
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes:
                raise ModelError(f"{self.name}: {len(names)} class names for num_classes={self.num_classes} "
                                 "(one name per label, the background '__background__' first)")
            object.__setattr__(self, "class_names", names)

    @property
    def torchvision(self) -> bool:
        """A torchvision builder (``torchvision:<builder>``) rather than a zoo head on a timm backbone."""
        return self.name.startswith(TORCHVISION_PREFIX)

    @property
    def builder(self) -> str:
        return self.name.removeprefix(TORCHVISION_PREFIX)

    @property
    def head(self) -> str:
        return self.builder.split("_", 1)[0]

    @property
    def backbone(self) -> str:
        return self.builder.split("_", 1)[1]


def list_detectors(builtin_only: bool = False) -> list[str]:
    """All registered detector names: `<head>_<backbone>`, then `torchvision:<builder>`."""
    own = [f"{h}_{b}" for b, spec in BACKBONES.items() if spec.builtin or not builtin_only for h in HEADS]
    return own if builtin_only else own + [TORCHVISION_PREFIX + b for b in TORCHVISION_BUILDERS]


def needs_masks(name: str) -> bool:
    """A Mask R-CNN: trains on instance masks (the data set's ``masks=True``)."""
    return name.removeprefix(TORCHVISION_PREFIX).startswith("maskrcnn")


def check_detector_name(name: str) -> None:
    """Raise ModelError naming the registered heads and backbones unless `name` is a zoo detector: cheap, for
    checking a config before any work starts."""
    if name.startswith(TORCHVISION_PREFIX):
        if name.removeprefix(TORCHVISION_PREFIX) not in TORCHVISION_BUILDERS:
            raise ModelError(f"unknown torchvision detector {name!r}: the zoo wraps "
                             f"{', '.join(TORCHVISION_PREFIX + b for b in TORCHVISION_BUILDERS)}")
        return
    head, _, backbone = name.partition("_")
    if head not in HEADS or backbone not in BACKBONES:
        raise ModelError(
            f"unknown detector {name!r}: a name is <head>_<backbone> with head one of {list(HEADS)} and backbone "
            f"one of {sorted(BACKBONES)} (e.g. 'retinanet_resnet_mini'); `curriculum zoo` lists them all"
        )


# --------------------------------------------------------------------------------------------------- outputs


@dataclass
class DetectorOutput:
    """What one forward pass recorded. Fields not asked for stay None.

    features: FPN maps per level, ``{"p3": [N, C, H, W], ...}``.
    head (one-stage): ``cls_logits`` / ``bbox_regression`` (/ ``bbox_ctrness`` for FCOS) as per-level lists of
      ``[N, H*W*A, K]`` / ``[N, H*W*A, 4]``; ``anchors`` per image ``[sum HWA, 4]``, ``anchors_per_level``.
      With losses, the assignment the detector's own loss used (RetinaNet: its IoU Matcher; FCOS: its
      center sampling), per level: ``dense_labels [N, HWA_l]`` (class > 0 positive, 0 background, -1 ignored:
      RetinaNet's between-thresholds anchors) and ``dense_reg_targets [N, HWA_l, 4]`` (encoded by the
      detector's box coder like ``bbox_regression``; 0 where not positive).
    head (two-stage): ``objectness`` / ``rpn_deltas`` per level ``[N, A, H, W]`` / ``[N, 4A, H, W]``;
      ``proposals`` per image; ``roi_boxes`` the boxes the RoI head scored, ``class_logits`` ``[R, K]``,
      ``box_regression`` ``[R, 4K]``, and when training ``roi_labels`` / ``roi_regression_targets`` (per image).
      With losses, per level: ``rpn_labels [N, A, H, W]`` (the RPN loss's sampled mini-batch: 1 positive,
      0 negative, -1 not sampled) and ``rpn_reg_targets [N, 4A, H, W]`` (channel ``4a + j``, like
      ``rpn_deltas``; 0 where not a sampled positive).
      ``trainers.distill.outputs.student_outputs_from`` maps these names to the distillation losses' names; the
      head keys that are also teacher targets are the schema's (``teachers.targets.TARGETS``).
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    features: "OrderedDict[str, Tensor] | None" = None
    head: dict[str, Any] = field(default_factory=dict)
    detections: list[dict[str, Tensor]] | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- backbone


class TimmFPNBackbone(nn.Module):
    """A timm `features_only` body feeding a torchvision FPN; the `backbone` torchvision's detectors expect.

    Swin's feature maps come out NHWC from timm: each gets a LayerNorm (as the Swin detection backbones of its
    authors add one per output stage; timm's `features_only` has none) and is permuted to NCHW here, once.
    """

    def __init__(self, body: nn.Module, strides: tuple[int, ...], out_channels: int, extra: str) -> None:
        super().__init__()
        self.body = body
        info = body.feature_info
        reductions = info.reduction()
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ModelError(f"backbone {type(body).__name__} has no feature map at stride(s) {missing}")
        self.indices = [reductions.index(s) for s in strides]
        self.level_names = [f"p{int(math.log2(s))}" for s in strides]
        self.nhwc = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        in_channels = [info.channels()[i] for i in self.indices]
        # The unnormalised residual stream of a transformer stage: normalised before the FPN.
        self.out_norms = nn.ModuleList([nn.LayerNorm(c) for c in in_channels]) if self.nhwc else None
        if extra == "p6p7":
            extra_blocks = LastLevelP6P7(out_channels, out_channels)
            self.extra_names = [f"p{int(math.log2(strides[-1])) + 1}", f"p{int(math.log2(strides[-1])) + 2}"]
        else:
            extra_blocks = LastLevelMaxPool()
            self.extra_names = [f"p{int(math.log2(strides[-1])) + 1}"]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        self.strides = tuple(strides) + tuple(strides[-1] * 2 ** (i + 1) for i in range(len(self.extra_names)))

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body(x)
        picked = OrderedDict()
        for k, (name, i) in enumerate(zip(self.level_names, self.indices)):
            m = maps[i]
            picked[name] = self.out_norms[k](m).permute(0, 3, 1, 2).contiguous() if self.nhwc else m
        out = self.fpn(picked)
        # torchvision names the extra levels 'p6','p7' or 'pool': give every level its stride name.
        return OrderedDict(zip(self.level_names + self.extra_names, out.values()))


def _swin_window(image_size: int) -> int:
    """The largest window <= 7 that tiles every Swin stage at this input size (7 at 224 px, 4 at 128 px)."""
    sizes = [image_size // (4 * 2**i) for i in range(4)]
    for w in range(7, 0, -1):
        if all(s % w == 0 for s in sizes):
            return w
    return 1


def _build_body(spec: BackboneSpec, cfg: DetectorConfig) -> nn.Module:
    kwargs = dict(spec.timm_kwargs)
    if spec.family == "swin":
        kwargs.update(img_size=cfg.image_size, window_size=_swin_window(cfg.image_size))
    pretrained = cfg.weights == "timm"
    try:
        body = timm.create_model(spec.timm_name, features_only=True, pretrained=pretrained, **kwargs)
    except Exception as e:  # timm raises many kinds when the hub is out of reach
        if pretrained:
            raise ModelError(
                f"could not fetch timm pretrained weights for {spec.timm_name!r} ({type(e).__name__}: {e}). "
                "This machine may be offline: download the weights elsewhere and pass a checkpoint path as "
                "`weights`, or use weights='random'"
            ) from e
        raise
    if cfg.weights == "torchvision":
        _load_torchvision_weights(body, spec)
    return body


def _load_torchvision_weights(body: nn.Module, spec: BackboneSpec) -> None:
    if spec.torchvision_weights is None or spec.timm_kwargs:
        raise ModelError(
            f"torchvision ImageNet weights fit only the full ResNets; backbone {spec.timm_name!r} "
            f"with {spec.timm_kwargs or 'no changes'} has none: use weights='timm', 'random' or a checkpoint"
        )
    import torchvision.models as tvm

    enum_name, member = spec.torchvision_weights.split(".")
    weights = getattr(getattr(tvm, enum_name), member)
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:
        raise ModelError(
            f"could not download torchvision weights {spec.torchvision_weights} ({type(e).__name__}: {e}). "
            "This machine may be offline: put the file in $TORCH_HOME/hub/checkpoints or use weights='random'"
        ) from e
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelError(f"torchvision weights do not fit {spec.timm_name}: unexpected keys {unexpected[:5]}")


# --------------------------------------------------------------------------------------------------- detector


class Detector(nn.Module):
    """A torchvision detector plus a forward that records what distillation needs."""

    def __init__(self, cfg: DetectorConfig, model: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        self.model = model
        self.kind = "two_stage" if isinstance(model, FasterRCNN) else "one_stage"
        self.has_masks = isinstance(model, MaskRCNN)
        self.detect_masks = self.has_masks  # masks with the detections (an exported graph leaves them out)
        # Own backbones name their levels p<k> already; torchvision's are renamed by stride, measured once.
        self.level_map: dict[str, str] = level_names_by_stride(model.backbone)
        # Label 0 is the background: torchvision's sigmoid post-processing of one-stage heads would still rank it
        # as a class. The zoo's own detectors give it no score; torchvision's detectors behave as torchvision's.
        self.suppress_background = True

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def level_names(self) -> list[str]:
        """FPN levels, finest first, as recorded (``p3``... one-stage, ``p2``... two-stage)."""
        return list(self.level_map.values())

    @property
    def level_channels(self) -> dict[str, int]:
        return {n: self.backbone.out_channels for n in self.level_names}

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        want: tuple[str, ...] = ("losses",),
    ) -> DetectorOutput:
        """One pass. `want` picks from 'losses' (needs targets), 'features', 'head', 'detections'.

        Head outputs are always computed when losses or detections are asked for; only recorded when wanted.
        """
        m = self.model
        unknown = set(want) - {"losses", "features", "head", "detections"}
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}")
        if "losses" in want and targets is None:
            raise ValueError("losses need targets")
        tv_targets = None
        if targets is not None:
            tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            if self.has_masks and "losses" in want:
                missing = [i for i, t in enumerate(targets) if "masks" not in t]
                if missing:
                    raise ValueError(f"{self.config.name} needs instance masks in its targets (the data set's "
                                     f"masks=True); images {missing} have none")
                for tv, t in zip(tv_targets, targets):
                    tv["masks"] = t["masks"]
        image_list = self.batch(images)
        features = m.backbone(image_list.tensors)
        out = DetectorOutput(image_sizes=list(image_list.image_sizes))
        if "features" in want:
            out.features = self._named(features)
        if self.kind == "one_stage":
            self._one_stage(image_list, features, tv_targets, want, out)
        else:
            self._two_stage(image_list, features, tv_targets, want, out)
        return out

    def batch(self, images: list[Tensor]) -> ImageList:
        """torchvision's transform without its resize: normalise, then pad to a common size divisible by 32.

        Inputs come resized by the data (`curriculum.data.View`: a keep-ratio view is torchvision's own resize), so
        detections and recorded outputs are in the inputs' pixels and need no post-processing back.
        """
        t = self.model.transform
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"images must be [3, H, W] tensors, got {tuple(img.shape)}")
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        tensors = t.batch_images([t.normalize(img) for img in images], size_divisible=t.size_divisible)
        return ImageList(tensors, sizes)

    def _named(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """The backbone's maps under the stride names ``p<k>`` (torchvision's own backbones say '0', 'pool')."""
        return OrderedDict((self.level_map.get(k, k), v) for k, v in features.items())

    def _unnamed(self, features: "OrderedDict[str, Tensor] | dict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        inverse = {p: k for k, p in self.level_map.items()}
        return OrderedDict((inverse.get(k, k), v) for k, v in features.items())

    def _one_stage(self, image_list, features, targets, want, out: DetectorOutput) -> None:
        m = self.model
        feats = list(features.values())
        head = m.head(feats)
        anchors = m.anchor_generator(image_list, feats)
        hw = [f.shape[-2] * f.shape[-1] for f in feats]
        per_loc = head["cls_logits"].shape[1] // sum(hw)
        per_level = [n * per_loc for n in hw]
        matched = None
        if "losses" in want:
            matched = _dense_matching(m, targets, anchors, hw)
            out.losses = m.head.compute_loss(targets, head, anchors, matched)  # what m.compute_loss returns
        split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        if "head" in want:
            out.head = dict(split, anchors=anchors, anchors_per_level=per_level)
            if matched is not None:
                labels, reg_targets = _dense_targets(m, targets, anchors, matched)
                out.head["dense_labels"] = list(labels.split(per_level, dim=1))
                out.head["dense_reg_targets"] = list(reg_targets.split(per_level, dim=1))
        if "detections" in want:
            split_anchors = [list(a.split(per_level)) for a in anchors]
            with torch.no_grad():
                # Column 0 is the background label (num_classes = K + 1), never a target; torchvision's sigmoid
                # post-processing would still rank it as a class: give it no score so it takes no slot.
                logits = split["cls_logits"]
                if self.suppress_background:
                    logits = [c.index_fill(-1, c.new_tensor([0], dtype=torch.long), float("-inf")) for c in logits]
                out.detections = m.postprocess_detections(dict(split, cls_logits=logits), split_anchors,
                                                          image_list.image_sizes)

    def _two_stage(self, image_list, features, targets, want, out: DetectorOutput) -> None:
        m = self.model
        rpn, roi = m.rpn, m.roi_heads
        feats = list(features.values())
        objectness, rpn_deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(image_list, feats)
        per_level = [o[0].numel() for o in objectness]
        obj_flat, deltas_flat = concat_box_prediction_layers(objectness, rpn_deltas)
        decoded = rpn.box_coder.decode(deltas_flat.detach(), anchors).view(len(anchors), -1, 4)
        proposals, _ = rpn.filter_proposals(decoded, obj_flat, image_list.image_sizes, per_level)
        roi_boxes, roi_labels, roi_reg_targets = proposals, None, None
        roi_matched = None
        if "losses" in want:
            labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
            reg_targets = rpn.box_coder.encode(matched, anchors)
            labels = _rpn_sampled_labels(rpn, labels)
            loss_obj, loss_rpn = rpn.compute_loss(obj_flat, deltas_flat, labels, reg_targets)
            roi_boxes, roi_matched, roi_labels, roi_reg_targets = roi.select_training_samples(proposals, targets)
        class_logits, box_regression = self._roi_forward(features, roi_boxes, image_list.image_sizes)
        if "losses" in want:
            loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, roi_labels, roi_reg_targets)
            out.losses = {
                "loss_objectness": loss_obj, "loss_rpn_box_reg": loss_rpn,
                "loss_classifier": loss_cls, "loss_box_reg": loss_box,
            }
            if self.has_masks:  # the mask head on the positive RoIs, as torchvision's RoIHeads trains it
                pos = [torch.where(lab > 0)[0] for lab in roi_labels]
                mask_boxes = [b[p] for b, p in zip(roi_boxes, pos)]
                mask_feats = self._mask_features(features, mask_boxes, image_list.image_sizes)
                mask_logits = self.model.roi_heads.mask_predictor(mask_feats)
                out.losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                                        [t["labels"] for t in targets],
                                                        [m[p] for m, p in zip(roi_matched, pos)])
                if "head" in want:
                    out.head["mask_boxes"] = mask_boxes
                    out.head["mask_features"] = mask_feats  # [P, C, 14, 14]: the mask head's tower output
                    out.head["mask_logits"] = mask_logits
                    out.head["mask_labels"] = [lab[p] for lab, p in zip(roi_labels, pos)]
        if "head" in want:
            out.head = {
                **out.head,
                "objectness": objectness, "rpn_deltas": rpn_deltas, "anchors": anchors,
                "anchors_per_level": per_level, "proposals": proposals, "roi_boxes": roi_boxes,
                "class_logits": class_logits, "box_regression": box_regression,
                "roi_labels": roi_labels, "roi_regression_targets": roi_reg_targets,
            }
            if "losses" in want:
                out.head["rpn_labels"], out.head["rpn_reg_targets"] = _rpn_maps(objectness, labels, reg_targets)
        if "detections" in want:
            if roi_boxes is not proposals:  # training samples are a subset: score every proposal for detections
                class_logits, box_regression = self._roi_forward(features, proposals, image_list.image_sizes)
            with torch.no_grad():
                boxes, scores, labels = roi.postprocess_detections(
                    class_logits, box_regression, proposals, image_list.image_sizes
                )
            out.detections = [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]
            if self.detect_masks:
                with torch.no_grad():
                    probs = maskrcnn_inference(self._mask_forward(features, boxes, image_list.image_sizes), labels)
                for det, p, size in zip(out.detections, probs, image_list.image_sizes):
                    det["mask_probs"] = p  # [D, 1, M, M] in each box (paste them at any resolution)
                    det["masks"] = paste_masks_in_image(p, det["boxes"], size)  # [D, 1, H, W] in input pixels

    def _mask_features(self, features, boxes, image_sizes) -> Tensor:
        """The mask head's tower output ``[R, C, m, m]`` on `boxes` (features under the backbone's own names)."""
        roi = self.model.roi_heads
        return roi.mask_head(roi.mask_roi_pool(features, boxes, image_sizes))

    def _mask_forward(self, features, boxes, image_sizes) -> Tensor:
        """Mask logits ``[R, K, M, M]`` of the mask head on `boxes` (features under the backbone's own names)."""
        roi = self.model.roi_heads
        if sum(len(b) for b in boxes) == 0:
            m = roi.mask_roi_pool.output_size[0] * 2
            return features[next(iter(features))].new_zeros((0, self.config.num_classes, m, m))
        return roi.mask_predictor(self._mask_features(features, boxes, image_sizes))

    def score_masks(self, features: "OrderedDict[str, Tensor]", boxes: list[Tensor],
                    image_sizes: list[tuple[int, int]]) -> Tensor:
        """Mask logits ``[R, K, M, M]`` for given boxes (e.g. a student's positive RoIs), on recorded or cached
        features: no backbone runs."""
        if not self.has_masks:
            raise ModelError(f"{self.config.name} has no mask head")
        return self._mask_forward(self._unnamed(features), boxes, image_sizes)

    def _roi_forward(self, features, boxes, image_sizes) -> tuple[Tensor, Tensor]:
        """`features` under the backbone's own names (`_unnamed` turns recorded ones back)."""
        roi = self.model.roi_heads
        pooled = roi.box_roi_pool(features, boxes, image_sizes)
        return roi.box_predictor(roi.box_head(pooled))

    def score_boxes(
        self, features: "OrderedDict[str, Tensor]", boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """RoI-head class logits ``[R, K]`` and deltas ``[R, 4K]`` for given boxes (e.g. a student's proposals).

        Works on cached FPN features too: no backbone runs.
        """
        if self.kind != "two_stage":
            raise ModelError(f"{self.config.name} is one-stage: it has no RoI head to score boxes with")
        return self._roi_forward(self._unnamed(features), boxes, image_sizes)

    def set_thresholds(self, score_thresh: float | None = None, nms_thresh: float | None = None,
                       detections_per_img: int | None = None) -> None:
        """Post-processing settings after the build (they hold no weights)."""
        post = self.model.roi_heads if self.kind == "two_stage" else self.model
        given = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
        for key, value in given.items():
            if value is not None:
                setattr(post, key, value)
        self.config = replace(self.config, **{k: v for k, v in given.items() if v is not None})

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image in input-image coordinates (eval mode is the caller's choice)."""
        return self.forward(images, want=("detections",)).detections

    def checkpoint(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A plain checkpoint that `load_detector` rebuilds with the zoo alone."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.__dict__ | {"weights": "random", "class_names": (
                list(self.config.class_names) if self.config.class_names is not None else None)},
            "model": self.state_dict(),
            **(extra or {}),
        }


def level_names_by_stride(backbone: nn.Module) -> dict[str, str]:
    """``{the backbone's level name: "p<k>"}`` with ``2**k`` the level's stride, from one small forward."""
    if isinstance(backbone, TimmFPNBackbone):
        names = backbone.level_names + backbone.extra_names
        return dict(zip(names, names))
    side = 256
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.zeros(1, 3, side, side))
    backbone.train(was_training)
    names: dict[str, str] = {}
    for k, v in maps.items():
        base = f"p{round(math.log2(side / v.shape[-1]))}"
        taken = sum(1 for n in names.values() if n.split("_")[0] == base)
        names[k] = base if not taken else f"{base}_{taken}"
    return names


def _dense_matching(m: RetinaNet | FCOS, targets, anchors: list[Tensor], hw: list[int]) -> list[Tensor]:
    """Per image, the GT index each anchor (RetinaNet: IoU Matcher) or point (FCOS: center sampling) is
    assigned to by the detector's own loss; -1 background, -2 ignored (RetinaNet, between the thresholds).

    torchvision computes this inside ``compute_loss`` and hands it straight to ``head.compute_loss``. Running
    that method on a stand-in whose head returns its ``matched_idxs`` argument gives the assignment from
    torchvision's own code, without copying it and without touching the model.
    """
    probe = SimpleNamespace(head=SimpleNamespace(compute_loss=lambda _t, _h, _a, matched_idxs: matched_idxs))
    if isinstance(m, FCOS):
        probe.center_sampling_radius = m.center_sampling_radius
        return FCOS.compute_loss(probe, targets, {}, anchors, hw)
    probe.proposal_matcher = m.proposal_matcher
    return RetinaNet.compute_loss(probe, targets, {}, anchors)


def _dense_targets(m: RetinaNet | FCOS, targets, anchors: list[Tensor], matched: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``dense_labels [N, sum HWA]`` (class, 0 background, -1 ignored) and ``dense_reg_targets [N, sum HWA, 4]``
    (the box coder's encoding of the matched GT box, as the regression loss sees it; 0 where not positive)."""
    labels, reg = [], []
    for t, a, idx in zip(targets, anchors, matched):
        lab = torch.zeros_like(idx)
        lab[idx == Matcher.BETWEEN_THRESHOLDS] = -1
        y = torch.zeros_like(a)
        pos = idx >= 0
        if pos.any():
            gt = t["boxes"][idx[pos]]
            lab[pos] = t["labels"][idx[pos]]
            # RetinaNet's BoxCoder encodes (gt, anchors); FCOS's BoxLinearCoder (anchors, gt).
            y[pos] = m.box_coder.encode(a[pos], gt) if isinstance(m, FCOS) else m.box_coder.encode_single(gt, a[pos])
        labels.append(lab)
        reg.append(y)
    return torch.stack(labels), torch.stack(reg)


def _rpn_sampled_labels(rpn: nn.Module, labels: list[Tensor]) -> list[Tensor]:
    """The RPN loss's sampled mini-batch as labels: 1 positive, 0 negative, -1 not sampled.

    ``rpn.compute_loss`` draws this sample itself and does not return it. Drawing it here and giving
    ``compute_loss`` the sampled labels leaves the loss unchanged: its sampler then finds exactly one full
    mini-batch (at most ``batch_size * positive_fraction`` positives, the rest negatives) and keeps all of it.
    """
    pos, neg = rpn.fg_bg_sampler(labels)
    return [torch.where(p.bool(), 1.0, torch.where(n.bool(), 0.0, -1.0)) for p, n in zip(pos, neg)]


def _rpn_maps(objectness: list[Tensor], labels: list[Tensor], reg_targets: list[Tensor]) -> tuple[list, list]:
    """Per-anchor labels / targets (image-major, then level, H, W, anchor: the anchor generator's order) laid
    out like the RPN's outputs: ``[N, A, H, W]`` and ``[N, 4A, H, W]`` with channel ``4a + j``."""
    lab = torch.stack(labels).long()
    # Only sampled positives carry a target (an image without objects encodes a zero box: -inf).
    reg = torch.where((lab == 1)[..., None], torch.stack(reg_targets), 0.0)
    out_labels, out_reg, start = [], [], 0
    for o in objectness:
        n, a, h, w = o.shape
        stop = start + a * h * w
        out_labels.append(lab[:, start:stop].reshape(n, h, w, a).permute(0, 3, 1, 2))
        out_reg.append(reg[:, start:stop].reshape(n, h, w, a, 4).permute(0, 3, 4, 1, 2).reshape(n, 4 * a, h, w))
        start = stop
    return out_labels, out_reg


def _anchor_sizes(strides: tuple[int, ...], scale: float) -> tuple[tuple[int, ...], ...]:
    # Three octave scales per level as in RetinaNet, starting at `scale` strides.
    return tuple(tuple(max(2, int(round(s * scale * 2 ** (i / 3)))) for i in range(3)) for s in strides)


def _trim_convs(seq: nn.Sequential, n: int) -> nn.Sequential:
    """Keep the first `n` conv blocks of a RetinaNet head tower (depth reduction for small members)."""
    return nn.Sequential(*list(seq)[:n])


def build_detector(name: str, num_classes: int, **overrides: Any) -> Detector:
    """Build a registered detector. `num_classes` counts the background (label 0).

    overrides: any `DetectorConfig` field: image_size, fpn_channels, head_convs, anchor_scale, score_thresh,
    nms_thresh, detections_per_img, weights ("random", "timm", "torchvision" or a checkpoint path).
    """
    check_detector_name(name)
    fields = set(DetectorConfig.__dataclass_fields__) - {"name", "num_classes"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ModelError(f"unknown detector option(s) {bad} for {name!r}; allowed: {sorted(fields)}")
    if num_classes < 2:
        raise ModelError(f"num_classes={num_classes}: it counts the background, so it must be at least 2")
    cfg = DetectorConfig(name=name, num_classes=num_classes, **overrides)
    if cfg.torchvision:
        return _build_torchvision(cfg, overrides)
    checkpoint_path = None
    if cfg.weights not in ("random", "timm", "torchvision"):
        checkpoint_path, cfg = cfg.weights, replace(cfg, weights="random")
    detector = _assemble(cfg)
    if checkpoint_path is not None:
        _load_weights_into(detector, checkpoint_path)
        detector.config = replace(detector.config, weights=str(checkpoint_path))
    return detector


# --------------------------------------------------------------------------------------------------- torchvision


def _build_torchvision(cfg: DetectorConfig, overrides: dict[str, Any]) -> Detector:
    """A torchvision detector as its builder makes it, wrapped as a `Detector` (nothing patched).

    weights: ``random``; ``torchvision`` (the builder's COCO weights from torch's hub cache, downloaded when the
    network allows); the path of a state-dict file as torchvision publishes it; or a checkpoint of this project.
    """
    from torchvision.models import get_model_builder, get_model_weights

    defaults = DetectorConfig.__dataclass_fields__
    fixed = [k for k in _OWN_ARCHITECTURE_OPTIONS if overrides.get(k, defaults[k].default) != defaults[k].default]
    if fixed:
        raise ModelError(f"{cfg.name}: options {fixed} belong to the zoo's own detectors; torchvision's builder "
                         "fixes its architecture")
    if cfg.weights == "timm":
        raise ModelError(f"{cfg.name}: weights 'timm' are for timm backbones; use 'torchvision', 'random' or a path")
    coco = get_model_weights(cfg.builder).DEFAULT
    coco_names = tuple(coco.meta["categories"])
    if cfg.weights == "torchvision" and cfg.num_classes != len(coco_names):
        raise ModelError(f"{cfg.name}: torchvision's COCO weights have {len(coco_names)} classes (label slots, "
                         f"background included), num_classes is {cfg.num_classes}: set num_classes to "
                         f"{len(coco_names)} and map the student's classes with a class_map")
    if cfg.class_names is None and cfg.num_classes == len(coco_names):
        cfg = replace(cfg, class_names=coco_names)
    thresholds = ({"box_score_thresh": cfg.score_thresh, "box_nms_thresh": cfg.nms_thresh,
                   "box_detections_per_img": cfg.detections_per_img} if cfg.head in TWO_STAGE_HEADS else
                  {"score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh,
                   "detections_per_img": cfg.detections_per_img})
    model = get_model_builder(cfg.builder)(weights=None, weights_backbone=None, num_classes=cfg.num_classes,
                                           **thresholds)
    detector = Detector(cfg, model)
    detector.suppress_background = False  # torchvision's post-processing, as torchvision runs it
    if cfg.weights == "torchvision":
        _load_torchvision_coco(model, coco)
    elif cfg.weights != "random":
        path = Path(cfg.weights)
        if _is_project_checkpoint(path):
            _load_weights_into(detector, path)
        else:
            _load_torchvision_state(model, path, cfg.name)
        detector.config = replace(detector.config, weights=str(path))
    return detector


def coco_class_names(name: str) -> tuple[str, ...]:
    """The label names of a ``torchvision:<builder>``'s COCO weights (91 slots: background, 80 classes, 'N/A')."""
    from torchvision.models import get_model_weights

    check_detector_name(name)
    return tuple(get_model_weights(name.removeprefix(TORCHVISION_PREFIX)).DEFAULT.meta["categories"])


def _load_torchvision_coco(model: nn.Module, weights: Any) -> None:
    from torch.hub import get_dir

    file = Path(get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # urllib raises many kinds offline
        raise ModelError(
            f"torchvision's COCO weights {weights} are not in torch's hub cache and could not be downloaded "
            f"({type(e).__name__}: {e}). Place {weights.url} at {file} (or set TORCH_HOME), or give the file's "
            "path as weights") from e
    model.load_state_dict(state)


def _is_project_checkpoint(path: Path) -> bool:
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist: give a torchvision state-dict file (*.pth) or a "
                         "checkpoint written by `curriculum train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"weights file {path} could not be read (weights_only=True): {type(e).__name__}: {e}") from e
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT


def _load_torchvision_state(model: nn.Module, path: Path, name: str) -> None:
    """A torchvision state dict (``{"backbone.body.conv1.weight": ...}``) into `model`, every key checked."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state dict (a mapping of parameter names to tensors) for {name}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) {shapes[:3]}")
        raise ModelError(f"{path} does not fit {name}: " + "; ".join(parts) + ". Is it the file of another builder, "
                         "or of a model with another num_classes (the classifier's shape gives it away)?")
    model.load_state_dict(state)


def _assemble(cfg: DetectorConfig) -> Detector:
    spec = BACKBONES[cfg.backbone]
    fpn_ch = cfg.fpn_channels or spec.fpn_channels
    if cfg.head == "fcos":
        # FCOS's head has GroupNorm(32, C): C a multiple of 32, and at least 64 so that P7 (1x1 at 128 px)
        # still has two values per group in training.
        fpn_ch = max(64, -(-fpn_ch // 32) * 32)
    convs = cfg.head_convs if cfg.head_convs is not None else spec.head_convs
    body = _build_body(spec, cfg)
    common = dict(
        min_size=cfg.image_size, max_size=cfg.image_size,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    if cfg.head in ("retinanet", "fcos"):
        backbone = TimmFPNBackbone(body, (8, 16, 32), fpn_ch, "p6p7")
        strides = backbone.strides
        if cfg.head == "retinanet":
            sizes = _anchor_sizes(strides, cfg.anchor_scale)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            head = RetinaNetHead(fpn_ch, anchors.num_anchors_per_location()[0], cfg.num_classes,
                                 norm_layer=partial(nn.GroupNorm, _groups(fpn_ch)))
            head.classification_head.conv = _trim_convs(head.classification_head.conv, convs)
            head.regression_head.conv = _trim_convs(head.regression_head.conv, convs)
            model = RetinaNet(backbone, cfg.num_classes, anchor_generator=anchors, head=head,
                              score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                              detections_per_img=cfg.detections_per_img, **common)
        else:
            from torchvision.models.detection.fcos import FCOSHead

            sizes = tuple((int(s * cfg.anchor_scale / 2),) for s in strides)  # FCOS: one point per location
            anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
            head = FCOSHead(fpn_ch, 1, cfg.num_classes, num_convs=convs)
            model = FCOS(backbone, cfg.num_classes, anchor_generator=anchors, head=head,
                         score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                         detections_per_img=cfg.detections_per_img, **common)
    else:
        backbone = TimmFPNBackbone(body, (4, 8, 16, 32), fpn_ch, "maxpool")
        strides = backbone.strides
        sizes = tuple((max(2, int(s * cfg.anchor_scale)),) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        rep = 4 * fpn_ch
        two_stage = dict(
            rpn_anchor_generator=anchors, rpn_head=RPNHead(fpn_ch, 3, conv_depth=max(1, convs // 2)),
            box_roi_pool=MultiScaleRoIAlign(backbone.level_names, 7, 2),
            box_head=TwoMLPHead(fpn_ch * 49, rep), box_predictor=FastRCNNPredictor(rep, cfg.num_classes),
            rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
            box_batch_size_per_image=128, box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img, **common,
        )
        if cfg.head == "maskrcnn":
            # torchvision's mask branch (14 px RoIs, a conv tower, 28 px logits per class), its tower as deep as
            # the box head's convs for the reduced members (4 convs of 256 channels at full size).
            depth = convs if spec.builtin else 4
            model = MaskRCNN(backbone, None, mask_roi_pool=MultiScaleRoIAlign(backbone.level_names, 14, 2),
                             mask_head=MaskRCNNHeads(fpn_ch, (fpn_ch,) * depth, 1),
                             mask_predictor=MaskRCNNPredictor(fpn_ch, fpn_ch, cfg.num_classes), **two_stage)
        else:
            model = FasterRCNN(backbone, None, **two_stage)
    return Detector(cfg, model)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


# --------------------------------------------------------------------------------------------------- weights


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist: give the path of a file written by `curriculum train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:
        hint = "" if trust else " (loaded with weights_only=True; pass trust=True only for files you trust)"
        raise ModelError(f"checkpoint {path} could not be read: {type(e).__name__}: {e}{hint}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a curriculum detector checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ckpt


def _load_weights_into(detector: Detector, path: str | os.PathLike, trust: bool = False) -> None:
    ckpt = read_checkpoint(path, trust)
    saved = ckpt["config"]
    if saved["name"] != detector.config.name or saved["num_classes"] != detector.config.num_classes:
        raise ModelError(
            f"checkpoint {path} holds {saved['name']} with {saved['num_classes']} classes, but "
            f"{detector.config.name} with {detector.config.num_classes} classes was asked for"
        )
    try:
        detector.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ModelError(f"checkpoint {path} does not fit {detector.config.name}: {str(e)[:400]}") from e


def load_detector(path: str | os.PathLike, trust: bool = False, **overrides: Any) -> Detector:
    """Rebuild a detector from a checkpoint written by `Detector.checkpoint` (zoo alone, no Ray)."""
    ckpt = read_checkpoint(path, trust)
    cfg = dict(ckpt["config"])
    cfg.update(overrides)
    cfg["weights"] = "random"
    name, num_classes = cfg.pop("name"), cfg.pop("num_classes")
    detector = build_detector(name, num_classes, **cfg)
    try:
        detector.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ModelError(f"checkpoint {path} does not fit {name}: {str(e)[:400]}") from e
    detector.config = replace(detector.config, weights=str(path))
    return detector


def load_matching(module: nn.Module, state: dict[str, Tensor], keep: Callable[[str], bool] | None = None) -> list[str]:
    """Load into `module` the tensors of `state` whose name, shape and dtype match its own (and, given `keep`, whose
    name it accepts); the rest stay as they are. Returns the names taken."""
    own = module.state_dict()
    taken = [k for k, v in state.items()
             if k in own and own[k].shape == v.shape and own[k].dtype == v.dtype and (keep is None or keep(k))]
    module.load_state_dict({**own, **{k: state[k].detach().clone() for k in taken}})
    return taken


def fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint file (the teacher cache keys on it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- figures


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gflops(detector: Detector, image_size: int | None = None) -> float:
    """GFLOPs of one eval forward (backbone, neck, head, post-processing) at `image_size`; 2 FLOPs per MAC."""
    from torch.utils.flop_counter import FlopCounterMode

    size = image_size or detector.config.image_size
    was_training = detector.training
    detector.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        detector([torch.rand(3, size, size)], want=("detections",))
    detector.train(was_training)
    return counter.get_total_flops() / 1e9
