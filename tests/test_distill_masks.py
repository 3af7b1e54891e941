"""The mask term (issue 16): against a hand computation, zero when the student is the teacher, no gradient to the
teacher; a cached mask target equals the live teacher's; a curriculum run of Mask R-CNNs with MGD and the mask term."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from curriculum.config import CacheConfig, CompressionConfig, RunJobConfig, config_from_dict
from curriculum.data import CocoDetection, collate_fn
from teachers.readers import CacheReader
from teachers.targets import TeacherTargets
from teachers.zoo import build_detector
from trainers.distill import build_distiller

from test_cache import build_cache, make_subset, save_teacher


def _kl(pt: float, ps: float) -> float:
    return pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))


def test_mask_kd_against_a_hand_computation():
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    # Two positive RoIs, 3 classes, 2x2 masks; RoI 0 is class 2, RoI 1 class 1.
    s = torch.zeros(2, 3, 2, 2)
    t = torch.zeros(2, 3, 2, 2)
    s[0, 2] = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    t[0, 2] = torch.tensor([[2.0, -2.0], [0.0, 0.0]])
    s[1, 1] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    t[1, 1] = torch.tensor([[-0.5, 0.5], [1.5, 0.5]])
    s[0, 0] = 9.0  # other classes' channels are not compared
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 5.0, 20.0, 20.0]])]
    pairs = [(2.0, 1.0), (-2.0, -1.0), (0.0, 0.0), (0.0, 2.0), (-0.5, 0.5), (0.5, 0.5), (1.5, 0.5), (0.5, 0.5)]
    for temperature in (1.0, 2.0):
        want = temperature ** 2 * sum(_kl(sig(zt / temperature), sig(zs / temperature)) for zt, zs in pairs) / 8
        student = {"mask_logits": s.clone().requires_grad_(True), "mask_labels": [torch.tensor([2]), torch.tensor([1])],
                   "mask_boxes": boxes}
        seen = []
        tt = TeacherTargets(mask_scorer=lambda b: (seen.append(b), t.clone().requires_grad_(True))[1])
        d = build_distiller([{"name": "mask_kd", "temperature": temperature}], {}, {})
        loss = d(student, tt, [])["distill_mask_kd"]
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert [b.tolist() for b in seen[0]] == [b.tolist() for b in boxes]  # the teacher scored the student's RoIs
        loss.backward()
        grad = student["mask_logits"].grad
        assert grad[0, 2].abs().sum() > 0 and grad[0, 0].abs().sum() == 0  # only the matched class's channel
    same = {"mask_logits": t.clone(), "mask_labels": [torch.tensor([2]), torch.tensor([1])], "mask_boxes": boxes}
    assert d(same, TeacherTargets(mask_scorer=lambda b: t), [])["distill_mask_kd"].item() == pytest.approx(0.0, abs=1e-7)
    empty = {"mask_logits": torch.zeros(0, 3, 2, 2), "mask_labels": [torch.zeros(0)], "mask_boxes": [torch.zeros(0, 4)]}
    assert d(empty, TeacherTargets(), [])["distill_mask_kd"].item() == 0.0


def test_the_mask_term_trains_the_student_and_never_the_teacher(shapes_root):
    ds = CocoDetection(shapes_root / "train" / "images", shapes_root / "train" / "instances.json", 128, masks=True)
    images, targets = collate_fn([ds[i] for i in range(2)])
    torch.manual_seed(0)
    teacher = build_detector("maskrcnn_resnet18_half", ds.num_classes).eval()
    student = build_detector("maskrcnn_mobilenetv3_micro", ds.num_classes).train()
    d = build_distiller([{"name": "mask_kd"}], student.level_channels, teacher.level_channels)
    out = student(images, targets, want=("losses", "features", "head"))
    from trainers.distill.outputs import student_outputs_from

    tt = TeacherTargets.inline(teacher, images, keep=d.required_teacher_targets())
    assert tt.mask_scorer is not None
    loss = d(student_outputs_from(out), tt, targets)["distill_mask_kd"]
    loss.backward()
    assert loss > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.roi_heads.mask_head.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_a_cached_mask_target_equals_the_live_teachers(shapes_root, tmp_path):
    images, ann = make_subset(shapes_root, tmp_path / "instances.json", 4)
    ckpt = tmp_path / "t.pt"
    teacher = save_teacher(ckpt, "maskrcnn_resnet_mini")
    cfg = CacheConfig(root=str(tmp_path / "cache"), shard_size=4, views=["noflip"], targets=["features"],
                      compression=CompressionConfig(dtype="fp32"))
    cache = build_cache(Path(cfg.root), ckpt, images, ann, cfg)
    ds = CocoDetection(images, ann, 128)
    batch_images, targets = collate_fn([ds[i] for i in range(3)])
    boxes = [torch.tensor([[4.0, 6.0, 60.0, 50.0], [20.0, 20.0, 90.0, 120.0]]), torch.tensor([[0.0, 0.0, 127.0, 127.0]]),
             torch.zeros(0, 4)]
    cached = CacheReader(cache, roi_head=teacher).targets_for(targets).score_masks(boxes)
    live = TeacherTargets.inline(teacher, batch_images).score_masks(boxes)
    assert cached.shape == live.shape == (3, teacher.config.num_classes, 28, 28)
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=0)


def test_a_curriculum_of_mask_rcnns_with_the_mask_term(tmp_path, shapes_root, ray_session):
    from curriculum.pipeline import run_pipeline

    from test_pipeline import tiny

    cfg = tiny(shapes_root, tmp_path, tmp_path / "run", student={"name": "maskrcnn_mobilenetv3_micro"},
               teachers=[{"name": "maskrcnn_resnet_mini"}], stages=[{"epochs": 1}], baseline=True,
               losses=[{"name": "mgd", "preset": "retinanet"}, {"name": "mask_kd"}])
    report = run_pipeline(config_from_dict(RunJobConfig, cfg), progress=False)
    done = json.loads((tmp_path / "run" / "stages" / "1-maskrcnn_resnet_mini" / "done.json").read_text())
    record = done["history"][-1]
    assert record["distill_mask_kd"] > 0 and record["distill_mgd"] > 0 and record["loss_mask"] > 0
    assert all("mask_AP" in r["val"] for r in report["rows"])  # box and mask AP for every row
    assert "mask AP" in report["markdown"]
