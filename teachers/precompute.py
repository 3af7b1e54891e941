"""Precompute (`precompute(job)`, `curriculum precompute CONFIG`). Our own actors and a driver that hands out
shards from a ready-queue (`ray.wait`), not Ray Data `map_batches`, because the cache needs per-shard
guarantees that a streaming map does not give:

- a shard is the unit of work and of atomicity: an actor computes it, writes it under a unique temporary name
  and returns; only the driver renames it into place and lists it in the manifest, once;
- resume: shards listed in the manifest (or renamed but not yet listed: adopted after a check) are not
  recomputed; the fixed shard -> images mapping and fixed forward batches make a resumed cache byte-identical
  to an uninterrupted one;
- an actor that dies mid-shard (killed, node lost, out of memory) is replaced by a fresh actor and its shard
  is handed out again, to the next actor with a free slot; its half-written temporary file is never committed,
  so no shard is lost or written twice. The replacement takes shards only once it has started: one the cluster
  has no room for (the lost node's resources are gone) never holds shards, and the run ends when the live
  actors have done them all. A shard failing `max_attempts` times stops the run with an error naming it;
- several teachers share one loop, each with its own actors and resources (CPUs/GPUs, fractions allowed).

Actors read images themselves (the data set must be reachable from every node, as the cache root is), so
the driver ships shard numbers, not pixels.

One writer per cache: `precompute` and `rebuild` hold the cache folder's writer lock (`CacheWriterLock`) from
before the manifest is read until they end, finished or failed; a second `curriculum precompute` on the same
cache stops at once with an error naming the holder (host, pid, start). Readers are never blocked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from curriculum.cluster import ensure_ray
from curriculum.config import (
    CacheConfig, CompressionConfig, DataConfig, PrecomputeJobConfig, RayInitConfig, TeacherSpec,
)
from curriculum.data import CocoDetection, Resize, View
from curriculum.errors import CacheError, CurriculumError, ModelError
from curriculum.files import storage_runtime_env
from teachers.cache import (
    VIEW_FLIPS, CacheKey, TeacherCache, data_fingerprint, rows_to_table, shard_entry, shard_ranges, table_to_bytes,
    target_spec, teacher_fingerprint, view_config, resize_of,
)
from teachers.codec import encode_row
from teachers.projection import Projection, fit_projection, sample_positions
from teachers.lock import CacheWriterLock
from teachers.outputs import actor_device, actor_threads, load_teacher, teacher_outputs

log = logging.getLogger(__name__)


# ================================================================================================ shards


def shard_batches(start: int, stop: int, views: Sequence[str], batch_size: int) -> list[tuple[list[int], str]]:
    """The forward batches of a shard: per view, consecutive images. Fixed, so reruns give identical bytes
    (a CPU forward's last bits depend on the batch it ran in)."""
    return [(list(range(b, min(b + batch_size, stop))), v) for v in views for b in range(start, stop, batch_size)]


def view_sample(ds: CocoDetection, index: int, view_name: str, cached: dict | None = None
                ) -> tuple[torch.Tensor, np.ndarray, int, View]:
    """(image, boxes, image id, View) of a data-set position in a cache view.

    The flip view is the flipped *image* (View.apply resizes then flips, so flipping the resized image is
    exactly the flipped view); its boxes are mirrored."""
    if cached is not None and index in cached:
        image, target = cached[index]
    else:
        image, target = ds[index]
        if cached is not None:
            cached[index] = (image, target)
    view: View = target["view"]
    boxes = target["boxes"].numpy().astype(np.float64)
    if VIEW_FLIPS[view_name]:
        view = dataclasses.replace(view, flip=True)
        image = torch.flip(image, dims=(-1,))
        if len(boxes):
            boxes = np.stack([view.out_w - boxes[:, 2], boxes[:, 1], view.out_w - boxes[:, 0], boxes[:, 3]], axis=1)
    return image, boxes, int(target["image_id"]), view


def open_dataset(images: str, ann: str, resize: Resize | int | tuple[int, int] | dict[str, Any],
                 on_bad_box: str = "clip") -> CocoDetection:
    """The data set a cache is computed on: no random flip (views are explicit). `resize`: a `Resize`, a fixed
    size, or a cache's view config."""
    if isinstance(resize, dict):
        resize = resize_of(resize)
    return CocoDetection(images, ann, resize, flip="none", on_bad_box=on_bad_box)


LOAD_AHEAD = 2  # batches whose images are being decoded while the teacher runs


def produce_shard(
    detector: Any, start: int, stop: int, views: Sequence[str], spec: dict[str, Any], batch_size: int,
    load_batch: Callable[[list[int], str], Future], timings: dict[str, float] | None = None, forward_lock: Any = None,
) -> list[dict[str, Any]]:
    """Teacher outputs of data-set positions [start, stop) in every view: raw rows in table order, for
    `encode_shard`.

    `load_batch(indexes, view_name)` gives a future of `load_samples`' result, computed elsewhere (the precompute
    actor's I/O processes): batches b+1 and b+2 are decoded there while the teacher runs batch b, so the forward
    pass sets the pace. The forward batches themselves are fixed (`shard_batches`). `forward_lock`: held around
    each forward when several shards are produced concurrently in one process (one forward at a time).
    """
    import contextlib

    rows: dict[tuple[int, str], dict[str, Any]] = {}
    batches = shard_batches(start, stop, views, batch_size)
    t_fwd = 0.0
    # Two batches ahead, not one: a load queued behind the encoding of the previous shard in the I/O process
    # made the forward wait (seen with py-spy, session notes).
    pending = deque(load_batch(*batches[b]) for b in range(min(LOAD_AHEAD, len(batches))))
    for b, (idx, view_name) in enumerate(batches):
        loaded = pending.popleft().result()
        samples = [(torch.from_numpy(im), boxes, iid, View(**view)) for im, boxes, iid, view in loaded]
        if b + LOAD_AHEAD < len(batches):
            pending.append(load_batch(*batches[b + LOAD_AHEAD]))
        with forward_lock or contextlib.nullcontext():
            t0 = time.perf_counter()
            raws = teacher_outputs(detector, [s[0] for s in samples], spec["targets"], spec["levels"])
            t_fwd += time.perf_counter() - t0
        for i, (_, boxes, iid, view), raw in zip(idx, samples, raws):
            rows[(i, view_name)] = {"image_id": iid, "view": view.to_dict(), "view_key": view.key(),
                                    "boxes": boxes, "hw": view.padded_size(), "raw": raw}
    if timings is not None:
        timings["forward_s"] = timings.get("forward_s", 0.0) + t_fwd
    return [rows[(i, v)] for i in range(start, stop) for v in views]  # image-major: one image's views adjacent


def load_samples(ds: CocoDetection, indexes: Sequence[int], view_name: str
                 ) -> list[tuple[np.ndarray, np.ndarray, int, dict[str, Any]]]:
    """`view_sample` of each position in a picklable form (image as numpy, view as a dict): what the
    precompute actor's I/O process sends back for `produce_shard`."""
    loaded: dict[int, Any] = {}
    out = []
    for i in indexes:
        image, boxes, iid, view = view_sample(ds, i, view_name, loaded)
        out.append((image.numpy(), boxes, iid, view.to_dict()))
    return out


def encode_shard(raw_rows: list[dict[str, Any]], spec: dict[str, Any], projection: Projection | None = None
                 ) -> pa.Table:
    """The Arrow table of `produce_shard`'s raw rows (what the precompute actor's I/O process runs)."""
    comp = CompressionConfig(**spec["compression"])
    return rows_to_table([{"image_id": r["image_id"], "view_key": r["view_key"], "view": r["view"],
                           **encode_row(r["raw"], comp, r["boxes"], r["hw"], projection)} for r in raw_rows])


def fit_teacher_projection(detector: Any, ds: CocoDetection, channels: int, images: int,
                           levels: Sequence[str] | None = None) -> Projection:
    """The teacher's features projected to `channels` principal components per level, fitted on `images` images
    spread over the data set (plain view)."""

    def features(positions: Sequence[int]) -> list[dict[str, np.ndarray]]:
        samples = [view_sample(ds, i, "noflip") for i in positions]
        return teacher_outputs(detector, [s[0] for s in samples], ["features"], levels)

    return fit_projection(features, sample_positions(len(ds), images), channels)


def ensure_projection(cache: TeacherCache, detector: Any, ds: CocoDetection) -> Projection | None:
    """`compression.pca`: the cache's projection of the teacher's features; fitted (on `pca_images` images spread
    over the data set, plain view, the cache's levels) and stored when the cache has none yet. A resumed cache
    keeps the one its first shards were encoded with."""
    spec = cache.manifest["key"]["spec"]
    r = spec["compression"].get("pca")
    if not r or cache.projection() is not None:
        return cache.projection()
    t0 = time.perf_counter()
    cache.write_projection(fit_teacher_projection(detector, ds, r, spec["compression"]["pca_images"], spec["levels"]))
    log.info("%s: feature projection to %d channels fitted in %.1f s (variance left out per level: %s)", cache.uri,
             r, time.perf_counter() - t0, cache.manifest["projection"]["residual"])
    return cache.projection()


# ================================================================================================ precompute


class PrecomputeActor:
    """Loads one teacher once; computes shards and writes them under temporary names.

    The actor's own process runs the teacher's forward and little else. Its I/O processes (`io_workers`, spawned
    once) decode the images of the next two batches and encode, compress and write each finished shard: in
    the actor's threads that work held the GIL between the forward's many small ops and slowed it by about a
    quarter on 2 cores (bench/precompute.py). Threaded (`max_concurrency` = shards in flight): while one shard
    is encoded and written, the next one's forward runs; a lock keeps one forward at a time."""

    def __init__(self, work: dict[str, Any], threads: int, io_workers: int = 2) -> None:
        import multiprocessing
        import threading
        from concurrent.futures import ProcessPoolExecutor

        torch.set_num_threads(threads)
        self.lock = threading.Lock()
        self.work = work
        d = work["data"]
        self.ds_args = (d["images"], d["annotations"], d["resize"], d["on_bad_box"])
        ctx = multiprocessing.get_context("spawn")
        # Start every worker now (data set parsed, Arrow warmed up), not on the first shard: a worker holds its
        # warm-up call at the barrier until each worker has one.
        warmed = ctx.Barrier(io_workers)
        self.io = ProcessPoolExecutor(max_workers=io_workers, mp_context=ctx, initializer=_io_init,
                                      initargs=(os.getpid(), self.ds_args, work["cache_uri"], warmed))
        for f in [self.io.submit(_io_warm) for _ in range(io_workers)]:
            f.result()
        self.detector = load_teacher(work["checkpoint"], device=actor_device(work["gpus"]))

    def ready(self) -> int:
        return os.getpid()

    def _load(self, indexes: list[int], view_name: str) -> Any:
        return self.io.submit(_io_load, indexes, view_name)

    def run_shard(self, i: int, start: int, stop: int) -> dict[str, Any]:
        from concurrent.futures.process import BrokenProcessPool

        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        w = self.work
        try:
            raw_rows = produce_shard(self.detector, start, stop, w["views"], w["spec"], w["batch_size"], self._load,
                                     timings, forward_lock=self.lock)
            tmp, entry = self.io.submit(_io_encode_and_write, i, raw_rows, w["spec"], (start, stop)).result()
        except BrokenProcessPool:
            # Its I/O process died (killed, out of memory): this actor can do no more. Exiting makes the driver
            # replace it and hand its shards out again, as for any dead actor.
            log.error("precompute actor %d: its I/O process died; exiting so that it is replaced", os.getpid())
            os._exit(1)
        return {"shard": i, "tmp": tmp, "entry": entry, "pid": os.getpid(), "seconds": time.perf_counter() - t0,
                "forward_s": timings.get("forward_s", 0.0)}


# The precompute actor's I/O process: module-level state, set once by `_io_init`.
_IO: dict[str, Any] = {}


def _io_init(parent_pid: int, ds_args: tuple, cache_uri: str, warmed: Any) -> None:
    import threading

    torch.set_num_threads(1)
    _IO["warmed"] = warmed
    _IO["ds"] = open_dataset(*ds_args)
    _IO["cache"] = TeacherCache.open(cache_uri)

    def watch_parent() -> None:  # a killed actor (lost node, ray.kill) must not leave this process behind
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()


def _io_warm() -> int:
    # Arrow's first nested-array build pays a one-time set-up: pay it before the clock starts.
    rows_to_table([{"image_id": 0, "view_key": "", "view": {"orig_h": 1, "orig_w": 1, "out_h": 1, "out_w": 1,
                                                             "flip": False}}])
    _IO["warmed"].wait(timeout=300)
    return os.getpid()


def _io_load(indexes: list[int], view_name: str) -> list:
    return load_samples(_IO["ds"], indexes, view_name)


def _io_encode_and_write(i: int, raw_rows: list[dict[str, Any]], spec: dict[str, Any], span: tuple[int, int]
                         ) -> tuple[str, dict[str, Any]]:
    cache = _IO["cache"]
    table = encode_shard(raw_rows, spec, cache.projection())
    data = table_to_bytes(table, cache.shard_meta(i))
    return cache.write_tmp(i, data), shard_entry(i, data, table.num_rows, span)


@dataclass
class PrecomputeReport:
    """What one teacher's precompute did (tests and `curriculum precompute` read it)."""

    teacher: str
    cache: str
    shards: int
    already_done: int = 0
    adopted: list[int] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)  # committed by this run, in commit order
    retried: list[tuple[int, str]] = field(default_factory=list)  # (shard, why) of every failed attempt
    actors_replaced: int = 0
    images: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0  # summed over actors
    startup_seconds: float = 0.0  # actors' start before the first shard (not in `seconds`)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class ActorSlots:
    """Which actors of a teacher may take another shard: each actor slot has `capacity` places (its shards in
    flight). A slot whose actor was replaced is *held* until the replacement has started: its free places, and
    those freed later, wait in `held` instead of `free`, so no shard is queued on an actor the cluster may never
    find room for (a lost node), while the live actors take the remaining shards."""

    def __init__(self, n: int, capacity: int) -> None:
        self.free: deque[int] = deque(slot for _ in range(capacity) for slot in range(n))
        self.held: dict[int, int] = {}

    def take(self) -> int:
        return self.free.popleft()

    def __bool__(self) -> bool:
        return bool(self.free)

    def release(self, slot: int) -> None:
        """A shard of `slot` finished or failed."""
        if slot in self.held:
            self.held[slot] += 1
        else:
            self.free.append(slot)

    def hold(self, slot: int) -> None:
        """`slot` has a new actor that has not started: park its free places."""
        parked = sum(1 for x in self.free if x == slot)
        if parked:
            self.free = deque(x for x in self.free if x != slot)
        self.held[slot] = self.held.get(slot, 0) + parked

    def started(self, slot: int) -> None:
        """The replacement in `slot` answered `ready()`: its places are free again."""
        self.free.extend([slot] * self.held.pop(slot, 0))


class _TeacherRun:
    """Driver-side state of one teacher: its cache, its actors, its queue of shards."""

    def __init__(self, work: dict[str, Any], cache: TeacherCache, shards: list[int], spec: TeacherSpec) -> None:
        self.work, self.cache, self.spec = work, cache, spec
        self.ranges = shard_ranges(cache.manifest["num_images"], cache.manifest["shard_size"])
        self.pending: deque[int] = deque(shards)
        self.actors: list[Any] = []
        self.slots = ActorSlots(0, 0)
        self.attempts: dict[int, int] = {}
        self.start_failures = 0  # replacement actors that died before they started
        self.report = PrecomputeReport(spec.name or work["name"], cache.uri, cache.manifest["num_shards"])

    def new_actor(self) -> Any:
        import ray

        cls = ray.remote(PrecomputeActor).options(
            num_cpus=self.spec.cpus_per_actor, num_gpus=self.spec.gpus_per_actor,
            max_restarts=0, max_task_retries=0,  # the driver replaces dead actors and re-queues their shards
            max_concurrency=self.spec.shards_in_flight, runtime_env=storage_runtime_env(),
        )
        return cls.remote(self.work, actor_threads(self.spec.cpus_per_actor, self.spec.threads), self.spec.io_workers)


def _prepare(spec: TeacherSpec, data: DataConfig, cache_cfg: CacheConfig, ds_cache: dict
             ) -> tuple[dict, CacheKey, Any, Any]:
    """The cache key and manifest header of one teacher over the data (fingerprints computed here, once), the data
    set and the teacher."""
    images, ann = data.split_paths(cache_cfg.split)
    resize = data.resize_spec("train" if cache_cfg.split == "train" else "val")
    views = view_config(resize, cache_cfg.views)
    dkey = (str(images), str(ann), repr(resize), data.on_bad_box)
    if dkey not in ds_cache:
        ds = open_dataset(str(images), str(ann), resize, data.on_bad_box)
        ds_cache[dkey] = (ds, data_fingerprint(ds))
    ds, dfp = ds_cache[dkey]
    det = load_teacher(spec.checkpoint, spec.name)
    tfp = teacher_fingerprint(spec.checkpoint)
    tspec = target_spec(cache_cfg)
    if "proposals" in tspec["targets"] and det.kind != "two_stage":
        raise CacheError(f"cache.targets has 'proposals' but teacher {det.config.name} ({spec.checkpoint}) is "
                         "one-stage: drop it for this teacher")
    if tspec["levels"] is not None:
        names = det.level_names
        bad = [l for l in tspec["levels"] if l not in names]
        if bad:
            raise CacheError(f"cache.levels {bad} are not FPN levels of {det.config.name} (it has {names})")
    key = CacheKey(det.config.name, tfp, dfp, views, tspec)
    header = {
        "teacher": {"name": det.config.name, "checkpoint": os.path.abspath(spec.checkpoint), "fingerprint": tfp,
                    "kind": det.kind, "num_classes": det.config.num_classes, "image_size": det.config.image_size,
                    "level_channels": det.level_channels, "class_names": (
                        list(det.config.class_names) if det.config.class_names is not None else None)},
        "data": {"images": os.path.abspath(images), "annotations": os.path.abspath(ann), "fingerprint": dfp,
                 "split": cache_cfg.split, "on_bad_box": data.on_bad_box, "num_classes": ds.num_classes},
        "batch_size": spec.batch_size,
    }
    # The cache keeps the teacher's own class columns, whatever the data's classes: a class map
    # (teachers.class_map) turns them into the student's as they are read. It pairs classes by name, so a teacher
    # on another number of classes must name its own.
    if det.config.num_classes != ds.num_classes and det.config.class_names is None:
        raise ModelError(f"teacher {spec.checkpoint} predicts {det.config.num_classes - 1} classes, the data "
                         f"{ann} has {ds.num_classes - 1}, and its checkpoint records no class names, so no class "
                         "map can pair them: retrain the teacher (checkpoints now record class_names)")
    return header, key, ds, det


def _work(cache: TeacherCache) -> dict[str, Any]:
    """What an actor needs, all from the manifest (so `rebuild` needs nothing else)."""
    m = cache.manifest
    v = m["key"]["views"]
    return {
        "name": m["teacher"]["name"], "checkpoint": m["teacher"]["checkpoint"], "cache_uri": cache.uri,
        "data": {"images": m["data"]["images"], "annotations": m["data"]["annotations"],
                 "resize": {k: x for k, x in v.items() if k != "views"}, "on_bad_box": m["data"]["on_bad_box"]},
        "views": v["views"], "spec": m["key"]["spec"], "batch_size": m["batch_size"], "gpus": 0.0,
    }


def precompute(
    job: PrecomputeJobConfig,
    progress: bool = True,
    on_dispatch: Callable[[str, int, Any], None] | None = None,
    on_commit: Callable[[str, int], None] | None = None,
) -> list[PrecomputeReport]:
    """Run every teacher of `job` over its data split and write (or finish) their caches.

    `on_dispatch(teacher, shard, actor)` and `on_commit(teacher, shard)` are hooks for tests and progress
    reporting (a test kills an actor from `on_dispatch`, or raises from `on_commit` to simulate a crash).
    """
    if not job.teachers:
        raise CacheError("the precompute config names no teachers (teachers: [{checkpoint: ..., actors: 1}])")
    from curriculum.files import check_root
    from curriculum.shapes import ensure_builtin_data

    check_root(job.cache.root)  # an unreachable store fails here, once, before any actor starts
    ensure_builtin_data(job.data)
    runs = []
    ds_cache: dict = {}
    locks: list[CacheWriterLock] = []
    try:
        for spec in job.teachers:
            header, key, ds, det = _prepare(spec, job.data, job.cache, ds_cache)
            # One writer per cache folder: locked before its manifest is created or read, released however
            # this run ends (see teachers/cache.py, "One writer at a time").
            fs, path, uri = TeacherCache.location(job.cache.root, key)
            locks.append(CacheWriterLock(fs, path, uri).acquire())
            cache = TeacherCache.create_or_resume(job.cache.root, key, header, ds.image_ids, job.cache.shard_size)
            if cache.manifest["batch_size"] != spec.batch_size:
                log.warning("%s: resuming with the batch size it was started with (%d, config says %d) so that "
                            "every shard is computed alike", cache.uri, cache.manifest["batch_size"], spec.batch_size)
            ensure_projection(cache, det, ds)
            del det
            runs.append((spec, cache))
        ensure_ray(job.ray)
        return _drive(runs, job.cache.max_attempts, progress, on_dispatch, on_commit)
    finally:
        for lock in reversed(locks):
            lock.release()


def rebuild(cache_path: str, shards: Sequence[int], spec: TeacherSpec | None = None, progress: bool = False,
            ray_cfg: RayInitConfig | None = None) -> PrecomputeReport:
    """Recompute some shards of an existing cache alone (e.g. one reported corrupt), from its manifest. Takes
    the cache's writer lock (a precompute writing it at the same time is refused, and the other way round)."""
    cache = TeacherCache.open(cache_path)
    with CacheWriterLock.for_cache(cache):
        cache = TeacherCache.open(cache_path)  # the manifest as the last writer left it, now that we hold the lock
        n = cache.manifest["num_shards"]
        bad = [s for s in shards if not 0 <= s < n]
        if bad:
            raise CacheError(f"{cache_path}: no shard(s) {bad}; it has shards 0..{n - 1}")
        live = teacher_fingerprint(cache.manifest["teacher"]["checkpoint"])
        if live != cache.manifest["key"]["teacher_fp"]:
            raise CacheError(f"{cache_path}: the teacher checkpoint {cache.manifest['teacher']['checkpoint']} "
                             f"changed (fingerprint {live}, cache {cache.manifest['key']['teacher_fp']}); a rebuilt "
                             "shard would mix two teachers: precompute a new cache instead")
        for s in shards:
            cache.invalidate(s)
        ensure_ray(ray_cfg)
        spec = spec or TeacherSpec(checkpoint=cache.manifest["teacher"]["checkpoint"])
        return _drive([(spec, cache)], 3, progress, None, None, only=list(shards))[0]


def _drive(runs_in, max_attempts: int, progress: bool, on_dispatch, on_commit, only: list[int] | None = None
           ) -> list[PrecomputeReport]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    runs: list[_TeacherRun] = []
    for spec, cache in runs_in:
        removed = cache.remove_tmp()
        dropped = cache.drop_bad_listed()
        if dropped:
            log.warning("%s: shard(s) %s listed but missing or resized on disk: recomputing them", cache.uri, dropped)
        adopted = cache.adopt_orphans()
        todo = cache.missing_shards() if only is None else [s for s in only if s in cache.missing_shards()]
        work = _work(cache)
        work["gpus"] = spec.gpus_per_actor
        run = _TeacherRun(work, cache, todo, spec)
        run.report.adopted = adopted
        run.report.already_done = cache.manifest["num_shards"] - len(cache.missing_shards()) - len(adopted)
        if removed:
            log.info("%s: removed %d temporary file(s) of an interrupted run", cache.uri, removed)
        runs.append(run)

    total = sum(r.ranges[s][1] - r.ranges[s][0] for r in runs for s in r.pending)
    bar = tqdm(total=total, unit="img", desc="precompute", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)
    inflight: dict[Any, tuple[_TeacherRun, int, int]] = {}  # ref -> (run, shard, actor slot)
    sent_to: dict[Any, Any] = {}  # ref -> the actor handle it was sent to
    starting: dict[Any, tuple[_TeacherRun, int]] = {}  # ready() ref of a replacement actor -> (run, actor slot)

    def _replace(run: _TeacherRun, slot: int, why: str | None, max_attempts: int) -> None:
        """A new actor in `slot`; its slot's shard capacity is held back until its `ready()` answers."""
        if why is not None:
            run.start_failures += 1
            log.warning("%s: %s, attempt %d of %d", run.work["name"], why, run.start_failures, max_attempts)
            if run.start_failures >= max_attempts:
                raise CacheError(f"teacher {run.work['name']}: {why}; the shards committed so far are kept in "
                                 f"{run.cache.uri}: fix the cause and run again")
        try:
            ray.kill(run.actors[slot], no_restart=True)
        except Exception:
            pass
        run.actors[slot] = run.new_actor()
        run.report.actors_replaced += 1
        run.slots.hold(slot)
        starting[run.actors[slot].ready.remote()] = (run, slot)

    t_start = time.perf_counter()
    try:
        for run in runs:
            n = min(run.spec.actors, len(run.pending))
            run.actors = [run.new_actor() for _ in range(n)]
            run.slots = ActorSlots(n, run.spec.shards_in_flight)
        # Start the clock once the teachers are loaded: `seconds` is the steady-state pace, `startup_seconds` the
        # fixed cost (worker start, imports, checkpoint load, data set parse).
        ray.get([a.ready.remote() for run in runs for a in run.actors])
        t_ready = time.perf_counter()
        for run in runs:
            run.report.startup_seconds = t_ready - t_start
        t_start = t_ready
        while True:
            for run in runs:
                while run.slots and run.pending:
                    slot, shard = run.slots.take(), run.pending.popleft()
                    s, e = run.ranges[shard]
                    ref = run.actors[slot].run_shard.remote(shard, s, e)
                    inflight[ref] = (run, shard, slot)
                    sent_to[ref] = run.actors[slot]
                    if on_dispatch:
                        on_dispatch(run.work["name"], shard, run.actors[slot])
            # Replacement actors still starting only matter while shards wait for an actor: once the live actors
            # have taken every shard, the run ends without them (a replacement that the cluster has no room for,
            # e.g. after losing a node, must not hold anything up).
            if not inflight and not (starting and any(r.pending for r in runs)):
                break
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1)
            for ref in ready:
                if ref in starting:
                    run, slot = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # the replacement died too (its node lost) or cannot start
                        _replace(run, slot, f"replacement actor failed to start ({type(e).__name__}: "
                                            f"{str(e)[:200]})", max_attempts)
                        continue
                    run.slots.started(slot)
                    continue
                run, shard, slot = inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except RayActorError as e:
                    # The actor died mid-shard: its temporary file (if any) is never committed. Replace it (once,
                    # though each of its shards in flight fails on its own). The shard goes back to the queue
                    # and the next live actor with a free slot takes it; the replacement takes shards only once
                    # it has started.
                    _retry(run, shard, f"actor died ({type(e).__name__})", max_attempts)
                    if sent_to[ref] is run.actors[slot]:
                        _replace(run, slot, None, max_attempts)
                    run.slots.release(slot)
                    sent_to.pop(ref, None)
                    continue
                except RayTaskError as e:
                    sent_to.pop(ref, None)
                    cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                    if isinstance(cause, CurriculumError):  # bad data / config: retrying cannot help
                        raise type(cause)(f"teacher {run.work['name']}, shard {shard}: {cause}") from None
                    _retry(run, shard, f"{type(cause or e).__name__}: {str(cause or e)[:300]}", max_attempts)
                    run.slots.release(slot)
                    continue
                sent_to.pop(ref, None)
                run.cache.commit(shard, out["tmp"], out["entry"])
                run.report.computed.append(shard)
                run.report.forward_seconds += out["forward_s"]
                n_img = run.ranges[shard][1] - run.ranges[shard][0]
                run.report.images += n_img
                bar.update(n_img)
                run.slots.release(slot)
                if on_commit:
                    on_commit(run.work["name"], shard)
    finally:
        bar.close()
        for run in runs:
            run.cache.write_manifest(force=True)
            for a in run.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
            run.report.seconds = time.perf_counter() - t_start
    for run in runs:
        run.cache.remove_tmp()
        if only is None:
            run.cache.require_complete()
    return [r.report for r in runs]


def _retry(run: _TeacherRun, shard: int, why: str, max_attempts: int) -> None:
    run.attempts[shard] = run.attempts.get(shard, 0) + 1
    run.report.retried.append((shard, why))
    log.warning("%s: shard %d failed (%s), attempt %d of %d", run.work["name"], shard, why, run.attempts[shard],
                max_attempts)
    if run.attempts[shard] >= max_attempts:
        raise CacheError(f"teacher {run.work['name']}: shard {shard} failed {max_attempts} times (last: {why}); "
                         f"the shards committed so far are kept in {run.cache.uri}: fix the cause and run again")
    run.pending.appendleft(shard)
