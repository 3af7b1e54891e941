"""Where a cached sweep trial's time goes, against S (`bench/tune_cost.py`'s floor: the trial's schedule without
distillation, in this process). Interleaved `--repeats` times on one local Ray, each epoch timed:

- alone: S in this process, as tune_cost times it;
- alone_tune: the same S as a Ray Tune trial (`trainers.ray_train.TuneSession`, a checkpoint every epoch, one trial
  on `--threads` CPUs), with the CPU seconds of every process on the machine while it runs (from /proc): the
  trial's, this driver's and the rest (Ray's own processes, other jobs);
- distilled: the trial's stages distilled from the teacher cache in this process (`run_sequence`, the sweep's
  default trial), as a trial runs them minus Tune. `--reader object_store` (the default, as a sweep's trials read
  it): through a `teachers.readers.ObjectStoreShards` holding every shard decoded (decoded before the rounds, not
  timed, as a sweep's later trials find it); `--reader parquet`: the process decodes the Parquet shards itself;
- distilled_plain_tune: the distilled arm's stages, timed the same way, inside a plain Tune function trainable (one
  trial on `--threads` CPUs): Tune's fresh trial process and runner thread without the sweep's machinery (its
  shard store, trial config, `TuneSession` checkpoints);
- distilled_tune: the first of two trials of the sweep's space (`--space`) as `curriculum tune` runs them
  (`tune_spaces.sweep.run_sweep`, `tune.include_default: false`, two samples: a sweep of its own, with its own shard
  store, which decodes the shards while the first trial's process starts, as in a sweep's first trial), with the CPU
  seconds of every process while the two run (as for alone_tune);
- distilled_tune_warm: that sweep's second trial, which takes over the first one's process and finds the store
  filled: what a sweep's later trials are (tune_cost's cached arm is one first trial and N - 1 of these);
- distilled_onednn (with `--onednn-arm`): the same with the distillers' small convolutions on PyTorch's default path
  (`trainers.distill.common.SmallMapConv2d` off), so distilled_onednn / distilled is what it saves a trial.

So alone_tune / alone is what Tune's trial process costs, distilled / alone what the distillation costs (its loss
compute, target reads and calibration), distilled_plain_tune / distilled what Tune's process and thread cost a
distilled trial, distilled_tune / distilled and distilled_tune_warm / distilled what a sweep's first and later trials
cost on top.
Before the rounds, the floating-point operations of one training step of the trial's first stage on its first batch
are counted (`step_flops`: torch's FlopCounterMode, forward and backward, the connectors' convolutions included),
without and with the distillation: what the floor N x S + T leaves out by construction.
A Tune trial's first epoch also pays its fresh process's imports, which a sweep pays once (`reuse_actors`).
The cache is `--cache` (tune_cost's `<out>/<stamp>/cache` of the same settings), precomputed there when missing
(not timed). Writes `bench/results/trial_cost.json` ({"rounds": [...], "distilled_over_alone",
"distilled_later_epoch_ratio", "tune_later_epoch_ratio", "tune_first_epoch_excess_s", "trial_cpu_share",
"distilled_tune_later_epoch_ratio" (a later epoch of distilled_tune over distilled's), "distilled_tune_over_alone"
(over alone's, what tune_cost's `epoch_excess` measures), "distilled_tune_warm_later_epoch_ratio" and
"distilled_tune_warm_over_alone" (the same for distilled_tune_warm; absent from rounds without it, as in the results
of sessions 22 and 23), "distilled_plain_tune_later_epoch_ratio" (a later epoch of
distilled_plain_tune over distilled's), "flops" ({"student_step_gflop", "distilled_step_gflop",
"distill_flops_share"}), "reader", "niceness" ({"driver", "trial"}: this process's and the plain Tune trial's)}, and
"onednn_over_small_conv" with `--onednn-arm`) and prints the table.

    python bench/trial_cost.py --set "cache.compression={dtype: int8, pca: 32}" --set cache.features=components \
        --cache runs/bench_tune_cost/<stamp>/cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import tune_cost  # noqa: E402  (the floor S and its session, as that benchmark times them)


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (command line, user + system CPU seconds)} of every process /proc shows now."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmd = Path(f"/proc/{d}/cmdline").read_text().replace("\0", " ").strip() or stat[:stat.rindex(")") + 1]
        except (OSError, ValueError):  # the process ended while read
            continue
        out[int(d)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)
    return out


class CpuWatch:
    """CPU seconds each process spent while the watch ran, sampled every `every` s (a process that starts and ends
    between two samples is missed; Tune's trial process lives the whole trial)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last.update(cpu_seconds_by_process())
            self._stop.wait(self.every)

    def __enter__(self) -> CpuWatch:
        self.first = cpu_seconds_by_process()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(cpu_seconds_by_process())

    def spent(self) -> dict[int, tuple[str, float]]:
        """{pid: (latest command line, CPU seconds since the watch started)}; a process that started during the
        watch counts all its CPU time."""
        return {pid: (cmd, cpu - self.first.get(pid, (cmd, 0.0))[1]) for pid, (cmd, cpu) in self.last.items()}


def split_cpu(spent: dict[int, tuple[str, float]], driver_pid: int, trial_mark: str = "ray::ImplicitFunc") -> dict:
    """CPU seconds of the trial's process(es) (command line with `trial_mark`), this driver and the rest."""
    trial = sum(c for cmd, c in spent.values() if trial_mark in cmd)
    driver = spent.get(driver_pid, ("", 0.0))[1]
    total = sum(c for _, c in spent.values())
    return {"trial": round(trial, 2), "driver": round(driver, 2), "other": round(total - trial - driver, 2),
            "total": round(total, 2)}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds: distilled over alone (whole schedule and a later epoch), a later epoch as a Tune trial over
    one in process, the first epoch's excess in Tune (its fresh process), and the trial's share of the CPU seconds
    spent while it ran."""
    def later(epochs: list[float]) -> float:
        return statistics.median(epochs[1:])

    def med(values: Any, digits: int = 3) -> float:
        return round(statistics.median(values), digits)

    out = {
        "distilled_over_alone": med(r["distilled_s"] / r["alone_s"] for r in rounds),
        "distilled_later_epoch_ratio": med(later(r["distilled_epochs_s"]) / later(r["alone_epochs_s"]) for r in rounds),
        "tune_later_epoch_ratio": med(later(r["alone_tune_epochs_s"]) / later(r["alone_epochs_s"]) for r in rounds),
        "tune_first_epoch_excess_s": med((r["alone_tune_epochs_s"][0] - r["alone_epochs_s"][0] for r in rounds), 2),
        "trial_cpu_share": med(r["cpu_s"]["trial"] / r["cpu_s"]["total"] for r in rounds),
        "distilled_tune_later_epoch_ratio": med(later(r["distilled_tune_epochs_s"]) / later(r["distilled_epochs_s"])
                                                for r in rounds),
        "distilled_tune_over_alone": med(later(r["distilled_tune_epochs_s"]) / later(r["alone_epochs_s"])
                                         for r in rounds),
    }
    if all("distilled_tune_warm_epochs_s" in r for r in rounds):
        out["distilled_tune_warm_later_epoch_ratio"] = med(
            later(r["distilled_tune_warm_epochs_s"]) / later(r["distilled_epochs_s"]) for r in rounds)
        out["distilled_tune_warm_over_alone"] = med(
            later(r["distilled_tune_warm_epochs_s"]) / later(r["alone_epochs_s"]) for r in rounds)
    if all("distilled_plain_tune_epochs_s" in r for r in rounds):
        out["distilled_plain_tune_later_epoch_ratio"] = med(
            later(r["distilled_plain_tune_epochs_s"]) / later(r["distilled_epochs_s"]) for r in rounds)
    if all("distilled_onednn_s" in r for r in rounds):
        out["onednn_over_small_conv"] = med(r["distilled_onednn_s"] / r["distilled_s"] for r in rounds)
    return out


def tune_trial(loop: dict[str, Any], storage: Path, name: str, threads: int) -> tuple[float, list[float]]:
    """S as one Tune trial; returns Tune's time for it and its time per report (epoch)."""
    def trainable(config: dict[str, Any]) -> None:
        import torch

        from trainers.ray_train import LoopConfig, TuneSession, run_training

        torch.set_num_threads(threads)
        run_training(LoopConfig(**loop), TuneSession())

    result = one_trial(trainable, storage, name, threads)
    return float(result.metrics["time_total_s"]), [float(x) for x in result.metrics_dataframe["time_this_iter_s"]]


def one_trial(trainable: Any, storage: Path, name: str, threads: int) -> Any:
    """`trainable` run as the one trial of a Tune experiment on `threads` CPUs: its `ray.tune.Result` (its error
    raised)."""
    from ray import tune

    tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": threads}),
                       run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0))
    result = tuner.fit()[0]
    if result.error is not None:
        raise result.error
    return result


def prepare_distilled(job: Any, out: Path) -> tuple[Any, Path]:
    """The run's preparation once (teachers found, the cache precomputed when missing) and the student's start."""
    from curriculum.pipeline import Phases, prepare_run

    prep = prepare_run(dataclasses.replace(job, direct=False), out, Phases(out / "phases.json"), False,
                       precompute_caches=True)
    init, _ = prep.start_from(prep.stages[0].teachers[0].name, "curriculum")
    return prep, init


def warm_stores(prep: Any, budget_bytes: int) -> dict[str, Any]:
    """{teacher: `step_cost.warm_store`} over the trial's caches, every shard decoded into the object store (not
    timed), as a sweep's trials after the first find them."""
    from step_cost import warm_store

    return {m.name: warm_store(m.cache, budget_bytes) for st in prep.stages for m in st.teachers if m.cache}


def distilled_in_process(job: Any, prep: Any, init: Path, out: Path, stores: dict[str, Any] | None = None
                         ) -> tuple[float, list[float]]:
    """The sweep's default trial (the config's own values), its stages distilled from the cache in this process
    (through `stores`' object store; without: from the Parquet shards): seconds and each epoch's (the first with the
    set-up and the stage's calibration)."""
    from trainers.ray_train import run_sequence
    from tune_spaces.sweep import trial_entries

    entries = trial_entries(job, prep.stages, init, out, eval_images=job.tune.eval_images,
                            threads=job.tune.threads_per_trial,
                            shard_stores={t: st.name for t, st in (stores or {}).items()})
    return tune_cost.timed_by_epoch(lambda session: run_sequence(entries, session))


def distilled_plain_tune(entries: list[Any], storage: Path, name: str, threads: int
                         ) -> tuple[float, list[float], int]:
    """The distilled arm's `entries` (`tune_spaces.sweep.trial_entries`) in one plain Tune function trainable, timed
    inside it as the in-process arm times them (a report per epoch): seconds, each epoch's, and the trial process's
    niceness (Ray starts its workers at `RAY_worker_niceness`, 15 unless set)."""
    from ray import tune

    def trainable(config: dict[str, Any]) -> None:
        import os
        import time

        import torch

        from trainers.ray_train import LocalSession, run_sequence

        torch.set_num_threads(threads)
        marks = [time.perf_counter()]

        # tune_cost.timed_by_epoch's clock, defined here: a trial's process cannot import the bench/ modules
        class EpochClock(LocalSession):
            def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
                marks.append(time.perf_counter())

        run_sequence(entries, EpochClock())
        tune.report({"seconds": marks[-1] - marks[0], "epochs": [b - a for a, b in zip(marks, marks[1:])],
                     "niceness": os.nice(0)})

    result = one_trial(trainable, storage, name, threads)
    return (float(result.metrics["seconds"]), [float(x) for x in result.metrics["epochs"]],
            int(result.metrics["niceness"]))


def step_flops(entry: Any) -> dict[str, float]:
    """Floating-point operations of one training step (forward with the detector's losses, backward) of `entry`'s
    stage on its first batch, as it starts: the student alone and with the stage's distillation terms. Counted by
    torch's FlopCounterMode (convolutions and matrix products) with every connector convolution on `nn.Conv2d`'s
    path, which it counts (`SmallMapConv2d.bound(0)`; the arithmetic is the same)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from curriculum.config import TrainJobConfig, config_from_dict
    from trainers.distill.common import SmallMapConv2d
    from trainers.distillation import stage_start

    loop = entry.loop
    job = config_from_dict(TrainJobConfig, loop["job"], "the trial's job")
    start = stage_start(job, loop["stage"], loop["init"], loop["memory_bytes"], loop["shard_stores"], batches=1)
    (images, targets), = start.batches
    step = start.step(job.train.seed)
    start.student.train(), start.distiller.train()

    def flops(distil: bool) -> int:
        with SmallMapConv2d.bound(0), FlopCounterMode(display=False) as counter:
            out = start.student(images, targets, want=step.want if distil else ("losses",))
            terms = dict(out.losses)
            if distil:
                terms.update(step(out, targets, images))
            sum(terms.values()).backward()
        start.student.zero_grad(set_to_none=True), start.distiller.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    with torch.random.fork_rng():
        plain, distilled = flops(False), flops(True)
    return {"student_step_gflop": round(plain / 1e9, 3), "distilled_step_gflop": round(distilled / 1e9, 3),
            "distill_flops_share": round(distilled / plain - 1, 4)}


def distilled_tune(config: str, common: list[str], space: Any, name: str, trials: int = 2
                   ) -> list[tuple[float, list[float]]]:
    """`trials` sampled trials of `space` as `curriculum tune` runs them, one at a time, a sweep of their own: Tune's
    time for each trial and its time per report (epoch), in the order they ran (the first starts its process while
    the sweep's shard store fills; the others take over that process and find the store filled)."""
    from curriculum.pipeline import load_run_config
    from tune_spaces.sweep import run_sweep

    job = load_run_config(config, common + ["tune.include_default=false"])
    report = run_sweep(job, space, trials, name=name, progress=False, base_dir=REPO)
    out = []
    for t in sorted(report["trials"], key=lambda t: t["path"]):  # trial directories are named by their index
        epochs = tune_cost.iteration_seconds(t["path"])
        if t["status"] != "finished" or not epochs:
            raise RuntimeError(f"a distilled_tune trial of {name} ended {t['status']}: {t}")
        out.append((float(t["seconds"]), epochs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "run_default.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default=tune_cost.DEFAULT_TEACHER)
    ap.add_argument("--cache", default=None, help="the teacher cache (default: <out>/<stamp>/cache, precomputed)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_trial_cost"))
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "trial_cost.json"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reader", choices=("object_store", "parquet"), default="object_store",
                    help="how the in-process distilled arms read the cache (a sweep's trials: object_store)")
    ap.add_argument("--space", default="mgd", help="the sweep space of the distilled_tune arm")
    ap.add_argument("--onednn-arm", action="store_true",
                    help="also time the distilled trial with SmallMapConv2d off (every connector conv on oneDNN)")
    args = ap.parse_args()

    from curriculum.cluster import ensure_ray
    from curriculum.pipeline import absolute_paths, load_run_config
    from tune_spaces import load_space

    out = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
    cache = Path(args.cache).resolve() if args.cache else out / "cache"
    common = tune_cost.bench_overrides(args.teacher, args.threads) + list(args.set) + [
        f"cache.root={cache}", f"output_dir={out}", f"tune.output_dir={out}"]
    job = absolute_paths(load_run_config(args.config, common), REPO)
    loop = tune_cost.student_alone_loop(job, out / "tune").to_dict()
    ensure_ray(job.ray)
    prep, init = prepare_distilled(job, out / "prepared")
    stores = warm_stores(prep, job.cache.memory_bytes) if args.reader == "object_store" else None
    space = load_space(args.space)
    from tune_spaces.sweep import trial_entries

    def entries(tag: str) -> list[Any]:  # the distilled arms' stages, as distilled_in_process builds them
        return trial_entries(job, prep.stages, init, out / tag, eval_images=job.tune.eval_images,
                             threads=job.tune.threads_per_trial,
                             shard_stores={t: st.name for t, st in (stores or {}).items()})

    flops = step_flops(entries("flops")[0])
    print(json.dumps({"flops": flops}), flush=True)
    rounds = []
    for r in range(args.repeats):
        alone_s, alone_epochs = tune_cost.student_alone_seconds(job, out / f"alone_{r}")
        with CpuWatch() as watch:
            tune_s, tune_epochs = tune_trial(loop, out / "ray", f"alone_tune_{r}", args.threads)
        dist_s, dist_epochs = distilled_in_process(job, prep, init, out / f"distilled_{r}", stores)
        onednn = {}
        if args.onednn_arm:
            from trainers.distill.common import SmallMapConv2d

            with SmallMapConv2d.bound(0):
                s, epochs = distilled_in_process(job, prep, init, out / f"distilled_onednn_{r}", stores)
            onednn = {"distilled_onednn_s": round(s, 2), "distilled_onednn_epochs_s": [round(x, 2) for x in epochs]}
        plain_s, plain_epochs, niceness = distilled_plain_tune(entries(f"distilled_plain_tune_{r}"), out / "ray",
                                                               f"distilled_plain_tune_{r}", args.threads)
        with CpuWatch() as tune_watch:
            (dtune_s, dtune_epochs), (warm_s, warm_epochs) = distilled_tune(args.config, common, space,
                                                                             f"distilled_tune_{r}")
        rounds.append({"alone_s": round(alone_s, 2), "alone_epochs_s": [round(x, 2) for x in alone_epochs],
                       "alone_tune_s": round(tune_s, 2), "alone_tune_epochs_s": [round(x, 2) for x in tune_epochs],
                       "distilled_s": round(dist_s, 2), "distilled_epochs_s": [round(x, 2) for x in dist_epochs],
                       **onednn, "distilled_plain_tune_s": round(plain_s, 2),
                       "distilled_plain_tune_epochs_s": [round(x, 2) for x in plain_epochs],
                       "distilled_tune_s": round(dtune_s, 2),
                       "distilled_tune_epochs_s": [round(x, 2) for x in dtune_epochs],
                       "distilled_tune_warm_s": round(warm_s, 2),
                       "distilled_tune_warm_epochs_s": [round(x, 2) for x in warm_epochs],
                       "cpu_s": split_cpu(watch.spent(), os.getpid()),
                       "distilled_tune_cpu_s": split_cpu(tune_watch.spent(), os.getpid())})
        print(json.dumps(rounds[-1]), flush=True)
    result = {**summarise(rounds), "flops": flops, "reader": args.reader,
              "niceness": {"driver": os.nice(0), "trial": niceness}, "rounds": rounds, "overrides": common[:-2],
              "machine": f"{os.cpu_count()} CPUs, threads {args.threads}"}

    def row(seconds: float, epochs: list[float]) -> str:
        return f"{seconds:.1f} ({', '.join(f'{x:.2f}' for x in epochs)})"

    lines = ["| round | alone, in process: s (epochs) | alone, as a Tune trial | distilled from the cache, in process "
             "| distilled, in a plain Tune trial | distilled, as a sweep's first trial | the same sweep's second trial "
             "| CPU s while each Tune trial ran (alone / the sweep's two): trial / driver / rest |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds):
        c, d = r["cpu_s"], r["distilled_tune_cpu_s"]
        lines.append(f"| {i} | {row(r['alone_s'], r['alone_epochs_s'])} | "
                     f"{row(r['alone_tune_s'], r['alone_tune_epochs_s'])} | "
                     f"{row(r['distilled_s'], r['distilled_epochs_s'])} | "
                     f"{row(r['distilled_plain_tune_s'], r['distilled_plain_tune_epochs_s'])} | "
                     f"{row(r['distilled_tune_s'], r['distilled_tune_epochs_s'])} | "
                     f"{row(r['distilled_tune_warm_s'], r['distilled_tune_warm_epochs_s'])} | "
                     f"{c['trial']:.1f} / {c['driver']:.1f} / {c['other']:.1f}; "
                     f"{d['trial']:.1f} / {d['driver']:.1f} / {d['other']:.1f} |")
    lines += ["", f"Reader of the in-process distilled arms: {args.reader}. Medians over rounds: distilled / alone "
              f"{result['distilled_over_alone']:.3f} (a later epoch {result['distilled_later_epoch_ratio']:.3f}); "
              f"a later epoch as a Tune trial / in process: alone {result['tune_later_epoch_ratio']:.3f}, distilled "
              f"{result['distilled_tune_later_epoch_ratio']:.3f} (the sweep's second trial "
              f"{result['distilled_tune_warm_later_epoch_ratio']:.3f}), distilled in a plain Tune trial "
              f"{result['distilled_plain_tune_later_epoch_ratio']:.3f} (the sweep's over alone's in process "
              f"{result['distilled_tune_over_alone']:.3f}, its second trial's "
              f"{result['distilled_tune_warm_over_alone']:.3f}); alone's first epoch in Tune "
              f"+{result['tune_first_epoch_excess_s']:.2f} s; the alone Tune trial's share of the CPU seconds while "
              f"it ran {100 * result['trial_cpu_share']:.1f}%.", "",
              f"One training step of the first stage on its first batch: {flops['student_step_gflop']:.3f} GFLOP "
              f"alone, {flops['distilled_step_gflop']:.3f} with the distillation "
              f"(+{100 * flops['distill_flops_share']:.1f}%)."]
    if "onednn_over_small_conv" in result:
        lines += ["", "Distilled with every connector convolution on oneDNN (s, epochs): " + "; ".join(
            row(r["distilled_onednn_s"], r["distilled_onednn_epochs_s"]) for r in rounds)
            + f". Median of the rounds' distilled_onednn / distilled: {result['onednn_over_small_conv']:.3f}."]
    print("\n" + "\n".join(lines))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
