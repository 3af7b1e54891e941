"""The target schema table is the one source: the losses read what it says they read, and the cache, the plan and
`TeacherTargets` derive their names from it."""

from __future__ import annotations

import dataclasses

import pytest

from teachers.targets import FIELDS, TARGETS, TeacherTargets, cache_kind, fields_of
from trainers.distill import LOSSES, build_distiller

CHANNELS = {f"p{i}": 8 for i in range(2, 8)}


def _variants(name: str) -> list[dict]:
    """Every head a loss can be put on (the options that change which targets it reads)."""
    out = []
    for extra in ({}, {"head": "dense"}, {"head": "rpn"}, {"head": "roi"}, {"head": "dense", "include_ctrness": True}):
        try:
            build_distiller([{"name": name, **extra}], CHANNELS, CHANNELS)
        except Exception:  # an option this loss does not take
            continue
        out.append({"name": name, **extra})
    return out


def test_read_by_is_what_each_loss_requires():
    derived: dict[str, set[str]] = {}
    for name in LOSSES:
        variants = _variants(name)
        assert variants, name
        for entry in variants:
            for field in build_distiller([entry], CHANNELS, CHANNELS).required_teacher_targets():
                derived.setdefault(field, set()).add(name)
    table = {f.name: set(f.read_by) for f in TARGETS if f.read_by}
    assert derived == table


def test_table_rows_are_teacher_targets_fields():
    names = {f.name for f in dataclasses.fields(TeacherTargets)} - {"image_ids", "roi_counts"}
    assert set(FIELDS) == names
    assert all(f.kind in ("features", "head", "detections", "proposals") for f in TARGETS)
    assert fields_of("head", "one_stage") == ("cls_logits", "bbox_regression", "bbox_ctrness")
    assert fields_of("head", "two_stage") == ("objectness", "rpn_deltas")
    assert fields_of("proposals") == ("roi_class_logits", "roi_box_regression")
    assert cache_kind("roi_scorer") == "features" and cache_kind("cls_logits") == "head"
    with pytest.raises(KeyError):
        cache_kind("mask_logits")
