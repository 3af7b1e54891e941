"""Training on Ray Train: two DDP workers (gloo) train, report a checkpoint per epoch, and a second fit resumes."""

from __future__ import annotations

import os

import torch

from curriculum.config import TrainJobConfig, config_from_dict
from teachers.zoo import Detector
from trainers.ray_train import fit_on_ray


def test_two_workers_train_and_resume(ray_session, shapes_root, tmp_path):
    job = config_from_dict(TrainJobConfig, {
        "output_dir": str(tmp_path / "run"),
        "data": {"root": str(shapes_root), "builtin": "none"},
        "model": {"name": "retinanet_mobilenetv3_micro"},
        "train": {"epochs": 2, "batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1},
    })
    state = fit_on_ray(job, num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray"), name="t")
    assert state["epoch"] == 1
    history = __import__("json").loads(state["history"])
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    # DDP kept the replicas equal, so rank 0's weights are the model; they load with the zoo alone.
    from teachers.zoo import build_detector

    model = build_detector("retinanet_mobilenetv3_micro", 7)
    model.load_state_dict(state["model"]["model"])
    # Fitting again with the same storage path and name resumes: no epoch is trained twice.
    again = fit_on_ray(job, num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray"), name="t")
    assert again["epoch"] == 1
    for k, v in state["model"]["model"].items():
        assert torch.equal(v, again["model"]["model"][k]), k


def test_target_read_ahead_reads_the_next_batch_in_the_background_and_returns_the_same_targets():
    import threading
    import time

    from trainers.ray_train import TargetReadAhead

    started: list[tuple[int, str]] = []

    def read(images, targets):
        i = targets[0]["image_id"]
        started.append((i, threading.current_thread().name))
        return f"targets of {i}"

    ahead = TargetReadAhead(read)
    batches = [([None], [{"image_id": i}]) for i in range(4)]
    got = []
    for images, targets in ahead.wrap(iter(batches)):
        i = targets[0]["image_id"]
        # Before the step asks for batch i's targets, batch i + 1's read has been started (unless i is the last).
        deadline = time.monotonic() + 5
        while len(started) < min(i + 2, 4) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [s for s, _ in started] == list(range(min(i + 2, 4))), (i, started)
        got.append(ahead(images, targets))
    assert got == [f"targets of {i}" for i in range(4)]
    assert all(name.startswith("teacher-targets") for _, name in started)
    # A batch it did not read ahead (another list) is read on the spot, in the caller's thread.
    assert ahead([None], [{"image_id": 2}]) == "targets of 2" and started[-1][1] == threading.current_thread().name


def test_the_controllers_poll_interval_reaches_ray_train_only_while_a_fit_starts(monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from trainers.ray_train import HEALTH_CHECK_ENV, _controller_env

    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    with _controller_env(0.5):
        assert get_env_vars_to_propagate()[HEALTH_CHECK_ENV] == "0.5"  # what the controller actor is given
    assert HEALTH_CHECK_ENV not in os.environ
    monkeypatch.setenv(HEALTH_CHECK_ENV, "3")  # the user's own setting wins
    with _controller_env(0.5):
        assert os.environ[HEALTH_CHECK_ENV] == "3"
    assert os.environ[HEALTH_CHECK_ENV] == "3"
    with _controller_env(None):
        assert os.environ[HEALTH_CHECK_ENV] == "3"
