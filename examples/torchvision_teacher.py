"""A worked example of `teachers.adapter.TeacherAdapter`: a torchvision RetinaNet as a teacher, run by torchvision's
own modules (no zoo), returning the schema's features and dense head outputs.

Any detector can be wrapped the same way: run its backbone and neck on the student's images (already resized by
the data set: use the resize the model was trained with, e.g. ``data.resize: keep_ratio``, ``min_size: 800``,
``max_size: 1333`` for torchvision's COCO models), name its FPN maps ``p<k>`` by stride ``2**k``, and return them on
the student's padded batch grid (pad the batch to a multiple of 32 at the bottom and right, as here).

In a run config::

    teachers:
      - name: retinanet_tv
        adapter: examples.torchvision_teacher:TorchvisionRetinaNetTeacher
        adapter_args: {state_dict: /models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth}
        class_map: auto
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models import get_model_builder, get_model_weights

from curriculum.data import View
from teachers.adapter import TeacherAdapter
from teachers.targets import TeacherTargets

LEVELS = ("p3", "p4", "p5", "p6", "p7")  # torchvision's RetinaNet FPN: strides 8 to 128


class TorchvisionRetinaNetTeacher(TeacherAdapter):
    """torchvision's RetinaNet (``retinanet_resnet50_fpn`` or ``_v2``) from a state-dict file (or random weights)."""

    kind = "one_stage"

    def __init__(self, builder: str = "retinanet_resnet50_fpn_v2", state_dict: str | None = None,
                 num_classes: int = 91) -> None:
        model = get_model_builder(builder)(weights=None, weights_backbone=None, num_classes=num_classes)
        if state_dict:
            model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
        self.model = model.eval().requires_grad_(False)
        self.level_channels = {lvl: model.backbone.out_channels for lvl in LEVELS}
        coco = get_model_weights(builder).DEFAULT.meta["categories"]
        self.class_names = tuple(coco) if num_classes == len(coco) else None

    def to(self, device: torch.device | str) -> TorchvisionRetinaNetTeacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def targets(self, images: list[Tensor], views: list[View]) -> TeacherTargets:
        t = self.model.transform
        batch = t.batch_images([t.normalize(im) for im in images], size_divisible=32)  # resized by the data set
        maps = list(self.model.backbone(batch).values())
        head = self.model.head(maps)  # cls_logits [N, sum(H*W*A), K], bbox_regression [N, sum(H*W*A), 4]
        cells = [m.shape[-2] * m.shape[-1] for m in maps]
        per_level = [n * (head["cls_logits"].shape[1] // sum(cells)) for n in cells]
        return TeacherTargets(
            features=dict(zip(LEVELS, maps)),
            cls_logits=list(head["cls_logits"].split(per_level, dim=1)),
            bbox_regression=list(head["bbox_regression"].split(per_level, dim=1)),
        )
