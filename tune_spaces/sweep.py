"""`curriculum tune CONFIG --space NAME --num-samples N`: Ray Tune over the stages of a curriculum run.

Before any trial, the sweep does what `curriculum run` does before its stages (curriculum/pipeline.py
`prepare_run`): the data set, the teachers (trained when missing), the order, and the teacher caches, precomputed
once. Every trial then trains the student through every stage reading those caches: no trial runs a teacher
forward (each trial reports `teacher_forwards`, counted by the zoo in the trial's process; the report sums them).

A trial is a Tune function trainable running the same training loop as a Ray Train worker
(`trainers.ray_train.run_training` with a `TuneSession`), in one process, and reports after every epoch the val
metrics and a checkpoint (stage, epoch, student, adapters, optimizer, scheduler). Why not a TorchTrainer per trial
(shared/RAY_NOTES.md's Train-in-Tune pattern): in Ray 2.60 that pattern forwards only metrics to Tune, not
checkpoints, so Population Based Training could not clone a trial; and a 2-worker TorchTrainer per stage costs
a fixed start-up (shared/RAY_NOTES.md), a large share of a small student's stage. A sweep gets its parallelism from
concurrent trials instead of DDP inside one.

Schedulers: ASHA stops trials early on the metric (time = epochs over all stages); PBT clones the best trials'
checkpoints into the worst and perturbs their parameters (a clone goes on at the donor's stage and epoch; the
calibrated feature weights follow a perturbed `kd_ratio` exactly, since they are linear in it); FIFO runs every
trial to the end (what the cost benchmark uses, so that both arms run the same trials).

Failures: a trial that fails (a non-finite loss, out of memory, a dead process) is reported with its parameters
and error, and the sweep goes on. `--resume` restores a stopped sweep: finished trials are kept as they are,
unfinished ones go on from their last checkpoint.

Results (`<sweep>/report/`): `trials.md` / `trials.json` (every trial sorted by the metric, with its parameters,
epochs, status, error), `best.yaml` (the run config with the best finished trial's values, which `curriculum run`
takes as it is), `ap_vs_params.png` (the metric against each parameter) and `trials_ap.png` (each trial's metric
per epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from curriculum.config import RunJobConfig, apply_overrides, config_from_dict, to_dict
from curriculum.errors import ConfigError, CurriculumError
from curriculum.files import storage_env
from tune_spaces import Space, format_value

log = logging.getLogger("curriculum.tune")


# ------------------------------------------------------------------------------------------- trial configs


def _resolve_key(data: dict[str, Any], key: str) -> str:
    """`losses[NAME].opt` -> `losses.<i>.opt` for the first loss entry named NAME (error when there is none)."""
    if not key.startswith("losses["):
        return key
    name, sep, rest = key[len("losses["):].partition("]")
    if not sep:
        raise ConfigError(f"search key {key!r}: expected losses[NAME].option")
    for i, entry in enumerate(data.get("losses") or []):
        if isinstance(entry, dict) and entry.get("name") == name:
            return f"losses.{i}{rest}"
    have = [e.get("name") for e in data.get("losses") or [] if isinstance(e, dict)]
    raise ConfigError(f"search key {key!r}: the run config has no loss entry named {name!r} (losses: {have}); "
                      "pick a space for the configured losses, or add the loss to `losses`")


def _get(data: Any, key: str) -> Any:
    node = data
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def trial_config_dict(base: dict[str, Any], space: Space, values: dict[str, Any]) -> dict[str, Any]:
    """The run config (as a dict) of a trial: `base` with the space's keys set to the trial's (Tune) values.

    A mapping value (a decay schedule) is merged into its section; the schedule's params are replaced whole.
    """
    data = copy.deepcopy(base)
    for key, param in space.params.items():
        if key not in values:
            continue
        value = param.decode(values[key])
        path = _resolve_key(data, key)
        if isinstance(value, dict) and isinstance(_get(data, path), dict):
            merged = dict(_get(data, path))
            merged.update(copy.deepcopy(value))
            if "kind" in value and "params" not in value:
                merged["params"] = {}
            value = merged
        apply_overrides(data, {path: value})
    return data


def default_point(base: dict[str, Any], space: Space) -> dict[str, Any] | None:
    """The config's own values as a Tune point (the default trial), or None when one is outside the space."""
    point = {}
    for key, param in space.params.items():
        value = _get(base, _resolve_key(base, key))
        if key == "decay" and isinstance(value, dict):  # a schedule choice: kind and params only
            value = {k: v for k, v in value.items() if k in ("kind", "params") and (k != "params" or v)}
        if value is None:
            value = _entry_default(base, key)
        value = param.encode(value)
        if param.kind in ("choice", "grid") and value not in param.labels():
            log.warning("the config's %s = %s is not one of the space's values: no default trial", key,
                        format_value(value))
            return None
        point[key] = value
    return point


def _entry_default(base: dict[str, Any], key: str) -> Any:
    """A loss option the config leaves unset: the method's own default (preset included)."""
    import inspect

    from trainers.distill.registry import LOSSES

    path = _resolve_key(base, key)
    parts = path.split(".")
    if parts[0] != "losses" or len(parts) != 3:
        return None
    entry = base["losses"][int(parts[1])]
    cls = LOSSES[entry["name"]]
    if parts[2] == "weight":
        return 1.0
    module = __import__(cls.__module__, fromlist=["PRESETS"])
    presets = getattr(module, "PRESETS", {})
    preset = entry.get("preset") or getattr(module, "DEFAULT_PRESET", None)
    if preset in presets and parts[2] in presets[preset]:
        return presets[preset][parts[2]]
    p = inspect.signature(cls.__init__).parameters.get(parts[2])
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _max_epochs(base: dict[str, Any], space: Space, n_stages: int) -> int:
    """Most epochs a trial can run (ASHA's max_t): stage lengths at the top of their ranges."""
    stages = base.get("stages") or [{}]
    per = [stages[i if len(stages) > 1 else 0].get("epochs", 4) for i in range(n_stages)]
    for key, p in space.params.items():
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) == 3 and parts[2] == "epochs" and parts[1].isdigit():
            i = int(parts[1])
            top = max(p.values) if p.kind in ("choice", "grid") else p.high
            if i < len(per):
                per[i] = max(per[i], int(top))
    return int(sum(per))


# ------------------------------------------------------------------------------------------------ trial


def trial_entries(job: RunJobConfig, stages: list[Any], init: str | Path | None, workdir: Path, *,
                  eval_images: int | None, threads: int, use_gpu: bool = False,
                  shard_stores: dict[str, str] | None = None) -> list[Any]:
    """A trial's sequence: the run's stage entries with the trial's threads, device and per-epoch evaluation of
    `eval_images`, without the trainer's worker hooks (a trial is not a Ray Train worker); each stage reads the
    `shard_stores` of its teachers ({teacher: store name}; none: the caches' own shards)."""
    from curriculum.pipeline import stage_entry

    stores = shard_stores or {}
    return [stage_entry(job, st, init if st.index == 0 else None, workdir, continues=st.index > 0, progress=False,
                        eval_images=eval_images, threads_per_worker=max(1, threads), eval_every=1, use_gpu=use_gpu,
                        worker_hooks=[], shard_stores={m.name: stores[m.name] for m in st.teachers if m.name in stores})
            for st in stages]


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): the curriculum's stages with the trial's values, as one sequence
    (`trainers.ray_train.run_sequence`: each stage calibrated as it starts, resumed at the checkpoint's stage and
    epoch, the feature factors of a PBT clone rescaled to its perturbed kd_ratio)."""
    import ray.tune

    from curriculum.plan import build_plan
    from teachers.outputs import teacher_forward_counts
    from trainers.ray_train import TuneSession, run_sequence

    # A trial's process has its node's environment: the driver's object-store variables reach the caches from here
    # (Tune has no runtime env per trial).
    os.environ.update(ctx["storage_env"])
    space = ctx["space"]
    data = trial_config_dict(ctx["job"], space, config)
    job: RunJobConfig = config_from_dict(RunJobConfig, data, "trial config")
    torch.set_num_threads(max(1, ctx["threads"]))
    forwards0 = teacher_forward_counts()["teacher"]
    stages = build_plan(job, ctx["checkpoints"], ctx["order"])
    for member in (m for st in stages for m in st.teachers):  # the cache, class map and adapter prepared once
        for key, value in ctx["members"].get(member.name, {}).items():
            setattr(member, key, value)
    workdir = Path(ray.tune.get_context().get_trial_dir())
    device = "cuda" if ctx["gpus"] > 0 and torch.cuda.is_available() else "cpu"
    entries = trial_entries(job, stages, ctx["init"], workdir, eval_images=ctx["eval_images"],
                            threads=ctx["threads"], use_gpu=device == "cuda", shard_stores=ctx["stores"])
    session = TuneSession(resume=ray.tune.get_checkpoint(), device=device,
                          extra=lambda m: {"teacher_forwards": teacher_forward_counts()["teacher"] - forwards0})
    run_sequence(entries, session)  # the shard stores are the sweep's: they stay filled for the other trials


# ------------------------------------------------------------------------------------------------ the sweep


def _finished(trial_id: str, result: dict[str, Any]) -> bool:
    """Tune stopper: the trial has trained every epoch of every stage."""
    return result.get("epochs_done", 0) >= result.get("planned_epochs", math.inf)


def _scheduler(kind: str, cfg: Any, space: Space, max_t: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max(max_t, cfg.grace_period),
                             grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    if kind == "pbt":
        # synch: every trial reaches the interval before the worst are replaced, so the outcome does not depend on
        # which trials happened to be running at that moment (trials wait paused, freeing their resources).
        # Its draws (donor, perturbation) come from the driver's global `random` and numpy: `_fit` seeds them.
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=cfg.perturbation_interval,
                                       hyperparam_mutations=space.to_tune(mutation=True), quantile_fraction=0.25,
                                       synch=True)
    return FIFOScheduler()


def sweep_dir(job: RunJobConfig, name: str) -> Path:
    return Path(job.tune.output_dir or Path(job.output_dir) / "tune") / name


def run_sweep(job: RunJobConfig, space: Space, num_samples: int, name: str | None = None, resume: bool = False,
              progress: bool = True, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The sweep of the module docstring; returns its report (also written under `<sweep>/report/`)."""
    from ray import tune

    from curriculum.cluster import ensure_ray
    from curriculum.pipeline import Phases, absolute_paths, check_run_config, prepare_run
    from curriculum.plan import total_epochs

    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    check_run_config(job)
    given = job
    job = absolute_paths(job, base_dir)
    cfg = job.tune
    name = name or f"{space.name}-{cfg.scheduler}"
    out = sweep_dir(job, name)
    storage, exp_name = out / "ray", "trials"
    exists = tune.Tuner.can_restore(str(storage / exp_name))
    if exists and not resume:
        raise CurriculumError(f"{out} already holds the sweep {name!r}: pass --resume to continue it (finished "
                              "trials are kept), or give another --name (nothing was overwritten)")
    if resume and not exists:
        raise CurriculumError(f"--resume: {out} holds no sweep to resume (start it without --resume)")
    base = to_dict(job)
    for key in space.params:  # a key the config cannot take fails here, before teachers or trials run
        _resolve_key(base, key)
    default = default_point(base, space) if cfg.include_default else None
    if default is not None:  # the default trial must build: same check as any trial
        config_from_dict(RunJobConfig, trial_config_dict(base, space, default), "default trial")

    out.mkdir(parents=True, exist_ok=True)
    phases = Phases(out / "phases.json")
    t0 = time.perf_counter()
    prep = prepare_run(dataclasses.replace(job, direct=False), out, phases, progress,
                       precompute_caches=cfg.teacher_mode == "cache")
    init, _ = prep.start_from(prep.stages[0].teachers[0].name, "curriculum")
    ensure_ray(job.ray)
    members = {m.name: {"cache": m.cache, "class_map": m.class_map, "adapter": m.adapter,
                        "components": m.components} for s in prep.stages for m in s.teachers}
    caches = {name: m["cache"] for name, m in members.items() if m["cache"] and not m["adapter"]}
    stores = {}
    if job.cache.object_store and cfg.teacher_mode == "cache":
        from teachers.readers import ObjectStoreShards

        # One store per teacher cache for the whole sweep, owned by this driver: every trial reads the same
        # decoded shards from Ray's object store. Not waited for: its process starts, and decodes the shards
        # (`fill`), while Tune starts the first trial's, whose reader waits for it (the cache itself was checked
        # complete here).
        stores = {t: ObjectStoreShards(c, budget_bytes=job.cache.memory_bytes, wait=False, fill=True)
                  for t, c in caches.items()}
    ctx = {"job": base, "space": space, "checkpoints": prep.checkpoints, "order": prep.order,
           "members": members,
           "stores": {t: st.name for t, st in stores.items()}, "init": str(init),
           "threads": cfg.threads_per_trial, "gpus": cfg.gpus_per_trial, "eval_images": cfg.eval_images,
           "teacher_mode": cfg.teacher_mode, "storage_env": storage_env()}
    resources = {"CPU": cfg.cpus_per_trial}
    if cfg.gpus_per_trial:
        resources["GPU"] = cfg.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources)
    max_t = _max_epochs(base, space, len(prep.stages))
    param_space = space.to_tune()
    try:
        grid = _fit(tune, trainable, param_space, storage, exp_name, resume, cfg, space, default, num_samples,
                    max_t, progress, phases)
    finally:
        for st in stores.values():
            st.close()
    trials = collect_trials(grid, space, cfg.metric)
    report = write_sweep_report(given, job, space, name, out, trials, cfg, phases, time.perf_counter() - t0,
                                default, total_epochs(prep.stages))
    print("\n" + report["markdown"], flush=True)
    return report


def _fit(tune: Any, trainable: Any, param_space: dict, storage: Path, exp_name: str, resume: bool, cfg: Any,
         space: Space, default: dict | None, num_samples: int, max_t: int, progress: bool, phases: Any) -> Any:
    with phases("trials"):
        if resume:
            tuner = tune.Tuner.restore(str(storage / exp_name), trainable=trainable, param_space=param_space,
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
        else:
            import random

            import numpy as np
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # PBT has no seed of its own in Ray 2.60: it draws from these (the sweep's seed makes them replayable).
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)

            # The cap on concurrent trials lives in the generator (Tune ignores max_concurrent_trials with one).
            search = BasicVariantGenerator(points_to_evaluate=[default] if default else None, random_state=cfg.seed,
                                           max_concurrent=cfg.max_concurrent)
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    # Tune counts the default point as one sample (a whole grid, for grid parameters): one more.
                    metric=cfg.metric, mode="max", num_samples=num_samples + (1 if default else 0), search_alg=search,
                    scheduler=_scheduler(cfg.scheduler, cfg, space, max_t),
                    # A new trial runs in a finished one's process: no process start and no imports between trials.
                    reuse_actors=True),
                run_config=tune.RunConfig(
                    # A trial at its last epoch is finished before a scheduler sees the result: PBT would
                    # otherwise clone into it a checkpoint it never trains from, and log values it never used.
                    stop=_finished if cfg.scheduler == "pbt" else None,
                    storage_path=str(storage), name=exp_name, verbose=1 if progress else 0,
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=4)),
            )
        return tuner.fit()


# ------------------------------------------------------------------------------------------------ report


def collect_trials(grid: Any, space: Space, metric: str) -> list[dict[str, Any]]:
    """One row per trial: its Tune values, last metrics, epochs, status and error, sorted best first."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        cfg = {k: v for k, v in (result.config or {}).items() if k in space.params}
        hist = []
        try:
            df = result.metrics_dataframe
            if df is not None and metric in df:
                hist = [float(x) for x in df[metric].tolist()]
        except Exception:  # no progress file yet (a trial that failed at once)
            hist = []
        err = None
        if result.error is not None:
            err = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
        done, planned = m.get("epochs_done"), m.get("planned_epochs")
        status = "error" if err else ("finished" if done is not None and done == planned else "stopped early")
        rows.append({
            # The id from the trial's folder: after a PBT clone the last metrics may be the donor's.
            "trial": _trial_id(result.path) or m.get("trial_id") or "?",
            "status": status, metric: m.get(metric), "val_AP50": m.get("val_AP50"), "epochs": done,
            "planned_epochs": planned, "teacher_forwards": m.get("teacher_forwards"),
            # what the last epoch trained with (after a PBT clone: the perturbed kd_ratio, the rescaled factor)
            "trained_kd_ratio": m.get("kd_ratio"), "loss_factor": m.get("loss_factor"),
            "params": cfg, "error": err, "history": hist, "path": result.path,
            "seconds": m.get("time_total_s"),  # Tune's clock: from the trial's start to its last report
        })
    rows.sort(key=lambda r: (r["status"] != "finished", -(r[metric] if r[metric] is not None else -math.inf)))
    return rows


def _trial_id(path: str | None) -> str | None:
    import re

    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name) if path else None
    return found.group(1) if found else None


def write_sweep_report(given: RunJobConfig, job: RunJobConfig, space: Space, name: str, out: Path,
                       trials: list[dict[str, Any]], cfg: Any, phases: Any, wall: float, default: dict | None,
                       planned_epochs: int) -> dict[str, Any]:
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    metric = cfg.metric
    keys = list(space.params)
    finished = [t for t in trials if t["status"] == "finished" and t[metric] is not None]
    best = finished[0] if finished else None
    default_row = next((t for t in trials if default is not None and t["params"] == default), None)
    forwards = sum(int(t["teacher_forwards"] or 0) for t in trials)

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{100 * v:.2f}" if isinstance(v, float) else str(v))

    lines = [f"# Sweep {name}: space `{space.name}`, {cfg.scheduler}, {len(trials)} trials, metric {metric}", "",
             f"{space.doc}.", "",
             f"| rank | trial | status | {metric} x100 | AP50 x100 | epochs | " + " | ".join(keys) + " |",
             "|---:|---|---|---:|---:|---:|" + "---|" * len(keys)]
    for i, t in enumerate(trials):
        tag = " (default)" if t is default_row else ""
        lines.append(f"| {i + 1} | {t['trial']}{tag} | {t['status']} | {fmt(t[metric])} | {fmt(t['val_AP50'])} | "
                     f"{fmt(t['epochs'])}/{fmt(t['planned_epochs'])} | "
                     + " | ".join(format_value(t["params"].get(k)) for k in keys) + " |")
    errors = [t for t in trials if t["error"]]
    if errors:
        lines += ["", "Failed trials (the sweep went on):", ""]
        lines += [f"- {t['trial']} ({', '.join(f'{k}={format_value(v)}' for k, v in t['params'].items())}): "
                  f"{t['error']}" for t in errors]
    lines += ["", f"Teacher forwards run inside the trials: {forwards} (teacher mode: {cfg.teacher_mode}"
              + ("; every trial read the cache precomputed before the trials" if cfg.teacher_mode == "cache" else "")
              + ")."]
    best_yaml = None
    if best is not None:
        data = trial_config_dict(to_dict(given), space, best["params"])
        data["output_dir"] = f"{given.output_dir.rstrip('/')}_tuned_{name}"
        config_from_dict(RunJobConfig, data, "best config")  # what `curriculum run` will check
        best_yaml = rep / "best.yaml"
        header = (f"# Best trial {best['trial']} of sweep {name} ({metric} {100 * best[metric]:.2f}): the run config "
                  f"with its values.\n# Run it: curriculum run {best_yaml}\n")
        best_yaml.write_text(header + yaml.safe_dump(data, sort_keys=False))
        lines += ["", f"Best finished trial: {best['trial']}, {metric} {100 * best[metric]:.2f}"
                  + (f" against {100 * default_row[metric]:.2f} for the default config"
                     if default_row is not None and default_row[metric] is not None else "")
                  + f". Its config: `{best_yaml}` (`curriculum run {best_yaml}`)."]
    else:
        lines += ["", "No trial finished: no best config written."]
    lines += ["", "Wall time per phase:", "", "| phase | seconds | reused |", "|---|---:|---|"]
    lines += [f"| {p['phase']} | {p['seconds']:.1f} | {'yes' if p['reused'] else ''} |" for p in phases.rows]
    lines += ["", f"Total wall time: {wall:.1f} s."]
    md = "\n".join(lines)
    (rep / "trials.md").write_text(md + "\n")
    _plot_sweep(rep, trials, space, metric)
    report = {"name": name, "space": space.name, "scheduler": cfg.scheduler, "metric": metric,
              "teacher_mode": cfg.teacher_mode, "teacher_forwards_in_trials": forwards,
              "trials": [{k: v for k, v in t.items()} for t in trials],
              "best": best, "default": default_row, "best_config": str(best_yaml) if best_yaml else None,
              "phases": phases.rows, "wall_s": round(wall, 1)}
    (rep / "trials.json").write_text(json.dumps(report, indent=2, default=str))
    report["markdown"] = md
    return report


def _plot_sweep(rep: Path, trials: list[dict[str, Any]], space: Space, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space.params)
    scored = [t for t in trials if t[metric] is not None]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        p = space.params[key]
        colors = ["tab:green" if t["status"] == "finished" else "tab:orange" for t in scored]
        ys = [100 * t[metric] for t in scored]
        if p.kind in ("choice", "grid"):
            labels = [str(v) for v in p.labels()]
            xs = [labels.index(str(t["params"].get(key))) if str(t["params"].get(key)) in labels else -1
                  for t in scored]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        else:
            xs = [t["params"].get(key) for t in scored]
            if p.kind == "loguniform":
                ax.set_xscale("log")
        ax.scatter(xs, ys, c=colors, s=24)
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(f"{metric} (%)", fontsize=8)
    fig.suptitle("green: finished, orange: stopped early (last value)", fontsize=8)
    fig.tight_layout()
    fig.savefig(rep / "ap_vs_params.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        if t["history"]:
            ax.plot(range(1, len(t["history"]) + 1), [100 * v for v in t["history"]], marker=".", label=t["trial"])
    ax.set_xlabel("epoch (all stages)"), ax.set_ylabel(f"{metric} (%)")
    if 0 < sum(1 for t in trials if t["history"]) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout(), fig.savefig(rep / "trials_ap.png", dpi=100), plt.close(fig)


def main_tune(config: str, space: str, num_samples: int, scheduler: str | None = None, name: str | None = None,
              resume: bool = False, overrides: list[str] | None = None, progress: bool = True,
              base_dir: str | None = None) -> int:
    from curriculum.pipeline import load_run_config
    from tune_spaces import load_space

    extra = list(overrides or [])
    if scheduler:
        extra.append(f"tune.scheduler={scheduler}")
    job = load_run_config(config, extra)
    run_sweep(job, load_space(space), num_samples, name=name, resume=resume, progress=progress, base_dir=base_dir)
    return 0


__all__ = ["collect_trials", "default_point", "main_tune", "run_sweep", "sweep_dir", "trial_config_dict"]
