"""Hooks the tests install on what they build (production code carries no test switches)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from trainers.distill.common import set_identity_
from trainers.ray_train import LocalSession


def identity_generation(distiller):
    """MGD's generation blocks (conv, ReLU, conv) made the identity on non-negative inputs: G(x) = x, so a loss
    value can be computed by hand. Returns the distiller."""
    for term in distiller.terms.values():
        for block in getattr(term, "generation", {}).values():
            set_identity_(block[0])
            set_identity_(block[2])
    return distiller


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the TensorBoard event files in `log_dir`, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_bench(name: str) -> ModuleType:
    """The benchmark script `bench/<name>.py` as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def sequence_without_ray(monkeypatch, train):
    """Ray Train replaced by the real sequence runner in this process (`run_sequence` with a `LocalSession`), each
    entry trained by `train(loop_config) -> final state` instead of `run_training`: a pipeline's wiring
    (inits, carried optimizer state, written stage outputs) tested without workers."""
    import trainers.ray_train as ray_train

    monkeypatch.setattr(ray_train, "run_training", lambda cfg, session: train(cfg))
    monkeypatch.setattr(ray_train, "fit_sequence_on_ray",
                        lambda entries, **kw: ray_train.run_sequence(entries, LocalSession()))
