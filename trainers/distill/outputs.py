"""Student outputs for the distiller from a zoo detector's forward pass.

``teachers.zoo.Detector.forward(images, targets, want=("losses", "features", "head"))`` records everything
the losses read (see ``context.py`` for the keys); this module only renames. The zoo keeps torchvision's
names for the RoI head (``class_logits``, ``box_regression``, ``roi_regression_targets`` per image, and
``proposals`` for every RPN proposal); the losses use ``roi_class_logits``, ``roi_box_regression``,
``roi_reg_targets [R, 4]`` and ``proposals`` for the R boxes the RoI head scored (the zoo's ``roi_boxes``).
"""

from __future__ import annotations

from typing import Any

import torch

from teachers.targets import fields_of

# DetectorOutput.head keys the losses read under the same name: the per-level head outputs of the target schema
# (what a teacher also provides), and the matching the student's own loss used (the student's alone).
_SAME_NAME = fields_of("head") + ("dense_labels", "dense_reg_targets", "rpn_labels", "rpn_reg_targets")


def forward_outputs(required: set[str]) -> tuple[str, ...]:
    """What a training step's ``Detector.forward`` must record (its ``want``) for losses reading the student
    outputs `required` (``Distiller.required_student_outputs``): the losses, and the features and the head only
    where a loss reads them (recording the head also computes the dense matching's targets)."""
    extra = ("features",) * ("features" in required) + ("head",) * bool(required - {"features"})
    return ("losses",) + extra


def student_outputs_from(out: Any) -> dict[str, Any]:
    """The ``student_outputs`` dict of ``Distiller.forward`` from a ``teachers.zoo.DetectorOutput``.

    Keys whose value was not recorded are left out (a loss that needs one says which). The matching
    (``dense_labels``, ``rpn_labels``, ``roi_labels`` and their targets) is there only when the forward pass
    computed losses, i.e. in the training step.
    """
    head = out.head or {}
    s: dict[str, Any] = {"features": out.features}
    s.update({k: head.get(k) for k in _SAME_NAME})
    if head.get("class_logits") is not None:  # two-stage RoI head
        s["proposals"] = head["roi_boxes"]
        s["roi_class_logits"] = head["class_logits"]
        s["roi_box_regression"] = head["box_regression"]
        if head.get("roi_labels") is not None:
            s["roi_labels"] = torch.cat(list(head["roi_labels"]))
        if head.get("roi_regression_targets") is not None:
            s["roi_reg_targets"] = torch.cat(list(head["roi_regression_targets"]))
    for k in ("mask_logits", "mask_labels", "mask_boxes"):  # a Mask R-CNN's positive RoIs and their mask logits
        s[k] = head.get(k)
    return {k: v for k, v in s.items() if v is not None}
