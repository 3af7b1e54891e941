"""Hinton KD and FitNet hint against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.distill import TeacherTargets, build_distiller
from trainers.distill.baselines import binary_kd, softmax_kd
from trainers.distill.common import set_identity_

LN3 = math.log(3.0)
# KL([0.75, 0.25] || [0.5, 0.5]) = 0.75 ln 1.5 + 0.25 ln 0.5
KL_75_50 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_softmax_kd_hand_values():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[LN3, 0.0]])  # softmax -> [0.75, 0.25]
    assert softmax_kd(s, t, 1.0).item() == pytest.approx(KL_75_50, rel=1e-6)
    # T = 2: P_T = softmax([ln3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1); P_S uniform; times T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert softmax_kd(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # mean over rows: a second, matching row halves it
    s2 = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t2 = torch.tensor([[LN3, 0.0], [1.0, 2.0]])
    assert softmax_kd(s2, t2).item() == pytest.approx(KL_75_50 / 2, rel=1e-6)
    assert softmax_kd(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_binary_kd_hand_values():
    # p_T = sigmoid(ln 3) = 0.75, p_S = 0.5: same Bernoulli KL as above
    s = torch.tensor([[0.0, 2.0]])
    t = torch.tensor([[LN3, 2.0]])
    assert binary_kd(s, t).item() == pytest.approx(KL_75_50, rel=1e-6)
    assert binary_kd(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_hinton_roi_through_distiller_and_grad():
    d = build_distiller([{"name": "hinton_kd", "head": "roi", "weight": 2.0}])
    s = torch.tensor([[0.0, 0.0], [5.0, 5.0]], requires_grad=True)
    t_raw = torch.tensor([[LN3, 0.0], [0.0, 0.0]], requires_grad=True)
    tt = TeacherTargets(roi_class_logits=t_raw, roi_box_regression=torch.zeros(2, 8))
    out = d({"roi_class_logits": s}, tt)
    assert list(out) == ["distill_hinton_kd_roi"]
    assert out["distill_hinton_kd_roi"].item() == pytest.approx(2.0 * KL_75_50 / 2, rel=1e-6)
    out["distill_hinton_kd_roi"].backward()
    # d KL / d z_S = (P_S - P_T) / rows, times weight 2
    assert s.grad[0].tolist() == pytest.approx([2 * (0.5 - 0.75) / 2, 2 * (0.5 - 0.25) / 2], rel=1e-5)
    assert t_raw.grad is None


def test_hinton_dense_binary_skips_background_column_and_ignored_anchors():
    d = build_distiller([{"name": "hinton_kd", "head": "dense"}])
    # one level, N=1, 2 anchors, K=3 (column 0 = unused background)
    s = torch.zeros(1, 2, 3)
    t = torch.tensor([[[50.0, LN3, 0.0], [9.0, 9.0, 9.0]]])
    out = d({"cls_logits": [s], "dense_labels": [torch.tensor([[0, -1]])]}, TeacherTargets(cls_logits=[t]))
    # anchor 0 only (anchor 1 ignored); column 0 skipped; column 2 matches -> one Bernoulli KL
    assert out["distill_hinton_kd_dense"].item() == pytest.approx(KL_75_50, rel=1e-6)
    # without labels both anchors count: anchor 1 gives 2 * KL(sigmoid 9 || 0.5)
    p9 = 1 / (1 + math.exp(-9))
    kl9 = p9 * math.log(p9 / 0.5) + (1 - p9) * math.log((1 - p9) / 0.5)
    out = d({"cls_logits": [s]}, TeacherTargets(cls_logits=[t]))
    assert out["distill_hinton_kd_dense"].item() == pytest.approx((KL_75_50 + 2 * kl9) / 2, rel=1e-5)


def test_hinton_rpn_single_logit():
    d = build_distiller([{"name": "hinton_kd", "head": "rpn"}])
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([[[[LN3, LN3]]]])
    out = d({"objectness": [s]}, TeacherTargets(objectness=[t]))
    assert out["distill_hinton_kd_rpn"].item() == pytest.approx(KL_75_50, rel=1e-6)


def test_fitnet_hand_value_and_identity_zero():
    d = build_distiller(
        [{"name": "fitnet", "levels": ["p3", "p4"]}], {"p3": 2, "p4": 2}, {"p3": 2, "p4": 2}
    )
    for conv in d.terms["fitnet"].adapters.values():
        set_identity_(conv)
    t3 = torch.arange(8.0).reshape(1, 2, 2, 2)
    t4 = torch.ones(1, 2, 1, 1)
    tt = TeacherTargets(features={"p3": t3, "p4": t4})
    assert d({"features": {"p3": t3.clone(), "p4": t4.clone()}}, tt)["distill_fitnet"].item() == 0.0
    # student = teacher + 1 at p3, = teacher - 3 at p4: mean squares 1 and 9
    out = d({"features": {"p3": t3 + 1, "p4": t4 - 3}}, tt)
    assert out["distill_fitnet"].item() == pytest.approx(1.0 + 9.0)
    # adapter weight 2 * I, bias (1, -1): loop reference
    conv = d.terms["fitnet"].adapters["p3"]
    with torch.no_grad():
        conv.weight.copy_(2 * torch.eye(2).reshape(2, 2, 1, 1))
        conv.bias.copy_(torch.tensor([1.0, -1.0]))
    s3 = torch.full((1, 2, 2, 2), 0.5)
    ref = 0.0
    for c in range(2):
        for i in range(2):
            for j in range(2):
                a = 2 * 0.5 + (1.0 if c == 0 else -1.0)
                ref += (a - t3[0, c, i, j].item()) ** 2
    out = d({"features": {"p3": s3, "p4": t4}}, tt)
    assert out["distill_fitnet"].item() == pytest.approx(ref / 8)
