"""A `teachers.adapter.TeacherAdapter` for the tests: a built-in zoo detector (random weights from a seed) reached only
through the adapter interface, as a teacher of another library would be."""

from __future__ import annotations

import torch

from curriculum.data import View
from teachers.adapter import TeacherAdapter
from teachers.targets import TeacherTargets
from teachers.zoo import build_detector


class ZooTeacher(TeacherAdapter):
    def __init__(self, name: str = "fcos_resnet_mini", num_classes: int = 7, seed: int = 0,
                 class_names: list[str] | None = None) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.detector = build_detector(name, num_classes).eval().requires_grad_(False)
        self.kind = self.detector.kind
        self.level_channels = self.detector.level_channels
        self.class_names = tuple(class_names) if class_names else None
        self.calls = 0

    def targets(self, images: list[torch.Tensor], views: list[View]) -> TeacherTargets:
        self.calls += 1
        assert len(views) == len(images) and all(isinstance(v, View) for v in views)
        return TeacherTargets.inline(self.detector, images)
