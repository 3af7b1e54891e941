"""`curriculum tune`: search spaces, trial configs, and small real sweeps on Ray Tune.

The sweeps use tiny configs (one teacher trained for 2 iterations, 2 epochs of 2 iterations per trial, 4 val
images): they check the machinery (a trial per point, the cache shared, a failing trial reported, resume, the best
config accepted by `curriculum run`), not which parameters win.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curriculum.config import RunJobConfig, config_from_dict, to_dict
from curriculum.errors import ConfigError
from tune_spaces import SPACES, Param, Space, load_space
from tune_spaces.sweep import _max_epochs, default_point, trial_config_dict

REPO = Path(__file__).resolve().parents[1]


def base_config(**kw) -> dict:
    d = to_dict(config_from_dict(RunJobConfig, {
        "teachers": [{"name": "fcos_resnet_mini"}, {"name": "fcos_resnet18_half"}],
        "stages": [{"epochs": 3}, {"epochs": 2}], "kd_ratio": 1.0,
        "losses": [{"name": "fitnet"}, {"name": "mgd", "preset": "retinanet"}],
    }))
    d.update(kw)
    return d


# ------------------------------------------------------------------------------------------------ spaces


def test_every_named_space_builds_tune_distributions_and_documents_its_ranges():
    for name, space in SPACES.items():
        dist = space.to_tune()
        assert set(dist) == set(space.params), name
        assert space.doc and all(p.doc for p in space.params.values()), name
    assert SPACES["mgd"].params["losses[mgd].lambda_mask"].low <= 0.65 <= SPACES["mgd"].params[
        "losses[mgd].lambda_mask"].high  # the authors' value is inside the range


def test_trial_config_sets_dotted_keys_loss_options_by_name_and_whole_schedules():
    base = base_config(decay={"kind": "step", "restart": False, "params": {"gamma": 0.5, "step_size": 2}})
    space = Space("t", "test", {
        "train.lr": Param("loguniform", 1e-4, 1e-2), "stages.1.epochs": Param("randint", 1, 4),
        "losses[mgd].lambda_mask": Param("uniform", 0.3, 0.8),
        "decay": Param("choice", values=({"kind": "linear"}, {"kind": "exponential", "params": {"gamma": 0.7}})),
    })
    assert space.params["decay"].labels() == ["linear", "exponential(gamma=0.7)"]
    d = trial_config_dict(base, space, {"train.lr": 3e-3, "stages.1.epochs": 4, "losses[mgd].lambda_mask": 0.4,
                                        "decay": "exponential(gamma=0.7)"})
    assert d["train"]["lr"] == 3e-3 and d["stages"][1]["epochs"] == 4 and d["stages"][0]["epochs"] == 3
    assert d["losses"][1] == {"name": "mgd", "preset": "retinanet", "lambda_mask": 0.4}  # the entry named mgd
    assert d["losses"][0] == {"name": "fitnet"}
    # A schedule replaces kind and params and keeps the section's other keys.
    assert d["decay"] == {"kind": "exponential", "restart": False, "params": {"gamma": 0.7}}
    assert trial_config_dict(base, space, {"decay": "linear"})["decay"] == {"kind": "linear", "restart": False,
                                                                         "params": {}}
    config_from_dict(RunJobConfig, d)  # a valid run config
    assert base["decay"]["kind"] == "step"  # the base is not modified

    with pytest.raises(ConfigError, match="no loss entry named 'hinton_kd'"):
        trial_config_dict(base, Space("h", "x", {"losses[hinton_kd].temperature": Param("uniform", 1, 2)}),
                          {"losses[hinton_kd].temperature": 1.5})
    with pytest.raises(ConfigError, match="not an entry of a list of 2"):
        trial_config_dict(base, Space("s", "x", {"stages.5.epochs": Param("randint", 1, 2)}), {"stages.5.epochs": 1})


def test_default_point_is_the_configs_own_values_or_none_outside_the_space():
    base = base_config()
    space = SPACES["mgd"]
    point = default_point(base, space)
    # lambda_mask is unset in the config: the preset's value (MGD RetinaNet 0.65) is the default.
    assert point == {"kd_ratio": 1.0, "losses[mgd].lambda_mask": 0.65, "decay": "linear", "train.lr": 2e-3}
    assert trial_config_dict(base, space, point)["losses"][1]["lambda_mask"] == 0.65
    outside = Space("o", "x", {"kd_ratio": Param("grid", values=(0.5, 2.0))})
    assert default_point(base, outside) is None
    assert _max_epochs(base, SPACES["stages"], 2) == 10 and _max_epochs(base, SPACES["mgd"], 2) == 5


def test_yaml_spaces_are_checked_with_the_file_and_key_named(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("train.lr: {kind: loguniform, low: 0.001, high: 0.01}\n"
                    "decay: {kind: choice, values: [{kind: linear}, {kind: constant}]}\n")
    space = load_space(str(good))
    assert space.params["train.lr"].kind == "loguniform" and space.params["decay"].labels() == ["linear", "constant"]
    for text, msg in [("train.lr: {kind: loguniform, low: 0, high: 1}", "low > 0"),
                      ("train.lr: {kind: uniform, low: 2, high: 1}", "low < high"),
                      ("train.lr: {kind: normal, low: 0, high: 1}", "kind 'normal' is unknown"),
                      ("train.lr: {kind: uniform, lo: 0, high: 1}", "unknown field"),
                      ("train.lr: 0.1", "expected a mapping"),
                      ("- a\n- b", "mapping of config keys")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg) as e:
            load_space(str(bad))
        assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="neither a named space"):
        load_space("no_such_space")


def test_cli_lists_the_spaces(capsys):
    from curriculum.cli import main

    assert main(["tune", "spaces"]) == 0
    text = capsys.readouterr().out
    for name in SPACES:
        assert f"{name}:" in text
    assert "losses[mgd].lambda_mask: uniform [0.3, 0.85]" in text


# ------------------------------------------------------------------------------------------------ sweeps


@pytest.fixture(scope="module")
def tune_shared(tmp_path_factory):
    return tmp_path_factory.mktemp("tune_shared")


def tiny_run(root: Path, shared: Path, out: Path) -> dict:
    return {
        "output_dir": str(out), "data": {"root": str(root), "builtin": "none", "flip": "random"},
        "student": {"name": "fcos_mobilenetv3_micro"},
        "train": {"batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1, "seed": 3},
        "teacher_train": {"epochs": 1, "batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1},
        "teachers_dir": str(shared / "teachers"), "teachers": [{"name": "fcos_resnet_mini"}],
        "stages": [{"epochs": 2}], "kd_ratio": 1.0, "baseline": False,
        "eval": {"max_images": 4, "batch_size": 4},
        "cache": {"root": str(shared / "cache"), "shard_size": 32},
        "trainer": {"num_workers": 1, "cpus_per_worker": 1.0, "max_failures": 0},
        "tune": {"scheduler": "fifo", "eval_images": 4, "cpus_per_trial": 1.0},
    }


def test_sweep_reuses_one_cache_reports_a_failing_trial_and_writes_a_best_config_run_accepts(
        ray_session, shapes_root, tune_shared, tmp_path):
    from curriculum.pipeline import load_run_config, run_pipeline
    from tune_spaces.sweep import run_sweep

    cfg = tiny_run(shapes_root, tune_shared, tmp_path / "run")
    # kd_ratio 1e39 makes the MGD term infinite: that trial fails with a non-finite loss, the others go on.
    space = Space("t", "test", {"kd_ratio": Param("grid", values=(1.0, 0.5, 1e39))})
    report = run_sweep(config_from_dict(RunJobConfig, cfg), space, num_samples=1, progress=False)

    trials = report["trials"]
    assert len(trials) == 4  # the default (kd_ratio 1.0) and the three grid points
    status = {t["params"]["kd_ratio"]: t["status"] for t in trials}
    assert sorted(t["status"] for t in trials) == ["error", "finished", "finished", "finished"]
    assert status[1e39] == "error"
    failed = next(t for t in trials if t["status"] == "error")
    assert "non-finite loss" in failed["error"] and failed["params"] == {"kd_ratio": 1e39}
    for t in trials:
        if t["status"] == "finished":
            assert t["epochs"] == 2 and 0.0 <= t["val_AP"] <= 1.0 and len(t["history"]) == 2
            assert t["teacher_forwards"] == 0  # the trials read the cache: no teacher ran in them
    assert report["teacher_forwards_in_trials"] == 0
    # TensorBoard (issue 17): each trial's stage writes its event files in the trial's folder.
    from helpers import tensorboard_scalars

    done = next(t for t in trials if t["status"] == "finished")
    (stage_dir,) = (Path(done["path"]) / "stages").iterdir()
    tb = tensorboard_scalars(stage_dir / "tensorboard")
    assert [s for s, _ in tb["val/AP"]] == [1, 2] and "distill/decay" in tb and "loss/loss" in tb
    assert report["default"] is not None and report["default"]["params"] == {"kd_ratio": 1.0}
    rep = Path(report["best_config"]).parent
    for f in ("trials.md", "trials.json", "ap_vs_params.png", "trials_ap.png"):
        assert (rep / f).stat().st_size > 0
    assert "non-finite loss" in (rep / "trials.md").read_text()

    # The best config is a run config `curriculum run` takes as it is, with the best trial's value.
    best = report["best"]
    job = load_run_config(report["best_config"])
    assert job.kd_ratio == best["params"]["kd_ratio"] and best["params"]["kd_ratio"] in (1.0, 0.5)
    assert job.output_dir.endswith("_tuned_t-fifo")
    result = run_pipeline(job, progress=False)
    assert [r["role"] for r in result["rows"]] == ["teacher", "stage"]

    # The same inline (the cost the cache avoids): the trials run the teacher themselves.
    inline = run_sweep(config_from_dict(RunJobConfig, {**cfg, "tune": {**cfg["tune"], "teacher_mode": "inline"}}),
                       Space("t", "test", {"kd_ratio": Param("grid", values=(1.0,))}), num_samples=1,
                       name="inline", progress=False)
    assert len(inline["trials"]) == 2  # the default point and the one-value grid: the same config twice
    for trial in inline["trials"]:
        # 2 epochs x 2 batches with the teacher inline, plus the 4 calibration batches of kd_ratio.
        assert trial["status"] == "finished" and trial["teacher_forwards"] == 2 * 2 + 4
    assert inline["teacher_forwards_in_trials"] == 2 * (2 * 2 + 4)


def test_a_stopped_sweep_resumes_without_losing_finished_trials(shapes_root, tune_shared, tmp_path):
    """The driver is killed (SIGKILL) once the first trial has finished; `--resume` keeps that trial's results and
    runs the rest. The sweep runs in subprocesses with their own local Ray, as a user's would."""
    cfg = tiny_run(shapes_root, tune_shared, tmp_path / "run")
    cfg["tune"]["max_concurrent"] = 1  # one trial at a time: the kill lands between trials
    # Trials of a few seconds: a new trial starts in the finished one's process at once (reuse_actors), so the kill
    # must land before the next one ends.
    cfg["train"]["max_iters_per_epoch"] = 20
    cfg["ray"] = {"num_cpus": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "space.yaml").write_text("kd_ratio: {kind: grid, values: [0.5, 1.0, 2.0]}\n")
    cmd = [sys.executable, "-m", "curriculum.cli", "tune", str(tmp_path / "run.yaml"), "--space",
           str(tmp_path / "space.yaml"), "--num-samples", "1", "--name", "r", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    trials_dir = tmp_path / "run" / "tune" / "r" / "ray" / "trials"

    def finished() -> list[Path]:
        """The trials that have trained their stage: its done.json, written by the trial as the stage ends (Tune's
        own result.json files are flushed later, in batches)."""
        return list(trials_dir.glob("*/stages/*/done.json"))

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 480
        while not finished() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert finished(), (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_first = {f: f.read_text() for f in finished()}
    assert len(done_first) < 4  # killed with trials left (the default and three grid points)

    again = subprocess.run(cmd[:-1] + ["--resume", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "tune" / "r" / "report" / "trials.json").read_text())
    assert sorted(t["status"] for t in report["trials"]) == ["finished"] * 4
    for f, text in done_first.items():
        assert f.read_text() == text  # a finished trial was not run again


def test_pbt_clones_a_better_trial_and_goes_on_from_its_checkpoint(ray_session, shapes_root, tune_shared, tmp_path):
    """Population Based Training: after each epoch the worst quarter of 4 trials clones the best one's checkpoint
    and perturbs its values; the clone finishes its epochs from the donor's stage and epoch."""
    from tune_spaces.sweep import run_sweep

    cfg = tiny_run(shapes_root, tune_shared, tmp_path / "run")
    cfg["stages"] = [{"epochs": 3}]
    cfg["tune"].update(scheduler="pbt", perturbation_interval=1)
    space = Space("p", "test", {"kd_ratio": Param("loguniform", 0.25, 4.0),
                                "decay": Param("choice", values=({"kind": "linear"}, {"kind": "constant"}))})
    report = run_sweep(config_from_dict(RunJobConfig, cfg), space, num_samples=3, progress=False)
    trials = report["trials"]
    assert len(trials) == 4 and all(t["status"] == "finished" and t["epochs"] == 3 for t in trials)
    log = Path(report["best_config"]).parents[1] / "ray" / "trials" / "pbt_global.txt"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    assert rows, "PBT never exploited"
    # [target tag, donor tag, ..., donor's values, target's new values]; a tag starts with the trial's index.
    # Which trial clones which depends on the val AP of each epoch; what must hold whatever the order:
    # the last clone into a trial holds the values it finished with,
    last = {int(str(row[0]).split("_")[0]): row[-1] for row in rows}
    by_index = {int(t["trial"].split("_")[-1]): t for t in trials}
    for target, values in last.items():
        t = by_index[target]
        assert t["params"]["decay"] == values["decay"]
        assert t["params"]["kd_ratio"] == pytest.approx(values["kd_ratio"], rel=1e-9)
    # and every trial trained its last epoch with its own kd_ratio: the feature factor is kd_ratio x (detector
    # loss / feature loss) calibrated once on the shared start, so factor / kd_ratio is the same for every trial,
    # clones included (a clone rescales its donor's factors to its perturbed kd_ratio).
    for t in trials:
        assert t["trained_kd_ratio"] == pytest.approx(t["params"]["kd_ratio"], rel=1e-9), t
    per_ratio = [t["loss_factor"] / t["trained_kd_ratio"] for t in trials]
    assert max(per_ratio) == pytest.approx(min(per_ratio), rel=1e-6), per_ratio
