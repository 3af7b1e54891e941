"""The fixed cost of a stage on Ray Train: every stage in a `TorchTrainer.fit` of its own (how `curriculum run`
trained until session 10) against all of a run's stages in one (`trainers.ray_train.fit_sequence_on_ray`, how it
trains now), side by side in one invocation, arms interleaved.

Both arms train the same entries, those of the given run (default: `configs/run_default.yaml`, its teachers
trained with `--preset quick`'s short schedule when missing: what a stage costs to start does not depend on how
good its teacher is): its stages, then the baseline and the direct arm when the config asks for them, with each
stage cut to `--iters` iterations of one epoch, no per-epoch evaluation. What is left of a stage's wall time is
then its fixed cost: for each arm, (wall time of its fits - the seconds the workers spent in the stages'
calibration and training, as each stage's done.json gives them) / number of stages.

Writes `bench/results/stage_overhead.json` ({"entries", "iters", "arms": {"per_stage" | "one_fit": {"wall_s",
"trained_s", "fixed_per_stage_s"} per repeat}, "fixed_per_stage_s": median per arm, "stage_names"}) and a PNG;
prints the table.

    python bench/stage_overhead.py                     # the default run, 2 repeats
    python bench/stage_overhead.py --repeats 3 --set baseline=false
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_overrides(iters: int, out: Path) -> list[str]:
    """Every stage one epoch of `iters` iterations, no evaluation during training, output in `out`."""
    return [f"train.max_iters_per_epoch={iters}", "trainer.eval_every=0", f"output_dir={out}"]


def prepared_entries(config: str, overrides: list[str], preset: str | None) -> tuple[Any, list[Any], Any]:
    """(job, the run's entries as `curriculum run` builds them, prepared run): teachers, caches and inits made."""
    from curriculum.pipeline import Phases, absolute_paths, load_run_config, prepare_run, stage_entry
    from curriculum.plan import baseline_stage, total_epochs

    job = absolute_paths(load_run_config(config, overrides, preset), REPO)
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare_run(job, out, Phases(), progress=False)
    stages = [dataclasses.replace(s, epochs=1) for s in prep.stages]
    entries = [stage_entry(job, st, prep.start_from(st.teachers[0].name, "curriculum")[0] if i == 0 else None, out,
                           False, continues=i > 0) for i, st in enumerate(stages)]
    if job.baseline:
        entries.append(stage_entry(job, baseline_stage(job, total_epochs(stages)), prep.random_init, out, False))
    entries += [stage_entry(job, dataclasses.replace(d, epochs=1), prep.start_from(d.teachers[0].name, "direct")[0],
                            out, False) for d in prep.extra_stages]
    return job, entries, prep


def _moved(entry: Any, root: Path) -> Any:
    """`entry` writing into `root/<its folder name>` (TensorBoard files too)."""
    out = root / Path(entry.out_dir).name
    out.mkdir(parents=True, exist_ok=True)
    loop = dict(entry.loop, tensorboard_dir=str(out / "tensorboard"))
    return dataclasses.replace(entry, loop=loop, out_dir=str(out))


def run_arm(arm: str, job: Any, entries: list[Any], root: Path) -> dict[str, float]:
    """Train `entries` (fresh folders under `root`) as `arm` does; wall time, worker seconds, fixed cost per stage."""
    from trainers.ray_train import fit_sequence_on_ray

    shutil.rmtree(root, ignore_errors=True)
    moved = [_moved(e, root / "stages") for e in entries]
    tr = job.trainer
    kw = dict(num_workers=tr.num_workers, use_gpu=tr.use_gpu, cpus_per_worker=tr.cpus_per_worker,
              max_failures=0, storage_path=str(root / "ray"), memory_bytes=job.cache.memory_bytes,
              object_store=job.cache.object_store, health_check_interval_s=tr.health_check_interval_s)
    t0 = time.perf_counter()
    if arm == "one_fit":
        fit_sequence_on_ray(moved, name="stages", **kw)
    else:  # a fit per stage; a continuing stage starts from the previous one's written model
        for i, e in enumerate(moved):
            if e.continues:
                e = dataclasses.replace(e, continues=False,
                                        loop=dict(e.loop, init=str(Path(moved[i - 1].out_dir) / "model.pt")))
            fit_sequence_on_ray([e], name=Path(e.out_dir).name, **kw)
    wall = time.perf_counter() - t0
    trained = sum(json.loads((Path(e.out_dir) / "done.json").read_text())["seconds"] for e in moved)
    return {"wall_s": round(wall, 2), "trained_s": round(trained, 2),
            "fixed_per_stage_s": round((wall - trained) / len(moved), 2)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 2.8))
    labels = {"per_stage": "a fit per stage", "one_fit": "one fit for the run"}
    for i, arm in enumerate(("per_stage", "one_fit")):
        values = [r["fixed_per_stage_s"] for r in result["arms"][arm]]
        ax.barh(i, statistics.median(values), color="#4c72b0")
        ax.plot(values, [i] * len(values), "k.", label="repeats" if i == 0 else None)
    ax.set_yticks([0, 1], [labels["per_stage"], labels["one_fit"]])
    ax.set_xlabel("fixed cost per stage (s)")
    ax.set_title(f"{result['entries']} stages of {result['iters']} iterations")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "run_default.yaml"))
    p.add_argument("--preset", default="quick", help="the teachers' schedule when they are missing ('' for the "
                   "config's own)")
    p.add_argument("--iters", type=int, default=2, help="iterations per stage")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[], dest="overrides", help="key=value on top of the config")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_stage_overhead"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "stage_overhead.json"))
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work)
    job, entries, _ = prepared_entries(args.config, bench_overrides(args.iters, work) + args.overrides,
                                       args.preset or None)
    arms: dict[str, list[dict[str, float]]] = {"per_stage": [], "one_fit": []}
    for r in range(args.repeats):
        for arm in (("per_stage", "one_fit") if r % 2 == 0 else ("one_fit", "per_stage")):
            row = run_arm(arm, job, entries, work / arm)
            arms[arm].append(row)
            print(f"repeat {r + 1} {arm}: {row}", flush=True)
    result = {"entries": len(entries), "iters": args.iters, "stage_names": [e.name for e in entries],
              "repeats": args.repeats, "arms": arms,
              "fixed_per_stage_s": {arm: round(statistics.median(r["fixed_per_stage_s"] for r in rows), 2)
                                    for arm, rows in arms.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\nfixed cost per stage ({len(entries)} stages of {args.iters} iterations, median of {args.repeats}):")
    for arm, v in result["fixed_per_stage_s"].items():
        print(f"  {arm:10s} {v:6.2f} s")
    print(f"written {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
