"""Distillation-weight decay r(t): values at chosen epochs, and bad options."""

from __future__ import annotations

import math

import pytest

from curriculum.errors import ConfigError
from trainers.distill.schedules import DECAY_KINDS, DistillationDecay, decay_factor


def test_linear_is_tar_rule():
    # r(t) = 1 - (t - 1) / t_max
    assert decay_factor("linear", 1, 10) == pytest.approx(1.0)
    assert decay_factor("linear", 6, 10) == pytest.approx(0.5)
    assert decay_factor("linear", 10, 10) == pytest.approx(0.1)
    assert decay_factor("linear", 11, 10) == pytest.approx(0.0)
    assert decay_factor("linear", 30, 10) == 0.0  # clamped, never negative
    assert decay_factor("linear", 3.5, 10) == pytest.approx(0.75)  # fractional epochs


def test_cosine():
    assert decay_factor("cosine", 1, 10) == pytest.approx(1.0)
    assert decay_factor("cosine", 6, 10) == pytest.approx(0.5)
    assert decay_factor("cosine", 11, 10) == pytest.approx(0.0, abs=1e-12)
    assert decay_factor("cosine", 50, 10) == pytest.approx(0.0, abs=1e-12)
    # floor 0.2: 0.2 + 0.8 * 0.5 = 0.6 half way; (1 + cos(pi/4)) / 2 at a quarter
    assert decay_factor("cosine", 6, 10, floor=0.2) == pytest.approx(0.6)
    assert decay_factor("cosine", 3.5, 10) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_step_and_exponential_and_constant():
    # t_max = 9 -> step_size = 3: epochs 1-3 -> 1, 4-6 -> 0.1, 7-9 -> 0.01
    assert decay_factor("step", 3, 9) == pytest.approx(1.0)
    assert decay_factor("step", 4, 9) == pytest.approx(0.1)
    assert decay_factor("step", 7, 9) == pytest.approx(0.01)
    assert decay_factor("step", 5, 9, step_size=2, gamma=0.5) == pytest.approx(0.25)
    assert decay_factor("step", 4, 12, milestones=[5, 8]) == pytest.approx(1.0)
    assert decay_factor("step", 5, 12, milestones=[5, 8]) == pytest.approx(0.1)
    assert decay_factor("step", 9, 12, milestones=[5, 8]) == pytest.approx(0.01)
    assert decay_factor("exponential", 3, 10, gamma=0.5) == pytest.approx(0.25)
    assert decay_factor("exponential", 1, 10) == pytest.approx(1.0)
    assert decay_factor("exponential", 2, 10) == pytest.approx(0.9)
    assert decay_factor("constant", 7, 10) == 1.0
    for kind in DECAY_KINDS:
        assert decay_factor(kind, 1, 10) == pytest.approx(1.0)


def test_class_wraps_function():
    d = DistillationDecay("linear", t_max=10)
    assert d(6) == pytest.approx(0.5)
    assert "linear" in repr(d)
    assert DistillationDecay("exponential", t_max=5, gamma=0.5)(2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kind, t, t_max, params, match",
    [
        ("cubic", 1, 10, {}, "use one of"),
        ("linear", 1, 10, {"gamma": 0.5}, "unknown parameter"),
        ("linear", 0, 10, {}, "t = 0"),
        ("linear", 1, 0, {}, "t_max"),
        ("exponential", 1, 10, {"gamma": 1.5}, "gamma"),
        ("step", 1, 10, {"milestones": "5"}, "milestones"),
        ("cosine", 1, 10, {"floor": float("nan")}, "floor"),
    ],
)
def test_bad_options_raise_config_error(kind, t, t_max, params, match):
    with pytest.raises(ConfigError, match=match):
        decay_factor(kind, t, t_max, **params)


def test_class_validates_at_build():
    with pytest.raises(ConfigError, match="gamma"):
        DistillationDecay("step", t_max=10, gamma=-1)
