"""Typed configuration loaded from YAML.

Every section is a dataclass; `load_config` checks each key against it and names the file, the key and
the allowed values when something is wrong. YAML is parsed with `yaml.safe_load`: config text is data, never
code.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curriculum.errors import ConfigError


@dataclass
class ShapesConfig:
    """Parameters of the built-in synthetic data set (`curriculum data shapes`)."""

    train: int = 1200
    val: int = 300
    seed: int = 0
    varied_sizes: bool = False  # each image its own height and width (shorter side 0.75..1.25 x image_size)


@dataclass
class DataConfig:
    """Where the images and COCO instance files are. Defaults: the built-in data set under `root`.

    With `builtin: shapes` the data set is generated under `root` when it is missing.
    """

    root: str = "data/shapes"
    builtin: Literal["shapes", "none"] = "shapes"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    train_images: str | None = None  # default: <root>/train/images
    train_annotations: str | None = None  # default: <root>/train/instances.json
    val_images: str | None = None
    val_annotations: str | None = None
    resize: Literal["fixed", "keep_ratio"] = "fixed"
    image_size: int = 128  # resize: fixed (square)
    min_size: int | list[int] = 800  # resize: keep_ratio, the shorter side; a list: one per image and epoch
    max_size: int = 1333  # resize: keep_ratio, cap on the longer side
    flip: Literal["none", "random", "always"] = "random"
    on_bad_box: Literal["clip", "drop", "error"] = "clip"
    workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        self.resize_spec()

    def resize_spec(self, split: Literal["train", "val"] = "train") -> Any:
        """The `curriculum.data.Resize` of a split (val: the largest min_size)."""
        from curriculum.data import Resize

        try:
            r = Resize(self.resize, (self.image_size, self.image_size), self.min_size, self.max_size)
        except ConfigError as e:
            raise ConfigError(f"data: {e}") from None
        return r if split == "train" else r.for_eval()

    def split_paths(self, split: Literal["train", "val"]) -> tuple[Path, Path]:
        images = getattr(self, f"{split}_images") or str(Path(self.root) / split / "images")
        ann = getattr(self, f"{split}_annotations") or str(Path(self.root) / split / "instances.json")
        return Path(images), Path(ann)


@dataclass
class ModelConfig:
    """A zoo detector: `name` is <head>_<backbone> or torchvision:<builder> (`curriculum zoo --all` lists them).

    weights: random | timm | torchvision (timm bodies: ImageNet weights of the full ResNets; torchvision:<builder>:
      its COCO weights) | the path of a project checkpoint or of a torchvision state-dict file.
    num_classes: label slots, background included; null: the data's (`curriculum predict`: 91 for a torchvision
      detector with its COCO weights).
    """

    name: str = "retinanet_mobilenetv3_micro"
    weights: str = "random"
    num_classes: int | None = None
    fpn_channels: int | None = None
    head_convs: int | None = None
    anchor_scale: float = 2.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "num_classes")}


@dataclass
class TrainConfig:
    """The optimisation schedule of plain (non-distilled) training."""

    epochs: int = 12
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_iters: int = 100
    grad_clip: float = 10.0  # max gradient norm; 0 disables
    # false: norms, biases and position tables get no weight decay (the usual transformer recipe)
    decay_norm_and_bias: bool = True
    eval_every: int = 0  # evaluate on val every N epochs (0: only at the end)
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    seed: int = 0
    max_iters_per_epoch: int = 0  # 0: the whole training split (a smaller value is for smoke tests)


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_images: int = 0  # 0: the whole val split


@dataclass
class TrainJobConfig:
    """`curriculum train CONFIG`: one detector trained without distillation, then evaluated."""

    output_dir: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------- generic loader


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is dict:
        args = typing.get_args(tp)
        if not args or Any in args:
            return "a mapping"
        short = {int: "integer", float: "number", str: "string", bool: "boolean"}
        return "a mapping {" + ": ".join(short.get(a, _type_name(a)) for a in args) + "}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{where} (key {k!r})"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    obj = cls(**kwargs)
    _check_ranges(obj, where)
    return obj


_POSITIVE = {"epochs", "batch_size", "image_size", "train", "val", "lr", "detections_per_img"}
_NON_NEGATIVE = {"weight_decay", "momentum", "warmup_iters", "grad_clip", "eval_every", "num_threads",
                 "max_iters_per_epoch", "max_images", "workers", "score_thresh"}


def _check_ranges(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        key = f"{where}.{f.name}" if where else f.name
        if f.name in _POSITIVE and v <= 0:
            raise ConfigError(f"{key}: must be positive, got {v}")
        if f.name in _NON_NEGATIVE and v < 0:
            raise ConfigError(f"{key}: must be zero or more, got {v}")


def config_from_dict(cls: type, data: dict[str, Any] | None, source: str = "config") -> Any:
    """Build the dataclass `cls` from a plain mapping, checking every key and value."""
    try:
        return _build(cls, data or {}, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, cls: type = TrainJobConfig, overrides: list[str] | None = None) -> Any:
    """Load a YAML config file into `cls`; `overrides` are `section.key=value` strings (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    apply_overrides(data, overrides or [])
    return config_from_dict(cls, data, str(path))


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """`data[a][b]...[z] = value` for the dotted `key` "a.b...z"; a number selects a list entry ("stages.0.epochs")."""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"key {key!r}: {part!r} is not an entry of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"key {key!r}: {'.'.join(parts[:i])!r} is not a section or a list")


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) or a {dotted key: value} mapping to `data`."""
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected section.key=value")
            parsed.append((key, yaml.safe_load(raw)))
        items = parsed
    for key, value in items:
        set_key(data, key, value)
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ------------------------------------------------------------------------------------------- teacher cache
# Sections of `curriculum precompute CONFIG` (issue 3): teachers run as Ray actors over the data set and their
# outputs are written to a Parquet cache (teachers/cache.py, teachers/pool.py).


def section_values(obj: Any, section: type) -> dict[str, Any]:
    """`obj`'s values of the fields `section` declares (`obj` an instance of `section` or of a subclass): a run's
    teacher as the precompute's `TeacherSpec` fields, a run's cache section as `CacheConfig` fields."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(section)}


@dataclass
class TeacherActors:
    """The precompute actors of one teacher and their Ray resources (fractions allowed)."""

    actors: int = 1  # actors of this teacher (each loads the teacher once)
    cpus_per_actor: float = 1.0  # fractions allowed
    gpus_per_actor: float = 0.0  # fractions allowed; autocast is used on GPU
    batch_size: int = 8  # images per forward inside an actor
    threads: int = 0  # torch intra-op threads per actor; 0: max(1, round(cpus_per_actor))
    shards_in_flight: int = 2  # per actor: one shard's decode/encode/write overlaps the next one's forward
    # Processes per actor that decode images and encode, compress and write shards. One keeps up with a CPU
    # forward; a GPU teacher outpaces it (bench/precompute.py prints how many a given forward rate needs): raise
    # this and shards_in_flight together (each shard in flight has at most one encode running).
    io_workers: int = 2

    def __post_init__(self) -> None:
        if self.shards_in_flight < 1:
            raise ConfigError(f"teachers[].shards_in_flight: must be at least 1, got {self.shards_in_flight}")
        if self.io_workers < 1:
            raise ConfigError(f"teachers[].io_workers: must be at least 1, got {self.io_workers}")
        if self.actors < 1:
            raise ConfigError(f"teachers[].actors: must be at least 1, got {self.actors}")
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise ConfigError("teachers[]: an actor needs some CPU or GPU (cpus_per_actor or gpus_per_actor > 0)")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.threads < 0:
            raise ConfigError("teachers[]: cpus_per_actor, gpus_per_actor and threads must be zero or more")


@dataclass
class TeacherSpec(TeacherActors):
    """One teacher of the pool: a zoo detector checkpoint and the Ray resources of its actors.

    `name` is optional: the checkpoint records its zoo name; when given it must match (a guard against a
    config pointing at the wrong file).
    """

    checkpoint: str = ""
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("teachers[]: checkpoint is required (a model.pt written by `curriculum train`)")
        super().__post_init__()


@dataclass
class CompressionConfig:
    """How cached tensors are stored; each option's cost is documented in teachers/cache.py.

    dtype: fp32 (exact), fp16 (relative rounding <= 2**-11), int8 (per-channel symmetric scale,
      abs error <= scale/2 with scale = max|x_c|/127).
    logits: dense; topk (keep the `topk` largest class logits per location, the rest decode to the
      (k+1)-th largest value of that location: an upper bound); threshold (keep the locations whose best
      class has sigmoid score >= score_threshold, the others decode to the largest dropped logit).
    features_region: all; boxes (keep feature cells inside the ground-truth boxes dilated by
      box_dilation of their size per side plus one cell, zero elsewhere); pooled (average pooling by `pool`).
    boxes: dense; sparse (one-stage bbox_regression / bbox_ctrness kept only at locations whose best class has
      sigmoid score >= score_threshold, the rest decode to a fill value: 0 for regression).
    pca: 0 (off); r: FPN features stored as their top r principal components per level, fitted once per cache on
      pca_images images (teachers/projection.py); they decode to the teacher's channels, less the variance
      outside those r components (`curriculum cache inspect` prints its share per level).
    """

    dtype: Literal["fp32", "fp16", "int8"] = "fp16"
    logits: Literal["dense", "topk", "threshold"] = "dense"
    topk: int = 8
    score_threshold: float = 0.05
    features_region: Literal["all", "boxes", "pooled"] = "all"
    box_dilation: float = 0.5
    pool: int = 2
    boxes: Literal["dense", "sparse"] = "dense"
    pca: int = 0
    pca_images: int = 64

    def __post_init__(self) -> None:
        if self.pca < 0 or self.pca_images < 1:
            raise ConfigError(f"compression.pca must be zero or more and pca_images at least 1, got {self.pca} and "
                              f"{self.pca_images}")
        if self.pca and self.features_region == "boxes":
            raise ConfigError("compression.pca with features_region: boxes is not supported (a dropped cell would "
                              "decode to the mean feature, not to 0); use features_region all or pooled")
        if self.topk < 1:
            raise ConfigError(f"compression.topk: must be at least 1, got {self.topk}")
        if not 0.0 < self.score_threshold < 1.0:
            raise ConfigError(f"compression.score_threshold: must be in (0, 1), got {self.score_threshold}")
        if self.box_dilation < 0:
            raise ConfigError(f"compression.box_dilation: must be zero or more, got {self.box_dilation}")
        if self.pool < 1:
            raise ConfigError(f"compression.pool: must be at least 1, got {self.pool}")


@dataclass
class CacheStorage:
    """Where a teacher cache lives and how it is stored and read.

    root: a local folder or a URI pyarrow understands (file://, s3://, gs://, hdfs://).
    memory_bytes: bound on decoded shards a reader keeps in memory (a bigger cache is streamed shard by shard).
    """

    root: str = "runs/teacher_cache"
    shard_size: int = 64  # images per shard (every view of an image lives in the same shard)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    memory_bytes: int = 1 << 30
    max_attempts: int = 3  # tries per shard before precompute gives up on it (actor deaths, I/O errors)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.memory_bytes < 1 or self.max_attempts < 1:
            raise ConfigError("cache.shard_size, cache.memory_bytes and cache.max_attempts must be positive")


@dataclass
class CacheConfig(CacheStorage):
    """Where and what to cache.

    targets: any of features, head, detections, proposals (two-stage: proposals and RoI-head outputs).
    levels: FPN levels whose features are kept (null: all); head outputs always cover every level.
    views: noflip and/or flip; a flipped view is computed from the flipped image, never by flipping outputs.
    """

    split: Literal["train", "val"] = "train"
    targets: list[str] = field(default_factory=lambda: ["features", "head", "detections"])
    levels: list[str] | None = None
    views: list[str] = field(default_factory=lambda: ["noflip"])

    def __post_init__(self) -> None:
        kinds = ("features", "head", "detections", "proposals")
        bad = [t for t in self.targets if t not in kinds]
        if bad or not self.targets:
            raise ConfigError(f"cache.targets: {bad or 'empty'}; choose from {list(kinds)}")
        badv = [v for v in self.views if v not in ("noflip", "flip")]
        if badv or not self.views or len(set(self.views)) != len(self.views):
            raise ConfigError(f"cache.views: {self.views}; a non-empty list of distinct 'noflip' / 'flip'")
        super().__post_init__()


@dataclass
class RayInitConfig:
    """How `curriculum precompute` joins Ray: RAY_ADDRESS set (e.g. under `ray job submit`) joins that
    cluster; otherwise a local Ray starts with `num_cpus` logical CPUs (null: all cores)."""

    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None


@dataclass
class PrecomputeJobConfig:
    """`curriculum precompute CONFIG`: every teacher over the data set, into the cache."""

    data: DataConfig = field(default_factory=DataConfig)
    teachers: list[TeacherSpec] = field(default_factory=list)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ray: RayInitConfig = field(default_factory=RayInitConfig)


# ------------------------------------------------------------------------------------------- the curriculum run
# `curriculum run CONFIG` (issue 5): a student walks a sequence of teachers, one distillation stage per teacher, on
# Ray Train, reading the teachers' cached targets (curriculum/plan.py, curriculum/pipeline.py).


@dataclass
class RunTeacherConfig(TeacherActors):
    """One teacher of the curriculum: a zoo detector, loaded from `checkpoint` or trained when it has none, and
    its precompute actors (`TeacherActors`).

    checkpoint: a `model.pt` written by `curriculum train`. null: `<teachers_dir>/<name>-<hash>/model.pt`, where
      the hash covers the data and `teacher_train` settings, so an identical earlier run is reused and a changed
      schedule never picks up a stale teacher. A given path that does not exist yet is trained into its folder.
    weights: a teacher that is not trained here: ``torchvision`` (a ``torchvision:<builder>``'s COCO weights, from
      torch's hub cache or downloaded), the path of a state-dict file as torchvision publishes it, or a checkpoint
      of this project. It is written once as ``<teachers_dir>/<name>-<hash of the weights>/model.pt``.
      ``num_classes``: of such a teacher (default: 91, torchvision's COCO label slots, for ``torchvision:`` names;
      else the data's).
    adapter: a teacher of another library: ``package.module:Class``, a `teachers.adapter.TeacherAdapter` built with
      ``adapter_args`` in every training worker; it runs inline (no cache), is not trained or evaluated here, and
      needs ``order: given`` (`name` is then a free label).
    class_map: a teacher trained on other classes than the student's data (`teachers.class_map`): `auto` pairs
      classes by name, a mapping {student class: teacher class} pairs them by hand (unnamed ones by name); teacher
      classes the student lacks count as background. null: the teacher's classes must be the student's.
    train: keys of `teacher_train` that differ for this teacher (a transformer's recipe beside the CNNs'); they
      enter its hash like the rest of its schedule.
    """

    name: str = "fcos_resnet_mini"
    checkpoint: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    adapter: str | None = None
    adapter_args: dict[str, Any] = field(default_factory=dict)
    class_map: str | dict[str, str] | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train:
            self.schedule(TrainConfig())  # unknown keys and bad values fail at load time
        if self.adapter is not None and (self.weights is not None or self.checkpoint is not None):
            raise ConfigError(f"teachers[] {self.name}: an adapter teacher brings its own model; drop checkpoint and "
                              "weights")
        if self.weights is not None and self.checkpoint is not None:
            raise ConfigError(f"teachers[] {self.name}: give checkpoint (a teacher trained by `curriculum train`) or "
                              "weights (a teacher loaded as it is), not both")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"teachers[] {self.name}: num_classes {self.num_classes} counts the background: >= 2")
        if isinstance(self.class_map, str) and self.class_map != "auto":
            raise ConfigError(f"teachers[].class_map: {self.class_map!r}; use 'auto' (classes matched by name), a "
                              "mapping {student class: teacher class}, or null (the teacher has the student's classes)")
        super().__post_init__()

    def schedule(self, base: TrainConfig) -> TrainConfig:
        """This teacher's training schedule: `base` (the run's `teacher_train`) with `train` applied."""
        if not self.train:
            return base
        return config_from_dict(TrainConfig, {**dataclasses.asdict(base), **self.train},
                                f"teachers[] {self.name}: train")


@dataclass
class StageConfig:
    """Settings of one stage, applied to the stage's position in the (given or measured) teacher order.

    losses: distiller entries (trainers/distill: `build_distiller`); null: the run's `losses`.
    lr: null keeps `train.lr`. Each stage is a full schedule: its optimizer, lr warm-up and schedule restart,
    as in Cao et al. 2023 (12 epochs per stage in their configs).
    teachers: the stage's teachers by name (of the run's `teachers`), each a name or {name, weight}: several are
      distilled from at once, each with its own adapters, their terms summed with their weights (default 1).
      null: stage i distils from the i-th teacher of the order. Either every stage names its teachers or none.
    """

    epochs: int = 4
    losses: list[dict[str, Any]] | None = None
    lr: float | None = None
    teachers: list[str | dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.teachers is not None:
            if not self.teachers:
                raise ConfigError("stages[].teachers: an empty list; name at least one teacher, or leave it out")
            self.teacher_weights()  # bad entries fail at load time

    def teacher_weights(self) -> list[tuple[str, float]]:
        """[(teacher name, weight)] of `teachers` ([] when the stage does not name its teachers)."""
        out = []
        for entry in self.teachers or []:
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or set(entry) - {"name", "weight"}:
                raise ConfigError(f"stages[].teachers: {entry!r}; give a teacher's name or {{name: ..., weight: ...}}")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(f"stages[].teachers: {entry['name']}: weight must be a positive number, got "
                                  f"{weight!r}")
            out.append((entry["name"], float(weight)))
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages[].teachers: {names} names a teacher twice")
        return out


@dataclass
class DecayConfig:
    """The distillation weight r(t) (trainers/distill/schedules.py), t the 1-based epoch.

    restart: true counts t within each stage (t_max = the stage's epochs, r back to 1 at every new teacher);
    false counts t over the whole curriculum (t_max = all epochs of all stages, r keeps falling).
    """

    kind: Literal["constant", "linear", "cosine", "step", "exponential"] = "linear"
    restart: bool = True
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AutoOrderConfig:
    """`order: auto`: the adaptation cost of each teacher, measured on `images` training images (curriculum/plan.py).

    holdout: fraction of the images whose features test the 1x1 map fitted on the rest; ridge: relative L2
    regularisation of that fit; levels: FPN levels measured (null: every level both detectors have).
    """

    images: int = 32
    holdout: float = 0.5
    ridge: float = 1e-3
    levels: list[str] | None = None


@dataclass
class RunCacheConfig(CacheStorage):
    """The teacher cache of the run (`CacheStorage`). Targets, levels and views follow from the losses and
    `data.flip`."""

    # Hot targets for training: decoded shards in Ray's object store (one copy per node, zero-copy reads, at most
    # memory_bytes resident; a bigger cache is streamed), or false: each worker decodes its own (an LRU of
    # memory_bytes per worker).
    object_store: bool = True
    # With compression.pca: the feature losses target the teacher's features as read back in its own channels
    # (teacher), or the stored principal components themselves (components: the adapters and MGD's generation
    # blocks output r channels, r/C of their compute; MGD and FitNet only, whose loss is a squared error that the
    # projection's orthonormal basis keeps within the components).
    features: Literal["teacher", "components"] = "teacher"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features == "components" and not self.compression.pca:
            raise ConfigError("cache.features: components needs compression.pca (the number of components to "
                              "store); set it, or cache.features: teacher")


@dataclass
class RayTrainConfig:
    """Ray Train workers of every stage (DDP: gloo on CPU, NCCL on GPU; autocast bf16 on GPU)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1  # torch intra-op threads per worker
    max_failures: int = 2  # worker-group restarts from the last checkpoint before a stage fails
    eval_every: int = 0  # rank 0 evaluates on val every N epochs (for the AP curve); 0: at stage ends only
    # Callables run in every training worker at each epoch's and batch's start (a profiler, a fault injector for
    # chaos tests): [{call: "package.module:function", args: {...}}]; the module must be importable on every node.
    worker_hooks: list[dict[str, Any]] = field(default_factory=list)
    # How often Ray Train's controller polls the workers (Ray's own default is 2 s): the end of a stage, and a
    # dead worker, are seen that much sooner. A RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment wins.
    health_check_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.health_check_interval_s <= 0:
            raise ConfigError(f"trainer.health_check_interval_s must be positive, got {self.health_check_interval_s}")
        for i, hook in enumerate(self.worker_hooks):
            call = hook.get("call") if isinstance(hook, dict) else None
            module, _, name = (call or "").partition(":")
            extra = set(hook) - {"call", "args"} if isinstance(hook, dict) else set()
            if not module or not name or extra or not isinstance(hook.get("args", {}), dict):
                raise ConfigError(f"trainer.worker_hooks[{i}]: {hook!r}; expected {{call: 'package.module:function', "
                                  "args: {...}}")


@dataclass
class SweepConfig:
    """`curriculum tune CONFIG` (tune_spaces/sweep.py): trials of the run's curriculum stages under Ray Tune.

    A trial is one process with `cpus_per_trial` CPUs and `gpus_per_trial` GPUs (fractions allowed) training the
    student through every stage, reading the one teacher cache the sweep precomputed before the trials
    (`teacher_mode: cache`; `inline` runs the teacher inside every trial, the cost the cache avoids). Trials run
    concurrently as far as the cluster's resources allow (`max_concurrent` caps it; 0: no cap).
    After every epoch a trial scores `eval_images` val images (0: all) and reports `metric` (val_AP, val_AP50...).
    scheduler: asha (early stopping on the metric: `grace_period` epochs, `reduction_factor`), pbt (population
    based training: every `perturbation_interval` epochs the worst quarter clones the best and perturbs its
    parameters; suits decay schedules), fifo (every trial to the end). `include_default`: the config's own values
    are the first trial, so the table shows the default beside the best. `max_failures`: retries of a failed trial
    before it is reported as failed (the sweep goes on either way).
    """

    output_dir: str | None = None  # default: <output_dir>/tune; a sweep lives in <output_dir>/<name>/
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    metric: str = "val_AP"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    threads_per_trial: int = 1
    max_concurrent: int = 0
    eval_images: int = 0
    grace_period: int = 1
    reduction_factor: float = 2.0
    perturbation_interval: int = 1
    seed: int = 0
    include_default: bool = True
    teacher_mode: Literal["cache", "inline"] = "cache"
    max_failures: int = 0


@dataclass
class RunJobConfig:
    """`curriculum run CONFIG`: teachers, cache, the progressive stages on Ray Train, baseline and report.

    order: `given` walks `teachers` as listed; `auto` orders them by measured adaptation cost, closest first.
    stages: one per teacher (positionally, after ordering), or a single entry used for every teacher; or stages
      that name their teachers (`StageConfig.teachers`: several at once, weighted), as many as wanted.
    kd_ratio: null uses the loss weights as configured; a number rescales the feature terms of each stage once,
      at its start, so that they add up to kd_ratio x the detector loss on the first batches (the published
      weights were tuned for 800 px COCO inputs, see bench/distill_methods.py).
    kd_reference: the student that calibration measures: `run` (default), the student as the run starts, so every
      stage's teacher weighs as it would in a run of its own, as the papers' fixed loss weight per teacher does;
      `stage`, the student as each stage starts (before session 13), which scales a later stage's weight down with
      the detector loss the student has reached (docs/headline_investigation.md has what each gave).
    inherit: the student starts with the first teacher's neck (FPN) and head weights wherever names and shapes
      match (as the code of Cao et al. 2023 does).
    baseline: also train the student without distillation for the same total epochs.
    direct: also distil from the last stage's teacher(s) alone for the same total epochs (one stage).
    schedule: `per_stage`: every stage is a full schedule (a new optimizer, the lr warm-up and schedule restart), as
      in Cao et al. 2023; `curriculum`: one lr warm-up and schedule over all stages, and the student's optimizer
      state (momentum, Adam's moments) carries from stage to stage (the new stage's adapters start fresh); `moments`
      overrides what happens to the optimizer state.
    moments: the student's optimizer state (momentum, Adam's moments and step count) as a stage starts: `fresh`
      (a new optimizer) or `carry` (the previous stage's); null (default): as `schedule` says (`per_stage` fresh,
      `curriculum` carried). `schedule: per_stage` with `moments: carry` restarts the lr schedule alone.
    adapters: `fresh`: every stage's distiller (adapters, MGD's generation blocks) starts new, as in Cao et al.
      2023; `carry`: a stage's start from the previous stage's wherever the name and shape match (a teacher with
      the same FPN channels as the one before it).
    adapter_warmup: the first this many iterations of every distillation stage train its new adapters (MGD's
      generation blocks, align convolutions) on the student's detached outputs, so the student meets their
      gradients only once they fit it; 0 (default): from the first iteration, as in Cao et al. 2023.
    """

    output_dir: str = "runs/curriculum"
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="fcos_mobilenetv3_micro"))
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    teachers_dir: str = "runs/teachers"
    teachers: list[RunTeacherConfig] = field(default_factory=list)
    order: Literal["given", "auto"] = "given"
    auto_order: AutoOrderConfig = field(default_factory=AutoOrderConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    losses: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "mgd", "preset": "retinanet"}])
    kd_ratio: float | None = None
    kd_reference: Literal["run", "stage"] = "run"
    decay: DecayConfig = field(default_factory=DecayConfig)
    inherit: bool = True
    baseline: bool = True
    direct: bool = False
    schedule: Literal["per_stage", "curriculum"] = "per_stage"
    moments: Literal["fresh", "carry"] | None = None
    adapters: Literal["fresh", "carry"] = "fresh"
    adapter_warmup: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: RunCacheConfig = field(default_factory=RunCacheConfig)
    trainer: RayTrainConfig = field(default_factory=RayTrainConfig)
    ray: RayInitConfig = field(default_factory=RayInitConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers: the curriculum needs at least one teacher ([{name: fcos_resnet_mini}])")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: {names} names a teacher twice; each teacher is one stage")
        named = [s.teachers is not None for s in self.stages]
        if any(named):
            self._check_stage_teachers(names, named)
        elif not self.stages or len(self.stages) not in (1, len(self.teachers)):
            raise ConfigError(f"stages: {len(self.stages)} entries for {len(self.teachers)} teachers; give one per "
                              "teacher or a single one used for every teacher")
        if self.kd_ratio is not None and self.kd_ratio <= 0:
            raise ConfigError(f"kd_ratio: must be positive (or null), got {self.kd_ratio}")
        if self.adapter_warmup < 0:
            raise ConfigError(f"adapter_warmup: iterations, 0 or more, got {self.adapter_warmup}")
        if self.trainer.num_workers < 1 or self.trainer.cpus_per_worker <= 0:
            raise ConfigError("trainer.num_workers must be at least 1 and trainer.cpus_per_worker positive")
        if not 0.0 < self.auto_order.holdout < 1.0 or self.auto_order.images < 2:
            raise ConfigError("auto_order: holdout must be in (0, 1) and images at least 2")

    def _check_stage_teachers(self, names: list[str], named: list[bool]) -> None:
        if not all(named):
            raise ConfigError(f"stages: entries {[i for i, n in enumerate(named) if not n]} name no teachers while "
                              "others do; name the teachers of every stage, or of none (one stage per teacher)")
        if self.order != "given":
            raise ConfigError("order: auto orders one teacher per stage; stages that name their teachers need "
                              "order: given")
        used = set()
        for i, s in enumerate(self.stages):
            for name, _ in s.teacher_weights():
                if name not in names:
                    raise ConfigError(f"stages[{i}].teachers: {name!r} is not one of the run's teachers {names}")
                used.add(name)
        unused = [n for n in names if n not in used]
        if unused:
            raise ConfigError(f"teachers: {unused} are in no stage's teachers; drop them or add them to a stage")

    def carries_moments(self) -> bool:
        """Whether a stage takes over the previous stage's student optimizer state (`moments`, `schedule`)."""
        return self.moments == "carry" if self.moments is not None else self.schedule == "curriculum"

    def stage_settings(self) -> list[StageConfig]:
        """One StageConfig per stage (a single entry without teachers is used for every teacher)."""
        if self.stages[0].teachers is not None or len(self.stages) == len(self.teachers):
            return list(self.stages)
        return [self.stages[0]] * len(self.teachers)
