"""Worker hooks the tests install (`trainer.worker_hooks`): faults injected into Ray Train workers.

Importable by the workers as `tests.faults`: Ray puts the driver's working directory (the project folder, where
the tests run) on their path, and a submitted job's working directory is the uploaded project.
"""

from __future__ import annotations

import os
from pathlib import Path


def die_once(event: str, *, stage: int, epoch: int, rank: int, batch: int | None, marker: str, at_epoch: int,
             at_stage: int = 0, at_batch: int | None = None, mode: str = "exit") -> None:
    """Once (the `marker` file records it), rank 0 of stage `at_stage` dies (`exit`) or raises (`raise`) at the
    start of epoch `at_epoch` (0-based), or before its batch `at_batch`."""
    if rank != 0 or stage != at_stage or epoch != at_epoch:
        return
    if (event == "epoch_start") != (at_batch is None) or (at_batch is not None and batch != at_batch):
        return
    if Path(marker).exists():
        return
    Path(marker).write_text("fired\n")
    if mode == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at stage {stage}, epoch {epoch + 1}")


def die_once_hook(marker: Path, **where: int) -> dict:
    """The `trainer.worker_hooks` entry of `die_once`."""
    return {"call": "tests.faults:die_once", "args": {"marker": str(marker), **where}}
