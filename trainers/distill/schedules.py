"""Distillation-weight decay r(t): every distillation term is multiplied by r(t).

Sun et al. 2020 (TAR) decay the distillation penalty linearly, ``r(t) = 1 - (t - 1) / t_max`` for
epoch ``t = 1..t_max``, so the student leans less on the teacher as it matures. Cosine, step and
exponential decays are natural extensions (search-space material; their parameters are *project
choices*). ``t`` may be fractional (e.g. ``epoch + iteration / iters_per_epoch`` with 1-based epochs)
and is counted from 1, as in TAR.

Kinds and parameters (``r(1) = 1`` for every kind):

- ``constant``: ``r = 1``.
- ``linear`` (TAR): ``r = 1 - (t - 1) / t_max``, clamped at 0 beyond ``t_max + 1``.
- ``cosine``: ``r = floor + (1 - floor) * (1 + cos(pi * (t - 1) / t_max)) / 2`` (``floor=0.0``); held at
  ``floor`` after ``t_max + 1``.
- ``step``: ``r = gamma ** floor((t - 1) / step_size)`` (``step_size = ceil(t_max / 3)``, ``gamma=0.1``),
  or with ``milestones`` (a list of epochs) ``r = gamma ** (number of milestones <= t)``.
- ``exponential``: ``r = gamma ** (t - 1)``, ``gamma=0.9``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Mapping

from curriculum.errors import ConfigError

DECAY_KINDS = ("constant", "linear", "cosine", "step", "exponential")
_PARAMS = {
    "constant": (),
    "linear": (),
    "cosine": ("floor",),
    "step": ("gamma", "step_size", "milestones"),
    "exponential": ("gamma",),
}


def _num(kind: str, name: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"decay schedule {kind!r}: {name} must be a finite number, got {value!r}")
    v = float(value)
    if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
        raise ConfigError(
            f"decay schedule {kind!r}: {name} = {value!r} out of range "
            f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        )
    return v


def _check(kind: str, t_max: Any, params: dict[str, Any]) -> None:
    if kind not in DECAY_KINDS:
        raise ConfigError(f"decay schedule kind {kind!r} is unknown; use one of {list(DECAY_KINDS)}")
    unknown = sorted(set(params) - set(_PARAMS[kind]))
    if unknown:
        raise ConfigError(
            f"decay schedule {kind!r}: unknown parameter(s) {unknown}; allowed: {list(_PARAMS[kind]) or 'none'}"
        )
    _num(kind, "t_max", t_max, low=0, low_open=True)


def decay_factor(kind: str, t: float, t_max: float, **params: Any) -> float:
    """The decay factor r(t) in [0, 1] for epoch ``t`` (1-based) of ``t_max``; see the module docstring."""
    _check(kind, t_max, params)
    t = _num(kind, "t", t, low=1)
    t_max = float(t_max)
    x = (t - 1.0) / t_max  # fraction of the schedule done
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - x)
    if kind == "cosine":
        floor = _num(kind, "floor", params.get("floor", 0.0), low=0, high=1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(x, 1.0)))
    if kind == "step":
        gamma = _num(kind, "gamma", params.get("gamma", 0.1), low=0, high=1)
        milestones = params.get("milestones")
        if milestones is not None:
            if not isinstance(milestones, Sequence) or isinstance(milestones, str):
                raise ConfigError(f"decay schedule 'step': milestones must be a list of epochs, got {milestones!r}")
            ms = [_num(kind, "milestones[]", m, low=1) for m in milestones]
            return gamma ** sum(1 for m in ms if t >= m)
        step_size = params.get("step_size", math.ceil(t_max / 3))
        step_size = _num(kind, "step_size", step_size, low=0, low_open=True)
        return gamma ** math.floor((t - 1.0) / step_size)
    # exponential
    gamma = _num(kind, "gamma", params.get("gamma", 0.9), low=0, high=1)
    return gamma ** (t - 1.0)


class DistillationDecay:
    """A configured schedule: ``DistillationDecay("linear", t_max=12)(t)``; checks options at build."""

    def __init__(self, kind: str = "linear", t_max: float = 12, **params: Any) -> None:
        _check(kind, t_max, params)
        self.kind = kind
        self.t_max = float(t_max)
        self.params = dict(params)
        decay_factor(kind, 1, t_max, **params)  # validate parameter values now, not mid-training

    def __call__(self, t: float) -> float:
        return decay_factor(self.kind, t, self.t_max, **self.params)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"DistillationDecay({self.kind!r}, t_max={self.t_max:g}{extra})"


def stage_decay(stage: Mapping[str, Any], epoch: int) -> float:
    """r(t) for 0-based `epoch` of a curriculum stage given as its dict (`curriculum.plan.Stage.to_dict()`): the
    stage's schedule on the curriculum's clock (`decay_offset` epochs done before it; t is 1-based, TAR's
    convention); 0 for a stage without a teacher."""
    if not stage.get("teachers"):
        return 0.0
    return decay_factor(stage["decay_kind"], stage["decay_offset"] + epoch + 1, stage["decay_t_max"],
                        **stage["decay_params"])
