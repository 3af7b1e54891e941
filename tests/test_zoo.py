"""The detector zoo: every family builds and records features and head outputs of the right shapes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from curriculum.errors import ModelError
from teachers.zoo import BACKBONES, HEADS, build_detector, count_gflops, list_detectors, load_detector

K = 7  # 6 classes + background
IMAGES = [torch.rand(3, 128, 128) for _ in range(2)]
TARGETS = [
    {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 70.0, 90.0, 100.0]]), "labels": torch.tensor([1, 3])},
    {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # an image without objects
]
BUILTIN = [n for n in list_detectors(builtin_only=True)]


def _check_one_stage(det, out, n=2):
    strides = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert list(out.features) == list(strides)
    c = det.backbone.out_channels
    for name, s in strides.items():
        assert out.features[name].shape == (n, c, 128 // s, 128 // s)
    per_loc = out.head["anchors_per_level"][0] // 256
    assert per_loc == (9 if det.config.head == "retinanet" else 1)
    for lvl, (name, s) in enumerate(strides.items()):
        hwa = (128 // s) ** 2 * per_loc
        assert out.head["cls_logits"][lvl].shape == (n, hwa, K)
        assert out.head["bbox_regression"][lvl].shape == (n, hwa, 4)
    assert out.head["anchors"][0].shape == (sum(out.head["anchors_per_level"]), 4)
    if det.config.head == "fcos":
        assert out.head["bbox_ctrness"][0].shape == (n, 256, 1)


def _check_two_stage(det, out, n=2):
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert list(out.features) == list(strides)
    for lvl, (name, s) in enumerate(strides.items()):
        side = 128 // s
        assert out.features[name].shape[-2:] == (side, side)
        assert out.head["objectness"][lvl].shape == (n, 3, side, side)
        assert out.head["rpn_deltas"][lvl].shape == (n, 12, side, side)
    r = sum(len(b) for b in out.head["roi_boxes"])
    assert out.head["class_logits"].shape == (r, K)
    assert out.head["box_regression"].shape == (r, 4 * K)
    assert len(out.head["proposals"]) == n


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_members_train_and_record(name):
    torch.manual_seed(0)
    det = build_detector(name, K)
    det.train()
    out = det(IMAGES, TARGETS, want=("losses", "features", "head"))
    assert out.losses and all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.backbone.body.parameters())
    (_check_one_stage if det.kind == "one_stage" else _check_two_stage)(det, out)
    det.eval()
    dets = det.predict(IMAGES)
    assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)


@pytest.mark.parametrize("backbone", [b for b, s in BACKBONES.items() if not s.builtin])
def test_full_size_backbones_build_and_run(backbone):
    """Every full-size family (ResNet-18/34/50/101, MobileNetV3, ConvNeXt, Swin T/S/B) at 128 px."""
    det = build_detector(f"retinanet_{backbone}", K).eval()
    with torch.no_grad():
        out = det(IMAGES[:1], want=("features", "head", "detections"))
    _check_one_stage(det, out, n=1)


def test_swin_features_are_nchw():
    det = build_detector("retinanet_swin_mini", K)
    assert det.backbone.nhwc  # timm gives NHWC maps for Swin; the backbone permutes them once
    maps = det.backbone.body(torch.rand(1, 3, 128, 128))
    assert maps[1].shape[-1] == det.backbone.body.feature_info.channels()[1]  # channels last from timm
    feats = det.backbone(torch.rand(1, 3, 128, 128))
    assert feats["p3"].shape == (1, det.backbone.out_channels, 16, 16)


def test_teacher_scores_given_boxes():
    """A two-stage teacher scores the student's proposals on its own features (proposal sharing)."""
    torch.manual_seed(0)
    teacher = build_detector("fasterrcnn_resnet_mini", K).eval()
    with torch.no_grad():
        out = teacher(IMAGES, want=("features",))
        boxes = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 30.0, 100.0, 120.0]]), torch.tensor([[5.0, 5.0, 9.0, 9.0]])]
        logits, deltas = teacher.score_boxes(out.features, boxes, out.image_sizes)
        assert logits.shape == (3, K) and deltas.shape == (3, 4 * K)
        # The same boxes scored one image at a time give the same answer: rows belong to their boxes.
        single, _ = teacher.score_boxes({k: v[1:] for k, v in out.features.items()}, boxes[1:], out.image_sizes[1:])
    torch.testing.assert_close(logits[2:], single)
    with pytest.raises(ModelError, match="one-stage"):
        build_detector("retinanet_resnet_mini", K).score_boxes(out.features, boxes, out.image_sizes)


def test_checkpoint_round_trip_and_wrong_model(tmp_path):
    torch.manual_seed(0)
    det = build_detector("fcos_resnet_mini", K).eval()
    path = tmp_path / "model.pt"
    torch.save(det.checkpoint(), path)
    again = load_detector(path).eval()
    with torch.no_grad():
        a = det(IMAGES, want=("head",)).head["cls_logits"][0]
        b = again(IMAGES, want=("head",)).head["cls_logits"][0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    same = build_detector("fcos_resnet_mini", K, weights=str(path)).eval()
    assert all(torch.equal(p, q) for p, q in zip(same.state_dict().values(), det.state_dict().values()))
    with pytest.raises(ModelError, match="holds fcos_resnet_mini"):
        build_detector("retinanet_resnet_mini", K, weights=str(path))
    with pytest.raises(ModelError, match="holds fcos_resnet_mini with 7 classes"):
        build_detector("fcos_resnet_mini", 5, weights=str(path))
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not be read"):
        load_detector(bogus)
    with pytest.raises(ModelError, match="does not exist"):
        load_detector(tmp_path / "missing.pt")


def test_checkpoint_with_code_needs_opt_in(tmp_path):
    """weights_only=True refuses pickled objects unless the user opts in with trust=True."""
    det = build_detector("retinanet_mobilenetv3_micro", K)
    ckpt = det.checkpoint(extra={"note": argparse.Namespace(x=1)})  # an arbitrary object: refused by weights_only
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(ModelError, match="weights_only=True"):
        load_detector(tmp_path / "m.pt")
    assert load_detector(tmp_path / "m.pt", trust=True).config.name == det.config.name


def test_bad_names_and_options():
    with pytest.raises(ModelError, match="unknown detector 'retinanet_resnet9'"):
        build_detector("retinanet_resnet9", K)
    with pytest.raises(ModelError, match="unknown detector"):
        build_detector("yolo_resnet18", K)
    with pytest.raises(ModelError, match="unknown detector option"):
        build_detector("retinanet_resnet_mini", K, fpn_width=3)
    with pytest.raises(ModelError, match="at least 2"):
        build_detector("retinanet_resnet_mini", 1)
    assert set(HEADS) == {"retinanet", "fcos", "fasterrcnn"}


def test_pretrained_weights_offline_fail_clearly():
    """The pretrained path exists; without a network it fails with a message saying what to do."""
    code = (
        "from teachers.zoo import build_detector\n"
        "from curriculum.errors import ModelError\n"
        "try:\n    build_detector('retinanet_resnet18', 7, weights='timm')\n"
        "except ModelError as e:\n    print('MODELERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "MODELERROR could not fetch timm pretrained weights for 'resnet18'" in out.stdout, out.stderr[-2000:]
    assert "checkpoint path" in out.stdout


def test_gflops_grow_with_capacity():
    small = count_gflops(build_detector("retinanet_mobilenetv3_micro", K))
    big = count_gflops(build_detector("retinanet_resnet18_half", K))
    assert 0 < small < big
