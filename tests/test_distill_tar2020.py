"""TAR (Sun et al. 2020): Gaussian object masks, gated classification and box transfer,
proposal sharing through the teacher's RoI scorer."""

from __future__ import annotations

import math

import pytest
import torch

from curriculum.errors import DataError
from trainers.distill import TeacherTargets, build_distiller
from trainers.distill.common import decode_deltas
from trainers.distill.tar2020 import box_gate, cls_gate, gaussian_object_mask, masked_feature_loss

LN3 = math.log(3.0)
KL_75_50 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_gaussian_mask_hand_values_and_empty_image():
    # box [0, 0, 16, 16], stride 8, 2 x 2 map: cell centres at 4 and 12, box centre 8, sigma 8;
    # every cell is 4 px from the centre on each axis: exp(-(16/128 + 16/128)) = exp(-0.25)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)]
    m = gaussian_object_mask(boxes, (2, 2), (8, 8), 0.5)
    assert m.shape == (2, 1, 2, 2)
    assert m[0].flatten().tolist() == pytest.approx([math.exp(-0.25)] * 4)
    assert m[1].abs().sum().item() == 0.0
    # two boxes: the maximum of the two Gaussians; a box centred on a cell gives 1 there
    two = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 24.0, 16.0]])]
    m2 = gaussian_object_mask(two, (2, 3), (8, 8), 0.5)[0, 0]
    assert m2[0, 0].item() == pytest.approx(1.0)
    # cell (1, 2) at (20, 12); box 2 centre (16, 12), sigma (8, 4): exp(-16/128)
    assert m2[1, 2].item() == pytest.approx(math.exp(-16 / 128))


def test_masked_feature_loss_hand_value_and_empty():
    t = torch.zeros(1, 2, 1, 2)
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], requires_grad=True)
    mask = torch.tensor([[[[1.0, 0.5]]]])
    # (1*1 + 0.5*4 + 1*9 + 0.5*16) / (2 channels * 1.5 mass) = 20 / 3
    assert masked_feature_loss(s, t, mask).item() == pytest.approx(20 / 3)
    zero = masked_feature_loss(s, t, torch.zeros(1, 1, 1, 2))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.all(s.grad == 0)


def _feature_setup(boxes):
    d = build_distiller([{"name": "tar_feature", "adapter_init": "identity"}], {"p3": 2}, {"p3": 2})
    t = torch.zeros(2, 2, 2, 2)
    s = torch.ones(2, 2, 2, 2, requires_grad=True)
    gt = [{"boxes": b, "labels": torch.ones(b.shape[0], dtype=torch.long)} for b in boxes]
    return d, s, t, gt


def test_tar_feature_through_distiller_no_objects_is_zero_not_nan():
    d, s, t, gt = _feature_setup([torch.zeros(0, 4), torch.zeros(0, 4)])
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}), gt)["distill_tar_feature"]
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.all(torch.isfinite(s.grad)) and torch.all(s.grad == 0)
    # one image with an object: its mask weights a (S - T)^2 = 1 everywhere -> exactly 1
    d, s, t, gt = _feature_setup([torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)])
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}), gt)["distill_tar_feature"]
    assert out.item() == pytest.approx(1.0)
    out.backward()
    assert s.grad[1].abs().sum() == 0 and s.grad[0].abs().sum() > 0
    assert d.terms["tar_feature"].adapters["p3"].weight.grad.abs().sum() > 0


def test_cls_gate_and_loss():
    # RoI 0 (label 1): p_T(1) = 0.75 > p_S(1) = 0.5 -> kept; RoI 1 (label 0): p_T(0) = 0.25 < 0.5 -> dropped
    s = torch.zeros(2, 2)
    t = torch.tensor([[0.0, LN3], [0.0, LN3]])
    labels = torch.tensor([1, 0])
    assert cls_gate(s, t, labels, "teacher_better").tolist() == [True, False]
    assert cls_gate(s, t, labels, "teacher_correct").tolist() == [True, False]
    assert cls_gate(s, t, labels, "none").tolist() == [True, True]
    d = build_distiller([{"name": "tar_cls"}])
    student = {"roi_class_logits": s.clone().requires_grad_(True), "roi_labels": labels}
    tt = TeacherTargets(roi_class_logits=t, roi_box_regression=torch.zeros(2, 8))
    out = d(student, tt)["distill_tar_cls"]
    # KL(0.75/0.25 || 0.5/0.5) of the kept RoI over R = 2 RoIs
    assert out.item() == pytest.approx(KL_75_50 / 2, rel=1e-6)
    out.backward()
    assert student["roi_class_logits"].grad[1].abs().sum() == 0


def _box_case():
    # RoI 0: proposal [0, 0, 10, 10], GT [0, 0, 10, 20] (IoU 0.5). The teacher's class-1 deltas
    # move the centre y 5 -> 10 (dy = 5/10 * 10 = 5) and double the height (dh = 5 ln 2): IoU 1 -> kept.
    # RoI 1: proposal == GT; the teacher shifts it: IoU < 1 -> dropped. RoI 2: background.
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.tensor([[0.0, 0.0, 5.0, 5.0]])]
    matched = torch.tensor([[0.0, 0.0, 10.0, 20.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]])
    t = torch.zeros(3, 8)
    t[0, 4:8] = torch.tensor([0.0, 5.0, 0.0, 5 * math.log(2.0)])
    t[1, 4:8] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    s = torch.zeros(3, 8)
    s[0, 4:8] = torch.tensor([1.0, 5.0, 0.0, 0.0])
    s[1, 4:8] = torch.tensor([9.0, 9.0, 9.0, 9.0])
    labels = torch.tensor([1, 1, 0])
    return proposals, matched, t, s, labels


def test_box_gate_by_iou():
    proposals, matched, t, _, labels = _box_case()
    props = torch.cat(proposals)
    refined = decode_deltas(t[:2, 4:8], props[:2])
    assert refined[0].tolist() == pytest.approx([0.0, 0.0, 10.0, 20.0], abs=1e-4)
    assert box_gate(t[:2, 4:8], props[:2], matched[:2]).tolist() == [True, False]


def test_box_loss_hand_value_with_matched_boxes_and_decoded_targets():
    proposals, matched, t, s, labels = _box_case()
    tt = TeacherTargets(roi_class_logits=torch.zeros(3, 2), roi_box_regression=t)
    s = s.requires_grad_(True)
    student = {
        "roi_class_logits": torch.zeros(3, 2),
        "roi_box_regression": s,
        "roi_labels": labels,
        "proposals": proposals,
        "roi_matched_gt_boxes": matched,
    }
    d = build_distiller([{"name": "tar_box"}])
    out = d(student, tt)["distill_tar_box"]
    # kept RoI 0: |s - t| = [1, 0, 0, 5 ln 2]; smooth L1 with beta 1/9: |x| - beta/2 for |x| >= beta
    beta = 1 / 9
    expected = ((1 - beta / 2) + (5 * math.log(2) - beta / 2)) / 3
    assert out.item() == pytest.approx(expected, rel=1e-5)
    out.backward()
    assert s.grad[1].abs().sum() == 0 and s.grad[2].abs().sum() == 0
    # the matched GT can also come from the encoded regression targets (torchvision's encoding)
    del student["roi_matched_gt_boxes"]
    props = torch.cat(proposals)
    w = torch.tensor([10.0, 10.0, 5.0, 5.0])
    pw, ph = props[:, 2] - props[:, 0], props[:, 3] - props[:, 1]
    px, py = props[:, 0] + pw / 2, props[:, 1] + ph / 2
    gw, gh = matched[:, 2] - matched[:, 0], matched[:, 3] - matched[:, 1]
    gx, gy = matched[:, 0] + gw / 2, matched[:, 1] + gh / 2
    targets = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1) * w
    student["roi_reg_targets"] = targets
    assert d(student, tt)["distill_tar_box"].item() == pytest.approx(expected, rel=1e-5)
    # or from IoU matching against the ground truth
    del student["roi_reg_targets"]
    gt = [{"boxes": matched[:2], "labels": torch.tensor([1, 1])}, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    assert d(student, tt, gt)["distill_tar_box"].item() == pytest.approx(expected, rel=1e-5)


def test_proposal_sharing_scores_student_proposals_once():
    proposals, matched, t, s, labels = _box_case()
    calls = []
    teacher_param = torch.tensor(1.0, requires_grad=True)

    def scorer(boxes):
        calls.append(boxes)
        cls = torch.tensor([[0.0, LN3], [0.0, LN3], [0.0, LN3]]) * teacher_param
        return cls, t * teacher_param

    tt = TeacherTargets(roi_scorer=scorer, image_ids=[5, 6])
    student = {
        "roi_class_logits": torch.zeros(3, 2, requires_grad=True),
        "roi_box_regression": s.clone().requires_grad_(True),
        "roi_labels": labels,
        "proposals": proposals,
        "roi_matched_gt_boxes": matched,
    }
    d = build_distiller([{"name": "tar_cls"}, {"name": "tar_box"}, {"name": "chen_cls", "head": "roi"}])
    out = d(student, tt)
    assert len(calls) == 1  # one teacher RoI pass shared by every entry
    assert [b.tolist() for b in calls[0]] == [p.tolist() for p in proposals]
    sum(out.values()).backward()
    assert teacher_param.grad is None
    assert student["roi_class_logits"].grad.abs().sum() > 0
    # RoI 0 and 1 (label 1) kept, RoI 2 (label 0, p_T(0) = 0.25) dropped
    assert out["distill_tar_cls"].item() == pytest.approx(2 * KL_75_50 / 3, rel=1e-6)


def test_proposal_sharing_nonfinite_teacher_names_image():
    proposals, matched, t, s, labels = _box_case()

    def scorer(boxes):
        cls = torch.zeros(3, 2)
        cls[2, 0] = float("nan")  # row 2 belongs to image 1
        return cls, t

    tt = TeacherTargets(roi_scorer=scorer, image_ids=[5, 6])
    student = {"roi_class_logits": torch.zeros(3, 2), "roi_labels": labels, "proposals": proposals}
    with pytest.raises(DataError, match="image_id 6"):
        build_distiller([{"name": "tar_cls"}])(student, tt)


def test_tar_feature_with_resized_student_uses_the_student_stride():
    # student p3 is 2 x 2 (stride 8), teacher p3 4 x 4: the mask is drawn at 4 x 4 with stride 4
    d = build_distiller([{"name": "tar_feature", "adapter_init": "identity"}], {"p3": 2}, {"p3": 2})
    s = torch.ones(1, 2, 2, 2, requires_grad=True)
    t = torch.zeros(1, 2, 4, 4)
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([1])}]
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}), gt)["distill_tar_feature"]
    assert out.item() == pytest.approx(1.0)  # resized constant 1 vs 0: 1 under any mask
    m = gaussian_object_mask([gt[0]["boxes"]], (4, 4), (4.0, 4.0), 0.5)
    assert m[0, 0, 0, 0].item() == pytest.approx(math.exp(-2 * 4 / 32))  # cell (2, 2) px, centre (4, 4), sigma 4
