"""Serving teachers online (`TeacherServer`, `prefetch`). For views no cache holds (random augmentation) the
student sends its batch (numpy, one object in Ray's object store) and gets an ObjectRef back; `prefetch` submits batch i+1
before the student computes step i. A request whose actor died is resent to a replacement actor; every
answer carries the image ids and view keys it was computed for, checked against the request, so a step can
never get another image's targets.

Inline (`InlineTeacher`): the teacher in the training process, as other frameworks do; the reference for
correctness and cost. All three paths produce rows with `teachers.outputs.teacher_outputs`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from curriculum.cluster import ensure_ray
from curriculum.data import View, padded_hw
from curriculum.errors import CurriculumError, DataError
from curriculum.files import storage_runtime_env
from teachers.outputs import actor_device, actor_threads, load_teacher, teacher_outputs
from teachers.readers import collate_targets

log = logging.getLogger(__name__)


# ================================================================================================ serving


class ServeActor:
    """A teacher answering batches online (serving mode)."""

    def __init__(self, checkpoint: str, targets: Sequence[str], levels: Sequence[str] | None, threads: int,
                 gpus: float) -> None:
        torch.set_num_threads(threads)
        self.detector = load_teacher(checkpoint, device=actor_device(gpus))
        self.targets, self.levels = list(targets), levels

    def ready(self) -> int:
        return os.getpid()

    def serve(self, images: np.ndarray, image_ids: list[int], view_keys: list[str],
              sizes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        # Ray hands the array over read-only (zero copy from shared memory); one copy (cheap next to the forward)
        # keeps torch from ever writing into it. `sizes`: each image's own (h, w) inside the padded array.
        x = torch.from_numpy(np.array(images, dtype=np.float32, copy=True))
        imgs = list(x) if sizes is None else [im[:, :h, :w] for im, (h, w) in zip(x, sizes)]
        rows = teacher_outputs(self.detector, imgs, self.targets, self.levels)
        return {"image_ids": list(image_ids), "view_keys": list(view_keys), "rows": rows, "pid": os.getpid()}


def _batch_array(images: Sequence[torch.Tensor] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return np.ascontiguousarray(images, dtype=np.float32)
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().float().contiguous().numpy()
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    out = np.zeros((len(images), 3, h, w), dtype=np.float32)  # images of different sizes travel padded
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im.detach().cpu().float().numpy()
    return out


def _sizes(images: Sequence[torch.Tensor] | np.ndarray | torch.Tensor) -> list[tuple[int, int]] | None:
    """Each image's (h, w) when a batch mixes sizes (None when it does not)."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return None
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    return sizes if len(set(sizes)) > 1 else None


def _padded(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return [padded_hw(h, w) for h, w in sizes]


class ServeRequest:
    """An answer on its way: `result()` waits, resends to another actor if the one serving it died, and checks
    that the answer is for the images asked."""

    def __init__(self, server: TeacherServer, images_ref: Any, image_ids: list[int], view_keys: list[str],
                 sizes: list[tuple[int, int]] | None = None) -> None:
        self.server, self.images_ref = server, images_ref
        self.image_ids, self.view_keys, self.sizes = image_ids, view_keys, sizes
        self.attempts = 0
        self._send()

    def _send(self) -> None:
        self.slot, actor = self.server._pick()
        self.actor = actor
        self.ref = actor.serve.remote(self.images_ref, self.image_ids, self.view_keys, self.sizes)
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
        return collate_targets(out["rows"], self.image_ids, sizes=_padded(self.sizes) if self.sizes else None)


class TeacherServer:
    """A set of Ray actors serving one teacher's targets to students (serving mode)."""

    def __init__(self, checkpoint: str, targets: Sequence[str] = ("features", "head"), levels: Sequence[str] | None = None,
                 actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, threads: int = 0,
                 max_attempts: int = 3, wait_ready: bool = True) -> None:
        import ray

        ensure_ray()
        self._cls = ray.remote(ServeActor).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                                                   max_restarts=0, max_task_retries=0,
                                                   runtime_env=storage_runtime_env())
        self._args = (checkpoint, list(targets), list(levels) if levels else None,
                      actor_threads(cpus_per_actor, threads), gpus_per_actor)
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
        return ServeRequest(self, ray.put(arr), ids, keys, _sizes(images))

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
        scorer = masks = None
        if self.detector.kind == "two_stage":
            det, feats, sizes = self.detector, keep["features"], keep["image_sizes"]
            scorer = lambda boxes: det.score_boxes(feats, list(boxes), sizes)  # noqa: E731
            if det.has_masks:
                masks = lambda boxes: det.score_masks(feats, list(boxes), sizes)  # noqa: E731
        image_hw = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        tt = collate_targets(rows, [int(i) for i in image_ids], roi_scorer=scorer, sizes=_padded(image_hw))
        tt.mask_scorer = masks
        return tt
