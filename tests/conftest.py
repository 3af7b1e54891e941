"""Shared fixtures: a small built-in shapes data set made once per test session."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

THREADS = 2
torch.set_num_threads(THREADS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--test-order", default="file", metavar="file|reverse|shuffle:SEED",
                     help="run the collected tests in file order, reversed, or shuffled with a seed: no test may "
                          "depend on what ran before it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = config.getoption("--test-order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        random.Random(int(order.split(":", 1)[1])).shuffle(items)
    elif order != "file":
        raise pytest.UsageError(f"--test-order {order!r}: file, reverse or shuffle:SEED")


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Every test starts from the same process state, whatever ran before it: the global random generators
    seeded, the session's torch thread count; a test (or a bench's main called in-process) that changes the
    thread count gets it restored after. So a test's figures are the same alone and in any order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from curriculum.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, train_images=160, val_images=40, image_size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def easy_shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean version of the built-in data set (no clutter, noise or tiny objects) on which a detector
    learns within a minute: for tests of the training machinery, not of the benchmark's difficulty."""
    from curriculum.shapes import make_shapes

    root = tmp_path_factory.mktemp("easy_shapes")
    make_shapes(root, train_images=200, val_images=40, image_size=128, seed=1, distractors=(0, 0), lines=(0, 0),
                noise_std=0.0, texture_amp=0.0, min_size_px=24.0, max_objects=3, outline_prob=0.0)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds): 4 logical CPUs on any machine, so
    tests with a few fractional-CPU actors schedule on a 2-core box; the dashboard stays on (Ray Train/Tune need
    it, see shared/RAY_NOTES.md). Tests must not call ray.shutdown()."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, object_store_memory=512 * 2**20, logging_level="warning",
                 configure_logging=True)
    yield ray
    # Left running until the interpreter exits: other session-scoped users may still need it.


def _kill_matching(marker: str) -> None:
    """SIGKILL every process (but this one) whose command line holds `marker`: what a Ray started by a test leaves
    behind, found by its private temp dir (never `ray stop`, which would stop every Ray of this user)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if marker in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def kill_matching():
    return _kill_matching
