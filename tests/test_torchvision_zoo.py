"""torchvision's COCO detectors in the zoo (issue 14): the same detections as torchvision's own forward, the
recorded targets, and every way of giving weights (random, torch's hub cache, a state-dict file, a checkpoint)."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
from torchvision.models import get_model_builder, get_model_weights

from curriculum.data import Resize
from curriculum.errors import ModelError
from helpers import load_bench
from teachers.zoo import TORCHVISION_BUILDERS, build_detector, list_detectors, load_detector

MIN, MAX = 224, 352  # small inputs keep ResNet-50 fast on a CPU


def _reference(builder: str, num_classes: int = 91, **kw):
    prefix = "box_" if builder.startswith(("fasterrcnn", "maskrcnn")) else ""  # the project's defaults: 100 dets, NMS 0.5
    options = {f"{prefix}score_thresh": 0.01, f"{prefix}nms_thresh": 0.5, f"{prefix}detections_per_img": 100}
    torch.manual_seed(0)
    model = get_model_builder(builder)(weights=None, weights_backbone=None, num_classes=num_classes, min_size=MIN,
                                       max_size=MAX, **options, **kw).eval()
    with torch.no_grad():  # BatchNorm statistics off their defaults: freshly built nets score many boxes the same
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("builder", TORCHVISION_BUILDERS)
def test_same_detections_as_torchvisions_own_forward(builder, tmp_path):
    parity = load_bench("torchvision_teachers")  # the bench's parity measures, asserted here
    ref = _reference(builder)
    path = tmp_path / f"{builder}.pth"
    torch.save(ref.state_dict(), path)  # a state-dict file as torchvision publishes them
    det = build_detector(f"torchvision:{builder}", 91, weights=str(path), score_thresh=0.01).eval()
    assert det.config.class_names == tuple(get_model_weights(builder).DEFAULT.meta["categories"])
    g = torch.Generator().manual_seed(1)
    for hw in [(300, 450), (400, 260)]:
        img = torch.rand(3, *hw, generator=g)
        with torch.no_grad():
            want = ref([img])[0]
        view = Resize("keep_ratio", min_size=(MIN,), max_size=MAX).view(*hw, flip=False)
        got = det.predict([view.apply(img)])[0]
        assert len(want["boxes"]) > 0 and len(got["boxes"]) == len(want["boxes"])
        # The computation: the head's raw outputs against torchvision's own modules on its own transform.
        with torch.no_grad():
            assert parity.max_logit_difference(ref, det, img, view) < 1e-4
        if "mobilenet" in builder:
            # Random MobileNetV3 weights give many anchors the very same objectness: which tie makes the RPN's top-k
            # is float rounding (bench/torchvision_teachers.py: 82 to 98% of detections identical, logits to 1e-8).
            assert parity.identical_fraction(got, want, view.unmap_boxes(got["boxes"])) >= 0.7
            continue
        box_diff, score_diff = detection_differences(got, want, view)
        assert box_diff < 0.25 and score_diff < 1e-3  # float rounding (the normalisation runs after the resize)


def detection_differences(got: dict, want: dict, view) -> tuple[float, float]:
    """Largest box (original pixels) and score difference between matched detections (`curriculum.export`'s
    matching: each of ours against the reference detection of its label nearest in box and score)."""
    from curriculum.export import detection_differences as matched

    return matched([view.unmap_boxes(got["boxes"]).numpy(), got["scores"].numpy(), got["labels"].numpy()],
                   [want[k].numpy() for k in ("boxes", "scores", "labels")])


@pytest.mark.parametrize("builder", ["retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_records_what_distillation_needs(builder):
    det = build_detector(f"torchvision:{builder}", 5).train()
    images = [torch.rand(3, 224, 288), torch.rand(3, 256, 224)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 140.0]]), "labels": torch.tensor([1])}] * 2
    out = det(images, targets, want=("losses", "features", "head"))
    assert list(out.features) == det.level_names and all(n.startswith("p") for n in det.level_names)
    assert det.level_channels == {n: 256 for n in det.level_names}
    assert all(torch.isfinite(v) for v in out.losses.values())
    if det.kind == "one_stage":
        assert det.level_names == ["p3", "p4", "p5", "p6", "p7"]
        assert [t.shape[1] for t in out.head["cls_logits"]] == out.head["anchors_per_level"]
        assert out.head["cls_logits"][0].shape[-1] == 5
    else:
        assert det.level_names == ["p5", "p5_1", "p6"]  # MobileNetV3's FPN: two levels at stride 32
        boxes = [torch.tensor([[0.0, 0.0, 50.0, 60.0]]), torch.tensor([[5.0, 5.0, 100.0, 90.0]])]
        cls, reg = det.eval().score_boxes(out.features, boxes, out.image_sizes)
        assert cls.shape == (2, 5) and reg.shape == (2, 20)


def test_torchvision_names_are_listed_and_checked():
    assert {f"torchvision:{b}" for b in TORCHVISION_BUILDERS} <= set(list_detectors())
    with pytest.raises(ModelError, match="unknown torchvision detector 'torchvision:yolo'.*torchvision:retinanet"):
        build_detector("torchvision:yolo", 91)
    with pytest.raises(ModelError, match=r"options \['fpn_channels'\] belong to the zoo's own detectors"):
        build_detector("torchvision:retinanet_resnet50_fpn", 91, fpn_channels=64)


def test_a_state_dict_that_does_not_fit_says_which_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(_reference("fcos_resnet50_fpn").state_dict(), path)
    with pytest.raises(ModelError, match=r"other.pth does not fit torchvision:retinanet_resnet50_fpn: .*missing key"
                                         r".*head.classification_head.conv"):
        build_detector("torchvision:retinanet_resnet50_fpn", 91, weights=str(path))
    torch.save(_reference("retinanet_resnet50_fpn", num_classes=4).state_dict(), path)
    with pytest.raises(ModelError, match=r"shape mismatch.*cls_logits.weight .*num_classes"):
        build_detector("torchvision:retinanet_resnet50_fpn", 91, weights=str(path))


def test_coco_weights_from_the_hub_cache_or_a_clear_error(tmp_path, monkeypatch):
    builder = "fasterrcnn_mobilenet_v3_large_320_fpn"
    weights = get_model_weights(builder).DEFAULT
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match=rf"Place {weights.url} at {tmp_path}/hub/checkpoints/"
                                         rf"{os.path.basename(weights.url)}"):
        build_detector(f"torchvision:{builder}", 91, weights="torchvision")
    with pytest.raises(ModelError, match="have 91 classes.*num_classes is 4.*class_map"):
        build_detector(f"torchvision:{builder}", 4, weights="torchvision")
    # The file in torch's hub cache is what loads (made here: no download).
    ref = _reference(builder)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url))
    det = build_detector(f"torchvision:{builder}", 91, weights="torchvision")
    assert all(torch.equal(a, b) for a, b in zip(det.model.state_dict().values(), ref.state_dict().values()))


def test_project_checkpoint_of_a_torchvision_detector_round_trips(tmp_path):
    det = build_detector("torchvision:fcos_resnet50_fpn", 3, class_names=("__background__", "a", "b")).eval()
    torch.save(det.checkpoint(), tmp_path / "det.pt")
    again = load_detector(tmp_path / "det.pt").eval()
    same = build_detector("torchvision:fcos_resnet50_fpn", 3, weights=str(tmp_path / "det.pt")).eval()
    assert again.config.class_names == ("__background__", "a", "b")
    x = [torch.rand(3, 224, 256)]
    with torch.no_grad():
        a, b, c = det(x, want=("features",)), again(x, want=("features",)), same(x, want=("features",))
    assert all(torch.equal(a.features[k], b.features[k]) and torch.equal(a.features[k], c.features[k])
               for k in a.features)


def test_torchvision_names_make_portable_folder_names(tmp_path):
    from curriculum.config import RunJobConfig, config_from_dict
    from curriculum.pipeline import teacher_checkpoint
    from curriculum.plan import build_plan

    job = config_from_dict(RunJobConfig, {"teachers_dir": str(tmp_path), "teachers": [
        {"name": "torchvision:retinanet_resnet50_fpn_v2", "weights": "torchvision"}], "direct": True})
    path = teacher_checkpoint(job, job.teachers[0].name, None)
    assert ":" not in str(path.relative_to(tmp_path)) and path.parent.name.startswith("torchvision-retinanet")
    (stage,) = build_plan(job, {job.teachers[0].name: str(path)}, [job.teachers[0].name])
    assert stage.name == "1-torchvision-retinanet_resnet50_fpn_v2" and stage.teacher == job.teachers[0].name
