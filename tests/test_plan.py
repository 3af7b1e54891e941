"""The curriculum plan: stage transitions (teacher switches, weights carried over, decay restarting or continuing,
the data's epochs going on), inheritance of the first teacher's neck and head, and the `auto` order on cases whose
answer is known."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from curriculum.config import RunJobConfig, config_from_dict
from curriculum.plan import (adaptation_cost, build_plan, inherit_weights, measure_adaptation_costs, order_by_cost,
                             stage_borders)
from curriculum.report import METRICS
from teachers.zoo import build_detector

K = 7


def _job(**kw) -> RunJobConfig:
    base = {"teachers": [{"name": "fcos_resnet_mini"}, {"name": "fcos_resnet18_half"}],
            "stages": [{"epochs": 2}, {"epochs": 3, "losses": [{"name": "mgd", "alpha": 1e-6}]}],
            "decay": {"kind": "linear", "restart": True}}
    base.update(kw)
    return config_from_dict(RunJobConfig, base)


CKPTS = {"fcos_resnet_mini": "a/model.pt", "fcos_resnet18_half": "b/model.pt"}


def test_stages_switch_teachers_and_losses_in_order():
    stages = build_plan(_job(), CKPTS, ["fcos_resnet_mini", "fcos_resnet18_half"])
    assert [s.teacher for s in stages] == ["fcos_resnet_mini", "fcos_resnet18_half"]
    assert [[t.checkpoint for t in s.teachers] for s in stages] == [["a/model.pt"], ["b/model.pt"]]
    assert [s.name for s in stages] == ["1-fcos_resnet_mini", "2-fcos_resnet18_half"]
    assert [s.epochs for s in stages] == [2, 3] and stage_borders(stages) == [2]
    assert stages[0].losses == [{"name": "mgd", "preset": "retinanet"}]  # the run's default loss mix
    assert stages[1].losses == [{"name": "mgd", "alpha": 1e-6}]  # the stage's own
    # The order decides which teacher each stage's settings go with (positionally).
    rev = build_plan(_job(), CKPTS, ["fcos_resnet18_half", "fcos_resnet_mini"])
    assert [s.teacher for s in rev] == ["fcos_resnet18_half", "fcos_resnet_mini"] and rev[0].epochs == 2
    with pytest.raises(Exception, match="permutation"):
        build_plan(_job(), CKPTS, ["fcos_resnet_mini"])


def test_decay_restarts_or_continues_as_configured():
    restart = build_plan(_job(), CKPTS, list(CKPTS))
    assert [restart[0].decay(e) for e in range(2)] == pytest.approx([1.0, 0.5])
    assert [restart[1].decay(e) for e in range(3)] == pytest.approx([1.0, 2 / 3, 1 / 3])
    cont = build_plan(_job(decay={"kind": "linear", "restart": False}), CKPTS, list(CKPTS))
    assert [cont[0].decay(e) for e in range(2)] == pytest.approx([1.0, 0.8])
    assert [cont[1].decay(e) for e in range(3)] == pytest.approx([0.6, 0.4, 0.2])
    step = build_plan(_job(decay={"kind": "step", "restart": False, "params": {"milestones": [3], "gamma": 0.5}}),
                      CKPTS, list(CKPTS))
    assert [step[1].decay(e) for e in range(3)] == pytest.approx([0.5, 0.5, 0.5])
    # Round trip through the dict the Ray Train workers receive.
    from curriculum.plan import Stage

    assert Stage.from_dict(json.loads(json.dumps(cont[1].to_dict()))).decay(2) == pytest.approx(0.2)
    with pytest.raises(Exception, match="unknown parameter"):
        build_plan(_job(decay={"kind": "linear", "params": {"gamma": 0.5}}), CKPTS, list(CKPTS))


def test_inherit_copies_neck_and_head_where_shapes_match():
    torch.manual_seed(0)
    student = build_detector("fcos_mobilenetv3_micro", K)
    teacher = build_detector("fcos_resnet_mini", K)
    body_before = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("model.backbone.body.")}
    copied = inherit_weights(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    assert copied and all(k.startswith(("model.backbone.fpn.", "model.head.")) for k in copied)
    assert "model.head.classification_head.cls_logits.weight" in copied  # same channels (64) and classes
    assert any(k.startswith("model.backbone.fpn.layer_blocks.") for k in copied)
    for k in copied:
        assert torch.equal(s[k], t[k]), k
    # FPN inner blocks take the backbone's channels, which differ: their weights are not copied (per tensor, like
    # mmcv's non-strict loading the authors use: the biases, of equal shape, are); the body is never touched.
    assert not any(k.startswith("model.backbone.fpn.inner_blocks.") and k.endswith("weight") for k in copied)
    for k, v in body_before.items():
        assert torch.equal(s[k], v), k
    # A teacher with other FPN channels (96) shares nothing of that shape in the FPN's 3x3 convs.
    other = inherit_weights(build_detector("fcos_mobilenetv3_micro", K), build_detector("fcos_resnet18_half", K))
    assert not any(k.startswith("model.backbone.fpn.layer_blocks.") for k in other)


def test_auto_order_puts_the_student_itself_first_and_an_unrelated_teacher_last():
    torch.manual_seed(0)
    student = build_detector("fcos_mobilenetv3_micro", K)
    same = copy.deepcopy(student)  # a teacher that IS the student: its features are exactly the student's
    noisy = copy.deepcopy(student)  # the student, perturbed: closer than an unrelated network, farther than itself
    with torch.no_grad():
        for p in noisy.model.backbone.fpn.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    unrelated = build_detector("fcos_resnet_mini", K)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(8)]
    teachers = {"unrelated": unrelated, "noisy": noisy, "same": same}
    costs = measure_adaptation_costs(student, teachers, images)
    assert costs["same"]["cost"] < 1e-3
    assert costs["unrelated"]["cost"] > 0.2
    assert costs["same"]["cost"] < costs["noisy"]["cost"] < costs["unrelated"]["cost"]
    assert order_by_cost(costs) == ["same", "noisy", "unrelated"]
    assert set(costs["same"]["levels"]) == {"p3", "p4", "p5", "p6", "p7"}
    assert all(v >= 0 for c in costs.values() for v in c["levels"].values())


def test_adaptation_cost_is_held_out_and_needs_common_levels():
    # Pure noise: a fit on as many channels as positions would explain it in-sample, never on held-out images.
    g = torch.Generator().manual_seed(0)
    s = {"p3": torch.randn(8, 32, 4, 4, generator=g)}
    t = {"p3": torch.randn(8, 16, 4, 4, generator=g)}
    assert adaptation_cost(s, t)["cost"] > 0.9
    # A linear function of the student (other channels, other size) is found.
    w = torch.randn(16, 32, generator=g)
    lin = {"p3": torch.nn.functional.interpolate(torch.einsum("oc,nchw->nohw", w, s["p3"]) + 3.0, size=(8, 8),
                                                 mode="bilinear", align_corners=False)}
    s8 = {"p3": torch.nn.functional.interpolate(s["p3"], size=(8, 8), mode="bilinear", align_corners=False)}
    assert adaptation_cost(s8, lin)["cost"] < 1e-3
    with pytest.raises(Exception, match="not FPN levels"):
        adaptation_cost(s, t, levels=["p4"])


def test_pipeline_carries_the_student_from_stage_to_stage(shapes_root, tmp_path, monkeypatch):
    """The pipeline's wiring without Ray: each stage starts from the previous stage's final model, stage 1 from
    the student with the first teacher's neck and head; each stage gets its teacher's cache and its decay."""
    import curriculum.pipeline as pipeline
    import curriculum.cluster
    import teachers.precompute
    from helpers import sequence_without_ray
    from teachers.zoo import read_checkpoint

    ckpts = {}
    for name in ("fcos_resnet_mini", "fcos_resnet18_half"):
        torch.manual_seed(len(name))
        ckpts[name] = tmp_path / name / "model.pt"
        ckpts[name].parent.mkdir()
        torch.save(build_detector(name, K).checkpoint(), ckpts[name])
    calls = []

    def fake_train(cfg):
        """Stands in for a stage's training: 'training' adds 1 to every float tensor of the student it was given."""
        init = read_checkpoint(cfg.init)
        calls.append({"init": init, "stage": cfg.stage, "epochs": cfg.job["train"]["epochs"]})
        model = build_detector(init["config"]["name"], init["config"]["num_classes"])
        model.load_state_dict(init["model"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        epochs = cfg.job["train"]["epochs"]
        hist = [{"epoch": e + 1, "loss": 1.0, "decay": Stage.from_dict(cfg.stage).decay(e)} for e in range(epochs)]
        return {"model": model.checkpoint(), "history": json.dumps(hist), "epoch": epochs - 1,
                "distiller": None, "student_optimizer": {"w": {"step": torch.tensor(float(len(calls)))}}}

    class FakeReport:
        def __init__(self, name):
            self.cache, self.computed = f"cache-of-{name}", [0]

    sequence_without_ray(monkeypatch, fake_train)
    monkeypatch.setattr(teachers.precompute, "precompute", lambda job, progress: [FakeReport(job.teachers[0].name)])
    monkeypatch.setattr(curriculum.cluster, "ensure_ray", lambda cfg=None: None)
    # Evaluation is not what this test is about (and these untrained, shifted detectors may predict label 0).
    monkeypatch.setattr(pipeline, "evaluate_checkpoint", lambda *a, **k: {m: 0.0 for m in METRICS})
    from curriculum.plan import Stage

    job = config_from_dict(RunJobConfig, {
        "output_dir": str(tmp_path / "run"), "data": {"root": str(shapes_root), "builtin": "none", "flip": "none"},
        "teachers": [{"name": n, "checkpoint": str(p)} for n, p in ckpts.items()],
        "stages": [{"epochs": 1}, {"epochs": 2}], "decay": {"kind": "linear", "restart": False},
        "baseline": False, "eval": {"max_images": 2, "batch_size": 2}, "schedule": "curriculum",
    })
    report = pipeline.run_pipeline(job, progress=False)
    assert [[t["name"] for t in c["stage"]["teachers"]] for c in calls] == [["fcos_resnet_mini"], ["fcos_resnet18_half"]]
    assert [c["stage"]["teachers"][0]["cache"] for c in calls] == ["cache-of-fcos_resnet_mini",
                                                                   "cache-of-fcos_resnet18_half"]
    assert [c["epochs"] for c in calls] == [1, 2]
    # schedule: curriculum: stage 2 takes over stage 1's student optimizer state, on one lr clock of 3 epochs.
    assert calls[0]["stage"]["optimizer_state"] is None
    carried = torch.load(calls[1]["stage"]["optimizer_state"], weights_only=True)
    assert carried["w"]["step"].item() == 1.0
    assert [(c["stage"]["lr_offset"], c["stage"]["lr_t_max"]) for c in calls] == [(0, 3), (1, 3)]
    # Stage 1 starts from the random student with the first teacher's FPN/head tensors where shapes match.
    first = calls[0]["init"]["model"]
    teacher = torch.load(ckpts["fcos_resnet_mini"], weights_only=True)["model"]
    assert torch.equal(first["model.head.classification_head.cls_logits.weight"],
                       teacher["model.head.classification_head.cls_logits.weight"])
    # Stage 2 starts exactly where stage 1 ended (its saved model: stage 1's start + 1).
    second = calls[1]["init"]["model"]
    stage1 = torch.load(tmp_path / "run" / "stages" / "1-fcos_resnet_mini" / "model.pt", weights_only=True)["model"]
    for k, v in stage1.items():
        assert torch.equal(second[k], v), k
    k = "model.head.classification_head.cls_logits.weight"
    assert torch.allclose(second[k], first[k] + 1.0)
    # The decay continued over the curriculum (restart: false; t_max = 3 epochs): 1 | 2/3, 1/3.
    decays = [h["decay"] for h in report["history"]]
    assert decays == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert [r["role"] for r in report["rows"]] == ["teacher", "teacher", "stage", "stage"]
    final = torch.load(tmp_path / "run" / "report" / "student.pt", weights_only=True)
    assert torch.equal(final["model"][k], second[k] + 1.0)


def test_curriculum_schedule_puts_every_stage_on_one_lr_clock():
    from curriculum.plan import direct_stage

    per_stage = build_plan(_job(), CKPTS, list(CKPTS))
    assert [(s.lr_offset, s.lr_t_max) for s in per_stage] == [(0, None), (0, None)]
    cont = build_plan(_job(schedule="curriculum"), CKPTS, list(CKPTS))
    assert [(s.lr_offset, s.lr_t_max) for s in cont] == [(0, 5), (2, 5)]
    d = direct_stage(_job(schedule="curriculum"), cont)
    assert (d.lr_offset, d.lr_t_max, d.optimizer_state, d.epochs) == (0, None, None, 5)
    with pytest.raises(Exception, match="schedule"):
        _job(schedule="cyclic")


@pytest.mark.parametrize(("schedule", "moments", "carried"), [("per_stage", None, False), ("curriculum", None, True),
                                                           ("per_stage", "carry", True), ("curriculum", "fresh", False)])
def test_moments_say_whether_a_stage_takes_over_the_students_optimizer_state(tmp_path, schedule, moments, carried):
    """`moments` decides what a stage hands the next (optimizer.pt), `schedule` the lr clock, independently."""
    from curriculum.pipeline import stage_entry

    job = _job(schedule=schedule, moments=moments)
    stages = build_plan(job, CKPTS, list(CKPTS))
    entries = [stage_entry(job, st, None, tmp_path, continues=i > 0, progress=False) for i, st in enumerate(stages)]
    assert [e.save_optimizer for e in entries] == [carried, carried]
    assert [s.lr_offset for s in stages] == ([0, 2] if schedule == "curriculum" else [0, 0])
    with pytest.raises(Exception, match="moments"):
        _job(moments="kept")


def test_a_stage_on_the_curriculum_schedule_continues_the_lr_and_the_students_optimizer(shapes_root, tmp_path):
    """Two plain stages of 1 epoch (2 iterations) on one 3-epoch clock: their lrs are one warm-up + cosine over 6
    iterations, cut at 2; stage 2's AdamW starts at step 2 with stage 1's moments (a fresh stage: step 0)."""
    from curriculum.config import TrainConfig, TrainJobConfig, to_dict
    from curriculum.plan import Stage
    from helpers import tensorboard_scalars
    from trainers.ray_train import LocalSession, LoopConfig, run_training
    from trainers.train import lr_factor

    train = {"epochs": 1, "batch_size": 4, "max_iters_per_epoch": 2, "lr": 0.01, "warmup_iters": 3,
             "optimizer": "adamw", "lr_schedule": "cosine"}
    job = config_from_dict(TrainJobConfig, {"output_dir": str(tmp_path), "model": {"name": "fcos_mobilenetv3_micro"},
                                            "data": {"root": str(shapes_root), "builtin": "none"}, "train": train})

    def stage(i, optimizer_state=None, init=None):
        st = Stage(index=i, name=f"s{i}", teachers=[], epochs=1, losses=[], lr=None, decay_kind="constant",
                   decay_params={}, decay_offset=0, decay_t_max=1, lr_offset=i, lr_t_max=3,
                   optimizer_state=optimizer_state)
        cfg = LoopConfig(job=to_dict(job), stage=st.to_dict(), init=init, progress=False,
                         tensorboard_dir=str(tmp_path / f"tb{i}-{optimizer_state is not None}"))
        return run_training(cfg, LocalSession()), Path(cfg.tensorboard_dir)

    first, tb1 = stage(0)
    init, carried = tmp_path / "after1.pt", tmp_path / "optimizer1.pt"
    torch.save(first["model"], init)
    torch.save(first["student_optimizer"], carried)
    second, tb2 = stage(1, str(carried), str(init))
    t = TrainConfig(**train)
    lrs = [v for _, v in tensorboard_scalars(tb1)["lr"] + tensorboard_scalars(tb2)["lr"]]
    # (each step logs the lr after its scheduler step: the next iteration's)
    assert lrs == pytest.approx([0.01 * lr_factor(i + 1, 6, t) for i in range(4)])
    name = "model.head.classification_head.cls_logits.weight"
    assert int(first["student_optimizer"][name]["step"]) == 2
    assert int(second["student_optimizer"][name]["step"]) == 4
    fresh, _ = stage(1, None, str(init))
    assert int(fresh["student_optimizer"][name]["step"]) == 2


def test_every_stage_goes_on_with_the_data_epochs_after_the_previous_ones():
    from curriculum.plan import Stage, direct_stage

    stages = build_plan(_job(), CKPTS, list(CKPTS))
    assert [s.data_offset for s in stages] == [0, 2]
    assert direct_stage(_job(), stages).data_offset == 0
    # a stage dict written before the field existed reads as it ran (its epochs replayed the first stage's)
    old = stages[1].to_dict()
    del old["data_offset"]
    assert Stage.from_dict(old).data_offset == 0


def test_a_later_stage_trains_on_the_runs_next_data_epochs_not_the_first_stages(shapes_root, tmp_path, monkeypatch):
    """A 1-epoch stage at data_offset 2 gets the image order and flips of epoch 3 of one 3-epoch run; at offset 0
    (a stage dict from before) it replays epoch 1's."""
    import curriculum.data
    from curriculum.config import TrainJobConfig, to_dict
    from curriculum.plan import Stage
    from trainers.ray_train import LocalSession, LoopConfig, run_training

    seen: list[list[tuple[int, bool]]] = []
    collate = curriculum.data.collate_fn

    def recording(batch):  # the loop's batches, as the DataLoader collates them
        seen.append([(int(t["image_id"]), bool(t["view"].flip)) for _, t in batch])
        return collate(batch)

    monkeypatch.setattr(curriculum.data, "collate_fn", recording)
    train = {"epochs": 1, "batch_size": 4, "max_iters_per_epoch": 2, "lr": 0.01, "warmup_iters": 0}
    job = config_from_dict(TrainJobConfig, {"output_dir": str(tmp_path), "model": {"name": "fcos_mobilenetv3_micro"},
                                            "data": {"root": str(shapes_root), "builtin": "none", "flip": "random"},
                                            "train": train})

    def run(epochs, data_offset):
        seen.clear()
        st = Stage(index=1, name="s", teachers=[], epochs=epochs, losses=[], lr=None, decay_kind="constant",
                   decay_params={}, decay_offset=0, decay_t_max=epochs, data_offset=data_offset)
        j = to_dict(job)
        j["train"]["epochs"] = epochs
        run_training(LoopConfig(job=j, stage=st.to_dict(), progress=False), LocalSession())
        return list(seen)

    first = run(1, 0)
    n = len(first)  # batches collated per epoch (the loader may collate one past the iteration limit)
    whole = run(3, 0)
    assert first == whole[:n] and len(whole) == 3 * n
    assert run(1, 2) == whole[2 * n:]
    assert whole[2 * n:] != whole[:n]


def test_adapter_warmup_reaches_every_stage_and_the_direct_arm():
    from curriculum.plan import direct_stage

    stages = build_plan(_job(adapter_warmup=50), CKPTS, list(CKPTS))
    assert [s.adapter_warmup for s in stages] == [50, 50]
    assert direct_stage(_job(adapter_warmup=50), stages).adapter_warmup == 50
    assert [s.adapter_warmup for s in build_plan(_job(), CKPTS, list(CKPTS))] == [0, 0]
    with pytest.raises(Exception, match="adapter_warmup: iterations, 0 or more, got -1"):
        _job(adapter_warmup=-1)


def test_a_stage_whose_adapter_warmup_covers_it_trains_the_student_as_plain_training(shapes_root, tmp_path):
    """A 2-epoch stage of 2 iterations each, MGD from a teacher run inline: with `adapter_warmup` 4 its terms train
    the adapters alone, so the student ends bit for bit as without a teacher while the adapters move; with 2 (the
    first epoch only) the terms reach the student in the second."""
    from curriculum.config import TrainJobConfig, to_dict
    from curriculum.plan import Stage, StageTeacher
    from trainers.distillation import TeacherLink, build_student
    from trainers.ray_train import LocalSession, LoopConfig, run_training
    from trainers.train import build_dataset

    train = {"epochs": 2, "batch_size": 4, "max_iters_per_epoch": 2, "lr": 0.01, "warmup_iters": 0}
    job = config_from_dict(TrainJobConfig, {"output_dir": str(tmp_path), "model": {"name": "fcos_mobilenetv3_micro"},
                                            "data": {"root": str(shapes_root), "builtin": "none"}, "train": train})
    classes = build_dataset(job.data, "train").class_names
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save(build_detector("fcos_resnet_mini", len(classes), class_names=tuple(classes)).checkpoint(), ckpt)

    def run(warmup, teachers=True):
        st = Stage(index=0, name="s", teachers=[StageTeacher(name="fcos_resnet_mini", checkpoint=str(ckpt))] * teachers,
                   epochs=2, losses=[{"name": "mgd"}] * teachers, lr=None, decay_kind="constant", decay_params={},
                   decay_offset=0, decay_t_max=2, adapter_warmup=warmup)
        state = run_training(LoopConfig(job=to_dict(job), stage=st.to_dict(), teacher_mode="inline", progress=False),
                             LocalSession())
        return state["model"]["model"], state.get("distiller")

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    plain, _ = run(0, teachers=False)
    covered, adapters = run(4)
    assert same(covered, plain)
    link = TeacherLink("fcos_resnet_mini", 1.0, {lv: 64 for lv in ("p3", "p4", "p5", "p6", "p7")})
    _, built = build_student("fcos_mobilenetv3_micro", classes, 0, image_size=128, overrides={},
                             losses=[{"name": "mgd"}], teachers=[link])  # the adapters as the stage built them
    assert adapters.keys() == built.state_dict().keys() and not same(adapters, built.state_dict())
    half, _ = run(2)
    assert not same(half, plain) and not same(half, run(0)[0])


def _mgd_distiller_state(student_channels: int, teacher_channels: int, seed: int) -> dict[str, torch.Tensor]:
    from trainers.distill import build_joint_distiller

    torch.manual_seed(seed)
    levels = ("p3", "p4", "p5", "p6", "p7")
    d = build_joint_distiller([{"name": "mgd"}], {lv: student_channels for lv in levels},
                              [("t", {lv: teacher_channels for lv in levels}, 1.0)])
    return d.state_dict()


def test_carried_adapters_are_the_previous_stages_where_shapes_match(tmp_path):
    """`adapters: carry`: a distiller against a teacher with the same FPN channels takes every tensor of the previous
    stage's distiller.pt; against other channels it keeps what it was built with."""
    from trainers.distillation import build_student

    saved = _mgd_distiller_state(64, 96, seed=5)  # the student's FPN: 64 channels
    path = tmp_path / "distiller.pt"
    torch.save({"losses": [{"name": "mgd"}], "loss_factors": {"mgd": 0.5}, "state": saved}, path)

    class Link:
        def __init__(self, channels):
            self.name, self.weight = "t", 1.0
            self.level_channels = {lv: channels for lv in ("p3", "p4", "p5", "p6", "p7")}

    def distiller(channels, adapters_from):
        return build_student("fcos_mobilenetv3_micro", [f"c{i}" for i in range(K)], 0, image_size=128, overrides={},
                             losses=[{"name": "mgd"}], teachers=[Link(channels)], adapters_from=adapters_from)[1]

    same = distiller(96, str(path)).state_dict()
    assert same.keys() == saved.keys()
    assert all(torch.equal(same[k], saved[k]) for k in saved)
    fresh = distiller(96, None).state_dict()
    assert not torch.equal(fresh["terms.mgd.generation.p3.0.weight"], saved["terms.mgd.generation.p3.0.weight"])
    other, built = distiller(64, str(path)).state_dict(), distiller(64, None).state_dict()
    assert all(torch.equal(other[k], built[k]) for k in built)  # a 64-channel teacher: nothing matches, nothing taken


@pytest.mark.parametrize("adapters", ["carry", "fresh"])
def test_a_sequence_hands_a_stage_the_previous_stages_adapters_when_asked(monkeypatch, tmp_path, shapes_root,
                                                                         adapters):
    from curriculum.config import TrainJobConfig, to_dict
    from helpers import sequence_without_ray
    from trainers.ray_train import LocalSession, LoopConfig, SequenceEntry, run_sequence

    calls = []

    def fake_train(cfg):
        calls.append(cfg.stage)
        return {"model": {"n": len(calls)}, "history": "[]", "epoch": 0,
                "distiller": {"terms.mgd.align.p3.weight": torch.full((2,), float(len(calls)))}}

    sequence_without_ray(monkeypatch, fake_train)
    tjob = to_dict(config_from_dict(TrainJobConfig, {"output_dir": str(tmp_path),
                                                     "data": {"root": str(shapes_root), "builtin": "none"}}))
    stages = build_plan(_job(adapters=adapters), CKPTS, list(CKPTS))
    entries = [SequenceEntry(loop=LoopConfig(job=tjob, stage=st.to_dict(), loss_factors={"mgd": 1.0}).to_dict(),
                             out_dir=str(tmp_path / st.name), continues=i > 0) for i, st in enumerate(stages)]
    run_sequence(entries, LocalSession())
    assert calls[0]["adapters_from"] is None
    if adapters == "fresh":
        assert calls[1]["adapters_from"] is None
        return
    assert calls[1]["adapters_from"] == str(tmp_path / "1-fcos_resnet_mini" / "distiller.pt")
    # the stage's done.json records the stage as it ran
    done = json.loads((tmp_path / "2-fcos_resnet18_half" / "done.json").read_text())
    assert done["stage"]["adapters_from"] == calls[1]["adapters_from"]
    state = torch.load(calls[1]["adapters_from"], weights_only=True)["state"]
    assert torch.equal(state["terms.mgd.align.p3.weight"], torch.full((2,), 1.0))


@pytest.mark.parametrize("reference", ["stage", "run"])
def test_calibration_measures_the_student_the_reference_names(monkeypatch, tmp_path, shapes_root, reference):
    """`kd_reference: stage`: stage 2 is calibrated with the student stage 1 ended with; `run`: with the student the
    run started from, as stage 1 was."""
    import trainers.distillation
    from curriculum.config import TrainJobConfig, to_dict
    from helpers import sequence_without_ray
    from trainers.ray_train import LocalSession, LoopConfig, SequenceEntry, run_sequence

    measured = []
    monkeypatch.setattr(trainers.distillation, "calibrate_factors",
                        lambda job, stage, init, *a, **k: measured.append(init) or {"mgd": 1.0})
    sequence_without_ray(monkeypatch, lambda cfg: {"model": {}, "history": "[]", "epoch": 0, "distiller": None})
    tjob = to_dict(config_from_dict(TrainJobConfig, {"output_dir": str(tmp_path),
                                                     "data": {"root": str(shapes_root), "builtin": "none"}}))
    stages = build_plan(_job(kd_ratio=1.0, kd_reference=reference), CKPTS, list(CKPTS))
    start = str(tmp_path / "student_init.pt")
    entries = [SequenceEntry(loop=LoopConfig(job=tjob, stage=st.to_dict(), init=start if i == 0 else None).to_dict(),
                             out_dir=str(tmp_path / st.name), continues=i > 0) for i, st in enumerate(stages)]
    run_sequence(entries, LocalSession())
    after_stage1 = str(tmp_path / "1-fcos_resnet_mini" / "model.pt")
    assert measured == [start, start if reference == "run" else after_stage1]
