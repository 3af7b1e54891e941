"""build_distiller / Distiller: config errors, mixing, weights, decay, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curriculum.errors import ConfigError, DataError, ModelError
from helpers import identity_generation
from trainers.distill import LOSSES, TeacherTargets, build_distiller, decay_factor
from trainers.distill.common import set_identity_

CH = {"p3": 2, "p4": 2}


def _feats(seed, n=2, c=2, sizes=((4, 4), (2, 2)), requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lvl, (h, w) in zip(("p3", "p4"), sizes):
        out[lvl] = torch.randn(n, c, h, w, generator=g).requires_grad_(requires_grad)
    return out


# ---- configuration errors ----------------------------------------------------------------------


def test_unknown_name_lists_allowed():
    with pytest.raises(ConfigError, match=r"entry #1: loss name 'kd' is unknown; use one of \[.*'mgd'"):
        build_distiller([{"name": "fitnet"}, {"name": "kd"}], CH, CH)


def test_unknown_option_names_entry_and_allowed():
    with pytest.raises(ConfigError, match=r"entry #0 \(mgd\): unknown option\(s\) \['lambda'\]; allowed: .*lambda_mask"):
        build_distiller([{"name": "mgd", "lambda": 0.5}], CH, CH)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"name": "mgd", "preset": "yolo"}, r"'preset' = 'yolo'.*\['retinanet', 'mask_rcnn'\]"),
        ({"name": "mgd", "lambda_mask": 1.0}, "lambda_mask"),
        ({"name": "chen_cls", "head": "fpn"}, r"'head' = 'fpn'.*\['roi', 'rpn', 'dense'\]"),
        ({"name": "chen_cls", "mu": 2}, "'mu' = 2 is out of range"),
        ({"name": "chen_hint", "norm": "l3"}, r"\['l2', 'l1'\]"),
        ({"name": "zhang_feature", "mask_mode": "x"}, "mask_mode"),
        ({"name": "fitnet", "levels": ["p9"]}, "level 'p9'"),
        ({"name": "fitnet", "levels": "p3"}, "non-empty list"),
        ({"name": "fitnet", "on_size_mismatch": "crop"}, r"\['resize', 'error'\]"),
        ({"name": "fitnet", "weight": -1}, "'weight' must be a finite number >= 0"),
        ({"name": "fitnet", "decay": "yes"}, "'decay' must be true or false"),
        ({"name": "tar_cls", "gate": "always"}, "teacher_better"),
        ({"name": "tar_feature", "levels": ["p3"], "strides": {"p3": "8"}}, "strides"),
        ({"name": "zhang_nonlocal", "nl_downsample": {"p3": 0}}, "nl_downsample"),
    ],
)
def test_bad_values_raise_config_error(entry, match):
    with pytest.raises(ConfigError, match=match):
        build_distiller([entry], CH, CH)


def test_structural_config_errors():
    with pytest.raises(ConfigError, match="must be a list"):
        build_distiller({"name": "mgd"}, CH, CH)
    with pytest.raises(ConfigError, match="already used"):
        build_distiller([{"name": "fitnet"}, {"name": "fitnet"}], CH, CH)
    build_distiller([{"name": "fitnet"}, {"name": "fitnet", "key": "fitnet2"}], CH, CH)
    with pytest.raises(ConfigError, match="needs student_channels"):
        build_distiller([{"name": "mgd"}])
    with pytest.raises(ConfigError, match="no name in common"):
        build_distiller([{"name": "mgd"}], {"p3": 2}, {"p2": 2})
    with pytest.raises(ConfigError, match="adapter_init='identity' needs equal"):
        build_distiller([{"name": "fitnet", "adapter_init": "identity"}], {"p3": 2}, {"p3": 3})
    with pytest.raises(ConfigError, match="stride"):
        build_distiller([{"name": "tar_feature"}], {"c5": 2}, {"c5": 2})


def test_every_registered_loss_builds_with_defaults():
    for name in LOSSES:
        d = build_distiller([{"name": name}], CH, CH)
        assert list(d.terms) == [name]


# ---- mixing, weights, decay --------------------------------------------------------------------


def test_mixed_terms_weights_and_decay():
    cfg = [
        {"name": "fitnet", "weight": 2.0, "adapter_init": "identity"},
        {"name": "chen_hint", "levels": ["p4"], "gamma": 1.0, "adapter_init": "identity", "decay": False},
        {"name": "hinton_kd", "head": "roi", "weight": 0.5},
    ]
    d = build_distiller(cfg, CH, CH)
    t = _feats(0)
    s = _feats(1, requires_grad=True)
    s_roi = torch.randn(3, 4, requires_grad=True)
    t_roi = torch.randn(3, 4)
    tt = TeacherTargets(features=t, roi_class_logits=t_roi, roi_box_regression=torch.zeros(3, 16))
    student = {"features": s, "roi_class_logits": s_roi}
    out = d(student, tt)
    assert set(out) == {"distill_fitnet", "distill_chen_hint", "distill_hinton_kd_roi"}
    fit = sum(((s[l] - t[l]) ** 2).mean() for l in ("p3", "p4"))
    hint = ((s["p4"] - t["p4"]) ** 2).mean()
    kd = F.kl_div(F.log_softmax(s_roi, -1), F.softmax(t_roi, -1), reduction="batchmean")
    assert out["distill_fitnet"].item() == pytest.approx(2.0 * fit.item(), rel=1e-5)
    assert out["distill_chen_hint"].item() == pytest.approx(hint.item(), rel=1e-5)
    assert out["distill_hinton_kd_roi"].item() == pytest.approx(0.5 * kd.item(), rel=1e-5)
    r = decay_factor("linear", 6, 10)
    out_d = d(student, tt, decay=r)
    assert out_d["distill_fitnet"].item() == pytest.approx(0.5 * out["distill_fitnet"].item(), rel=1e-6)
    assert out_d["distill_hinton_kd_roi"].item() == pytest.approx(0.5 * out["distill_hinton_kd_roi"].item(), rel=1e-6)
    assert out_d["distill_chen_hint"].item() == pytest.approx(out["distill_chen_hint"].item())  # decay: false
    with pytest.raises(ConfigError, match="decay factor"):
        d(student, tt, decay=float("nan"))


def test_gradients_reach_student_and_adapters_never_teacher():
    cfg = [
        {"name": "mgd"},
        {"name": "chen_hint"},
        {"name": "zhang_feature"},
        {"name": "zhang_attention"},
        {"name": "zhang_nonlocal"},
        {"name": "tar_feature"},
        {"name": "fitnet"},
    ]
    d = build_distiller(cfg, CH, {"p3": 3, "p4": 3})
    t = {k: v for k, v in _feats(0, c=3).items()}
    for v in t.values():
        v.requires_grad_(True)  # e.g. an inline teacher's output: must be cut off by TeacherTargets
    s = _feats(1, requires_grad=True)
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 12.0]]), "labels": torch.tensor([1])}, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    tt = TeacherTargets(features=t)
    out = d({"features": s}, tt, gt, generator=torch.Generator().manual_seed(0))
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    for v in s.values():
        assert v.grad is not None and v.grad.abs().sum() > 0
    for v in t.values():
        assert v.grad is None
    for v in tt.features.values():
        assert not v.requires_grad
    no_grad = [n for n, p in d.named_parameters() if p.grad is None]
    assert no_grad == []
    adapters = [n for n, _ in d.named_parameters() if ".adapters." in n]
    assert adapters and all(d.get_parameter(n).grad.abs().sum() > 0 for n in adapters if n.endswith("weight"))


def test_zero_when_student_equals_teacher_with_identity_adapters():
    cfg = [
        {"name": n, "adapter_init": "identity"}
        for n in ("fitnet", "chen_hint", "zhang_feature", "zhang_attention", "zhang_nonlocal", "tar_feature")
    ] + [{"name": "mgd", "lambda_mask": 0.0}]
    d = identity_generation(build_distiller(cfg, CH, CH))
    t = {k: v.abs() for k, v in _feats(0).items()}  # non-negative: MGD's identity G (with ReLU) is exact
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 12.0]]), "labels": torch.tensor([1])}] * 2
    out = d({"features": {k: v.clone() for k, v in t.items()}}, TeacherTargets(features=t), gt)
    for k, v in out.items():
        assert v.item() == pytest.approx(0.0, abs=1e-6), k


def test_state_dict_round_trip_and_required_fields():
    cfg = [{"name": "zhang_nonlocal"}, {"name": "chen_reg", "head": "roi"}, {"name": "tar_cls"}]
    d1 = build_distiller(cfg, CH, CH)
    d2 = build_distiller(cfg, CH, CH)
    d2.load_state_dict(d1.state_dict())
    for (n1, p1), (n2, p2) in zip(d1.named_parameters(), d2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    student = set().union(*(t.required_student() for t in d1.terms.values()))
    assert "features" in student and "roi_reg_targets" in student
    assert {"features", "roi_box_regression", "roi_scorer"} <= d1.required_teacher_targets()


# ---- edge cases --------------------------------------------------------------------------------


def test_single_level():
    d = identity_generation(build_distiller([{"name": "mgd", "lambda_mask": 0.0, "alpha": 1.0}], {"p5": 2}, {"p5": 2}))
    t = torch.ones(1, 2, 1, 1)
    s = torch.full((1, 2, 1, 1), 3.0, requires_grad=True)
    out = d({"features": {"p5": s}}, TeacherTargets(features={"p5": t}))["distill_mgd"]
    assert out.item() == pytest.approx(8.0)  # (3 - 1)^2 * 2 channels / N = 1


def test_size_mismatch_resize_matches_bilinear_and_error_mode():
    d = build_distiller([{"name": "fitnet", "levels": ["p3"], "adapter_init": "identity"}], CH, CH)
    t = torch.randn(1, 2, 4, 4)
    s = torch.randn(1, 2, 2, 2, requires_grad=True)
    out = d({"features": {"p3": s}}, TeacherTargets(features={"p3": t}))["distill_fitnet"]
    up = F.interpolate(s.detach(), size=(4, 4), mode="bilinear", align_corners=False)
    assert out.item() == pytest.approx(((up - t) ** 2).mean().item(), rel=1e-6)
    out.backward()
    assert s.grad.abs().sum() > 0
    d_err = build_distiller([{"name": "fitnet", "levels": ["p3"], "on_size_mismatch": "error"}], CH, CH)
    with pytest.raises(DataError, match=r"student map is \(2, 2\).*teacher's is \(4, 4\).*on_size_mismatch='resize'"):
        d_err({"features": {"p3": s}}, TeacherTargets(features={"p3": t}))


def test_channel_count_that_differs_from_the_build_is_a_clear_error():
    d = build_distiller([{"name": "fitnet", "levels": ["p3"]}], {"p3": 2}, {"p3": 4})
    with pytest.raises(ModelError, match="3 student / 4 teacher channels.*built for 2 / 4"):
        d({"features": {"p3": torch.zeros(1, 3, 2, 2)}}, TeacherTargets(features={"p3": torch.zeros(1, 4, 2, 2)}))
    with pytest.raises(DataError, match="2 images but the teacher targets have 1"):
        d({"features": {"p3": torch.zeros(2, 2, 2, 2)}}, TeacherTargets(features={"p3": torch.zeros(1, 4, 2, 2)}))


def test_nonfinite_teacher_names_image_from_gt_ids():
    d = build_distiller([{"name": "fitnet"}], CH, CH)
    t = _feats(0)
    t["p4"][1, 0, 0, 0] = float("inf")
    gt = [{"boxes": torch.zeros(0, 4), "image_id": 100}, {"boxes": torch.zeros(0, 4), "image_id": 200}]
    with pytest.raises(DataError, match=r"features\[p4\].*image_id 200"):
        d({"features": _feats(1)}, TeacherTargets(features=t), gt)


def test_missing_inputs_name_the_key():
    d = build_distiller([{"name": "fitnet", "levels": ["p4"]}], CH, CH)
    with pytest.raises(ConfigError, match="teacher target 'features'"):
        d({"features": _feats(1)}, TeacherTargets())
    with pytest.raises(ConfigError, match="student output 'features'"):
        d({}, TeacherTargets(features=_feats(0)))
    with pytest.raises(ConfigError, match="teacher features have no level 'p4'"):
        d({"features": _feats(1)}, TeacherTargets(features={"p3": _feats(0)["p3"]}))
    d_roi = build_distiller([{"name": "chen_cls", "head": "roi"}])
    with pytest.raises(ConfigError, match="roi_scorer"):
        d_roi({"roi_class_logits": torch.zeros(2, 3)}, TeacherTargets())
    with pytest.raises(DataError, match="3 rows but the student scored 2"):
        d_roi(
            {"roi_class_logits": torch.zeros(2, 3)},
            TeacherTargets(roi_class_logits=torch.zeros(3, 3), roi_box_regression=torch.zeros(3, 12)),
        )
    d_dense = build_distiller([{"name": "hinton_kd", "head": "dense"}])
    with pytest.raises(DataError, match="same input size, anchors and classes"):
        d_dense({"cls_logits": [torch.zeros(1, 4, 3)]}, TeacherTargets(cls_logits=[torch.zeros(1, 6, 3)]))


def test_set_identity_helper():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    set_identity_(conv)
    x = torch.randn(1, 3, 5, 5)
    assert torch.allclose(conv(x), x)
    with pytest.raises(ModelError):
        set_identity_(torch.nn.Conv2d(2, 3, 1))
