"""`curriculum predict` (issue 14): boxes in original-image pixels, best first, from a checkpoint or a YAML naming
a torchvision detector and its weights; a drawn PNG per image; clear errors for missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.models import get_model_builder

from curriculum.cli import main
from curriculum.data import Resize
from curriculum.errors import DataError
from curriculum.predict import load_predictor, predict, read_image
from teachers.zoo import build_detector

NAMES = ("__background__", "disk", "square", "triangle")


@pytest.fixture()
def photos(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (150, 230, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (260, 120, 3), dtype=np.uint8)).save(folder / "more" / "tall.png")
    return folder


def test_checkpoint_predictions_are_in_original_pixels(tmp_path, photos):
    torch.manual_seed(0)
    det = build_detector("retinanet_resnet_mini", 4, class_names=NAMES).eval()
    resize = Resize("keep_ratio", min_size=(128,), max_size=200)
    torch.save(det.checkpoint({"resize": resize.to_dict()}), tmp_path / "model.pt")
    rc = main(["predict", str(tmp_path / "model.pt"), str(photos), "--out", str(tmp_path / "out"),
               "--score-thresh", "0.0", "--quiet"])
    assert rc == 0
    entries = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(e["file_name"]).name for e in entries] == ["tall.png", "wide.jpg"]  # more/tall.png sorts first
    for e in entries:
        image = read_image(Path(e["file_name"]))
        assert (e["height"], e["width"]) == tuple(image.shape[-2:])
        view = resize.view(e["height"], e["width"], flip=False)
        det.set_thresholds(score_thresh=0.0)
        with torch.no_grad():
            want = det.predict([view.apply(image)])[0]
        order = torch.argsort(want["scores"], descending=True, stable=True)
        boxes = view.unmap_boxes(want["boxes"][order])
        assert len(e["boxes"]) == len(boxes) > 0
        assert np.allclose(e["boxes"], boxes.numpy(), atol=0.01)
        assert e["scores"] == sorted(e["scores"], reverse=True)
        assert all(0 <= b[0] <= b[2] <= e["width"] and 0 <= b[1] <= b[3] <= e["height"] for b in e["boxes"])
        assert e["label_names"] == [NAMES[k] for k in e["labels"]]
        drawn = Image.open(tmp_path / "out" / f"{Path(e['file_name']).stem}.png")
        assert drawn.size == (e["width"], e["height"])


def test_yaml_with_a_torchvision_detector_matches_torchvision(tmp_path, photos):
    torch.manual_seed(0)
    ref = get_model_builder("fcos_resnet50_fpn")(weights=None, weights_backbone=None, num_classes=91, min_size=224,
                                                 max_size=352, score_thresh=0.06).eval()
    torch.save(ref.state_dict(), tmp_path / "fcos.pth")
    cfg = {"model": {"name": "torchvision:fcos_resnet50_fpn", "weights": str(tmp_path / "fcos.pth"),
                     "num_classes": 91, "score_thresh": 0.06},
           "data": {"resize": "keep_ratio", "min_size": 224, "max_size": 352, "builtin": "none",
                    "root": str(tmp_path / "no-data")}}
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(cfg))
    entries = predict(tmp_path / "predict.yaml", [photos / "wide.jpg"], tmp_path / "out", progress=False)
    with torch.no_grad():
        want = ref([read_image(photos / "wide.jpg")])[0]
    assert len(entries[0]["boxes"]) == len(want["boxes"]) > 0
    assert np.abs(np.array(entries[0]["boxes"]) - want["boxes"].numpy()).max() < 0.05
    assert np.abs(np.array(entries[0]["scores"]) - want["scores"].numpy()).max() < 1e-4
    assert entries[0]["label_names"][0] in load_predictor(tmp_path / "predict.yaml").class_names  # COCO's names
    # --set reaches the resize: another min_size gives another input.
    small = load_predictor(tmp_path / "predict.yaml", ["data.min_size=160"])
    assert small.resize.min_size == (160,)


def test_missing_inputs_are_named(tmp_path):
    det = build_detector("fcos_mobilenetv3_micro", 4, class_names=NAMES)
    torch.save(det.checkpoint(), tmp_path / "model.pt")
    with pytest.raises(DataError, match="nope.jpg: no such image or folder"):
        predict(tmp_path / "model.pt", [tmp_path / "nope.jpg"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        predict(tmp_path / "model.pt", [tmp_path / "empty"], tmp_path / "out", progress=False)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "bad.png"), "--out", str(tmp_path / "o")]) == 2
