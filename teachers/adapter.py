"""A teacher from another library (mmdetection, detectron2, a model of your own): the interface and its source.

Implement `TeacherAdapter.targets`: given the student's batch (images as the data set made them, already resized:
``[3, H_i, W_i]`` floats in [0, 1], RGB) and each image's `curriculum.data.View`, return the `TeacherTargets` of the
schema table (`teachers.targets.TARGETS`): at least the fields the configured losses read (MGD and FitNet read
``features``: ``{"p3": [N, C, H, W], ...}`` on the student's padded batch grid, stride ``2**k`` for level ``p<k>``).
Set `kind` (``one_stage``/``two_stage``), `level_channels` (the channels of each level you return) and
`class_names` (index 0 the background; a `class_map` maps them onto the student's). The adapter runs in every
training worker, on the student's batch, under ``torch.no_grad`` (an inline teacher: no cache).

In a run config::

    teachers:
      - name: my_teacher                        # a label, not a zoo name
        adapter: my_package.teachers:MyTeacher  # module:class, imported in each worker (never eval'd)
        adapter_args: {config: /models/my.py}   # keyword arguments of the class

`examples/torchvision_teacher.py` is a worked example: a torchvision RetinaNet, built and run by torchvision's own
modules, producing features and dense head outputs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

from curriculum.data import View
from curriculum.errors import ConfigError
from teachers.targets import TeacherTargets


class TeacherAdapter(ABC):
    """A teacher that is not a zoo detector: returns teacher targets for the student's batch."""

    kind: str = "one_stage"
    level_channels: dict[str, int] = {}
    class_names: tuple[str, ...] | None = None

    @abstractmethod
    def targets(self, images: list[Tensor], views: list[View]) -> TeacherTargets:
        """Targets of the batch, in batch order, laid out on the batch's padded grid (see the module docstring)."""

    def to(self, device: torch.device | str) -> TeacherAdapter:
        """Move the model to `device` (override when the adapter holds one)."""
        return self


def load_adapter(target: str, args: dict[str, Any] | None = None, where: str = "teachers[].adapter") -> TeacherAdapter:
    """Import ``module:Class`` and build it with `args`; an error says what is wrong and where."""
    check_adapter(target, where)
    module_name, _, class_name = str(target).partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        adapter = cls(**(args or {}))
    except TypeError as e:
        raise ConfigError(f"{where}: {target} does not take adapter_args {sorted(args or {})}: {e}") from None
    if adapter.kind not in ("one_stage", "two_stage") or not adapter.level_channels:
        raise ConfigError(f"{where}: {target} must set kind ('one_stage' or 'two_stage') and level_channels")
    return adapter


def check_adapter(target: str, where: str = "teachers[].adapter") -> None:
    """That ``module:Class`` imports and is a `TeacherAdapter`, without building it (cheap, before any work)."""
    module_name, _, class_name = str(target).partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"{where}: {target!r} must be 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({e}); is it installed, or on PYTHONPATH in "
                          "every worker (ray job submit --working-dir)?") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TeacherAdapter)):
        raise ConfigError(f"{where}: {target!r} is not a subclass of teachers.adapter.TeacherAdapter")


class AdapterSource:
    """Teacher targets of the student's batch from an adapter (the `Source` of `trainers.distillation`)."""

    def __init__(self, adapter: TeacherAdapter) -> None:
        self.adapter = adapter

    def __call__(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]]) -> TeacherTargets:
        with torch.no_grad():
            tt = self.adapter.targets(list(images), [t["view"] for t in targets])
        if not isinstance(tt, TeacherTargets):
            raise TypeError(f"{type(self.adapter).__name__}.targets returned {type(tt).__name__}, not TeacherTargets")
        if tt.image_ids is None:
            tt.image_ids = [int(t["image_id"]) for t in targets]
        return tt
