"""Shared fixtures: a small built-in shapes data set made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


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
