"""Several teachers in one stage (issue 15): the joint distiller against a hand computation and against each
teacher's own distiller, the config's checks, the plan, and a whole stage on Ray Train from two caches."""

from __future__ import annotations

import json

import pytest
import torch

from curriculum.config import RunJobConfig, config_from_dict
from curriculum.errors import ConfigError
from curriculum.plan import build_plan, direct_stage
from trainers.distill import TeacherTargets, build_distiller, build_joint_distiller

S = {"p3": 2}


def _t(seed: int, c: int = 2) -> torch.Tensor:
    return torch.randn(1, c, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_each_teacher_term_is_its_hint_times_its_weight():
    d = build_joint_distiller([{"name": "fitnet", "adapter_init": "identity"}], S,
                              [("a", {"p3": 2}, 2.0), ("b", {"p3": 2}, 0.5)])
    s, ta, tb = _t(0), _t(1), _t(2)
    out = d({"features": {"p3": s}}, {"a": TeacherTargets(features={"p3": ta}),
                                      "b": TeacherTargets(features={"p3": tb})})
    assert set(out) == {"distill_fitnet@a", "distill_fitnet@b"}
    assert out["distill_fitnet@a"].item() == pytest.approx(2.0 * ((s - ta) ** 2).mean().item(), rel=1e-6)
    assert out["distill_fitnet@b"].item() == pytest.approx(0.5 * ((s - tb) ** 2).mean().item(), rel=1e-6)
    assert d.teachers == {"fitnet@a": "a", "fitnet@b": "b"}


def test_each_teacher_has_its_own_adapters_and_matches_its_single_teacher_distiller():
    entries = [{"name": "mgd", "preset": "retinanet"}]
    d = build_joint_distiller(entries, S, [("a", {"p3": 3}, 1.0), ("b", {"p3": 5}, 0.25)])
    adapters = {k: [p.shape for p in term.parameters()] for k, term in d.terms.items()}
    assert adapters["mgd@a"] != adapters["mgd@b"]  # mapped into each teacher's channels
    s = _t(0)
    tt = {"a": TeacherTargets(features={"p3": _t(1, 3)}), "b": TeacherTargets(features={"p3": _t(2, 5)})}
    out = d({"features": {"p3": s}}, tt, generator=torch.Generator().manual_seed(4))
    # The same terms alone, with the joint's weights, in the order the joint draws MGD's masks.
    g = torch.Generator().manual_seed(4)
    for name, weight, c in (("a", 1.0, 3), ("b", 0.25, 5)):
        single = build_distiller(entries, S, {"p3": c})
        single.terms["mgd"].load_state_dict(d.terms[f"mgd@{name}"].state_dict())
        ref = single({"features": {"p3": s}}, tt[name], generator=g)["distill_mgd"]
        assert out[f"distill_mgd@{name}"].item() == pytest.approx(weight * ref.item(), rel=1e-6)


def test_one_teacher_keeps_the_plain_keys_and_a_missing_teachers_targets_are_named():
    d = build_joint_distiller([{"name": "fitnet"}], S, [("a", {"p3": 2}, 3.0)])
    assert list(d.terms) == ["fitnet"] and d.weights == {"fitnet": 3.0} and not d.teachers
    joint = build_joint_distiller([{"name": "fitnet"}], S, [("a", {"p3": 2}, 1.0), ("b", {"p3": 2}, 1.0)])
    with pytest.raises(ConfigError, match=r"missing \['b'\]"):
        joint({"features": {"p3": _t(0)}}, {"a": TeacherTargets(features={"p3": _t(1)})})
    roi = build_joint_distiller([{"name": "tar_cls"}], None, [("a", None, 1.0), ("b", None, 1.0)])
    assert roi.required_teacher_targets("a") == build_distiller([{"name": "tar_cls"}]).required_teacher_targets()


def _job(**kw) -> RunJobConfig:
    base = {"teachers": [{"name": "fcos_resnet_mini"}, {"name": "fcos_resnet18_half"}, {"name": "fcos_swin_mini"}],
            "stages": [{"epochs": 2, "teachers": ["fcos_resnet_mini", "fcos_resnet18_half"]},
                       {"epochs": 3, "teachers": [{"name": "fcos_swin_mini", "weight": 2}]}]}
    base.update(kw)
    return config_from_dict(RunJobConfig, base)


CKPTS = {"fcos_resnet_mini": "a.pt", "fcos_resnet18_half": "b.pt", "fcos_swin_mini": "c.pt"}


def test_stages_that_name_their_teachers_keep_them_with_their_weights():
    job = _job()
    stages = build_plan(job, CKPTS, [t.name for t in job.teachers])
    assert [s.name for s in stages] == ["1-fcos_resnet_mini+fcos_resnet18_half", "2-fcos_swin_mini"]
    assert [[(t.name, t.checkpoint, t.weight) for t in s.teachers] for s in stages] == [
        [("fcos_resnet_mini", "a.pt", 1.0), ("fcos_resnet18_half", "b.pt", 1.0)], [("fcos_swin_mini", "c.pt", 2.0)]]
    assert stages[0].teacher == "fcos_resnet_mini+fcos_resnet18_half" and [s.epochs for s in stages] == [2, 3]
    d = direct_stage(job, stages)
    assert d.name == "direct-fcos_swin_mini" and d.epochs == 5 and d.teachers[0].weight == 2.0
    assert stages[0].to_dict()["teachers"][1]["name"] == "fcos_resnet18_half"
    assert type(stages[0]).from_dict(stages[0].to_dict()) == stages[0]


@pytest.mark.parametrize("kw, match", [
    ({"stages": [{"teachers": ["fcos_resnet_mini", "fcos_resnet18_half", "fcos_swin_mini"]}, {"epochs": 2}]},
     "name no teachers while others do"),
    ({"order": "auto"}, "need order: given"),
    ({"stages": [{"teachers": ["fcos_resnet_mini", "resnet"]}]}, r"'resnet' is not one of the run's teachers"),
    ({"stages": [{"teachers": ["fcos_resnet_mini", "fcos_resnet18_half"]}]}, r"\['fcos_swin_mini'\] are in no stage"),
    ({"stages": [{"teachers": [{"name": "fcos_resnet_mini", "weight": 0}]}]}, "weight must be a positive number"),
    ({"stages": [{"teachers": [{"name": "fcos_resnet_mini", "w": 1}]}]}, r"give a teacher's name or \{name"),
    ({"stages": [{"teachers": []}]}, "an empty list"),
    ({"stages": [{"teachers": ["fcos_swin_mini", "fcos_swin_mini"]}]}, "names a teacher twice"),
])
def test_stage_teachers_are_checked_when_the_config_loads(kw, match):
    with pytest.raises(ConfigError, match=match):
        _job(**kw)


def test_the_quick_preset_keeps_the_stages_teachers_and_caps_a_teachers_own_schedule(tmp_path):
    import yaml

    from curriculum.pipeline import load_run_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "teachers": [{"name": "fcos_resnet_mini"}, {"name": "fcos_swin_mini", "train": {"epochs": 20, "lr": 5e-4}}],
        "stages": [{"epochs": 4, "teachers": ["fcos_resnet_mini", "fcos_swin_mini"]}]}))
    job = load_run_config(cfg, preset="quick")
    assert job.stages[0].epochs == 1 and job.stages[0].teachers == ["fcos_resnet_mini", "fcos_swin_mini"]
    swin = job.teachers[1].schedule(job.teacher_train)
    assert (swin.epochs, swin.max_iters_per_epoch, swin.lr) == (2, 40, 5e-4)
    with pytest.raises(ConfigError, match="teachers\\[\\] fcos_swin_mini: train: .*lrr"):
        config_from_dict(RunJobConfig, {"teachers": [{"name": "fcos_swin_mini", "train": {"lrr": 1}}]})


def test_a_teachers_own_schedule_trains_it_and_enters_its_hash(tmp_path):
    from curriculum.pipeline import teacher_checkpoint, teacher_train_job

    job = config_from_dict(RunJobConfig, {
        "teachers_dir": str(tmp_path), "teacher_train": {"epochs": 6},
        "teachers": [{"name": "fcos_resnet_mini"}, {"name": "fcos_swin_mini", "train": {"epochs": 16, "lr": 5e-4}}]})
    plain = config_from_dict(RunJobConfig, {"teachers_dir": str(tmp_path), "teacher_train": {"epochs": 6},
                                            "teachers": [{"name": "fcos_swin_mini"}]})
    tjob = teacher_train_job(job, "fcos_swin_mini", "out")
    assert (tjob.train.epochs, tjob.train.lr) == (16, 5e-4)
    assert teacher_train_job(job, "fcos_resnet_mini", "out").train == job.teacher_train
    assert teacher_checkpoint(job, "fcos_swin_mini", None) != teacher_checkpoint(plain, "fcos_swin_mini", None)
    assert teacher_checkpoint(job, "fcos_resnet_mini", None).parent.name.startswith("fcos_resnet_mini-")


def test_a_stage_distils_from_two_cached_teachers_at_once(tmp_path, shapes_root, ray_session, monkeypatch):
    import trainers.ray_train as ray_train
    from curriculum.pipeline import run_pipeline
    from test_pipeline import tiny

    cfg = tiny(shapes_root, tmp_path, tmp_path / "run",
               teachers=[{"name": "fcos_resnet_mini"}, {"name": "retinanet_resnet_mini"}],
               stages=[{"epochs": 1, "teachers": [{"name": "fcos_resnet_mini", "weight": 0.5},
                                                   "retinanet_resnet_mini"]}])
    fitted = []
    fit = ray_train.fit_sequence_on_ray
    monkeypatch.setattr(ray_train, "fit_sequence_on_ray", lambda entries, **kw: fitted.append(entries) or fit(
        entries, **kw))
    run_pipeline(config_from_dict(RunJobConfig, cfg), progress=False)
    sdir = tmp_path / "run" / "stages" / "1-fcos_resnet_mini+retinanet_resnet_mini"
    done = json.loads((sdir / "done.json").read_text())
    members = done["stage"]["teachers"]
    assert [(m["name"], m["weight"]) for m in members] == [("fcos_resnet_mini", 0.5), ("retinanet_resnet_mini", 1.0)]
    assert all(m["cache"] for m in members) and members[0]["cache"] != members[1]["cache"]
    # One kd_ratio factor for both teachers' feature terms (their weights keep their ratio).
    factors = done["loss_factors"]
    assert set(factors) == {"mgd@fcos_resnet_mini", "mgd@retinanet_resnet_mini"}
    assert len(set(factors.values())) == 1
    record = done["history"][-1]
    record = record.get("losses", record)
    assert record["distill_mgd@fcos_resnet_mini"] > 0 and record["distill_mgd@retinanet_resnet_mini"] > 0
    saved = torch.load(sdir / "distiller.pt", weights_only=True)["state"]
    assert any(k.startswith("terms.mgd@retinanet_resnet_mini.") for k in saved)

    # The workers calibrated through the run's shard stores; the same calibration from the caches' Parquet shards
    # gives the same factors, and a second one through a filled store decodes nothing again.
    from curriculum.config import TrainJobConfig
    from teachers.readers import ObjectStoreShards
    from trainers.distillation import calibrate_factors

    (entry,) = [e for e in fitted[0] if e.name == "1-fcos_resnet_mini+retinanet_resnet_mini"]
    loop = ray_train.LoopConfig(**entry.loop)
    job = config_from_dict(TrainJobConfig, loop.job)
    assert calibrate_factors(job, loop.stage, loop.init, loop.memory_bytes) == pytest.approx(factors, rel=1e-5)
    stores = {m["name"]: ObjectStoreShards(m["cache"], budget_bytes=1 << 28) for m in members}
    try:
        names = {t: st.name for t, st in stores.items()}
        assert calibrate_factors(job, loop.stage, loop.init, loop.memory_bytes, shard_stores=names) == pytest.approx(
            factors, rel=1e-5)
        loads = {t: st.stats()["loads"] for t, st in stores.items()}
        assert all(n > 0 for n in loads.values())
        assert calibrate_factors(job, loop.stage, loop.init, loop.memory_bytes, shard_stores=names) == pytest.approx(
            factors, rel=1e-5)
        assert {t: st.stats()["loads"] for t, st in stores.items()} == loads
    finally:
        for st in stores.values():
            st.close()
