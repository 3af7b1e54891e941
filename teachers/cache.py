"""The teacher cache: versioned Parquet shards of teacher outputs, one folder per cache key.

Layout of one cache (``<root>/<teacher>-<teacher fp>/<data fp>-<views fp>-<spec fp>/``)::

    manifest.json          what the cache is (key, teacher, data, views, targets, compression) and which
                           shards are complete (rows, bytes, sha256 and per-kind bytes of each); atomic
    images.json            the image ids in data-set order (shard i holds images [i*S, (i+1)*S))
    writer.lock            while a precompute or rebuild writes the cache: its host, pid and start time
    shards/shard-00000.parquet ...

One writer at a time (`CacheWriterLock`). `precompute` and `rebuild` take an exclusive lock on the cache folder
before touching the manifest and release it when they end, finished or failed; a second writer is refused with
an error naming the folder and the holder. Readers never look at the lock. On a local file system (a shared
NFS mount included) the lock file is created atomically (``O_CREAT | O_EXCL``); a lock left by a process that
no longer exists on this host (killed, machine rebooted) is stale and taken over with a warning, while a
lock of another host is never judged from here (its pid means nothing on this host): the error says to
delete it by hand once that writer is known to be gone. Other pyarrow file systems (s3://, gs://, hdfs://)
have no atomic create-if-absent through pyarrow: there the lock is advisory and best effort (checked, then
written, then read back after a short pause to catch a writer that raced in), and never taken over
automatically.

Cache key. A cache is identified by the teacher fingerprint (content hash of the checkpoint), the data
fingerprint (hash of the annotation file's bytes and of the image list), the view config (output size and the
flip views) and -- beyond what the issue lists -- the target spec (kinds, levels, compression): two
compressions of the same teacher are two caches that may coexist. A cache whose fingerprints differ from the
live teacher/data is never used silently (`StaleCacheError` says what changed).

Rows. One row per (image, view): ``image_id``, ``view_key`` (`View.key()`), ``view`` (the View's fields, so a
reader reproduces exactly the input the teacher saw), then one column per tensor, named ``<kind>/<name>``:

    features/p3 ..                  [C, H, W]       FPN maps of the chosen levels
    head/cls_logits/<l> ..          [HWA, K]        one-stage dense head per level (+ bbox_regression,
                                                    bbox_ctrness for FCOS)
    head/objectness/<l> ..          [A, H, W]       two-stage RPN per level (+ rpn_deltas [4A, H, W])
    detections/boxes|scores|labels  [D, 4] [D] [D]  after NMS, in view pixels
    proposals/boxes                 [R, 4]          two-stage proposals (view pixels)
    proposals/class_logits          [R, K]          the RoI head on those proposals
    proposals/box_regression        [R, 4K]

Each tensor cell is a struct ``{codec, shape, data, aux, index}``: `encode` / `decode` below.

Compression and its cost (``CompressionConfig``; see `bench/precompute.py` for measured bytes):

- ``fp32``: exact. 4 bytes per value before zstd.
- ``fp16``: 2 bytes per value; relative rounding error <= 2**-11 (values beyond +-65504 are refused rather
  than stored as inf).
- ``int8``: 1 byte per value plus one float32 scale per channel (axis 0 of maps, last axis of row tensors);
  absolute error <= scale / 2, scale = max|x_c| / 127.
- ``topk`` (class logits of dense heads and of the RoI head): k values (fp32 or fp16; int8 falls back to
  fp16) + k uint16 indices + one float32 per location. Kept logits are exact up to their dtype; every dropped
  logit decodes to the (k+1)-th largest logit of its location, an upper bound of the true value, so the top-k
  order is kept and a dropped class never looks less likely than it was.
- ``threshold`` (dense class logits only): only locations whose best class has sigmoid score >= t are stored
  (one bit per location for the mask); the others decode to the largest dropped logit, whose sigmoid is < t.
- ``boxes=sparse`` (one-stage ``bbox_regression`` [HWA, 4] and FCOS ``bbox_ctrness`` [HW, 1]): rows kept only
  at the locations whose best class has sigmoid score >= ``score_threshold`` (the locations ``threshold``
  logits keep; with ``topk`` or dense logits the same rule): one bit per location, one float32 fill, and the
  kept rows in the dtype (int8 scales are taken over the kept rows). Kept rows: the dtype's bound. Dropped
  rows decode to the fill: 0 for regression (no offset from the anchor), the mean of the level's dropped
  logits for centerness. The cost: a loss reading the regression where the teacher's score is below the
  threshold (a ground-truth positive the teacher misses) sees the fill, not the teacher's box; choose
  ``score_threshold`` below the scores the losses weigh. Two-stage ``rpn_deltas`` and
  ``proposals/box_regression`` stay dense.
- ``features_region=boxes``: feature cells outside the ground-truth boxes of the view (dilated by
  ``box_dilation`` of the box's size per side, plus one cell) are dropped and decode to 0; one bit per cell
  for the mask. Exact (up to dtype) inside the region.
- ``features_region=pooled``: average pooling by ``pool`` (ceil mode): ``pool**2`` times smaller; the decoded
  map has the pooled size (the losses resize the student's map to the teacher's).
- Detections and proposal boxes are always fp32 (they are small).

Reading. `CacheReader`: each process reads the Parquet shards it needs into its own LRU (`memory_bytes`).
`ObjectStoreShards` + `ObjectStoreReader`: one actor decodes each shard once and puts it into Ray's object store;
training workers read it zero-copy, and the shards held stay within a byte budget (a bigger cache is
streamed). Both readers have the same interface (`rows`, `targets`, `targets_for`, `manifest`, `image_ids`).

Everything Parquet-side is zstd-compressed on top. Transformer features are never flipped after the fact:
the ``flip`` view is the teacher's output on the flipped image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from curriculum.config import CacheConfig, CompressionConfig
from curriculum.data import CocoDetection, View
from curriculum.errors import CurriculumError, DataError

log = logging.getLogger(__name__)

SCHEMA = "curriculum.teacher_cache/1"
TARGET_KINDS = ("features", "head", "detections", "proposals")
VIEW_FLIPS = {"noflip": False, "flip": True}
FP16_MAX = 65504.0
_ZSTD_LEVEL = 3


# ================================================================================================ errors


class CacheError(CurriculumError):
    """A cache cannot be used as asked (missing, incomplete, wrong view)."""


class StaleCacheError(CacheError):
    """The cache was written for another teacher checkpoint, data set or view config."""


class CorruptShardError(CacheError):
    """A shard file is missing, truncated or differs from its manifest entry."""

    def __init__(self, message: str, shard: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.path = path


# ================================================================================================ filesystem


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local folder or any URI pyarrow understands."""
    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise CacheError(f"cache root {root!r}: pyarrow cannot open this URI ({e})") from None
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write then rename: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# ================================================================================================ writer lock

LOCK_NAME = "writer.lock"
_REMOTE_SETTLE_S = 0.5  # pause before reading a remote lock back (another writer's overwrite becomes visible)
_BREAK_STALE_S = 60.0  # a takeover marker older than this was left by a takeover that died half way


class CacheLockedError(CacheError):
    """Another writer (precompute or rebuild) holds the cache folder."""


def _proc_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime); the name in () may hold spaces
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: never break a lock on a guess
    return True


class CacheWriterLock:
    """Exclusive writer lock on one cache folder (``<cache>/writer.lock``; the module docstring says how it
    behaves on local and remote file systems). Use as a context manager, or `acquire()` / `release()`."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str | None = None) -> None:
        self.fs, self.path, self.uri = fs, path, uri or path
        self.lock_path = posixpath.join(path, LOCK_NAME)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.held = False

    @classmethod
    def for_cache(cls, cache: TeacherCache) -> CacheWriterLock:
        return cls(cache.fs, cache.path, cache.uri)

    def _record(self) -> dict[str, Any]:
        import socket
        import sys

        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token,
                "command": " ".join(sys.argv)[:300]}

    def holder(self) -> dict[str, Any] | None:
        """The lock file's record; None when there is no lock; ``{}`` when it exists but cannot be parsed (a
        writer between creating and filling it, or a damaged file)."""
        try:
            if self.local:
                with open(self.lock_path, "rb") as f:
                    data = f.read()
            else:
                if not _exists(self.fs, self.lock_path):
                    return None
                data = _read_bytes(self.fs, self.lock_path)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(data)
            return rec if isinstance(rec, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _is_stale(self, rec: dict[str, Any]) -> bool:
        import socket

        if not rec:  # unparsable: stale only once it is clearly not a writer that is just starting
            try:
                return time.time() - os.stat(self.lock_path).st_mtime > _BREAK_STALE_S
            except OSError:
                return False
        if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
            return False
        pid = rec["pid"]
        if not _pid_alive(pid):
            return True
        # The pid lives, but is it still the holder? A reboot or pid wrap-around may have given it to another.
        started = rec.get("proc_start")
        now = _proc_start(pid)
        return started is not None and now is not None and now != started

    def _refuse(self, rec: dict[str, Any] | None) -> CacheLockedError:
        import socket

        rec = rec or {}
        who = (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, since {rec.get('started', '?')}"
               + (f", command {rec['command']!r}" if rec.get("command") else ""))
        same = rec.get("host") == socket.gethostname() and rec.get("pid") == os.getpid()
        hint = (" This process holds it already: does the config name the same teacher cache twice?" if same else
                f" Wait for that writer to finish (readers are not blocked). If it is gone for sure (e.g. it ran on "
                f"another host, or on a file system where this host cannot check it), delete {self.lock_path} and "
                "run again.")
        return CacheLockedError(f"teacher cache {self.uri} is being written by another precompute/rebuild ({who}; "
                                f"lock file {self.lock_path}).{hint}")

    def acquire(self) -> CacheWriterLock:
        """Take the lock, or raise CacheLockedError naming the holder."""
        if self.held:
            return self
        if self.local:
            self._acquire_local()
        else:
            self._acquire_remote()
        self.held = True
        return self

    def _acquire_local(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        data = json.dumps(self._record(), indent=1).encode()
        for attempt in range(50):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self.holder()
                if rec is None:  # released between our two calls: try again
                    continue
                if rec == {} and attempt < 20 and not self._is_stale(rec):
                    time.sleep(0.05)  # a writer between creating and filling it: read it again
                    continue
                if not self._is_stale(rec):
                    raise self._refuse(rec) from None
                self._break_stale(rec)
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        raise CacheLockedError(f"teacher cache {self.uri}: could not take the writer lock {self.lock_path} (other "
                               "processes keep taking it); run again")

    def _break_stale(self, rec: dict[str, Any]) -> None:
        """Remove a stale lock. Two processes may find it stale at once: a takeover marker (itself O_EXCL) lets
        only one remove it, and only if the lock still holds the record judged stale, never a fresh lock that
        the other one just took."""
        marker = self.lock_path + ".takeover"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(marker).st_mtime > _BREAK_STALE_S:
                    os.unlink(marker)
            except OSError:
                pass
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            if self.holder() == rec:
                os.unlink(self.lock_path)
                log.warning("teacher cache %s: taking over the writer lock of host %s, pid %s (since %s): that "
                            "process is gone", self.uri, rec.get("host"), rec.get("pid"), rec.get("started"))
        finally:
            try:
                os.unlink(marker)
            except OSError:
                pass

    def _acquire_remote(self) -> None:
        self.fs.create_dir(self.path, recursive=True)
        rec = self.holder()
        if rec is not None:
            raise self._refuse(rec)
        with self.fs.open_output_stream(self.lock_path) as f:
            f.write(json.dumps(self._record(), indent=1).encode())
        time.sleep(_REMOTE_SETTLE_S)
        back = self.holder()
        if not back or back.get("token") != self.token:  # another writer raced in and overwrote ours
            raise self._refuse(back)

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        rec = self.holder()
        if not rec or rec.get("token") != self.token:
            log.warning("teacher cache %s: the writer lock %s was no longer ours at the end (%s); left as is",
                        self.uri, self.lock_path, rec)
            return
        try:
            if self.local:
                os.unlink(self.lock_path)
            else:
                self.fs.delete_file(self.lock_path)
        except (FileNotFoundError, OSError) as e:
            log.warning("teacher cache %s: could not remove the writer lock %s (%s)", self.uri, self.lock_path, e)

    def __enter__(self) -> CacheWriterLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ================================================================================================ fingerprints


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def teacher_fingerprint(checkpoint: str | os.PathLike) -> str:
    """Content hash of the teacher checkpoint (the zoo's `fingerprint`)."""
    from teachers.zoo import fingerprint

    return fingerprint(checkpoint)


def data_fingerprint(ds: CocoDetection) -> str:
    """Hash of the annotation file's bytes and of the image list (ids and file names, in order).

    Image pixels are not hashed (reading all of COCO to start a run costs minutes): replacing an image file
    under the same name is not detected; `curriculum cache verify` is the check for that.
    """
    h = hashlib.sha256()
    with open(ds.ann_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    for i, iid in enumerate(ds.image_ids):
        h.update(f"\n{int(iid)}\t{os.path.relpath(ds.image_path(i), ds.image_dir)}".encode())
    return h.hexdigest()[:16]


def view_config(image_size: int | Sequence[int], views: Sequence[str]) -> dict[str, Any]:
    """The view config of a cache: output size (h, w) and the flip views, in order."""
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = image_size
    bad = [v for v in views if v not in VIEW_FLIPS]
    if bad:
        raise CacheError(f"unknown view(s) {bad}; views are 'noflip' and 'flip'")
    return {"out_h": int(h), "out_w": int(w), "views": list(views)}


def target_spec(cache: CacheConfig) -> dict[str, Any]:
    """What a cache holds besides its key: target kinds, feature levels, compression."""
    comp = asdict(cache.compression)
    if comp.get("boxes") == "dense":
        # Options added after caches were written are left out at their default, so that the keys (and so the
        # folders) of existing caches do not change and they are not recomputed.
        del comp["boxes"]
    return {
        "targets": sorted(cache.targets, key=TARGET_KINDS.index),
        "levels": list(cache.levels) if cache.levels is not None else None,
        "compression": comp,
    }


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # zoo name (for humans; the fingerprint is what counts)
    teacher_fp: str
    data_fp: str
    views: dict[str, Any]
    spec: dict[str, Any]

    @property
    def views_fp(self) -> str:
        return _sha(json.dumps(self.views, sort_keys=True))[:8]

    @property
    def spec_fp(self) -> str:
        return _sha(json.dumps(self.spec, sort_keys=True))[:8]

    def relpath(self) -> str:
        return f"{self.teacher}-{self.teacher_fp}/{self.data_fp}-{self.views_fp}-{self.spec_fp}"

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "teacher_fp": self.teacher_fp, "data_fp": self.data_fp,
                "views": self.views, "spec": self.spec}


# ================================================================================================ codecs


def _base_encode(x: np.ndarray, base: str, channel_axis: int) -> tuple[bytes, bytes | None]:
    if base == "fp32":
        return np.ascontiguousarray(x, dtype=np.float32).tobytes(), None
    if base == "fp16":
        big = np.abs(x) > FP16_MAX
        if big.any():
            raise DataError(
                f"a teacher output holds {float(np.abs(x).max()):.3g}, beyond float16's range (65504): "
                "cache it with compression.dtype fp32 or int8"
            )
        return np.ascontiguousarray(x, dtype=np.float16).tobytes(), None
    if base == "int8":
        if x.ndim == 0 or x.size == 0:
            return b"", np.ones(x.shape[channel_axis] if x.ndim else 0, np.float32).tobytes()
        axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
        amax = np.abs(x).max(axis=axes).astype(np.float32)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        q = np.clip(np.rint(x / scale.reshape(shape)), -127, 127).astype(np.int8)
        return q.tobytes(), scale.tobytes()
    if base == "i64":
        return np.ascontiguousarray(x, dtype=np.int64).tobytes(), None
    raise ValueError(f"unknown base codec {base!r}")


def _base_decode(data: bytes, aux: bytes | None, base: str, shape: Sequence[int], channel_axis: int) -> np.ndarray:
    if base == "fp32":
        return np.frombuffer(data, np.float32).reshape(shape).copy()
    if base == "fp16":
        return np.frombuffer(data, np.float16).reshape(shape).astype(np.float32)
    if base == "int8":
        q = np.frombuffer(data, np.int8).reshape(shape).astype(np.float32)
        if q.size == 0:
            return q
        scale = np.frombuffer(aux, np.float32)
        s = [1] * len(shape)
        s[channel_axis] = -1
        return q * scale.reshape(s)
    if base == "i64":
        return np.frombuffer(data, np.int64).reshape(shape).copy()
    raise ValueError(f"unknown base codec {base!r}")


def _check_size(what: str, got: int, want: int) -> None:
    if got != want:
        raise DataError(f"cache cell {what}: {got} bytes where {want} were expected (truncated or corrupt)")


def _channel_axis(ndim: int) -> int:
    """int8 scales: per column (class / box coordinate) of 2-D row tensors [R, K], per channel (axis 0) of maps."""
    return -1 if ndim == 2 else 0


def score_keep(cls_logits: np.ndarray, score_threshold: float) -> np.ndarray:
    """Locations [R] of dense class logits [R, K] whose best class has sigmoid score >= `score_threshold`: what
    ``logits: threshold`` keeps, and where ``boxes: sparse`` keeps the box regression."""
    x = np.asarray(cls_logits)
    if x.ndim != 2 or not x.shape[1]:
        return np.zeros(x.shape[0] if x.ndim else 0, bool)
    t = float(score_threshold)
    return x.max(axis=1) >= math.log(t / (1.0 - t))


def encode(x: np.ndarray, codec: str, mask: np.ndarray | None = None, fill: float = 0.0) -> dict[str, Any]:
    """Encode one tensor into a cache cell ``{codec, shape, data, aux, index}``.

    codec: a base (``fp32``, ``fp16``, ``int8``, ``i64``) optionally followed by one modifier:
    ``|topk=K`` (2-D [R, K] logits), ``|thresh=T`` (2-D [R, K] sigmoid logits), ``|region`` (3-D [C, H, W] with
    a boolean ``mask`` [H, W]), ``|rows`` (2-D [R, D] with a boolean ``mask`` [R]: the kept rows; the others
    decode to `fill`). The module docstring states the error of each.
    """
    x = np.asarray(x)
    base, _, mod = codec.partition("|")
    if not mod:
        data, aux = _base_encode(x, base, _channel_axis(x.ndim))
        return {"codec": codec, "shape": list(x.shape), "data": data, "aux": aux, "index": None}
    name, _, arg = mod.partition("=")
    if name == "topk":
        if x.ndim != 2:
            raise ValueError(f"topk needs [R, K] logits, got shape {x.shape}")
        base = "fp16" if base == "int8" else base
        r, k_all = x.shape
        k = min(int(arg), k_all)
        if k >= k_all:  # nothing to drop: store dense
            return encode(x, base)
        order = np.argsort(-x, axis=1, kind="stable")
        idx = order[:, :k].astype(np.uint16)
        vals = np.take_along_axis(x, order[:, :k], axis=1)
        fill = np.take_along_axis(x, order[:, k : k + 1], axis=1)[:, 0].astype(np.float32)
        data, _ = _base_encode(vals, base, -1)
        return {"codec": f"{base}|topk={k}", "shape": list(x.shape), "data": data, "aux": fill.tobytes(),
                "index": idx.tobytes()}
    if name == "thresh":
        if x.ndim != 2:
            raise ValueError(f"thresh needs [R, K] logits, got shape {x.shape}")
        keep = score_keep(x, float(arg))
        dropped = x[~keep]
        fill = np.float32(dropped.max() if dropped.size else 0.0)
        data, aux = _base_encode(x[keep], base, -1)
        aux = fill.tobytes() + (aux or b"")
        return {"codec": codec, "shape": list(x.shape), "data": data, "aux": aux,
                "index": np.packbits(keep).tobytes()}
    if name == "region":
        if x.ndim != 3 or mask is None or mask.shape != x.shape[1:]:
            raise ValueError(f"region needs [C, H, W] and a mask [H, W], got {x.shape} and "
                             f"{None if mask is None else mask.shape}")
        kept = x[:, mask]  # [C, n]
        data, aux = _base_encode(kept, base, 0)
        return {"codec": codec, "shape": list(x.shape), "data": data, "aux": aux,
                "index": np.packbits(mask.ravel()).tobytes()}
    if name == "rows":
        if x.ndim != 2 or mask is None or mask.shape != x.shape[:1]:
            raise ValueError(f"rows needs [R, D] and a mask [R], got {x.shape} and "
                             f"{None if mask is None else mask.shape}")
        mask = mask.astype(bool)
        data, aux = _base_encode(x[mask], base, -1)  # int8: scales over the kept rows only
        return {"codec": codec, "shape": list(x.shape), "data": data,
                "aux": np.float32(fill).tobytes() + (aux or b""), "index": np.packbits(mask).tobytes()}
    raise ValueError(f"unknown codec modifier {mod!r}")


def decode(cell: dict[str, Any], what: str = "cell") -> np.ndarray:
    """Inverse of `encode` (within the codec's stated error). Raises DataError on a damaged cell."""
    codec, shape = cell["codec"], [int(s) for s in cell["shape"]]
    base, _, mod = codec.partition("|")
    data, aux, index = cell["data"], cell["aux"], cell["index"]
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1, "i64": 8}[base]
    if not mod:
        _check_size(what, len(data), itemsize * math.prod(shape))
        return _base_decode(data, aux, base, shape, _channel_axis(len(shape)))
    name, _, arg = mod.partition("=")
    if name == "topk":
        r, k_all = shape
        k = int(arg)
        _check_size(what, len(data), itemsize * r * k)
        _check_size(what + " (index)", len(index), 2 * r * k)
        vals = _base_decode(data, None, base, (r, k), -1)
        idx = np.frombuffer(index, np.uint16).reshape(r, k).astype(np.int64)
        fill = np.frombuffer(aux, np.float32)
        out = np.repeat(fill[:, None], k_all, axis=1)
        np.put_along_axis(out, idx, vals, axis=1)
        return out
    if name == "thresh":
        r, k_all = shape
        keep = np.unpackbits(np.frombuffer(index, np.uint8), count=r).astype(bool)
        n = int(keep.sum())
        _check_size(what, len(data), itemsize * n * k_all)
        fill = np.frombuffer(aux[:4], np.float32)[0]
        out = np.full((r, k_all), fill, np.float32)
        out[keep] = _base_decode(data, aux[4:], base, (n, k_all), -1)
        return out
    if name == "region":
        c, h, w = shape
        mask = np.unpackbits(np.frombuffer(index, np.uint8), count=h * w).astype(bool).reshape(h, w)
        n = int(mask.sum())
        _check_size(what, len(data), itemsize * c * n)
        out = np.zeros((c, h, w), np.float32)
        out[:, mask] = _base_decode(data, aux, base, (c, n), 0)
        return out
    if name == "rows":
        r, d = shape
        _check_size(what + " (index)", len(index), (r + 7) // 8)
        keep = np.unpackbits(np.frombuffer(index, np.uint8), count=r).astype(bool)
        n = int(keep.sum())
        _check_size(what, len(data), itemsize * n * d)
        out = np.full((r, d), np.frombuffer(aux[:4], np.float32)[0], np.float32)
        out[keep] = _base_decode(data, aux[4:], base, (n, d), -1)
        return out
    raise DataError(f"cache cell {what}: unknown codec {codec!r} (written by a newer version?)")


_CELL = pa.struct([
    ("codec", pa.string()), ("shape", pa.list_(pa.int32())), ("data", pa.large_binary()),
    ("aux", pa.binary()), ("index", pa.large_binary()),
])
_VIEW = pa.struct([("orig_h", pa.int32()), ("orig_w", pa.int32()), ("out_h", pa.int32()), ("out_w", pa.int32()),
                   ("flip", pa.bool_())])


# ================================================================================================ teacher outputs


@torch.no_grad()
def teacher_outputs(
    detector: Any, images: Sequence[torch.Tensor], targets: Sequence[str], levels: Sequence[str] | None = None,
    keep: dict[str, Any] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run the teacher once on a batch; per image a dict ``column name -> float32/int64 numpy``.

    The single place teacher outputs are turned into cache columns: the precompute actors, the serving actors
    and the inline reference all call it, so the three agree by construction (up to the codec).
    `keep`: when given, receives the full FPN ``features`` and ``image_sizes`` (the inline teacher binds its
    RoI scorer to them).
    """
    want = set()
    if keep is not None:
        want.add("features")
    if "features" in targets:
        want.add("features")
    if "head" in targets or "proposals" in targets:
        want.add("head")
    if "detections" in targets:
        want.add("detections")
    device = next(detector.parameters()).device
    imgs = [im.to(device, non_blocking=True) for im in images]
    if device.type == "cuda":
        with torch.autocast("cuda"):
            out = detector(imgs, want=tuple(sorted(want)))
    else:
        out = detector(imgs, want=tuple(sorted(want)))
    n = len(images)
    rows: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    if keep is not None:
        keep["features"], keep["image_sizes"] = out.features, out.image_sizes

    def put(name: str, t: torch.Tensor, i: int) -> None:
        a = t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
        rows[i][name] = a

    if "features" in targets:
        chosen = list(out.features) if levels is None else list(levels)
        missing = [l for l in chosen if l not in out.features]
        if missing:
            raise CacheError(f"{detector.config.name} has no FPN level(s) {missing}; it has {list(out.features)}")
        for lvl in chosen:
            for i in range(n):
                put(f"features/{lvl}", out.features[lvl][i], i)
    if "head" in targets:
        names = (("objectness", "rpn_deltas") if detector.kind == "two_stage"
                 else tuple(k for k in ("cls_logits", "bbox_regression", "bbox_ctrness") if k in out.head))
        for name in names:
            for l, t in enumerate(out.head[name]):
                for i in range(n):
                    put(f"head/{name}/{l}", t[i], i)
    if "detections" in targets:
        for i, d in enumerate(out.detections):
            put("detections/boxes", d["boxes"], i)
            put("detections/scores", d["scores"], i)
            put("detections/labels", d["labels"].to(torch.int64), i)
    if "proposals" in targets:
        if detector.kind != "two_stage":
            raise CacheError(f"target 'proposals' needs a two-stage teacher; {detector.config.name} is one-stage")
        counts = [len(p) for p in out.head["proposals"]]
        cls = out.head["class_logits"].split(counts)
        reg = out.head["box_regression"].split(counts)
        for i in range(n):
            put("proposals/boxes", out.head["proposals"][i], i)
            put("proposals/class_logits", cls[i], i)
            put("proposals/box_regression", reg[i], i)
    for i, row in enumerate(rows):
        for name, a in row.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise DataError(f"teacher {detector.config.name} output {name} is not finite for batch position "
                                f"{i}: nothing is cached for it (a half-precision teacher overflowing?)")
    return rows


def region_mask(boxes: np.ndarray, hw: tuple[int, int], image_hw: tuple[int, int], dilation: float) -> np.ndarray:
    """Feature cells [H, W] inside any box dilated by `dilation` of its size per side plus one cell."""
    h, w = hw
    sy, sx = image_hw[0] / h, image_hw[1] / w
    mask = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        bw, bh = x2 - x1, y2 - y1
        x1, x2 = x1 - dilation * bw - sx, x2 + dilation * bw + sx
        y1, y2 = y1 - dilation * bh - sy, y2 + dilation * bh + sy
        c1, c2 = max(0, int(math.floor(x1 / sx))), min(w, int(math.ceil(x2 / sx)))
        r1, r2 = max(0, int(math.floor(y1 / sy))), min(h, int(math.ceil(y2 / sy)))
        mask[r1:r2, c1:c2] = True
    return mask


def encode_row(
    raw: dict[str, np.ndarray], comp: CompressionConfig, boxes: np.ndarray | None = None,
    image_hw: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Encode one (image, view)'s teacher outputs with the configured compression."""
    cells: dict[str, dict[str, Any]] = {}
    for name, a in raw.items():
        if name.startswith("detections/") or name == "proposals/boxes":
            cells[name] = encode(a, "i64" if a.dtype.kind in "iu" else "fp32")
        elif name.startswith("features/"):
            if comp.features_region == "pooled" and comp.pool > 1:
                t = torch.from_numpy(a)[None]
                a = torch.nn.functional.avg_pool2d(t, comp.pool, comp.pool, ceil_mode=True)[0].numpy()
                cells[name] = encode(a, comp.dtype)  # a pooled map decodes at its pooled size
            elif comp.features_region == "boxes":
                if boxes is None or image_hw is None:
                    raise ValueError("features_region=boxes needs the view's boxes")
                m = region_mask(boxes, a.shape[1:], image_hw, comp.box_dilation)
                cells[name] = encode(a, f"{comp.dtype}|region", mask=m)
            else:
                cells[name] = encode(a, comp.dtype)
        elif name.startswith("head/cls_logits/") and comp.logits != "dense":
            mod = f"topk={comp.topk}" if comp.logits == "topk" else f"thresh={comp.score_threshold!r}"
            cells[name] = encode(a, f"{comp.dtype}|{mod}")
        elif name == "proposals/class_logits" and comp.logits == "topk":
            cells[name] = encode(a, f"{comp.dtype}|topk={comp.topk}")
        elif getattr(comp, "boxes", "dense") == "sparse" and name.split("/")[:2] in (
                ["head", "bbox_regression"], ["head", "bbox_ctrness"]):
            cells[name] = _encode_sparse_box(name, a, raw, comp)
        else:
            cells[name] = encode(a, comp.dtype)
    return cells


def _encode_sparse_box(name: str, a: np.ndarray, raw: dict[str, np.ndarray], comp: CompressionConfig
                       ) -> dict[str, Any]:
    """``boxes: sparse``: a level's box regression (or FCOS centerness) kept at the rows where the same level's
    best class score is >= score_threshold. Fill: 0 for regression (no offset from the anchor / location);
    for centerness the mean of the dropped logits, a better stand-in for distillation than a fixed value."""
    level = name.rsplit("/", 1)[1]
    cls = raw.get(f"head/cls_logits/{level}")
    if cls is None or cls.shape[0] != a.shape[0]:
        raise ValueError(f"compression.boxes=sparse: {name} {a.shape} needs head/cls_logits/{level} with as many rows "
                         f"(got {None if cls is None else cls.shape}); use boxes: dense for this teacher")
    keep = score_keep(cls, comp.score_threshold)
    fill = 0.0
    if name.startswith("head/bbox_ctrness/") and (~keep).any():
        fill = float(a[~keep].mean(dtype=np.float64))
    return encode(a, f"{comp.dtype}|rows", mask=keep, fill=fill)


def decode_row(cells: dict[str, dict[str, Any]], where: str = "") -> dict[str, np.ndarray]:
    return {name: decode(c, f"{name}{where}") for name, c in cells.items()}


def _stack(arrs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)) if arrs else torch.empty(0)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Owned, writable tensor (arrays from Ray's object store are read-only views of shared memory)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def collate_targets(
    raws: Sequence[dict[str, np.ndarray]], image_ids: Sequence[int], roi_scorer: Any = None,
) -> Any:
    """Per-image teacher outputs (decoded rows) -> one `TeacherTargets` for the batch, in batch order."""
    from trainers.distill.targets import TeacherTargets

    if not raws:
        return TeacherTargets(image_ids=list(image_ids))
    names = list(raws[0])
    for i, r in enumerate(raws):
        if list(r) != names:
            raise DataError(f"teacher targets of image_id {image_ids[i]} have columns {sorted(r)}, the batch's first "
                            f"image {sorted(names)}: mixed caches in one batch")
    kw: dict[str, Any] = {"image_ids": [int(i) for i in image_ids]}
    feats = {n.split("/", 1)[1]: _stack([r[n] for r in raws]) for n in names if n.startswith("features/")}
    if feats:
        kw["features"] = feats
    per_level: dict[str, dict[int, torch.Tensor]] = {}
    for n in names:
        if n.startswith("head/"):
            _, field_, lvl = n.split("/")
            per_level.setdefault(field_, {})[int(lvl)] = _stack([r[n] for r in raws])
    for field_, levels in per_level.items():
        kw[field_] = [levels[l] for l in sorted(levels)]
    if "detections/boxes" in names:
        kw["detections"] = [{"boxes": _tensor(r["detections/boxes"]).reshape(-1, 4),
                             "scores": _tensor(r["detections/scores"]),
                             "labels": _tensor(r["detections/labels"])} for r in raws]
    if "proposals/class_logits" in names:
        kw["roi_class_logits"] = torch.from_numpy(np.concatenate([r["proposals/class_logits"] for r in raws]))
        kw["roi_box_regression"] = torch.from_numpy(np.concatenate([r["proposals/box_regression"] for r in raws]))
        kw["roi_counts"] = [len(r["proposals/boxes"]) for r in raws]
    return TeacherTargets(**kw, roi_scorer=roi_scorer)


def proposals_of(raws: Sequence[dict[str, np.ndarray]]) -> list[torch.Tensor] | None:
    """The teacher's proposals per image (the boxes `roi_class_logits` rows belong to), or None."""
    if not raws or "proposals/boxes" not in raws[0]:
        return None
    return [_tensor(r["proposals/boxes"]).reshape(-1, 4) for r in raws]


# ================================================================================================ shards


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """Shard i holds data-set positions [i*S, min((i+1)*S, N)): fixed by the image list alone."""
    return [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]


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
        view = View(view.orig_h, view.orig_w, view.out_h, view.out_w, True)
        image = torch.flip(image, dims=(-1,))
        if len(boxes):
            boxes = np.stack([view.out_w - boxes[:, 2], boxes[:, 1], view.out_w - boxes[:, 0], boxes[:, 3]], axis=1)
    return image, boxes, int(target["image_id"]), view


def open_dataset(images: str, ann: str, image_size: int | tuple[int, int], on_bad_box: str = "clip") -> CocoDetection:
    """The data set a cache is computed on: no random flip (views are explicit)."""
    return CocoDetection(images, ann, image_size, flip="none", on_bad_box=on_bad_box)


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
    # made the forward wait (py-spy on the actor: a forward running 92% of the time at one ahead, 99.6% at two).
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
                                    "boxes": boxes, "hw": (view.out_h, view.out_w), "raw": raw}
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


def encode_shard(raw_rows: list[dict[str, Any]], spec: dict[str, Any]) -> pa.Table:
    """The Arrow table of `produce_shard`'s raw rows (what the precompute actor's I/O process runs)."""
    comp = CompressionConfig(**spec["compression"])
    return rows_to_table([{"image_id": r["image_id"], "view_key": r["view_key"], "view": r["view"],
                           **encode_row(r["raw"], comp, r["boxes"], r["hw"])} for r in raw_rows])


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    if not rows:
        raise CacheError("a shard needs at least one row")
    names = [k for k in rows[0] if k not in ("image_id", "view_key", "view")]
    cols = {
        "image_id": pa.array([r["image_id"] for r in rows], pa.int64()),
        "view_key": pa.array([r["view_key"] for r in rows], pa.string()),
        "view": pa.array([r["view"] for r in rows], _VIEW),
    }
    for n in names:
        cells = [r[n] for r in rows]
        # Column by column, not pa.array(list of dicts): Arrow's nested-dict conversion is ~10x slower.
        cols[n] = pa.StructArray.from_arrays(
            [pa.array([c["codec"] for c in cells], pa.string()),
             pa.array([c["shape"] for c in cells], pa.list_(pa.int32())),
             pa.array([c["data"] for c in cells], pa.large_binary()),
             pa.array([c["aux"] for c in cells], pa.binary()),
             pa.array([c["index"] for c in cells], pa.large_binary())],
            fields=list(_CELL),
        )
    return pa.table(cols)


def table_to_bytes(table: pa.Table, meta: dict[str, Any]) -> bytes:
    """Parquet bytes (zstd) with the cache key in the schema metadata, so a stray shard is recognised."""
    table = table.replace_schema_metadata({"curriculum.cache": json.dumps(meta, sort_keys=True)})
    buf = io.BytesIO()
    # One row group per few rows: a reader touching one image reads little. Dictionary encoding is useless
    # on tensor bytes.
    pq.write_table(table, buf, compression="zstd", compression_level=_ZSTD_LEVEL, use_dictionary=["view_key"],
                   row_group_size=16, write_statistics=["image_id"])
    return buf.getvalue()


def column_bytes(data: bytes) -> dict[str, int]:
    """Compressed bytes per target kind (features, head, ...) from a Parquet file's footer."""
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    out: dict[str, int] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            top = col.path_in_schema.split(".", 1)[0]
            kind = top.split("/", 1)[0] if "/" in top else "index"
            out[kind] = out.get(kind, 0) + int(col.total_compressed_size)
    return out


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


# ================================================================================================ the cache


class TeacherCache:
    """One cache folder: its manifest, its shards, fingerprint checks and atomic shard commits."""

    def __init__(self, fs: pafs.FileSystem, path: str, manifest: dict[str, Any], uri: str | None = None) -> None:
        self.fs = fs
        self.path = path
        self.manifest = manifest
        self.uri = uri or path
        self._last_manifest_write = 0.0

    # ---- opening / creating ------------------------------------------------------------------------

    @staticmethod
    def location(root: str, key: CacheKey) -> tuple[pafs.FileSystem, str, str]:
        """(filesystem, path inside it, URI or local path to show and reopen) of `key`'s cache under `root`."""
        fs, base = resolve_fs(root)
        path = posixpath.join(base, key.relpath())
        return fs, path, (root.rstrip("/") + "/" + key.relpath()) if "://" in root else path

    @classmethod
    def open(cls, path: str) -> TeacherCache:
        """Open an existing cache folder (a local path or URI) from its manifest."""
        fs, p = resolve_fs(path)
        mpath = posixpath.join(p, "manifest.json")
        if not _exists(fs, mpath):
            raise CacheError(f"{path}: no cache here (manifest.json missing); run `curriculum precompute` first")
        try:
            manifest = json.loads(_read_bytes(fs, mpath))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{mpath}: manifest is not valid JSON ({e}); delete the cache folder and precompute "
                             "again") from None
        if manifest.get("format") != SCHEMA:
            raise CacheError(f"{mpath}: format {manifest.get('format')!r}, this version reads {SCHEMA!r}; "
                             "precompute the cache again")
        return cls(fs, p, manifest, uri=path)

    @classmethod
    def open_for(cls, root: str, key: CacheKey) -> TeacherCache:
        """The cache of `key` under `root`. When only caches of other fingerprints exist for this teacher name,
        raises StaleCacheError saying what changed; never falls back to them."""
        fs, path, uri = cls.location(root, key)
        if _exists(fs, path + "/manifest.json"):
            cache = cls.open(uri)
            cache.check_key(key)
            return cache
        raise cls._explain_missing(root, key)

    @staticmethod
    def _explain_missing(root: str, key: CacheKey) -> CacheError:
        fs, base = resolve_fs(root)
        found: list[dict[str, Any]] = []
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        except OSError:
            infos = []
        for info in infos:
            if info.type != pafs.FileType.Directory or not info.base_name.startswith(key.teacher + "-"):
                continue
            for sub in fs.get_file_info(pafs.FileSelector(info.path, recursive=False, allow_not_found=True)):
                m = sub.path + "/manifest.json"
                if _exists(fs, m):
                    try:
                        found.append(json.loads(_read_bytes(fs, m))["key"])
                    except Exception:  # a damaged neighbour says nothing about staleness
                        continue
        if not found:
            return CacheError(f"no teacher cache for {key.teacher} under {root}; run `curriculum precompute`")
        reasons = set()
        for k in found:
            if k["teacher_fp"] != key.teacher_fp:
                reasons.add(f"the teacher checkpoint changed (cache {k['teacher_fp']}, checkpoint now {key.teacher_fp})")
            if k["data_fp"] != key.data_fp:
                reasons.add(f"the data changed (cache {k['data_fp']}, annotations/image list now {key.data_fp})")
            if k["views"] != key.views:
                reasons.add(f"the view config differs (cache {k['views']}, asked {key.views})")
            if k["spec"] != key.spec:
                reasons.add(f"the targets/compression differ (cache {k['spec']}, asked {key.spec})")
        return StaleCacheError(
            f"the teacher cache of {key.teacher} under {root} is stale: {'; '.join(sorted(reasons))}. It is not used; "
            "run `curriculum precompute` again"
        )

    def check_key(self, key: CacheKey) -> None:
        """StaleCacheError unless this cache was written for exactly `key`."""
        have = self.manifest["key"]
        want = key.to_dict()
        diffs = [f"{k}: cache {have.get(k)!r}, live {want[k]!r}" for k in want if k != "teacher" and have.get(k) != want[k]]
        if diffs:
            raise StaleCacheError(f"teacher cache {self.uri} is stale ({'; '.join(diffs)}); it is not used: run "
                                  "`curriculum precompute` again")

    @classmethod
    def create_or_resume(cls, root: str, key: CacheKey, header: dict[str, Any], image_ids: Sequence[int],
                         shard_size: int) -> TeacherCache:
        """Open the cache of `key` to resume it, or create it (manifest, images.json) when absent."""
        fs, path, uri = cls.location(root, key)
        if _exists(fs, path + "/manifest.json"):
            cache = cls.open(uri)
            cache.check_key(key)
            if cache.manifest["shard_size"] != shard_size:
                raise CacheError(f"{uri}: written with shard_size {cache.manifest['shard_size']}, asked {shard_size}; "
                                 "keep the shard size to resume, or delete the folder")
            if cache.image_ids() != [int(i) for i in image_ids]:
                raise StaleCacheError(f"{uri}: its image list differs from the data set's; delete it and precompute")
            return cache
        fs.create_dir(path + "/shards", recursive=True)
        _atomic_write(fs, path + "/images.json", json.dumps([int(i) for i in image_ids]).encode())
        n = len(shard_ranges(len(image_ids), shard_size))
        manifest = {"format": SCHEMA, "key": key.to_dict(), **header, "shard_size": shard_size,
                    "num_images": len(image_ids), "num_shards": n, "shards": {}, "complete": False,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache = cls(fs, path, manifest, uri)
        cache.write_manifest(force=True)
        return cache

    # ---- manifest -------------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def write_manifest(self, force: bool = False, min_interval_s: float = 1.0) -> None:
        """Atomic rewrite. Throttled: a shard committed but not yet listed is adopted on resume (`adopt`)."""
        now = time.monotonic()
        if not force and now - self._last_manifest_write < min_interval_s:
            return
        done = self.manifest["shards"]
        self.manifest["complete"] = len(done) == self.manifest["num_shards"]
        _atomic_write(self.fs, self._p("manifest.json"), json.dumps(self.manifest, indent=1, sort_keys=True).encode())
        self._last_manifest_write = now

    def image_ids(self) -> list[int]:
        return json.loads(_read_bytes(self.fs, self._p("images.json")))

    @property
    def complete(self) -> bool:
        return len(self.manifest["shards"]) == self.manifest["num_shards"]

    def shard_path(self, i: int) -> str:
        return self._p("shards", shard_name(i))

    def shard_meta(self, i: int) -> dict[str, Any]:
        return {"schema": SCHEMA, "key": self.manifest["key"], "shard": i}

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.manifest["num_shards"]) if f"{i:05d}" not in self.manifest["shards"]]

    # ---- writing ----------------------------------------------------------------------------------------

    def write_tmp(self, i: int, data: bytes) -> str:
        """Write a shard's bytes under a unique temporary name (one per attempt); `commit` renames it."""
        tmp = self._p("shards", f".{shard_name(i)}.tmp-{uuid.uuid4().hex[:12]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        return tmp

    def commit(self, i: int, tmp: str, entry: dict[str, Any]) -> None:
        """Rename a finished temporary shard into place and list it in the manifest. Only the driver commits,
        once per shard: a shard redone after an actor died is never written twice."""
        key = f"{i:05d}"
        if key in self.manifest["shards"]:
            raise CacheError(f"{self.uri}: shard {i} committed twice (driver bug)")
        self.fs.move(tmp, self.shard_path(i))
        self.manifest["shards"][key] = entry
        self.write_manifest(force=self.complete)

    def adopt_orphans(self) -> list[int]:
        """Shards renamed into place whose manifest entry was not written yet (driver killed in between):
        checked (key, rows, readable) and listed; unreadable ones are deleted and will be recomputed."""
        adopted = []
        ranges = shard_ranges(self.manifest["num_images"], self.manifest["shard_size"])
        for i in self.missing_shards():
            p = self.shard_path(i)
            if not _exists(self.fs, p):
                continue
            try:
                data = _read_bytes(self.fs, p)
                pf = pq.ParquetFile(pa.BufferReader(data))
                meta = json.loads(pf.schema_arrow.metadata[b"curriculum.cache"])
                rows = pf.metadata.num_rows
                want_rows = (ranges[i][1] - ranges[i][0]) * len(self.manifest["key"]["views"]["views"])
                if meta != self.shard_meta(i) or rows != want_rows:
                    raise ValueError("not this cache's shard")
            except Exception as e:  # any damage: recompute
                log.warning("%s: dropping unlisted shard %d (%s); it will be recomputed", self.uri, i, e)
                self.fs.delete_file(p)
                continue
            self.manifest["shards"][f"{i:05d}"] = shard_entry(i, data, rows, ranges[i])
            adopted.append(i)
        if adopted:
            self.write_manifest(force=True)
        return adopted

    def drop_bad_listed(self) -> list[int]:
        """Listed shards whose file is missing or of the wrong size: unlisted so a resume recomputes them."""
        bad = []
        for key, entry in list(self.manifest["shards"].items()):
            info = self.fs.get_file_info(self.shard_path(int(key)))
            if info.type == pafs.FileType.NotFound or info.size != entry["bytes"]:
                del self.manifest["shards"][key]
                bad.append(int(key))
        if bad:
            self.write_manifest(force=True)
        return bad

    def remove_tmp(self) -> int:
        n = 0
        for info in self.fs.get_file_info(pafs.FileSelector(self._p("shards"), allow_not_found=True)):
            if ".tmp-" in info.base_name:
                self.fs.delete_file(info.path)
                n += 1
        return n

    def invalidate(self, i: int) -> None:
        """Unlist shard i and delete its file: the next `precompute` (or `rebuild`) recomputes it alone."""
        self.manifest["shards"].pop(f"{i:05d}", None)
        if _exists(self.fs, self.shard_path(i)):
            self.fs.delete_file(self.shard_path(i))
        self.write_manifest(force=True)

    # ---- reading ----------------------------------------------------------------------------------------

    def read_shard(self, i: int, check_sha: bool = True) -> pa.Table:
        """A shard's table, checked against its manifest entry; CorruptShardError naming it otherwise."""
        key = f"{i:05d}"
        p = self.shard_path(i)
        entry = self.manifest["shards"].get(key)
        if entry is None:
            raise CacheError(f"{self.uri}: shard {i} ({shard_name(i)}) is not complete; run `curriculum precompute` "
                             "to finish the cache")
        hint = f"rebuild it with `curriculum cache rebuild {self.uri} --shard {i}`"
        try:
            data = _read_bytes(self.fs, p)
        except (FileNotFoundError, OSError) as e:
            raise CorruptShardError(f"{p}: shard {i} of the cache cannot be read ({e}); {hint}", i, p) from None
        if len(data) != entry["bytes"]:
            raise CorruptShardError(f"{p}: shard {i} is {len(data)} bytes, the manifest says {entry['bytes']} "
                                    f"(truncated or overwritten); {hint}", i, p)
        if check_sha and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptShardError(f"{p}: shard {i} does not match its checksum (corrupt); {hint}", i, p)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise CorruptShardError(f"{p}: shard {i} is not a readable Parquet file ({e}); {hint}", i, p) from None
        meta = json.loads((table.schema.metadata or {}).get(b"curriculum.cache", b"{}"))
        if meta != self.shard_meta(i):
            raise CorruptShardError(f"{p}: shard {i} belongs to another cache or position ({meta.get('key')}, "
                                    f"shard {meta.get('shard')}); {hint}", i, p)
        return table

    def require_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise CacheError(f"{self.uri}: {len(missing)} of {self.manifest['num_shards']} shards are not complete "
                             f"(first: {missing[:5]}); run `curriculum precompute` again to finish it")


def shard_entry(i: int, data: bytes, rows: int, image_range: tuple[int, int], **extra: Any) -> dict[str, Any]:
    return {"file": shard_name(i), "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "images": list(image_range), "kind_bytes": column_bytes(data), **extra}


# ================================================================================================ reader


def _cells_of(table: pa.Table, row: int, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: table.column(n)[row].as_py() for n in names}


class _RowTargets:
    """What the two readers share: the (image, view) -> row lookup and its errors, `targets`, `targets_for`,
    `proposals` and the RoI scorer, all over `rows`. A trainer may hold either reader."""

    uri: str
    roi_head: Any = None
    _pos: dict[int, int]
    _shard_size: int

    @property
    def manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    def image_ids(self) -> list[int]:
        """The cache's image ids in data-set order (shard i holds positions [i*S, (i+1)*S))."""
        raise NotImplementedError

    def rows(self, image_ids: Sequence[int], views: Sequence[View | str]) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    @property
    def view_keys(self) -> list[str]:
        v = self.manifest["key"]["views"]
        return [View(1, 1, v["out_h"], v["out_w"], VIEW_FLIPS[n]).key() for n in v["views"]]

    def _shard_of(self, iid: int) -> int:
        if iid not in self._pos:
            raise DataError(f"image_id {iid} is not in teacher cache {self.uri} (it holds "
                            f"{len(self._pos)} images of another split or data set?)")
        return self._pos[iid] // self._shard_size

    def _row_of(self, index: dict[tuple[int, str], int], iid: int, view: View | str, stored_view: Any) -> int:
        """The row of (image, view) in a shard's `index`; `stored_view(row)` gives the View dict cached there."""
        key = view.key() if isinstance(view, View) else str(view)
        row = index.get((iid, key))
        if row is None:
            raise CacheError(f"teacher cache {self.uri} has no view {key} of image_id {iid} (it holds "
                             f"{self.view_keys}); cache that view (cache.views) or serve the teacher online")
        if isinstance(view, View):
            vd = stored_view(row)
            if vd != view.to_dict():
                raise StaleCacheError(f"teacher cache {self.uri}: image_id {iid} was cached for view {vd}, the "
                                      f"sample has {view.to_dict()}; precompute again")
        return row

    def targets(self, image_ids: Sequence[int], views: Sequence[View | str]) -> Any:
        """`TeacherTargets` of a batch, rows in batch order, `image_ids` set (checked by the losses' callers)."""
        raws = self.rows(image_ids, views)
        scorer = self._scorer(raws, views) if self.roi_head is not None else None
        return collate_targets(raws, image_ids, roi_scorer=scorer)

    def targets_for(self, batch_targets: Sequence[dict[str, Any]]) -> Any:
        """`targets` for a collated batch's target dicts (`image_id`, `view`)."""
        return self.targets([t["image_id"] for t in batch_targets], [t["view"] for t in batch_targets])

    def proposals(self, image_ids: Sequence[int], views: Sequence[View | str]) -> list[torch.Tensor] | None:
        return proposals_of(self.rows(image_ids, views))

    def _scorer(self, raws, views):
        det = self.roi_head
        levels = list(getattr(det.model.roi_heads.box_roi_pool, "featmap_names", []))
        have = [n.split("/", 1)[1] for n in raws[0] if n.startswith("features/")]
        comp = self.manifest["key"]["spec"]["compression"]
        if det.kind != "two_stage" or any(l not in have for l in levels) or comp["features_region"] == "pooled":
            return None
        feats = OrderedDict((l, torch.from_numpy(np.stack([r[f"features/{l}"] for r in raws]))) for l in have)
        sizes = []
        for v in views:
            vv = v if isinstance(v, View) else None
            sizes.append((vv.out_h, vv.out_w) if vv else (self.manifest["key"]["views"]["out_h"],
                                                          self.manifest["key"]["views"]["out_w"]))
        return lambda boxes: det.score_boxes(feats, list(boxes), sizes)


class CacheReader(_RowTargets):
    """Serves `TeacherTargets` for a student's batch from a complete cache.

    Decoded shards are kept in an LRU bounded by `memory_bytes` (Arrow bytes of the shard tables), so a cache
    bigger than memory is streamed shard by shard. The student's sample picks its row by ``(image_id,
    View.key())``; a view the cache does not hold is an error (use serving mode for random augmentation).
    `roi_head`: the teacher detector; with cached features of every RoI level it gives `roi_scorer`.
    `ObjectStoreReader` has the same interface and serves the same rows from Ray's object store.
    """

    def __init__(self, cache: TeacherCache | str, memory_bytes: int = 1 << 30, check_sha: bool = True,
                 roi_head: Any = None) -> None:
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        self.cache.require_complete()
        self.uri = self.cache.uri
        m = self.cache.manifest
        self.memory_bytes = memory_bytes
        self.check_sha = check_sha
        self.roi_head = roi_head
        self._ids = [int(i) for i in self.cache.image_ids()]
        self._pos = {iid: p for p, iid in enumerate(self._ids)}
        self._shard_size = m["shard_size"]
        self._lru: OrderedDict[int, tuple[pa.Table, dict[tuple[int, str], int]]] = OrderedDict()
        self._lru_bytes = 0

    @property
    def manifest(self) -> dict[str, Any]:
        return self.cache.manifest

    def image_ids(self) -> list[int]:
        return list(self._ids)

    def _shard(self, i: int) -> tuple[pa.Table, dict[tuple[int, str], int]]:
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        table = self.cache.read_shard(i, self.check_sha)
        index = {(int(a), b): r for r, (a, b) in enumerate(zip(table.column("image_id").to_pylist(),
                                                               table.column("view_key").to_pylist()))}
        self._lru[i] = (table, index)
        self._lru_bytes += table.nbytes
        while self._lru_bytes > self.memory_bytes and len(self._lru) > 1:
            _, (old, _) = self._lru.popitem(last=False)
            self._lru_bytes -= old.nbytes
        return table, index

    def rows(self, image_ids: Sequence[int], views: Sequence[View | str]) -> list[dict[str, np.ndarray]]:
        """Decoded rows (column -> numpy) of each (image, view), in the given order."""
        out = []
        for iid, view in zip(image_ids, views, strict=True):
            iid = int(iid)
            shard = self._shard_of(iid)
            table, index = self._shard(shard)
            row = self._row_of(index, iid, view, lambda r: table.column("view")[r].as_py())
            names = [n for n in table.column_names if "/" in n]
            where = f" of image_id {iid} in shard {shard} ({self.cache.shard_path(shard)})"
            try:
                out.append(decode_row(_cells_of(table, row, names), where))
            except (DataError, ValueError) as e:
                raise CorruptShardError(f"{e}; rebuild it with `curriculum cache rebuild {self.cache.uri} --shard "
                                        f"{shard}`", shard, self.cache.shard_path(shard)) from None
        return out


# ================================================================================================ object store


def decode_shard(cache: TeacherCache, i: int, check_sha: bool = True) -> dict[str, Any]:
    """Every row of shard i decoded: ``{"index": {(image_id, view_key): row}, "views": [View dict per row],
    "rows": [{column: float32/int64 numpy}], "nbytes": decoded array bytes}`` (what `ObjectStoreShards` puts
    into the object store)."""
    table = cache.read_shard(i, check_sha)
    names = [n for n in table.column_names if "/" in n]
    cols = {n: table.column(n).to_pylist() for n in names}  # one conversion per column, not per cell
    ids = [int(a) for a in table.column("image_id").to_pylist()]
    keys = table.column("view_key").to_pylist()
    rows = []
    for r in range(table.num_rows):
        where = f" of image_id {ids[r]} in shard {i} ({cache.shard_path(i)})"
        try:
            rows.append(decode_row({n: cols[n][r] for n in names}, where))
        except (DataError, ValueError) as e:
            raise CorruptShardError(f"{e}; rebuild it with `curriculum cache rebuild {cache.uri} --shard {i}`", i,
                                    cache.shard_path(i)) from None
    return {"index": {(a, b): r for r, (a, b) in enumerate(zip(ids, keys))},
            "views": table.column("view").to_pylist(), "rows": rows,
            "nbytes": sum(a.nbytes for row in rows for a in row.values())}


STORE_NAMESPACE = "curriculum"


class _ShardStoreActor:
    """The owner of the decoded shards in Ray's object store (see `ObjectStoreShards`).

    It decodes a shard when first asked, `ray.put`s it and hands out the reference; as the caller of `ray.put`
    it owns the object, so the object lives as long as this actor (and no longer: RAY_NOTES). LRU by shard:
    before a new shard goes in, the least recently asked ones are dropped until it fits the budget, so the
    shards it holds never exceed ``max(budget, one shard)``. A dropped shard stays readable by a reader still
    holding its reference (Ray frees it when the last one lets go) and is decoded again when asked again."""

    def __init__(self, cache_uri: str, budget_bytes: int, check_sha: bool) -> None:
        import threading

        self.cache = TeacherCache.open(cache_uri)
        self.cache.require_complete()
        self.budget = int(budget_bytes)
        self.check_sha = check_sha
        self._lock = threading.Lock()
        self._lru: OrderedDict[int, tuple[Any, int]] = OrderedDict()  # shard -> (ObjectRef, decoded bytes)
        self._loading: dict[int, Any] = {}  # shard -> threading.Event while one thread decodes it
        self._resident = 0
        self._stats = {"loads": 0, "hits": 0, "evictions": 0, "max_resident_bytes": 0, "max_shard_bytes": 0}

    def info(self) -> dict[str, Any]:
        return {"uri": self.cache.uri, "manifest": self.cache.manifest,
                "image_ids": [int(i) for i in self.cache.image_ids()], "pid": os.getpid()}

    def shard(self, i: int) -> list[Any]:
        """[ObjectRef] of shard i's decoded rows (in a list, so that Ray hands over the reference itself)."""
        import threading

        import ray

        while True:
            with self._lock:
                if i in self._lru:
                    self._lru.move_to_end(i)
                    self._stats["hits"] += 1
                    return [self._lru[i][0]]
                event = self._loading.get(i)
                if event is None:  # this thread decodes it; others asking for it meanwhile wait
                    event = self._loading[i] = threading.Event()
                    break
            event.wait()  # then look again (a failed decode leaves nothing: the next asker tries itself)
        try:
            if not 0 <= i < self.cache.manifest["num_shards"]:
                raise CacheError(f"teacher cache {self.cache.uri}: no shard {i} (it has "
                                 f"{self.cache.manifest['num_shards']})")
            payload = decode_shard(self.cache, i, self.check_sha)  # outside the lock: decodes run in parallel
            nbytes = payload["nbytes"]
            with self._lock:
                # Room first, then the put: what this actor holds never exceeds the budget (a single shard
                # bigger than the whole budget is held alone).
                while self._lru and self._resident + nbytes > self.budget:
                    _, (_, old) = self._lru.popitem(last=False)
                    self._resident -= old
                    self._stats["evictions"] += 1
                ref = ray.put(payload)
                self._lru[i] = (ref, nbytes)
                self._resident += nbytes
                self._stats["loads"] += 1
                self._stats["max_resident_bytes"] = max(self._stats["max_resident_bytes"], self._resident)
                self._stats["max_shard_bytes"] = max(self._stats["max_shard_bytes"], nbytes)
            return [ref]
        finally:
            with self._lock:
                self._loading.pop(i, None)
            event.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "budget_bytes": self.budget, "resident_bytes": self._resident,
                    "resident_shards": list(self._lru)}


class ObjectStoreShards:
    """Hot teacher targets for the training workers through Ray's object store, within a memory budget.

    A small named Ray actor (`_ShardStoreActor`) opens the cache, decodes each shard once when a worker first
    asks for it and `ray.put`s the decoded numpy rows; workers (`ObjectStoreReader`) `ray.get` them zero-copy
    from shared memory (on the actor's node; a worker on another node gets one copy per node). Nobody but the
    actor reads Parquet.

    Owner. The actor is the owner of the objects (the caller of `ray.put`), so it must outlive the readers:
    create this in the driver before the workers start, keep it for the stage, `close()` after. It is not
    detached: if the driver dies, the actor and its objects go with it (nothing leaks); a reader whose store
    is gone gets a CacheError saying so.

    Budget (`budget_bytes`: decoded array bytes, e.g. ``cache.memory_bytes``). The actor holds at most
    ``max(budget_bytes, one shard)``: before a new shard goes in, the least recently used shards' references
    are dropped. A cache bigger than the budget is therefore streamed: a dropped shard is decoded again
    when asked again. On top of that each reader pins the `keep_shards` shard(s) it is reading (default one)
    until it moves on, so the object store holds at most budget + one shard per reader (for budgets above
    one shard). Ray's object store must be big enough for that (``ray.init(object_store_memory=...)``);
    beyond it Ray spills to disk rather than fail.

    `num_cpus`: the actor's CPU reservation (default 0: it only decodes when workers wait for it, and on a
    small machine a reserved CPU would starve the training workers). `max_concurrency`: shards decoded in
    parallel for different workers (a shard asked by two workers at once is decoded once).
    """

    def __init__(self, cache: TeacherCache | str, budget_bytes: int, *, name: str | None = None,
                 namespace: str = STORE_NAMESPACE, num_cpus: float = 0.0, max_concurrency: int = 2,
                 check_sha: bool = True) -> None:
        import ray

        if not ray.is_initialized():
            raise CacheError("ObjectStoreShards needs Ray: call ray.init (or teachers.pool.ensure_ray) first")
        if int(budget_bytes) < 1:
            raise CacheError(f"ObjectStoreShards: budget_bytes must be positive, got {budget_bytes}")
        uri = cache.uri if isinstance(cache, TeacherCache) else str(cache)
        TeacherCache.open(uri).require_complete()  # a missing or incomplete cache fails here, in the driver
        self.uri, self.budget_bytes, self.namespace = uri, int(budget_bytes), namespace
        self.name = name or f"teacher-shards-{uuid.uuid4().hex[:10]}"
        cls = ray.remote(_ShardStoreActor).options(
            name=self.name, namespace=namespace, num_cpus=num_cpus, max_concurrency=max(1, max_concurrency),
            max_restarts=0,  # a restarted owner would not have the objects: readers are told instead
        )
        self.actor = cls.remote(uri, self.budget_bytes, check_sha)
        ray.get(self.actor.info.remote())  # started, cache opened: workers find it by name from now on

    def reader(self, roi_head: Any = None, keep_shards: int = 1) -> ObjectStoreReader:
        """A reader on this store (in the driver; workers build theirs by name: `ObjectStoreReader(name)`)."""
        return ObjectStoreReader(self.name, namespace=self.namespace, roi_head=roi_head, keep_shards=keep_shards)

    def stats(self) -> dict[str, Any]:
        """loads, hits, evictions, resident_bytes, max_resident_bytes, max_shard_bytes, resident_shards."""
        import ray

        return ray.get(self.actor.stats.remote())

    def close(self) -> None:
        """End the actor; its objects are freed (readers still running get a CacheError)."""
        import ray

        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass
            self.actor = None

    def __enter__(self) -> ObjectStoreShards:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ObjectStoreReader(_RowTargets):
    """`CacheReader`'s interface (`rows`, `targets`, `targets_for`, `proposals`, `manifest`, `image_ids`) over
    an `ObjectStoreShards` store, found by its name: what a training worker builds.

    Rows come out as read-only numpy views of Ray's shared memory (zero copy); `collate_targets` copies what
    it stacks, so nothing writes into them. The reader keeps the references of its `keep_shards` most recent
    shards (pinning them in the object store even after the store dropped them) and lets go of older ones.
    """

    def __init__(self, store: str | Any, namespace: str = STORE_NAMESPACE, roi_head: Any = None,
                 keep_shards: int = 1) -> None:
        import ray

        if isinstance(store, str):
            try:
                store = ray.get_actor(store, namespace=namespace)
            except ValueError:
                raise CacheError(f"no teacher shard store named {store!r} in Ray namespace {namespace!r}: the "
                                 "driver must create ObjectStoreShards before the workers start and keep it for "
                                 "the stage") from None
        self.actor = store
        info = self._call(lambda: ray.get(self.actor.info.remote()))
        self.uri = info["uri"]
        self._manifest = info["manifest"]
        self._ids = info["image_ids"]
        self._pos = {iid: p for p, iid in enumerate(self._ids)}
        self._shard_size = self._manifest["shard_size"]
        self.roi_head = roi_head
        self.keep_shards = max(1, keep_shards)
        self._local: OrderedDict[int, tuple[Any, dict[str, Any]]] = OrderedDict()  # shard -> (ref, payload)
        self.fetches = 0

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def image_ids(self) -> list[int]:
        return list(self._ids)

    def _call(self, fn: Any) -> Any:
        """Run a Ray call; the store's own errors (a corrupt shard, ...) come out as themselves, a dead store
        as a CacheError that says what to do."""
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        try:
            return fn()
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, CurriculumError):
                raise cause from None
            raise
        except (RayActorError, ObjectLostError) as e:
            raise CacheError(f"the teacher shard store of {getattr(self, 'uri', 'the cache')} is gone "
                             f"({type(e).__name__}): the driver that owns it ended or closed it before the "
                             "workers finished; keep ObjectStoreShards open for the whole stage") from None

    def _shard(self, i: int) -> dict[str, Any]:
        import ray

        if i in self._local:
            self._local.move_to_end(i)
            return self._local[i][1]
        (ref,) = self._call(lambda: ray.get(self.actor.shard.remote(i)))
        payload = self._call(lambda: ray.get(ref))
        self.fetches += 1
        self._local[i] = (ref, payload)
        while len(self._local) > self.keep_shards:  # let go: Ray frees it once the store dropped it too
            self._local.popitem(last=False)
        return payload

    def rows(self, image_ids: Sequence[int], views: Sequence[View | str]) -> list[dict[str, np.ndarray]]:
        """Decoded rows (column -> read-only numpy) of each (image, view), in the given order."""
        out = []
        for iid, view in zip(image_ids, views, strict=True):
            iid = int(iid)
            payload = self._shard(self._shard_of(iid))
            row = self._row_of(payload["index"], iid, view, lambda r: payload["views"][r])
            out.append(dict(payload["rows"][row]))
        return out


# ================================================================================================ inspect


def inspect_cache(path: str) -> dict[str, Any]:
    """What a cache holds: teacher, data, views, images, completeness, bytes per image per target kind."""
    cache = TeacherCache.open(path)
    m = cache.manifest
    shards = m["shards"]
    rows = sum(e["rows"] for e in shards.values())
    images = sum(e["images"][1] - e["images"][0] for e in shards.values())
    kinds: dict[str, int] = {}
    for e in shards.values():
        for k, b in e["kind_bytes"].items():
            kinds[k] = kinds.get(k, 0) + b
    total = sum(e["bytes"] for e in shards.values())
    per_image = {k: v / max(1, images) for k, v in sorted(kinds.items())}
    return {
        "path": cache.uri, "format": m["format"], "teacher": m.get("teacher"), "data": m.get("data"),
        "views": m["key"]["views"], "targets": m["key"]["spec"]["targets"], "levels": m["key"]["spec"]["levels"],
        "compression": m["key"]["spec"]["compression"], "images": m["num_images"], "images_done": images,
        "rows": rows, "shards": m["num_shards"], "shards_done": len(shards), "complete": cache.complete,
        "bytes": total, "bytes_per_image": total / max(1, images), "bytes_per_image_by_kind": per_image,
    }


def format_inspect(info: dict[str, Any]) -> str:
    t = info.get("teacher") or {}
    lines = [
        f"cache      {info['path']}",
        f"teacher    {t.get('name')} ({t.get('kind')}, fingerprint {t.get('fingerprint')}) from {t.get('checkpoint')}",
        f"data       {(info.get('data') or {}).get('annotations')} (fingerprint {(info.get('data') or {}).get('fingerprint')})",
        f"views      {info['views']['views']} at {info['views']['out_h']}x{info['views']['out_w']}",
        f"targets    {info['targets']}  levels {info['levels'] or 'all'}",
        f"compression {info['compression']}",
        f"images     {info['images_done']}/{info['images']} ({info['rows']} rows), shards {info['shards_done']}/"
        f"{info['shards']}: {'complete' if info['complete'] else 'INCOMPLETE'}",
        f"bytes      {info['bytes'] / 2**20:.2f} MiB, {info['bytes_per_image'] / 1024:.1f} KiB per image (all views)",
    ]
    for k, v in info["bytes_per_image_by_kind"].items():
        lines.append(f"  {k:12s} {v / 1024:10.2f} KiB per image")
    return "\n".join(lines)


def find_caches(root: str) -> list[str]:
    """Every cache folder (one holding a manifest.json) under `root`, `root` itself included."""
    fs, base = resolve_fs(root)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        if info.base_name != "manifest.json":
            continue
        rel = posixpath.dirname(info.path)[len(base.rstrip("/")):].strip("/")
        if "://" in root:
            out.append(root.rstrip("/") + ("/" + rel if rel else ""))
        else:
            out.append(posixpath.join(base, rel) if rel else base)
    if _exists(fs, posixpath.join(base, "manifest.json")):
        out.append(root if "://" in root else base)
    return sorted(set(out))
