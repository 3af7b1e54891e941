"""Plain (non-distilled) detector training and COCO evaluation.

`train_detector(job)` is what `curriculum train CONFIG` runs: it makes the built-in teachers and the
baseline students. The pieces (`train_one_epoch`, `evaluate_model`, `make_optimizer`, `make_scheduler`) are
plain functions over a model and a loader so that a Ray Train worker can call them as they are.

Output folder: ``checkpoints/last.pt`` (training state after each epoch, written atomically), ``model.pt``
(the plain detector, loads with the zoo alone), ``metrics.jsonl`` (one line per epoch), ``eval.json`` and
``detections_val.json``, ``config.yaml``, and ``loss.png`` / ``ap.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from curriculum.config import DataConfig, EvalConfig, TrainConfig, TrainJobConfig, dump_config
from curriculum.data import CocoDetection, collate_fn
from curriculum.errors import CurriculumError
from curriculum.files import atomic_save
from curriculum.seeds import derive_seed, seed_everything
from curriculum.shapes import ensure_builtin_data
from teachers.zoo import Detector, build_detector, needs_masks
from trainers.coco_eval import SEGM_KEYS, detections_to_coco, evaluate_detections, write_detections
from torchvision.models.detection.roi_heads import paste_masks_in_image

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "curriculum.train_state/1"


class NonFiniteLossError(CurriculumError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ data


def build_dataset(data: DataConfig, split: str, seed: int = 0, masks: bool = False) -> CocoDetection:
    """The split as a data set: training views (flip, multi-scale) for train, evaluation views otherwise; `masks`:
    instance masks in the targets (a Mask R-CNN trains on them; evaluation reads them from the annotations)."""
    images, ann = data.split_paths(split)
    flip = data.flip if split == "train" else "none"
    return CocoDetection(images, ann, data.resize_spec("train" if split == "train" else "val"), flip=flip, seed=seed,
                         on_bad_box=data.on_bad_box, masks=masks)


def make_loader(ds: CocoDetection, batch_size: int, shuffle: bool, seed: int, workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=g,
                      num_workers=workers, drop_last=shuffle and len(ds) >= batch_size)


def _progress(iterable: Iterable, **kw: Any) -> tqdm:
    # In a log (CI, `ray job logs`) a bar redrawn ten times a second is noise: update rarely there.
    return tqdm(iterable, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 15.0,
                dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------------ optimisation


_FUSED_DEVICES = ("cpu", "cuda")  # where torch has fused AdamW and SGD kernels


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim <= 1 or "position_bias_table" in name or "pos_embed" in name


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
                   t: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable `params` (plain or named). ``t.decay_norm_and_bias: false`` needs names: norms,
    biases and position tables then form a group without weight decay."""
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    if t.decay_norm_and_bias:
        groups: list[dict[str, Any]] = [{"params": [p for _, p in named]}]
    else:
        groups = [{"params": [p for n, p in named if not _no_decay(n, p)]},
                  {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
    # torch defaults to neither on the CPU: its per-tensor Python loop is the slowest over a detector's many small
    # tensors, foreach faster, and the fused kernel (the whole update of a group in one call) fastest
    impl = {"fused": True} if all(p.device.type in _FUSED_DEVICES for _, p in named) else {"foreach": True}
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **impl)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, **impl)


def lr_factor(it: int, total: int, t: TrainConfig) -> float:
    """Linear warm-up then the schedule: cosine to 1% of lr, step (x0.1 at 2/3 and 8/9), or constant."""
    warm = min(1.0, (it + 1) / t.warmup_iters) if t.warmup_iters else 1.0
    frac = it / max(1, total)
    if t.lr_schedule == "cosine":
        sched = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    elif t.lr_schedule == "step":
        sched = 0.1 ** sum(frac >= m for m in (2 / 3, 8 / 9))
    else:
        sched = 1.0
    return warm * sched


def make_scheduler(opt: torch.optim.Optimizer, t: TrainConfig, total_iters: int, offset: int = 0
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule over `total_iters`, entered at iteration `offset` (a stage continuing a longer schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it + offset, total_iters, t))


def optimizer_state_by_name(opt: torch.optim.Optimizer, named: Iterable[tuple[str, torch.nn.Parameter]]
                            ) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state (momentum, Adam's moments and step) of the `named` parameters, keyed by
    name: what the next stage of a curriculum, whose optimizer holds other parameters too, can take over."""
    return {n: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for n, p in named if p in opt.state}


def load_optimizer_state_by_name(opt: torch.optim.Optimizer, named: Iterable[tuple[str, torch.nn.Parameter]],
                                 states: dict[str, dict[str, Any]]) -> list[str]:
    """Give each of the `named` parameters its state from `states` (`optimizer_state_by_name`) where the name is
    there and the shapes match; returns the names taken over."""
    def placed(v: Any, p: torch.nn.Parameter) -> Any:
        if not torch.is_tensor(v):
            return v
        # per-element buffers go to the parameter's device; a 0-d `step` stays on the CPU, where torch's
        # optimizers keep it (unless capturable)
        return v.to(p.device) if v.dim() else v.clone()

    taken = []
    for n, p in named:
        st = states.get(n)
        if st is None or any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in st.values()):
            continue
        opt.state[p] = {k: placed(v, p) for k, v in st.items()}
        taken.append(n)
    return taken


def tensorboard_writer(log_dir: str | os.PathLike | None) -> Any:
    """torch's `SummaryWriter` on `log_dir` (None: no logging); event files that `tensorboard --logdir` reads."""
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def log_epoch(writer: Any, epoch: int, record: dict[str, Any]) -> None:
    """Per-epoch scalars: val metrics (``val/AP``...), the distillation decay, images/s; step = epoch (1-based)."""
    if writer is None:
        return
    for k, v in (record.get("val") or {}).items():
        if isinstance(v, (int, float)) and v >= 0:
            writer.add_scalar(f"val/{k}", v, epoch)
    for k in ("decay", "loss_factor", "kd_ratio"):
        if record.get(k) is not None:
            writer.add_scalar(f"distill/{k}", record[k], epoch)
    writer.add_scalar("speed/images_per_s", record.get("images_per_s", 0.0), epoch)
    writer.flush()


def step_logger(writer: Any, epoch: int, iters: int) -> Callable[[int, dict[str, float], float], None] | None:
    """`on_step` writing every loss term (``loss/<term>``) and the lr at global step ``epoch * iters + batch``."""
    if writer is None:
        return None

    def on_step(b: int, values: dict[str, float], lr: float) -> None:
        step = epoch * iters + b
        for k, v in values.items():
            writer.add_scalar(f"loss/{k}", v, step)
        writer.add_scalar("lr", lr, step)

    return on_step


def train_one_epoch(
    model: Detector,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    t: TrainConfig,
    epoch: int,
    progress: bool = True,
    extra_loss: Callable[[Any, list[dict], list[torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    on_step: Callable[[int, dict[str, float], float], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of each loss term, images/s and the last lr.

    `extra_loss(output, targets, images)` adds terms (distillation) computed from the same forward pass (the
    images are there for a teacher that runs inline on the same batch); the forward records what
    `extra_loss.want` names (`DistillStep`: what its losses read), or everything. `on_step(batch, terms, lr)`
    sees every step's loss terms (and their sum, ``loss``) and learning rate (TensorBoard: `tensorboard_writer`).
    Raises NonFiniteLossError naming the epoch and batch when a loss is NaN or infinite.
    """
    model.train()
    sums: dict[str, float] = {}
    n_images, n_batches = 0, 0
    start = time.perf_counter()
    want = ("losses",) if extra_loss is None else getattr(extra_loss, "want", ("losses", "features", "head"))
    limit = t.max_iters_per_epoch or len(loader)
    bar = _progress(loader, total=min(limit, len(loader)), desc=f"epoch {epoch + 1}/{t.epochs}",
                    disable=not progress, unit="batch")
    for b, (images, targets) in enumerate(bar):
        if b >= limit:
            break
        out = model(images, targets, want=want)
        terms = dict(out.losses)
        if extra_loss:
            terms.update(extra_loss(out, targets, images))
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            bad = {k: float(v) for k, v in terms.items() if not torch.isfinite(v)}
            ids = [tg["image_id"] for tg in targets]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, batch {b} (image ids {ids}): {bad}; the last good "
                "checkpoint is kept. Lower the learning rate or the loss weights, or raise grad_clip protection"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["loss"] = float(loss.detach())
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if on_step is not None:
            on_step(b, values, scheduler.get_last_lr()[0])
        n_images += len(images)
        n_batches += 1
        if progress:
            # Shown at the bar's own pace: refreshing here printed a line per batch into logs (a Ray worker's).
            bar.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    stats = {k: v / max(1, n_batches) for k, v in sums.items()}
    stats.update(images_per_s=n_images / max(elapsed, 1e-9), lr=scheduler.get_last_lr()[0], seconds=elapsed)
    return stats


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict_coco(
    model: Detector, ds: CocoDetection, batch_size: int = 16, max_images: int = 0, progress: bool = True,
    relabel: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Detections of `model` on `ds` as COCO result dicts, in original image coordinates. `relabel`: applied to each
    batch's detections first (`ClassMap.map_detections`: a detector on other classes scored on the data's)."""
    was_training = model.training
    model.eval()
    indices = list(range(len(ds) if not max_images else min(max_images, len(ds))))
    subset = torch.utils.data.Subset(ds, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for images, targets in _progress(loader, desc="eval", disable=not progress, unit="batch"):
        dets = model.predict(images)
        for det, tg in zip(relabel(dets) if relabel is not None else dets, targets):
            view = tg["view"]
            boxes = view.unmap_boxes(det["boxes"])
            masks = None
            if "mask_probs" in det:  # box-relative: pasted straight into the original image
                probs = torch.flip(det["mask_probs"], dims=(-1,)) if view.flip else det["mask_probs"]
                masks = paste_masks_in_image(probs, boxes, (view.orig_h, view.orig_w))[:, 0]
            results += detections_to_coco(tg["image_id"], boxes, det["scores"], det["labels"], ds.label_to_category,
                                           masks=masks)
            image_ids.append(tg["image_id"])
    model.train(was_training)
    return results, image_ids


def evaluate_model(
    model: Detector, ds: CocoDetection, e: EvalConfig | None = None, detections_path: str | Path | None = None,
    progress: bool = True, relabel: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """COCO box metrics of `model` on `ds` (fractions; -1 where undefined), optionally saving the detections
    (`relabel`: as `predict_coco`'s)."""
    e = e or EvalConfig()
    results, image_ids = predict_coco(model, ds, e.batch_size, e.max_images, progress, relabel)
    if detections_path is not None:
        write_detections(detections_path, results)
    metrics = evaluate_detections(ds.coco, results, image_ids=image_ids, per_class=True)
    anns = ds.coco.dataset["annotations"]
    if getattr(model, "has_masks", False) and all("segmentation" in a for a in anns):
        # box metrics stay at the top level; mask metrics under "segm"
        segm = evaluate_detections(ds.coco, results, image_ids=image_ids, per_class=True, iou_type="segm")
        metrics["segm"] = {k: v for k, v in segm.items() if k in SEGM_KEYS}
    metrics["images"] = len(image_ids)
    return metrics


# ------------------------------------------------------------------------------------------------ checkpoints


def save_train_state(path: Path, model: Detector, opt, sched, epoch: int, history: list[dict]) -> None:
    atomic_save({
        "format": TRAIN_STATE_FORMAT, "epoch": epoch, "model": model.checkpoint(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "history": json.dumps(history), "torch_rng": torch.get_rng_state(),
    }, path)


def load_train_state(path: Path, trust: bool = False) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as ex:
        raise CurriculumError(
            f"training checkpoint {path} cannot be read ({type(ex).__name__}: {ex}); delete it to start over"
        ) from ex
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CurriculumError(f"{path} is not a curriculum training checkpoint; delete it to start over")
    return state


# ------------------------------------------------------------------------------------------------ the job


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (0 or None: unchanged) and give the caller back its own
    count after: a training called in-process must not change the threads (and so the float results) of what
    the caller runs next."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def train_detector(job: TrainJobConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one detector without distillation, evaluate it, write the output folder; return the summary.

    Runs with `train.num_threads` torch threads (when set) and restores the caller's count after."""
    with torch_threads(job.train.num_threads):
        return _train_detector(job, resume, progress)


def _train_detector(job: TrainJobConfig, resume: bool, progress: bool) -> dict[str, Any]:
    from teachers.zoo import check_detector_name

    check_detector_name(job.model.name)  # before the output folder or the data set exist
    out = Path(job.output_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    if ckpt_path.exists() and not resume:
        raise CurriculumError(
            f"{out} already holds a training checkpoint: pass --resume to continue it, or choose another "
            "output_dir (nothing was overwritten)"
        )
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    dump_config(job, out / "config.yaml")
    t = job.train
    seed_everything(t.seed)
    ensure_builtin_data(job.data)
    train_ds = build_dataset(job.data, "train", seed=t.seed, masks=needs_masks(job.model.name))
    val_ds = build_dataset(job.data, "val", seed=t.seed)
    model = build_detector(job.model.name, train_ds.num_classes, image_size=job.data.image_size,
                           class_names=tuple(train_ds.class_names), **job.model.overrides())
    loader = make_loader(train_ds, t.batch_size, shuffle=True, seed=t.seed, workers=job.data.workers)
    iters = min(len(loader), t.max_iters_per_epoch or len(loader))
    opt = make_optimizer(model.named_parameters(), t)
    sched = make_scheduler(opt, t, iters * t.epochs)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and ckpt_path.exists():
        state = load_train_state(ckpt_path)
        model.load_state_dict(state["model"]["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history = json.loads(state["history"])
        start_epoch = state["epoch"] + 1
        log.info("resuming %s at epoch %d", out, start_epoch + 1)
    metrics_file = out / "metrics.jsonl"
    writer = tensorboard_writer(out / "tensorboard")
    for epoch in range(start_epoch, t.epochs):
        train_ds.set_epoch(epoch)
        # The loader's shuffle order must not depend on whether the run was resumed.
        loader.generator.manual_seed(derive_seed(t.seed, "loader", epoch))
        stats = train_one_epoch(model, loader, opt, sched, t, epoch, progress,
                                on_step=step_logger(writer, epoch, iters))
        record: dict[str, Any] = {"epoch": epoch + 1, **stats}
        last = epoch + 1 == t.epochs
        if (t.eval_every and (epoch + 1) % t.eval_every == 0) or last:
            metrics = evaluate_model(model, val_ds, job.eval, out / "detections_val.json" if last else None, progress)
            record["val"] = {k: v for k, v in metrics.items() if k not in ("stats", "per_class")}
            if last:
                (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        history.append(record)
        log_epoch(writer, epoch + 1, record)
        save_train_state(ckpt_path, model, opt, sched, epoch, history)
        metrics_file.write_text("".join(json.dumps(h) + "\n" for h in history))
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in stats.items() if isinstance(v, float)})
    if writer is not None:
        writer.close()
    atomic_save(model.checkpoint({"resize": job.data.resize_spec("val").to_dict()}), out / "model.pt")
    plot_history(history, out)
    final = history[-1].get("val", {}) if history else {}
    return {"name": job.model.name, "output_dir": str(out), "val": final,
            "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0,
            "epochs": t.epochs, "history": history}


def plot_history(history: list[dict[str, Any]], out: Path, borders: list[int] | None = None) -> None:
    """loss.png (each loss term per epoch) and ap.png (val AP per evaluated epoch); `borders` marks stages."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    skip = {"epoch", "images_per_s", "lr", "seconds", "val"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in sorted({k for h in history for k in h if k not in skip}):
        ax.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=k)
    for b in borders or []:
        ax.axvline(b + 0.5, color="grey", ls="--")
    ax.set_xlabel("epoch"), ax.set_ylabel("training loss"), ax.set_yscale("log"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "loss.png", dpi=100), plt.close(fig)
    evals = [h for h in history if "val" in h]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in ("AP", "AP50", "AP75"):
            ax.plot([h["epoch"] for h in evals], [100 * h["val"][k] for h in evals], marker="o", label=k)
        for b in borders or []:
            ax.axvline(b + 0.5, color="grey", ls="--")
        ax.set_xlabel("epoch"), ax.set_ylabel("val AP (%)"), ax.legend()
        fig.tight_layout(), fig.savefig(out / "ap.png", dpi=100), plt.close(fig)
