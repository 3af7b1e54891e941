"""The command line: user errors print one clear message (exit 2); eval reads a checkpoint and writes results."""

from __future__ import annotations

import json

import torch

from curriculum.cli import main
from teachers.zoo import build_detector


def test_data_shapes_command(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "d"), "--train", "4", "--val", "2", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["images"] == 4 and summary["val"]["images"] == 2
    assert (tmp_path / "d" / "train" / "instances.json").is_file()


def test_zoo_lists_builtin_members(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "retinanet_mobilenetv3_micro" in out and "fasterrcnn_swin_mini" in out and "resnet101" not in out


def test_bad_config_is_one_clear_message(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: retinanet_resnet9}\n")
    assert main(["train", str(cfg), "--set", "train.epochs=1", "--set", "data.builtin=none",
                 "--set", f"data.root={tmp_path}/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curriculum: error:") and "Traceback" not in err
    cfg.write_text("train: {epochs: 1}\nmodle: {}\n")
    assert main(["train", str(cfg)]) == 2
    assert "unknown key 'modle' (did you mean 'model'?)" in capsys.readouterr().err


def test_misspelt_detector_fails_before_any_work(tmp_path, capsys):
    """A misspelt name stops `run`, `tune` and `train` before the built-in data set or an output folder exist."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/out\ndata: {{root: {tmp_path}/data, builtin: shapes}}\n"
                   "student: {name: fcos_mobilenetv3_micor}\nteachers: [{name: fcos_resnet_mini}]\n")
    for argv in (["run", str(cfg)], ["tune", str(cfg), "--space", "mgd", "--num-samples", "1"]):
        assert main(argv + ["--quiet"]) == 2
        err = capsys.readouterr().err
        assert str(cfg) in err and "student.name" in err and "'fcos_mobilenetv3_micor'" in err, err
    cfg.write_text(f"output_dir: {tmp_path}/out\ndata: {{root: {tmp_path}/data, builtin: shapes}}\n"
                   "teachers: [{name: fcos_resnet_mini}, {name: fcos_resnet18_hlaf}]\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "teachers[1].name" in capsys.readouterr().err
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(f"output_dir: {tmp_path}/out\ndata: {{root: {tmp_path}/data, builtin: shapes}}\n"
                         "model: {name: fcos_mobilenetv3_micor}\n")
    assert main(["train", str(train_cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(train_cfg) in err and "model.name" in err and "'fcos_mobilenetv3_micor'" in err, err
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_missing_annotation_file_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/out\ndata: {{root: {tmp_path}/none, builtin: none}}\n")
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "instances.json" in err and "Traceback" not in err


def test_eval_command_writes_metrics_and_detections(shapes_root, tmp_path, capsys):
    det = build_detector("retinanet_mobilenetv3_micro", 7)
    torch.save(det.checkpoint(), tmp_path / "model.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{root: {shapes_root}, builtin: none}}\n")
    assert main(["eval", str(tmp_path / "model.pt"), "--config", str(cfg), "--max-images", "8", "--quiet",
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "eval_val.json").read_text())
    assert metrics["images"] == 8 and 0.0 <= metrics["AP"] <= 1.0
    dets = json.loads((tmp_path / "ev" / "detections_val.json").read_text())
    assert all(d["category_id"] in {1, 2, 3, 5, 7, 9} for d in dets)
    # A checkpoint of a model for another number of classes is refused with both counts named.
    torch.save(build_detector("retinanet_mobilenetv3_micro", 4).checkpoint(), tmp_path / "other.pt")
    assert main(["eval", str(tmp_path / "other.pt"), "--config", str(cfg), "--quiet"]) == 2
    assert "predicts 3 classes" in capsys.readouterr().err
