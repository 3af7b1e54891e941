"""Step cost of distillation: training steps per second with and without a teacher ("cost, scale and faults").

For one student, the same batches in the same order and the same loss (by default MGD, the authors' RetinaNet
preset; `--loss` picks others; via `trainers.distill.build_distiller` with the teacher's level channels), these arms
per teacher (`--arms`; a, b, c and d by default):

- (a) the plain student step: forward with losses, backward, gradient clipping, AdamW step (as
  `trainers.train.train_one_epoch` does it);
- (b) the same step distilling from a real Parquet cache (`teachers.precompute.precompute`, beforehand and not timed,
  for exactly the benchmark's images and views), read one batch ahead in a background thread
  (`trainers.ray_train.TargetReadAhead`, as the Ray Train loop does); the step waits for it. `--reader
  object_store` (the default, as `curriculum run` and `curriculum tune` read it): a
  `teachers.readers.ObjectStoreShards` actor holds every shard decoded in Ray's object store (decoded before the
  arms, not timed, as a sweep's later trials find it) and each arm's fresh reader gets the rows zero-copy;
  `--reader parquet`: the process decodes the Parquet rows itself (`teachers.readers.CacheReader`, as with
  `object_store: false`);
- (c) the same step distilling from `teachers.serving.TeacherServer` actors, `teachers.serving.prefetch` keeping the
  next batches' requests in flight while the student computes;
- (d) the same step with the teacher inline in the step (`TeacherTargets.inline`, as `teacher_mode: inline` and
  other frameworks do);
- (e) arm (b) with every convolution of the loss's connectors on PyTorch's default path (oneDNN on the CPU):
  `trainers.distill.common.SmallMapConv2d` off, to show what running its small convolutions with PyTorch's
  im2col kernel saves;
- (f) arm (b)'s loss on the same targets read before the arm (held in memory: no read, no read-ahead thread), so
  (f)/(a) is the loss's own compute and (b)/(f) what reading the cache costs the step. Small `--steps` with many
  `--repeats` interleave the arms finely enough that a drifting machine load cancels in the ratios;
- (g) arm (b) reading each batch's targets in the step itself, without the read-ahead thread: (b)/(g) is what
  reading ahead in a thread gains (or, where the student's threads fill the cores, costs) the step.

It prints (b)/(a), (c)/(a), (d)/(a) per teacher (and (b)/(e), (b)/(f), (b)/(g) with those arms) and where the
time of (b) goes (waiting for the targets, moving them to the device, the distillation losses, the rest; beside
them, the background reads' own time and CPU), with the machine and the resources each figure was measured on. Arms
are interleaved (a, b, c, d, a, b, ...) for `--repeats` rounds and each ratio is taken within a round, because the
load of a shared machine drifts; the tables give medians over rounds.

    # the real measurement, CPU (the two default teachers: CNN fcos_resnet18_half and Swin fcos_swin_mini)
    .venv/bin/python bench/step_cost.py --steps 40 --warmup 5 --repeats 3 --threads 1
    # on a GPU machine: student and inline teacher on the GPU (bf16 autocast), serving actors with GPUs
    .venv/bin/python bench/step_cost.py --device cuda --steps 100 --warmup 10 --repeats 3 --threads 4
    # a smoke run
    .venv/bin/python bench/step_cost.py --steps 3 --warmup 1 --repeats 1 --teacher fcos_resnet_mini

Teachers: `--teacher NAME[=CHECKPOINT]` (repeatable). Without a checkpoint the zoo's random weights are saved
once under `--out/teachers/` and used: a step's cost does not depend on the weights (the output says so).
Data: the built-in shapes data set under `--data-root` (generated when missing); the first
(warmup + steps) x batch train images (all of them at most; the batches then cycle), collated once into the list
of batches every arm uses. With `--flip random` (the default, as in configs/run_default.yaml) the cache holds
the plain and the flipped view of every image, as `curriculum run` caches them.

On a GPU (`--device cuda`) the student's forward, the inline teacher's and the distiller's run under bf16
autocast, as in trainers/ray_train.py (the distiller's adapters must run under the student's autocast: their fp32
convolutions refuse bf16 student features). Batches are moved to
the GPU inside the step, and each step ends with a synchronising `float()` of its loss terms, as in
`train_one_epoch`. The timed passes carry no other synchronisation; the breakdown of (b) then comes from one
more pass of (a) and of (b) that synchronise around each part. With several GPUs the student takes the last
one and Ray the others, so the serving actors have their own devices; with one GPU they share it with the
student. On the CPU the serving actors run on the same machine's cores as the student (and as other users'
jobs): (c) then measures teachers competing for the student's cores, not teachers on their own devices, which
the goal (c)/(a) >= 0.8 assumes.

Results: `--out` (default runs/bench_step_cost/): `step_cost_<device>.json` and `step_cost_<device>.md`, the
caches under `cache/`, the random-weight teacher checkpoints under `teachers/`, the data subset under `data/`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curriculum.config import (  # noqa: E402
    CacheConfig, CompressionConfig, DataConfig, PrecomputeJobConfig, RayInitConfig, TeacherSpec, TrainConfig,
)
from curriculum.data import collate_fn  # noqa: E402
from teachers.zoo import Detector, build_detector  # noqa: E402
from trainers.distill import TeacherTargets, build_distiller  # noqa: E402
from trainers.distill.common import SmallMapConv2d  # noqa: E402
from trainers.distillation import DistillStep  # noqa: E402
from trainers.train import build_dataset, make_optimizer, make_scheduler  # noqa: E402

ARMS = ("a", "b", "c", "d", "e", "f", "g")
CACHE_ARMS = ("b", "e", "f", "g")  # the arms that read the teacher cache
ARM_LABELS = {"a": "(a) no distillation", "b": "(b) from the cache", "c": "(c) from serving actors",
              "d": "(d) teacher inline", "e": "(e) (b), small connector convs on oneDNN",
              "f": "(f) (b)'s loss, targets read beforehand", "g": "(g) (b), read in the step, no thread"}
GOALS = {"a": "", "b": ">= 0.9", "c": ">= 0.8 (teachers on their own devices)", "d": "expected 0.3 to 0.5", "e": "",
         "f": "", "g": ""}


def loss_entries(names: str) -> list[dict[str, Any]]:
    """`--loss a,b`: the distiller entries (MGD with the authors' RetinaNet preset, the others as configured)."""
    return [{"name": n, "preset": "retinanet"} if n == "mgd" else {"name": n} for n in names.split(",")]


def loss_label(names: str) -> str:
    return ", ".join("MGD, authors' RetinaNet preset" if n == "mgd" else n for n in names.split(","))
DEFAULT_TEACHERS = ("fcos_resnet18_half", "fcos_swin_mini")

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
TargetsFn = Callable[[list[torch.Tensor], list[dict[str, Any]]], TeacherTargets]
Feed = Iterator[tuple[list[torch.Tensor], list[dict[str, Any]], TargetsFn | None]]


# ------------------------------------------------------------------------------------------------ machine, Ray


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": str(device), "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def gpu_plan(args: argparse.Namespace) -> tuple[torch.device, int, float, bool]:
    """(student device, GPUs given to Ray, GPUs per serving actor, teachers share the student's GPU)."""
    if args.device == "cpu":
        return torch.device("cpu"), 0, 0.0, False
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    n = torch.cuda.device_count()
    if n == 1:  # one GPU: everybody on it
        per = args.serve_gpus if args.serve_gpus is not None else 1.0 / args.serve_actors
        return torch.device("cuda:0"), 1, per, True
    # Ray numbers its GPUs 0..n-2: the student takes the last one, the teachers the others.
    per = args.serve_gpus if args.serve_gpus is not None else min(1.0, (n - 1) / args.serve_actors)
    return torch.device(f"cuda:{n - 1}"), n - 1, per, False


def start_ray(args: argparse.Namespace, ray_gpus: int) -> bool:
    """Join or start Ray with explicit logical CPUs; True when this process started it (and must stop it)."""
    import ray

    from curriculum.cluster import ensure_ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ensure_ray(RayInitConfig())
        return False
    ray.init(num_cpus=args.ray_cpus, num_gpus=ray_gpus, object_store_memory=512 * 2**20, include_dashboard=False,
             logging_level="warning")
    return True


# ------------------------------------------------------------------------------------------------ data, teachers


def prepare_batches(args: argparse.Namespace, out: Path) -> tuple[DataConfig, list[Batch], dict[str, Any]]:
    """The data config of the benchmark's images (a subset annotation file) and its batches, collated once."""
    root = Path(args.data_root)
    if not (root / "train" / "instances.json").is_file():
        from curriculum.shapes import ensure_builtin_data

        ensure_builtin_data(DataConfig(root=str(root)))  # the default shapes data set at 128 px
    ann = json.loads((root / "train" / "instances.json").read_text())
    want = (args.warmup + args.steps) * args.batch_size
    n = min(want, len(ann["images"])) // args.batch_size * args.batch_size
    if n == 0:
        raise SystemExit(f"{root}/train has fewer images than one batch of {args.batch_size}")
    ann["images"] = ann["images"][:n]
    keep = {im["id"] for im in ann["images"]}
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    subset = out / "data" / f"train_first{n}.json"
    subset.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(ann)
    if not subset.is_file() or subset.read_text() != text:  # unchanged bytes keep the caches' data fingerprint
        subset.write_text(text)
    data = DataConfig(root=str(root), builtin="none", train_images=str(root / "train" / "images"),
                      train_annotations=str(subset), image_size=args.image_size, flip=args.flip)
    ds = build_dataset(data, "train", seed=args.seed)
    ds.set_epoch(0)
    batches = [collate_fn([ds[i] for i in range(b, b + args.batch_size)]) for b in range(0, n, args.batch_size)]
    meta = json.loads((root / "shapes.json").read_text()) if (root / "shapes.json").is_file() else {}
    info = {"root": str(root), "images": n, "num_classes": ds.num_classes, "batches": len(batches),
            "cycled": want > n, "flip": args.flip,
            "generator": {k: meta[k] for k in ("generator", "version") if k in meta}}
    return data, batches, info


def parse_teacher(text: str) -> tuple[str, str | None]:
    name, _, ckpt = text.partition("=")
    return name, ckpt or None


def teacher_checkpoint(name: str, ckpt: str | None, num_classes: int, args: argparse.Namespace, out: Path
                       ) -> tuple[str, str]:
    """(checkpoint path, weights description): the given checkpoint, or the zoo's random weights saved once."""
    if ckpt:
        return str(Path(ckpt).resolve()), f"checkpoint {ckpt}"
    path = out / "teachers" / f"{name}-random-seed{args.seed}-{args.image_size}px.pt"
    if not path.is_file():  # kept: the same file keeps the same cache key
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        torch.save(build_detector(name, num_classes, image_size=args.image_size).checkpoint(), path)
    return str(path.resolve()), "random weights"


def cache_spec(student: Detector, teacher: Detector, losses: list[dict[str, Any]]
               ) -> tuple[list[str], list[str] | None]:
    """Target kinds and FPN levels the loss reads, as `curriculum run` decides them for its caches."""
    from curriculum.plan import cache_needs

    stage = SimpleNamespace(teachers=[SimpleNamespace(name="t")], losses=losses)
    return cache_needs([stage], student.level_channels, {"t": teacher.level_channels})["t"]


def build_cache(ckpt: str, data: DataConfig, kinds: list[str], levels: list[str] | None, gpus: float,
                args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Precompute (or reuse) the teacher's cache of exactly the benchmark's images and views; not timed."""
    from teachers.cache import TeacherCache
    from teachers.precompute import precompute

    views = {"none": ["noflip"], "always": ["flip"], "random": ["noflip", "flip"]}[args.flip]
    job = PrecomputeJobConfig(
        data=data,
        teachers=[TeacherSpec(checkpoint=ckpt, actors=1, cpus_per_actor=args.serve_cpus, gpus_per_actor=gpus,
                              threads=args.serve_threads, batch_size=args.batch_size)],
        cache=CacheConfig(root=str(out / "cache"), targets=kinds, levels=levels, views=views,
                          shard_size=args.shard_size,
                          compression=CompressionConfig(dtype=args.cache_dtype, pca=args.pca)),
        ray=RayInitConfig(num_cpus=args.ray_cpus),
    )
    (rep,) = precompute(job, progress=False)
    shards = TeacherCache.open(rep.cache).manifest["shards"].values()
    return {"path": rep.cache, "targets": kinds, "levels": levels, "views": views, "dtype": args.cache_dtype,
            "pca": args.pca, "components": args.components, "shard_size": args.shard_size, "bytes": sum(int(s.get("bytes", 0)) for s in shards),
            "precompute_s": round(rep.seconds, 2), "reused": not rep.computed}


# ------------------------------------------------------------------------------------------------ the step


class Clock:
    """Sums of wall time per part of the step; synchronises the GPU around each part when `sync`."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.sums: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.sums[name] = self.sums.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Learner:
    """A fresh student (and distiller) with its optimiser: every arm starts from the same state."""

    model: Detector
    distiller: torch.nn.Module | None
    opt: torch.optim.Optimizer
    sched: Any
    step: DistillStep | None  # its `terms`: the training step's distillation part (the feed gives the targets)
    device: torch.device
    grad_clip: float
    stats: dict[str, float] = field(default_factory=dict)


def new_learner(template: Detector, teacher_channels: dict[str, int] | None, device: torch.device,
                args: argparse.Namespace) -> Learner:
    model = copy.deepcopy(template).to(device).train()
    distiller = step = None
    params = list(model.parameters())
    if teacher_channels is not None:
        torch.manual_seed(args.seed)
        distiller = build_distiller(loss_entries(args.loss), model.level_channels, teacher_channels).to(device).train()
        params += list(distiller.parameters())
        gen = torch.Generator(device=device).manual_seed(args.seed)
        step = DistillStep(None, distiller, 1.0, gen, device=device)
    t = TrainConfig(batch_size=args.batch_size, warmup_iters=0)  # AdamW, lr 2e-3, weight decay 1e-4, clip 10
    opt = make_optimizer(params, t)
    return Learner(model, distiller, opt, make_scheduler(opt, t, 10**6), step, device, t.grad_clip)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device) -> Batch:
    """What `trainers.ray_train._DeviceLoader` does: a no-op on the CPU."""
    if device.type == "cpu":
        return images, targets
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


def train_step(s: Learner, images: list[torch.Tensor], targets: list[dict[str, Any]], teacher: TargetsFn | None,
               clock: Clock) -> None:
    """One step as `train_one_epoch` with `trainers.distillation.DistillStep` makes it, with its parts timed: the
    targets from the feed, their move to the device, then the step's own `terms` (detector-loss scales included)."""
    images, targets = to_device(images, targets, s.device)
    want = s.step.want if teacher is not None else ("losses",)
    with clock.part("forward"), autocast(s.device):
        out = s.model(images, targets, want=want)
    terms = dict(out.losses)
    if teacher is not None:
        with clock.part("targets"):
            tt = teacher(images, targets)
        with clock.part("move"):
            tt = tt.to(s.device)
        with clock.part("losses"):
            terms.update(s.step.terms(out, tt, targets))
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in the benchmark: { {k: float(v) for k, v in terms.items()} }")
    with clock.part("backward"):  # the losses' backward included: one graph
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
        s.opt.step()
        s.sched.step()
    for k, v in terms.items():  # the synchronising read train_one_epoch does
        s.stats[k] = float(v.detach())


def held_feed(batches: list[Batch], n: int, reader: Any) -> Feed:
    """(b)'s targets, every batch's read before the first step and held: the steps read nothing."""
    held = [reader.targets_for(targets) for _, targets in batches[:n]]
    for i, (images, targets) in enumerate(batch_stream(batches, n)):
        yield images, targets, (lambda _i, _t, tt=held[i % len(held)]: tt)


def inline_read_feed(batches: list[Batch], n: int, reader: Any) -> Feed:
    """(b)'s reads, each batch's in its own step (its "targets" part) rather than one batch ahead in a thread."""
    for images, targets in batch_stream(batches, n):
        yield images, targets, (lambda _i, t: reader.targets_for(t))


def measure(s: Learner, feed: Feed, warmup: int, steps: int, sync_parts: bool) -> dict[str, Any]:
    """Run warmup + steps steps from `feed`; the wall time of the last `steps` (waiting for the feed included)."""
    clock = Clock(s.device, sync_parts)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            clock.sums.clear()
            t0 = time.perf_counter()
        with clock.part("wait"):
            images, targets, teacher = next(feed)
        train_step(s, images, targets, teacher, clock)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps_per_s": steps / seconds,
            "parts_ms": {k: 1000.0 * v / steps for k, v in clock.sums.items()}, "loss_terms": dict(s.stats)}


# ------------------------------------------------------------------------------------------------ the four feeds


def batch_stream(batches: list[Batch], n: int) -> Iterator[Batch]:
    for i in range(n):
        yield batches[i % len(batches)]


def plain_feed(batches: list[Batch], n: int) -> Feed:
    for images, targets in batch_stream(batches, n):
        yield images, targets, None


def cache_feed(batches: list[Batch], n: int, reader: Any, reads: list[tuple[float, float]]) -> Feed:
    """As `trainers.ray_train` reads the cache: the next batch's targets read in a background thread while the
    current step computes (`TargetReadAhead`); the step's "targets" time is then its wait for them. Each read's
    (seconds, its thread's CPU seconds) go to `reads`: on a machine with no core to spare it holds up the step."""
    from trainers.ray_train import TargetReadAhead

    def read(images: list, targets: list) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return reader.targets_for(targets)
        finally:
            reads.append((time.perf_counter() - start, time.thread_time() - cpu))

    source = TargetReadAhead(read)
    for images, targets in source.wrap(batch_stream(batches, n)):
        yield images, targets, source


def warm_store(path: str, budget_bytes: int = 1 << 30) -> Any:
    """An `ObjectStoreShards` on the cache with every shard decoded into the object store (not timed), as a
    sweep's trials after the first and a run's later epochs find it."""
    from teachers.readers import ObjectStoreShards

    store = ObjectStoreShards(path, budget_bytes=budget_bytes)
    warm = store.reader()
    for i in range(warm.manifest["num_shards"]):
        warm.shard_nbytes(i)
    return store


def serve_feed(batches: list[Batch], n: int, server: Any, depth: int) -> Feed:
    from teachers.serving import prefetch

    for images, targets, tt in prefetch(server, batch_stream(batches, n), depth=depth):
        yield images, targets, (lambda _i, _t, tt=tt: tt)


def inline_feed(batches: list[Batch], n: int, teacher: Detector, keep: set[str], device: torch.device) -> Feed:
    def run(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> TeacherTargets:
        with autocast(device):
            return TeacherTargets.inline(teacher, images, [int(t["image_id"]) for t in targets], keep=keep)

    for images, targets in batch_stream(batches, n):
        yield images, targets, run


# ------------------------------------------------------------------------------------------------ one teacher


@dataclass
class TeacherSetup:
    name: str
    checkpoint: str
    weights: str
    detector: Detector  # on the student's device, for (d)
    cache: dict[str, Any] | None = None
    reader_path: str | None = None
    store: Any = None  # ObjectStoreShards with every shard decoded (--reader object_store)
    server: Any = None
    serving: dict[str, Any] = field(default_factory=dict)


def run_arm(arm: str, t: TeacherSetup, template: Detector, batches: list[Batch], device: torch.device,
            args: argparse.Namespace, sync_parts: bool) -> dict[str, Any]:
    if arm == "e":  # (b) with the connectors' small convolutions back on PyTorch's default path
        with SmallMapConv2d.bound(0):
            return run_arm("b", t, template, batches, device, args, sync_parts)
    n = args.warmup + args.steps
    channels = None if arm == "a" else t.detector.level_channels
    if arm in CACHE_ARMS:  # a fresh reader per arm, holding no shard yet
        from teachers.readers import CacheReader

        if args.reader == "object_store":
            reader = t.store.reader(memory_bytes=1 << 30, components=args.components)
        else:  # its first read of a shard decodes it, as in a training run's first epoch
            reader = CacheReader(t.reader_path, memory_bytes=1 << 30, components=args.components)
        channels = reader.feature_channels()  # the components' with --components
    s = new_learner(template, channels, device, args)
    reads: list[tuple[float, float]] = []
    if arm == "a":
        feed = plain_feed(batches, n)
    elif arm == "b":
        feed = cache_feed(batches, n, reader, reads)
    elif arm == "f":
        feed = held_feed(batches, n, reader)
    elif arm == "g":
        feed = inline_read_feed(batches, n, reader)
    elif arm == "c":
        feed = serve_feed(batches, n, t.server, args.prefetch_depth)
    else:
        feed = inline_feed(batches, n, t.detector, s.distiller.required_teacher_targets(), device)
    res = measure(s, feed, args.warmup, args.steps, sync_parts)
    if reads:  # the reads of the timed steps' batches (each read runs one batch ahead of its step)
        timed = reads[args.warmup:args.warmup + args.steps]
        res["parts_ms"]["read"] = 1000.0 * sum(r[0] for r in timed) / len(timed)
        res["parts_ms"]["read_cpu"] = 1000.0 * sum(r[1] for r in timed) / len(timed)
    return res


PARTS = ("targets", "move", "losses", "forward", "backward")


def breakdown(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median ms per step of each part; `other` is what no part covers (batch to device, feed, loss reads)."""
    med = statistics.median
    out = {"step": med([1000.0 / r["steps_per_s"] for r in rows])}
    out.update({k: med([r["parts_ms"].get(k, 0.0) for r in rows]) for k in PARTS})
    out["other"] = out["step"] - sum(out[k] for k in PARTS)
    for k in ("read", "read_cpu"):  # the background reads overlap the parts; not one of them
        out[k] = med([r["parts_ms"].get(k, 0.0) for r in rows])
    return out


def summarise(t: TeacherSetup, rounds: list[dict[str, dict[str, Any]]], profile: dict[str, dict[str, Any]],
              arms: list[str], batch: int, reader: str = "object_store") -> dict[str, Any]:
    """Medians over rounds; ratios to (a) within each round; the breakdown of (b) next to (a)'s.

    `profile`: synchronised passes of (a) and (b) on a GPU, else empty (the timed passes serve)."""
    med = statistics.median
    res: dict[str, Any] = {"teacher": t.name, "checkpoint": t.checkpoint, "weights": t.weights, "cache": t.cache,
                           "serving": t.serving, "arms": {}, "ratios": {}}
    for arm in arms:
        sps = [r[arm]["steps_per_s"] for r in rounds]
        parts = {k: med([r[arm]["parts_ms"].get(k, 0.0) for r in rounds]) for k in rounds[0][arm]["parts_ms"]}
        res["arms"][arm] = {"steps_per_s": med(sps), "images_per_s": med(sps) * batch, "rounds": sps,
                            "step_ms": 1000.0 / med(sps), "parts_ms": parts}
        if "a" in arms:
            res["ratios"][arm] = med([r[arm]["steps_per_s"] / r["a"]["steps_per_s"] for r in rounds])
    # (b) against its variants, within each round: what SmallMapConv2d saves (e), what reading the cache costs the
    # step (f), what reading ahead in a thread gains over reading in the step (g)
    for other in ("e", "f", "g"):
        if "b" in arms and other in arms:
            res[f"b_over_{other}"] = med([r["b"]["steps_per_s"] / r[other]["steps_per_s"] for r in rounds])
    if "b" in arms:
        rows = {arm: [profile[arm]] if profile else [r[arm] for r in rounds] for arm in ("b", "a") if arm in arms}
        res["breakdown_b"] = {"synchronised": bool(profile), "reader": reader,
                              "ms": {arm: breakdown(v) for arm, v in rows.items()}}
    return res


# ------------------------------------------------------------------------------------------------ report


def markdown(results: list[dict[str, Any]], head: dict[str, Any]) -> str:
    m, a = head["machine"], head["args"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else (", GPUs seen but unused" if m.get("gpus") else ", no GPU")
    lines = [
        f"# Step cost of distillation: student {a['student']}, batch {a['batch_size']}, {a['image_size']} px, "
        f"{a['steps']} steps after {a['warmup']} warm-up, {a['repeats']} round(s)", "",
        f"Command: `{head['command']}`", "",
        f"Machine: {m['cpu']}; {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['memory_gib']} GiB{gpu}; "
        f"load average {m['load_average']} at the start (a shared machine: other jobs run beside this one); "
        f"python {m['python']}, torch {m['torch']}.",
        f"Student process: device `{m['device']}`, {m['torch_threads']} torch thread(s)"
        + (", bf16 autocast on the student's, the inline teacher's and the distiller's forward."
           if m["device"] != "cpu" else "."),
        f"Ray: {head['ray']['resources']}; serving: {head['ray']['serving']}; the precompute (not timed) ran on one "
        "actor of the same size.",
        f"Data: {head['data']['images']} images of `{head['data']['root']}`/train in {head['data']['batches']} batches"
        + (" (cycled)" if head["data"]["cycled"] else "") + f", flip {head['data']['flip']}; the same batches in the "
        "same order for every arm. Loss: " + loss_label(a.get("loss", "mgd")) + " (weights as configured: cost only).", "",
    ]
    lines += [f"Note: {n}" for n in head["notes"]] + [""]
    for r in results:
        lines += [f"## teacher {r['teacher']} ({r['weights']})", "",
                  "| arm | steps/s | images/s | ratio to (a) | goal | per step |", "|---|---:|---:|---:|---|---|"]
        for arm, v in r["arms"].items():
            p = v["parts_ms"]
            note = {"b": f"; waits {p.get('targets', 0):.1f} ms for the targets",
                    "e": f"; waits {p.get('targets', 0):.1f} ms for the targets",
                    "c": f"; waits {p.get('wait', 0):.1f} ms for the teachers",
                    "d": f"; teacher forward {p.get('targets', 0):.1f} ms"}.get(arm, "")
            ratio = r["ratios"].get(arm)
            lines.append(f"| {ARM_LABELS[arm]} | {v['steps_per_s']:.2f} | {v['images_per_s']:.1f} | "
                         f"{'-' if ratio is None else f'{ratio:.3f}'} | {GOALS[arm]} | {v['step_ms']:.1f} ms{note} |")
        if "b_over_e" in r:
            b, e = r["arms"]["b"]["step_ms"], r["arms"]["e"]["step_ms"]
            lines += ["", f"Small connector convolutions on PyTorch's im2col kernel (`SmallMapConv2d`, below "
                          f"{SmallMapConv2d.max_macs} multiply-adds on the CPU): (b) {b:.1f} ms per step against (e) "
                          f"{e:.1f} ms on oneDNN, (b)/(e) speed {r['b_over_e']:.3f} (median of the rounds' ratios)."]
        if "b_over_f" in r:
            lines += ["", f"Reading the cache, against the same loss on targets held in memory: (b)/(f) speed "
                          f"{r['b_over_f']:.3f} (median of the rounds' ratios); the loss's own compute: (f)/(a) "
                          f"{r['ratios'].get('f', float('nan')):.3f}."]
        if "b_over_g" in r:
            lines += ["", f"Reading one batch ahead in a thread, against reading in the step: (b)/(g) speed "
                          f"{r['b_over_g']:.3f} (median of the rounds' ratios; above 1: the thread gains)."]
        if r.get("cache"):
            c = r["cache"]
            made = "reused" if c["reused"] else f"{c['precompute_s']:.1f} s"
            lines += ["", f"Cache: {c['dtype']}, targets {c['targets']}, levels {c['levels'] or 'all'}, views "
                          f"{c['views']}, {c['bytes'] / 2**20:.1f} MiB in shards of {c['shard_size']} images "
                          f"(precompute {made}, not timed)."]
        if r.get("breakdown_b"):
            lines += ["", *breakdown_table(r["breakdown_b"], m["device"])]
        lines.append("")
    return "\n".join(lines)


def breakdown_table(bd: dict[str, Any], device: str) -> list[str]:
    b, a = bd["ms"]["b"], bd["ms"].get("a")
    lines = ["Where the time of (b) goes (ms per step, median"
             + (", from passes of (a) and (b) synchronised around each part)" if bd["synchronised"] else ")")
             + ":", "", "| part | (b) ms/step | share of (b) | (a) ms/step |", "|---|---:|---:|---:|"]
    reader = "ObjectStoreReader" if bd.get("reader", "parquet") == "object_store" else "CacheReader"
    for label, key in ((f"waiting for the targets ({reader}, read one batch ahead)", "targets"),
                       (f"moving them to `{device}`", "move"),
                       ("the distillation losses, forward (distiller)", "losses"),
                       ("student forward (with losses; in (b) it records what its loss reads, beside the background "
                        "read)", "forward"),
                       ("backward (student and losses, one graph), clipping, AdamW step", "backward"),
                       ("the rest (batch to the device, loss sum and reads, loop)", "other"),
                       ("the step", "step")):
        ref = "-" if a is None else f"{a[key]:.2f}"
        lines.append(f"| {label} | {b[key]:.2f} | {100 * b[key] / b['step']:.1f} % | {ref} |")
    if a is not None:
        lines += ["", f"Beyond (a): {b['step'] - a['step']:.2f} ms per step, of which waiting for and moving the "
                      f"targets {b['targets'] + b['move']:.2f}, the losses' forward {b['losses']:.2f}, the larger student "
                      f"forward {b['forward'] - a['forward']:.2f} and backward {b['backward'] - a['backward']:.2f} "
                      "(the losses' share of backward; (a) and (b) come from separate passes).",
                  "", f"Reading the targets in the background thread took {b['read']:.2f} ms per step, "
                      f"{b['read_cpu']:.2f} ms of it the thread's own CPU (Arrow's decoding threads come on top; each "
                      "arm's reader starts with no shard: from Parquet its first read of a shard decodes it, as in a "
                      "training run's first epoch; from the object store it fetches the decoded shard). The reads "
                      "overlap the step, but where the student's threads fill the cores they hold it up: part of the "
                      "larger forward and backward above is theirs.",
                  "", f"What the cache itself costs: (a) / ((a) + waiting + moving) = "
                      f"{a['step'] / (a['step'] + b['targets'] + b['move']):.3f}, and if the reads held the step up "
                      f"for all their time, {a['step'] / (a['step'] + b['targets'] + b['move'] + b['read']):.3f}; "
                      "the rest of (b)'s gap is the loss's own compute (e.g. MGD's generation blocks), which any way "
                      "of getting targets pays."]
    return lines


def notes(device: torch.device, args: argparse.Namespace, shared_gpu: bool, weights_random: bool) -> list[str]:
    out = []
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        need = args.threads + args.serve_actors * max(1, args.serve_threads)
        out.append(f"on the CPU the serving actors run on the same {cores} core(s) as the student and the machine's "
                   f"other jobs ({need} busy threads asked for: student {args.threads}, actors "
                   f"{args.serve_actors} x {max(1, args.serve_threads)}): (c) measures teachers competing for the "
                   "student's cores, not teachers on their own devices, so it cannot show the goal (c)/(a) >= 0.8, "
                   "which assumes the latter.")
    elif shared_gpu:
        out.append("one GPU: the serving actors share it with the student (fractional Ray GPUs); teachers on their "
                   "own devices need a machine with several GPUs (the student then takes the last one).")
    if weights_random:
        out.append("teachers with random weights: a step's cost does not depend on the weights.")
    out.append("(b) reads a cache just written, so its shards are likely in the page cache; a cold disk or a remote "
               "URI adds to the read time.")
    return out


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="fcos_mobilenetv3_micro")
    p.add_argument("--teacher", action="append", metavar="NAME[=CHECKPOINT]",
                   help=f"repeatable (default: {' and '.join(DEFAULT_TEACHERS)}, random weights)")
    p.add_argument("--loss", default="mgd", help="distillation loss(es), comma separated registry names (default "
                   "mgd; e.g. fitnet or hinton_kd to see the cost of getting targets under a lighter loss)")
    p.add_argument("--arms", default="a,b,c,d", help="comma list of a,b,c,d,e,f,g (default: a,b,c,d)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per arm and round")
    p.add_argument("--warmup", type=int, default=5, help="steps before the clock starts")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the arms, interleaved (medians reported)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--flip", choices=("none", "random", "always"), default="random")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the student process")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--serve-actors", type=int, default=1)
    p.add_argument("--serve-cpus", type=float, default=1.0, help="Ray CPUs per serving (and precompute) actor")
    p.add_argument("--serve-gpus", type=float, help="Ray GPUs per actor (default: 0 on cpu, a share on cuda)")
    p.add_argument("--serve-threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--prefetch-depth", type=int, default=1, help="batches kept in flight ahead of the step")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of a local Ray (actors schedule on 2 cores)")
    p.add_argument("--reader", choices=("object_store", "parquet"), default="object_store",
                   help="how (b) reads the cache: decoded once into Ray's object store (the default of runs and "
                        "sweeps) or decoded from Parquet by the step's process (object_store: false)")
    p.add_argument("--cache-dtype", choices=("fp32", "fp16", "int8"), default="fp16")
    p.add_argument("--pca", type=int, default=0, help="cache the features as this many principal components")
    p.add_argument("--components", action="store_true",
                   help="with --pca: arm (b)'s losses target the components (cache.features: components)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--data-root", default="data/shapes", help="built-in shapes data set (generated when missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_step_cost"))
    args = p.parse_args(argv)
    args.teacher = args.teacher or list(DEFAULT_TEACHERS)
    args.arms = [a for a in args.arms.split(",") if a]
    if not args.arms or any(a not in ARMS for a in args.arms):
        p.error(f"--arms: a comma list of {ARMS}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.serve_actors < 1:
        p.error("--steps, --repeats and --serve-actors must be at least 1, --warmup at least 0")
    return args


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
    """The whole benchmark; returns (and writes) the JSON summary."""
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device, ray_gpus, serve_gpus, shared_gpu = gpu_plan(args)
    data, batches, data_info = prepare_batches(args, out)
    num_classes = data_info["num_classes"]
    torch.manual_seed(args.seed)
    template = build_detector(args.student, num_classes, image_size=args.image_size)
    started = start_ray(args, ray_gpus)
    import ray

    from teachers.outputs import load_teacher
    from teachers.serving import TeacherServer

    serving = {"actors": args.serve_actors, "cpus_per_actor": args.serve_cpus, "gpus_per_actor": serve_gpus,
               "threads_per_actor": args.serve_threads, "prefetch_depth": args.prefetch_depth}
    head = {"command": command, "machine": machine_info(device), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                          for k, v in vars(args).items()},
            "data": data_info, "ray": {"resources": ray.cluster_resources(), "serving": serving},
            "notes": notes(device, args, shared_gpu, any(parse_teacher(t)[1] is None for t in args.teacher))}
    results = []
    try:
        for spec in args.teacher:
            name, given = parse_teacher(spec)
            ckpt, weights = teacher_checkpoint(name, given, num_classes, args, out)
            t = TeacherSetup(name, ckpt, weights, load_teacher(ckpt, name, device=str(device)), serving=serving)
            print(f"teacher {name} ({weights}): preparing", flush=True)
            kinds, levels = cache_spec(template, t.detector, loss_entries(args.loss))
            if set(CACHE_ARMS) & set(args.arms):
                t.cache = build_cache(ckpt, data, kinds, levels, serve_gpus, args, out)
                t.reader_path = t.cache["path"]
                if args.reader == "object_store":
                    t.store = warm_store(t.reader_path)
            if "c" in args.arms:
                t.server = TeacherServer(ckpt, targets=kinds, levels=levels, actors=args.serve_actors,
                                         cpus_per_actor=args.serve_cpus, gpus_per_actor=serve_gpus,
                                         threads=args.serve_threads)
            try:
                rounds = []
                for r in range(args.repeats):
                    # Parts are timed without synchronising (on a GPU the profile passes below do that).
                    rounds.append({arm: run_arm(arm, t, template, batches, device, args, sync_parts=False)
                                   for arm in args.arms})
                    print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                        f"{arm} {rounds[-1][arm]['steps_per_s']:.2f} steps/s" for arm in args.arms), flush=True)
                profile = ({arm: run_arm(arm, t, template, batches, device, args, sync_parts=True)
                            for arm in ("a", "b") if arm in args.arms} if device.type == "cuda" else {})
            finally:
                if t.server is not None:
                    t.server.shutdown()
                if t.store is not None:
                    t.store.close()
            res = summarise(t, rounds, profile, args.arms, args.batch_size, args.reader)
            res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            results.append(res)
            write(out, device, head, results)
    finally:
        if started:
            ray.shutdown()
    summary = write(out, device, head, results)
    print()
    print(markdown(results, head))
    return summary


def write(out: Path, device: torch.device, head: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {**head, "results": results}
    loss = head["args"].get("loss", "mgd")
    stem = f"step_cost_{device.type}" + ("" if loss == "mgd" else "_" + loss.replace(",", "+"))
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(results, head))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(["step_cost.py", *argv])
    run(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
