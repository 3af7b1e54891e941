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
for _t in TARGETS:  # box masks: what a Mask R-CNN member needs to train (the others ignore them)
    _t["masks"] = torch.zeros((len(_t["boxes"]), 128, 128), dtype=torch.uint8)
    for _m, (_x1, _y1, _x2, _y2) in zip(_t["masks"], _t["boxes"].int().tolist()):
        _m[_y1:_y2, _x1:_x2] = 1
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


def test_swin_stages_are_layer_normalised_before_the_fpn():
    """Each Swin output stage gets its own LayerNorm (as its authors' detection backbones do) before the FPN."""
    det = build_detector("fcos_swin_mini", K).eval()
    bb = det.backbone
    with torch.no_grad():
        for norm in bb.out_norms:  # a non-trivial affine part, so the test sees it applied
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
        x = torch.rand(1, 3, 128, 128)
        maps = bb.body(x)
        seen = {}
        hook = bb.fpn.register_forward_pre_hook(lambda m, args: seen.update(args[0]))
        bb(x)
        hook.remove()
    for k, (name, i) in enumerate(zip(bb.level_names, bb.indices)):
        m = maps[i]
        mu, var = m.mean(-1, keepdim=True), m.var(-1, unbiased=False, keepdim=True)
        ref = (m - mu) / torch.sqrt(var + 1e-5) * bb.out_norms[k].weight + bb.out_norms[k].bias
        torch.testing.assert_close(seen[name], ref.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
    assert build_detector("fcos_resnet_mini", K).backbone.out_norms is None  # CNN maps go to the FPN as they are


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
    assert set(HEADS) == {"retinanet", "fcos", "fasterrcnn", "maskrcnn"}


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


# ------------------------------------------------------------------------------- matching recorded for distillation


def _cat_levels(levels, n):
    return torch.cat([x.reshape(n, -1, *x.shape[2:]) for x in levels], dim=1)


def test_retinanet_records_the_matching_of_its_loss():
    """dense_labels / dense_reg_targets are what RetinaNet's own loss used: same positives, same loss values."""
    from torchvision.ops import box_iou, sigmoid_focal_loss

    torch.manual_seed(0)
    det = build_detector("retinanet_mobilenetv3_micro", K).train()
    out = det(IMAGES, TARGETS, want=("losses", "head"))
    labels, reg_t = _cat_levels(out.head["dense_labels"], 2), _cat_levels(out.head["dense_reg_targets"], 2)
    cls, reg = _cat_levels(out.head["cls_logits"], 2), _cat_levels(out.head["bbox_regression"], 2)
    for lvl, n in enumerate(out.head["anchors_per_level"]):
        assert out.head["dense_labels"][lvl].shape == (2, n) and out.head["dense_reg_targets"][lvl].shape == (2, n, 4)
    # The positives and ignored anchors of the detector's IoU matcher, recomputed here.
    matched = det.model.proposal_matcher(box_iou(TARGETS[0]["boxes"], out.head["anchors"][0]))
    assert int((labels[0] > 0).sum()) == int((matched >= 0).sum()) > 0
    assert int((labels[0] == -1).sum()) == int((matched == -2).sum())
    assert set(labels[0][labels[0] > 0].tolist()) <= {1, 3}
    assert (labels[1] == 0).all()  # the image without objects: all background, nothing ignored
    assert torch.isfinite(reg_t).all() and (reg_t[labels <= 0] == 0).all()
    cls_loss, box_loss = [], []
    for i in range(2):
        pos, valid = labels[i] > 0, labels[i] >= 0
        onehot = torch.zeros_like(cls[i])
        onehot[pos, labels[i][pos]] = 1.0
        n_pos = max(1, int(pos.sum()))
        cls_loss.append(sigmoid_focal_loss(cls[i][valid], onehot[valid], reduction="sum") / n_pos)
        box_loss.append(torch.nn.functional.l1_loss(reg[i][pos], reg_t[i][pos], reduction="sum") / n_pos)
    torch.testing.assert_close(sum(cls_loss) / 2, out.losses["classification"])
    torch.testing.assert_close(sum(box_loss) / 2, out.losses["bbox_regression"])


def test_fcos_records_its_center_sampling():
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    det = build_detector("fcos_resnet_mini", K).train()
    out = det(IMAGES, TARGETS, want=("losses", "head"))
    labels, reg_t = _cat_levels(out.head["dense_labels"], 2), _cat_levels(out.head["dense_reg_targets"], 2)
    cls = _cat_levels(out.head["cls_logits"], 2)
    assert (labels >= 0).all()  # FCOS ignores nothing
    pos = labels > 0
    assert int(pos[0].sum()) > 0 and int(pos[1].sum()) == 0
    onehot = torch.zeros_like(cls)
    onehot[pos, labels[pos]] = 1.0
    expected = sigmoid_focal_loss(cls, onehot, reduction="sum") / max(1, int(pos.sum()))
    torch.testing.assert_close(expected, out.losses["classification"])
    # The encoded targets decode back onto a ground-truth box of the anchor's class.
    anchors = out.head["anchors"][0][pos[0]]
    boxes = det.model.box_coder.decode(reg_t[0][pos[0]], anchors)
    gt, gl = TARGETS[0]["boxes"], TARGETS[0]["labels"]
    hit = (boxes[:, None, :] - gt[None]).abs().amax(-1) < 1e-3
    assert hit.any(1).all()
    assert (gl[hit.float().argmax(1)] == labels[0][pos[0]]).all()


def test_rpn_records_its_sampled_minibatch():
    """rpn_labels is the RPN loss's sampled mini-batch in the layout of the RPN maps: the loss recomputes."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    det = build_detector("fasterrcnn_resnet_mini", K).train()
    out = det(IMAGES, TARGETS, want=("losses", "head"))
    for o, d, lab, y in zip(out.head["objectness"], out.head["rpn_deltas"], out.head["rpn_labels"],
                            out.head["rpn_reg_targets"]):
        assert lab.shape == o.shape and y.shape == d.shape
    n = 2
    lab = torch.cat([x.reshape(n, -1) for x in out.head["rpn_labels"]], 1)
    obj = torch.cat([x.reshape(n, -1) for x in out.head["objectness"]], 1)

    def rows(levels):  # [N, 4A, H, W] -> [N, A*H*W, 4], channel 4a + j is coordinate j of anchor a
        return torch.cat([x.reshape(n, x.shape[1] // 4, 4, *x.shape[2:]).permute(0, 1, 3, 4, 2).reshape(n, -1, 4)
                          for x in levels], 1)

    deltas, y = rows(out.head["rpn_deltas"]), rows(out.head["rpn_reg_targets"])
    per_image = det.model.rpn.fg_bg_sampler.batch_size_per_image
    assert (lab >= 0).sum(1).tolist() == [per_image, per_image]
    assert int((lab[0] == 1).sum()) > 0 and int((lab[1] == 1).sum()) == 0
    sampled, pos = lab >= 0, lab == 1
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(obj[sampled], lab[sampled].float()),
                               out.losses["loss_objectness"])
    box = F.smooth_l1_loss(deltas[pos], y[pos], beta=1 / 9, reduction="sum") / int(sampled.sum())
    torch.testing.assert_close(box, out.losses["loss_rpn_box_reg"])
    assert torch.isfinite(y).all() and (y[~pos] == 0).all()


def test_matching_recorded_only_with_losses():
    det = build_detector("retinanet_mobilenetv3_micro", K).eval()
    with torch.no_grad():
        out = det(IMAGES, want=("head",))
    assert "dense_labels" not in out.head
    det.train()
    assert "dense_labels" not in det(IMAGES, TARGETS, want=("losses",)).head


@pytest.mark.parametrize("name", ["retinanet_mobilenetv3_micro", "fcos_resnet_mini"])
def test_one_stage_detections_never_have_the_background_label(name):
    """Column 0 of a one-stage head is the background index: even a high logit there yields no detection."""
    torch.manual_seed(0)
    det = build_detector(name, K, score_thresh=0.0).eval()
    cls_head = det.model.head.classification_head
    with torch.no_grad():
        cls_head.cls_logits.bias[0::K] = 20.0  # the background column of every anchor scores ~1
        dets = det.predict(IMAGES)
    assert all(len(d["labels"]) > 0 and (d["labels"] > 0).all() for d in dets)


def test_one_stage_never_detects_the_background():
    """Label 0 is the background: even an untrained head whose channel 0 fires gives no label-0 detection."""
    det = build_detector("fcos_mobilenetv3_micro", K, score_thresh=0.0).eval()
    with torch.no_grad():
        det.model.head.classification_head.cls_logits.bias[0] = 20.0  # channel 0 scores ~1 everywhere
        dets = det.predict(IMAGES)
    assert all(len(d["labels"]) > 0 and (d["labels"] > 0).all() for d in dets)
