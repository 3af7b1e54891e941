"""Distillation losses built from configuration, several mixed in one ``Distiller``.

A configuration is a list of entries, one per loss term::

    build_distiller(
        [
            {"name": "mgd", "weight": 1.0, "levels": ["p3", "p4"], "preset": "retinanet"},
            {"name": "chen_hint", "gamma": 0.5},
            {"name": "chen_cls", "head": "roi"},
            {"name": "chen_cls", "head": "rpn"},
        ],
        student_channels={"p3": 128, "p4": 128},
        teacher_channels={"p3": 256, "p4": 256},
    )

Keys every entry may have: ``name`` (required; see ``LOSSES``), ``weight`` (project-level multiplier
on top of the method's own coefficient such as Chen's gamma or MGD's alpha; default 1.0), ``key``
(the output name; default ``name`` or ``name_head``; must be unique), ``decay`` (default true: the
term is multiplied by the ``decay`` factor given to ``forward``). Every other key is an option of
the method (its constructor's keyword arguments); an unknown name or option, or a bad value, raises
``ConfigError`` naming the entry and what is allowed.

The distiller is an ``nn.Module`` whose parameters are the adapters, generation blocks and non-local
blocks of its terms: put them in the optimizer with the student's and in the training checkpoint
(``distiller.state_dict()``), and leave them out of the exported student (they live here, not in the
detector). ``forward`` returns ``{"distill_<key>": scalar}`` already weighted and decayed; the
trainer adds them to the detector's losses after applying ``detector_loss_scales()`` to those.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curriculum.errors import ConfigError

from .baselines import FitNetHint, HintonKD
from .chen2017 import ChenBoundedRegression, ChenClassification, ChenHint
from .common import DistillTerm, FeatureTerm
from .context import DistillContext, student_device
from .masks import MaskKD
from .mgd import MGDLoss
from .tar2020 import TARBoxLoss, TARClassificationLoss, TARFeatureLoss
from teachers.targets import TeacherTargets
from .zhang2021 import ZhangAttentionLoss, ZhangFeatureLoss, ZhangNonLocalLoss

LOSSES: dict[str, type[DistillTerm]] = {
    "hinton_kd": HintonKD,
    "mask_kd": MaskKD,
    "fitnet": FitNetHint,
    "chen_cls": ChenClassification,
    "chen_reg": ChenBoundedRegression,
    "chen_hint": ChenHint,
    "zhang_feature": ZhangFeatureLoss,
    "zhang_attention": ZhangAttentionLoss,
    "zhang_nonlocal": ZhangNonLocalLoss,
    "tar_feature": TARFeatureLoss,
    "tar_cls": TARClassificationLoss,
    "tar_box": TARBoxLoss,
    "mgd": MGDLoss,
}
# Losses whose feature term is a squared error between an adapted student map and the teacher's map: on a
# `compression.pca` cache's principal components it keeps its meaning (the basis is orthonormal, so distances
# within the components are distances between the maps they stand for), so they may read them
# (`cache.features: components`). The others read the teacher's feature magnitudes (attention, masks, RoI heads).
COMPONENT_LOSSES = frozenset({"mgd", "fitnet"})
ENTRY_KEYS = ("name", "weight", "key", "decay")
_INTERNAL = {"self", "entry", "student_channels", "teacher_channels"}


def loss_options(name: str) -> list[str]:
    """The method options an entry of this loss accepts (besides ``ENTRY_KEYS``)."""
    sig = inspect.signature(LOSSES[name].__init__)
    return [p for p in sig.parameters if p not in _INTERNAL]


class Distiller(nn.Module):
    """A weighted mix of distillation terms; see the module docstring."""

    def __init__(
        self,
        terms: Mapping[str, DistillTerm],
        weights: Mapping[str, float],
        decays: Mapping[str, bool],
        check_finite: bool = True,
        teachers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self.decays = dict(decays)
        self.check_finite = check_finite
        # Several teachers at once (`build_joint_distiller`): the teacher whose targets each term reads.
        self.teachers = dict(teachers or {})

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        student_outputs: Mapping[str, Any],
        targets: TeacherTargets | Mapping[str, TeacherTargets],
        gt: Sequence[Mapping[str, Any]] | None = None,
        decay: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Named, weighted loss terms ``{"distill_<key>": scalar}``.

        ``decay``: the distillation decay factor r(t) (``schedules.decay_factor``) applied to every
        entry with ``decay: true``. ``generator``: RNG for stochastic terms (MGD masks).
        Non-finite teacher targets raise DataError naming the image (``check_finite``).
        Several teachers (``teachers`` set): ``targets`` maps each teacher to its ``TeacherTargets``.
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ConfigError(f"distiller decay factor must be a finite number >= 0, got {decay!r}")
        by_teacher: dict[str | None, Any] = dict(targets) if self.teachers and isinstance(targets, Mapping) else {
            None: targets}
        missing = sorted(set(self.teachers.values()) - set(by_teacher))
        if missing:
            raise ConfigError(f"the distiller reads teachers {sorted(set(self.teachers.values()))}; got targets of "
                              f"{sorted(map(str, by_teacher))} (missing {missing})")
        device = student_device(student_outputs)
        contexts = {name: DistillContext(student_outputs, self._checked(tt, gt, device), gt, generator)
                    for name, tt in by_teacher.items()}
        out: dict[str, Tensor] = {}
        for key, term in self.terms.items():
            factor = self.weights[key] * (float(decay) if self.decays[key] else 1.0)
            out[f"distill_{key}"] = term(contexts[self.teachers.get(key)]) * factor
        return out

    def _checked(self, targets: Any, gt: Sequence[Mapping[str, Any]] | None, device: Any) -> TeacherTargets:
        if not isinstance(targets, TeacherTargets):
            raise ConfigError(
                f"the distiller needs a TeacherTargets, got {type(targets).__name__}; wrap the teacher "
                f"outputs (cache, actors or inline teacher) in trainers.distill.TeacherTargets"
            )
        # Cached targets may sit on the CPU: bring them to the student's device (no-op when there).
        targets = targets.to(device)
        if self.check_finite:
            ids = targets.image_ids
            if ids is None and gt is not None and all("image_id" in g for g in gt):
                ids = [int(g["image_id"]) for g in gt]
            targets.check_finite(ids)
        return targets

    # ------------------------------------------------------------------------------------------
    def detector_loss_scales(self) -> dict[str, float]:
        """Factors for the detector's own loss terms (e.g. Chen's mu on its classification loss).

        Not affected by ``decay``. Two entries scaling the same term multiply.
        """
        scales: dict[str, float] = {}
        # Several teachers: each has the same entries; one set of factors (not one per teacher) applies.
        first = next(iter(self.teachers.values()), None)
        for key, term in self.terms.items():
            if self.teachers.get(key) != first:
                continue
            for name, s in term.detector_loss_scales().items():
                scales[name] = scales.get(name, 1.0) * s
        return scales

    def required_student_outputs(self) -> set[str]:
        """Student outputs (``outputs.student_outputs_from`` keys) the configured terms read."""
        return set().union(*(t.required_student() for t in self.terms.values()))

    def required_teacher_targets(self, teacher: str | None = None) -> set[str]:
        """``TeacherTargets`` fields the configured terms read (``roi_scorer`` or stored RoI outputs); with
        several teachers, `teacher`'s terms only (None: all terms)."""
        return set().union(set(), *(t.required_teacher() for k, t in self.terms.items()
                                    if teacher is None or self.teachers.get(k) == teacher))

    @property
    def stochastic(self) -> bool:
        return any(t.stochastic() for t in self.terms.values())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: weight={self.weights[k]:g}{'' if self.decays[k] else ', no decay'}" for k in self.terms)


def build_joint_distiller(
    config: Sequence[Mapping[str, Any]],
    student_channels: Mapping[str, int] | None,
    teachers: Sequence[tuple[str, Mapping[str, int] | None, float]],
    *,
    check_finite: bool = True,
) -> Distiller:
    """A ``Distiller`` for several teachers at once: every teacher ``(name, FPN channels, weight)`` gets the
    entries of `config` with its own adapters; keys become ``<key>@<name>`` and weights are multiplied by the
    teacher's. Its ``forward`` takes ``{name: TeacherTargets}``. One teacher: ``build_distiller`` with the weights
    multiplied (keys unchanged, plain ``TeacherTargets``)."""
    if len(teachers) == 1:
        _, channels, weight = teachers[0]
        d = build_distiller(config, student_channels, channels, check_finite=check_finite)
        d.weights = {k: w * weight for k, w in d.weights.items()}
        return d
    terms: dict[str, DistillTerm] = {}
    weights: dict[str, float] = {}
    decays: dict[str, bool] = {}
    owner: dict[str, str] = {}
    for name, channels, weight in teachers:
        if "." in name or name in owner.values():
            raise ConfigError(f"teacher {name!r}: several teachers at once need distinct names without '.'")
        d = build_distiller(config, student_channels, channels, check_finite=check_finite)
        for k, term in d.terms.items():
            key = f"{k}@{name}"
            terms[key], weights[key], decays[key], owner[key] = term, d.weights[k] * weight, d.decays[k], name
    return Distiller(terms, weights, decays, check_finite, teachers=owner)


def build_distiller(
    config: Sequence[Mapping[str, Any]],
    student_channels: Mapping[str, int] | None = None,
    teacher_channels: Mapping[str, int] | None = None,
    *,
    check_finite: bool = True,
) -> Distiller:
    """Build a ``Distiller`` from a list of entries (see the module docstring)."""
    if isinstance(config, Mapping) or not isinstance(config, Sequence) or isinstance(config, str):
        raise ConfigError(f"distillation config must be a list of entries (dicts), got {type(config).__name__}")
    terms: dict[str, DistillTerm] = {}
    weights: dict[str, float] = {}
    decays: dict[str, bool] = {}
    for i, raw in enumerate(config):
        where = f"distillation entry #{i}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a dict with a 'name', got {raw!r}")
        spec = dict(raw)
        name = spec.pop("name", None)
        if name not in LOSSES:
            raise ConfigError(f"{where}: loss name {name!r} is unknown; use one of {sorted(LOSSES)}")
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where} ({name}): 'weight' must be a finite number >= 0, got {weight!r}")
        use_decay = spec.pop("decay", True)
        if not isinstance(use_decay, bool):
            raise ConfigError(f"{where} ({name}): 'decay' must be true or false, got {use_decay!r}")
        key = spec.pop("key", None)
        if key is None:
            key = f"{name}_{spec['head']}" if isinstance(spec.get("head"), str) else name
        if not isinstance(key, str) or not key or "." in key:
            raise ConfigError(f"{where} ({name}): 'key' must be a non-empty string without '.', got {key!r}")
        if key in terms:
            raise ConfigError(
                f"{where} ({name}): output key {key!r} is already used by an earlier entry; give this entry a "
                f"distinct 'key'"
            )
        allowed = loss_options(name)
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{where} ({name}): unknown option(s) {unknown}; allowed: {sorted(allowed) + list(ENTRY_KEYS)}"
            )
        cls = LOSSES[name]
        kwargs = dict(spec)
        if issubclass(cls, FeatureTerm):
            if student_channels is None or teacher_channels is None:
                raise ConfigError(
                    f"{where} ({name}) is a feature loss: build_distiller needs student_channels and "
                    f"teacher_channels (level -> channels)"
                )
            kwargs["student_channels"] = student_channels
            kwargs["teacher_channels"] = teacher_channels
        try:
            term = cls(entry=key, **kwargs)
        except TypeError as exc:  # a wrong argument shape the checks did not name
            raise ConfigError(f"{where} ({name}): bad options {spec}: {exc}") from None
        terms[key] = term
        weights[key] = float(weight)
        decays[key] = use_decay
    return Distiller(terms, weights, decays, check_finite=check_finite)
