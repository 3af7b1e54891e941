"""Every registered distillation loss trains a real zoo student against a real zoo teacher run inline.

Random-init detectors at 128 px, two images (one without objects), one optimiser step per loss. Checks
that the zoo records what each loss reads (``student_outputs_from``, ``TeacherTargets.inline``), that the
losses are finite, and where gradients go: the student and the distiller's adapters, never the teacher.
"""

from __future__ import annotations

import copy

import pytest
import torch

from teachers.zoo import build_detector
from trainers.distill import LOSSES, TeacherTargets, build_distiller
from trainers.distill.outputs import forward_outputs, student_outputs_from

K = 7
IMAGES = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
TARGETS = [
    {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 70.0, 90.0, 100.0]]), "labels": torch.tensor([1, 3]),
     "image_id": 11},
    {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64), "image_id": 12},
]

ONE_STAGE = {
    "hinton_kd": {"name": "hinton_kd", "head": "dense"},
    "fitnet": {"name": "fitnet"},
    "chen_cls": {"name": "chen_cls", "head": "dense"},
    "chen_reg": {"name": "chen_reg", "head": "dense"},
    "chen_hint": {"name": "chen_hint"},
    "zhang_feature": {"name": "zhang_feature", "preset": "one_stage"},
    "zhang_attention": {"name": "zhang_attention", "preset": "one_stage"},
    "zhang_nonlocal": {"name": "zhang_nonlocal", "preset": "one_stage"},
    "mgd": {"name": "mgd", "preset": "retinanet"},
    "tar_feature": {"name": "tar_feature"},
}
TWO_STAGE = {
    "hinton_kd_roi": {"name": "hinton_kd", "head": "roi"},
    "hinton_kd_rpn": {"name": "hinton_kd", "head": "rpn"},
    "chen_cls_roi": {"name": "chen_cls", "head": "roi"},
    "chen_cls_rpn": {"name": "chen_cls", "head": "rpn", "hard_from_detector": False},
    "chen_reg_roi": {"name": "chen_reg", "head": "roi"},
    "chen_reg_rpn": {"name": "chen_reg", "head": "rpn"},
    "chen_hint": {"name": "chen_hint"},
    "zhang_feature": {"name": "zhang_feature", "preset": "two_stage"},
    "zhang_attention": {"name": "zhang_attention", "preset": "two_stage"},
    "zhang_nonlocal": {"name": "zhang_nonlocal", "preset": "two_stage"},
    "mgd": {"name": "mgd", "preset": "mask_rcnn"},
    "fitnet": {"name": "fitnet"},
    "tar_feature": {"name": "tar_feature"},
    "tar_cls": {"name": "tar_cls", "gate": "none"},
    "tar_box": {"name": "tar_box"},
}
MASK_RCNN = {  # a Mask R-CNN student and teacher: the mask term, and a feature loss on their FPN
    "mask_kd": {"name": "mask_kd"},
    "mgd": {"name": "mgd", "preset": "mask_rcnn"},
    "chen_cls_roi": {"name": "chen_cls", "head": "roi"},  # the box head's terms, as on a Faster R-CNN
    "tar_cls": {"name": "tar_cls", "gate": "none"},
}
# Gated terms may be exactly 0 on random detectors (no RoI where the teacher's box beats the proposal, ...).
MAY_BE_ZERO = {"chen_reg_roi", "chen_reg_rpn", "tar_box"}

PAIRS = {
    "one_stage": ("retinanet_mobilenetv3_micro", "retinanet_resnet_mini"),
    "two_stage": ("fasterrcnn_mobilenetv3_micro", "fasterrcnn_resnet_mini"),
    "mask_rcnn": ("maskrcnn_mobilenetv3_micro", "maskrcnn_resnet_mini"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These detectors are tiny: one intra-op thread is faster than two and does not stall when other
    processes share the cores (OpenMP threads spin at every barrier)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_registered_loss_is_covered():
    assert {e["name"] for e in [*ONE_STAGE.values(), *TWO_STAGE.values(), *MASK_RCNN.values()]} == set(LOSSES)


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    return {kind: (build_detector(s, K), build_detector(t, K)) for kind, (s, t) in PAIRS.items()}


def _with_masks(targets):
    """Box-shaped instance masks (what a Mask R-CNN trains on)."""
    out = []
    for t in targets:
        m = torch.zeros((len(t["boxes"]), 128, 128), dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(m, t["boxes"].int().tolist()):
            mask[y1:y2, x1:x2] = 1
        out.append({**t, "masks": m})
    return out


def _train_step(student, teacher, entry, key, targets=TARGETS):
    """One optimiser step on detector loss + distillation term; gradients of the term alone are checked first."""
    distiller = build_distiller([entry], student.level_channels, teacher.level_channels)
    student.train()
    distiller.train()
    opt = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=1e-2)
    before = {k: v.detach().clone() for k, v in distiller.state_dict().items() if v.is_floating_point()}
    # The training step records only what the loss says it reads (`forward_outputs`): the loss must find all of it
    # there, and come out as from a forward that records everything (same RPN sample, same masks).
    rng = torch.get_rng_state()
    full = student(IMAGES, targets, want=("losses", "features", "head"))
    torch.set_rng_state(rng)
    out = student(IMAGES, targets, want=forward_outputs(distiller.required_student_outputs()))
    tt = TeacherTargets.inline(teacher, IMAGES, [t["image_id"] for t in targets],
                               keep=distiller.required_teacher_targets())
    assert not teacher.training
    s_out = student_outputs_from(out)
    assert distiller.required_student_outputs() <= set(s_out), "the zoo must record what the loss reads"
    kd = distiller(s_out, tt, targets, generator=torch.Generator().manual_seed(0))
    kd_full = distiller(student_outputs_from(full), tt, targets, generator=torch.Generator().manual_seed(0))
    assert kd.keys() == kd_full.keys()
    assert all(torch.allclose(kd[k], kd_full[k], rtol=1e-5, atol=0) for k in kd), (kd, kd_full)
    (name,) = kd
    term = kd[name]
    assert name == f"distill_{next(iter(distiller.terms))}" and torch.isfinite(term), kd
    if key not in MAY_BE_ZERO:
        assert term.item() != 0.0
    # The distillation term alone: gradients reach the student and every adapter, never the teacher.
    opt.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads, "no gradient reached the student"
    assert all(torch.isfinite(g).all() for g in grads)
    if key not in MAY_BE_ZERO:
        assert any(g.abs().sum() > 0 for g in grads)
    params = list(distiller.parameters())
    assert all(p.grad is not None for p in params), "an adapter is not in the graph"
    if params:
        assert any(p.grad.abs().sum() > 0 for p in params)
    # Then the detector's own terms (scaled as the distiller asks) join: one training step of the sum.
    scales = distiller.detector_loss_scales()
    sum(v * scales.get(k, 1.0) for k, v in out.losses.items()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    if params:
        after = distiller.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("key", list(ONE_STAGE))
def test_one_stage_losses_train(detectors, key):
    student, teacher = detectors["one_stage"]
    torch.manual_seed(1)
    _train_step(copy.deepcopy(student), teacher, ONE_STAGE[key], key)


@pytest.mark.parametrize("key", list(TWO_STAGE))
def test_two_stage_losses_train(detectors, key):
    student, teacher = detectors["two_stage"]
    torch.manual_seed(1)
    _train_step(copy.deepcopy(student), teacher, TWO_STAGE[key], key)


@pytest.mark.parametrize("key", list(MASK_RCNN))
def test_mask_rcnn_losses_train(detectors, key):
    student, teacher = detectors["mask_rcnn"]
    torch.manual_seed(1)
    _train_step(copy.deepcopy(student), teacher, MASK_RCNN[key], key, _with_masks(TARGETS))


def test_a_step_records_only_what_its_losses_read():
    """A feature loss's step skips the head's recording (and the dense matching's targets it computes)."""
    def want(*entries):
        return forward_outputs(build_distiller(list(entries), {"p3": 8}, {"p3": 8}).required_student_outputs())

    assert want({"name": "mgd"}) == ("losses", "features")
    assert want({"name": "chen_cls", "head": "dense"}) == ("losses", "head")
    assert want({"name": "fitnet"}, {"name": "hinton_kd", "head": "dense"}) == ("losses", "features", "head")


def test_student_outputs_rows_line_up(detectors):
    """The adapter's two-stage keys: one row per scored RoI, in the order of the sampled proposals."""
    student, _ = detectors["two_stage"]
    out = copy.deepcopy(student).train()(IMAGES, TARGETS, want=("losses", "features", "head"))
    s = student_outputs_from(out)
    r = sum(len(p) for p in s["proposals"])
    assert s["roi_class_logits"].shape == (r, K) and s["roi_box_regression"].shape == (r, 4 * K)
    assert s["roi_labels"].shape == (r,) and s["roi_reg_targets"].shape == (r, 4)
    assert len(s["rpn_labels"]) == len(s["objectness"]) == 5
    assert "dense_labels" not in s
    student_eval = copy.deepcopy(student).eval()
    with torch.no_grad():
        s_eval = student_outputs_from(student_eval(IMAGES, want=("features", "head")))
    assert "roi_labels" not in s_eval and "rpn_labels" not in s_eval  # matching only exists with losses


def test_inline_targets_score_student_proposals(detectors):
    student, teacher = detectors["two_stage"]
    tt = TeacherTargets.inline(teacher, IMAGES, [11, 12])
    assert tt.roi_scorer is not None and tt.features["p2"].shape[0] == 2
    assert {"objectness", "rpn_deltas", "features"} <= tt.present()
    assert tt.roi_class_logits is None  # the teacher's own RoI rows are on its proposals, not the student's
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 40.0]]), torch.tensor([[5.0, 5.0, 60.0, 90.0], [1.0, 2.0, 3.0, 4.0]])]
    cls, reg = tt.score_rois(boxes)
    with torch.no_grad():
        ref_cls, ref_reg = teacher.score_boxes(teacher(IMAGES, want=("features",)).features, boxes, [(128, 128)] * 2)
    torch.testing.assert_close(cls, ref_cls)
    torch.testing.assert_close(reg, ref_reg)
    one = TeacherTargets.inline(detectors["one_stage"][1], IMAGES, keep={"features"})
    assert one.present() == {"features"} and one.roi_scorer is None


def test_a_step_warming_up_its_adapters_trains_them_alone_then_the_student(detectors):
    """`DistillStep(adapters_only=1)`: the first call's MGD term has the value of an ordinary step but its gradient
    reaches only the generation blocks; from the second call on it reaches the student too."""
    from trainers.distillation import DistillStep, InlineSource

    student, teacher = detectors["one_stage"]
    student = copy.deepcopy(student).train()
    distiller = build_distiller([{"name": "mgd"}], student.level_channels, teacher.level_channels).train()
    source = InlineSource(teacher, distiller.required_teacher_targets())
    warming = DistillStep(source, distiller, generator=torch.Generator().manual_seed(0), adapters_only=1)
    plain = DistillStep(source, distiller, generator=torch.Generator().manual_seed(0))

    def grads(step):
        student.zero_grad(set_to_none=True), distiller.zero_grad(set_to_none=True)
        out = student(IMAGES, TARGETS, want=step.want)
        term = step(out, TARGETS, IMAGES)["distill_mgd"]
        term.backward()
        reached = [p for p in student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        gen = distiller.terms["mgd"].generation["p3"][0].weight.grad
        return term.detach(), len(reached), gen.clone()

    v_warm, student_grads, gen_warm = grads(warming)
    v_plain, student_plain, gen_plain = grads(plain)
    assert torch.equal(v_warm, v_plain) and torch.equal(gen_warm, gen_plain)
    assert student_grads == 0 and student_plain > 0
    _, after, _ = grads(warming)
    assert after == student_plain
