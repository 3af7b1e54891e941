"""A teacher of another library through `teachers.adapter` (issue 14): the worked example agrees with the zoo's
wrapping of the same torchvision model, errors name the entry, and a curriculum run distils from an adapter."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models import get_model_builder

from curriculum.config import RunJobConfig, config_from_dict
from curriculum.data import Resize
from curriculum.errors import ConfigError
from curriculum.pipeline import check_run_config, run_pipeline
from examples.torchvision_teacher import TorchvisionRetinaNetTeacher
from teachers.adapter import AdapterSource, load_adapter
from teachers.targets import TeacherTargets
from teachers.zoo import build_detector
from trainers.distill import build_distiller
from trainers.distillation import DistillStep

from test_pipeline import tiny


def test_the_worked_example_gives_the_zoos_targets(tmp_path):
    torch.manual_seed(0)
    ref = get_model_builder("retinanet_resnet50_fpn")(weights=None, weights_backbone=None, num_classes=91)
    torch.save(ref.state_dict(), tmp_path / "r.pth")
    adapter = load_adapter("examples.torchvision_teacher:TorchvisionRetinaNetTeacher",
                           {"builder": "retinanet_resnet50_fpn", "state_dict": str(tmp_path / "r.pth")})
    assert isinstance(adapter, TorchvisionRetinaNetTeacher) and adapter.class_names[1] == "person"
    zoo = build_detector("torchvision:retinanet_resnet50_fpn", 91, weights=str(tmp_path / "r.pth"))
    resize = Resize("keep_ratio", min_size=(160,), max_size=256)
    raw = [torch.rand(3, 200, 300), torch.rand(3, 200, 300)]
    views = [resize.view(200, 300, flip=False)] * 2
    images = [v.apply(im) for v, im in zip(views, raw)]
    got = AdapterSource(adapter)(images, [{"image_id": 7, "view": views[0]}, {"image_id": 8, "view": views[1]}])
    want = TeacherTargets.inline(zoo, images)
    assert got.image_ids == [7, 8] and list(got.features) == ["p3", "p4", "p5", "p6", "p7"]
    for lvl in want.features:
        assert torch.equal(got.features[lvl], want.features[lvl])
    for a, b in zip(got.cls_logits, want.cls_logits):
        assert torch.equal(a, b)
    # It feeds the distillation step as any source does: MGD on its features, gradients to the student only.
    student = build_detector("retinanet_mobilenetv3_micro", 91).train()
    distiller = build_distiller([{"name": "mgd", "preset": "retinanet"}], student.level_channels, adapter.level_channels)
    out = student(images, [{"boxes": torch.tensor([[10.0, 10.0, 90.0, 80.0]]), "labels": torch.tensor([1])}] * 2,
                  want=("losses", "features", "head"))
    terms = DistillStep(AdapterSource(adapter), distiller)(out, [{"image_id": 7, "view": views[0], "boxes": torch.zeros(
        0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2, images)
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is None for p in adapter.model.parameters())


def test_bad_adapters_name_the_entry():
    with pytest.raises(ConfigError, match="x: 'nocolon' must be 'package.module:ClassName'"):
        load_adapter("nocolon", where="x")
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.mod'"):
        load_adapter("no_such_pkg.mod:Cls")
    with pytest.raises(ConfigError, match="not a subclass of teachers.adapter.TeacherAdapter"):
        load_adapter("teachers.zoo:Detector")
    with pytest.raises(ConfigError, match=r"does not take adapter_args \['colour'\]"):
        load_adapter("tests.adapters:ZooTeacher", {"colour": "red"})
    job = config_from_dict(RunJobConfig, {"teachers": [{"name": "mine", "adapter": "tests.adapters:Nope"}],
                                          "order": "auto"})
    with pytest.raises(ConfigError, match=r"run.yaml: teachers\[0\].adapter: 'tests.adapters:Nope' is not a subclass"):
        check_run_config(job, "run.yaml")
    with pytest.raises(ConfigError, match="drop checkpoint and weights"):
        config_from_dict(RunJobConfig, {"teachers": [{"name": "m", "adapter": "a:B", "weights": "torchvision"}]})


def test_a_run_distils_from_an_adapter_teacher(tmp_path, shapes_root, ray_session):
    cfg = tiny(shapes_root, tmp_path, tmp_path / "run", stages=[{"epochs": 1}],
               teachers=[{"name": "other_library", "adapter": "tests.adapters:ZooTeacher",
                          "adapter_args": {"name": "retinanet_resnet_mini", "num_classes": 7}}])
    job = config_from_dict(RunJobConfig, cfg)
    run_pipeline(job, progress=False)
    done = json.loads((tmp_path / "run" / "stages" / "1-other_library" / "done.json").read_text())
    (member,) = done["stage"]["teachers"]
    assert member["adapter"]["target"] == "tests.adapters:ZooTeacher" and member["cache"] is None
    losses = done["history"][-1]
    assert any(k.startswith("distill_") and v > 0 for k, v in losses.get("losses", losses).items()
               if isinstance(v, float)), losses
    report = (tmp_path / "run" / "report" / "results.md").read_text()
    assert "other_library" in report
