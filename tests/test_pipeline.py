"""`curriculum run` end to end on tiny configs: resume after a kill mid-stage reaches the uninterrupted result, and a
whole run (auto order, two stages, baseline, a worker killed mid-stage and replaced by Ray Train) goes through
`ray job submit` against a local head.

Tolerance of "the same result": every student tensor within 1e-5 absolute (measured: identical, because each
epoch re-seeds its random state from (seed, stage, epoch, rank), the data order is a function of the epoch, and the
checkpoint restores model, adapters, optimizer and scheduler; gloo's CPU all-reduce of two workers is
deterministic). The margin covers a different summation order should the collective change.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from curriculum.config import RunJobConfig, config_from_dict
from curriculum.pipeline import run_pipeline
from faults import die_once_hook

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Teachers and caches shared by the runs of this module (keyed by content, so reuse is safe)."""
    return tmp_path_factory.mktemp("shared")


def tiny(root: Path, shared: Path, out: Path, **kw) -> dict:
    d = {
        "output_dir": str(out), "data": {"root": str(root), "builtin": "none", "flip": "random"},
        "student": {"name": "fcos_mobilenetv3_micro"},
        "train": {"batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1, "seed": 3},
        "teacher_train": {"epochs": 1, "batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1},
        "teachers_dir": str(shared / "teachers"),
        "teachers": [{"name": "fcos_resnet_mini"}],
        "stages": [{"epochs": 2}], "kd_ratio": 1.0, "baseline": False,
        "eval": {"max_images": 4, "batch_size": 4},
        "cache": {"root": str(shared / "cache"), "shard_size": 32},
        "trainer": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0},
    }
    d.update(kw)
    return d


def test_ap_figure_draws_each_teacher_and_names_each_stage():
    from curriculum.report import ap_figure
    from curriculum.plan import Stage

    def stage(i, teacher, epochs):
        return Stage(index=i, name=f"{i + 1}-{teacher}", teachers=[{"name": teacher, "checkpoint": None}], epochs=epochs,
                     losses=[], lr=None, decay_kind="constant", decay_params={}, decay_offset=0, decay_t_max=epochs)

    val = lambda ap: {"AP": ap, "AP50": 2 * ap}  # noqa: E731
    history = [{"epoch": e, "val": val(0.01 * e)} for e in (1, 2, 3, 4, 5)]
    others = {"baseline": {"summary": {"history": [{"epoch": 5}]}, "val": val(0.02)}}
    fig = ap_figure(history, others, [stage(0, "fcos_resnet_mini", 2), stage(1, "fcos_swin_mini", 3)],
                    {"fcos_resnet_mini": 0.105, "fcos_swin_mini": 0.2})
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["teacher fcos_swin_mini (20.0 AP)"].get_ydata()) == [20.0, 20.0]
    assert list(lines["teacher fcos_resnet_mini (10.5 AP)"].get_ydata()) == [10.5, 10.5]
    assert list(lines["baseline AP"].get_ydata()) == [2.0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["stage 1\nfcos_resnet_mini", "stage 2\nfcos_swin_mini"]
    assert [t.get_position()[0] for t in ax.texts] == [1.5, 4.0]  # over the middle of each stage's epochs
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [2.5]  # the border


def test_cache_shard_sampler_gives_each_worker_whole_shards():
    from trainers.ray_train import CacheShardSampler

    shard_of = [i // 16 for i in range(100)]  # 7 cache shards, the last one of 4 images
    for epoch in range(3):
        parts = []
        for rank in range(3):
            smp = CacheShardSampler(shard_of, 3, rank, seed=5)
            smp.set_epoch(epoch)
            parts.append(list(smp))
            assert len(parts[-1]) == len(smp) == 33  # equal counts keep DDP's collectives in step
            assert len({shard_of[i] for i in parts[-1]}) <= 100 // (3 * 16) + 2  # about 1/3 of the cache each
            again = CacheShardSampler(shard_of, 3, rank, seed=5)
            again.set_epoch(epoch)
            assert list(again) == parts[-1]  # a function of (seed, epoch, rank): resumes repeat it
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat) == 99
    one, two = CacheShardSampler(shard_of, 3, 0, seed=5), CacheShardSampler(shard_of, 3, 0, seed=5)
    two.set_epoch(1)
    assert list(one) != list(two)


def test_a_window_of_shards_lets_a_reader_holding_that_many_read_each_shard_once_per_epoch():
    """A cache bigger than the memory budget: each rank's images shuffled within runs of `window` shards. An LRU
    reader of `window` shards then fetches each of its shards once; shuffled over the whole slice it refetches
    for most images. A window covering the slice is the whole-slice order itself."""
    from collections import OrderedDict

    from trainers.ray_train import CacheShardSampler, cache_window

    def fetches(order, keep):
        lru, n = OrderedDict(), 0
        for i in order:
            s = shard_of[i]
            if s in lru:
                lru.move_to_end(s)
                continue
            n += 1
            lru[s] = True
            if len(lru) > keep:
                lru.popitem(last=False)
        return n

    shard_of = [i // 10 for i in range(400)]  # 40 shards of 10 images
    for rank in range(2):
        whole = CacheShardSampler(shard_of, 2, rank, seed=3)
        windowed = CacheShardSampler(shard_of, 2, rank, seed=3, window=2)
        whole.set_epoch(1)
        windowed.set_epoch(1)
        mine = list(windowed)
        assert sorted(mine) == sorted(whole) and len(mine) == len(windowed) == 200
        assert mine != list(whole)
        assert fetches(mine, keep=2) == len({shard_of[i] for i in mine}) == 20
        assert fetches(list(whole), keep=2) > 150
        wide = CacheShardSampler(shard_of, 2, rank, seed=3, window=20)
        wide.set_epoch(1)
        assert list(wide) == list(whole)

    class Reader:
        def __init__(self, nbytes):
            self.nbytes = nbytes

        def shard_nbytes(self, i):
            return self.nbytes

    # a teacher's share 500 bytes, two ranks each holding its window: 500 // (2 x 100) = 2 (the larger shards count)
    assert cache_window([Reader(100), Reader(50)], 2, 1000) == 2
    assert cache_window([Reader(10 ** 6)], 2, 1000) == 1  # at least one shard


def test_cli_run_refuses_a_bad_config(tmp_path, capsys):
    from curriculum.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("teachers: []\n")
    assert main(["run", str(cfg)]) == 2
    assert "at least one teacher" in capsys.readouterr().err
    cfg.write_text("teachers: [{name: fcos_resnet_mini}]\nstages: [{epochs: 1}, {epochs: 1}]\n")
    assert main(["run", str(cfg)]) == 2
    assert "2 entries for 1 teachers" in capsys.readouterr().err
    cfg.write_text("teachers: [{name: fcos_resnet_mini}]\ndecay: {kind: sometimes}\n")
    assert main(["run", str(cfg)]) == 2
    assert "decay.kind" in capsys.readouterr().err


def _weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(out / "stages" / stage / "model.pt", weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def test_resume_mid_stage_equals_uninterrupted(ray_session, shapes_root, shared, tmp_path, monkeypatch):
    """Two stages in one Ray Train run, killed in the second: the resumed run keeps the first stage's outputs,
    goes on from the second's epoch checkpoint with the factors calibrated in the workers, and ends where the
    uninterrupted run ends."""
    first, stage = "1-fcos_resnet_mini", "2-fcos_resnet_mini"
    # kd_reference: stage, so that stage 2's factors (same teacher) come from the student stage 1 ended with
    two = {"stages": [{"epochs": 2, "teachers": ["fcos_resnet_mini"]}, {"epochs": 2, "teachers": ["fcos_resnet_mini"]}],
           "kd_reference": "stage"}
    # Uninterrupted.
    a = tmp_path / "a"
    run_pipeline(config_from_dict(RunJobConfig, tiny(shapes_root, shared, a, **two)), progress=False)
    ref = _weights(a, stage)
    hist_a = json.loads((a / "stages" / stage / "done.json").read_text())["history"]

    # Killed mid-stage: rank 0 dies at the start of stage 2's epoch 2, after its epoch 1 checkpoint; no retries.
    b = tmp_path / "b"
    trainer = {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0,
               "worker_hooks": [die_once_hook(tmp_path / "fault_b", at_stage=1, at_epoch=1)]}
    job_b = config_from_dict(RunJobConfig, tiny(shapes_root, shared, b, trainer=trainer, **two))
    with pytest.raises(Exception):
        run_pipeline(job_b, progress=False)
    assert (tmp_path / "fault_b").exists() and not (b / "stages" / stage / "done.json").exists()
    assert (b / "stages" / first / "done.json").exists()  # written by rank 0 as stage 1 ended
    first_mtime = (b / "stages" / first / "model.pt").stat().st_mtime
    assert list((b / "ray" / "stages").glob("checkpoint_*")), "epoch 1's checkpoint should be there to resume from"
    with pytest.raises(Exception, match="--resume"):
        run_pipeline(job_b, progress=False)  # never overwritten silently
    run_pipeline(job_b, resume=True, progress=False)
    assert (b / "stages" / first / "model.pt").stat().st_mtime == first_mtime  # stage 1 not trained again
    hist_b = json.loads((b / "stages" / stage / "done.json").read_text())["history"]
    assert [h["epoch"] for h in hist_b] == [1, 2]  # epoch 1 came from the checkpoint, not trained twice
    assert _max_diff(ref, _weights(b, stage)) <= TOL
    assert [h["loss"] for h in hist_b] == pytest.approx([h["loss"] for h in hist_a], rel=1e-5)
    # Each stage calibrated once, in the workers, with the student it started from (stage 2: stage 1's model).
    factors = [json.loads((a / "stages" / s / "loss_factors.json").read_text()) for s in (first, stage)]
    assert factors[0] and factors[1] and factors[0] != factors[1]
    for s, f in zip((first, stage), factors):
        assert json.loads((b / "stages" / s / "loss_factors.json").read_text()) == pytest.approx(f, rel=1e-6)

    # The final student is a plain zoo checkpoint: no adapters, no Ray.
    from teachers.zoo import load_detector

    student = load_detector(b / "report" / "student.pt")
    assert set(student.state_dict()) == set(ref)
    report = json.loads((b / "report" / "results.json").read_text())
    assert [r["role"] for r in report["rows"]] == ["teacher", "stage", "stage"]
    assert all(set(r["val"]) >= {"AP", "AP50", "APs", "APm", "APl"} for r in report["rows"])
    phases = {p["phase"]: p for p in report["phases"]}
    assert phases["teacher fcos_resnet_mini: train"]["reused"]  # trained once (run a), then found by its hash
    assert phases[f"stage {first}: train"]["reused"]
    assert not phases[f"stage {stage}: train"]["reused"] and phases[f"stage {stage}: train"]["seconds"] > 0
    assert phases["stages: Ray Train start and stop"]["seconds"] > 0


def test_an_arm_added_to_a_finished_run_trains_from_its_own_start(ray_session, shapes_root, shared, tmp_path):
    """`--resume` with `baseline: true` added to a finished run that had a direct arm: the baseline comes before the
    direct arm in the sequence, where the run's last checkpoint (the direct arm's) was. It is trained from the
    student's random init for all the epochs, the stage and the direct arm are not trained again."""
    out = tmp_path / "run"
    cfg = tiny(shapes_root, shared, out, stages=[{"epochs": 1}], direct=True)
    run_pipeline(config_from_dict(RunJobConfig, cfg), progress=False)
    direct = "direct-fcos_resnet_mini"
    kept = {s: (out / "stages" / s / "model.pt").stat().st_mtime for s in ("1-fcos_resnet_mini", direct)}
    run_pipeline(config_from_dict(RunJobConfig, dict(cfg, baseline=True)), resume=True, progress=False)
    assert {s: (out / "stages" / s / "model.pt").stat().st_mtime for s in kept} == kept
    done = json.loads((out / "stages" / "baseline" / "done.json").read_text())
    assert [h["epoch"] for h in done["history"]] == [1] and done["seconds"] > 0
    assert _max_diff(_weights(out, "baseline"), _weights(out, direct)) > 0.01  # not the direct arm's model
    assert sorted(r["role"] for r in report_rows(out)) == ["baseline", "direct", "stage", "teacher"]


# ------------------------------------------------------------------------------------------------ ray job submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(kill_matching, tmp_path):
    """A local `ray start --head --block` of our own (ports and temp dir of its own, token auth disabled as
    shared/RAY_NOTES.md advises for local tests), started as the README says: with the virtual environment's
    `bin` first on PATH. Stopped at the end by its process id (never `ray stop`, which would stop every Ray of this
    user on the machine)."""
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    env.pop("VIRTUAL_ENV", None)
    dash = _free_port()
    cmd = [str(ray_bin), "start", "--head", "--block", "--num-cpus=4", "--disable-usage-stats",
           f"--port={_free_port()}", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--temp-dir={temp}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            r = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env, capture_output=True)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not come up: {r.stderr.decode()[-2000:]}")
            time.sleep(2)
        yield {"address": address, "env": env, "ray": str(ray_bin)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head's session: ray start and the services it launched
        try:
            # `ray start --block` then waits long for services that ignore SIGTERM; nothing of the head is needed
            # any more, so after a short grace they are killed (and anything left, by the temp dir, below).
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_matching(temp)  # services that left the session (if any), found by our temp dir
        shutil.rmtree(temp, ignore_errors=True)


def readme_job_submit() -> str:
    """The README's `ray job submit` line for a local head (section "The curriculum run")."""
    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("ray job submit --working-dir .")]
    assert len(lines) == 1, lines
    return lines[0].split("#")[0].strip()


def report_rows(out: Path) -> list[dict]:
    return json.loads((out / "report" / "results.json").read_text())["rows"]


@pytest.mark.slow  # about 4 minutes on a shared 2-core machine: a Ray head, two teachers, three Ray Train runs
def test_run_through_ray_job_submit(ray_head, shapes_root, shared, tmp_path):
    out = tmp_path / "job"
    # The object-store budget (64 KiB of decoded targets) is smaller than one cache shard: the targets are
    # streamed through Ray's object store, shard by shard, and the run still trains to the end.
    cfg = tiny(shapes_root, shared, out, teachers=[{"name": "fcos_resnet_mini"}, {"name": "fcos_resnet18_half"}],
               order="auto", auto_order={"images": 8}, stages=[{"epochs": 1}, {"epochs": 2}], baseline=True,
               trainer={"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1,
                        # rank 0 of stage 2 dies in the middle of its epoch 2 (before its second batch), once
                        "worker_hooks": [die_once_hook(tmp_path / "fault", at_stage=1, at_epoch=1, at_batch=1)]})
    cfg["cache"]["memory_bytes"] = 64 * 1024
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    # The README's command as it is written, run from the project folder as the README says, with this test's
    # config in place of the default one and --quiet; the head's address comes from the environment.
    import re
    import shlex

    argv = shlex.split(readme_job_submit().replace('"$PWD"', shlex.quote(str(REPO))))
    argv[argv.index("configs/run_default.yaml")] = str(path)
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["address"])
    r = subprocess.run(argv + ["--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    found = re.search(r"Job '([^']+)' submitted successfully", r.stdout + r.stderr)
    assert found, (r.stdout[-4000:], r.stderr[-4000:])
    st = subprocess.run([ray_head["ray"], "job", "status", found.group(1)], env=env, capture_output=True, text=True)
    status = st.stdout + st.stderr
    assert "succeeded" in status.lower(), (status[-2000:], r.stdout[-4000:], r.stderr[-4000:])
    assert "| student after stage 2" in r.stdout  # the table is printed at the end of the job's log
    assert "Reporting training result" not in r.stdout + r.stderr  # --quiet: no Ray Train internals
    # Rank 0 of stage 2 died in the middle of its epoch 2 (the config's worker hook): Ray Train replaced the worker
    # group (max_failures 1), it went on from epoch 1's checkpoint, and the job still succeeded.
    assert (tmp_path / "fault").exists()
    second = [r for r in report_rows(out) if r["role"] == "stage"][1]
    assert second["epochs"] == 2
    report = json.loads((out / "report" / "results.json").read_text())
    assert [r["role"] for r in report["rows"]] == ["baseline", "teacher", "teacher", "stage", "stage"]
    assert report["order_mode"] == "auto" and set(report["adaptation_costs"]) == {"fcos_resnet_mini",
                                                                                 "fcos_resnet18_half"}
    assert report["order"] == sorted(report["adaptation_costs"], key=lambda n: report["adaptation_costs"][n]["cost"])
    second_stage = f"2-{report['order'][1]}"
    hist = json.loads((out / "stages" / second_stage / "done.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]  # resumed from epoch 1's checkpoint: nothing trained twice
    for f in ("results.md", "loss.png", "ap.png", "student.pt"):
        assert (out / "report" / f).is_file(), f
    assert "1.0 x the detector loss of the student the run starts from" in (out / "report" / "results.md").read_text()
    from teachers.zoo import load_detector

    assert load_detector(out / "report" / "student.pt").config.name == "fcos_mobilenetv3_micro"
