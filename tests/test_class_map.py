"""Class maps: a teacher on other classes than the student's, checked against hand-written numbers."""

from __future__ import annotations

import math

import pytest
import torch

from curriculum.errors import ConfigError, DataError
from teachers.class_map import ClassMap, resolve_class_map
from teachers.targets import TeacherTargets

TEACHER = ["__background__", "person", "bicycle", "car", "N/A", "dog"]
STUDENT = ["__background__", "dog", "person"]


def _map() -> ClassMap:
    return ClassMap.build(STUDENT, TEACHER, "auto", where="cfg.yaml: teachers[0].class_map")


def test_auto_columns_and_name_matching():
    m = _map()
    assert m.columns == (0, 5, 1) and not m.is_identity
    assert m.unmapped == (2, 3, 4)  # bicycle, car and the N/A slot fold into background
    # case, blanks and '_' versus ' ' do not count
    m2 = ClassMap.build(["__background__", "Traffic_Light "], ["__background__", "person", "traffic light"])
    assert m2.columns == (0, 2)
    assert ClassMap.build(TEACHER[:4], TEACHER[:4]).is_identity
    # a mapping names some classes, the rest falls back to auto
    m3 = ClassMap.build(["__background__", "hound", "person"], TEACHER, {"hound": "dog"})
    assert m3.columns == (0, 5, 1)
    assert ClassMap.from_dict(m.to_dict()) == m


def test_sigmoid_logits_select_the_students_columns():
    lv0 = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                         [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]]])  # [N=1, HWA=2, K_t=6]
    lv1 = torch.tensor([[[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]]])  # [1, 1, 6]
    out = _map().apply(TeacherTargets(cls_logits=[lv0, lv1]))
    assert torch.equal(out.cls_logits[0], torch.tensor([[[0.0, 5.0, 1.0], [10.0, 15.0, 11.0]]]))
    assert torch.equal(out.cls_logits[1], torch.tensor([[[-1.0, -6.0, -2.0]]]))


def test_softmax_folds_unmapped_classes_into_background():
    # teacher probabilities over [bg, person, bicycle, car, N/A, dog]
    p_t = torch.tensor([[0.10, 0.30, 0.05, 0.15, 0.00001, 0.39999],
                        [0.70, 0.01, 0.09, 0.10, 0.05, 0.05]], dtype=torch.float64)
    z = torch.log(p_t) + 3.0  # any logits of that softmax
    # by hand: student [bg, dog, person]; bg takes bicycle + car + N/A
    p_s = torch.tensor([[0.10 + 0.05 + 0.15 + 0.00001, 0.39999, 0.30],
                        [0.70 + 0.09 + 0.10 + 0.05, 0.05, 0.01]], dtype=torch.float64)
    out = _map().apply(TeacherTargets(roi_class_logits=z))
    assert out.roi_class_logits.shape == (2, 3)
    assert torch.allclose(torch.softmax(out.roi_class_logits, -1), p_s, atol=1e-6)
    assert torch.allclose(out.roi_class_logits.exp().sum(-1), torch.ones(2, dtype=torch.float64))  # log-probabilities
    # stable: huge logits neither overflow nor lose the small classes
    big = _map().fold_softmax(torch.tensor([[1000.0, 0.0, 1000.0, 0.0, 0.0, 0.0]]))
    assert torch.isfinite(big).all() and big[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert big[0, 1].item() == pytest.approx(-1000.0 - math.log(2.0), rel=1e-6)


def test_box_regression_keeps_the_students_groups_and_scorer_is_mapped():
    reg = torch.arange(2 * 24, dtype=torch.float32).reshape(2, 24)  # [R=2, 4 * 6]
    want = torch.tensor([[0, 1, 2, 3, 20, 21, 22, 23, 4, 5, 6, 7],
                         [24, 25, 26, 27, 44, 45, 46, 47, 28, 29, 30, 31]], dtype=torch.float32)
    m = _map()
    assert torch.equal(m.apply(TeacherTargets(roi_box_regression=reg)).roi_box_regression, want)
    z = torch.randn(2, 6)
    out = m.apply(TeacherTargets(roi_scorer=lambda boxes: (z, reg)))
    cls, r = out.score_rois([torch.zeros(2, 4)])
    assert torch.equal(r, want) and torch.allclose(cls, m.fold_softmax(z))


def test_detections_are_relabelled_or_dropped():
    det = {"boxes": torch.arange(16, dtype=torch.float32).reshape(4, 4), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
           "labels": torch.tensor([5, 3, 1, 2])}  # dog, car, person, bicycle
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    out = _map().apply(TeacherTargets(detections=[det, empty])).detections
    assert torch.equal(out[0]["labels"], torch.tensor([1, 2]))
    assert torch.equal(out[0]["scores"], torch.tensor([0.9, 0.7]))
    assert torch.equal(out[0]["boxes"], det["boxes"][[0, 2]])
    assert out[1]["labels"].numel() == 0
    with pytest.raises(DataError, match=r"detections\[0\].*outside the teacher's 0..5"):
        _map().apply(TeacherTargets(detections=[{**det, "labels": torch.tensor([9, 1, 1, 1])}]))


def test_unchanged_fields_identity_and_width_check():
    feats = {"p3": torch.randn(1, 4, 2, 2)}
    reg = [torch.randn(1, 5, 4)]
    tt = TeacherTargets(features=feats, bbox_regression=reg, objectness=[torch.randn(1, 3, 2, 2)], image_ids=[7])
    out = _map().apply(tt)
    # the same tensors (detached again: views of the same storage)
    assert out.features["p3"].data_ptr() == feats["p3"].data_ptr() and torch.equal(out.features["p3"], feats["p3"])
    assert torch.equal(out.bbox_regression[0], reg[0]) and out.image_ids == [7] and out.objectness is not None
    ident = ClassMap.build(TEACHER, TEACHER)
    assert ident.is_identity and ident.apply(tt) is tt
    with pytest.raises(DataError, match=r"'cls_logits\[0\]' has shape \[1, 2, 4\].*expects 6 columns"):
        _map().apply(TeacherTargets(cls_logits=[torch.randn(1, 2, 4)]))
    with pytest.raises(DataError, match="'roi_box_regression'.*expects 24 columns"):
        _map().apply(TeacherTargets(roi_box_regression=torch.randn(2, 12)))


def test_no_gradient_flows():
    z = torch.randn(3, 6, requires_grad=True)
    lv = torch.randn(1, 2, 6, requires_grad=True)
    tt = TeacherTargets(cls_logits=[lv])
    tt.roi_class_logits = z * 2  # set after construction: apply must detach it again
    layer = torch.nn.Linear(4, 30)
    tt.roi_scorer = lambda boxes: (layer(boxes[0])[:, :6], layer(boxes[0])[:, 6:])
    out = _map().apply(tt)
    assert not out.roi_class_logits.requires_grad and out.roi_class_logits.grad_fn is None
    assert not out.cls_logits[0].requires_grad
    cls, reg = out.score_rois([torch.randn(2, 4)])
    assert not cls.requires_grad and not reg.requires_grad and cls.shape == (2, 3) and reg.shape == (2, 12)


def test_errors_name_the_entry_the_classes_and_what_to_do():
    where = "cfg.yaml: teachers[0].class_map"
    with pytest.raises(ConfigError) as e:
        ClassMap.build(["__background__", "cat", "dog"], TEACHER, "auto", where)
    msg = str(e.value)
    assert msg.startswith(where) and "'cat'" in msg and "'person', 'bicycle', 'car', 'dog'" in msg
    assert "'N/A'" not in msg and "by hand" in msg
    with pytest.raises(ConfigError, match=r"^cfg.yaml: teachers\[0\].class_map: \['cat'\] is not a student class"):
        ClassMap.build(STUDENT, TEACHER, {"cat": "dog"}, where)
    with pytest.raises(ConfigError, match=r"names \['horse'\] \(for \['dog'\]\), not class of the teacher.*'car'"):
        ClassMap.build(STUDENT, TEACHER, {"dog": "horse"}, where)
    with pytest.raises(ConfigError, match=r"names \['N/A'\]"):  # a placeholder never matches
        ClassMap.build(STUDENT, TEACHER, {"dog": "N/A"}, where)
    with pytest.raises(ConfigError, match=r"student classes \['dog', 'person'\] are all mapped to the teacher "
                                          r"class 'person'"):
        ClassMap.build(STUDENT, TEACHER, {"dog": "person"}, where)
    with pytest.raises(ConfigError, match="neither 'auto' nor a mapping"):
        ClassMap.build(STUDENT, TEACHER, "names", where)
    many = ["__background__"] + [f"class{i}" for i in range(30)]
    with pytest.raises(ConfigError, match=r"'class19', \.\.\. \(30 in all\)"):
        ClassMap.build(["__background__", "cat"], many, "auto", where)


def test_resolve_for_a_run():
    where = "cfg.yaml: teachers[1].class_map"
    assert resolve_class_map(STUDENT, STUDENT, 3, None, where) is None
    assert resolve_class_map(STUDENT, None, 3, None, where) is None  # old checkpoint, same number of classes
    assert resolve_class_map(STUDENT, TEACHER, 6, "auto", where).columns == (0, 5, 1)
    assert resolve_class_map(STUDENT, ["__background__", "Dog", "person"], 3, "auto", where) is None
    with pytest.raises(ConfigError, match=r"^cfg.yaml: teachers\[1\].class_map: not set.*add `class_map: auto`"):
        resolve_class_map(STUDENT, TEACHER, 6, None, where)
    with pytest.raises(ConfigError, match="records no class names"):
        resolve_class_map(STUDENT, None, 6, None, where)
    with pytest.raises(ConfigError, match="records no class names"):
        resolve_class_map(STUDENT, None, 6, "auto", where)


def test_distill_step_maps_a_teacher_on_other_classes():
    """A real teacher on 8 classes distils a student on 3 (two of them the teacher's, one by a mapping), inline:
    the head losses see the student's columns, dense and RoI (through the mapped roi_scorer)."""
    from teachers.zoo import build_detector
    from trainers.distill import build_distiller
    from trainers.distillation import DistillStep, InlineSource

    t_names = ("__background__", "person", "bicycle", "car", "N/A", "dog", "cat", "horse", "sheep")
    s_names = ("__background__", "dog", "person", "pony")
    m = ClassMap.build(s_names, t_names, {"pony": "horse"})
    assert m.columns == (0, 5, 1, 7)
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([3]), "image_id": 1},
               {"boxes": torch.tensor([[30.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1]), "image_id": 2}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        for s_name, t_name, entries in (
            ("fcos_mobilenetv3_micro", "fcos_resnet_mini",
             [{"name": "hinton_kd", "head": "dense"}, {"name": "chen_cls", "head": "dense"}]),
            ("fasterrcnn_mobilenetv3_micro", "fasterrcnn_resnet_mini",
             [{"name": "chen_cls", "head": "roi"}, {"name": "chen_reg", "head": "roi"},
              {"name": "tar_cls", "gate": "none"}]),
        ):
            student = build_detector(s_name, len(s_names), class_names=s_names).train()
            teacher = build_detector(t_name, len(t_names), class_names=t_names)
            distiller = build_distiller(entries, student.level_channels, teacher.level_channels)
            step = DistillStep(InlineSource(teacher, distiller.required_teacher_targets()), distiller,
                               generator=torch.Generator().manual_seed(0), class_map=m)
            tt = step.targets(images, targets)
            if tt.cls_logits is not None:
                assert all(t.shape[-1] == 4 for t in tt.cls_logits)
            out = student(images, targets, want=("losses", "features", "head"))
            terms = step.terms(out, tt, targets)
            assert all(torch.isfinite(v) for v in terms.values()), terms
            assert all(p.grad is None for p in teacher.parameters())
    finally:
        torch.set_num_threads(threads)


def test_run_config_checks_the_class_map_before_anything_starts(tmp_path):
    from curriculum.pipeline import load_run_config
    from teachers.zoo import build_detector

    names = ("__background__", "person", "circle", "N/A", "triangle", "Square", "star", "cross", "ring")
    ckpt = tmp_path / "coco" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(build_detector("fcos_resnet_mini", len(names), class_names=names).checkpoint(), ckpt)
    cfg = tmp_path / "run.yaml"
    head = f"data: {{root: {tmp_path / 'shapes'}}}\nteachers: [{{name: fcos_resnet_mini, checkpoint: {ckpt}"
    cfg.write_text(head + "}]\n")  # the built-in shapes data (not generated yet): 6 classes, the teacher has 8
    with pytest.raises(ConfigError, match=r"run.yaml: teachers\[0\].class_map: not set.*add `class_map: auto`"):
        load_run_config(cfg)
    cfg.write_text(head + ", class_map: auto}]\n")
    assert load_run_config(cfg).teachers[0].class_map == "auto"
    cfg.write_text(head + ", class_map: {star: hexagon}}]\n")
    with pytest.raises(ConfigError, match=r"run.yaml: teachers\[0\].class_map: the mapping names \['hexagon'\].*"
                                          r"'person', 'circle', 'triangle', 'Square'"):
        load_run_config(cfg)
    assert not (tmp_path / "shapes").exists()  # nothing was generated


def test_pipeline_gives_each_stage_its_class_map(shapes_root, tmp_path, monkeypatch):
    """The run's wiring without Ray: the stage dict a worker receives carries the map (built from the data's and
    the checkpoint's class names), and the teacher is evaluated through it."""
    import json
    from pathlib import Path

    import curriculum.cluster
    import curriculum.pipeline as pipeline
    import teachers.precompute
    from helpers import sequence_without_ray
    from curriculum.config import RunJobConfig, config_from_dict
    from teachers.zoo import build_detector, read_checkpoint

    t_names = ("__background__", "ring", "person", "circle", "triangle", "square", "star", "cross", "N/A")
    ckpt = tmp_path / "coco" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(build_detector("fcos_resnet_mini", len(t_names), class_names=t_names).checkpoint(), ckpt)
    calls, evals = [], []

    def fake_train(cfg):
        calls.append(cfg.stage)
        init = read_checkpoint(cfg.init)
        return {"model": init, "history": json.dumps([{"epoch": 1, "loss": 1.0}]), "epoch": 0, "distiller": None}

    class FakeReport:
        cache, computed = "cache", [0]

    def fake_eval(job, path, out, val_ds, progress, class_map=None):
        evals.append((Path(path).name, class_map))
        return {m: 0.0 for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}

    sequence_without_ray(monkeypatch, fake_train)
    monkeypatch.setattr(teachers.precompute, "precompute", lambda job, progress: [FakeReport()])
    monkeypatch.setattr(curriculum.cluster, "ensure_ray", lambda cfg=None: None)
    monkeypatch.setattr(pipeline, "evaluate_checkpoint", fake_eval)
    job = config_from_dict(RunJobConfig, {
        "output_dir": str(tmp_path / "run"), "data": {"root": str(shapes_root), "builtin": "none", "flip": "none"},
        "teachers": [{"name": "fcos_resnet_mini", "checkpoint": str(ckpt), "class_map": "auto"}],
        "stages": [{"epochs": 1}], "baseline": False, "inherit": False,
    })
    pipeline.run_pipeline(job, progress=False)
    (stage,) = calls
    m = ClassMap.from_dict(stage["teachers"][0]["class_map"])
    assert m.student_names == ("__background__", "circle", "triangle", "square", "star", "cross", "ring")
    assert m.columns == (0, 3, 4, 5, 6, 7, 1)
    assert evals[0][1] == m  # the teacher's val detections are mapped too
    job.teachers[0].class_map = None
    with pytest.raises(ConfigError, match=r"teachers\[0\].class_map: not set"):
        pipeline.run_pipeline(job, progress=False, resume=True)


def test_inherit_leaves_the_class_outputs_of_a_teacher_on_other_classes():
    from curriculum.plan import inherit_weights
    from teachers.zoo import build_detector

    names = ("__background__", "a", "b", "c")
    student = build_detector("retinanet_mobilenetv3_micro", 4, class_names=names, fpn_channels=64, head_convs=2)
    same = build_detector("retinanet_resnet_mini", 4, class_names=names)
    other = build_detector("retinanet_resnet_mini", 4, class_names=("__background__", "c", "b", "a"))
    assert "model.head.classification_head.cls_logits.weight" in inherit_weights(student, same)
    copied = inherit_weights(student, other)
    assert copied and not any("cls_logits" in k for k in copied)


def test_a_teacher_on_other_classes_is_scored_on_its_mapped_detections(shapes_root):
    """`predict_coco(relabel=ClassMap.map_detections)` (how a run scores such a teacher): the COCO results are the
    teacher's detections of mapped classes under the data's categories; the others are dropped."""
    from curriculum.config import DataConfig
    from teachers.zoo import build_detector
    from trainers.train import build_dataset, predict_coco

    ds = build_dataset(DataConfig(root=str(shapes_root), builtin="none", flip="none"), "val")
    t_names = ("__background__", "person", *reversed(ds.class_names[1:]), "N/A")
    torch.manual_seed(0)
    model = build_detector("fcos_resnet_mini", len(t_names), class_names=t_names, score_thresh=0.0).eval()
    m = ClassMap.build(ds.class_names, t_names)
    with torch.no_grad():
        raw = model.predict([ds[i][0] for i in range(2)])
    want = m.map_detections(raw)
    results, ids = predict_coco(model, ds, batch_size=2, max_images=2, progress=False, relabel=m.map_detections)
    assert 0 < sum(len(d["labels"]) for d in want) < sum(len(d["labels"]) for d in raw)
    for iid, det in zip(ids, want):
        got = sorted((r["category_id"], round(r["score"], 5)) for r in results if r["image_id"] == iid)
        assert got == sorted((ds.label_to_category[int(lab)], round(float(s), 5))
                             for lab, s in zip(det["labels"], det["scores"]))
