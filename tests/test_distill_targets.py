"""TeacherTargets: constants (detached), finite checks that name the image and the field."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curriculum.errors import DataError
from teachers.targets import TeacherTargets


def test_fields_are_detached_and_teacher_gets_no_grad():
    teacher_param = torch.ones(2, 3, 4, 4, requires_grad=True)
    feat = teacher_param * 2.0  # an inline teacher's output, still in the teacher's graph
    logits = [teacher_param.sum() * torch.ones(2, 5, 3)]
    tt = TeacherTargets(features={"p3": feat}, cls_logits=logits, image_ids=[1, 2])
    assert not tt.features["p3"].requires_grad
    assert tt.features["p3"].grad_fn is None
    assert not tt.cls_logits[0].requires_grad
    student = torch.zeros(2, 3, 4, 4, requires_grad=True)
    ((student - tt.features["p3"]) ** 2).sum().backward()
    assert teacher_param.grad is None
    assert student.grad is not None
    assert tt.present() == {"features", "cls_logits", "image_ids"}


def test_check_finite_passes_on_clean_targets():
    tt = TeacherTargets(
        features={"p3": torch.zeros(2, 3, 2, 2)},
        cls_logits=[torch.zeros(2, 4, 3)],
        roi_class_logits=torch.zeros(5, 3),
        detections=[{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)}],
        image_ids=[7, 8],
    )
    tt.check_finite()


def test_check_finite_passes_large_finite_values_whose_sum_overflows():
    """The one-sum-per-tensor check overflows on these; the exact search then finds nothing and passes. A NaN
    beside them is still found."""
    big = torch.full((2, 3, 2, 2), 3e38)
    TeacherTargets(features={"p3": big}, roi_class_logits=torch.full((4, 2), 3e38), image_ids=[1, 2]).check_finite()
    big[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=r"features\[p3\].*image_id 1 "):
        TeacherTargets(features={"p3": big}, image_ids=[1, 2]).check_finite()


def test_check_finite_names_feature_level_and_image():
    f = torch.zeros(2, 3, 2, 2)
    f[1, 2, 0, 1] = float("nan")
    tt = TeacherTargets(features={"p4": f}, image_ids=[10, 42])
    with pytest.raises(DataError, match=r"features\[p4\].*image_id 42 \(batch position 1\)"):
        tt.check_finite()
    # explicit ids override
    with pytest.raises(DataError, match="image_id 99"):
        tt.check_finite(image_ids=[98, 99])
    # no ids: the batch position is still named
    with pytest.raises(DataError, match="batch position 1"):
        TeacherTargets(features={"p4": f}).check_finite()


def test_check_finite_per_level_lists_and_detections():
    ok = torch.zeros(2, 4, 3)
    bad = torch.zeros(2, 6, 3)
    bad[0, 5, 1] = float("inf")
    tt = TeacherTargets(cls_logits=[ok, bad], image_ids=[3, 4])
    with pytest.raises(DataError, match=r"cls_logits\[1\].*image_id 3"):
        tt.check_finite()
    dets = [
        {"boxes": torch.zeros(1, 4), "scores": torch.ones(1)},
        {"boxes": torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), "scores": torch.ones(1)},
    ]
    with pytest.raises(DataError, match=r"detections\[1\]\[boxes\].*image_id 6"):
        TeacherTargets(detections=dets, image_ids=[5, 6]).check_finite()


def test_check_finite_roi_rows_mapped_to_images():
    roi = torch.zeros(5, 3)
    roi[3, 0] = float("nan")  # rows 0-1 image 0, rows 2-4 image 1
    tt = TeacherTargets(roi_class_logits=roi, roi_counts=[2, 3], image_ids=[11, 12])
    with pytest.raises(DataError, match=r"roi_class_logits.*image_id 12.*RoI row 3"):
        tt.check_finite()
    with pytest.raises(DataError, match=r"rows \[3\]"):
        TeacherTargets(roi_class_logits=roi, image_ids=[11, 12]).check_finite()


def test_score_rois_runs_without_grad_and_detaches():
    head = nn.Linear(4, 3)
    calls = []

    def scorer(boxes):
        calls.append([b.clone() for b in boxes])
        x = torch.cat(boxes, 0)
        return head(x), head(x).repeat(1, 4)

    tt = TeacherTargets(roi_scorer=scorer)
    boxes = [torch.rand(2, 4, requires_grad=True), torch.rand(1, 4)]
    cls, reg = tt.score_rois(boxes)
    assert cls.shape == (3, 3) and reg.shape == (3, 12)
    assert not cls.requires_grad and not reg.requires_grad
    assert len(calls) == 1 and not calls[0][0].requires_grad
    with pytest.raises(DataError, match="roi_scorer"):
        TeacherTargets().score_rois(boxes)


def test_to_device_keeps_scorer():
    def scorer(b):
        return torch.zeros(1, 2), torch.zeros(1, 8)

    tt = TeacherTargets(features={"p3": torch.ones(1, 1, 1, 1)}, image_ids=[1], roi_scorer=scorer)
    moved = tt.to("cpu")
    assert moved.roi_scorer is scorer
    assert torch.equal(moved.features["p3"], tt.features["p3"])
    assert moved.image_ids == [1]
