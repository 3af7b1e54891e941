"""The cache's size against the distillation gain it keeps: one point per compression setting, for MGD and FitNet.

Every run is the default run's direct arm (`configs/run_default.yaml`: its student, its schedule of 9 epochs, its
strongest teacher `fcos_swin_mini`, trained once and reused from `teachers_dir`) with one feature loss and one
`cache.compression`; the caches of all settings live side by side under `cache.root` (the setting is part of a cache's
key), and both losses read the same cache of a setting. Per seed, one run also trains the student alone (the
baseline, `baseline: true`).

For each loss and setting: `ap` (mean over the seeds of the final val AP, 0 to 1, as in eval.json) and
`ap_gain_kept = (ap - baseline) / (ap_fp32 - baseline)`, the share of the gain that dense fp32 targets give with the
same loss (the reference row `fp32` keeps 1.0 by definition). Size: `bytes_per_image` is the cache's bytes per
image and view (Parquet + zstd, as `curriculum cache inspect` counts them); `bytes_per_image_coco` projects it to a
RetinaNet-R50-sized teacher at COCO size, the issue's reference: feature bytes x (800 x 1333) / (H x W) of the
images here x 256 / (the teacher's FPN channels), for a projected (`pca`) setting x 1 instead (its stored channels
do not grow with the teacher's, though a 256-channel teacher may leave more of its variance outside r components:
each projected row records the share left out here, `variance_left_out`, per level), plus the per-row index bytes.
Box-region settings are projected with the shapes' box coverage, which is not COCO's. A setting with
`features: components` reads the same cache as its twin, the losses targeting the components themselves
(`cache.features: components`: adapters and MGD's generation blocks of r channels).

Writes `bench/results/cache_frontier.json` (`{"rows": [{"setting", "loss", "bytes_per_image",
"bytes_per_image_coco", "ap", "ap_gain_kept", "aps"}, ...], "baseline": [AP per seed], ...}`, after every run: a
cut-short benchmark keeps its rows) and a PNG of the frontier; prints the table. Finished runs are reused.

    python bench/cache_frontier.py                                  # every setting, MGD and FitNet, seeds 0 1
    python bench/cache_frontier.py --settings fp32 int8+pool2 --losses mgd --seeds 0
    python bench/cache_frontier.py --seeds 0 1 --settings-other-seeds int8 int8+pca32   # seed 1: fewer settings
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COCO_HW = (800, 1333)
COCO_CHANNELS = 256  # RetinaNet-R50's FPN, the issue's reference teacher
MIB = 1 << 20

# name: the run config's cache.compression. fp32 first: the reference every other setting is measured against.
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "fp32"},
    "fp16": {"dtype": "fp16"},
    "int8": {"dtype": "int8"},
    "fp16+pool2": {"dtype": "fp16", "features_region": "pooled", "pool": 2},
    "int8+pool2": {"dtype": "int8", "features_region": "pooled", "pool": 2},
    "int8+pool4": {"dtype": "int8", "features_region": "pooled", "pool": 4},
    "int8+boxes": {"dtype": "int8", "features_region": "boxes", "box_dilation": 0.5},
    "int8+pca32": {"dtype": "int8", "pca": 32},
    "int8+pca16": {"dtype": "int8", "pca": 16},
    "int8+pca16+pool2": {"dtype": "int8", "pca": 16, "features_region": "pooled", "pool": 2},
    # the same cache as int8+pca32, the losses targeting its components (`cache.features: components`)
    "int8+pca32+components": {"dtype": "int8", "pca": 32, "features": "components"},
    # the same for 16: MGD's generation blocks on 16 channels, about a quarter of their arithmetic at 32
    "int8+pca16+components": {"dtype": "int8", "pca": 16, "features": "components"},
    # between the two: MGD's generation blocks on 24 channels, about 56% of their arithmetic at 32
    "int8+pca24+components": {"dtype": "int8", "pca": 24, "features": "components"},
}
LOSSES: dict[str, dict[str, Any]] = {"mgd": {"name": "mgd", "preset": "retinanet"}, "fitnet": {"name": "fitnet"}}


def run_overrides(config: str, loss: str, setting: str, seed: int, out: Path, baseline: bool) -> list[str]:
    """One run: the config's strongest teacher alone for all the epochs, with `loss` on a `setting` cache."""
    raw = yaml.safe_load(Path(config).read_text())
    epochs = sum(int(s.get("epochs", 1)) for s in raw["stages"])
    comp = dict(SETTINGS[setting])
    features = comp.pop("features", "teacher")
    return [f"teachers={json.dumps([raw['teachers'][-1]])}", f"stages={json.dumps([{'epochs': epochs}])}",
            f"losses={json.dumps([LOSSES[loss]])}", f"cache.compression={json.dumps(comp)}", f"cache.features={features}",
            f"train.seed={seed}", "order=given", f"baseline={'true' if baseline else 'false'}", "direct=false",
            f"output_dir={out / f'seed{seed}' / loss / setting}"]


def cache_size(job: Any) -> dict[str, Any]:
    """Bytes per image and view of the run's teacher cache, and the projection to COCO (module docstring)."""
    from curriculum.config import CacheConfig
    from teachers.cache import find_caches, inspect_cache, target_spec

    teacher = job.teachers[-1].name
    want = target_spec(CacheConfig(compression=job.cache.compression))["compression"]
    for path in find_caches(job.cache.root):
        info = inspect_cache(path)
        if (info["teacher"] or {}).get("name") == teacher and info["compression"] == want and info["complete"]:
            break
    else:
        raise FileNotFoundError(f"no complete cache of {teacher} with compression {want} under {job.cache.root}")
    views = len(info["views"]["views"])
    by_kind = {k: v / views for k, v in info["bytes_per_image_by_kind"].items()}
    channels = max(info["teacher"]["level_channels"].values())
    return {"bytes_per_image": info["bytes_per_image"] / views, "features_bytes": by_kind.get("features", 0.0),
            "other_bytes": sum(v for k, v in by_kind.items() if k != "features"), "channels": channels,
            "pixels": job.data.image_size ** 2, "projected": bool(want.get("pca")),
            "variance_left_out": (info["projection"] or {}).get("residual")}


def coco_bytes(size: dict[str, Any]) -> float:
    """`bytes_per_image_coco` of a setting (module docstring)."""
    scale = COCO_HW[0] * COCO_HW[1] / size["pixels"]
    if not size["projected"]:
        scale *= COCO_CHANNELS / size["channels"]
    return size["features_bytes"] * scale + size["other_bytes"]


def frontier_rows(runs: dict[tuple[str, str], dict[str, Any]], baseline: dict[int, float]) -> list[dict[str, Any]]:
    """One row per (loss, setting) from its runs ({"aps": {seed: AP}, "size": cache_size}); the gain kept is taken
    against the same loss's fp32 row on the seeds both have, the mean baseline of those seeds subtracted."""
    rows = []
    for (loss, setting), r in runs.items():
        ref = runs.get((loss, "fp32"))
        seeds = sorted(r["aps"])
        ap = statistics.mean(r["aps"][s] for s in seeds)
        kept = None
        if ref is not None:
            common = [s for s in seeds if s in ref["aps"] and s in baseline]
            if common:
                base = statistics.mean(baseline[s] for s in common)
                gain = statistics.mean(ref["aps"][s] for s in common) - base
                mine = statistics.mean(r["aps"][s] for s in common) - base
                kept = mine / gain if gain > 0 else None
        rows.append({"setting": setting, "loss": loss, "bytes_per_image": round(r["size"]["bytes_per_image"]),
                     "bytes_per_image_coco": round(coco_bytes(r["size"])), "ap": ap,
                     "ap_gain_kept": None if kept is None else round(kept, 3),
                     "aps": [r["aps"][s] for s in seeds], "seeds": seeds,
                     **({"variance_left_out": r["size"]["variance_left_out"]}
                        if r["size"].get("variance_left_out") else {})})
    return rows


def variance_left_out(checkpoints: list[str], data: Any, ranks: tuple[int, ...] = (16, 32, 64), images: int = 64
                      ) -> dict[str, dict[str, Any]]:
    """Share of each FPN level's variance outside r principal components (`compression.pca`'s fit, on `images`
    training images), for other teachers than the benchmark's: how far its r carries over to wider FPNs."""
    from teachers.outputs import load_teacher
    from teachers.precompute import fit_teacher_projection, open_dataset

    images_dir, ann = data.split_paths("train")
    ds = open_dataset(str(images_dir), str(ann), data.resize_spec("train"), data.on_bad_box)
    out: dict[str, dict[str, Any]] = {}
    for ckpt in checkpoints:
        det = load_teacher(ckpt)
        channels = max(det.level_channels.values())
        out[det.config.name] = {"checkpoint": str(ckpt), "channels": channels, "left_out": {
            str(r): fit_teacher_projection(det, ds, r, images).residual for r in ranks if r < channels}}
    return out


def recommend(rows: list[dict[str, Any]], loss: str, kept: float = 0.9, budget: float = MIB) -> dict[str, Any] | None:
    """The smallest setting of `loss` that keeps at least `kept` of the gain and fits `budget` at COCO size; else
    the smallest one keeping the gain (None when there is none)."""
    ok = [r for r in rows if r["loss"] == loss and r["ap_gain_kept"] is not None and r["ap_gain_kept"] >= kept]
    fits = [r for r in ok if r["bytes_per_image_coco"] <= budget]
    pool = fits or ok
    return min(pool, key=lambda r: r["bytes_per_image_coco"]) if pool else None


def summarize(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [f"Student {result['student']} from {result['teacher']} alone, {result['epochs']} epochs, seeds "
             f"{result['seeds']}; baseline (student alone) {', '.join(f'{100 * v:.2f}' for v in base)} AP.", "",
             "| loss | setting | KiB/image here | MiB/image at COCO (R50) | AP | gain kept | AP per seed |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["loss"], -r["bytes_per_image_coco"])):
        kept = "-" if r["ap_gain_kept"] is None else f"{100 * r['ap_gain_kept']:.0f}%"
        lines.append(f"| {r['loss']} | {r['setting']} | {r['bytes_per_image'] / 1024:.1f} | "
                     f"{r['bytes_per_image_coco'] / MIB:.2f} | {100 * r['ap']:.2f} | {kept} | "
                     + ", ".join(f"{100 * v:.2f}" for v in r["aps"]) + " |")
    lines.append("")
    for name, v in result.get("variance_left_out", {}).items():
        lines.append(f"- {name} ({v['channels']} channels): variance outside r components, per level: " + "; ".join(
            f"r {r}: " + ", ".join(f"{k} {100 * x:.1f}%" for k, x in lv.items()) for r, lv in v["left_out"].items()))
    for loss in sorted({r["loss"] for r in result["rows"]}):
        best = recommend(result["rows"], loss)
        if best is None:
            lines.append(f"- {loss}: no setting kept 90% of the gain.")
        else:
            fits = best["bytes_per_image_coco"] <= MIB
            lines.append(f"- {loss}: {best['setting']} keeps {100 * best['ap_gain_kept']:.0f}% of the gain at "
                         f"{best['bytes_per_image_coco'] / MIB:.2f} MiB per image at COCO size "
                         f"({'within' if fits else 'OVER'} the 1 MiB goal).")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, loss in enumerate(sorted({r["loss"] for r in result["rows"]})):
        rows = sorted((r for r in result["rows"] if r["loss"] == loss and r["ap_gain_kept"] is not None),
                      key=lambda r: r["bytes_per_image_coco"])
        x = [r["bytes_per_image_coco"] / MIB for r in rows]
        y = [100 * r["ap_gain_kept"] for r in rows]
        every = [len(r["seeds"]) == len(result["seeds"]) for r in rows]
        marker = "o" if i == 0 else "s"
        ax.scatter([a for a, e in zip(x, every) if e], [b for b, e in zip(y, every) if e], marker=marker,
                   color=f"C{i}", label=f"{loss} (all seeds)", zorder=3)
        ax.scatter([a for a, e in zip(x, every) if not e], [b for b, e in zip(y, every) if not e], marker=marker,
                   facecolors="none", edgecolors=f"C{i}", label=f"{loss} (first seed only)", zorder=3)
        front, best = [], float("-inf")  # the frontier: the most gain kept at or under each size
        for xi, yi in zip(x, y):
            if yi > best:
                front.append((xi, yi))
                best = yi
        ax.step([a for a, _ in front], [b for _, b in front], where="post", color=f"C{i}", lw=1, alpha=0.6)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["setting"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(90, color="k", lw=0.8, ls=":")
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("MiB per image and view, projected to a 256-channel FPN at 800 x 1333")
    ax.set_ylabel("AP gain kept, % of dense fp32")
    ax.set_title(f"{result['student']} from {result['teacher']}, {result['epochs']} epochs, seeds {result['seeds']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _final_ap(report: dict[str, Any], role: str) -> float:
    return float([r for r in report["rows"] if r["role"] == role][-1]["val"]["AP"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "run_default.yaml"))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings-other-seeds", nargs="+", choices=list(SETTINGS), metavar="SETTING",
                    help="the settings run on the seeds after the first (default: all of --settings); a setting "
                         "run on fewer seeds is set against fp32 on the same seeds")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench_cache_frontier"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cache_frontier.json"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run config")
    ap.add_argument("--variance-teachers", nargs="*", default=[], metavar="CHECKPOINT",
                    help="also the variance other teachers leave outside 16, 32, 64 components (e.g. an R50's)")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from curriculum.pipeline import load_run_config, run_pipeline

    settings = ["fp32"] + [s for s in args.settings if s != "fp32"]  # the reference first
    workdir, out = Path(args.workdir).resolve(), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    baseline: dict[int, float] = {}
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    result: dict[str, Any] = {}
    later = set(args.settings_other_seeds or settings) | {"fp32"}
    for seed in args.seeds:
        for loss in args.losses:
            for setting in settings if seed == args.seeds[0] else [s for s in settings if s in later]:
                first = loss == args.losses[0] and setting == "fp32"
                job = load_run_config(args.config, list(args.set) + run_overrides(
                    args.config, loss, setting, seed, workdir, baseline=first))
                t = time.perf_counter()
                rep = run_pipeline(job, resume=True, progress=False)
                if first:
                    baseline[seed] = _final_ap(rep, "baseline")
                r = runs.setdefault((loss, setting), {"aps": {}, "size": cache_size(job)})
                r["aps"][seed] = _final_ap(rep, "stage")
                logging.info("seed %d %s %s: AP %.2f (%.0f s)", seed, loss, setting, 100 * r["aps"][seed],
                             time.perf_counter() - t)
                result = {"student": job.student.name, "teacher": job.teachers[-1].name,
                          "epochs": sum(s.epochs for s in job.stage_settings()), "seeds": sorted(baseline),
                          "baseline": [baseline[s] for s in sorted(baseline)], "rows": frontier_rows(runs, baseline),
                          "config": str(Path(args.config).name), "overrides": list(args.set),
                          "wall_s": round(time.perf_counter() - t0, 1)}
                out.write_text(json.dumps(result, indent=2) + "\n")
    if args.variance_teachers:
        result["variance_left_out"] = variance_left_out(args.variance_teachers, job.data)
        out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(summarize(result))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
