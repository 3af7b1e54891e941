"""Distillation losses for object detectors: pure torch on tensors.

Modules (each states its paper, formula, the authors' defaults and the project's own choices):

- ``TeacherTargets`` (from ``teachers.targets``, where the target schema lives): what the losses read.
- ``baselines``: Hinton et al. 2015 KD, FitNets hint.
- ``chen2017``: Chen et al. 2017 weighted soft CE, teacher-bounded regression, adapted hint.
- ``zhang2021``: Zhang & Ma 2021 attention-guided, attention and non-local distillation.
- ``tar2020``: Sun et al. 2020 task adaptive regularization (proposal sharing, gated transfer).
- ``mgd``: masked generative distillation (the mechanism of Cao et al. 2023).
- ``schedules``: distillation-weight decay r(t).
- ``registry``: ``build_distiller(config, student_channels, teacher_channels) -> Distiller``.
"""

from .registry import LOSSES, Distiller, build_distiller, build_joint_distiller, loss_options
from .schedules import DECAY_KINDS, DistillationDecay, decay_factor
from teachers.targets import TeacherTargets

__all__ = [
    "DECAY_KINDS",
    "LOSSES",
    "DistillationDecay",
    "Distiller",
    "TeacherTargets",
    "build_distiller",
    "build_joint_distiller",
    "decay_factor",
    "loss_options",
]
