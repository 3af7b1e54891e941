"""Detector training on Ray Train (`TorchTrainer`, Train V2): DDP over workers, a checkpoint per epoch.

Each worker builds the data set and the detector itself (nothing big travels through the driver), reads its
shard of the images, and trains with the same `train_one_epoch` as local training. Rank 0 reports a checkpoint
after every epoch (model, optimizer, scheduler, epoch, history, the entry of its sequence; for a distillation stage
also the stage index and the distiller's adapters); a worker group that dies is restarted by Ray Train from the last checkpoint
(`FailureConfig(max_failures)`), and calling `fit_on_ray` again with the same storage path and name resumes the run
(see shared/RAY_NOTES.md).

Plain training (`fit_on_ray(job)`): images sharded by a `DistributedSampler`.

A run's stages (`fit_sequence_on_ray(entries)`: `curriculum run` trains all its stages, then its baseline and
direct arm, as one sequence in one `TorchTrainer.fit`, so the worker group starts once; `run_sequence` is the
stage loop in the worker, and a Tune trial runs the same loop in its own process). Each entry is one stage
(`fit_on_ray(job, stage=...)` is a sequence of one, see curriculum/plan.py): the student starts from `init` (a
plain detector checkpoint: the previous stage's model, or the student with the first teacher's neck and head),
its `kd_ratio` factors are calibrated by rank 0 as it starts, a `Distiller` built from the stage's losses adds its terms to the detector's losses
through `train_one_epoch(extra_loss=...)`, and the teacher's targets come from its precomputed cache (or, with
`teacher_mode="inline"`, from the teacher run in the worker on the same batch: the reference, and the cost
in-process frameworks pay).

The loop itself is `run_training(LoopConfig, session)`: a Ray Train worker runs it with a `TrainSession` (DDP,
`ray.train.report`), a Tune trial (tune_spaces/sweep.py) with a `TuneSession` (one process, `ray.tune.report`),
so a sweep's trials train exactly as `curriculum run`'s stages do.

How the cached targets are read:

- How hot targets reach the workers: every worker opens its own `teachers.readers.CacheReader` on the cache
  (a local folder or any URI pyarrow reads: the cache, like the images, must be reachable from every node) and
  reads the Parquet shards that hold *its* images, decoding them into its own LRU (`memory_bytes`); nothing goes
  through the driver or Ray's object store. `CacheShardSampler` gives each worker, every epoch, a contiguous run
  of whole cache shards (the shards' order is reshuffled every epoch, the images shuffled within the worker's
  part), so a worker reads about 1/num_workers of the cache per epoch instead of all of it, and with
  `memory_bytes` >= the cache / num_workers nothing is decoded twice in an epoch. A cache bigger than that (COCO
  scale) is shuffled within runs of as many shards as fit (`cache_window`), so it still is not.
- The batch's targets are looked up by `(image_id, View)`: each sample records the view (size, flip) it was made
  with, and the cache holds the teacher's output for that exact view, so a worker can never pair an image with
  another view's targets (a missing view is an error, not a silent mismatch).
- The distiller's adapters are trained with the student and kept identical across workers by their own DDP
  wrapper (`find_unused_parameters` only when a non-feature term is mixed in: a gated head term may leave an
  adapter without gradient in a step).
- Random state is re-seeded from (seed, stage, epoch, rank) at every epoch (MGD's masks included), so a run that
  resumes from an epoch checkpoint computes the same epochs as one that was never interrupted.

On GPU (`use_gpu`) the backend is NCCL, batches are moved to the worker's device and the forward runs under
bf16 autocast (no loss scaler needed); gradients are clipped at `train.grad_clip` in either case.

The driver evaluates afterwards: evaluation is a single pass that does not need DDP (`eval_every` also lets rank
0 evaluate during the run, for the AP curve).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from curriculum.config import TrainJobConfig, config_from_dict, to_dict
from curriculum.files import storage_runtime_env
from curriculum.seeds import derive_seed, seed_everything

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


class CacheShardSampler(torch.utils.data.Sampler[int]):
    """Each rank's images for an epoch, as contiguous runs of whole teacher-cache shards.

    `shard_of[i]` is the cache shard of data-set index i. Every epoch the shards are put in a random order
    (seed, epoch), their images concatenated, and rank r takes the r-th of `num_replicas` equal slices (the last
    N mod num_replicas images of the order are left out that epoch, as `DistributedSampler(drop_last=True)` does);
    the slice is shuffled (seed, epoch, rank). Every rank gets the same number of images, so DDP's collectives
    stay in step, and a rank touches about N / (num_replicas * shard_size) + 1 shards.

    `window` (0: the whole slice): the slice is shuffled within runs of `window` shards instead, taken one run
    after the other, so that a reader holding `window` decoded shards reads each of its shards once per epoch
    however large the cache (`cache_window` sizes it from the memory budget). A window covering the slice
    gives exactly the whole-slice order.
    """

    def __init__(self, shard_of: list[int], num_replicas: int, rank: int, seed: int = 0, window: int = 0) -> None:
        self.shard_of = list(shard_of)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.window = max(0, window)
        self.epoch = 0
        self.members: dict[int, list[int]] = {}
        for i, s in enumerate(self.shard_of):
            self.members.setdefault(s, []).append(i)
        self.per_rank = len(self.shard_of) // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "shard order", self.epoch))
        shards = sorted(self.members)
        order = [shards[int(j)] for j in torch.randperm(len(shards), generator=g)]
        flat = [i for s in order for i in self.members[s]]
        mine = flat[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        g.manual_seed(derive_seed(self.seed, "shard images", self.epoch, self.rank))
        out: list[int] = []
        for run in self._runs(mine):
            out += [run[int(j)] for j in torch.randperm(len(run), generator=g)]
        return out

    def _runs(self, mine: list[int]) -> list[list[int]]:
        """`mine` (in shard order) cut into runs of at most `window` shards."""
        if not self.window:
            return [mine]
        runs: list[list[int]] = [[]]
        seen: set[int] = set()
        for i in mine:
            s = self.shard_of[i]
            if s not in seen and len(seen) == self.window:
                runs.append([])
                seen = set()
            seen.add(s)
            runs[-1].append(i)
        return runs

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.per_rank


def cache_window(readers: Sequence[Any], num_replicas: int, memory_bytes: int) -> int:
    """How many shards of each reader's cache a rank may shuffle together: the shards of every rank's window must
    fit in a teacher's share of `memory_bytes` (a shard store serves all ranks from that share), measured on the
    first shard as the reader holds it."""
    share = memory_bytes // max(1, len(readers))
    return max(1, min(share // max(1, num_replicas * r.shard_nbytes(0)) for r in readers))


class _DeviceLoader:
    """Moves each batch (images, target dicts) to the worker's device; a no-op wrapper on the CPU.
    `before_batch(b)` runs before batch b is handed out (the worker hooks' `batch_start`). `read_ahead`: a
    `TargetReadAhead` that starts reading the next batch's teacher targets before the current batch is handed
    out."""

    def __init__(self, loader: Any, device: torch.device, before_batch: Any = None,
                 read_ahead: "TargetReadAhead | None" = None) -> None:
        self.loader, self.device, self.before_batch, self.read_ahead = loader, device, before_batch, read_ahead

    def __len__(self) -> int:
        return len(self.loader)

    def _moved(self) -> Iterator[tuple[list, list]]:
        for images, targets in self.loader:
            if self.device.type != "cpu":
                images = [im.to(self.device, non_blocking=True) for im in images]
                targets = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                           for t in targets]
            yield images, targets

    def __iter__(self):
        batches = self._moved() if self.read_ahead is None else self.read_ahead.wrap(self._moved())
        for b, batch in enumerate(batches):
            if self.before_batch is not None:
                self.before_batch(b)
            yield batch


class TargetReadAhead:
    """Reads the teacher targets of the next batch in a background thread while the current step computes.

    For cache mode: looking rows up, decoding fp16/int8 and collating (or getting decoded shards from the object
    store) then leaves the student's step, which only waits if the read is slower than the step
    (bench/step_cost.py measures the wait). `wrap(batches)` yields the batches unchanged, one batch ahead;
    calling the object as `source(images, targets)` returns what was read for that batch. The reads are the same
    as without it, so the training is the same (one extra read at the end of an epoch cut short by
    `max_iters_per_epoch`). Its thread lives as long as one `wrap` (an epoch), however that ends: a sweep runs
    many trials, failing ones too, in one process."""

    def __init__(self, read: Any) -> None:
        import threading

        self.read = read
        self.lock = threading.Lock()  # readers (their shard LRU) are not thread-safe: one read at a time
        self.ahead: dict[int, Any] = {}

    def _read(self, images: list, targets: list) -> Any:
        with self.lock:
            return self.read(images, targets)

    def wrap(self, batches: Iterator[tuple[list, list]]) -> Iterator[tuple[list, list]]:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-targets")
        it = iter(batches)
        try:
            nxt = next(it, None)
            fut = None if nxt is None else pool.submit(self._read, *nxt)
            while nxt is not None:
                cur, cur_fut = nxt, fut
                nxt = next(it, None)
                if nxt is not None:
                    fut = pool.submit(self._read, *nxt)
                self.ahead[id(cur[1])] = cur_fut
                yield cur
                self.ahead.pop(id(cur[1]), None)
        finally:
            self.ahead.clear()
            pool.shutdown(wait=True)

    def __call__(self, images: list, targets: list) -> Any:
        fut = self.ahead.get(id(targets))
        return self._read(images, targets) if fut is None else fut.result()


class _Autocast(torch.nn.Module):
    """The student's forward under bf16 autocast (GPU only; the losses are reduced in float32 by the detector)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.module(*args, **kwargs)


def _mean_across_workers(stats: dict[str, float], world: int) -> dict[str, float]:
    """The loss terms averaged over the workers (each worker's are means over its own batches)."""
    if world == 1 or not torch.distributed.is_initialized():
        return stats
    keys = sorted(k for k, v in stats.items() if isinstance(v, float) and k not in ("lr",))
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    out = dict(stats)
    for k, v in zip(keys, (t / world).tolist()):
        out[k] = v
    out["images_per_s"] = out["images_per_s"] * world  # images/s of the whole group
    return out


def load_worker_hooks(specs: list[dict[str, Any]]) -> list[Any]:
    """`trainer.worker_hooks` as callables: each ``{"call": "package.module:function", "args": {...}}`` is imported
    in the worker and called as ``function(event, stage=, epoch=, rank=, batch=, **args)`` with event
    ``epoch_start`` (batch None) or ``batch_start`` (before batch `batch` of the epoch is handed out)."""
    import functools
    import importlib

    hooks = []
    for spec in specs:
        module, _, name = spec["call"].partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"trainer.worker_hooks: cannot load {spec['call']!r} in the training worker ({e}); "
                               "the module must be importable on every node") from None
        hooks.append(functools.partial(fn, **spec.get("args", {})))
    return hooks


class TrainSession:
    """Where a training loop runs: a Ray Train worker (DDP, `ray.train.report`), the default."""

    def __init__(self, use_gpu: bool = False) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)

    def barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class LocalSession:
    """One rank in this process, without Ray (a benchmark's reference run of the student alone, a debugger): no
    DDP; reports and their epoch checkpoints are dropped; `resume`: a checkpoint to start from, or None."""

    rank, world = 0, 1

    def __init__(self, resume: Any = None, device: str = "cpu") -> None:
        self.resume, self.device = resume, torch.device(device)

    def prepare(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        return module.to(self.device)

    def checkpoint(self) -> Any:
        return self.resume

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        pass

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj


class TuneSession(LocalSession):
    """A Ray Tune trial's own process (one worker, no DDP): `ray.tune.report` with a checkpoint every epoch, so
    ASHA can stop the trial and PBT can clone and perturb it (tune_spaces/sweep.py).

    `resume` is the checkpoint to start from (the trial's own after a restart, or PBT's donor), or None; `extra`
    metrics are added to every report (the teacher forwards; `run_sequence` adds the epoch count over all stages)."""

    def __init__(self, resume: Any = None, device: str = "cpu", extra: Any = None) -> None:
        super().__init__(resume, device)
        self.extra = extra

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.tune

        extra = self.extra(metrics) if self.extra else {}
        ray.tune.report({**metrics, **extra}, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir)
                        if checkpoint_dir else None)


@dataclasses.dataclass
class LoopConfig:
    """What `run_training` takes: the training job and, for a distillation stage, the stage and how its targets
    arrive. Built by `fit_on_ray` (a stage on Ray Train) and by a Tune trial (tune_spaces/sweep.py); it travels
    to the workers as a dict (`to_dict`) and is checked back into this type there.

    job: a `TrainJobConfig` as a dict. stage: `curriculum.plan.Stage.to_dict()` (None: plain training).
    init: plain detector checkpoint the student starts from. loss_factors: multipliers of the distiller's entries
    (the calibrated feature weights), calibrated for `kd_ratio` (saved in every checkpoint, so a PBT clone with
    another kd_ratio rescales them). teacher_mode: `cache` or `inline`. shard_stores: {teacher: the name of the
    `ObjectStoreShards` actor holding its decoded cache} (a teacher not in it: each worker reads the Parquet
    shards itself; each teacher holds at most its share of `memory_bytes`). eval_every: rank 0 evaluates every
    so many epochs (0: never). worker_hooks: `trainer.worker_hooks` (`load_worker_hooks`). framework_logs: Ray
    Train's own INFO lines (else dropped in the worker). tensorboard_dir: rank 0 writes TensorBoard event files
    there (losses and lr per step; val metrics, decay and feature-loss factor per epoch). entry: the run's place in
    its sequence (`run_sequence`; a checkpoint of another entry is refused).
    """

    job: dict[str, Any]
    stage: dict[str, Any] | None = None
    init: str | None = None
    threads_per_worker: int = 1
    memory_bytes: int = 1 << 30
    loss_factors: dict[str, float] = dataclasses.field(default_factory=dict)
    kd_ratio: float | None = None
    eval_every: int = 0
    use_gpu: bool = False
    progress: bool = True
    teacher_mode: str = "cache"
    shard_stores: dict[str, str] = dataclasses.field(default_factory=dict)
    worker_hooks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    framework_logs: bool = False
    tensorboard_dir: str | None = None
    entry: int = 0  # its place in a sequence (`run_sequence`), saved in every checkpoint

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _FrameworkChatter(logging.Filter):
    """Drops records below WARNING emitted from Ray's and pycocotools' packages: worker-group start, DDP wrapping,
    checkpoint and "Reporting training result" lines, and pycocotools' "creating index..." (Ray Train reroutes a
    worker's prints into its logger, past our redirect of stdout). The project's own lines, and warnings and
    errors, pass."""

    def __init__(self) -> None:
        import pycocotools
        import ray

        super().__init__()
        self.prefixes = tuple(os.path.dirname(m.__file__) + os.sep for m in (ray, pycocotools))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.prefixes)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: the sequence of `fit_sequence_on_ray`."""
    cfg = LoopConfig(**config["entries"][0]["loop"])
    if not cfg.framework_logs:
        chatter = _FrameworkChatter()
        for logger in (logging.getLogger(), logging.getLogger("ray.train")):
            for handler in logger.handlers:
                handler.addFilter(chatter)
    else:  # --verbose: the project's debug lines too (set-up times)
        logging.getLogger(__name__).setLevel(logging.DEBUG)
    run_sequence(config["entries"], TrainSession(cfg.use_gpu), release_stores=True)


def run_training(cfg: LoopConfig, session: Any) -> dict[str, Any]:
    """Plain training, or one distillation stage when `stage` is given; returns the final training state.

    The same loop serves Ray Train workers (`TrainSession`) and Tune trials (`TuneSession`). Each teacher of a
    stage (`stage["teachers"]`, `trainers.distillation.open_teacher`) gives its targets from its cache, or with
    `teacher_mode: inline` from the teacher run here; its `class_map` (`ClassMap.to_dict()`, None for a teacher on
    the student's classes) maps them into the student's labels. Several teachers: their terms are summed.
    Runs with `threads_per_worker` torch threads and restores the caller's count after (it may be called
    in-process).
    """
    from trainers.train import torch_threads

    with torch_threads(cfg.threads_per_worker):
        return _run_training(cfg, session)


def _run_training(cfg: LoopConfig, session: Any) -> dict[str, Any]:
    from torch.utils.data import DataLoader, DistributedSampler

    from curriculum.data import collate_fn
    from teachers.outputs import teacher_forward_counts
    from trainers.distillation import (DistillStep, bind_teacher_heads, build_student, open_teacher, stage_class_maps,
                                      stage_source)
    from teachers.zoo import needs_masks
    from trainers.train import (TRAIN_STATE_FORMAT, NonFiniteLossError, build_dataset, evaluate_model, log_epoch,
                                load_optimizer_state_by_name, load_train_state, make_optimizer, make_scheduler,
                                optimizer_state_by_name, step_logger, tensorboard_writer, train_one_epoch)

    t_setup = time.perf_counter()
    job: TrainJobConfig = config_from_dict(TrainJobConfig, cfg.job)
    stage: dict[str, Any] | None = cfg.stage
    distil = bool(stage and stage.get("teachers"))
    stage_index = stage["index"] if stage else 0
    entry_name = stage["name"] if stage else "training"  # as SequenceEntry.name
    t = job.train
    rank, world, device = session.rank, session.world, session.device
    ds = build_dataset(job.data, "train", seed=t.seed, masks=needs_masks(job.model.name))
    members = stage["teachers"] if distil else []
    # each teacher's cache gets its share of the memory (the driver's shard stores split it the same way)
    links = [open_teacher(m, inline=cfg.teacher_mode == "inline", device=device,
                          memory_bytes=cfg.memory_bytes // max(1, len(members)),
                          shard_store=(cfg.shard_stores or {}).get(m["name"]))
             for m in members]
    model, distiller = build_student(job.model.name, ds.class_names, t.seed, image_size=job.data.image_size,
                                     overrides=job.model.overrides(), init=cfg.init,
                                     losses=stage["losses"] if distil else None, teachers=links,
                                     adapters_from=stage.get("adapters_from") if distil else None)
    source = class_map = None
    if links:
        bind_teacher_heads(links, distiller, device)
        source = stage_source(links, distiller)
        class_map = stage_class_maps(links)
    readers = [link.reader for link in links if link.reader is not None]
    if links and len(readers) == len(links):  # every teacher from a cache: read the next batch's targets ahead
        source = TargetReadAhead(source)
        reader = readers[0]  # caches of one data set share the image order and shard layout
        pos = {int(i): p for p, i in enumerate(reader.image_ids())}
        shard_of = [pos[int(i)] // reader.manifest["shard_size"] for i in ds.image_ids]
        window = cache_window(readers, world, cfg.memory_bytes)
        sampler = CacheShardSampler(shard_of, world, rank, seed=t.seed, window=window)
        log.debug("rank %d: images shuffled within runs of %d cache shards", rank, window)
    else:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed, drop_last=True)
    for key, factor in cfg.loss_factors.items() if distiller is not None else ():
        distiller.weights[key] *= factor
    per_worker = max(1, t.batch_size // world)  # batch_size is the global batch
    loader = DataLoader(ds, batch_size=per_worker, sampler=sampler, collate_fn=collate_fn, drop_last=True,
                        num_workers=job.data.workers)
    iters = min(len(loader), t.max_iters_per_epoch or len(loader))
    ddp_model = session.prepare(model)
    params = list(ddp_model.named_parameters())
    ddp_distiller = None
    if distiller is not None:
        if any(True for _ in distiller.parameters()):
            from trainers.distill.common import FeatureTerm

            # Feature terms use all their adapters every step; a gated head term may leave some without gradient.
            gated = not all(isinstance(term, FeatureTerm) for term in distiller.terms.values())
            ddp_distiller = session.prepare(distiller, find_unused=gated)
            params += [("distiller." + n, p) for n, p in ddp_distiller.named_parameters()]
        else:
            ddp_distiller = distiller.to(device)
    opt = make_optimizer(params, t)
    lr_epochs, lr_offset = (stage.get("lr_t_max") or t.epochs, stage.get("lr_offset", 0)) if stage else (t.epochs, 0)
    sched = make_scheduler(opt, t, iters * lr_epochs, offset=iters * lr_offset)
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = session.checkpoint()
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_train_state(Path(d) / STATE_FILE)
        # (which entry of a sequence resumes is `checkpoint_entry`'s decision; this guards the pairing)
        if state.get("stage", 0) != stage_index or state.get("entry_name", entry_name) != entry_name:
            raise RuntimeError(f"checkpoint of {state.get('entry_name', 'stage')} {state.get('stage')} (entry "
                               f"{state.get('entry', 0)} of its sequence) found in the run of {entry_name} "
                               f"(stage {stage_index}, entry {cfg.entry})")
        model.load_state_dict(state["model"]["model"])
        if distiller is not None and state.get("distiller") is not None:
            distiller.load_state_dict(state["distiller"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = json.loads(state["history"])
        start = state["epoch"] + 1
    elif stage and stage.get("optimizer_state"):  # schedule: curriculum: the previous stage's moments go on
        carried = torch.load(stage["optimizer_state"], map_location="cpu", weights_only=True)
        taken = load_optimizer_state_by_name(opt, model.named_parameters(), carried)
        if rank == 0:
            log.info("stage %s: optimizer state of %d/%d student tensors taken over from the previous stage",
                     stage["name"], len(taken), len(carried))
    train_model = _Autocast(ddp_model) if device.type == "cuda" else ddp_model
    val_ds = None
    hooks = load_worker_hooks(cfg.worker_hooks)
    writer = tensorboard_writer(cfg.tensorboard_dir) if rank == 0 else None
    if rank == 0:
        log.debug("%s: worker set-up (data, model, teachers, DDP) %.1f s", stage["name"] if stage else "training",
                  time.perf_counter() - t_setup)
    for epoch in range(start, t.epochs):
        for h in hooks:
            h("epoch_start", stage=stage_index, epoch=epoch, rank=rank, batch=None)
        # The student's epoch in its whole sequence: each stage sees new image orders and flips, as one run would.
        data_epoch = (stage.get("data_offset", 0) if stage else 0) + epoch
        ds.set_epoch(data_epoch)
        sampler.set_epoch(data_epoch)
        # Random state from (seed, stage, epoch, rank) alone: a resumed run repeats the uninterrupted one.
        seed_everything(derive_seed(t.seed, "epoch", stage_index, epoch, rank))
        extra = None
        decay = None
        if distiller is not None:
            from trainers.distill.schedules import stage_decay

            decay = stage_decay(stage, epoch)
            gen = torch.Generator(device=device).manual_seed(derive_seed(t.seed, "distill", stage_index, epoch, rank))
            extra = DistillStep(source, ddp_distiller, decay, gen, device=device,
                                scales=distiller.detector_loss_scales(), class_map=class_map,
                                adapters_only=max(0, stage.get("adapter_warmup", 0) - epoch * iters))
            ddp_distiller.train()
        hook = (lambda b, e=epoch: [h("batch_start", stage=stage_index, epoch=e, rank=rank, batch=b) for h in hooks]
                ) if hooks else None
        try:
            batches = _DeviceLoader(loader, device, hook, source if isinstance(source, TargetReadAhead) else None)
            stats = train_one_epoch(train_model, batches, opt, sched, t, epoch,
                                    progress=rank == 0 and cfg.progress, extra_loss=extra,
                                    on_step=step_logger(writer, epoch, iters))
        except NonFiniteLossError as e:  # name the stage too; the last good checkpoint is the previous epoch's
            raise NonFiniteLossError(f"stage {stage['name'] if stage else 'training'}: {e}") from None
        stats = _mean_across_workers(stats, world)
        record: dict[str, Any] = {"epoch": epoch + 1, **stats}
        if stage is not None:
            record["stage"] = stage_index
        if decay is not None:
            record["decay"] = decay
        every = cfg.eval_every
        metrics = {"epoch": epoch + 1, "loss": stats["loss"], "images_per_s": stats["images_per_s"],
                   "teacher_forwards": teacher_forward_counts()["teacher"]}
        if rank == 0 and every and (epoch + 1) % every == 0:
            val_ds = val_ds or build_dataset(job.data, "val", seed=t.seed)
            probe = copy.deepcopy(model).cpu() if device.type != "cpu" else model
            ev = evaluate_model(probe, val_ds, job.eval, progress=False)
            record["val"] = {k: v for k, v in ev.items() if k not in ("stats", "per_class")}
            metrics.update({f"val_{k}": float(v) for k, v in record["val"].items() if isinstance(v, (int, float))})
        history.append(record)
        log_epoch(writer, epoch + 1, {**record, "loss_factor": next(iter(cfg.loss_factors.values()), None),
                                      "kd_ratio": cfg.kd_ratio})
        state = None
        with tempfile.TemporaryDirectory() as d:
            ckpt_dir = None
            if rank == 0:
                state = {
                    "format": TRAIN_STATE_FORMAT, "epoch": epoch, "stage": stage_index, "entry": cfg.entry,
                    "entry_name": entry_name,
                    "model": model.checkpoint(),
                    "distiller": distiller.state_dict() if distiller is not None else None,
                    "loss_factors": cfg.loss_factors,
                    "kd_ratio": cfg.kd_ratio,  # what the factors were calibrated for (PBT rescales)
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "history": json.dumps(history), "torch_rng": torch.get_rng_state(),
                }
                if epoch == t.epochs - 1:  # what a next stage continuing the schedule takes over
                    state["student_optimizer"] = optimizer_state_by_name(opt, model.named_parameters())
                torch.save(state, Path(d) / STATE_FILE)
                ckpt_dir = d
            session.report(metrics, ckpt_dir)
    if writer is not None:
        writer.close()
    if state is None:  # nothing left to train (resumed after the last epoch): the checkpoint's state
        state = {"epoch": start - 1, "stage": stage_index, "entry": cfg.entry, "entry_name": entry_name,
                 "model": model.checkpoint(),
                 "history": json.dumps(history)}
    return state


# ------------------------------------------------------------------------------------------------ sequences

OPTIMIZER_FILE = "optimizer.pt"  # an entry's final student optimizer state by parameter name (schedule: curriculum)
DISTILLER_FILE = "distiller.pt"  # an entry's losses, factors and final distiller state (adapters: carry reads it)
DONE_FILE = "done.json"
FACTORS_FILE = "loss_factors.json"


@dataclasses.dataclass
class SequenceEntry:
    """One training run of a sequence that one `TorchTrainer.fit` (or one Tune trial) trains in order: a
    curriculum's stages, then its baseline and direct arms, without starting a worker group per stage.

    loop: a `LoopConfig` as a dict (its `init` is ignored when `continues`). out_dir: where rank 0 writes the
    entry's outputs as it ends (`write_entry_outputs`: model.pt, distiller.pt, optimizer.pt, done.json) and its
    calibrated factors as it starts; an entry whose done.json is there is not trained again. continues: the
    student starts from the previous entry's model.pt (and, when that entry saved it, goes on with its
    optimizer state). save_optimizer: write the final student optimizer state (`schedule: curriculum`).
    model_info: keys added to the written model.pt."""

    loop: dict[str, Any]
    out_dir: str | None = None
    continues: bool = False
    save_optimizer: bool = False
    model_info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def epochs(self) -> int:
        return int(self.loop["job"]["train"]["epochs"])

    @property
    def name(self) -> str:
        stage = self.loop.get("stage")
        return stage["name"] if stage else "training"

    def done(self) -> bool:
        return self.out_dir is not None and (Path(self.out_dir) / DONE_FILE).is_file() and (
            Path(self.out_dir) / "model.pt").is_file()


class _EntrySession:
    """A session as one entry of a sequence sees it: its own checkpoint to resume from (or none), and the
    sequence's counters added to every report."""

    def __init__(self, session: Any, resume: Any, extra: dict[str, Any], epochs_before: int) -> None:
        self.session, self.resume, self.extra, self.epochs_before = session, resume, extra, epochs_before
        self.rank, self.world, self.device = session.rank, session.world, session.device

    def prepare(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        return self.session.prepare(module, find_unused)

    def checkpoint(self) -> Any:
        return self.resume

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.session.report({**metrics, **self.extra, "epochs_done": self.epochs_before + metrics["epoch"]},
                            checkpoint_dir)


def _entry_factors(entry: SequenceEntry, loop: LoopConfig, own: dict[str, Any] | None, init: str | None,
                   session: Any) -> dict[str, float]:
    """The entry's feature-loss factors, as rank 0 finds them and sends them to the others: its checkpoint's
    (rescaled when a PBT clone changed `kd_ratio`: they are linear in it), the loop's own, those its first attempt
    calibrated (loss_factors.json), or calibrated now."""
    factors = _rank0_factors(entry, loop, own, init) if session.rank == 0 else None
    return session.broadcast(factors)


def _rank0_factors(entry: SequenceEntry, loop: LoopConfig, own: dict[str, Any] | None, init: str | None
                   ) -> dict[str, float]:
    stage = loop.stage or {}
    if own is not None:
        factors = dict(own.get("loss_factors") or {})
        old, new = own.get("kd_ratio"), stage.get("kd_ratio")
        if factors and old and new and old != new:
            factors = {k: v * new / old for k, v in factors.items()}
        return factors
    if loop.loss_factors:  # given by the caller
        return dict(loop.loss_factors)
    saved = Path(entry.out_dir) / FACTORS_FILE if entry.out_dir else None
    if saved is not None and saved.is_file():  # a resumed entry must not re-calibrate
        return json.loads(saved.read_text())
    if stage.get("kd_ratio") is None or not stage.get("teachers"):
        return {}
    from curriculum.files import atomic_write_json
    from trainers.distillation import calibrate_factors

    t0 = time.perf_counter()
    factors = calibrate_factors(config_from_dict(TrainJobConfig, loop.job), stage, init, loop.memory_bytes,
                                shard_stores=loop.shard_stores)
    log.info("stage %s: feature terms x %.3g (kd_ratio %s), calibrated in %.1f s", stage["name"],
             next(iter(factors.values()), float("nan")), stage["kd_ratio"], time.perf_counter() - t0)
    if saved is not None:
        atomic_write_json(factors, saved)
    return factors


def write_entry_outputs(entry: SequenceEntry, state: dict[str, Any], factors: dict[str, float],
                        seconds: float, stage: dict[str, Any] | None = None) -> None:
    """An ended entry's outputs in its out_dir: model.pt (a plain zoo checkpoint plus `model_info`), distiller.pt
    (losses, factors, adapters), optimizer.pt (`save_optimizer`), and last done.json (the stage as it ran: `stage`,
    with what the sequence filled in as it started, or the entry's; history, factors, seconds of training in this
    attempt), which marks it finished."""
    from curriculum.files import atomic_save, atomic_write_json

    out = Path(entry.out_dir)
    stage = stage if stage is not None else entry.loop.get("stage")
    atomic_save({**state["model"], **entry.model_info}, out / "model.pt")
    if state.get("distiller") is not None:
        atomic_save({"losses": stage["losses"], "loss_factors": factors, "state": state["distiller"]},
                    out / DISTILLER_FILE)
    if entry.save_optimizer and state.get("student_optimizer") is not None:
        atomic_save(state["student_optimizer"], out / OPTIMIZER_FILE)
    atomic_write_json({"stage": stage, "history": json.loads(state["history"]), "loss_factors": factors,
                       "seconds": round(seconds, 2)}, out / DONE_FILE)


def run_sequence(entries: Sequence[SequenceEntry | dict[str, Any]], session: Any,
                 release_stores: bool = False) -> dict[str, Any] | None:
    """Train `entries` in order in this session (a Ray Train worker, or a Tune trial); returns the last trained
    entry's final state (None when every entry was already done).

    Resume: the session's checkpoint names its entry and epoch; entries before it are skipped (a continuing entry
    then starts from their written model), that entry goes on from its epoch, and later ones are trained. Without a
    checkpoint, entries whose done.json exists are skipped. Each entry's factors are calibrated as it starts, with
    the student it starts from, or under `kd_reference: run` the one its chain of continuing entries started from
    (rank 0, sent to the others); a continuing entry reads what rank 0 wrote, so on several nodes `out_dir` must be
    shared storage. Every report carries `epochs_done` / `planned_epochs` over the sequence, the `stage` (1-based),
    and the entry's `kd_ratio` and `loss_factor`. release_stores: when an entry ends, rank 0 empties the shard
    stores (`teachers.readers.release_shard_store`) no later entry reads, so a sequence holds at most one stage's
    share of the memory (only for stores this sequence owns).
    """
    from trainers.train import load_train_state, torch_threads

    entries = [e if isinstance(e, SequenceEntry) else SequenceEntry(**e) for e in entries]
    checkpoint = session.checkpoint()
    rstate = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            rstate = load_train_state(Path(d) / STATE_FILE)
    at = checkpoint_entry(rstate, entries) if rstate is not None else -1
    planned = sum(e.epochs for e in entries)
    epochs_before = 0
    state = None
    for i, entry in enumerate(entries):
        # With a checkpoint, it says where the sequence is (a later entry's outputs would be stale; an earlier one
        # without outputs was added to the plan since); without one, written outputs do.
        finished = entry.done() and (i < at or (i == at and rstate["epoch"] + 1 >= entry.epochs)) if at >= 0 \
            else entry.done()
        if finished:
            epochs_before += entry.epochs
            continue
        loop = LoopConfig(**entry.loop)
        stage = dict(loop.stage) if loop.stage else None
        init = loop.init
        if entry.continues:
            prev = entries[i - 1]
            init = str(Path(prev.out_dir) / "model.pt")
            carried = Path(prev.out_dir) / OPTIMIZER_FILE
            if stage is not None and prev.save_optimizer:
                stage["optimizer_state"] = str(carried) if carried.is_file() else None
                if not carried.is_file() and session.rank == 0:  # that entry finished under `schedule: per_stage`
                    log.warning("%s left no %s: %s starts a new optimizer", prev.name, OPTIMIZER_FILE, entry.name)
            if stage is not None and stage.get("carry_adapters"):
                adapters = Path(prev.out_dir) / DISTILLER_FILE
                stage["adapters_from"] = str(adapters) if adapters.is_file() else None
        if stage is not None:
            stage["init"] = init
        own = rstate if i == at else None
        t0 = time.perf_counter()
        # kd_reference: run: calibrated with the student the chain of continuing entries started from
        measured = _chain_start(entries, i) if stage is not None and stage.get("kd_reference") == "run" else init
        with torch_threads(loop.threads_per_worker):
            factors = _entry_factors(entry, dataclasses.replace(loop, stage=stage), own, measured, session)
        loop = dataclasses.replace(loop, stage=stage, init=init, loss_factors=factors, entry=i)
        extra = {"stage": (stage["index"] + 1) if stage else 1, "planned_epochs": planned,
                 "kd_ratio": stage.get("kd_ratio") if stage else None, "loss_factor": next(iter(factors.values()), None)}
        state = run_training(loop, _EntrySession(session, checkpoint if own is not None else None, extra,
                                                 epochs_before))
        if session.rank == 0:
            if entry.out_dir is not None:
                write_entry_outputs(entry, state, factors, time.perf_counter() - t0, stage)
            if release_stores:
                later = {n for e in entries[i + 1:] for n in (e.loop.get("shard_stores") or {}).values()}
                _release_stores(set((loop.shard_stores or {}).values()) - later)
        session.barrier()  # the next entry may start from what rank 0 just wrote
        epochs_before += entry.epochs
    return state


def _chain_start(entries: Sequence[SequenceEntry], i: int) -> str | None:
    """The checkpoint the run of continuing entries that ends at entry `i` started from (its first entry's init)."""
    while entries[i].continues and i > 0:
        i -= 1
    return entries[i].loop.get("init")


def checkpoint_entry(state: dict[str, Any], entries: Sequence[SequenceEntry]) -> int:
    """The position in `entries` of the entry a sequence checkpoint was written in: found by its name (an arm added
    to a finished run's plan moves the entries after it), by its position for checkpoints without one."""
    names = [e.name for e in entries]
    pos, name = state.get("entry", 0), state.get("entry_name")
    if name is None:
        at = pos if pos < len(entries) else -1
    else:
        at = pos if pos < len(names) and names[pos] == name else (names.index(name) if name in names else -1)
    if at < 0 or state.get("stage", 0) != (entries[at].loop.get("stage") or {}).get("index", 0):
        raise RuntimeError(f"the run's last checkpoint ({name or 'entry'} at {pos}, stage {state.get('stage')}) is "
                           f"not one of this sequence's {len(entries)} entries ({', '.join(names)}): use a new output "
                           "folder for another plan")
    return at


def _release_stores(names: set[str]) -> None:
    from teachers.readers import release_shard_store

    for name in sorted(names):
        release_shard_store(name)


HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by Ray Train's controller, passed on from the driver


@contextlib.contextmanager
def _controller_env(health_check_interval_s: float | None) -> Iterator[None]:
    """The controller's poll interval in the driver's environment while `fit` starts the controller (Ray Train passes
    its own variables on to it); the environment as it was afterwards, and a value the user set is kept."""
    if health_check_interval_s is None or HEALTH_CHECK_ENV in os.environ:
        yield
        return
    os.environ[HEALTH_CHECK_ENV] = str(health_check_interval_s)
    try:
        yield
    finally:
        os.environ.pop(HEALTH_CHECK_ENV, None)


def fit_on_ray(
    job: TrainJobConfig,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    threads_per_worker: int = 1,
    max_failures: int = 2,
    storage_path: str | None = None,
    name: str = "train",
    *,
    stage: dict[str, Any] | None = None,
    init: str | None = None,
    memory_bytes: int = 1 << 30,
    loss_factors: dict[str, float] | None = None,
    kd_ratio: float | None = None,
    eval_every: int = 0,
    progress: bool = True,
    worker_hooks: list[dict[str, Any]] | None = None,
    teacher_mode: str = "cache",
    object_store: bool = True,
    tensorboard_dir: str | None = None,
    health_check_interval_s: float | None = None,
) -> dict[str, Any]:
    """Train `job` on Ray Train; returns the final training state (model checkpoint dict, history, ...).

    stage: a `curriculum.plan.Stage` as a dict (`Stage.to_dict()`): with teachers, a distillation stage reading
    each teacher's cache (`stage["teachers"][i]["cache"]`); `job.train.epochs` is the stage's length. init: plain
    detector checkpoint the student starts from. loss_factors: multipliers of the distiller's entries (the
    calibrated weights; with `kd_ratio` and none given, they are calibrated as the stage starts).
    worker_hooks: callables run in every worker at epoch and batch starts (`load_worker_hooks`).
    teacher_mode: `cache` (targets from the teachers' caches) or `inline` (every worker runs the teacher on its batch:
    the reference and the cost other frameworks pay). tensorboard_dir: rank 0's TensorBoard event files.
    The run is a sequence of one entry (`fit_sequence_on_ray` has the rest: object store, resume, health check).
    """
    loop = LoopConfig(
        job=to_dict(job), stage=stage, init=init, threads_per_worker=threads_per_worker, memory_bytes=memory_bytes,
        loss_factors=dict(loss_factors or {}), kd_ratio=kd_ratio, eval_every=eval_every, use_gpu=use_gpu,
        progress=progress, teacher_mode=teacher_mode, worker_hooks=list(worker_hooks or []),
        tensorboard_dir=tensorboard_dir)
    return fit_sequence_on_ray(
        [SequenceEntry(loop=loop.to_dict())], num_workers=num_workers, use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker, max_failures=max_failures,
        storage_path=storage_path or str(Path(job.output_dir).resolve() / "ray"), name=name,
        memory_bytes=memory_bytes, object_store=object_store, health_check_interval_s=health_check_interval_s)


def _shard_stores(entries: Sequence[SequenceEntry], memory_bytes: int) -> dict[str, Any]:
    """{cache: `ObjectStoreShards`} for every teacher cache the entries read (one store per cache for the whole
    sequence), each within the smallest share of `memory_bytes` a stage reading it gives it."""
    from teachers.readers import ObjectStoreShards

    shares: dict[str, int] = {}
    for e in entries:
        stage = e.loop.get("stage") or {}
        if e.loop.get("teacher_mode", "cache") != "cache":
            continue
        cached = [m for m in stage.get("teachers", []) if m.get("cache") and not m.get("adapter")]
        for m in cached:
            shares[m["cache"]] = min(shares.get(m["cache"], memory_bytes), memory_bytes // len(cached))
    # Each decodes its shards (`fill`) while the worker group starts, rather than as the first epoch asks.
    stores = {cache: ObjectStoreShards(cache, budget_bytes=share, wait=False, fill=True)
              for cache, share in shares.items()}
    try:
        for store in stores.values():  # their processes start in parallel
            store.ready()
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    return stores


def fit_sequence_on_ray(
    entries: Sequence[SequenceEntry],
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    storage_path: str,
    name: str = "train",
    memory_bytes: int = 1 << 30,
    object_store: bool = True,
    health_check_interval_s: float | None = None,
) -> dict[str, Any]:
    """Train `entries` in order (`run_sequence`) in one `TorchTrainer.fit`: the worker group, its process group
    and the shard stores start once for all of them. Returns the last trained entry's final training state.

    object_store: the cached targets reach the workers through Ray's object store (`teachers.readers.
    ObjectStoreShards`: decoded once, zero copy, at most a stage's share of `memory_bytes` resident); False:
    every worker reads and decodes the Parquet shards itself (a `CacheReader` bounded by `memory_bytes`).
    Resumes when a run with this `storage_path`/`name` exists (a killed job started again goes on from its last
    reported entry and epoch; entries whose outputs are written are not trained again).
    health_check_interval_s: how often Ray Train's controller polls the workers (None: Ray's default, 2 s; an
    interval set in the environment wins).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.train import load_train_state

    entries = list(entries)
    for i, e in enumerate(entries):
        if e.continues and (i == 0 or entries[i - 1].out_dir is None):
            raise ValueError(f"sequence entry {i} ({e.name}) continues from an entry without an out_dir")
    # Ray Train's own INFO lines (controller and workers) only with --verbose, i.e. a driver logging at DEBUG.
    framework_logs = logging.getLogger().isEnabledFor(logging.DEBUG)
    t_start = time.perf_counter()
    # Owned by this driver for the whole fit: restarted worker groups find them again.
    stores = _shard_stores(entries, memory_bytes) if object_store else {}
    payload = []
    for e in entries:
        loop = dict(e.loop, framework_logs=framework_logs)
        stage = loop.get("stage") or {}
        if loop.get("teacher_mode", "cache") == "cache":
            loop["shard_stores"] = {m["name"]: stores[m["cache"]].name for m in stage.get("teachers", [])
                                    if m.get("cache") in stores and not m.get("adapter")}
        payload.append(dataclasses.replace(e, loop=loop).to_dict())
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"entries": payload},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            storage_path=storage_path, name=name,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env=storage_runtime_env(),
            logging_config=ray.train.LoggingConfig(log_level="DEBUG" if framework_logs else "WARNING"),
        ),
    )
    done_before = [e.done() for e in entries]
    t_fit = time.perf_counter()
    try:
        with _controller_env(health_check_interval_s):
            result = trainer.fit()
    finally:
        t_closing = time.perf_counter()
        for store in stores.values():
            store.close()
        log.debug("%s: shard stores %.1f s, fit %.1f s, stores closed %.1f s", name, t_fit - t_start,
                  t_closing - t_fit, time.perf_counter() - t_closing)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {storage_path}/{name} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = load_train_state(Path(d) / STATE_FILE)
    # Finished: the last checkpoint ends its entry, and every later entry was done before this fit (the sequence
    # skipped them: a run resumed without its Ray Train state, an arm added to a finished run).
    at = checkpoint_entry(state, entries)
    if state["epoch"] + 1 < entries[at].epochs or not all(done_before[at + 1:]):
        raise RuntimeError(f"Ray Train run {storage_path}/{name} stopped in {entries[at].name} "
                           f"after epoch {state['epoch'] + 1}: {result.error}")
    return state
