"""`curriculum run CONFIG [--resume] [--preset quick]`: the whole progressive-distillation job, reusing what exists.

Phases, in order (each timed; the report lists the wall time of every phase and whether it was reused):

1. data: the built-in data set is generated when the config asks for it and it is missing.
2. teachers: each teacher is loaded from its checkpoint; a teacher without one is trained first with
   `trainers.train.train_detector` (in this process, `teacher_train` schedule) into
   `<teachers_dir>/<name>-<hash of data + schedule>/`, so identical settings reuse an earlier run and an
   interrupted teacher run is resumed from its `checkpoints/last.pt`. Each teacher is evaluated once on val
   (`<output_dir>/evals/`). A teacher on other classes than the data's needs `class_map` (`teachers.class_map`:
   its targets, and its val detections, are mapped into the data's classes); `check_run_config` builds the map of a
   teacher whose checkpoint is already there before anything starts, so a bad one fails in seconds.
3. order: `given`, or `auto`: the adaptation cost of every teacher on a calibration sample (curriculum/plan.py);
   the costs and the order are saved (`order.json`) and a resumed run keeps them.
4. cache: `teachers.precompute.precompute` writes (or finishes, or reuses: complete shards are never recomputed) each
   teacher's cache with the targets, FPN levels and views the stages read (views follow `data.flip`: `random`
   caches both the plain and the flipped view of every image, so every epoch's flips have their targets).
5. stages: every stage, then the baseline and the direct arm, in one Ray Train run (`trainers.ray_train.
   fit_sequence_on_ray`, storage `<output_dir>/ray`, run name `stages`): the worker group starts once, each
   stage's feature factors are calibrated in the workers as it starts, and rank 0 writes each stage's
   `stages/<i>-<teacher>/` (model.pt, distiller.pt, done.json) as it ends. Workers read their shard of the
   images and of the cached targets themselves (see trainers/ray_train.py). The student carries its weights
   from stage to stage. Each stage's model is then evaluated on val.
6. baseline (`baseline: true`): the student alone, same schedule and total epochs, in the same run.
   direct (`direct: true`): distillation from the last teacher alone for the total epochs.
7. report (`<output_dir>/report/`): `results.md` / `results.json` (val AP, AP50, AP75, APs, APm, APl of the
   baseline, each teacher, the student after each stage, direct; adaptation costs; wall time of each phase),
   `loss.png` and `ap.png` (per epoch, stage borders dashed), and `student.pt`: the final student as a plain
   zoo checkpoint (`teachers.zoo.load_detector` rebuilds it without the adapters and without Ray).

Resume. Without `--resume` an output folder holding stages refuses to start. With it, finished stages (their
`done.json`) are kept and the unfinished one goes on from its last epoch checkpoint: the run with the same
storage and name makes Ray Train hand the workers that checkpoint (entry, stage, epoch, student, adapters,
optimizer, scheduler, history). Random state is re-seeded per epoch, so a resumed stage matches an uninterrupted one (see
tests/test_pipeline.py for the tolerance).

Paths. Relative paths of the config are made absolute against `--base-dir` (default: the current directory) before
anything starts: the Ray Train workers and the precompute actors run in other directories. Under
`ray job submit --working-dir .` the job runs in a temporary copy of the working directory (without the git-ignored
`data/` and `runs/`): pass `--base-dir "$PWD"` so that data, teachers, cache and report land in the real
project folder. The driver joins the job's cluster (RAY_ADDRESS); on several nodes the paths (data, teachers,
cache, output) must be readable by every node (a shared file system, or a URI for the cache root).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from curriculum.config import (
    CacheConfig, CacheStorage, PrecomputeJobConfig, RunJobConfig, TeacherActors, TeacherSpec, TrainConfig,
    TrainJobConfig, dump_config, load_config, section_values, to_dict,
)
from curriculum.errors import ConfigError, CurriculumError
from curriculum.files import atomic_save, atomic_write_json, path_name
from curriculum.plan import (
    Stage, baseline_stage, build_plan, cache_needs, direct_stage, fingerprint, inherit_weights,
    measure_adaptation_costs, order_by_cost, total_epochs,
)
from curriculum.report import metrics_row, write_report

log = logging.getLogger("curriculum.run")

# `--preset NAME`: overrides applied on top of the config (shorter schedules for a first look). `teacher_train.*`
# keys also replace a teacher's own `train` keys; `stage_epochs` is every stage's length.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "overrides": ["teacher_train.epochs=2", "teacher_train.max_iters_per_epoch=40",
                      "train.max_iters_per_epoch=30", "eval.max_images=100", "auto_order.images=16"],
        "stage_epochs": 1,
    },
}


def _preset_overrides(preset: str, job: RunJobConfig) -> list[str]:
    """The `key=value` overrides of `preset` for the loaded `job` (its teachers' own schedules, its stages)."""
    spec = PRESETS[preset]
    extra = list(spec["overrides"])
    teacher_keys = [o.split("=", 1) for o in spec["overrides"] if o.startswith("teacher_train.")]
    for i, t in enumerate(job.teachers):
        if t.train:
            extra += [f"teachers.{i}.train.{k.split('.', 1)[1]}={v}" for k, v in teacher_keys]
    if "stage_epochs" in spec:
        if job.stages[0].teachers is not None:  # stages that name their teachers keep them
            extra += [f"stages.{i}.epochs={spec['stage_epochs']}" for i in range(len(job.stages))]
        else:
            extra.append(f"stages=[{{epochs: {spec['stage_epochs']}}}]")
    extra.append(f"output_dir={job.output_dir.rstrip('/')}_{preset}")
    return extra


def load_run_config(path: str | Path, overrides: list[str] | None = None, preset: str | None = None) -> RunJobConfig:
    """The run config of `path` with the preset's overrides, then the command line's `--set` ones."""
    extra: list[str] = []
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r} is unknown; presets: {sorted(PRESETS)}")
        extra = _preset_overrides(preset, load_config(path, RunJobConfig, overrides))
    job = load_config(path, RunJobConfig, extra + list(overrides or []))
    check_run_config(job, str(path))
    return job


# ------------------------------------------------------------------------------------------------ helpers


class Phases:
    """Wall time of each phase, in order, with whether it was reused.

    The seconds of phases computed by earlier invocations of the same run (before a `--resume`) are kept in
    `<output_dir>/phases.json`, so the report of a resumed run still gives every phase's cost (`computed_s`).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = path
        self.done: dict[str, float] = json.loads(path.read_text()) if path is not None and path.is_file() else {}

    @contextmanager
    def __call__(self, name: str, reused: bool = False) -> Iterator[dict[str, Any]]:
        """Times the block as phase `name`; the block may set the yielded row's "reused" and add keys to it."""
        row = {"phase": name, "seconds": 0.0, "reused": reused}
        log.info("[%s] %s", name, "reused" if reused else "start")
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            self._record(row, time.perf_counter() - t0)

    def add(self, name: str, seconds: float, reused: bool = False) -> None:
        """A phase timed elsewhere (a stage, timed by its training worker: reused, its seconds are those it took)."""
        self._record({"phase": name, "reused": reused}, seconds, computed=seconds)

    def _record(self, row: dict[str, Any], seconds: float, computed: float | None = None) -> None:
        """`row` with its seconds, and the seconds it took when computed (kept in `path` for later invocations)."""
        name = row["phase"]
        row["seconds"] = round(seconds, 2)
        if row["reused"]:
            row["computed_s"] = self.done.get(name, None if computed is None else round(computed, 2))
        else:
            row["computed_s"] = self.done[name] = row["seconds"]
            if self.path is not None:
                atomic_write_json(self.done, self.path)
            log.info("[%s] done in %.1f s", name, row["seconds"])
        self.rows.append(row)


def teacher_schedule(job: RunJobConfig, name: str) -> TrainConfig:
    """The training schedule of teacher `name`: `teacher_train` with the teacher's own `train` keys."""
    spec = next((t for t in job.teachers if t.name == name), None)
    return spec.schedule(job.teacher_train) if spec is not None else job.teacher_train


def teacher_train_job(job: RunJobConfig, name: str, out_dir: str) -> TrainJobConfig:
    from curriculum.config import ModelConfig

    return TrainJobConfig(output_dir=out_dir, data=job.data, model=ModelConfig(name=name),
                          train=teacher_schedule(job, name), eval=job.eval)


_PATH_KEYS = ("root", "train_images", "train_annotations", "val_images", "val_annotations")


def teacher_checkpoint(job: RunJobConfig, name: str, given: str | None, data_fp: str = "") -> Path:
    """Where a teacher's model.pt is (given) or will be trained to (`<teachers_dir>/<name>-<hash>/model.pt`).

    The hash covers the zoo name, the teacher schedule, the data settings other than paths, and `data_fp` (the
    content fingerprint of the training split, `teachers.cache.data_fingerprint`): the same data found under
    another path reuses the teacher, other data never does.
    """
    if given:
        return Path(given)
    spec = next((t for t in job.teachers if t.name == name), None)
    if spec is not None and spec.weights is not None:
        return loaded_teacher_checkpoint(job, spec)
    data = {k: v for k, v in dataclasses.asdict(job.data).items() if k not in _PATH_KEYS}
    key = fingerprint({"name": name, "data": data, "data_fp": data_fp,
                       "train": dataclasses.asdict(teacher_schedule(job, name))})
    return Path(job.teachers_dir) / f"{path_name(name)}-{key}" / "model.pt"


def loaded_teacher_checkpoint(job: RunJobConfig, spec: Any) -> Path:
    """Where a teacher given by `weights` is written as a project checkpoint: the hash covers the name, the weights
    (a file's content) and num_classes."""
    from teachers.zoo import fingerprint as file_fingerprint

    weights = spec.weights
    if weights not in ("torchvision", "random"):
        if not Path(weights).is_file():
            raise ConfigError(f"teacher {spec.name}: weights file {weights} does not exist; give a torchvision "
                              "state-dict file, a checkpoint of this project, or 'torchvision'")
        weights = file_fingerprint(weights)
    key = fingerprint({"name": spec.name, "weights": weights, "num_classes": spec.num_classes})
    return Path(job.teachers_dir) / f"{path_name(spec.name)}-{key}" / "model.pt"


def ensure_teacher(job: RunJobConfig, spec: Any, phases: Phases, progress: bool, data_fp: str = "",
                   num_classes: int | None = None) -> Path:
    """The teacher's checkpoint: given, loaded from `weights` (written once), or trained with train_detector when it
    does not exist yet. `num_classes`: the data's (the default of a loaded zoo teacher)."""
    from trainers.train import train_detector

    path = teacher_checkpoint(job, spec.name, spec.checkpoint, data_fp)
    if path.is_file():
        with phases(f"teacher {spec.name}: {'load' if spec.weights else 'train'}", reused=True):
            pass
        return path
    if spec.weights is not None:
        from teachers.zoo import TORCHVISION_PREFIX, build_detector

        k = spec.num_classes or (91 if spec.name.startswith(TORCHVISION_PREFIX) else num_classes)
        with phases(f"teacher {spec.name}: load"):
            det = build_detector(spec.name, k, weights=spec.weights)
            atomic_save(det.checkpoint({"weights": spec.weights}), path)
        return path
    if path.name != "model.pt":
        raise ConfigError(f"teacher {spec.name}: checkpoint {path} does not exist (a missing teacher is trained into "
                          "<folder>/model.pt: give such a path, or null for the default)")
    with phases(f"teacher {spec.name}: train"):
        tjob = teacher_train_job(job, spec.name, str(path.parent))
        resume = (path.parent / "checkpoints" / "last.pt").exists()
        log.info("training teacher %s into %s%s", spec.name, path.parent, " (resuming)" if resume else "")
        train_detector(tjob, resume=resume, progress=progress)
    return path


def _cache_views(flip: str) -> list[str]:
    return {"none": ["noflip"], "always": ["flip"], "random": ["noflip", "flip"]}[flip]


def _student(job: RunJobConfig, class_names: Sequence[str]) -> Any:
    from teachers.zoo import build_detector

    return build_detector(job.student.name, len(class_names), image_size=job.data.image_size,
                          class_names=tuple(class_names), **job.student.overrides())


def _own_eval_matches(job: RunJobConfig, checkpoint: Path) -> bool:
    """Whether the eval.json beside a teacher's model.pt was made on this run's val data with its eval settings."""
    import yaml

    cfg, ev = checkpoint.parent / "config.yaml", checkpoint.parent / "eval.json"
    if not (cfg.is_file() and ev.is_file() and checkpoint.name == "model.pt"):
        return False
    try:
        saved = yaml.safe_load(cfg.read_text())
        return (saved.get("eval") == dataclasses.asdict(job.eval)
                and saved.get("data", {}).get("val_images") == job.data.val_images
                and saved.get("data", {}).get("val_annotations") == job.data.val_annotations
                and saved.get("data", {}).get("root") == job.data.root
                and saved.get("data", {}).get("image_size") == job.data.image_size
                and ev.stat().st_mtime >= checkpoint.stat().st_mtime - 60)
    except Exception:  # an unreadable old config: evaluate again
        return False


def evaluate_checkpoint(job: RunJobConfig, path: Path, out: Path, val_ds: Any, progress: bool,
                        class_map: Any = None) -> dict[str, Any]:
    """Val metrics of a plain checkpoint, cached in `out` (a resumed run does not evaluate twice).

    `class_map` (`teachers.class_map.ClassMap`): a teacher on other classes than the data's is scored on the data's
    classes: its detections of mapped classes, relabelled (the others are dropped)."""
    from teachers.zoo import load_detector
    from trainers.train import evaluate_model

    if out.is_file():
        return json.loads(out.read_text())
    relabel = class_map.map_detections if class_map is not None else None
    metrics = evaluate_model(load_detector(path), val_ds, job.eval, progress=progress, relabel=relabel)
    metrics = {k: v for k, v in metrics.items() if k != "stats"}
    atomic_write_json(metrics, out)
    return metrics


# ------------------------------------------------------------------------------------------------ stages

def stage_entry(job: RunJobConfig, stage: Stage, init: Path | str | None, out: Path, *, continues: bool = False,
                progress: bool = True, eval_images: int | None = None, **loop: Any) -> Any:
    """`stage` as an entry of a sequence (`trainers.ray_train.SequenceEntry`): its schedule, how its targets
    arrive, and its outputs in `<out>/stages/<stage.name>/` (model.pt, distiller.pt, optimizer.pt, done.json,
    tensorboard/). init: the checkpoint it starts from; continues: from the previous entry's model (and, when
    the job carries the moments, `RunJobConfig.carries_moments`, with its optimizer state) instead. A run's
    stages train with the job's `trainer` settings; a Tune trial's give what differs as `loop` (`LoopConfig`
    fields: threads, per-epoch evaluation, device, the sweep's shard stores) and evaluate on the first
    `eval_images` val images."""
    from trainers.ray_train import LoopConfig, SequenceEntry

    sdir = out / "stages" / stage.name
    sdir.mkdir(parents=True, exist_ok=True)
    train = dataclasses.replace(job.train, epochs=stage.epochs, lr=stage.lr or job.train.lr)
    ev = job.eval if eval_images is None else dataclasses.replace(job.eval, max_images=eval_images)
    tjob = TrainJobConfig(output_dir=str(sdir), data=job.data, model=job.student, train=train, eval=ev)
    tr = job.trainer
    settings = dict(
        job=to_dict(tjob), stage=stage.to_dict(), init=None if init is None else str(Path(init).resolve()),
        threads_per_worker=tr.threads_per_worker, memory_bytes=job.cache.memory_bytes, kd_ratio=stage.kd_ratio,
        eval_every=tr.eval_every, use_gpu=tr.use_gpu, progress=progress,
        teacher_mode="cache" if all(m.cache or m.adapter for m in stage.teachers) else "inline",
        worker_hooks=list(tr.worker_hooks), tensorboard_dir=str((sdir / "tensorboard").resolve()))
    return SequenceEntry(
        loop=LoopConfig(**{**settings, **loop}).to_dict(), out_dir=str(sdir), continues=continues,
        save_optimizer=job.carries_moments() and stage.teachers != [],
        model_info={"curriculum": {"stage": stage.name, "teacher": stage.teacher},
                    "resize": job.data.resize_spec("val").to_dict()})  # how `curriculum predict` makes its inputs


SEQUENCE_RUN = "stages"  # the Ray Train run (under <output_dir>/ray) that trains every stage of a run


def run_stages(job: RunJobConfig, entries: Sequence[Any], out: Path, phases: Phases) -> list[dict[str, Any]]:
    """Train the entries not done yet in one Ray Train run (`trainers.ray_train.fit_sequence_on_ray`); returns
    each entry's summary (its done.json). Phases: one row per stage with the seconds its worker trained it
    (calibration included), and one with the rest of the fit: starting and stopping Ray Train, paid once."""
    from trainers.ray_train import DONE_FILE, fit_sequence_on_ray

    done_before = [e.done() for e in entries]
    t0 = time.perf_counter()
    if not all(done_before):
        tr = job.trainer
        for e, before in zip(entries, done_before):
            stage = e.loop["stage"]
            teacher = "+".join(m["name"] for m in stage["teachers"]) or "none"
            log.info("stage %s: teacher %s, %d epochs, losses %s, decay %s%s", stage["name"], teacher, e.epochs,
                     [x["name"] for x in stage["losses"]], stage["decay_kind"], " (done)" if before else "")
        fit_sequence_on_ray(entries, num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                            cpus_per_worker=tr.cpus_per_worker, max_failures=tr.max_failures,
                            storage_path=str((out / "ray").resolve()), name=SEQUENCE_RUN,
                            memory_bytes=job.cache.memory_bytes, object_store=job.cache.object_store,
                            health_check_interval_s=tr.health_check_interval_s)
    wall = time.perf_counter() - t0
    summaries = [json.loads((Path(e.out_dir) / DONE_FILE).read_text()) for e in entries]
    trained = 0.0
    for e, before, summary in zip(entries, done_before, summaries):
        phases.add(f"stage {e.name}: train", summary["seconds"], reused=before)
        trained += 0.0 if before else summary["seconds"]
    if not all(done_before):
        phases.add("stages: Ray Train start and stop", max(0.0, wall - trained))
    return summaries


# ------------------------------------------------------------------------------------------------ the job


def absolute_paths(job: RunJobConfig, base: str | Path | None = None) -> RunJobConfig:
    """The job with every relative path (data, output, teachers, cache root, student weights) made absolute
    against `base` (default: the current directory). Ray Train workers and precompute actors do not run in the
    driver's directory, so they must never see a relative path."""
    base = Path(base or os.getcwd()).resolve()

    def fix(p: str | None) -> str | None:
        if p is None or "://" in p or os.path.isabs(p):
            return p
        return str(base / p)

    d = job.data
    data = dataclasses.replace(d, root=fix(d.root), train_images=fix(d.train_images),
                               train_annotations=fix(d.train_annotations), val_images=fix(d.val_images),
                               val_annotations=fix(d.val_annotations))
    student = job.student
    if student.weights not in ("random", "timm", "torchvision"):
        student = dataclasses.replace(student, weights=fix(student.weights))
    return dataclasses.replace(
        job, output_dir=fix(job.output_dir), data=data, student=student, teachers_dir=fix(job.teachers_dir),
        teachers=[dataclasses.replace(t, checkpoint=fix(t.checkpoint)) for t in job.teachers],
        cache=dataclasses.replace(job.cache, root=fix(job.cache.root)))


@dataclasses.dataclass
class Prepared:
    """What the stages of a run (or the trials of a sweep) start from: phases 1 to 4 of the module docstring."""

    job: RunJobConfig
    out: Path
    train_ds: Any
    val_ds: Any
    checkpoints: dict[str, str]
    teachers: dict[str, Any]
    teacher_evals: dict[str, dict]
    order: list[str]
    costs: dict | None
    stages: list[Stage]
    extra_stages: list[Stage]
    random_init: Path

    def start_from(self, teacher_name: str, tag: str) -> tuple[Path, int]:
        """The student's start (`student_init_<tag>.pt`): random init, plus the teacher's neck and head where
        shapes match (`inherit`); returns the path and the number of inherited tensors."""
        path = self.out / f"student_init_{tag}.pt"
        if not self.job.inherit:
            return self.random_init, 0
        s = _student(self.job, self.train_ds.class_names)
        s.load_state_dict(torch.load(self.random_init, weights_only=True)["model"])
        if teacher_name not in self.teachers:  # an adapter teacher: no zoo weights to inherit
            return self.random_init, 0
        copied = inherit_weights(s, self.teachers[teacher_name])
        if not path.is_file():
            atomic_save(s.checkpoint(extra={"inherited_from": teacher_name, "inherited": copied}), path)
        return path, len(copied)


def prepare_run(job: RunJobConfig, out: Path, phases: Phases, progress: bool = True, precompute_caches: bool = True,
                where: str = "the run config") -> Prepared:
    """Data, teachers (trained when missing, evaluated once), the order, the plan and the teacher caches.

    `out` receives the teachers' evals, the order and the student's random init. `precompute_caches` False
    leaves the stages without a cache (a sweep whose trials run their teachers inline). Each stage's teacher
    carries its class map (`StageTeacher.class_map`); `where` names the config in a class map's error.
    """
    from curriculum.cluster import ensure_ray
    from teachers.outputs import load_teacher
    from teachers.precompute import precompute
    from curriculum.shapes import ensure_builtin_data
    from curriculum.seeds import seed_everything
    from trainers.train import build_dataset

    with phases("data", reused=job.data.builtin != "shapes" or (Path(job.data.root) / "val" / "instances.json").is_file()):
        ensure_builtin_data(job.data)
    train_ds = build_dataset(job.data, "train", seed=job.train.seed)
    val_ds = build_dataset(job.data, "val", seed=job.train.seed)
    # Teachers: trained when missing, evaluated once.
    from teachers.cache import data_fingerprint

    data_fp = data_fingerprint(train_ds)
    from teachers.adapter import load_adapter

    adapters = {spec.name: load_adapter(spec.adapter, spec.adapter_args, f"{where}: teachers[{i}].adapter")
                for i, spec in enumerate(job.teachers) if spec.adapter}
    checkpoints = {spec.name: str(ensure_teacher(job, spec, phases, progress, data_fp, train_ds.num_classes))
                   for spec in job.teachers if not spec.adapter}
    teachers = {name: load_teacher(path, name) for name, path in checkpoints.items()}
    classes = {name: (t.config.class_names, t.config.num_classes) for name, t in teachers.items()}
    classes |= {name: (a.class_names, len(a.class_names) if a.class_names else train_ds.num_classes)
                for name, a in adapters.items()}
    class_maps = teacher_class_maps(job, train_ds.class_names, classes, where)
    teacher_evals: dict[str, Any] = {name: {} for name in adapters}  # not evaluated here
    for name, path in checkpoints.items():
        f = out / "evals" / f"teacher-{path_name(name)}.json"
        if not f.is_file() and _own_eval_matches(job, Path(path)):  # train_detector's final eval, same settings
            atomic_write_json(json.loads((Path(path).parent / "eval.json").read_text()), f)
        with phases(f"teacher {name}: eval", reused=f.is_file()):
            teacher_evals[name] = evaluate_checkpoint(job, Path(path), f, val_ds, progress, class_maps.get(name))

    # The student before any stage (random init, seeded), and the order.
    seed_everything(job.train.seed)
    student = _student(job, train_ds.class_names)
    random_init = out / "student_random.pt"
    if not random_init.is_file():
        atomic_save(student.checkpoint(), random_init)
    else:
        student.load_state_dict(torch.load(random_init, weights_only=True)["model"])
    order_file = out / "order.json"
    costs = None
    if order_file.is_file():
        saved = json.loads(order_file.read_text())
        order, costs = saved["order"], saved.get("costs")
        if sorted(order) != sorted(t.name for t in job.teachers):
            raise CurriculumError(f"{order_file} orders {order} but the config has teachers "
                                  f"{[t.name for t in job.teachers]}: use a new output_dir for another teacher set")
    elif job.order == "auto":
        with phases("order: adaptation costs"):
            calib = build_dataset(dataclasses.replace(job.data, flip="none"), "train", seed=job.train.seed)
            images = [calib[i][0] for i in range(min(job.auto_order.images, len(calib)))]
            a = job.auto_order
            costs = measure_adaptation_costs(student, teachers, images, a.holdout, a.ridge, a.levels)
            order = order_by_cost(costs)
        log.info("auto order %s (adaptation costs %s)", order, {k: round(v["cost"], 4) for k, v in costs.items()})
    else:
        order = [t.name for t in job.teachers]
    atomic_write_json({"order": order, "mode": job.order, "costs": costs}, order_file)

    stages = build_plan(job, {t.name: checkpoints.get(t.name) for t in job.teachers}, order)
    extra_stages = [direct_stage(job, stages)] if job.direct else []

    # Teacher caches: the targets, levels and views the stages read (adapter teachers run inline).
    channels = {n: t.level_channels for n, t in teachers.items()}
    zoo_stages = [dataclasses.replace(s, teachers=[t for t in s.teachers if t.name not in adapters])
                  for s in stages + extra_stages]
    needs = cache_needs(zoo_stages, student.level_channels, channels)
    specs = {s.name: s for s in job.teachers}
    ensure_ray(job.ray)
    caches: dict[str, str] = {}
    for name, (kinds, levels) in (needs.items() if precompute_caches else ()):
        spec = specs[name]
        cache_cfg = CacheConfig(**section_values(job.cache, CacheStorage), split="train", targets=kinds, levels=levels,
                                views=_cache_views(job.data.flip))
        pjob = PrecomputeJobConfig(data=job.data, cache=cache_cfg, ray=job.ray, teachers=[TeacherSpec(
            checkpoint=checkpoints[name], name=name, **section_values(spec, TeacherActors))])
        with phases(f"teacher {name}: precompute cache") as row:
            (report,) = precompute(pjob, progress=progress)
            row["reused"] = not report.computed
            row["cache"] = report.cache
        caches[name] = report.cache
    for m in (m for s in stages + extra_stages for m in s.teachers):
        m.cache = caches.get(m.name)
        m.components = m.cache is not None and job.cache.features == "components"
        cmap = class_maps.get(m.name)
        m.class_map = cmap.to_dict() if cmap is not None else None
        if m.name in adapters:
            spec = specs[m.name]
            m.adapter = {"target": spec.adapter, "args": dict(spec.adapter_args)}
    return Prepared(job=job, out=out, train_ds=train_ds, val_ds=val_ds, checkpoints=checkpoints, teachers=teachers,
                    teacher_evals=teacher_evals, order=order, costs=costs, stages=stages, extra_stages=extra_stages,
                    random_init=random_init)


def check_run_config(job: RunJobConfig, where: str = "the run config") -> None:
    """What can be checked before any work starts (no data generated, no folder created): the student's and every
    teacher's detector name, so a misspelt name fails in a second rather than after the data set or a teacher."""
    from teachers.zoo import check_detector_name

    entries = [("student.name", job.student.name)] + [(f"teachers[{i}].name", t.name)
                                                        for i, t in enumerate(job.teachers) if not t.adapter]
    for key, name in entries:
        try:
            check_detector_name(name)
        except CurriculumError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    from teachers.adapter import check_adapter

    for i, t in enumerate(job.teachers):
        if t.adapter:
            check_adapter(t.adapter, f"{where}: teachers[{i}].adapter")
            if job.order == "auto":
                raise ConfigError(f"{where}: order: auto measures the adaptation cost on zoo teachers; teachers[{i}] "
                                  f"({t.name}) is an adapter: use order: given")
    if job.cache.features == "components":
        from trainers.distill.registry import COMPONENT_LOSSES

        used = {e.get("name") for e in job.losses} | {e.get("name") for s in job.stages for e in (s.losses or [])}
        bad = sorted(str(n) for n in used - COMPONENT_LOSSES)
        if bad:
            raise ConfigError(f"{where}: cache.features: components: {bad} read the teacher's own feature channels; "
                              f"only {sorted(COMPONENT_LOSSES)} can target the principal components. Use "
                              "cache.features: teacher (the components read back in the teacher's channels)")
    # Class maps of the teachers whose checkpoint is already there (a teacher the run trains has the data's
    # classes); prepare_run builds them again from the loaded data set and teachers.
    given = [(i, t) for i, t in enumerate(job.teachers) if t.checkpoint and Path(t.checkpoint).is_file()]
    coco = [t for t in job.teachers if t.weights == "torchvision" and t.num_classes in (None, 91)]
    student_names = _data_class_names(job) if given or coco else None
    if student_names is None:
        return
    from teachers.zoo import coco_class_names, read_checkpoint

    classes = {t.name: (coco_class_names(t.name), 91) for t in coco}
    for i, t in given:
        try:
            saved = read_checkpoint(t.checkpoint)["config"]
        except CurriculumError as e:
            raise ConfigError(f"{where}: teachers[{i}].checkpoint: {e}") from None
        classes[t.name] = (saved.get("class_names"), int(saved["num_classes"]))
    teacher_class_maps(job, student_names, classes, where)


def _data_class_names(job: RunJobConfig) -> list[str] | None:
    """The training split's class names as `CocoDetection` orders them (background, then by category id), read
    from the annotation file's categories alone, or the built-in data set's; None when not known yet."""
    _, ann = job.data.split_paths("train")
    if ann.is_file():
        from curriculum.data import annotation_class_names

        try:
            return annotation_class_names(ann)
        except CurriculumError:  # a bad file: the data set's own loader says what is wrong with it, later
            return None
    if job.data.builtin == "shapes":
        from curriculum.shapes import CATEGORIES

        return ["__background__"] + [name for _, name in sorted(CATEGORIES)]
    return None


def teacher_class_maps(job: RunJobConfig, student_names: Sequence[str],
                       classes: dict[str, tuple[Sequence[str] | None, int]], where: str = "the run config"
                       ) -> dict[str, Any]:
    """{teacher name: its `teachers.class_map.ClassMap`, or None when it has the student's classes} for the
    teachers in `classes` ({name: (its checkpoint's class_names, num_classes)}); a ConfigError names
    `<where>: teachers[i].class_map`."""
    from teachers.class_map import resolve_class_map

    return {t.name: resolve_class_map(student_names, classes[t.name][0], classes[t.name][1], t.class_map,
                                      f"{where}: teachers[{i}].class_map")
            for i, t in enumerate(job.teachers) if t.name in classes}


def run_pipeline(job: RunJobConfig, resume: bool = False, progress: bool = True,
                 base_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything `curriculum run` does (module docstring); returns the report (also written as JSON).

    Relative paths of the config are taken relative to `base_dir` (default: the current directory).
    """
    check_run_config(job)
    job = absolute_paths(job, base_dir)
    out = Path(job.output_dir)
    if (out / "stages").exists() and not resume:
        raise CurriculumError(f"{out} already holds a curriculum run: pass --resume to continue it (finished stages "
                              "are kept), or choose another output_dir (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(job, out / "config.yaml")
    phases = Phases(out / "phases.json")
    t_start = time.perf_counter()
    # A cache holds one view per image: multi-scale training runs its teachers inline on each batch instead.
    multi_scale = job.data.resize_spec("train").multi_scale
    if multi_scale:
        log.info("data.min_size %s is multi-scale: the teachers run inline on each batch (no cache)",
                 job.data.min_size)
    prep = prepare_run(job, out, phases, progress, precompute_caches=not multi_scale)
    stages, extra_stages, val_ds = prep.stages, prep.extra_stages, prep.val_ds
    order, costs, teacher_evals, random_init = prep.order, prep.costs, prep.teacher_evals, prep.random_init
    start_from = prep.start_from

    # Every stage, then the baseline and the direct arm, in one Ray Train run.
    init, inherited = start_from(stages[0].teachers[0].name, "curriculum")
    entries = [stage_entry(job, st, init if i == 0 else None, out, continues=i > 0, progress=progress)
               for i, st in enumerate(stages)]
    b = baseline_stage(job, total_epochs(stages)) if job.baseline else None
    if b is not None:
        entries.append(stage_entry(job, b, random_init, out, progress=progress))
    entries += [stage_entry(job, d, start_from(d.teachers[0].name, "direct")[0], out, progress=progress)
                for d in extra_stages]
    all_summaries = run_stages(job, entries, out, phases)
    summaries = all_summaries[:len(stages)]

    results: list[dict[str, Any]] = []
    for st in stages:
        f = out / "stages" / st.name / "eval.json"
        with phases(f"stage {st.name}: eval", reused=f.is_file()):
            metrics = evaluate_checkpoint(job, out / "stages" / st.name / "model.pt", f, val_ds, progress)
        results.append({"name": f"student after stage {st.index + 1} ({st.teacher})", "role": "stage",
                        "stage": st.name, "epochs": st.epochs, "val": metrics_row(metrics)})
        log.info("after stage %s: val AP %.2f AP50 %.2f", st.name, 100 * metrics["AP"], 100 * metrics["AP50"])
    final = out / "stages" / stages[-1].name / "model.pt"

    others: dict[str, dict[str, Any]] = {}
    rest = iter(all_summaries[len(stages):])
    if b is not None:
        bsum = next(rest)
        f = out / "stages" / b.name / "eval.json"
        with phases("baseline: eval", reused=f.is_file()):
            m = evaluate_checkpoint(job, out / "stages" / b.name / "model.pt", f, val_ds, progress)
        others["baseline"] = {"summary": bsum, "val": metrics_row(m)}
    for d in extra_stages:
        dsum = next(rest)
        f = out / "stages" / d.name / "eval.json"
        with phases(f"{d.name}: eval", reused=f.is_file()):
            m = evaluate_checkpoint(job, out / "stages" / d.name / "model.pt", f, val_ds, progress)
        others["direct"] = {"summary": dsum, "val": metrics_row(m), "teacher": d.teacher}

    size = deployment_size(job, val_ds)
    models = {"baseline": out / "stages" / "baseline" / "model.pt" if job.baseline else None,
              **{f"teacher {n}": prep.checkpoints.get(n) for n in order}, "student": final}
    f = out / "report" / "latency.json"
    with phases("latency", reused=f.is_file()):
        latency = measure_latencies({k: v for k, v in models.items() if v}, size, f)
    with phases("report"):
        report = write_report(job, out, stages, summaries, results, teacher_evals, order, costs, others, final,
                              inherited, phases, time.perf_counter() - t_start, latency=latency, export_size=size)
    print("\n" + report["markdown"], flush=True)
    return report


def deployment_size(job: RunJobConfig, val_ds: Any) -> tuple[int, int]:
    """The input size the student is measured and exported at: the fixed size, or (keep-ratio views) the view of
    the first val image, a real example of what the deployed model is given."""
    resize = job.data.resize_spec("val")
    if resize.mode == "fixed":
        return resize.size
    view = val_ds.view_for(0)
    return view.out_h, view.out_w


LATENCY_THREADS = 1  # the report's latency column: batch 1, CPU, one intra-op thread, median of 10 runs
LATENCY_RUNS = 10


def measure_latencies(models: dict[str, str | Path], size: tuple[int, int], out: Path) -> dict[str, Any]:
    """{label: latency row (`curriculum.latency.measure`)} of each checkpoint, kept in `out` (a resumed run reuses
    it)."""
    from curriculum.latency import measure
    from teachers.zoo import load_detector

    if out.is_file():
        return json.loads(out.read_text())
    rows = {label: measure(load_detector(path), size, "cpu", LATENCY_THREADS, runs=LATENCY_RUNS)
            for label, path in models.items()}
    atomic_write_json(rows, out)
    return rows


def main_run(config: str, resume: bool = False, preset: str | None = None, overrides: list[str] | None = None,
             progress: bool = True, base_dir: str | None = None) -> int:
    job = load_run_config(config, overrides, preset)
    run_pipeline(job, resume=resume, progress=progress, base_dir=base_dir)
    return 0


__all__ = ["PRESETS", "check_run_config", "load_run_config", "run_pipeline", "run_stages", "stage_entry",
           "teacher_checkpoint",
           "teacher_class_maps", "main_run"]
