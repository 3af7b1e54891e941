"""Typed config: every bad key or value is named, with the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from curriculum.config import TrainJobConfig, config_from_dict, load_config
from curriculum.errors import ConfigError


def test_defaults_and_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: fcos_resnet_mini}\ntrain: {epochs: 3, lr: 1e-4, batch_size: 4}\n")
    cfg = load_config(p)
    assert cfg.model.name == "fcos_resnet_mini"
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.data.image_size == 128 and cfg.data.flip == "random"


@pytest.mark.parametrize(
    "text, match",
    [
        ("trian: {epochs: 3}", r"unknown key 'trian' \(did you mean 'train'\?\)"),
        ("train: {epoch: 3}", r"unknown key 'epoch' \(did you mean 'epochs'\?\); allowed keys: epochs"),
        ("train: {epochs: three}", r"train.epochs: 'three' is not an integer"),
        ("train: {epochs: 2.5}", r"train.epochs: 2.5 is not an integer"),
        ("train: {optimizer: adam}", r"train.optimizer: 'adam' is not allowed; expected one of 'sgd', 'adamw'"),
        ("data: {flip: sometimes}", r"data.flip: 'sometimes' is not allowed"),
        ("train: {lr: -1}", r"train.lr: must be positive"),
        ("train: {batch_size: 0}", r"train.batch_size: must be positive"),
        ("train: 5", r"train: expected a mapping of TrainConfig keys"),
        ("- a\n- b", r"top level must be a mapping"),
        ("train: {epochs: [1, 2", r"not valid YAML"),
        ("train: {grad_clip: true}", r"train.grad_clip: True is not a number"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value)


def test_overrides_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {epochs: 3}\n")
    cfg = load_config(p, TrainJobConfig, ["train.epochs=5", "model.name=fcos_resnet_mini", "data.shapes.seed=3"])
    assert cfg.train.epochs == 5 and cfg.model.name == "fcos_resnet_mini" and cfg.data.shapes.seed == 3
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, TrainJobConfig, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_is_data_not_code(tmp_path):
    """Python tags are refused by safe_load: config text is never evaluated."""
    p = tmp_path / "evil.yaml"
    p.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_optional_fields():
    cfg = config_from_dict(TrainJobConfig, {"model": {"fpn_channels": None, "head_convs": 3}})
    assert cfg.model.fpn_channels is None and cfg.model.head_convs == 3
    with pytest.raises(ConfigError, match="model.fpn_channels: 'wide' is not an integer or null"):
        config_from_dict(TrainJobConfig, {"model": {"fpn_channels": "wide"}})


def test_run_config_sections_compose_and_worker_hooks_are_checked():
    from curriculum.config import CacheStorage, RunJobConfig, TeacherActors, section_values

    job = config_from_dict(RunJobConfig, {"teachers": [{"name": "fcos_resnet_mini", "io_workers": 3}],
                                          "cache": {"shard_size": 16, "object_store": False},
                                          "trainer": {"worker_hooks": [{"call": "tests.faults:die_once",
                                                                        "args": {"at_epoch": 1}}]}})
    assert section_values(job.teachers[0], TeacherActors)["io_workers"] == 3
    assert section_values(job.cache, CacheStorage)["shard_size"] == 16 and "object_store" not in section_values(
        job.cache, CacheStorage)
    for bad in ({"call": "no_colon"}, {"call": "m:f", "extra": 1}, {"call": "m:f", "args": [1]}, "m:f"):
        with pytest.raises(ConfigError, match=r"trainer.worker_hooks\[0\]"):
            config_from_dict(RunJobConfig, {"trainer": {"worker_hooks": [bad]}})


def test_teacher_class_map_is_auto_a_mapping_or_null(tmp_path):
    from curriculum.config import RunJobConfig

    p = tmp_path / "run.yaml"
    p.write_text("teachers: [{name: fcos_resnet_mini, class_map: auto},\n"
                 "           {name: retinanet_resnet_mini, class_map: {hound: dog, Person: person}},\n"
                 "           {name: fcos_mobilenetv3_micro}]\n")
    job = load_config(p, RunJobConfig)
    assert [t.class_map for t in job.teachers] == ["auto", {"hound": "dog", "Person": "person"}, None]
    for value, match in (("[dog, person]", r"teachers\[0\].class_map: \['dog', 'person'\] is not a string or a "
                                           r"mapping \{string: string\} or null"),
                         ("{dog: 3}", r"teachers\[0\].class_map: \{'dog': 3\} is not"),
                         ("names", r"class_map: 'names'; use 'auto'")):
        p.write_text(f"teachers: [{{name: fcos_resnet_mini, class_map: {value}}}]\n")
        with pytest.raises(ConfigError, match=match) as e:
            load_config(p, RunJobConfig)
        assert "run.yaml" in str(e.value)


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_passes_the_early_checks(path):
    """The configs in configs/ (the README points at them) load and name only zoo detectors."""
    from curriculum.config import RunJobConfig
    from curriculum.pipeline import check_run_config

    text = Path(path).read_text()
    if "teachers:" in text:
        job = load_config(path, RunJobConfig)
        check_run_config(job, path)
        if "distil_coco_torchvision" in path:
            assert job.data.resize_spec("train").multi_scale and job.data.resize_spec("val").min_size == (800,)
            assert [t.weights for t in job.teachers] == ["torchvision", "torchvision"]
    else:
        load_config(path, TrainJobConfig)


def test_reading_the_principal_components_needs_them_and_a_loss_that_can_use_them():
    from curriculum.config import RunCacheConfig
    from curriculum.pipeline import check_run_config, load_run_config

    with pytest.raises(ConfigError, match="cache.features: components needs compression.pca"):
        RunCacheConfig(features="components")
    root = Path(__file__).resolve().parents[1]
    sets = ["cache.features=components", "cache.compression={dtype: int8, pca: 32}"]
    check_run_config(load_run_config(root / "configs" / "run_default.yaml", sets))  # MGD: fine
    with pytest.raises(ConfigError, match=r"\['zhang_attention'\] read the teacher's own feature channels"):
        load_run_config(root / "configs" / "run_default.yaml", sets + ["losses=[{name: mgd}, {name: zhang_attention}]"])
