"""The plan of a curriculum run: which teacher each stage distils from, for how long, with which losses and decay.

`build_plan(job, checkpoints, order)` turns a `RunJobConfig` into a list of `Stage`s. Everything a stage needs is
in its `Stage` (a plain dataclass that travels to the Ray Train workers as a dict), so a stage can be run, resumed
or inspected on its own.

Stage transitions (Cao et al. 2023, section 4 of shared/METHODS.md):

- the student carries its weights from one stage to the next (stage i starts from stage i-1's final model);
- `schedule: per_stage` (the paper's): the optimizer, the lr warm-up and schedule restart at every stage (each
  stage is a full schedule); `schedule: curriculum`: one warm-up and one lr schedule run over all stages (stage i
  starts at the iteration where stage i-1 ended) and the student's optimizer state carries over, by parameter
  name (`optimizer_state`, filled by the pipeline);
- the distiller's adapters are new at every stage (they map into the new teacher's channels), or, with
  `adapters: carry`, start from the previous stage's wherever the name and shape match (`adapters_from`, filled
  by the sequence as the stage starts; a teacher with other FPN channels gets fresh ones);
- `kd_ratio`'s calibration measures the student as the run starts (`kd_reference: run`, the default), so a
  teacher weighs the same wherever its stage comes, as a fixed loss weight does; or the student as the stage
  starts (`kd_reference: stage`), so a later stage's factor shrinks with the detector loss reached by then;
- the distillation weight r(t) (TAR's decay and its extensions, `trainers.distill.schedules`) either restarts at
  every stage (`decay.restart: true`: t counts the stage's epochs, t_max the stage's length) or runs over the
  whole curriculum (`restart: false`: t counts every epoch since the first stage, t_max all epochs);
- optionally the student starts with the first teacher's neck (FPN) and head weights wherever the parameter
  name and shape match (`inherit_weights`), as the authors' code does.

Automatic order (`order: auto`, the project's own extension; the papers order teachers by hand). The adaptation
cost of a teacher is how badly the best 1x1 map (a linear map with bias: what a hint adapter can learn) predicts
the teacher's FPN features from the student's, on held-out images:

    cost = sum_l ||F_T,l - A(F_S,l)||^2 / sum_l ||F_T,l - mean(F_T,l)||^2      (held-out images' positions)

with A fitted by ridge-regularised least squares on the other images' positions of every level together (one map
for all levels: an FPN's levels share one head, and the coarse levels alone have too few positions to fit a
C x C map; the student's map is first resized to the teacher's, as the losses do). It is 1 - R^2 of the adaptation, pooled over levels (a level
counts in proportion to its positions and its teacher variance): 0 when the teacher's features are a linear
function of the student's (a teacher that IS the student), about 1 when nothing of them is linearly
predictable. The teachers are ordered from the smallest cost to the largest ("closest first"). The student is
measured as it starts the curriculum (after inheritance it would favour the first teacher by construction, so
the measurement uses the student before inheritance). Held-out images keep the fit from explaining
noise: with as many student channels as positions a least-squares map fits anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from curriculum.config import RunJobConfig, to_dict
from curriculum.errors import ConfigError
from curriculum.files import path_name
from teachers.targets import cache_kind
from teachers.zoo import load_matching


@dataclass
class StageTeacher:
    """A teacher of a stage, its weight in the stage's loss, and where its targets come from (the pipeline fills
    `cache`, `class_map` and `adapter`)."""

    name: str  # zoo name (an adapter teacher: its label)
    checkpoint: str | None
    weight: float = 1.0  # its distillation terms are multiplied by this
    cache: str | None = None
    # `teachers.class_map.ClassMap.to_dict()` of a teacher on other classes than the student's; None: the student's
    class_map: dict[str, Any] | None = None
    # {"target": "module:Class", "args": {...}} of a `teachers.adapter.TeacherAdapter` teacher
    adapter: dict[str, Any] | None = None
    # read its cached features as stored principal components (`cache.features: components`)
    components: bool = False


@dataclass
class Stage:
    """One distillation stage: its teachers (one in a progressive stage; several are distilled from at once, each
    with its own adapters, their terms summed with their weights), or none: plain training (the baseline)."""

    index: int
    name: str  # folder name of the stage, e.g. "1-fcos_resnet_mini"
    teachers: list[StageTeacher]
    epochs: int
    losses: list[dict[str, Any]]
    lr: float | None
    decay_kind: str
    decay_params: dict[str, Any]
    decay_offset: int  # epochs done before this stage on the decay clock (0 when it restarts)
    decay_t_max: int
    kd_ratio: float | None = None
    kd_reference: str = "stage"  # the student kd_ratio's calibration measures: the stage's start or the run's
    init: str | None = None  # checkpoint the student starts from (filled by the pipeline)
    lr_offset: int = 0  # epochs done before this stage on the lr clock (0 when the schedule restarts)
    lr_t_max: int | None = None  # epochs of the lr schedule (None: this stage's)
    # the previous stage's student optimizer state by parameter name (`schedule: curriculum`; filled by the pipeline)
    optimizer_state: str | None = None
    carry_adapters: bool = False  # `adapters: carry`
    # the previous stage's distiller.pt (`adapters: carry`; filled by the sequence as the stage starts)
    adapters_from: str | None = None
    # epochs the student trained before this stage: the stage's epochs go on with the data's next orders and views
    # (0 in stage dicts written before it existed: those stages replayed the first stage's)
    data_offset: int = 0
    adapter_warmup: int = 0  # first iterations whose distillation terms train the adapters alone

    def __post_init__(self) -> None:
        self.teachers = [t if isinstance(t, StageTeacher) else StageTeacher(**t) for t in self.teachers]

    @property
    def teacher(self) -> str | None:
        """The stage's teacher as one label (several joined by '+'); None for plain training."""
        return "+".join(t.name for t in self.teachers) or None

    def decay(self, epoch: int) -> float:
        """r(t) for 0-based `epoch` of this stage (t is 1-based, TAR's convention)."""
        from trainers.distill.schedules import stage_decay

        return stage_decay(self.to_dict(), epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage:
        return cls(**dict(d))


def _stage_name(index: int, teachers: Sequence[str]) -> str:
    return f"{index + 1}-{'+'.join(path_name(t) for t in teachers)}"


def build_plan(job: RunJobConfig, checkpoints: Mapping[str, str], order: Sequence[str]) -> list[Stage]:
    """The stages of `job` for teachers in `order` (names), each read from `checkpoints[name]`. Stages that name
    their teachers (`stages[i].teachers`) keep them; otherwise stage i distils from the i-th teacher of `order`."""
    names = [t.name for t in job.teachers]
    if sorted(order) != sorted(names):
        raise ConfigError(f"teacher order {list(order)} is not a permutation of the configured teachers {names}")
    settings = job.stage_settings()
    total = sum(s.epochs for s in settings)
    stages, done = [], 0
    for i, s in enumerate(settings):
        members = s.teacher_weights() or [(order[i], 1.0)]
        losses = [dict(e) for e in (s.losses if s.losses is not None else job.losses)]
        if not losses:
            raise ConfigError(f"stage {i + 1} ({'+'.join(n for n, _ in members)}): no distillation losses (set "
                              f"`losses` or stages[{i}].losses)")
        stages.append(Stage(
            index=i, name=_stage_name(i, [n for n, _ in members]),
            teachers=[StageTeacher(name=n, checkpoint=checkpoints[n], weight=w) for n, w in members],
            epochs=s.epochs, losses=losses, lr=s.lr, decay_kind=job.decay.kind, decay_params=dict(job.decay.params),
            decay_offset=0 if job.decay.restart else done, decay_t_max=s.epochs if job.decay.restart else total,
            kd_ratio=job.kd_ratio, kd_reference=job.kd_reference,
            lr_offset=done if job.schedule == "curriculum" else 0,
            lr_t_max=total if job.schedule == "curriculum" else None,
            carry_adapters=job.adapters == "carry", data_offset=done, adapter_warmup=job.adapter_warmup,
        ))
        done += s.epochs
    from trainers.distill.schedules import DistillationDecay

    DistillationDecay(job.decay.kind, total, **job.decay.params)  # bad schedule parameters fail before training
    return stages


def direct_stage(job: RunJobConfig, stages: Sequence[Stage]) -> Stage:
    """Direct distillation from the last stage's teacher(s) (the strongest) alone for the total epochs of the
    curriculum."""
    last = stages[-1]
    total = sum(s.epochs for s in stages)
    return dataclasses.replace(last, index=0, name=f"direct-{'+'.join(path_name(t.name) for t in last.teachers)}",
                               teachers=[dataclasses.replace(t) for t in last.teachers], epochs=total,
                               decay_offset=0, decay_t_max=total, lr=stages[0].lr, init=None, lr_offset=0,
                               lr_t_max=None, optimizer_state=None, carry_adapters=False, adapters_from=None,
                               data_offset=0)


def baseline_stage(job: RunJobConfig, total_epochs: int) -> Stage:
    """The student without distillation, for `total_epochs` (the curriculum's length)."""
    return Stage(index=0, name="baseline", teachers=[], epochs=total_epochs, losses=[],
                 lr=None, decay_kind="constant", decay_params={}, decay_offset=0, decay_t_max=total_epochs)


def stage_borders(stages: Sequence[Stage]) -> list[int]:
    """Global epoch numbers (1-based) after which a stage ends, except the last."""
    out, n = [], 0
    for s in stages[:-1]:
        n += s.epochs
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------------ weights


NECK_HEAD_PREFIXES = ("model.backbone.fpn.", "model.head.", "model.rpn.", "model.roi_heads.")


# Tensors indexed by class: RetinaNet's and FCOS's classifier convs, the RoI head's predictor.
CLASS_OUTPUTS = ("classification_head.cls_logits.", "roi_heads.box_predictor.")


def inherit_weights(student: torch.nn.Module, teacher: torch.nn.Module,
                    prefixes: Sequence[str] = NECK_HEAD_PREFIXES) -> list[str]:
    """Copy the teacher's neck and head tensors into the student where name and shape match; return their names.

    Parameters and buffers alike (GroupNorm has none, BatchNorm statistics would come along). The backbone body is
    never copied: the student's is a different network. Nor are the class outputs of a teacher whose classes are
    not the student's (named, they differ; their order would not match even at the same count).
    """
    t_names = getattr(getattr(teacher, "config", None), "class_names", None)
    s_names = getattr(getattr(student, "config", None), "class_names", None)
    other_classes = t_names is not None and s_names is not None and tuple(t_names) != tuple(s_names)

    def keep(k: str) -> bool:
        return k.startswith(tuple(prefixes)) and not (other_classes and any(part in k for part in CLASS_OUTPUTS))

    return load_matching(student, teacher.state_dict(), keep)


# ------------------------------------------------------------------------------------------------ auto order


@torch.no_grad()
def _features(detector: torch.nn.Module, images: Sequence[torch.Tensor], batch: int = 8) -> dict[str, torch.Tensor]:
    was = detector.training
    detector.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch):
        out = detector(list(images[i:i + batch]), want=("features",))
        for lvl, f in out.features.items():
            parts.setdefault(lvl, []).append(f.float())
    detector.train(was)
    return {lvl: torch.cat(v) for lvl, v in parts.items()}


def _rows(f: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C] (positions of each image kept together for the image split)."""
    n, c, h, w = f.shape
    return f.permute(0, 2, 3, 1).reshape(n, h * w, c).double()


def adaptation_cost(student_feats: Mapping[str, torch.Tensor], teacher_feats: Mapping[str, torch.Tensor],
                    holdout: float = 0.5, ridge: float = 1e-3, levels: Sequence[str] | None = None
                    ) -> dict[str, Any]:
    """Held-out residual of the best 1x1 map from student to teacher features (module docstring).

    One map (with bias) is fitted on the positions of every chosen level together: an FPN's levels share one head,
    so their channels mean the same thing, and the coarse levels alone (1 to 4 positions per image at 128 px) are
    too few rows to fit a C x C map. Returns {"cost": pooled 1 - R^2, "levels": {level: 1 - R^2 of that level
    under the shared map}, "positions": held-out rows}.
    """
    common = [l for l in teacher_feats if l in student_feats]
    chosen = list(levels) if levels is not None else common
    missing = [l for l in chosen if l not in common]
    if missing or not chosen:
        raise ConfigError(f"auto_order.levels {chosen}: not FPN levels of both detectors (common: {common})")
    n = next(iter(teacher_feats.values())).shape[0]
    if n < 2:
        raise ConfigError("the adaptation cost needs at least 2 calibration images (one to fit, one to test)")
    n_test = min(n - 1, max(1, int(round(n * holdout))))
    n_fit = n - n_test
    fit_x, fit_y, test = [], [], {}
    for lvl in chosen:
        s, t = student_feats[lvl], teacher_feats[lvl]
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        xs, ys = _rows(s), _rows(t)
        fit_x.append(xs[:n_fit].reshape(-1, xs.shape[-1]))
        fit_y.append(ys[:n_fit].reshape(-1, ys.shape[-1]))
        test[lvl] = (xs[n_fit:].reshape(-1, xs.shape[-1]), ys[n_fit:].reshape(-1, ys.shape[-1]))
    x_fit, y_fit = torch.cat(fit_x), torch.cat(fit_y)
    # Centre with the fit split's means (the bias of the 1x1 map), then ridge least squares.
    mx, my = x_fit.mean(0, keepdim=True), y_fit.mean(0, keepdim=True)
    xc, yc = x_fit - mx, y_fit - my
    gram = xc.T @ xc
    lam = ridge * float(torch.trace(gram)) / max(1, gram.shape[0]) + 1e-12
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    res_sum = tot_sum = 0.0
    per_level: dict[str, float] = {}
    positions = 0
    for lvl, (x_te, y_te) in test.items():
        pred = (x_te - mx) @ w + my
        res = float(((y_te - pred) ** 2).sum())
        tot = float(((y_te - y_te.mean(0, keepdim=True)) ** 2).sum())
        per_level[lvl] = res / tot if tot > 0 else 0.0
        res_sum += res
        tot_sum += tot
        positions += y_te.shape[0]
    return {"cost": res_sum / tot_sum if tot_sum > 0 else 0.0, "levels": per_level, "positions": positions}


def measure_adaptation_costs(student: torch.nn.Module, teachers: Mapping[str, torch.nn.Module],
                             images: Sequence[torch.Tensor], holdout: float = 0.5, ridge: float = 1e-3,
                             levels: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """`adaptation_cost` of every teacher against `student` on `images` (eval mode, no gradients)."""
    s = _features(student, images)
    return {name: adaptation_cost(s, _features(t, images), holdout, ridge, levels) for name, t in teachers.items()}


def order_by_cost(costs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Teacher names from the smallest adaptation cost to the largest (ties: the configured order)."""
    names = list(costs)
    return sorted(names, key=lambda n: (costs[n]["cost"], names.index(n)))


# ------------------------------------------------------------------------------------------------ cache needs


def cache_needs(stages: Sequence[Stage], student_channels: Mapping[str, int],
                teacher_channels: Mapping[str, Mapping[str, int]]) -> dict[str, tuple[list[str], list[str] | None]]:
    """Per teacher: the cache target kinds and FPN levels its stages' losses read (levels None: all)."""
    from trainers.distill import build_distiller

    out: dict[str, tuple[list[str], list[str] | None]] = {}
    for st, name in ((st, t.name) for st in stages for t in st.teachers):
        d = build_distiller(st.losses, student_channels, teacher_channels[name])
        kinds = sorted({cache_kind(f) for f in d.required_teacher_targets()})
        lvls: set[str] | None = set()
        for term in d.terms.values():
            term_levels = getattr(term, "levels", None)
            if term_levels is not None and lvls is not None:
                lvls |= set(term_levels)
        if "features" in kinds and not lvls:
            lvls = None
        prev = out.get(name)
        if prev is not None:
            kinds = sorted(set(kinds) | set(prev[0]))
            lvls = None if lvls is None or prev[1] is None else lvls | set(prev[1])
        out[name] = (kinds or ["features"], sorted(lvls) if lvls else None)
    return out


def fingerprint(obj: Any) -> str:
    """Short content hash of a JSON-able value (teacher folders are keyed by their training settings)."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def total_epochs(stages: Sequence[Stage]) -> int:
    return sum(s.epochs for s in stages)


__all__ = [
    "Stage", "build_plan", "direct_stage", "baseline_stage", "stage_borders", "inherit_weights", "adaptation_cost",
    "measure_adaptation_costs", "order_by_cost", "cache_needs", "fingerprint", "total_epochs",
]
