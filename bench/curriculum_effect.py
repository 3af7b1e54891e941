"""Does the sequence of teachers help? The progressive curriculum against the student alone, direct distillation
from the strongest teacher, the same ladder in `auto` order, and all teachers at once, over several seeds.

For every seed (`train.seed`), at equal total student epochs and the same student schedule, three `curriculum run`s
of one config, sharing its trained teachers (`teachers_dir`) and their cache (`cache.root`):

- `given`: the ladder in the config's order, with `baseline: true` (the student alone) and `direct: true` (the last
  teacher of the ladder alone, for all the epochs);
- `auto`: `order: auto` (the teachers ordered by measured adaptation cost, closest first);
- `all`: one stage of all the epochs naming every teacher (`stages[0].teachers`, weight 1 each).

`--arms` runs a subset (the progressive arm always runs; `given` then trains only the arms named): a longer budget
costs proportionally more, and the comparison against direct is the one the issue's first goal needs.

Writes `bench/results/curriculum_effect.json` (AP as in eval.json, 0 to 1) and a PNG of each arm's mean and spread
beside each teacher's AP, and prints the table with the paired differences per seed and the issue's goals.

    python bench/curriculum_effect.py                      # configs/run_default.yaml, seeds 0 1 2
    python bench/curriculum_effect.py --seeds 0 1 2 3 --set stages.0.epochs=4
    python bench/curriculum_effect.py --arms baseline direct --set "stages=[{epochs: 6}]" \
        --workdir runs/bench_e18 --out bench/results/curriculum_effect_18.json   # a longer budget, three arms
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = ("baseline", "direct", "progressive", "progressive_auto", "all_at_once")


def _final_ap(report: dict[str, Any], role: str) -> float:
    rows = [r for r in report["rows"] if r["role"] == role]
    return float(rows[-1]["val"]["AP"])


def run_seed(config: str, seed: int, out: Path, extra: list[str], arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    """The runs of one seed for `arms` (progressive always); returns {arm: AP}, the teachers' APs and the ladder."""
    from curriculum.pipeline import load_run_config, run_pipeline

    common = list(extra) + [f"train.seed={seed}"]
    given = load_run_config(config, common + [f"output_dir={out / f'seed{seed}' / 'given'}", "order=given",
                                              f"baseline={'baseline' in arms}", f"direct={'direct' in arms}"])
    names = [t.name for t in given.teachers]
    total = sum(s.epochs for s in given.stage_settings())
    rep = run_pipeline(given, resume=True, progress=False)
    aps = {"progressive": _final_ap(rep, "stage")}
    aps.update({arm: _final_ap(rep, arm) for arm in ("baseline", "direct") if arm in arms})
    teachers = {r["name"].removeprefix("teacher "): float(r["val"]["AP"]) for r in rep["rows"] if r["role"] == "teacher"}
    auto_order = None
    if "progressive_auto" in arms:
        auto = load_run_config(config, common + [f"output_dir={out / f'seed{seed}' / 'auto'}", "order=auto",
                                                 "baseline=false", "direct=false"])
        rep_auto = run_pipeline(auto, resume=True, progress=False)
        aps["progressive_auto"], auto_order = _final_ap(rep_auto, "stage"), rep_auto["order"]
    if "all_at_once" in arms:
        every = json.dumps([{"epochs": total, "teachers": names}])
        joint = load_run_config(config, common + [f"output_dir={out / f'seed{seed}' / 'all'}", "order=given",
                                                  f"stages={every}", "baseline=false", "direct=false"])
        aps["all_at_once"] = _final_ap(run_pipeline(joint, resume=True, progress=False), "stage")
    return {"aps": aps, "teachers": teachers, "ladder": names, "auto_order": auto_order, "epochs": total}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (std 0 for one seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def direct_goal(arms: dict[str, list[float]]) -> tuple[float, float]:
    """The issue's first goal: (progressive's mean, its bar: direct's mean + the larger of the two arms' stds)."""
    (pm, ps), (dm, ds) = mean_std(arms["progressive"]), mean_std(arms["direct"])
    return pm, dm + max(ps, ds)


def summarize(result: dict[str, Any]) -> str:
    """The Markdown table (x100): mean, std and per-seed AP of each arm run, paired differences, and the goals that
    those arms decide."""
    arms, seeds = result["arms"], result["seeds"]
    mean = {a: mean_std(v)[0] for a, v in arms.items()}
    std = {a: mean_std(v)[1] for a, v in arms.items()}
    lines = [f"Student {result['student']}, ladder {' -> '.join(result['ladder'])}, {result['epochs']} student epochs, "
             f"seeds {seeds}. Teachers: " + ", ".join(f"{n} {100 * ap:.2f}" for n, ap in result["teachers"].items())
             + " AP.", "", "| arm | mean AP | std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|---:|" + "---:|" * len(seeds)]
    for a in (a for a in ARMS if a in arms):
        lines.append(f"| {a} | {100 * mean[a]:.2f} | {100 * std[a]:.2f} | "
                     + " | ".join(f"{100 * v:.2f}" for v in arms[a]) + " |")
    lines += ["", "Paired differences (x100 AP, per seed):", ""]
    for a, b in (("progressive", "direct"), ("progressive", "baseline"), ("progressive_auto", "progressive"),
                 ("progressive", "all_at_once")):
        if a not in arms or b not in arms:
            continue
        d = [100 * (x - y) for x, y in zip(arms[a], arms[b])]
        lines.append(f"- {a} - {b}: " + ", ".join(f"{v:+.2f}" for v in d) + f" (mean {statistics.mean(d):+.2f})")
    weakest = min(result["teachers"].values())
    goals = []
    if "direct" in arms:
        progressive, bar = direct_goal(arms)
        goals.append(("progressive >= direct + max(std)", progressive >= bar))
    if "baseline" in arms:
        goals.append(("progressive >= baseline + 5 AP", mean["progressive"] >= mean["baseline"] + 0.05))
    goals.append(("progressive >= weakest teacher", mean["progressive"] >= weakest))
    if "progressive_auto" in arms:
        goals.append(("auto order >= given order", mean["progressive_auto"] >= mean["progressive"]))
    lines += ["", "Goals: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals)]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = [a for a in ARMS if a in result["arms"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, a in enumerate(run):
        v = [100 * x for x in result["arms"][a]]
        m, s = mean_std(v)
        ax.bar(i, m, yerr=s, color=f"C{i}", alpha=0.7, capsize=6)
        ax.scatter([i] * len(v), v, color="k", s=12, zorder=3)
    for j, (name, ap) in enumerate(result["teachers"].items()):
        ax.axhline(100 * ap, ls="--", lw=1, color=f"C{5 + j}", label=f"teacher {name} ({100 * ap:.1f})")
    ax.set_xticks(range(len(run)), [a.replace("_", "\n") for a in run])
    ax.set_ylabel("val AP x100")
    ax.set_title(f"{result['student']}: {result['epochs']} epochs, {len(result['seeds'])} seeds (mean, std, seeds)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "run_default.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench_curriculum_effect"),
                    help="the runs of every arm and seed (finished ones are reused)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "curriculum_effect.json"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run config")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                    help="the arms to run (progressive always runs; the goals of the arms left out are not judged)")
    args = ap.parse_args()
    arms = tuple(dict.fromkeys(["progressive", *args.arms]))

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    from curriculum.pipeline import load_run_config

    job = load_run_config(args.config, list(args.set))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        t = time.perf_counter()
        per_seed.append(run_seed(args.config, seed, workdir, args.set, arms))
        logging.info("seed %d: %s (%.0f s)", seed, {k: round(100 * v, 2) for k, v in per_seed[-1]["aps"].items()},
                     time.perf_counter() - t)
        first = per_seed[0]
        result = {
            "student": job.student.name, "ladder": first["ladder"], "teachers": first["teachers"],
            "epochs": first["epochs"], "seeds": list(args.seeds[:len(per_seed)]),
            "arms": {a: [s["aps"][a] for s in per_seed] for a in ARMS if a in arms},
            "auto_order": [s["auto_order"] for s in per_seed],
            "config": str(args.config), "overrides": list(args.set), "wall_s": round(time.perf_counter() - t0, 1),
        }
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every seed: a cut-short run keeps its seeds
    plot(result, out.with_suffix(".png"))
    print(summarize(result))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
