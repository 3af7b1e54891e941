"""Reading a teacher cache: decoded rows of (image, view) and the batch's `TeacherTargets`.

Reading. `CacheReader`: each process reads the Parquet shards it needs into its own LRU (`memory_bytes`).
`ObjectStoreShards` + `ObjectStoreReader`: one actor decodes each shard once and puts it into Ray's object store;
training workers read it zero-copy, and the shards held stay within a byte budget (a bigger cache is
streamed). Both readers have the same interface (`rows`, `targets`, `targets_for`, `manifest`, `image_ids`).

Everything Parquet-side is zstd-compressed on top. Transformer features are never flipped after the fact:
the ``flip`` view is the teacher's output on the flipped image.

`collate_targets` turns decoded rows into one `TeacherTargets`; the column -> field mapping is the schema table's
(`teachers.targets.TARGETS`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from curriculum.data import View
from curriculum.errors import CacheError, CorruptShardError, CurriculumError, DataError, StaleCacheError
from curriculum.files import storage_runtime_env
from teachers.cache import VIEW_FLIPS, TeacherCache
from teachers.codec import decode_row
from teachers.targets import FIELDS, PROPOSAL_BOXES, TeacherTargets, fields_of

log = logging.getLogger(__name__)


# ================================================================================================ collate

def _stack(arrs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)) if arrs else torch.empty(0)


# What a padded cell of a batch holds: no feature, no box offset, and logits that say background (sigmoid of -30 is
# 1e-13), as the detector's own loss treats the anchors of the padding.
_PAD_LOGIT = -30.0
_PAD_FILL = {"cls_logits": _PAD_LOGIT, "bbox_ctrness": _PAD_LOGIT, "objectness": _PAD_LOGIT}
FIRST_DENSE_STRIDE = 8  # one-stage heads (RetinaNet, FCOS) run on P3..P7


def _stack_padded(arrs: list[np.ndarray], fill: float = 0.0) -> torch.Tensor:
    """Stack maps ``[..., h_i, w_i]`` padded at the bottom and right to the largest (a batch of keep-ratio views)."""
    if not arrs or all(a.shape == arrs[0].shape for a in arrs):
        return _stack(arrs)
    h = max(a.shape[-2] for a in arrs)
    w = max(a.shape[-1] for a in arrs)
    out = np.full((len(arrs), *arrs[0].shape[:-2], h, w), fill, dtype=arrs[0].dtype)
    for i, a in enumerate(arrs):
        out[i, ..., : a.shape[-2], : a.shape[-1]] = a
    return torch.from_numpy(out)


def _stack_dense(arrs: list[np.ndarray], level: int, sizes: Sequence[tuple[int, int]] | None, what: str,
                 fill: float) -> torch.Tensor:
    """Stack one-stage head outputs ``[h_i * w_i * A, C]`` (row-major over the level's grid, then anchor) laid out
    on the batch's grid: each image's grid padded at the bottom and right to the largest. `sizes`: each image's
    padded input size, which gives its grid at this level's stride."""
    if sizes is not None and len(set(sizes)) == 1 or sizes is None and all(a.shape == arrs[0].shape for a in arrs):
        return _stack(arrs)  # one grid (equal row counts alone would not say so: 1x2 and 2x1 grids)
    if sizes is None:
        raise DataError(f"teacher target {what}: images of different sizes in one batch need their views to be "
                        "laid out on the batch's grid")
    stride = FIRST_DENSE_STRIDE * 2**level
    grids = [(-(-h // stride), -(-w // stride)) for h, w in sizes]
    per_cell = {a.shape[0] // (g[0] * g[1]) for a, g in zip(arrs, grids)}
    if len(per_cell) != 1 or any(a.shape[0] != g[0] * g[1] * next(iter(per_cell)) for a, g in zip(arrs, grids)):
        raise DataError(f"teacher target {what}: row counts {[a.shape[0] for a in arrs]} do not fit the grids "
                        f"{grids} at stride {stride}; the cache does not match these views")
    anchors = per_cell.pop()
    maps = [np.moveaxis(a.reshape(g[0], g[1], anchors * a.shape[-1]), -1, 0) for a, g in zip(arrs, grids)]
    batch = _stack_padded(maps, fill)  # [N, A*C, H, W]
    n, _, h, w = batch.shape
    return batch.permute(0, 2, 3, 1).reshape(n, h * w * anchors, arrs[0].shape[-1])


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Owned, writable tensor (arrays from Ray's object store are read-only views of shared memory)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def collate_targets(
    raws: Sequence[dict[str, np.ndarray]], image_ids: Sequence[int], roi_scorer: Any = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> TeacherTargets:
    """Per-image teacher outputs (decoded rows) -> one `TeacherTargets` for the batch, in batch order.

    Columns map to fields by the schema table: ``features/<level>``; ``head/<field>/<i>`` (per-level head
    fields, level index i); ``detections/*``; the RoI fields' own columns, rows concatenated over the batch.
    Images of different sizes (keep-ratio views; `sizes`: each one's padded input size) are laid out as the
    student's padded batch is: maps padded at the bottom and right, with zeros and background logits."""
    if not raws:
        return TeacherTargets(image_ids=list(image_ids))
    names = list(raws[0])
    for i, r in enumerate(raws):
        if list(r) != names:
            raise DataError(f"teacher targets of image_id {image_ids[i]} have columns {sorted(r)}, the batch's first "
                            f"image {sorted(names)}: mixed caches in one batch")
    kw: dict[str, Any] = {"image_ids": [int(i) for i in image_ids]}
    feats = {n.split("/", 1)[1]: _stack_padded([r[n] for r in raws]) for n in names if n.startswith("features/")}
    if feats:
        kw["features"] = feats
    per_level: dict[str, dict[int, torch.Tensor]] = {}
    for n in names:
        if n.startswith("head/"):
            _, field_, lvl = n.split("/")
            arrs, fill = [r[n] for r in raws], _PAD_FILL.get(field_, 0.0)
            if FIELDS[field_].detectors == "one_stage":
                stacked = _stack_dense(arrs, int(lvl), sizes, n, fill)
            else:  # RPN maps [A, H, W]
                stacked = _stack_padded(arrs, fill)
            per_level.setdefault(field_, {})[int(lvl)] = stacked
    for field_, levels in per_level.items():
        kw[field_] = [levels[l] for l in sorted(levels)]
    if "detections/boxes" in names:
        kw["detections"] = [{"boxes": _tensor(r["detections/boxes"]).reshape(-1, 4),
                             "scores": _tensor(r["detections/scores"]),
                             "labels": _tensor(r["detections/labels"])} for r in raws]
    roi = [f for f in fields_of("proposals") if FIELDS[f].column in names]
    for f in roi:
        kw[f] = torch.from_numpy(np.concatenate([r[FIELDS[f].column] for r in raws]))
    if roi:
        kw["roi_counts"] = [len(r[PROPOSAL_BOXES]) for r in raws]
    return TeacherTargets(**kw, roi_scorer=roi_scorer)


def proposals_of(raws: Sequence[dict[str, np.ndarray]]) -> list[torch.Tensor] | None:
    """The teacher's proposals per image (the boxes `roi_class_logits` rows belong to), or None."""
    if not raws or PROPOSAL_BOXES not in raws[0]:
        return None
    return [_tensor(r[PROPOSAL_BOXES]).reshape(-1, 4) for r in raws]


def _cells_of(table: pa.Table, row: int, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: table.column(n)[row].as_py() for n in names}


class _RowTargets:
    """What the two readers share: the (image, view) -> row lookup and its errors, `targets`, `targets_for`,
    `proposals` and the RoI scorer, all over `rows`. A trainer may hold either reader."""

    uri: str
    roi_head: Any = None
    _pos: dict[int, int]
    _shard_size: int
    # A `compression.pca` cache holds its features as principal components (decoded as stored, in the shards'
    # memory); `rows` gives them back in the teacher's channels, or as they are with `components`.
    projection: Any = None
    components: bool = False

    def _set_projection(self, projection: Any, components: bool) -> None:
        if components and projection is None:
            raise CacheError(f"teacher cache {self.uri} stores its features as they are (no compression.pca): it "
                             "has no principal components to read; drop cache.features: components")
        self.projection, self.components = projection, components

    def _teacher_space(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return row if self.projection is None or self.components else self.projection.teacher_space(row)

    def feature_channels(self) -> dict[str, int]:
        """Channels of the feature maps `rows` gives, per FPN level (the teacher's, or the components')."""
        if self.components:
            return {level: self.projection.channels for level in self.projection.basis}
        return dict(self.manifest["teacher"]["level_channels"])

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
        if "out_h" not in v:  # keep-ratio views: the size is the image's own
            return list(v["views"])
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
            if View.from_dict(vd) != view:
                raise StaleCacheError(f"teacher cache {self.uri}: image_id {iid} was cached for view {vd}, the "
                                      f"sample has {view.to_dict()}; precompute again")
        return row

    def targets(self, image_ids: Sequence[int], views: Sequence[View | str]) -> Any:
        """`TeacherTargets` of a batch, rows in batch order, `image_ids` set (checked by the losses' callers)."""
        raws = self.rows(image_ids, views)
        bound = self._bound_features(raws, views) if self.roi_head is not None else None
        det = self.roi_head
        scorer = (lambda boxes: det.score_boxes(bound[0], list(boxes), bound[1])) if bound else None
        sizes = [v.padded_size() for v in views] if all(isinstance(v, View) for v in views) else None
        tt = collate_targets(raws, image_ids, roi_scorer=scorer, sizes=sizes)
        if bound and getattr(det, "has_masks", False):
            tt.mask_scorer = lambda boxes: det.score_masks(bound[0], list(boxes), bound[1])
        return tt

    def targets_for(self, batch_targets: Sequence[dict[str, Any]]) -> Any:
        """`targets` for a collated batch's target dicts (`image_id`, `view`)."""
        return self.targets([t["image_id"] for t in batch_targets], [t["view"] for t in batch_targets])

    def proposals(self, image_ids: Sequence[int], views: Sequence[View | str]) -> list[torch.Tensor] | None:
        return proposals_of(self.rows(image_ids, views))

    def _bound_features(self, raws, views) -> tuple[OrderedDict, list] | None:
        """The cached FPN features of the batch and its image sizes, when the RoI heads can run on them."""
        det = self.roi_head
        levels = [det.level_map.get(l, l) for l in getattr(det.model.roi_heads.box_roi_pool, "featmap_names", [])]
        have = [n.split("/", 1)[1] for n in raws[0] if n.startswith("features/")]
        comp = self.manifest["key"]["spec"]["compression"]
        if det.kind != "two_stage" or any(l not in have for l in levels) or comp["features_region"] == "pooled":
            return None
        feats = OrderedDict((l, _stack_padded([r[f"features/{l}"] for r in raws])) for l in have)
        sizes = []
        for v in views:
            vv = v if isinstance(v, View) else None
            sizes.append((vv.out_h, vv.out_w) if vv else (self.manifest["key"]["views"]["out_h"],
                                                          self.manifest["key"]["views"]["out_w"]))
        return feats, sizes


class CacheReader(_RowTargets):
    """Serves `TeacherTargets` for a student's batch from a complete cache.

    Decoded shards are kept in an LRU bounded by `memory_bytes` (Arrow bytes of the shard tables), so a cache
    bigger than memory is streamed shard by shard. The student's sample picks its row by ``(image_id,
    View.key())``; a view the cache does not hold is an error (use serving mode for random augmentation).
    `roi_head`: the teacher detector; with cached features of every RoI level it gives `roi_scorer`.
    `ObjectStoreReader` has the same interface and serves the same rows from Ray's object store.
    """

    def __init__(self, cache: TeacherCache | str, memory_bytes: int = 1 << 30, check_sha: bool = True,
                 roi_head: Any = None, components: bool = False) -> None:
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        self.cache.require_complete()
        self.uri = self.cache.uri
        self._set_projection(self.cache.projection(), components)
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

    def shard_nbytes(self, i: int) -> int:
        """Bytes shard i takes in this reader's memory budget (it is read and kept)."""
        return int(self._shard(i)[0].nbytes)

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
                out.append(self._teacher_space(decode_row(_cells_of(table, row, names), where)))
            except (DataError, ValueError) as e:
                raise CorruptShardError(f"{e}; rebuild it with `curriculum cache rebuild {self.cache.uri} --shard "
                                        f"{shard}`", shard, self.cache.shard_path(shard)) from None
        return out


def decode_shard(cache: TeacherCache, i: int, check_sha: bool = True) -> dict[str, Any]:
    """Every row of shard i decoded as stored (a `compression.pca` cache's features as components):
    ``{"index": {(image_id, view_key): row}, "views": [View dict per row], "rows": [{column: float32/int64 numpy}],
    "nbytes": decoded array bytes}`` (what `ObjectStoreShards` puts into the object store)."""
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
        self._generation = 0  # bumped by `release`: a `fill` under way stops
        self._stats = {"loads": 0, "hits": 0, "evictions": 0, "filled": 0, "max_resident_bytes": 0,
                       "max_shard_bytes": 0}

    def info(self) -> dict[str, Any]:
        return {"uri": self.cache.uri, "manifest": self.cache.manifest, "projection": self.cache.projection(),
                "image_ids": [int(i) for i in self.cache.image_ids()], "pid": os.getpid()}

    def shard(self, i: int, hit: bool = True, generation: int | None = None) -> list[Any]:
        """[ObjectRef] of shard i's decoded rows (in a list, so that Ray hands over the reference itself). `hit`:
        count an already decoded shard as a reader's hit (`fill` does not). `generation` (`fill`'s): a shard whose
        decode a `release` overtook is not kept, and the list is empty."""
        import threading

        import ray

        while True:
            with self._lock:
                if i in self._lru:
                    self._lru.move_to_end(i)
                    self._stats["hits"] += hit
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
                if generation is not None and generation != self._generation:
                    return []  # released meanwhile: keeping it would hold what the release freed
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

    def fill(self) -> int:
        """Decode shards in order, before any reader asks, while the next one is expected to fit the budget (the
        largest shard so far taken as its size): what a first epoch would otherwise wait for, decoded while the
        readers' processes start. Stops at a `release` or at a shard that fails to decode (its reader will get
        the error); returns how many shards it decoded."""
        generation, done = self._generation, 0
        for i in range(self.cache.manifest["num_shards"]):
            with self._lock:
                if self._generation != generation:
                    break
                if i in self._lru or i in self._loading:
                    continue
                if self._lru and self._resident + self._stats["max_shard_bytes"] > self.budget:
                    break
            try:
                if not self.shard(i, hit=False, generation=generation):
                    break
            except Exception as e:  # noqa: BLE001 (a reader asking for this shard gets the error itself)
                self._stats["fill_error"] = f"shard {i}: {type(e).__name__}: {e}"
                break
            done += 1
        with self._lock:
            self._stats["filled"] += done
        return done

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "budget_bytes": self.budget, "resident_bytes": self._resident,
                    "resident_shards": list(self._lru)}

    def release(self) -> int:
        """Drop every shard's reference (a sequence's later stages do not read this teacher); returns how many.
        A shard asked again is decoded again; a `fill` under way stops."""
        with self._lock:
            self._generation += 1
            n = len(self._lru)
            self._stats["evictions"] += n
            self._lru.clear()
            self._resident = 0
            return n


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
    when asked again. On top of that each reader pins the shards it read last (`keep_shards`, default one; or
    as many as fit in its `memory_bytes`, as training workers do) until it moves on, so the object store holds
    at most the budget plus what the readers pin (for budgets above one shard). Ray's object store must be big
    enough for that (``ray.init(object_store_memory=...)``); beyond it Ray spills to disk rather than fail.

    `fill`: the actor starts decoding the shards in order at once (`_ShardStoreActor.fill`, up to the budget),
    while the workers' processes start, instead of when a worker first asks for each; `filled()` waits for it.
    Without it a first epoch waits for every shard's decode in turn.

    `num_cpus`: the actor's CPU reservation (default 0: it only decodes when workers wait for it or it fills,
    and on a small machine a reserved CPU would starve the training workers). `max_concurrency`: shards decoded
    in parallel for different workers (a shard asked by two workers at once is decoded once); a filling store
    has one thread more.
    """

    def __init__(self, cache: TeacherCache | str, budget_bytes: int, *, name: str | None = None,
                 namespace: str = STORE_NAMESPACE, num_cpus: float = 0.0, max_concurrency: int = 2,
                 check_sha: bool = True, wait: bool = True, fill: bool = False) -> None:
        import ray

        if not ray.is_initialized():
            raise CacheError("ObjectStoreShards needs Ray: call ray.init (or curriculum.cluster.ensure_ray) first")
        if int(budget_bytes) < 1:
            raise CacheError(f"ObjectStoreShards: budget_bytes must be positive, got {budget_bytes}")
        uri = cache.uri if isinstance(cache, TeacherCache) else str(cache)
        TeacherCache.open(uri).require_complete()  # a missing or incomplete cache fails here, in the driver
        self.uri, self.budget_bytes, self.namespace = uri, int(budget_bytes), namespace
        self.name = name or f"teacher-shards-{uuid.uuid4().hex[:10]}"
        cls = ray.remote(_ShardStoreActor).options(
            name=self.name, namespace=namespace, num_cpus=num_cpus,
            max_concurrency=max(1, max_concurrency) + (1 if fill else 0),  # fill holds a thread of its own
            max_restarts=0,  # a restarted owner would not have the objects: readers are told instead
            runtime_env=storage_runtime_env(),
        )
        self.actor = cls.remote(uri, self.budget_bytes, check_sha)
        self._started = self.actor.info.remote()
        self._filling = self.actor.fill.remote() if fill else None
        if wait:
            self.ready()

    def ready(self) -> ObjectStoreShards:
        """Wait until the actor has started and opened the cache: workers find it by name from then on. (`wait=False`
        lets a driver start several stores at once, their processes starting in parallel, then wait for each.)"""
        import ray

        if self._started is not None:
            ray.get(self._started)
            self._started = None
        return self

    def filled(self) -> int:
        """Wait for the `fill` begun at the start (if any): how many shards it decoded (0 without one)."""
        import ray

        if self._filling is None:
            return 0
        return int(ray.get(self._filling))

    def reader(self, roi_head: Any = None, keep_shards: int = 1, memory_bytes: int | None = None,
               components: bool = False) -> ObjectStoreReader:
        """A reader on this store (in the driver; workers build theirs by name: `ObjectStoreReader(name)`)."""
        return ObjectStoreReader(self.name, namespace=self.namespace, roi_head=roi_head, keep_shards=keep_shards,
                                 memory_bytes=memory_bytes, components=components)

    def stats(self) -> dict[str, Any]:
        """loads, hits, evictions, filled (shards `fill` decoded), resident_bytes, max_resident_bytes, max_shard_bytes,
        resident_shards; fill_error when a fill stopped at a shard that failed."""
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


def release_shard_store(name: str, namespace: str = STORE_NAMESPACE) -> int:
    """Empty the shard store `name` (`ObjectStoreShards.name`) from any process of its Ray cluster: the actor drops
    its decoded shards and stays up; returns how many it held (0 when the store is gone)."""
    import ray

    try:
        return int(ray.get(ray.get_actor(name, namespace=namespace).release.remote()))
    except (ValueError, ray.exceptions.RayActorError):  # no such actor, or it has ended: nothing held
        return 0


class ObjectStoreReader(_RowTargets):
    """`CacheReader`'s interface (`rows`, `targets`, `targets_for`, `proposals`, `manifest`, `image_ids`) over
    an `ObjectStoreShards` store, found by its name: what a training worker builds.

    Rows come out as read-only numpy views of Ray's shared memory (zero copy); `collate_targets` copies what
    it stacks, so nothing writes into them. The reader keeps the references of its most recent shards (pinning
    them in the object store even after the store dropped them) and lets go of older ones: the `keep_shards`
    most recent, or with `memory_bytes` as many as fit in it (at least one). A training worker reads its images
    in random order across the shards of its window (`trainers.ray_train.CacheShardSampler`, sized from the same
    budget): holding one shard of them, it would fetch and unpack a shard again for nearly every image.
    """

    def __init__(self, store: str | Any, namespace: str = STORE_NAMESPACE, roi_head: Any = None,
                 keep_shards: int = 1, memory_bytes: int | None = None, components: bool = False) -> None:
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
        self._set_projection(info["projection"], components)
        self._ids = info["image_ids"]
        self._pos = {iid: p for p, iid in enumerate(self._ids)}
        self._shard_size = self._manifest["shard_size"]
        self.roi_head = roi_head
        self.keep_shards = max(1, keep_shards)
        self.memory_bytes = memory_bytes
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
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}): "
                             "it failed to start, or the driver that owns it ended or closed it before the "
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
        while len(self._local) > 1 and self._over_budget():  # let go: Ray frees it once the store dropped it too
            self._local.popitem(last=False)
        return payload

    def shard_nbytes(self, i: int) -> int:
        """Bytes shard i takes in this reader's memory budget (it is fetched and kept)."""
        return int(self._shard(i)["nbytes"])

    def _over_budget(self) -> bool:
        if self.memory_bytes is None:
            return len(self._local) > self.keep_shards
        return sum(p["nbytes"] for _, p in self._local.values()) > self.memory_bytes

    def rows(self, image_ids: Sequence[int], views: Sequence[View | str]) -> list[dict[str, np.ndarray]]:
        """Decoded rows (column -> read-only numpy) of each (image, view), in the given order."""
        out = []
        for iid, view in zip(image_ids, views, strict=True):
            iid = int(iid)
            payload = self._shard(self._shard_of(iid))
            row = self._row_of(payload["index"], iid, view, lambda r: payload["views"][r])
            out.append(self._teacher_space(dict(payload["rows"][row])))
        return out
