"""Seeds: every random stream of a run is derived from the run's seed and what the stream is for.

`derive_seed(seed, "loader", epoch)` mixes its parts through numpy's `SeedSequence` (a hash, not a sum), so two
streams never coincide because their parts happen to add up alike, and a stream depends only on its parts: a
resumed run draws exactly what an uninterrupted one drew.
"""

from __future__ import annotations

import random
import zlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed for the random stream named `stream` of the run seeded `seed`, at `parts` (stage, epoch,
    rank, ...). A stream always takes the same number of parts (trailing zero parts are not told apart)."""
    words = [int(seed) % 2**64, zlib.crc32(stream.encode()), *(int(p) % 2**64 for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """The block may seed and draw from the global generators (python, numpy, torch); the caller's states are
    restored after it."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py), np.random.set_state(npy), torch.set_rng_state(th)


__all__ = ["derive_seed", "preserved_random_state", "seed_everything"]
