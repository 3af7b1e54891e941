"""The `curriculum` command line.

    curriculum data shapes --out DIR [--train N --val N --size S --seed S --varied-sizes]
    curriculum zoo [--all] [--figures]
    curriculum train CONFIG [CONFIG ...] [--set section.key=value ...] [--resume]
    curriculum eval CHECKPOINT [--config CONFIG] [--out DIR]
    curriculum predict CHECKPOINT_OR_CONFIG IMAGE_OR_FOLDER... --out DIR [--score-thresh S] [--set key=value]
    curriculum export CHECKPOINT --format onnx|torchscript --out FILE [--image-size H W]
    curriculum latency CHECKPOINT... [--device cpu|cuda] [--threads N] [--batch 1]

Errors a user can fix (bad config, bad data, unknown model) are printed as one message, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from curriculum.errors import ConfigError, CurriculumError

log = logging.getLogger("curriculum")


def _fmt(v: float) -> str:
    return "  -  " if v is None or v < 0 else f"{100 * v:5.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of COCO metrics (x100) per model."""
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    masks = any("segm" in r.get("val", {}) for r in rows)  # Mask R-CNN: mask AP beside the box AP
    extra = " | mask AP | mask AP50" if masks else ""
    lines = ["| model | " + " | ".join(cols) + extra + " | train img/s |",
             "|---" * (len(cols) + 2 + 2 * masks) + "|"]
    for r in rows:
        val = r.get("val", {})
        segm = val.get("segm", {})
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(val.get(c, -1)) for c in cols)
                     + ("".join(f" | {_fmt(segm.get(c, -1))}" for c in ("AP", "AP50")) if masks else "")
                     + f" | {r.get('train_images_per_s', 0):.1f} |")
    return "\n".join(lines)


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from curriculum.shapes import make_shapes

    summary = make_shapes(args.out, train_images=args.train, val_images=args.val, image_size=args.size,
                          seed=args.seed, varied_sizes=args.varied_sizes)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from teachers.zoo import BACKBONES, build_detector, count_gflops, count_parameters, list_detectors

    names = list_detectors(builtin_only=not args.all)
    print(f"{'detector':34s} {'family':12s} {'params (M)':>10s} {'GFLOPs@128':>11s}" if args.figures
          else f"{'detector':34s} family")
    for name in names:
        family = "torchvision" if name.startswith("torchvision:") else BACKBONES[name.split("_", 1)[1]].family
        if args.figures:
            d = build_detector(name, 7)
            print(f"{name:34s} {family:12s} {count_parameters(d) / 1e6:10.2f} {count_gflops(d, 128):11.2f}")
        else:
            print(f"{name:34s} {family}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from curriculum.config import TrainJobConfig, load_config
    from teachers.zoo import check_detector_name
    from trainers.train import train_detector

    jobs = [load_config(c, TrainJobConfig, args.set) for c in args.configs]  # check every config first
    for path, job in zip(args.configs, jobs):
        try:
            check_detector_name(job.model.name)
        except CurriculumError as e:
            raise ConfigError(f"{path}: model.name: {e}") from None
    rows = []
    for path, job in zip(args.configs, jobs):
        log.info("training %s (%s) into %s", job.model.name, path, job.output_dir)
        rows.append(train_detector(job, resume=args.resume, progress=not args.quiet))
    table = format_table(rows)
    print("\nval metrics (COCO AP@[.5:.95] etc., x100)\n" + table)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table + "\n")
        Path(args.table).with_suffix(".json").write_text(
            json.dumps([{k: r[k] for k in ("name", "output_dir", "val", "train_images_per_s", "epochs")}
                        for r in rows], indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from curriculum.config import EvalConfig, TrainJobConfig, load_config
    from curriculum.shapes import ensure_builtin_data
    from teachers.zoo import load_detector
    from trainers.train import build_dataset, evaluate_model

    job = load_config(args.config, TrainJobConfig, args.set) if args.config else TrainJobConfig()
    ensure_builtin_data(job.data)
    ds = build_dataset(job.data, args.split)
    model = load_detector(args.checkpoint, trust=args.trust_checkpoint)
    if model.config.num_classes != ds.num_classes:
        raise CurriculumError(
            f"{args.checkpoint} predicts {model.config.num_classes - 1} classes but {ds.ann_file} has "
            f"{ds.num_classes - 1}: evaluate it on the data set it was trained for"
        )
    out = Path(args.out or Path(args.checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    e = EvalConfig(batch_size=job.eval.batch_size, max_images=args.max_images or job.eval.max_images)
    metrics = evaluate_model(model, ds, e, out / f"detections_{args.split}.json", progress=not args.quiet)
    (out / f"eval_{args.split}.json").write_text(json.dumps(metrics, indent=2))
    print(format_table([{"name": model.config.name, "val": metrics}]))
    print(f"detections: {out / f'detections_{args.split}.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from curriculum.predict import predict

    entries = predict(args.source, args.images, args.out, args.score_thresh, args.set, args.trust_checkpoint,
                      progress=not args.quiet)
    boxes = sum(len(e["boxes"]) for e in entries)
    print(f"{len(entries)} image(s), {boxes} box(es): {Path(args.out) / 'predictions.json'} and one PNG per image")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from curriculum.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.format, args.out, tuple(args.image_size) if args.image_size else None,
                          args.trust_checkpoint)
    print(f"{r['file']}: {r['format']}, input images {r['input']}, {r['bytes'] / 2**20:.1f} MiB; checked against the "
          f"model: {r['check_detections']} detections, boxes within {r['check_max_box_px']:.2g} px, scores within "
          f"{r['check_max_score']:.2g}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from curriculum.latency import format_rows, latency_of_checkpoints

    rows = latency_of_checkpoints(args.checkpoints, args.device, args.threads, args.batch, args.runs,
                                  tuple(args.image_size) if args.image_size else None, args.trust_checkpoint)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from curriculum.config import PrecomputeJobConfig, load_config
    from teachers.cache import format_inspect, inspect_cache
    from teachers.precompute import precompute

    job = load_config(args.config, PrecomputeJobConfig, args.set)
    reports = precompute(job, progress=not args.quiet)
    for r in reports:
        print(f"{r.teacher}: {r.cache}\n  shards {r.shards}: {len(r.computed)} computed, {r.already_done} already "
              f"done, {len(r.adopted)} adopted; {len(r.retried)} retried, {r.actors_replaced} actors replaced; "
              f"{r.images} images in {r.seconds:.1f} s ({r.images_per_s:.1f} img/s)")
        print("  " + format_inspect(inspect_cache(r.cache)).replace("\n", "\n  "))
    return 0


def cmd_cache_inspect(args: argparse.Namespace) -> int:
    from teachers.cache import find_caches, format_inspect, inspect_cache

    paths = find_caches(args.path) or [args.path]  # a cache root (all caches under it) or one cache folder
    infos = [inspect_cache(p) for p in paths]
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n\n".join(format_inspect(i) for i in infos))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from teachers.cache import find_caches
    from teachers.verify import verify_cache

    paths = find_caches(args.path) or [args.path]
    ok = True
    for p in paths:
        r = verify_cache(p, sample=args.sample, seed=args.seed, atol=args.atol)
        ok &= r["ok"]
        print(f"{p}: {'ok' if r['ok'] else 'MISMATCH'} ({r['checked']} rows recomputed with the live teacher)")
        for k, v in sorted(r.get("max_abs_error", {}).items()):
            print(f"  {k:32s} max |cached - live| {v:.3g}")
        for problem in r["problems"]:
            print(f"  {problem}")
    return 0 if ok else 1


def cmd_cache_rebuild(args: argparse.Namespace) -> int:
    from teachers.precompute import rebuild

    r = rebuild(args.path, args.shard, progress=not args.quiet)
    print(f"{args.path}: rebuilt shard(s) {r.computed}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from curriculum.pipeline import main_run

    return main_run(args.config, resume=args.resume, preset=args.preset, overrides=args.set, progress=not args.quiet,
                    base_dir=args.base_dir)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.config == "spaces":
        from tune_spaces import list_spaces

        for space in list_spaces():
            print(f"{space.name}: {space.doc}")
            for key, param in space.params.items():
                print(f"    {key}: {param.describe()}" + (f"  ({param.doc})" if param.doc else ""))
        return 0
    if not args.space:
        raise ConfigError("curriculum tune CONFIG needs --space NAME (or a YAML file); `curriculum tune spaces` "
                          "lists the named spaces")
    from tune_spaces.sweep import main_tune

    return main_tune(args.config, args.space, args.num_samples, scheduler=args.scheduler, name=args.name,
                     resume=args.resume, overrides=args.set, progress=not args.quiet, base_dir=args.base_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curriculum", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    shapes = data.add_parser("shapes", help="write the built-in synthetic COCO data set")
    shapes.add_argument("--out", required=True, help="output folder (train/ and val/ inside)")
    shapes.add_argument("--train", type=int, default=1200, help="training images (default 1200)")
    shapes.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    shapes.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--varied-sizes", action="store_true",
                        help="each image its own height and width: shorter side 0.75..1.25 x --size, "
                             "aspect ratio up to 2, landscape or portrait")
    shapes.set_defaults(func=cmd_data_shapes)

    zoo = sub.add_parser("zoo", help="list the detectors of the zoo")
    zoo.add_argument("--all", action="store_true", help="also the full-size members")
    zoo.add_argument("--figures", action="store_true", help="build each and print parameters and GFLOPs")
    zoo.set_defaults(func=cmd_zoo)

    train = sub.add_parser("train", help="train detectors without distillation, then evaluate them")
    train.add_argument("configs", nargs="+", help="YAML config(s); several are trained one after another")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=2")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of output_dir")
    train.add_argument("--table", help="also write the metrics table (Markdown, and JSON beside it)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="COCO evaluation of a detector checkpoint")
    ev.add_argument("checkpoint", help="a model.pt written by `curriculum train`")
    ev.add_argument("--config", help="config naming the data (default: the built-in data set)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--split", choices=("val", "train"), default="val")
    ev.add_argument("--out", help="folder for eval_<split>.json and detections_<split>.json")
    ev.add_argument("--max-images", type=int, default=0)
    ev.add_argument("--trust-checkpoint", action="store_true",
                    help="load with weights_only=False (only for files you trust)")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="boxes of a detector on images: predictions.json and drawn PNGs")
    pr.add_argument("source", help="a checkpoint (model.pt, student.pt) or a YAML whose model section names the "
                                   "detector and weights and whose data section gives the resize")
    pr.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    pr.add_argument("--out", required=True, help="folder for predictions.json and <image stem>.png")
    pr.add_argument("--score-thresh", type=float, default=None, help="keep boxes scoring at least this")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="e.g. data.min_size=640 or model.nms_thresh=0.6")
    pr.add_argument("--trust-checkpoint", action="store_true",
                    help="load with weights_only=False (only for files you trust)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="a checkpoint as ONNX or TorchScript, post-processing in the graph")
    ex.add_argument("checkpoint", help="a model.pt or student.pt")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    ex.add_argument("--out", required=True, help="the file to write (e.g. student.onnx)")
    ex.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                    help="input size of the graph (default: the checkpoint's; needed for keep-ratio inputs)")
    ex.add_argument("--trust-checkpoint", action="store_true",
                    help="load with weights_only=False (only for files you trust)")
    ex.set_defaults(func=cmd_export)

    la = sub.add_parser("latency", help="ms per image of checkpoints: eager PyTorch and onnxruntime")
    la.add_argument("checkpoints", nargs="+")
    la.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    la.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and onnxruntime)")
    la.add_argument("--batch", type=int, default=1, help="images per eager call (onnxruntime: always 1)")
    la.add_argument("--runs", type=int, default=30, help="timed runs after 3 warm-up runs")
    la.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    la.add_argument("--json", help="also write the rows as JSON")
    la.add_argument("--trust-checkpoint", action="store_true")
    la.set_defaults(func=cmd_latency)

    pre = sub.add_parser("precompute", help="run the teacher pool (Ray actors) over the data and write the cache")
    pre.add_argument("config", help="YAML: data, teachers (checkpoint, actors, cpus/gpus per actor), cache")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_precompute)

    cache = sub.add_parser("cache", help="teacher caches").add_subparsers(dest="cache_command", required=True)
    ins = cache.add_parser("inspect", help="teachers, views, images, bytes per image per target kind, completeness")
    ins.add_argument("path", help="a cache root or one cache folder (local path or URI)")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_cache_inspect)
    ver = cache.add_parser("verify", help="recompute a random sample with the live teacher and compare")
    ver.add_argument("path", help="a cache root or one cache folder")
    ver.add_argument("--sample", type=int, default=8, help="images to recompute per cache (default 8)")
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--atol", type=float, default=1e-4,
                     help="float noise allowed, relative to max(1, max|live|), on top of one step of the codec")
    ver.set_defaults(func=cmd_cache_verify)
    reb = cache.add_parser("rebuild", help="recompute some shards of a cache alone (e.g. one reported corrupt)")
    reb.add_argument("path", help="one cache folder")
    reb.add_argument("--shard", type=int, action="append", required=True, help="shard number (repeatable)")
    reb.add_argument("--quiet", action="store_true")
    reb.set_defaults(func=cmd_cache_rebuild)
    run = sub.add_parser("run", help="the progressive curriculum: teachers, cache, stages on Ray Train, report")
    run.add_argument("config", help="YAML run config (configs/run_default.yaml is the built-in default)")
    run.add_argument("--resume", action="store_true", help="continue a run in output_dir (finished stages are kept)")
    run.add_argument("--preset", choices=("quick",), help="shorter schedules for a first look (output_dir_<preset>)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set trainer.num_workers=1")
    run.add_argument("--base-dir", help="relative paths of the config are taken from here (default: the current "
                     "directory; under `ray job submit --working-dir .` pass \"$PWD\")")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    tune = sub.add_parser("tune", help="Ray Tune sweep over loss weights and decay schedules, sharing one teacher "
                          "cache; `curriculum tune spaces` lists the search spaces")
    tune.add_argument("config", help="YAML run config (as for `curriculum run`), or `spaces` to list the spaces")
    tune.add_argument("--space", help="a named search space (tune_spaces) or a YAML file of one")
    tune.add_argument("--num-samples", type=int, default=8,
                      help="samples of the space (each a full grid when it has grid parameters), plus the trial of "
                      "the config's own values (tune.include_default); default 8")
    tune.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), help="default: the config's tune.scheduler")
    tune.add_argument("--name", help="sweep name (default: <space>-<scheduler>); its folder is <tune dir>/<name>")
    tune.add_argument("--resume", action="store_true", help="continue a stopped sweep (finished trials are kept)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set tune.cpus_per_trial=2")
    tune.add_argument("--base-dir", help="relative paths of the config are taken from here (see `run`)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except CurriculumError as e:
        print(f"curriculum: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curriculum: interrupted; checkpoints written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
