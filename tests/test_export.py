"""Shipping the student (issue 17): ONNX and TorchScript export with post-processing in the graph, checked by
onnxruntime against `curriculum predict`; latency of eager and onnxruntime; clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from curriculum.cli import main
from curriculum.data import Resize
from curriculum.export import ExportError, detection_differences, export_checkpoint, run_onnx
from curriculum.latency import latency_of_checkpoints
from curriculum.predict import Predictor
from teachers.zoo import build_detector

NAMES = ("__background__", "a", "b", "c")


def _checkpoint(tmp_path, name: str, resize: Resize | None = None):
    torch.manual_seed(0)
    det = build_detector(name, 4, class_names=NAMES, score_thresh=0.01).eval()
    path = tmp_path / f"{name}.pt"
    torch.save(det.checkpoint({"resize": (resize or Resize("fixed", (128, 128))).to_dict()}), path)
    return det, path


@pytest.mark.parametrize("name", ["retinanet_mobilenetv3_micro", "fcos_mobilenetv3_micro", "fasterrcnn_resnet_mini",
                                  "maskrcnn_resnet_mini"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_gives_predicts_detections(name, fmt, tmp_path):
    det, path = _checkpoint(tmp_path, name)
    out = tmp_path / f"m.{fmt}"
    info = export_checkpoint(path, fmt, out)
    assert info["input"] == [1, 3, 128, 128] and out.is_file() and not list(tmp_path.glob("*.tmp"))
    predictor = Predictor(det, Resize("fixed", (128, 128)), NAMES)
    g = torch.Generator().manual_seed(5)
    for hw in [(128, 128), (150, 210)]:  # an image of the input size, and one `predict` resizes
        image = torch.rand(3, *hw, generator=g)
        want = predictor(image)
        view = predictor.resize.view(*hw, flip=False)
        x = view.apply(image).clamp(0, 1)[None]
        if fmt == "onnx":
            boxes, scores, labels = run_onnx(out, x.numpy())
        else:
            boxes, scores, labels = (t.numpy() for t in torch.jit.load(str(out))(x))
        assert len(boxes) == len(want["boxes"]) > 0
        boxes = view.unmap_boxes(torch.from_numpy(boxes)).numpy()
        box, score = detection_differences((boxes, scores, labels), [want[k].numpy() for k in ("boxes", "scores",
                                                                                               "labels")])
        assert box < 0.5 and score < 1e-3


def test_export_errors_name_the_way_out(tmp_path, monkeypatch):
    _, keep = _checkpoint(tmp_path, "retinanet_mobilenetv3_micro", Resize("keep_ratio", min_size=(128,), max_size=200))
    with pytest.raises(ExportError, match="keep-ratio views.*give --image-size H W"):
        export_checkpoint(keep, "onnx", tmp_path / "x.onnx")
    info = export_checkpoint(keep, "onnx", tmp_path / "x.onnx", image_size=(128, 160))
    assert info["input"] == [1, 3, 128, 160]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(ExportError, match=r"onnxruntime is not installed: `pip install -e \.\[export\]`"):
        export_checkpoint(keep, "onnx", tmp_path / "y.onnx", image_size=(128, 160))
    assert not (tmp_path / "y.onnx").exists()


def test_cli_export_and_latency(tmp_path, capsys):
    _, path = _checkpoint(tmp_path, "fcos_mobilenetv3_micro")
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "s.onnx")]) == 0
    assert "input images [1, 3, 128, 128]" in capsys.readouterr().out
    assert main(["latency", str(path), "--threads", "1", "--runs", "3", "--json", str(tmp_path / "l.json")]) == 0
    (row,) = json.loads((tmp_path / "l.json").read_text())
    assert row["name"] == "fcos_mobilenetv3_micro" and row["threads"] == 1 and row["input"] == [1, 3, 128, 128]
    assert row["eager_ms"]["runs"] == 3 and 0 < row["eager_ms"]["median"] <= row["eager_ms"]["p90"]
    assert 0 < row["onnxruntime_ms"]["median"] <= row["onnxruntime_ms"]["p90"]
    assert f"| fcos_mobilenetv3_micro ({tmp_path.name}/fcos_mobilenetv3_micro.pt) | 1x3x128x128 | cpu, 1 |" in (
        capsys.readouterr().out)
    rows = latency_of_checkpoints([path], runs=2, batch=2)
    assert rows[0]["input"] == [2, 3, 128, 128]


def test_ap_vs_latency_draws_every_model_and_the_students_gain_as_an_arrow():
    from curriculum.report import ap_vs_latency_figure

    def row(name, role, ap, ms):
        return {"name": name, "role": role, "val": {"AP": ap}, "latency": {"eager_ms": {"median": ms}}}

    fig = ap_vs_latency_figure([row("baseline s", "baseline", 0.10, 5.0), row("teacher t", "teacher", 0.30, 40.0),
                                row("student after stage 1 (t)", "stage", 0.16, 5.2)])
    ax = fig.axes[0]
    offsets = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)
    assert offsets == [(5.0, 10.0), (5.2, 16.0), (40.0, 30.0)]
    texts = [t.get_text().strip() for t in ax.texts]
    assert "+6.0 AP" in texts and len([a for a in ax.texts if getattr(a, "arrow_patch", None) is not None]) == 1


def test_an_operator_onnx_cannot_export_is_named(tmp_path, monkeypatch):
    det, path = _checkpoint(tmp_path, "fcos_mobilenetv3_micro")

    def unsupported(*args, **kwargs):  # what torch's exporter raises for an op without an ONNX symbolic
        raise RuntimeError("Unsupported: ONNX export of operator roi_magic, some detail. Please feel free to request")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(ExportError, match=r"fcos_mobilenetv3_micro could not be exported to onnx: operator roi_magic\. "
                                          r"Try --format torchscript"):
        export_checkpoint(path, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob("*.tmp"))
