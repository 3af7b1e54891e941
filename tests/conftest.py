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
