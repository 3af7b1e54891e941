"""The cost of a sweep sharing one teacher cache, against its floor and against the same sweep with the teacher
inline in every trial, with a teacher that costs what real teachers cost.

Both arms run the same N trials (`tune.scheduler: fifo`, the same space, seed and samples; the default config is
the first trial), one trial at a time on the whole machine (`tune.max_concurrent: 1`, `cpus_per_trial` and
`threads_per_trial` = `--threads`), one after the other in this process, on one local Ray:

- cache: `curriculum tune` as it is: the teacher cache is precomputed once (T, into a fresh cache folder of this
  benchmark, so its cost is measured), then every trial reads it;
- inline: `tune.teacher_mode: inline`: every trial loads the teacher and runs it on each of its batches, as
  in-process distillation frameworks do.

The floor is N x S + T, S being one trial's schedule (same student, data, epochs, per-epoch evaluation and threads)
trained without distillation, in this process (`trainers.ray_train.run_training` without a stage, timed here). S is
timed three times, before, between and after the two arms, and the median taken: the arms take about 20 minutes, and
on a shared machine a single timing of S moved by several percent between otherwise equal runs.
The default teacher is the zoo's `fcos_resnet50` (a ResNet-50 FCOS: at 128 px its forward costs about 6.7 times the
built-in student's training step on one thread), trained for 1 epoch by the sweep's preparation if it is not in
`teachers_dir` (its training is not counted in either arm: it is paid once per teacher, as in a real run). The cost
of a step does not depend on how well the teacher is trained, so the short training changes what the trials learn,
not what they cost.

Writes `bench/results/tune_cost.json` ({"trials", "teacher", "student", "sweep_s", "precompute_s",
"student_alone_s", "inline_sweep_s", "ratio_vs_floor", "inline_over_cached"}, plus the three timings of S and
their epochs, the details of both arms and `cached_trial_breakdown`: a cached trial's fixed cost (its first epoch's
excess over a later one, and the gap between trials), its share of a trial, and a later epoch's excess over S's) and
a PNG beside it; prints the table. Goals (issue 18): ratio_vs_floor <= 1.1, inline_over_cached >= 2.

    python bench/tune_cost.py                                     # 8 trials, fcos_resnet50, 2 epochs per trial
    python bench/tune_cost.py --trials 4 --set stages=[{epochs: 1}]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_TEACHER = "fcos_resnet50"


def bench_overrides(teacher: str, threads: int) -> list[str]:
    """The sweep of this benchmark: one expensive teacher, one stage of 2 epochs, one trial at a time."""
    return [f"teachers=[{{name: {teacher}, train: {{epochs: 1}}}}]", "stages=[{epochs: 2}]", "tune.eval_images=100",
            "tune.scheduler=fifo", "tune.max_concurrent=1", f"tune.cpus_per_trial={threads}",
            f"tune.threads_per_trial={threads}"]


def timed_by_epoch(train: Callable[[Any], Any]) -> tuple[float, list[float]]:
    """`train(session)` on a `trainers.ray_train.LocalSession` that notes when each epoch's report comes: its seconds
    and each epoch's (the first with the set-up)."""
    from trainers.ray_train import LocalSession

    marks = [time.perf_counter()]

    class EpochClock(LocalSession):
        def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
            marks.append(time.perf_counter())

    train(EpochClock())
    return time.perf_counter() - marks[0], [b - a for a, b in zip(marks, marks[1:])]


def student_alone_loop(job: Any, out: Path) -> Any:
    """S's `trainers.ray_train.LoopConfig`: the trial's schedule (all stages' epochs, per-epoch evaluation of
    `tune.eval_images`, the trial's threads) without a teacher, its outputs in `out`."""
    from curriculum.config import EvalConfig, TrainJobConfig, to_dict
    from curriculum.plan import total_epochs
    from curriculum.pipeline import absolute_paths
    from trainers.ray_train import LoopConfig

    job = absolute_paths(job, REPO)
    tjob = TrainJobConfig(output_dir=str(out), data=job.data, model=job.student,
                          train=dataclasses.replace(job.train, epochs=total_epochs(job.stage_settings())),
                          eval=EvalConfig(batch_size=job.eval.batch_size, max_images=job.tune.eval_images))
    return LoopConfig(job=to_dict(tjob), threads_per_worker=job.tune.threads_per_trial, eval_every=1, progress=False)


def student_alone_seconds(job: Any, out: Path) -> tuple[float, list[float]]:
    """S, in this process: its seconds and each epoch's (the first with the set-up: data, model)."""
    from trainers.ray_train import run_training

    cfg = student_alone_loop(job, out)
    return timed_by_epoch(lambda session: run_training(cfg, session))


def iteration_seconds(trial_dir: str | None) -> list[float]:
    """Tune's `time_this_iter_s` of each report (one per epoch) of a trial, from its result.json; [] without one."""
    path = Path(trial_dir) / "result.json" if trial_dir else None
    if path is None or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r["time_this_iter_s"]) for r in rows if "time_this_iter_s" in r]


def trial_breakdown(arm: dict[str, Any], alone_epochs: list[list[float]]) -> dict[str, Any]:
    """Where a cached trial's time goes against S, per trial: the fixed cost (the first epoch's excess over a later
    one: data, model, teacher links, calibration; plus the gap between trials) and each later epoch's excess over S's
    (the distillation's own compute and reads). S's own set-up is its first epoch's excess over a later one."""
    trials = [t for t in arm["trials"] if len(t.get("iterations_s") or []) >= 2]
    if not trials or any(len(e) < 2 for e in alone_epochs):
        return {}
    n = len(arm["trials"])
    later = [statistics.median(t["iterations_s"][1:]) for t in trials]
    setup = statistics.mean(t["iterations_s"][0] - m for t, m in zip(trials, later))
    gap = (arm["trials_s"] - sum(t["seconds"] for t in arm["trials"])) / n
    s_epoch = statistics.median(statistics.median(e[1:]) for e in alone_epochs)
    s_setup = statistics.median(e[0] - statistics.median(e[1:]) for e in alone_epochs)
    trial_s = arm["trials_s"] / n
    fixed = setup + gap
    return {"trial_s": round(trial_s, 2), "trial_setup_s": round(setup, 2), "between_trials_s": round(gap, 2),
            "fixed_s": round(fixed, 2), "fixed_share": round(fixed / trial_s, 3),
            "trial_epoch_s": round(statistics.mean(later), 2), "student_alone_epoch_s": round(s_epoch, 2),
            "student_alone_setup_s": round(s_setup, 2),
            "epoch_excess": round(statistics.mean(later) / s_epoch - 1, 3)}


def run_arm(config: str, common: list[str], extra: list[str], space: Any, num_samples: int, name: str) -> dict:
    from curriculum.pipeline import load_run_config
    from tune_spaces.sweep import run_sweep

    job = load_run_config(config, common + extra)
    t0 = time.perf_counter()
    report = run_sweep(job, space, num_samples, name=name, progress=False, base_dir=REPO)
    wall = time.perf_counter() - t0
    phases = {p["phase"]: p["seconds"] for p in report["phases"]}
    teacher_train = sum(v for k, v in phases.items() if k.startswith("teacher ") and k.endswith(": train"))
    teacher_eval = sum(v for k, v in phases.items() if k.startswith("teacher ") and k.endswith(": eval"))
    precompute = sum(v for k, v in phases.items() if "precompute" in k)
    return {
        "wall_s": round(wall, 1), "trials_s": round(phases.get("trials", 0.0), 1), "precompute_s": round(precompute, 1),
        # what the sweep costs once its teacher exists: everything but training and scoring the teacher
        "sweep_s": round(wall - teacher_train - teacher_eval, 1),
        "teacher_train_s": round(teacher_train, 1), "teacher_eval_s": round(teacher_eval, 1),
        "teacher_forwards_in_trials": report["teacher_forwards_in_trials"],
        "trials": [{"params": t["params"], "status": t["status"], "val_AP": t["val_AP"], "seconds": t.get("seconds"),
                    "iterations_s": [round(x, 2) for x in iteration_seconds(t.get("path"))]}
                   for t in report["trials"]],
        "best_AP": report["best"]["val_AP"] if report["best"] else None,
        "default_AP": report["default"]["val_AP"] if report["default"] else None,
    }


def summarise(n: int, teacher: str, student: str, cache: dict, inline: dict, alone_s: float) -> dict[str, Any]:
    """The issue's fields from the two arms and S."""
    floor = n * alone_s + cache["precompute_s"]
    return {"trials": n, "teacher": teacher, "student": student, "sweep_s": cache["sweep_s"],
            "precompute_s": cache["precompute_s"], "student_alone_s": round(alone_s, 1),
            "inline_sweep_s": inline["sweep_s"], "ratio_vs_floor": round(cache["sweep_s"] / floor, 3),
            "inline_over_cached": round(inline["sweep_s"] / cache["sweep_s"], 3)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, s, t = result["trials"], result["student_alone_s"], result["precompute_s"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bars = [("floor N x S + T", [n * s, t], ["student alone x N", "precompute T"]),
            ("sweep, cached", [result["sweep_s"] - t, t], ["trials and set-up", "precompute T"]),
            ("sweep, inline", [result["inline_sweep_s"], 0.0], ["trials and set-up", ""])]
    colors = ["#4c72b0", "#dd8452"]
    for i, (label, parts, _) in enumerate(bars):
        left = 0.0
        for j, v in enumerate(parts):
            ax.barh(i, v, left=left, color=colors[j], label=bars[1][2][j] if i == 1 else None)
            left += v
        ax.text(left, i, f" {left:.0f} s", va="center")
    ax.set_xlim(0, 1.15 * max(sum(b[1]) for b in bars))
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"{n} trials, teacher {result['teacher']}: x{result['ratio_vs_floor']:.2f} of the floor, "
                 f"inline x{result['inline_over_cached']:.2f}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "run_default.yaml"))
    ap.add_argument("--space", default="mgd")
    ap.add_argument("--trials", type=int, default=8, help="trials per arm, the default config's included")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER)
    ap.add_argument("--threads", type=int, default=2, help="CPUs and torch threads of the one trial at a time")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_tune_cost"))
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "tune_cost.json"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from curriculum.pipeline import load_run_config
    from tune_spaces import load_space

    out = Path(args.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = bench_overrides(args.teacher, args.threads) + list(args.set) + [
        f"output_dir={out}", f"tune.output_dir={out / stamp}"]
    space = load_space(args.space)
    job = load_run_config(args.config, common)
    samples = args.trials - (1 if job.tune.include_default else 0)  # Tune adds the default as one more trial
    alone = [student_alone_seconds(job, out / stamp / "student_alone" / "before")]
    arms = {"cache": run_arm(args.config, common, [f"cache.root={out / stamp / 'cache'}"], space, samples, "cache")}
    alone.append(student_alone_seconds(job, out / stamp / "student_alone" / "between"))
    arms["inline"] = run_arm(args.config, common, ["tune.teacher_mode=inline"], space, samples, "inline")
    alone.append(student_alone_seconds(job, out / stamp / "student_alone" / "after"))
    alone_runs = [a for a, _ in alone]
    alone_s = statistics.median(alone_runs)
    n = len(arms["cache"]["trials"])
    result = summarise(n, args.teacher, job.student.name, arms["cache"], arms["inline"], alone_s)
    breakdown = trial_breakdown(arms["cache"], [e for _, e in alone])
    result.update({"student_alone_runs_s": [round(a, 1) for a in alone_runs],
                   "student_alone_epochs_s": [[round(x, 2) for x in e] for _, e in alone],
                   "cached_trial_breakdown": breakdown, "arms": arms,
                   "overrides": common[:-2], "config": str(Path(args.config).name),
                   "machine": f"{os.cpu_count()} CPUs, threads per trial {args.threads}"})
    c = arms["cache"]
    per_trial = [t["seconds"] for t in c["trials"] if t.get("seconds")]
    lines = [
        f"# Sweep cost: {n} trials of space `{args.space}`, teacher {args.teacher}, one trial at a time", "",
        f"Config {Path(args.config).name} with {' '.join(common[:-2])}.", "",
        "| arm | sweep (s) | precompute T (s) | trials (s) | teacher forwards in trials | best AP | default AP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in arms.items():
        lines.append(f"| {name} | {a['sweep_s']:.1f} | {a['precompute_s']:.1f} | {a['trials_s']:.1f} | "
                     f"{a['teacher_forwards_in_trials']} | {_pct(a['best_AP'])} | {_pct(a['default_AP'])} |")
    lines += ["", f"S (one trial's schedule without distillation, in process, median of "
              f"{', '.join(f'{a:.1f}' for a in alone_runs)}): {alone_s:.1f} s; floor N x S + T = "
              f"{n * alone_s + c['precompute_s']:.1f} s.",
              f"ratio_vs_floor {result['ratio_vs_floor']:.3f} (goal <= 1.1); inline_over_cached "
              f"{result['inline_over_cached']:.3f} (goal >= 2).",
              f"Cached trials as Tune timed them: mean {sum(per_trial) / max(1, len(per_trial)):.1f} s "
              f"(S = {alone_s:.1f} s)." if per_trial else "",
              f"Sweep set-up outside the trials and the precompute (cached arm): "
              f"{c['sweep_s'] - c['trials_s'] - c['precompute_s']:.1f} s."]
    if breakdown:
        b = breakdown
        lines.append(f"A cached trial, {b['trial_s']:.1f} s: fixed cost {b['fixed_s']:.2f} s ({100 * b['fixed_share']:.1f}%: "
                     f"set-up and calibration {b['trial_setup_s']:.2f} s, between trials {b['between_trials_s']:.2f} s; "
                     f"S's own set-up {b['student_alone_setup_s']:.2f} s); a later epoch {b['trial_epoch_s']:.2f} s "
                     f"against S's {b['student_alone_epoch_s']:.2f} s (+{100 * b['epoch_excess']:.1f}%: the "
                     "distillation's compute and reads).")
    md = "\n".join(lines)
    print("\n" + md)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, results.with_suffix(".png"))
    (out / stamp).mkdir(parents=True, exist_ok=True)
    (out / stamp / "tune_cost.md").write_text(md + "\n")
    print(f"\nwrote {results} and {results.with_suffix('.png')}")
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
