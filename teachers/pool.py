"""The teacher pool on Ray: precompute the cache, serve targets online, and the inline reference.

Precompute (`precompute(job)`, `curriculum precompute CONFIG`). Our own actors and a driver that hands out
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

Serving (`TeacherServer`, `prefetch`). For views no cache holds (random augmentation) the student sends its
batch (numpy, one object in Ray's object store) and gets an ObjectRef back; `prefetch` submits batch i+1
before the student computes step i. A request whose actor died is resent to a replacement actor; every
answer carries the image ids and view keys it was computed for, checked against the request, so a step can
never get another image's targets.

Inline (`InlineTeacher`): the teacher in the training process, as other frameworks do; the reference for
correctness and cost. All three paths produce rows with `teachers.cache.teacher_outputs`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from curriculum.config import CacheConfig, DataConfig, PrecomputeJobConfig, RayInitConfig, TeacherSpec
from curriculum.data import View
from curriculum.errors import CurriculumError, DataError, ModelError
from teachers.cache import (
    FP16_MAX, CacheError, CacheKey, CacheWriterLock, TeacherCache, collate_targets, data_fingerprint, open_dataset, produce_shard,
    shard_entry, shard_ranges, table_to_bytes, target_spec, teacher_fingerprint, teacher_outputs, view_config,
)

log = logging.getLogger(__name__)


# ================================================================================================ Ray and teachers


def ensure_ray(cfg: RayInitConfig | None = None) -> None:
    """Join Ray: as is when already initialised; the cluster of RAY_ADDRESS when set (`ray job submit` sets it);
    otherwise a local Ray with the configured logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayInitConfig()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
        return
    kw: dict[str, Any] = {}
    if cfg.num_cpus is not None:
        kw["num_cpus"] = cfg.num_cpus
    if cfg.num_gpus is not None:
        kw["num_gpus"] = cfg.num_gpus
    if cfg.object_store_memory is not None:
        kw["object_store_memory"] = cfg.object_store_memory
    ray.init(**kw)


def load_teacher(checkpoint: str, name: str | None = None, device: str | None = None) -> Any:
    """A zoo detector from its checkpoint, in eval mode, without gradients."""
    from teachers.zoo import load_detector

    det = load_detector(checkpoint)
    if name and det.config.name != name:
        raise ModelError(f"teacher checkpoint {checkpoint} holds {det.config.name}, the config names {name}: "
                         "fix the name or the path")
    det.eval().requires_grad_(False)
    det.role = "teacher"
    if device:
        det.to(device)
    return det


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _threads(cpus: float, threads: int) -> int:
    return threads or max(1, int(round(cpus)))


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
        self.ds_args = (d["images"], d["annotations"], (d["out_h"], d["out_w"]), d["on_bad_box"])
        ctx = multiprocessing.get_context("spawn")
        # Start every worker now (data set parsed, Arrow warmed up), not on the first shard: a worker holds its
        # warm-up call at the barrier until each worker has one.
        warmed = ctx.Barrier(io_workers)
        self.io = ProcessPoolExecutor(max_workers=io_workers, mp_context=ctx, initializer=_io_init,
                                      initargs=(os.getpid(), self.ds_args, work["cache_uri"], warmed))
        for f in [self.io.submit(_io_warm) for _ in range(io_workers)]:
            f.result()
        self.detector = load_teacher(work["checkpoint"], device=_device(work["gpus"]))

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
    from teachers.cache import rows_to_table

    # Arrow's first nested-array build costs ~0.5 s of one-time set-up: pay it before the clock starts.
    rows_to_table([{"image_id": 0, "view_key": "", "view": {"orig_h": 1, "orig_w": 1, "out_h": 1, "out_w": 1,
                                                             "flip": False}}])
    _IO["warmed"].wait(timeout=300)
    return os.getpid()


def _io_load(indexes: list[int], view_name: str) -> list:
    from teachers.cache import load_samples

    return load_samples(_IO["ds"], indexes, view_name)


def _io_encode_and_write(i: int, raw_rows: list[dict[str, Any]], spec: dict[str, Any], span: tuple[int, int]
                         ) -> tuple[str, dict[str, Any]]:
    from teachers.cache import encode_shard

    cache = _IO["cache"]
    table = encode_shard(raw_rows, spec)
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
            max_concurrency=self.spec.shards_in_flight,
        )
        return cls.remote(self.work, _threads(self.spec.cpus_per_actor, self.spec.threads), self.spec.io_workers)


def _prepare(spec: TeacherSpec, data: DataConfig, cache_cfg: CacheConfig, ds_cache: dict) -> tuple[dict, CacheKey, Any]:
    """The cache key and manifest header of one teacher over the data (fingerprints computed here, once)."""
    images, ann = data.split_paths(cache_cfg.split)
    dkey = (str(images), str(ann), data.image_size, data.on_bad_box)
    if dkey not in ds_cache:
        ds = open_dataset(str(images), str(ann), data.image_size, data.on_bad_box)
        ds_cache[dkey] = (ds, data_fingerprint(ds))
    ds, dfp = ds_cache[dkey]
    det = load_teacher(spec.checkpoint, spec.name)
    tfp = teacher_fingerprint(spec.checkpoint)
    views = view_config((ds.out_h, ds.out_w), cache_cfg.views)
    tspec = target_spec(cache_cfg)
    if "proposals" in tspec["targets"] and det.kind != "two_stage":
        raise CacheError(f"cache.targets has 'proposals' but teacher {det.config.name} ({spec.checkpoint}) is "
                         "one-stage: drop it for this teacher")
    if tspec["levels"] is not None:
        names = det.backbone.level_names + det.backbone.extra_names
        bad = [l for l in tspec["levels"] if l not in names]
        if bad:
            raise CacheError(f"cache.levels {bad} are not FPN levels of {det.config.name} (it has {names})")
    key = CacheKey(det.config.name, tfp, dfp, views, tspec)
    header = {
        "teacher": {"name": det.config.name, "checkpoint": os.path.abspath(spec.checkpoint), "fingerprint": tfp,
                    "kind": det.kind, "num_classes": det.config.num_classes, "image_size": det.config.image_size,
                    "level_channels": det.level_channels},
        "data": {"images": os.path.abspath(images), "annotations": os.path.abspath(ann), "fingerprint": dfp,
                 "split": cache_cfg.split, "on_bad_box": data.on_bad_box, "num_classes": ds.num_classes},
        "batch_size": spec.batch_size,
    }
    if det.config.num_classes != ds.num_classes:
        raise ModelError(f"teacher {spec.checkpoint} predicts {det.config.num_classes - 1} classes, the data "
                         f"{ann} has {ds.num_classes - 1}")
    return header, key, ds


def _work(cache: TeacherCache) -> dict[str, Any]:
    """What an actor needs, all from the manifest (so `rebuild` needs nothing else)."""
    m = cache.manifest
    v = m["key"]["views"]
    return {
        "name": m["teacher"]["name"], "checkpoint": m["teacher"]["checkpoint"], "cache_uri": cache.uri,
        "data": {"images": m["data"]["images"], "annotations": m["data"]["annotations"], "out_h": v["out_h"],
                 "out_w": v["out_w"], "on_bad_box": m["data"]["on_bad_box"]},
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
    from trainers.train import ensure_builtin_data

    ensure_builtin_data(job.data)
    runs = []
    ds_cache: dict = {}
    locks: list[CacheWriterLock] = []
    try:
        for spec in job.teachers:
            header, key, ds = _prepare(spec, job.data, job.cache, ds_cache)
            # One writer per cache folder: locked before its manifest is created or read, released however
            # this run ends (see teachers/cache.py, "One writer at a time").
            fs, path, uri = TeacherCache.location(job.cache.root, key)
            locks.append(CacheWriterLock(fs, path, uri).acquire())
            cache = TeacherCache.create_or_resume(job.cache.root, key, header, ds.image_ids, job.cache.shard_size)
            if cache.manifest["batch_size"] != spec.batch_size:
                log.warning("%s: resuming with the batch size it was started with (%d, config says %d) so that "
                            "every shard is computed alike", cache.uri, cache.manifest["batch_size"], spec.batch_size)
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


# ================================================================================================ verify


def verify_tolerance(codec: str, live: np.ndarray, cached: np.ndarray, atol: float) -> float:
    """How far a sound cached tensor may be from the live one, both decoded through `codec`.

    The live forward here and the precompute's forward (other thread counts, other machine) differ in the last
    float bits, relative `atol` of the largest magnitude; where that noise straddles a rounding boundary of
    the stored representation, the decoded values differ by one step of it: fp16 spacing at the tensor's
    largest magnitude, or int8's largest per-channel scale (max / 127). A corrupt or stale value is off by far
    more than that.
    """
    if not live.size or live.dtype.kind not in "fc":
        return 0.0
    top = max(float(np.abs(live).max()), float(np.abs(cached).max()))
    base = codec.partition("|")[0]
    step = {"fp16": float(np.spacing(np.float16(min(top, FP16_MAX)))), "int8": top / 127.0}.get(base, 0.0)
    return step + atol * max(1.0, top)


def verify_cache(cache_path: str, sample: int = 8, seed: int = 0, atol: float = 1e-4) -> dict[str, Any]:
    """Recompute a random sample of cached rows with the live teacher (in this process) and compare.

    The sampled images are recomputed in the exact forward batches of the precompute, so an fp32 cache matches
    within float noise of the thread count; compressed caches within that plus one step of their codec
    (`verify_tolerance`: the live output goes through the same codec, then both are decoded). Every shard read
    is checksummed.
    """
    from teachers.cache import CacheReader, encode_row, decode_row, shard_batches, view_sample
    from curriculum.config import CompressionConfig

    cache = TeacherCache.open(cache_path)
    m = cache.manifest
    live_fp = teacher_fingerprint(m["teacher"]["checkpoint"])
    work = _work(cache)
    d = work["data"]
    ds = open_dataset(d["images"], d["annotations"], (d["out_h"], d["out_w"]), d["on_bad_box"])
    problems: list[str] = []
    if live_fp != m["key"]["teacher_fp"]:
        problems.append(f"teacher checkpoint changed: fingerprint {live_fp}, cache {m['key']['teacher_fp']}")
    if data_fingerprint(ds) != m["key"]["data_fp"]:
        problems.append("data changed: annotations or image list differ from the cache's")
    if problems:
        return {"ok": False, "problems": problems, "checked": 0}
    reader = CacheReader(cache, memory_bytes=1 << 28)
    det = load_teacher(m["teacher"]["checkpoint"])
    comp = CompressionConfig(**m["key"]["spec"]["compression"])
    rng = np.random.default_rng(seed)
    done = [int(k) for k in m["shards"]]
    positions = []
    for s in done:
        a, b = m["shards"][f"{s:05d}"]["images"]
        positions += list(range(a, b))
    chosen = sorted(rng.choice(positions, size=min(sample, len(positions)), replace=False).tolist())
    worst: dict[str, float] = {}
    checked = 0
    loaded: dict = {}
    for p in chosen:
        shard = p // m["shard_size"]
        a, b = m["shards"][f"{shard:05d}"]["images"]
        for idx, view_name in shard_batches(a, b, work["views"], work["batch_size"]):
            if p not in idx:
                continue
            samples = [view_sample(ds, i, view_name, loaded) for i in idx]
            raws = teacher_outputs(det, [s[0] for s in samples], work["spec"]["targets"], work["spec"]["levels"])
            j = idx.index(p)
            image, boxes, iid, view = samples[j]
            cells = encode_row(raws[j], comp, boxes, (view.out_h, view.out_w))
            live = decode_row(cells)
            stored = reader.rows([iid], [view])[0]
            for name, ref in live.items():
                got = stored.get(name)
                if got is None or got.shape != ref.shape:
                    problems.append(f"image_id {iid} view {view.key()}: {name} shape {None if got is None else got.shape}"
                                    f" cached, {ref.shape} live")
                    continue
                err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
                tol = verify_tolerance(cells[name]["codec"], ref, got, atol)
                worst[name] = max(worst.get(name, 0.0), err)
                if err > tol:
                    problems.append(f"image_id {iid} view {view.key()}: {name} differs by {err:.3g} (> {tol:.3g})")
            checked += 1
    return {"ok": not problems, "problems": problems[:20], "checked": checked, "max_abs_error": worst}


# ================================================================================================ serving


class ServeActor:
    """A teacher answering batches online (serving mode)."""

    def __init__(self, checkpoint: str, targets: Sequence[str], levels: Sequence[str] | None, threads: int,
                 gpus: float) -> None:
        torch.set_num_threads(threads)
        self.detector = load_teacher(checkpoint, device=_device(gpus))
        self.targets, self.levels = list(targets), levels

    def ready(self) -> int:
        return os.getpid()

    def serve(self, images: np.ndarray, image_ids: list[int], view_keys: list[str]) -> dict[str, Any]:
        # Ray hands the array over read-only (zero copy from shared memory); one copy (cheap next to the forward)
        # keeps torch from ever writing into it.
        x = torch.from_numpy(np.array(images, dtype=np.float32, copy=True))
        rows = teacher_outputs(self.detector, list(x), self.targets, self.levels)
        return {"image_ids": list(image_ids), "view_keys": list(view_keys), "rows": rows, "pid": os.getpid()}


def _batch_array(images: Sequence[torch.Tensor] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return np.ascontiguousarray(images, dtype=np.float32)
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().float().contiguous().numpy()
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise DataError(f"serving needs one image size per batch, got {sorted(shapes)}")
    return torch.stack([im.detach().cpu().float() for im in images]).numpy()


class ServeRequest:
    """An answer on its way: `result()` waits, resends to another actor if the one serving it died, and checks
    that the answer is for the images asked."""

    def __init__(self, server: TeacherServer, images_ref: Any, image_ids: list[int], view_keys: list[str]) -> None:
        self.server, self.images_ref = server, images_ref
        self.image_ids, self.view_keys = image_ids, view_keys
        self.attempts = 0
        self._send()

    def _send(self) -> None:
        self.slot, actor = self.server._pick()
        self.actor = actor
        self.ref = actor.serve.remote(self.images_ref, self.image_ids, self.view_keys)
        self.attempts += 1

    def result(self, timeout: float | None = None) -> Any:
        import ray
        from ray.exceptions import RayActorError

        while True:
            try:
                out = ray.get(self.ref, timeout=timeout)
                break
            except RayActorError as e:
                self.server.retries += 1
                if self.attempts >= self.server.max_attempts:
                    raise CurriculumError(f"teacher serving failed {self.attempts} times for image ids "
                                          f"{self.image_ids[:8]} (last: {type(e).__name__}); is the cluster losing "
                                          "nodes?") from None
                self.server._replace(self.slot, self.actor)
                self._send()
        if [int(i) for i in out["image_ids"]] != self.image_ids or list(out["view_keys"]) != self.view_keys:
            raise DataError(f"teacher server answered for image ids {out['image_ids'][:8]} / views "
                            f"{out['view_keys'][:4]}, the request was {self.image_ids[:8]} / {self.view_keys[:4]}: "
                            "targets of another batch are never used")
        return collate_targets(out["rows"], self.image_ids)


class TeacherServer:
    """A set of Ray actors serving one teacher's targets to students (serving mode)."""

    def __init__(self, checkpoint: str, targets: Sequence[str] = ("features", "head"), levels: Sequence[str] | None = None,
                 actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, threads: int = 0,
                 max_attempts: int = 3, wait_ready: bool = True) -> None:
        import ray

        ensure_ray()
        self._cls = ray.remote(ServeActor).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                                                   max_restarts=0, max_task_retries=0)
        self._args = (checkpoint, list(targets), list(levels) if levels else None,
                      _threads(cpus_per_actor, threads), gpus_per_actor)
        self.actors = [self._cls.remote(*self._args) for _ in range(actors)]
        self.max_attempts = max_attempts
        self.retries = 0
        self.replaced = 0
        self._next = 0
        if wait_ready:
            ray.get([a.ready.remote() for a in self.actors])

    def _pick(self) -> tuple[int, Any]:
        slot = self._next % len(self.actors)
        self._next += 1
        return slot, self.actors[slot]

    def _replace(self, slot: int, dead: Any) -> None:
        import ray

        if self.actors[slot] is dead:  # another request may have replaced it already
            try:
                ray.kill(dead, no_restart=True)
            except Exception:
                pass
            self.actors[slot] = self._cls.remote(*self._args)
            self.replaced += 1

    def submit(self, images: Sequence[torch.Tensor] | np.ndarray, image_ids: Sequence[int],
               views: Sequence[View | str]) -> ServeRequest:
        """Send one batch; returns at once. The images go into the object store once (owned by this process, so
        they outlive a dead actor and a retry reuses them)."""
        import ray

        ids = [int(i) for i in image_ids]
        keys = [v.key() if isinstance(v, View) else str(v) for v in views]
        if len(ids) != len(keys):
            raise DataError(f"{len(ids)} image ids but {len(keys)} views")
        arr = _batch_array(images)
        if arr.shape[0] != len(ids):
            raise DataError(f"{arr.shape[0]} images but {len(ids)} image ids")
        return ServeRequest(self, ray.put(arr), ids, keys)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []


def prefetch(server: TeacherServer, batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[dict[str, Any]]]],
             depth: int = 1) -> Iterator[tuple[Any, Any, Any]]:
    """Yield ``(images, targets, teacher_targets)`` for each batch of a loader, keeping `depth` batches ahead
    in flight: the student waits only when the teachers are slower than its step."""
    queue: deque[tuple[Any, Any, ServeRequest]] = deque()
    it = iter(batches)

    def push() -> bool:
        try:
            images, targets = next(it)
        except StopIteration:
            return False
        req = server.submit(images, [t["image_id"] for t in targets], [t["view"] for t in targets])
        queue.append((images, targets, req))
        return True

    for _ in range(depth + 1):
        if not push():
            break
    while queue:
        images, targets, req = queue.popleft()
        tt = req.result()
        push()  # the next batch goes out before the caller computes this step
        yield images, targets, tt


class InlineTeacher:
    """The teacher inside the training process (the reference): same rows as the cache and the server."""

    def __init__(self, detector: Any, targets: Sequence[str] = ("features", "head"),
                 levels: Sequence[str] | None = None) -> None:
        self.detector = detector.eval().requires_grad_(False)
        self.targets, self.levels = list(targets), levels

    def __call__(self, images: Sequence[torch.Tensor], image_ids: Sequence[int], views: Sequence[View | str] = ()
                 ) -> Any:
        """`TeacherTargets` of a batch; for a two-stage teacher with its `roi_scorer` bound to this batch's
        features (proposal sharing), which neither the cache nor the server can give."""
        keep: dict[str, Any] = {}
        rows = teacher_outputs(self.detector, list(images), self.targets, self.levels, keep=keep)
        scorer = None
        if self.detector.kind == "two_stage":
            det, feats, sizes = self.detector, keep["features"], keep["image_sizes"]
            scorer = lambda boxes: det.score_boxes(feats, list(boxes), sizes)  # noqa: E731
        return collate_targets(rows, [int(i) for i in image_ids], roi_scorer=scorer)
