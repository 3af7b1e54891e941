"""Chen et al. 2017: weighted soft CE, teacher-bounded regression, hint; hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from curriculum.errors import ConfigError
from trainers.distill import TeacherTargets, build_distiller
from trainers.distill.chen2017 import (
    binary_weighted_soft_ce,
    bounded_regression,
    class_weights,
    weighted_soft_ce,
)
from trainers.distill.common import set_identity_

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_weighted_soft_ce_hand_value():
    # P_S = [0.5, 0.5], P_T = [0.75, 0.25], w = [1.5, 1]
    # -(1.5 * 0.75 * ln 0.5 + 1 * 0.25 * ln 0.5) = 1.375 ln 2
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[LN3, 0.0]])
    w = class_weights(2, 1.5)
    assert w.tolist() == [1.5, 1.0]
    assert weighted_soft_ce(s, t, w).item() == pytest.approx(1.375 * LN2, rel=1e-6)


def test_binary_form_hand_value():
    # p_S = 0.5, p_T = 0.75: -(0.75 ln 0.5 + 1.5 * 0.25 ln 0.5) = 1.125 ln 2
    s = torch.tensor([[0.0]])
    t = torch.tensor([[LN3]])
    assert binary_weighted_soft_ce(s, t, bg_weight=1.5).item() == pytest.approx(1.125 * LN2, rel=1e-6)


def test_roi_classification_mu_mixing_and_detector_scale():
    s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[LN3, 0.0]])
    tt = TeacherTargets(roi_class_logits=t, roi_box_regression=torch.zeros(1, 8))
    d = build_distiller([{"name": "chen_cls", "head": "roi"}])
    out = d({"roi_class_logits": s}, tt)
    assert out["distill_chen_cls_roi"].item() == pytest.approx(0.5 * 1.375 * LN2, rel=1e-6)
    assert d.detector_loss_scales() == {"loss_classifier": 0.5}
    # hard term computed here: + mu * CE(s, y=0) = 0.5 ln 2; detector's own term then scaled by 0
    d2 = build_distiller([{"name": "chen_cls", "head": "roi", "hard_from_detector": False}])
    out2 = d2({"roi_class_logits": s, "roi_labels": torch.tensor([0])}, tt)
    assert out2["distill_chen_cls_roi"].item() == pytest.approx(0.5 * 1.375 * LN2 + 0.5 * LN2, rel=1e-6)
    assert d2.detector_loss_scales() == {"loss_classifier": 0.0}
    with pytest.raises(ConfigError, match="roi_labels"):
        d2({"roi_class_logits": s}, tt)


def test_rpn_classification_binary_on_sampled_anchors():
    d = build_distiller([{"name": "chen_cls", "head": "rpn", "mu": 0.25}])
    s = torch.zeros(1, 1, 1, 3)
    t = torch.tensor([[[[LN3, -7.0, 4.0]]]])
    labels = torch.tensor([[[[1, -1, -1]]]])  # only anchor 0 is in the sampled mini-batch
    out = d({"objectness": [s], "rpn_labels": [labels]}, TeacherTargets(objectness=[t]))
    assert out["distill_chen_cls_rpn"].item() == pytest.approx(0.75 * 1.125 * LN2, rel=1e-6)
    assert d.detector_loss_scales() == {"loss_objectness": 0.25}


def test_dense_classification_binary_per_class():
    d = build_distiller([{"name": "chen_cls", "head": "dense"}])
    s = torch.zeros(1, 1, 3)
    t = torch.tensor([[[30.0, LN3, LN3]]])  # column 0 (background index) is skipped
    out = d({"cls_logits": [s]}, TeacherTargets(cls_logits=[t]))
    assert out["distill_chen_cls_dense"].item() == pytest.approx(0.5 * 2 * 1.125 * LN2, rel=1e-6)
    with pytest.raises(ConfigError, match="hard_from_detector"):
        build_distiller([{"name": "chen_cls", "head": "dense", "hard_from_detector": False}])


def test_bounded_regression_gate_and_gradient():
    s = torch.tensor([[1.0, 0, 0, 0], [0.1, 0, 0, 0]], requires_grad=True)
    t = torch.tensor([[0.5, 0, 0, 0], [0.5, 0, 0, 0]])
    y = torch.zeros(2, 4)
    # d_S = [1, 0.01], d_T = [0.25, 0.25]; gate open only where d_S + m > d_T
    per, gate = bounded_regression(s, t, y, margin=0.0)
    assert gate.tolist() == [True, False]
    assert per.tolist() == pytest.approx([1.0, 0.0])
    per.sum().backward()
    assert torch.allclose(s.grad, torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0]]))  # pulls to y, not to R_T
    # the student beats the teacher by 0.24: a margin of 0.2 keeps the gate shut, 0.3 opens it
    assert bounded_regression(s, t, y, margin=0.2)[1].tolist() == [True, False]
    per3, gate3 = bounded_regression(s, t, y, margin=0.3)
    assert gate3.tolist() == [True, True]
    assert per3.tolist() == pytest.approx([1.0, 0.01])


def test_roi_bounded_regression_picks_class_columns():
    # R = 3 RoIs, K = 3; labels [2, 0, 1]; class-specific deltas [R, 12]
    s = torch.zeros(3, 12)
    t = torch.zeros(3, 12)
    s[0, 8:12] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # RoI 0, class 2: d_S = 2
    t[0, 8:12] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # d_T = 0.25 -> gate open
    s[2, 4:8] = torch.tensor([0.0, 0.0, 0.1, 0.0])  # RoI 2, class 1: d_S = 0.01
    t[2, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # d_T = 9 -> gate shut
    s[1, :] = 100.0  # negative RoI: ignored
    s.requires_grad_(True)
    student = {
        "roi_class_logits": torch.zeros(3, 3),
        "roi_box_regression": s,
        "roi_labels": torch.tensor([2, 0, 1]),
        "roi_reg_targets": torch.zeros(3, 4),
    }
    tt = TeacherTargets(roi_class_logits=torch.zeros(3, 3), roi_box_regression=t)
    d = build_distiller([{"name": "chen_reg", "head": "roi"}])
    out = d(student, tt)["distill_chen_reg_roi"]
    assert out.item() == pytest.approx(0.5 * 2.0 / 3)  # nu * sum / sampled RoIs
    out.backward()
    expected = torch.zeros(3, 12)
    expected[0, 8:12] = 0.5 / 3 * 2 * torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(s.grad, expected)
    d_pos = build_distiller([{"name": "chen_reg", "head": "roi", "normalizer": "positives", "nu": 1.0}])
    assert d_pos(student, tt)["distill_chen_reg_roi"].item() == pytest.approx(2.0 / 2)


def test_rpn_bounded_regression_layout():
    # A = 2 anchors, H = 1, W = 2; the positive is anchor 1 at (0, 1): channels 4..7 at w = 1
    s = torch.zeros(1, 8, 1, 2)
    t = torch.zeros(1, 8, 1, 2)
    y = torch.zeros(1, 8, 1, 2)
    s[0, 4:8, 0, 1] = torch.tensor([1.0, 2.0, 0.0, 0.0])  # d_S = 1 + 4 = 5 (y = 0)
    t[0, 4:8, 0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # d_T = 1 -> open
    s[0, 0:4, 0, 1] = 7.0  # anchor 0 is negative: ignored
    labels = torch.tensor([[[[0, -1]], [[-1, 1]]]])  # [N, A, H, W]; 2 sampled anchors
    student = {"rpn_deltas": [s], "rpn_reg_targets": [y], "rpn_labels": [labels]}
    d = build_distiller([{"name": "chen_reg", "head": "rpn", "nu": 1.0}])
    out = d(student, TeacherTargets(rpn_deltas=[t]))
    assert out["distill_chen_reg_rpn"].item() == pytest.approx(5.0 / 2)


def test_dense_bounded_regression_no_positives_is_zero():
    d = build_distiller([{"name": "chen_reg", "head": "dense"}])
    s = torch.randn(1, 3, 4, requires_grad=True)
    student = {"bbox_regression": [s], "dense_reg_targets": [torch.zeros(1, 3, 4)], "dense_labels": [torch.tensor([[0, 0, -1]])]}
    out = d(student, TeacherTargets(bbox_regression=[torch.zeros(1, 3, 4)]))["distill_chen_reg_dense"]
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.all(s.grad == 0)
    # one positive: normalised by positives (1)
    student["dense_labels"] = [torch.tensor([[3, 0, -1]])]
    with torch.no_grad():
        s.zero_()
        s[0, 0, 0] = 2.0
    out = d(student, TeacherTargets(bbox_regression=[torch.zeros(1, 3, 4)]))["distill_chen_reg_dense"]
    # d_S = 4 > d_T = 0 -> 0.5 * 4 / 1
    assert out.item() == pytest.approx(2.0)


def test_hint_l2_l1_and_gradients_reach_adapter():
    d = build_distiller([{"name": "chen_hint", "levels": ["p3"]}], {"p3": 2}, {"p3": 2})
    set_identity_(d.terms["chen_hint"].adapters["p3"])
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # 1x2x1x2
    s = (t + torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1)).requires_grad_(True)
    tt = TeacherTargets(features={"p3": t})
    out = d({"features": {"p3": s}}, tt)["distill_chen_hint"]
    # mean((s - t)^2) = (1 + 1 + 4 + 4) / 4 = 2.5, times gamma 0.5
    assert out.item() == pytest.approx(0.5 * 2.5)
    out.backward()
    assert s.grad is not None and d.terms["chen_hint"].adapters["p3"].weight.grad is not None
    assert d.terms["chen_hint"].adapters["p3"].weight.grad.abs().sum() > 0
    d1 = build_distiller([{"name": "chen_hint", "norm": "l1", "gamma": 1.0, "adapter_init": "identity"}], {"p3": 2}, {"p3": 2})
    assert d1({"features": {"p3": s}}, tt)["distill_chen_hint"].item() == pytest.approx((1 + 1 + 2 + 2) / 4)
    assert d1({"features": {"p3": t.clone()}}, tt)["distill_chen_hint"].item() == 0.0
    d2 = build_distiller([{"name": "chen_hint", "gamma": 1.0, "reduction": "sum_per_image", "adapter_init": "identity"}], {"p3": 2}, {"p3": 2})
    assert d2({"features": {"p3": s}}, tt)["distill_chen_hint"].item() == pytest.approx(10.0)


def test_soft_ce_gradient_matches_formula():
    # d/dz_S of -sum w_c P_T log P_S  =  P_S * sum_c(w_c P_T^c) - w * P_T  (softmax Jacobian)
    s = torch.tensor([[0.3, -0.2, 0.5]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0]])
    w = class_weights(3, 1.5)
    weighted_soft_ce(s, t, w).backward()
    ps, pt = F.softmax(s.detach(), -1), F.softmax(t, -1)
    expected = ps * (w * pt).sum() - w * pt
    assert torch.allclose(s.grad, expected, atol=1e-6)
