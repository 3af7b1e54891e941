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

Each tensor cell is a struct ``{codec, shape, data, aux, index}``: `teachers.codec.encode` / `decode`, which
state the compression settings and their error.

Modules of the cache: this one (key, layout, manifest, shards: `TeacherCache`), `teachers.lock` (one writer at a
time), `teachers.codec` (tensor cells), `teachers.readers` (`CacheReader`, `ObjectStoreShards`), and the writer,
`teachers.precompute`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curriculum.config import CacheConfig
from curriculum.data import CocoDetection, Resize
from curriculum.errors import CacheError, CorruptShardError, StaleCacheError
from curriculum.files import atomic_write, exists, join_uri, path_name, read_bytes, resolve_fs
from teachers.projection import FILE as PROJECTION_FILE, Projection, describe as describe_projection

log = logging.getLogger(__name__)

SCHEMA = "curriculum.teacher_cache/1"
TARGET_KINDS = ("features", "head", "detections", "proposals")
VIEW_FLIPS = {"noflip": False, "flip": True}
_ZSTD_LEVEL = 3


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


def view_config(resize: Resize | int | Sequence[int], views: Sequence[str]) -> dict[str, Any]:
    """The view config of a cache: the resize (fixed ``out_h``/``out_w`` as before keep-ratio views existed, or
    ``resize: keep_ratio`` with ``min_size``/``max_size``) and the flip views, in order."""
    if not isinstance(resize, Resize):
        resize = Resize("fixed", (resize, resize) if isinstance(resize, int) else tuple(resize))
    if resize.multi_scale:
        raise CacheError(f"a cache holds one scale, data.min_size is {list(resize.min_size)}: cache with one "
                         "min_size, or run the teacher inline (`curriculum run` does so for multi-scale data, `curriculum tune` with "
                         "tune.teacher_mode: inline)")
    bad = [v for v in views if v not in VIEW_FLIPS]
    if bad:
        raise CacheError(f"unknown view(s) {bad}; views are 'noflip' and 'flip'")
    return {**resize.to_dict(), "views": list(views)}


def resize_of(views: dict[str, Any]) -> Resize:
    """The `Resize` of a cache's view config (`view_config`)."""
    return Resize.from_dict({k: v for k, v in views.items() if k != "views"})


def target_spec(cache: CacheConfig) -> dict[str, Any]:
    """What a cache holds besides its key: target kinds, feature levels, compression."""
    comp = asdict(cache.compression)
    if comp.get("boxes") == "dense":
        # Options added after caches were written are left out at their default, so that the keys (and so the
        # folders) of existing caches do not change and they are not recomputed.
        del comp["boxes"]
    if not comp.get("pca"):
        comp.pop("pca", None)
        comp.pop("pca_images", None)
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
        return f"{path_name(self.teacher)}-{self.teacher_fp}/{self.data_fp}-{self.views_fp}-{self.spec_fp}"

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "teacher_fp": self.teacher_fp, "data_fp": self.data_fp,
                "views": self.views, "spec": self.spec}


# ================================================================================================ shards


_CELL = pa.struct([
    ("codec", pa.string()), ("shape", pa.list_(pa.int32())), ("data", pa.large_binary()),
    ("aux", pa.binary()), ("index", pa.large_binary()),
])
_VIEW = pa.struct([("orig_h", pa.int32()), ("orig_w", pa.int32()), ("out_h", pa.int32()), ("out_w", pa.int32()),
                   ("flip", pa.bool_())])
# Keep-ratio views record their interpolation; fixed-size shards keep the struct they always had.
_VIEW_INTERPOLATED = pa.struct(list(_VIEW) + [pa.field("interpolation", pa.string())])


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """Shard i holds data-set positions [i*S, min((i+1)*S, N)): fixed by the image list alone."""
    return [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    if not rows:
        raise CacheError("a shard needs at least one row")
    names = [k for k in rows[0] if k not in ("image_id", "view_key", "view")]
    cols = {
        "image_id": pa.array([r["image_id"] for r in rows], pa.int64()),
        "view_key": pa.array([r["view_key"] for r in rows], pa.string()),
        "view": pa.array([r["view"] for r in rows],
                         _VIEW_INTERPOLATED if any("interpolation" in r["view"] for r in rows) else _VIEW),
    }
    for n in names:
        cells = [r[n] for r in rows]
        # Column by column, not pa.array(list of dicts): Arrow's nested-dict conversion is much slower.
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
        self._projection: Projection | None = None

    # ---- opening / creating ------------------------------------------------------------------------

    @staticmethod
    def location(root: str, key: CacheKey) -> tuple[pafs.FileSystem, str, str]:
        """(filesystem, path inside it, URI or local path to show and reopen) of `key`'s cache under `root`."""
        fs, base = resolve_fs(root)
        path = posixpath.join(base, key.relpath())
        return fs, path, join_uri(root, key.relpath()) if "://" in root else path

    @classmethod
    def open(cls, path: str) -> TeacherCache:
        """Open an existing cache folder (a local path or URI) from its manifest."""
        fs, p = resolve_fs(path)
        mpath = posixpath.join(p, "manifest.json")
        if not exists(fs, mpath):
            raise CacheError(f"{path}: no cache here (manifest.json missing); run `curriculum precompute` first")
        try:
            manifest = json.loads(read_bytes(fs, mpath))
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
        if exists(fs, path + "/manifest.json"):
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
                if exists(fs, m):
                    try:
                        found.append(json.loads(read_bytes(fs, m))["key"])
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
        if exists(fs, path + "/manifest.json"):
            cache = cls.open(uri)
            cache.check_key(key)
            if cache.manifest["shard_size"] != shard_size:
                raise CacheError(f"{uri}: written with shard_size {cache.manifest['shard_size']}, asked {shard_size}; "
                                 "keep the shard size to resume, or delete the folder")
            if cache.image_ids() != [int(i) for i in image_ids]:
                raise StaleCacheError(f"{uri}: its image list differs from the data set's; delete it and precompute")
            return cache
        fs.create_dir(path + "/shards", recursive=True)
        atomic_write(path + "/images.json", json.dumps([int(i) for i in image_ids]).encode(), fs)
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
        atomic_write(self._p("manifest.json"), json.dumps(self.manifest, indent=1, sort_keys=True).encode(), self.fs)
        self._last_manifest_write = now

    def image_ids(self) -> list[int]:
        return json.loads(read_bytes(self.fs, self._p("images.json")))

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
            if not exists(self.fs, p):
                continue
            try:
                data = read_bytes(self.fs, p)
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
        if exists(self.fs, self.shard_path(i)):
            self.fs.delete_file(self.shard_path(i))
        self.write_manifest(force=True)

    # ---- the feature projection (compression.pca) ------------------------------------------------------

    def write_projection(self, projection: Projection) -> None:
        """Store the fitted projection beside the shards, once, before any shard is encoded with it."""
        data = projection.to_bytes()
        atomic_write(self._p(PROJECTION_FILE), data, self.fs)
        self.manifest["projection"] = {"file": PROJECTION_FILE, "bytes": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest(), **describe_projection(projection)}
        self.write_manifest(force=True)
        self._projection = projection

    def projection(self) -> Projection | None:
        """The cache's feature projection (None when its features are stored as they are), checksummed."""
        entry = self.manifest.get("projection")
        if entry is None or self._projection is not None:
            return self._projection
        p = self._p(entry["file"])
        try:
            data = read_bytes(self.fs, p)
        except (FileNotFoundError, OSError) as e:
            raise CacheError(f"{p}: the cache's feature projection cannot be read ({e}); delete the cache folder and "
                             "precompute again") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CacheError(f"{p}: the feature projection does not match its checksum (corrupt); delete the cache "
                             "folder and precompute again")
        self._projection = Projection.from_bytes(data, p)
        return self._projection

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
            data = read_bytes(self.fs, p)
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
        "projection": m.get("projection"),
    }


def format_inspect(info: dict[str, Any]) -> str:
    t = info.get("teacher") or {}
    lines = [
        f"cache      {info['path']}",
        f"teacher    {t.get('name')} ({t.get('kind')}, fingerprint {t.get('fingerprint')}) from {t.get('checkpoint')}",
        f"data       {(info.get('data') or {}).get('annotations')} (fingerprint {(info.get('data') or {}).get('fingerprint')})",
        f"views      {info['views']['views']} at {resize_of(info['views']).describe()}",
        f"targets    {info['targets']}  levels {info['levels'] or 'all'}",
        f"compression {info['compression']}",
        f"images     {info['images_done']}/{info['images']} ({info['rows']} rows), shards {info['shards_done']}/"
        f"{info['shards']}: {'complete' if info['complete'] else 'INCOMPLETE'}",
        f"bytes      {info['bytes'] / 2**20:.2f} MiB, {info['bytes_per_image'] / 1024:.1f} KiB per image (all views)",
    ]
    for k, v in info["bytes_per_image_by_kind"].items():
        lines.append(f"  {k:12s} {v / 1024:10.2f} KiB per image")
    p = info.get("projection")
    if p:
        lines.append(f"projection features as {p['channels']} principal components per level ({p['bytes']} bytes); "
                     "variance left out: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in p["residual"].items()))
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
            out.append(join_uri(root, rel))
        else:
            out.append(posixpath.join(base, rel) if rel else base)
    if exists(fs, posixpath.join(base, "manifest.json")):
        out.append(root if "://" in root else base)
    return sorted(set(out))
