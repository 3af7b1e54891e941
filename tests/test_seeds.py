"""Random streams derive from (seed, stream, parts) alone; a block can draw without moving the caller's state."""

from __future__ import annotations

import random

import numpy as np
import torch

from curriculum.seeds import derive_seed, preserved_random_state, seed_everything


def test_derived_seeds_depend_on_every_part_and_nothing_else():
    a = derive_seed(3, "loader", 1)
    assert a == derive_seed(3, "loader", 1) and 0 <= a < 2**63
    others = {derive_seed(3, "loader", 2), derive_seed(4, "loader", 1), derive_seed(3, "epoch", 1)}
    assert a not in others and len(others) == 3
    # no sums: (stage 1, epoch 0) and (stage 0, epoch 1) are different streams
    assert derive_seed(0, "epoch", 1, 0) != derive_seed(0, "epoch", 0, 1)


def test_preserved_random_state_gives_the_caller_its_generators_back():
    seed_everything(7)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_everything(7)
    with preserved_random_state():
        seed_everything(123)
        random.random(), np.random.rand(), torch.rand(1)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
