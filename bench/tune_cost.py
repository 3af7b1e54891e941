"""The cost of a sweep sharing one teacher cache against the same sweep with the teacher inline in every trial.

Both arms run the same trials (`tune.scheduler: fifo`, the same space, seed and number of samples; the default
config is the first trial), one after the other in this process, on one local Ray:

- cache: `curriculum tune` as it is: the teacher cache is precomputed once (into a fresh cache folder of this
  benchmark, so its cost is measured), then every trial reads it;
- inline: `tune.teacher_mode: inline`: every trial loads the teacher and runs it on each of its batches, as
  in-process distillation frameworks do.

Printed: wall time of each arm (precompute and trials), the ratio inline / cache, teacher forwards counted inside
the trials of each arm, and the val AP of the best trial against the default config's trial.

    python bench/tune_cost.py --num-samples 4                       # configs/run_default.yaml, shortened stages
    python bench/tune_cost.py --config my_run.yaml --space weights --set train.max_iters_per_epoch=0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Shorter stages than the default run so that a sweep of several trials fits a CPU benchmark; override with --set.
SHORT = ["train.max_iters_per_epoch=40", "stages=[{epochs: 1}]", "tune.eval_images=100"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "run_default.yaml"))
    ap.add_argument("--space", default="mgd")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_tune_cost"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from curriculum.pipeline import load_run_config
    from tune_spaces import load_space
    from tune_spaces.sweep import run_sweep

    out = Path(args.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = SHORT + list(args.set) + [f"output_dir={out}", f"tune.output_dir={out / stamp}", "tune.scheduler=fifo"]
    space = load_space(args.space)
    arms = {}
    for arm, extra in (("cache", [f"cache.root={out / stamp / 'cache'}"]), ("inline", ["tune.teacher_mode=inline"])):
        job = load_run_config(args.config, common + extra)
        t0 = time.perf_counter()
        report = run_sweep(job, space, args.num_samples, name=arm, progress=False, base_dir=REPO)
        wall = time.perf_counter() - t0
        phases = {p["phase"]: p["seconds"] for p in report["phases"]}
        arms[arm] = {
            "wall_s": round(wall, 1), "trials_s": phases.get("trials"),
            "precompute_s": round(sum(v for k, v in phases.items() if "precompute" in k), 1),
            "teacher_train_s": round(sum(v for k, v in phases.items() if k.endswith(": train")), 1),
            "teacher_forwards_in_trials": report["teacher_forwards_in_trials"],
            "trials": [{"params": t["params"], "status": t["status"], "val_AP": t["val_AP"]} for t in report["trials"]],
            "best_AP": report["best"]["val_AP"] if report["best"] else None,
            "default_AP": report["default"]["val_AP"] if report["default"] else None,
            "best_params": report["best"]["params"] if report["best"] else None,
        }
    c, i = arms["cache"], arms["inline"]
    cache_cost = c["precompute_s"] + c["trials_s"]
    lines = [
        f"# Sweep cost: {args.num_samples} trials of space `{args.space}`, shared cache against teacher inline",
        "", f"Config {args.config} with {' '.join(SHORT + list(args.set))}; FIFO, the same trials in both arms.", "",
        "| arm | precompute (s) | trials (s) | precompute + trials (s) | teacher forwards in trials | best AP | "
        "default AP |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in arms.items():
        lines.append(f"| {name} | {a['precompute_s']:.1f} | {a['trials_s']:.1f} | {a['precompute_s'] + a['trials_s']:.1f}"
                     f" | {a['teacher_forwards_in_trials']} | {_pct(a['best_AP'])} | {_pct(a['default_AP'])} |")
    lines += ["", f"Ratio inline / cache, trials only: {i['trials_s'] / c['trials_s']:.2f}; "
              f"counting the cache's precompute: {i['trials_s'] / cache_cost:.2f}.",
              f"Best trial (cache arm): {c['best_params']} val AP {_pct(c['best_AP'])} against {_pct(c['default_AP'])} "
              "for the default config."]
    md = "\n".join(lines)
    print("\n" + md)
    (out / stamp).mkdir(parents=True, exist_ok=True)
    (out / stamp / "tune_cost.md").write_text(md + "\n")
    (out / stamp / "tune_cost.json").write_text(json.dumps(arms, indent=2, default=str))
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
