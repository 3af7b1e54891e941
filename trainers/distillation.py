"""The distillation step and its calibration, in one place.

- `build_student`: the student and its distiller (adapters, MGD's generation blocks) from the training seed, in
  the order a training worker builds them, so whoever builds them again (the calibration) gets the same weights.
- `DistillStep`: the `extra_loss` of `trainers.train.train_one_epoch`: the batch's teacher targets from a source
  (a cache reader, serving actors, or the teacher run inline on the same batch), then the distiller's terms;
  detector terms a loss rescales (Chen's mu) replace the originals.
- `open_teacher` / `stage_source`: a stage's teachers as a process reaches them (cache reader, object store,
  the teacher inline, or an adapter) and the batch's targets from them: one `TeacherTargets`, or one per teacher
  when a stage distils from several at once (`trainers.distill.build_joint_distiller`).
- `feature_factors` / `calibrate_factors`: `kd_ratio` calibration: one factor for the feature terms so that they
  add up to kd_ratio x the detector loss on the first batches, with student and adapters as the stage starts.

The Ray Train loop and Tune trials (`trainers.ray_train.run_sequence`, which calibrates each stage as it starts),
and the benches (bench/step_cost.py, bench/distill_methods.py) all use
these, so the step that is measured is the step that is trained.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from teachers.class_map import ClassMap
from teachers.targets import TeacherTargets, detached
from trainers.distill.outputs import forward_outputs, student_outputs_from

log = logging.getLogger(__name__)

Source = Callable[[list[torch.Tensor], list[dict]], Any]  # TeacherTargets, or {teacher: TeacherTargets}


def build_student(name: str, class_names: Sequence[str], seed: int, *, image_size: int, overrides: dict[str, Any],
                  init: str | dict[str, Any] | None = None, losses: Sequence[dict] | None = None,
                  teacher_channels: dict[str, int] | None = None,
                  teachers: Sequence[TeacherLink] | None = None,
                  adapters_from: str | None = None) -> tuple[Any, Any]:
    """(student, distiller or None), built from `seed`: the global RNG is seeded, the student built and loaded
    from `init` (a plain checkpoint, path or dict), then the distiller built for `losses` against the teacher's
    FPN channels (`teachers`: a stage's teachers, each with its own adapters and weight) and, from
    `adapters_from` (a stage's distiller.pt), given the tensors that match (`carry_adapters`).
    A teacher loaded before must not draw from the global RNG in between (`load_teacher` inside
    `torch.random.fork_rng`)."""
    from teachers.zoo import build_detector
    from trainers.distill import build_distiller, build_joint_distiller
    from curriculum.seeds import seed_everything

    seed_everything(seed)
    model = build_detector(name, len(class_names), image_size=image_size, class_names=tuple(class_names), **overrides)
    if init:
        load_plain(model, init)
    distiller = None
    if losses and teachers:
        distiller = build_joint_distiller(list(losses), model.level_channels,
                                          [(t.name, t.level_channels, t.weight) for t in teachers])
    elif losses:
        distiller = build_distiller(list(losses), model.level_channels, dict(teacher_channels or {}))
    if distiller is not None and adapters_from:
        carry_adapters(distiller, adapters_from)
    return model, distiller


def carry_adapters(distiller: torch.nn.Module, path: str) -> list[str]:
    """Load into `distiller` the tensors of a previous stage's distiller.pt whose name, shape and dtype match (the
    rest stay as built); returns the names taken."""
    from teachers.zoo import load_matching

    taken = load_matching(distiller, torch.load(path, map_location="cpu", weights_only=True)["state"])
    log.debug("adapters: %d/%d distiller tensors taken over from %s", len(taken), len(distiller.state_dict()), path)
    return taken


def load_plain(model: torch.nn.Module, init: str | dict[str, Any]) -> None:
    """Weights of a plain detector checkpoint (`Detector.checkpoint()`, a path or the dict) into `model`."""
    from teachers.zoo import read_checkpoint

    ckpt = init if isinstance(init, dict) else read_checkpoint(init)
    if ckpt["config"]["name"] != model.config.name:
        raise RuntimeError(f"{init if isinstance(init, str) else 'the start checkpoint'} holds "
                           f"{ckpt['config']['name']}, the stage trains {model.config.name}")
    model.load_state_dict(ckpt["model"])


@dataclass
class TeacherLink:
    """One teacher of a stage as a training process reaches it (`open_teacher`): its FPN channels, weight and class
    map, and exactly one of a cache reader, the teacher run inline, or a `teachers.adapter` teacher."""

    name: str
    weight: float
    level_channels: dict[str, int]
    checkpoint: str | None = None
    reader: Any = None
    model: Any = None
    adapter: Any = None
    class_map: ClassMap | None = None

    def source(self, keep: Any = None) -> Source:
        """Where this teacher's targets of a batch come from (`keep`: the fields an inline teacher computes)."""
        if self.reader is not None:
            reader = self.reader
            return lambda images, targets: reader.targets_for(targets)
        if self.adapter is not None:
            from teachers.adapter import AdapterSource

            return AdapterSource(self.adapter)
        return InlineSource(self.model, keep)

    def bind_heads(self, required: set[str], device: Any = "cpu") -> None:
        """Proposal sharing from a cache: the teacher's RoI and mask heads run here on the cached features."""
        if self.reader is not None and {"roi_scorer", "mask_scorer"} & required:
            from teachers.outputs import load_teacher

            with torch.random.fork_rng(devices=[]):
                self.reader.roi_head = load_teacher(self.checkpoint, self.name, device=str(device))


def open_teacher(member: dict[str, Any], *, inline: bool = False, device: Any = "cpu",
                 memory_bytes: int = 1 << 30, shard_store: str | None = None) -> TeacherLink:
    """A stage's teacher (`curriculum.plan.StageTeacher` as a dict) reached from this process: an adapter teacher
    always inline; a zoo teacher from its cache (`shard_store`: the name of the `ObjectStoreShards` actor holding
    it decoded; else read from the Parquet shards; either way holding at most `memory_bytes` of it) unless
    `inline` or it has none. Loading draws nothing from the global RNG, so the student built next is built as
    anywhere else."""
    class_map = ClassMap.from_dict(member["class_map"]) if member.get("class_map") else None
    link = TeacherLink(member["name"], float(member.get("weight", 1.0)), {}, member.get("checkpoint"),
                       class_map=class_map)
    with torch.random.fork_rng(devices=[]):
        if member.get("adapter"):
            from teachers.adapter import load_adapter

            link.adapter = load_adapter(member["adapter"]["target"], member["adapter"]["args"]).to(device)
            link.level_channels = dict(link.adapter.level_channels)
        elif inline or not member.get("cache"):
            from teachers.outputs import load_teacher

            link.model = load_teacher(member["checkpoint"], member["name"], device=str(device))
            link.level_channels = dict(link.model.level_channels)
        else:
            from teachers.readers import CacheReader, ObjectStoreReader

            components = bool(member.get("components"))
            link.reader = (ObjectStoreReader(shard_store, memory_bytes=memory_bytes, components=components)
                           if shard_store else CacheReader(member["cache"], memory_bytes=memory_bytes,
                                                           components=components))
            link.level_channels = link.reader.feature_channels()
    return link


def bind_teacher_heads(links: Sequence[TeacherLink], distiller: Any, device: Any = "cpu") -> None:
    """`TeacherLink.bind_heads` for every teacher whose terms in `distiller` score boxes or masks on cached
    features."""
    for link in links:
        link.bind_heads(distiller.required_teacher_targets(link.name if distiller.teachers else None), device)


def stage_source(links: Sequence[TeacherLink], distiller: Any) -> Source:
    """The targets of a batch for `distiller`: one teacher's `TeacherTargets`, or {teacher: TeacherTargets} when
    it distils from several at once."""
    plain = getattr(distiller, "module", distiller)  # DDP-wrapped or not
    if not plain.teachers:
        return links[0].source(plain.required_teacher_targets())
    sources = {link.name: link.source(plain.required_teacher_targets(link.name)) for link in links}
    return lambda images, targets: {name: src(images, targets) for name, src in sources.items()}


def stage_class_maps(links: Sequence[TeacherLink]) -> ClassMap | dict[str, ClassMap | None] | None:
    """`DistillStep`'s `class_map` for these teachers."""
    if len(links) == 1:
        return links[0].class_map
    return {link.name: link.class_map for link in links}


class InlineSource:
    """Teacher targets computed in this process on the student's own batch (the reference other frameworks use;
    costs a teacher forward per step). `keep`: only these `TeacherTargets` fields."""

    def __init__(self, teacher: Any, keep: Any = None) -> None:
        self.teacher, self.keep = teacher, keep

    def __call__(self, images: list[torch.Tensor], targets: list[dict]) -> TeacherTargets:
        return TeacherTargets.inline(self.teacher, images, [int(t["image_id"]) for t in targets], keep=self.keep)


class DistillStep:
    """`extra_loss` for `train_one_epoch`: teacher targets for the batch from `source(images, targets)`, then
    the distiller's terms at decay factor `decay` (MGD's masks drawn from `generator`). `want`: what the
    student's forward must record for them (`train_one_epoch` asks for exactly that).

    `class_map` (`teachers.class_map.ClassMap`): a teacher on other classes than the student's; its targets are
    mapped into the student's labels as they come from the source. Several teachers at once: the source gives
    {teacher: TeacherTargets} and `class_map` is {teacher: ClassMap or None}.
    On a CUDA `device` the targets are moved there and the distiller runs under the student's bf16 autocast
    (the student's features come out of it, and fp32 adapters refuse bf16 inputs); its terms come back float32.

    `adapters_only`: for this many first calls the terms see the student's outputs detached, so they train the
    adapters alone (`adapter_warmup`: fresh adapters fit the student before their gradients reach it).
    """

    def __init__(self, source: Source, distiller: torch.nn.Module, decay: float = 1.0,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 scales: dict[str, float] | None = None,
                 class_map: ClassMap | dict[str, ClassMap | None] | None = None, adapters_only: int = 0) -> None:
        self.source, self.distiller, self.decay, self.generator = source, distiller, decay, generator
        self.class_map = class_map
        self.adapters_only, self.calls = adapters_only, 0
        self.device = torch.device(device) if device is not None else None
        self.autocast = self.device is not None and self.device.type == "cuda"
        plain = getattr(distiller, "module", distiller)  # DDP-wrapped or not
        self.scales = plain.detector_loss_scales() if scales is None else scales
        self.want = forward_outputs(plain.required_student_outputs())

    def targets(self, images: list[torch.Tensor], targets: list[dict]) -> TeacherTargets | dict[str, TeacherTargets]:
        tt = self.source(images, targets)
        if isinstance(tt, dict):
            maps = self.class_map or {}
            return {name: self._ready(t, maps.get(name)) for name, t in tt.items()}
        return self._ready(tt, self.class_map)

    def _ready(self, tt: TeacherTargets, class_map: ClassMap | None) -> TeacherTargets:
        if class_map is not None:  # before the move: the mapped targets are smaller
            tt = class_map.apply(tt)
        return tt.to(self.device) if self.autocast else tt

    def terms(self, out: Any, tt: TeacherTargets | dict[str, TeacherTargets], targets: list[dict]
              ) -> dict[str, torch.Tensor]:
        """The distillation terms of one forward `out` (`teachers.zoo.DetectorOutput`) against `tt`."""
        gt = [{"boxes": t["boxes"], "labels": t["labels"], "image_id": t["image_id"]} for t in targets]
        student = student_outputs_from(out)
        if self.calls < self.adapters_only:
            student = detached(student)
        self.calls += 1
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
            terms = self.distiller(student, tt, gt, decay=self.decay, generator=self.generator)
        if self.autocast:
            terms = {k: v.float() for k, v in terms.items()}
        for name, factor in self.scales.items():  # detector terms a loss rescales replace the originals
            if name in out.losses:
                terms[name] = out.losses[name] * factor
        return terms

    def __call__(self, out: Any, targets: list[dict], images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.terms(out, self.targets(images, targets), targets)


def feature_factors(student: torch.nn.Module, distiller: torch.nn.Module, batches: Sequence[tuple[list, list]],
                    source: Source, kd_ratio: float, seed: int,
                    class_map: ClassMap | dict[str, ClassMap | None] | None = None) -> dict[str, float]:
    """One factor for the distiller's feature terms (by entry key; {} when it has none) so that, on `batches`,
    they add up to `kd_ratio` x the detector's loss, with the student and the distiller as they are now
    (`class_map`: as `DistillStep`'s, so the head terms computed alongside see the student's classes).

    Nothing is trained: no gradients, and the student's and the distiller's states (BatchNorm statistics) and
    the global torch RNG are restored, so training starts exactly as it would have.
    """
    from trainers.distill.common import FeatureTerm

    keys = [k for k, term in distiller.terms.items() if isinstance(term, FeatureTerm)]
    if not keys:
        return {}
    saved = copy.deepcopy(student.state_dict()), copy.deepcopy(distiller.state_dict()), torch.get_rng_state()
    modes = student.training, distiller.training
    student.train(), distiller.train()
    step = DistillStep(source, distiller, generator=torch.Generator().manual_seed(seed), class_map=class_map)
    det = feat = 0.0
    try:
        with torch.no_grad():
            for images, targets in batches:
                out = student(images, targets, want=step.want)
                terms = step(out, targets, images)
                det += float(sum(out.losses.values()))
                feat += sum(float(terms[f"distill_{k}"]) for k in keys)
    finally:
        student.load_state_dict(saved[0]), distiller.load_state_dict(saved[1]), torch.set_rng_state(saved[2])
        student.train(modes[0]), distiller.train(modes[1])
    factor = kd_ratio * det / max(feat, 1e-12)
    return {k: factor for k in keys}


@dataclass
class StageStart:
    """A stage's student and distiller as its training worker builds them, with its teacher links and its first
    training batches, collated in data-set order with epoch 0's views (`stage_start`)."""

    student: torch.nn.Module
    distiller: torch.nn.Module
    links: list[TeacherLink]
    batches: list[tuple[list, list]]

    def step(self, seed: int) -> DistillStep:
        """The stage's distillation step over these links (masks drawn from a generator seeded with `seed`)."""
        return DistillStep(stage_source(self.links, self.distiller), self.distiller,
                           generator=torch.Generator().manual_seed(seed), class_map=stage_class_maps(self.links))


def stage_start(job: Any, stage: dict[str, Any], init: str | None, memory_bytes: int,
                shard_stores: dict[str, str] | None = None, batches: int = 4) -> StageStart:
    """`stage` (`Stage.to_dict()`) as it starts from `init`: student and distiller built as the stage's training
    worker builds them (`build_student`, same seed, so the adapters are the adapters trained), each teacher linked
    to its cache (`shard_stores` {teacher: store name}: through the same decoded shards the training reads) or, a
    teacher without one, inline, and the first `batches` training batches of `job` (a `TrainJobConfig`). The
    caller's random state is restored."""
    from curriculum.data import collate_fn
    from curriculum.seeds import preserved_random_state
    from teachers.zoo import needs_masks
    from trainers.train import build_dataset

    ds = build_dataset(job.data, "train", seed=job.train.seed, masks=needs_masks(job.model.name))
    ds.set_epoch(0)
    links = [open_teacher(dict(m), memory_bytes=memory_bytes // len(stage["teachers"]),
                          shard_store=(shard_stores or {}).get(m["name"])) for m in stage["teachers"]]
    bs = job.train.batch_size
    data = [collate_fn([ds[i] for i in range(b * bs, min(len(ds), (b + 1) * bs))])
            for b in range(min(batches, max(1, len(ds) // bs)))]
    with preserved_random_state():
        student, distiller = build_student(job.model.name, ds.class_names, job.train.seed,
                                           image_size=job.data.image_size, overrides=job.model.overrides(),
                                           init=init, losses=stage["losses"], teachers=links,
                                           adapters_from=stage.get("adapters_from"))
    bind_teacher_heads(links, distiller)
    return StageStart(student, distiller, links, data)


def calibrate_factors(job: Any, stage: dict[str, Any], init: str | None, memory_bytes: int,
                      shard_stores: dict[str, str] | None = None, batches: int = 4) -> dict[str, float]:
    """`kd_ratio`: one factor for `stage`'s feature terms (`Stage.to_dict()`) so that they add up to kd_ratio x the
    detector loss on the first `batches` training batches of `job` (a `TrainJobConfig`: data, student, schedule;
    data-set order, epoch 0 views), with the student as the stage starts from `init` (`stage_start`,
    `feature_factors`). Nothing is trained."""
    if stage.get("kd_ratio") is None or not stage.get("teachers"):
        return {}
    from curriculum.seeds import preserved_random_state

    with preserved_random_state():
        start = stage_start(job, stage, init, memory_bytes, shard_stores, batches)
        return feature_factors(start.student, start.distiller, start.batches,
                               stage_source(start.links, start.distiller), stage["kd_ratio"], job.train.seed,
                               class_map=stage_class_maps(start.links))


__all__ = ["DistillStep", "InlineSource", "StageStart", "TeacherLink", "bind_teacher_heads", "build_student",
           "calibrate_factors", "carry_adapters", "feature_factors", "load_plain", "open_teacher", "stage_class_maps",
           "stage_source", "stage_start"]
