"""Each distillation method alone against the student without distillation (issue 4's report table).

On the built-in shapes data set (generated under data/shapes when missing), with a built-in teacher run
inline: the student (default ``retinanet_mobilenetv3_micro``, ``configs/student.yaml`` schedule) is trained
once without distillation and once with each method alone, same schedule, same seed, same data order.
The teacher runs in eval mode under ``torch.no_grad`` on every training batch
(``TeacherTargets.inline``), its targets feed the distiller through
``trainers.train.train_one_epoch(extra_loss=...)``, and the student's val COCO AP is compared.

    .venv/bin/python bench/distill_methods.py                                   # the full schedule
    .venv/bin/python bench/distill_methods.py --epochs 1 --train-limit 10 \\
        --eval-limit 50 --methods baseline,mgd --out runs/bench_distill_quick   # a quick check
    .venv/bin/python bench/distill_methods.py --two-stage                       # also the Faster R-CNN pair

Teacher: ``--teacher CHECKPOINT``, else ``runs/<teacher config output_dir>/model.pt``, trained first with
``trainers.train.train_detector`` when missing. The two-stage pair (``--two-stage``: TAR, which needs an RoI
head, against its baseline) uses ``fasterrcnn_resnet_mini`` as student and ``fasterrcnn_resnet18_half`` as
teacher (``--two-stage-teacher CHECKPOINT``, or trained from ``configs/teacher_resnet18_half.yaml`` with the
model name changed).

Methods (``--methods``; ``baseline`` is no distillation):
    ``mgd`` (MGD on every FPN level), ``zhang`` (Zhang & Ma feature + attention + non-local, one-stage or
    two-stage preset), ``chen`` (Chen et al. soft CE + bounded regression on the dense head, or on the RPN and
    the RoI head of a two-stage student, + adapted hint), ``hinton_kd`` (on the dense / RoI classification
    head), ``fitnet`` (hint on every FPN level), ``tar`` (two-stage only: TAR feature + class + box transfer,
    with TAR's linear distillation decay; every other method runs without decay).

Loss weights (``--weights``; the choice is ours, the numbers are stored in the JSON). The authors tuned
their weights on COCO at about 800 x 1333 (padded to 800 x 1344) with 256-channel FPNs and 2 images per
GPU; here the input is 128 x 128, the teacher FPN has 64 channels and the batch is 8. Head terms (Chen's
soft CE and bounded regression, Hinton KD, TAR's class and box terms) are per-row means on the scale of
the detector's own losses: they keep the authors' (or the project's) weights in every mode. Feature terms
(MGD, Zhang & Ma, Chen's hint, FitNet, TAR's feature term) depend on the sizes and on the teachers'
feature magnitudes:

- ``authors``: the authors' values unchanged (MGD alpha 2e-5; Zhang one-stage preset; Chen gamma 0.5;
  FitNet and TAR 1, project values).
- ``scaled``: sizes only. MGD sums over C x H x W per image: ``alpha * E_authors / E_here`` (E the
  teacher-shaped elements per image, ``C_T * sum_levels H_l W_l``; x263 for the one-stage pair). Zhang's
  feature and non-local losses are L2 norms over the batch: ``w * sqrt(B_a E_a / (B E))`` (x8.1); the
  spatial part of the attention loss, an L2 norm over N x H x W: ``w_a * sqrt(B_a P_a / (B P))`` (x4.1).
  This keeps the authors' balance only if the per-element errors were alike, and they are not: the
  built-in teacher's FPN maps have an RMS of 2 to 9 (p6/p7 largest), so these weights make MGD about 1500x
  and FitNet about 90x the detector's loss at the start.
- ``calibrated`` (default): ``scaled``, then every feature term of the method is multiplied by one factor
  chosen so that, on the first ``--calib-batches`` training batches with the student at its initialisation
  (no update; the student, the adapters and the RNG are restored afterwards), the method's feature terms
  add up to ``--kd-ratio`` (default 1.0) times the detector's loss. The balance inside a method (Zhang's
  feature : attention : non-local) is the scaled one; head terms are left as they are.

The detector's own loss terms the distiller asks to scale (Chen's mu on the classification loss) are
returned by the extra-loss function under the detector's own names, so they replace the unscaled ones.

Outputs (``--out``, default runs/bench_distill): per run ``<pair>/<method>/model.pt`` (the student only,
loadable with ``teachers.zoo.load_detector``; adapters are not in it), ``distiller.pt`` (the adapters'
state, training state only) and ``result.json``; ``results.json`` and ``results.md`` for all runs. A run
whose ``result.json`` exists is not repeated (``--rerun`` repeats it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curriculum.config import EvalConfig, TrainJobConfig, load_config  # noqa: E402
from curriculum.data import collate_fn  # noqa: E402
from curriculum.seeds import derive_seed, seed_everything  # noqa: E402
from curriculum.shapes import ensure_builtin_data  # noqa: E402
from teachers.zoo import Detector, build_detector, load_detector  # noqa: E402
from trainers.distill import build_distiller, decay_factor  # noqa: E402
from trainers.distill.mgd import PRESETS as MGD_PRESETS  # noqa: E402
from trainers.distillation import DistillStep, InlineSource, feature_factors  # noqa: E402
from trainers.distill.zhang2021 import PRESETS as ZHANG_PRESETS  # noqa: E402
from trainers.train import (  # noqa: E402
    build_dataset,
    evaluate_model,
    make_loader,
    make_optimizer,
    make_scheduler,
    train_detector,
    train_one_epoch,
)

ONE_STAGE_METHODS = ("baseline", "mgd", "zhang", "chen", "hinton_kd", "fitnet")
TWO_STAGE_METHODS = ("baseline", "tar")
ALL_METHODS = ("baseline", "mgd", "zhang", "chen", "hinton_kd", "fitnet", "tar")
METRICS = ("AP", "AP50", "APs", "APm")

# The authors' setting the published weights were tuned for (mmdetection COCO configs).
AUTHORS = {
    "input": (800, 1344),  # 800 x 1333 padded to a multiple of 32
    "channels": 256,  # FPN channels of the teachers
    "batch": 2,  # images per GPU: the losses are computed per GPU
    "strides": {"one_stage": (8, 16, 32, 64, 128), "two_stage": (4, 8, 16, 32, 64)},
}


# ------------------------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class Scale:
    """Weight factors of the size-dependent losses (see the module docstring)."""

    sum: float = 1.0  # MGD: per-image sums over C x H x W
    norm: float = 1.0  # Zhang feature / non-local: L2 norm over the batch's N x C x H x W
    spatial_norm: float = 1.0  # Zhang attention, spatial part: L2 norm over N x H x W


def _positions(size: tuple[int, int], strides: tuple[int, ...]) -> int:
    return sum(math.ceil(size[0] / s) * math.ceil(size[1] / s) for s in strides)


def weight_scale(kind: str, teacher: Detector, batch: int, mode: str) -> Scale:
    if mode == "authors":
        return Scale()
    # "scaled", and the starting point of "calibrated"
    size = teacher.config.image_size
    p_here = _positions((size, size), teacher.backbone.strides)
    e_here = teacher.backbone.out_channels * p_here  # every FPN level has the same channels
    p_auth = _positions(AUTHORS["input"], AUTHORS["strides"][kind])
    e_auth = AUTHORS["channels"] * p_auth
    b_auth = AUTHORS["batch"]
    return Scale(
        sum=e_auth / e_here,
        norm=math.sqrt(b_auth * e_auth / (batch * e_here)),
        spatial_norm=math.sqrt(b_auth * p_auth / (batch * p_here)),
    )


def method_entries(method: str, kind: str, s: Scale) -> list[dict[str, Any]]:
    """The distiller config of one method for a one-stage or two-stage pair."""
    if method == "baseline":
        return []
    if method == "mgd":
        preset = "retinanet" if kind == "one_stage" else "mask_rcnn"
        return [{"name": "mgd", "preset": preset, "alpha": MGD_PRESETS[preset]["alpha"] * s.sum}]
    if method == "zhang":
        d = ZHANG_PRESETS[kind]
        return [
            {"name": "zhang_feature", "preset": kind, "w_f": d["w_f"] * s.norm},
            {"name": "zhang_attention", "preset": kind, "w_a": d["w_a"] * s.spatial_norm},
            {"name": "zhang_nonlocal", "preset": kind, "w_n": d["w_n"] * s.norm},
        ]
    if method == "chen":
        if kind == "one_stage":
            heads = [{"name": "chen_cls", "head": "dense"}, {"name": "chen_reg", "head": "dense"}]
        else:
            # The paper's setting: both terms on the RPN and on the RoI head ("RCN"), plus the hint.
            heads = [{"name": n, "head": h} for h in ("rpn", "roi") for n in ("chen_cls", "chen_reg")]
        return [*heads, {"name": "chen_hint"}]
    if method == "hinton_kd":
        return [{"name": "hinton_kd", "head": "dense" if kind == "one_stage" else "roi"}]
    if method == "fitnet":
        return [{"name": "fitnet"}]
    if method == "tar":
        if kind != "two_stage":
            raise SystemExit("method 'tar' needs an RoI head: it runs on the two-stage pair only (--two-stage)")
        return [{"name": "tar_feature"}, {"name": "tar_cls"}, {"name": "tar_box"}]
    raise SystemExit(f"unknown method {method!r}; choose from {list(ALL_METHODS)}")


def method_decay(method: str) -> str:
    return "linear" if method == "tar" else "constant"  # TAR's distillation decay; the others have none


# ------------------------------------------------------------------------------------------------ one run


def _row_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(100.0 * float(metrics[k]), 2) if float(metrics[k]) >= 0 else -1.0 for k in METRICS}


def run_one(method: str, kind: str, job: TrainJobConfig, student_name: str, teacher: Detector,
            datasets: tuple, scale: Scale, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    train_ds, val_ds = datasets
    t = job.train
    seed_everything(t.seed)
    student = build_detector(student_name, train_ds.num_classes, image_size=job.data.image_size,
                             **job.model.overrides())
    if student.config.image_size != teacher.config.image_size:
        raise SystemExit(f"student input {student.config.image_size} px but teacher {teacher.config.image_size} px: "
                         "head and proposal distillation need the same input size")
    entries = method_entries(method, kind, scale)
    distiller = build_distiller(entries, student.level_channels, teacher.level_channels) if entries else None
    factor = None
    source = InlineSource(teacher, distiller.required_teacher_targets()) if distiller is not None else None
    if distiller is not None and args.weights == "calibrated":
        first = [datasets[0][i] for i in range(min(len(train_ds), args.calib_batches * t.batch_size))]
        batches = [collate_fn(first[i:i + t.batch_size]) for i in range(0, len(first), t.batch_size)]
        factors = feature_factors(student, distiller, batches, source, args.kd_ratio, t.seed)
        for key, f in factors.items():
            distiller.weights[key] *= f
        factor = next(iter(factors.values()), None)
        print(f"  [{kind}/{method}] feature terms x {factor:.4g} (calibrated to {args.kd_ratio} x the detector "
              f"loss at the start)" if factor is not None else f"  [{kind}/{method}] no feature term to calibrate",
              flush=True)
    # The adapters train with the student: one optimiser over both (grad clipping covers the student only).
    params = [*student.parameters(), *(distiller.parameters() if distiller is not None else [])]
    opt = make_optimizer(params, t)
    loader = make_loader(train_ds, t.batch_size, shuffle=True, seed=t.seed, workers=job.data.workers)
    iters = min(len(loader), t.max_iters_per_epoch or len(loader))
    sched = make_scheduler(opt, t, iters * t.epochs)
    generator = torch.Generator().manual_seed(t.seed)  # MGD's random masks, one stream over the epochs
    history = []
    start = time.perf_counter()
    for epoch in range(t.epochs):
        train_ds.set_epoch(epoch)
        loader.generator.manual_seed(derive_seed(t.seed, "loader", epoch))
        extra = None
        if distiller is not None:
            decay = decay_factor(method_decay(method), epoch + 1, t.epochs)
            extra = DistillStep(source, distiller, decay, generator)
            distiller.train()
        stats = train_one_epoch(student, loader, opt, sched, t, epoch, progress=args.progress, extra_loss=extra)
        history.append({"epoch": epoch + 1, **stats})
        terms = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k not in ("images_per_s", "lr", "seconds"))
        print(f"  [{kind}/{method}] epoch {epoch + 1}/{t.epochs}: {stats['images_per_s']:.1f} img/s; {terms}",
              flush=True)
    train_s = time.perf_counter() - start
    metrics = evaluate_model(student, val_ds, EvalConfig(job.eval.batch_size, args.eval_limit), progress=False)
    wall_s = time.perf_counter() - start
    run_dir = out_dir / kind / method
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = student.checkpoint(extra={"distillation": {"method": method, "teacher": teacher.config.weights}})
    assert set(ckpt["model"]) == set(student.state_dict()), "the student checkpoint must hold the student only"
    torch.save(ckpt, run_dir / "model.pt")
    if distiller is not None:
        torch.save({"entries": entries, "state": distiller.state_dict()}, run_dir / "distiller.pt")
    row = {
        "pair": kind, "method": method, "student": student_name, "teacher": teacher.config.name,
        **_row_metrics(metrics), "train_s": round(train_s, 1), "wall_s": round(wall_s, 1),
        "images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
        "epochs": t.epochs, "iters_per_epoch": iters, "entries": entries, "decay": method_decay(method),
        "calibration_factor": factor,
        "effective_weights": dict(distiller.weights) if distiller is not None else {},
        "history": history,
    }
    (run_dir / "result.json").write_text(json.dumps(row, indent=2))
    return row


# ------------------------------------------------------------------------------------------------ teachers


def pair_job(job: TrainJobConfig, kind: str, args: argparse.Namespace) -> TrainJobConfig:
    """The student schedule of one pair: the two-stage pair may have its own epochs (`--two-stage-epochs`)."""
    if kind != "two_stage" or not args.two_stage_epochs:
        return job
    return dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=args.two_stage_epochs))


def ensure_teacher(checkpoint: str | None, config: Path, name: str | None, args: argparse.Namespace) -> Detector:
    """Load the teacher checkpoint, or train the teacher of `config` (model name `name` if given) first."""
    if checkpoint is None:
        overrides = [f"train.num_threads={args.threads}"]
        if args.data_root:
            overrides.append(f"data.root={args.data_root}")
        if name is not None:
            overrides += [f"model.name={name}", f"output_dir=runs/teacher_{name}"]
        if name is not None and args.two_stage_teacher_epochs:
            overrides += [f"train.epochs={args.two_stage_teacher_epochs}",
                          f"output_dir=runs/teacher_{name}_e{args.two_stage_teacher_epochs}"]
        job = load_config(config, overrides=overrides)
        path = Path(job.output_dir) / "model.pt"
        if not path.is_file():
            print(f"training the teacher {job.model.name} ({config}) into {job.output_dir}", flush=True)
            resume = (Path(job.output_dir) / "checkpoints" / "last.pt").exists()
            train_detector(job, resume=resume, progress=args.progress)
        checkpoint = str(path)
    teacher = load_detector(checkpoint)
    teacher.eval().requires_grad_(False)  # frozen: the targets are detached anyway
    return teacher


# ------------------------------------------------------------------------------------------------ table


def markdown(rows: list[dict[str, Any]], teachers: dict[str, dict[str, Any]], command: str,
             data: dict[str, Any]) -> str:
    made = f" ({data['generator']} version {data.get('version')}, seed {data.get('params', {}).get('seed')})" \
        if "generator" in data else ""
    lines = [
        "# Distillation methods, each alone, against the student without distillation",
        "",
        f"Command: `{command}`",
        "",
        f"Data: `{data['root']}`{made}.",
        "",
        "Val COCO AP x100 on the built-in shapes data set; same schedule, seed and data order for every run of a "
        "pair; teacher run inline (eval, no grad). Wall time: training + evaluation of the run.",
        "",
    ]
    for kind in ("one_stage", "two_stage"):
        sel = [r for r in rows if r["pair"] == kind]
        if not sel:
            continue
        base = next((r for r in sel if r["method"] == "baseline"), None)
        tch = teachers.get(kind, {})
        lines += [
            f"## {kind}: student {sel[0]['student']}, teacher {sel[0]['teacher']}"
            + (f" (teacher AP {tch['AP']:.2f}, AP50 {tch['AP50']:.2f})" if "AP" in tch else ""),
            "",
            "| method | AP | AP50 | APs | APm | dAP vs baseline | train img/s | wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sel:
            d = f"{r['AP'] - base['AP']:+.2f}" if base is not None and r is not base else "-"
            lines.append(f"| {r['method']} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['APs']:.2f} | {r['APm']:.2f} | "
                         f"{d} | {r['images_per_s']:.1f} | {r['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-config", type=Path, default=ROOT / "configs" / "student.yaml")
    p.add_argument("--teacher-config", type=Path, default=ROOT / "configs" / "teacher_resnet_mini.yaml")
    p.add_argument("--teacher", help="teacher checkpoint (default: the teacher config's output_dir/model.pt)")
    p.add_argument("--methods", default=",".join(ONE_STAGE_METHODS),
                   help=f"comma list for the one-stage pair (default: %(default)s; choices {ALL_METHODS})")
    p.add_argument("--two-stage", action="store_true", help="also run the two-stage pair (TAR and its baseline)")
    p.add_argument("--two-stage-methods", default=",".join(TWO_STAGE_METHODS))
    p.add_argument("--two-stage-student", default="fasterrcnn_resnet_mini")
    p.add_argument("--two-stage-teacher", help="two-stage teacher checkpoint (default: trained when missing)")
    p.add_argument("--two-stage-teacher-config", type=Path, default=ROOT / "configs" / "teacher_resnet18_half.yaml")
    p.add_argument("--two-stage-teacher-name", default="fasterrcnn_resnet18_half")
    p.add_argument("--two-stage-teacher-epochs", type=int,
                   help="train the two-stage teacher for this many epochs (default: its config's)")
    p.add_argument("--two-stage-epochs", type=int, help="the two-stage pair's student epochs (default: --epochs)")
    p.add_argument("--epochs", type=int, help="override the schedule's epochs")
    p.add_argument("--train-limit", type=int, default=0, help="max iterations per epoch (0: the whole split)")
    p.add_argument("--data-root", help="override data.root (e.g. a snapshot of data/shapes that no one rewrites "
                                        "during the runs); the teacher is trained on it too")
    p.add_argument("--seed", type=int, help="override the schedule's seed (student init, data order, masks)")
    p.add_argument("--eval-limit", type=int, default=0, help="max val images (0: all)")
    p.add_argument("--weights", choices=("calibrated", "scaled", "authors"), default="calibrated",
                   help="feature-term weights (see the module docstring; default %(default)s)")
    p.add_argument("--kd-ratio", type=float, default=1.0,
                   help="calibrated: feature terms / detector loss at the start (default %(default)s)")
    p.add_argument("--calib-batches", type=int, default=4, help="calibrated: batches measured (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_distill"))
    p.add_argument("--rerun", action="store_true", help="repeat runs whose result.json exists")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)

    overrides = [f"train.num_threads={args.threads}", f"train.max_iters_per_epoch={args.train_limit}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    job = load_config(args.student_config, overrides=overrides)
    ensure_builtin_data(job.data)
    datasets = tuple(build_dataset(job.data, split, seed=job.train.seed) for split in ("train", "val"))
    generator = Path(job.data.root) / "shapes.json"  # the built-in data set says how it was made
    data_info = {"root": job.data.root, **({k: v for k, v in json.loads(generator.read_text()).items()
                                             if k in ("generator", "version", "params")} if generator.is_file() else {})}

    plan = [("one_stage", m, job.model.name) for m in args.methods.split(",") if m]
    if args.two_stage:
        plan += [("two_stage", m, args.two_stage_student) for m in args.two_stage_methods.split(",") if m]
    for kind, m, _ in plan:
        method_entries(m, kind, Scale())  # fail on a bad method name before any training

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    teachers: dict[str, dict[str, Any]] = {}
    scales: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(k for k, _, _ in plan):
        if kind == "one_stage":
            teacher = ensure_teacher(args.teacher, args.teacher_config, None, args)
        else:
            teacher = ensure_teacher(args.two_stage_teacher, args.two_stage_teacher_config,
                                     args.two_stage_teacher_name, args)
        scale = weight_scale(kind, teacher, job.train.batch_size, args.weights)
        scales[kind] = scale.__dict__
        t_metrics = evaluate_model(teacher, datasets[1], EvalConfig(job.eval.batch_size, args.eval_limit),
                                   progress=False)
        teachers[kind] = {"name": teacher.config.name, "checkpoint": teacher.config.weights, **_row_metrics(t_metrics)}
        print(f"{kind}: teacher {teacher.config.name} val AP {teachers[kind]['AP']:.2f}; weight factors {scale}",
              flush=True)
        for k, method, student_name in plan:
            if k != kind:
                continue
            result = args.out / kind / method / "result.json"
            if result.is_file() and not args.rerun:
                print(f"[{kind}/{method}] kept from {result}", flush=True)
                rows.append(json.loads(result.read_text()))
            else:
                print(f"[{kind}/{method}] training {student_name}", flush=True)
                rows.append(run_one(method, kind, pair_job(job, kind, args), student_name, teacher, datasets, scale,
                                    args, args.out))
            r = rows[-1]
            print(f"[{kind}/{method}] AP {r['AP']:.2f} AP50 {r['AP50']:.2f} APs {r['APs']:.2f} APm {r['APm']:.2f} "
                  f"in {r['wall_s']:.0f} s", flush=True)
            summary = {"command": command, "data": data_info, "weights": args.weights, "kd_ratio": args.kd_ratio,
                       "weight_factors": scales, "teachers": teachers,
                       "runs": [{k: v for k, v in r.items() if k != "history"} for r in rows]}
            (args.out / "results.json").write_text(json.dumps(summary, indent=2))
            (args.out / "results.md").write_text(markdown(rows, teachers, command, data_info))
    print()
    print(markdown(rows, teachers, command, data_info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
