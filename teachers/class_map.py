"""Class maps: a teacher trained on other classes than the student's (COCO's 91 label slots distilled into 3).

`ClassMap.build(student_names, teacher_names, spec, where)` pairs every student label with a teacher label:
`columns[k]` is the teacher label of student label k (0 -> 0, the background). Names are per label, index 0 the
background; torchvision's COCO lists hold 'N/A' placeholders, which never match. `spec` is ``"auto"`` (a student
class takes the teacher class of equal name, compared case-insensitively after stripping, '_' and ' ' alike) or a
mapping {student class: teacher class}; student classes the mapping does not name fall back to auto.
`resolve_class_map` is what a run asks: the map a teacher needs for the student, or None when their classes agree.

`apply(tt)` turns a batch of `TeacherTargets` in the teacher's labels into the student's:

- one-stage ``cls_logits`` per level ``[N, HWA, K_t]`` (one sigmoid per class, column 0 unused): the student's
  columns, ``[N, HWA, K_s]``. Sigmoid scores are independent per class: nothing is renormalised.
- ``roi_class_logits`` ``[R, K_t]`` (one softmax over the classes, background 0 included). *Project choice:
  unmapped classes are background for the student.* A RoI the teacher gives to a class the student does not have
  is, for the student, background: ``p_s[0] = p_t[0] + sum_u p_t[u]`` over the unmapped teacher classes u
  ('N/A' slots included), ``p_s[k] = p_t[columns[k]]``. It comes back as log-probabilities (log_softmax space,
  computed with logsumexp, so tiny probabilities do not underflow): ``softmax(apply(z)) == p_s``, and the losses
  that take ``softmax(z / T)`` keep working. With T != 1 they temper the folded distribution (p_s^(1/T),
  renormalised), not the teacher's own before the fold; at T = 1 both agree.
- ``roi_box_regression`` ``[R, 4 K_t]``: the 4-column groups of the student's classes, ``[R, 4 K_s]``.
- ``roi_scorer``: wrapped so that it returns the mapped pair.
- ``detections``: only those of a mapped class are kept, relabelled to student labels.
- features, bbox_regression, bbox_ctrness, objectness, rpn_deltas: not class-indexed, unchanged.

An identity map returns the targets as they are. The outputs are constants like every `TeacherTargets` (detached
when built). `to_dict` / `from_dict`: the picklable form a stage's dict carries to the Ray Train workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curriculum.errors import ConfigError, DataError
from teachers.targets import TeacherTargets

PLACEHOLDER = "N/A"  # torchvision's unused COCO label slots
_LIST_FIRST = 20


def _norm(name: Any) -> str:
    """The name as matching sees it: case, surrounding blanks and '_' versus ' ' do not count."""
    return " ".join(str(name).replace("_", " ").lower().split())


def _real(names: Sequence[str]) -> list[str]:
    """The class names that can match: no background (index 0), no 'N/A' placeholder."""
    return [n for n in names[1:] if _norm(n) != _norm(PLACEHOLDER)]


def _listing(names: Sequence[str]) -> str:
    real = _real(names)
    more = f", ... ({len(real)} in all)" if len(real) > _LIST_FIRST else ""
    return "[" + ", ".join(repr(n) for n in real[:_LIST_FIRST]) + more + "]"


@dataclass(frozen=True)
class ClassMap:
    """Teacher label `columns[k]` for every student label k (`columns[0] == 0`); see the module docstring."""

    student_names: tuple[str, ...]
    teacher_names: tuple[str, ...]
    columns: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "student_names", tuple(str(n) for n in self.student_names))
        object.__setattr__(self, "teacher_names", tuple(str(n) for n in self.teacher_names))
        object.__setattr__(self, "columns", tuple(int(c) for c in self.columns))
        c, kt = self.columns, len(self.teacher_names)
        mapped = c[1:]
        if (len(c) != len(self.student_names) or len(c) < 2 or c[0] != 0 or len(set(mapped)) != len(mapped)
                or not all(0 < x < kt for x in mapped)):
            raise ConfigError(f"class map {list(c)}: one distinct teacher label in 1..{kt - 1} per student class "
                              f"({len(self.student_names) - 1}), after 0 for the background; build it with "
                              "ClassMap.build")

    @classmethod
    def build(cls, student_names: Sequence[str], teacher_names: Sequence[str],
              spec: str | Mapping[str, str] = "auto", where: str = "class_map") -> ClassMap:
        """The map of `spec` (``"auto"`` or {student class: teacher class}); ConfigError starting with `where`."""
        student, teacher = [str(n) for n in student_names], [str(n) for n in teacher_names]
        if len(student) < 2 or len(teacher) < 2:
            raise ConfigError(f"{where}: class names need the background first and at least one class "
                              f"(student {student}, teacher {teacher[:5]})")
        if spec == "auto" and [_norm(n) for n in student] == [_norm(n) for n in teacher]:
            return cls(tuple(student), tuple(teacher), tuple(range(len(student))))  # same list, 'N/A' slots too
        # Candidates by normalised name; 0 (background) and 'N/A' never match.
        by_name: dict[str, list[int]] = {}
        for t, name in enumerate(teacher):
            if t > 0 and _norm(name) != _norm(PLACEHOLDER):
                by_name.setdefault(_norm(name), []).append(t)
        given: dict[int, int] = {}  # student label -> teacher label, from the mapping
        if isinstance(spec, Mapping):
            s_index = {_norm(n): k for k, n in enumerate(student) if k > 0}
            bad_s = [s for s in spec if not isinstance(s, str) or _norm(s) not in s_index]
            if bad_s:
                raise ConfigError(f"{where}: {bad_s} {'is not a' if len(bad_s) == 1 else 'are not'} student "
                                  f"class{'es' if len(bad_s) > 1 else ''}; the student's classes (its data set's): "
                                  f"{_listing(student)}; key the mapping by those names")
            bad_t = {s: t for s, t in spec.items() if not isinstance(t, str) or len(by_name.get(_norm(t), ())) != 1}
            if bad_t:
                raise ConfigError(f"{where}: the mapping names {list(bad_t.values())} (for {list(bad_t)}), not "
                                  f"class{'es' if len(bad_t) > 1 else ''} of the teacher; the teacher's classes: "
                                  f"{_listing(teacher)}; map each student class to one of those")
            given = {s_index[_norm(s)]: by_name[_norm(t)][0] for s, t in spec.items()}
        elif spec != "auto":
            raise ConfigError(f"{where}: {spec!r} is neither 'auto' nor a mapping {{student class: teacher class}}")
        columns, unmatched, ambiguous = [0], [], []
        for k, name in enumerate(student[1:], start=1):
            if k in given:
                columns.append(given[k])
                continue
            hits = by_name.get(_norm(name), [])
            if len(hits) != 1:
                (ambiguous if hits else unmatched).append(name)
            columns.append(hits[0] if hits else -1)
        if unmatched:
            raise ConfigError(f"{where}: student class{'es' if len(unmatched) > 1 else ''} {unmatched} "
                              f"{'have' if len(unmatched) > 1 else 'has'} no teacher class of the same name; the "
                              f"teacher's classes: {_listing(teacher)}; map "
                              f"{'them' if len(unmatched) > 1 else 'it'} by hand (class_map: {{{unmatched[0]}: "
                              "<teacher class>}) or distil from a teacher that knows "
                              f"{'them' if len(unmatched) > 1 else 'it'}")
        if ambiguous:
            raise ConfigError(f"{where}: student class{'es' if len(ambiguous) > 1 else ''} {ambiguous} match several "
                              f"teacher classes of that name; map {'them' if len(ambiguous) > 1 else 'it'} by hand "
                              "(class_map: {student class: teacher class})")
        taken: dict[int, list[str]] = {}
        for k, t in enumerate(columns[1:], start=1):
            taken.setdefault(t, []).append(student[k])
        dup = {teacher[t]: names for t, names in taken.items() if len(names) > 1}
        if dup:
            t, names = next(iter(dup.items()))
            raise ConfigError(f"{where}: student classes {names} are all mapped to the teacher class {t!r}; a "
                              "teacher class can stand for one student class only: map all but one of them to "
                              f"other teacher classes (the teacher's classes: {_listing(teacher)})")
        return cls(tuple(student), tuple(teacher), tuple(columns))

    # ----------------------------------------------------------------------------------------

    @property
    def num_student(self) -> int:
        return len(self.student_names)

    @property
    def num_teacher(self) -> int:
        return len(self.teacher_names)

    @property
    def is_identity(self) -> bool:
        """Teacher and student have the same classes in the same order: nothing to map."""
        return self.num_teacher == self.num_student and self.columns == tuple(range(self.num_student))

    @property
    def unmapped(self) -> tuple[int, ...]:
        """Teacher labels no student class takes (background excluded), 'N/A' slots included."""
        mapped = set(self.columns)
        return tuple(t for t in range(1, self.num_teacher) if t not in mapped)

    def to_dict(self) -> dict[str, Any]:
        return {"student_names": list(self.student_names), "teacher_names": list(self.teacher_names),
                "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassMap:
        return cls(tuple(d["student_names"]), tuple(d["teacher_names"]), tuple(d["columns"]))

    # ---------------------------------------------------------------------------------------- mapping

    def _index(self, labels: Sequence[int], like: Tensor) -> Tensor:
        return torch.tensor(labels, dtype=torch.long, device=like.device)

    def _check(self, name: str, t: Tensor, width: int) -> None:
        if t.dim() < 1 or t.shape[-1] != width:
            raise DataError(
                f"teacher target '{name}' has shape {list(t.shape)}, but the class map expects {width} columns "
                f"(the teacher's {self.num_teacher} labels{' x 4' if width != self.num_teacher else ''}): the "
                "targets come from another teacher than the one the map was built for; rebuild the cache of this "
                "teacher or fix its class_map"
            )

    def map_sigmoid(self, logits: Tensor, name: str = "cls_logits") -> Tensor:
        """``[..., K_t]`` independent per-class logits -> ``[..., K_s]``: the student's columns."""
        self._check(name, logits, self.num_teacher)
        return logits.index_select(-1, self._index(self.columns, logits))

    def fold_softmax(self, logits: Tensor, name: str = "roi_class_logits") -> Tensor:
        """``[R, K_t]`` softmax logits -> ``[R, K_s]`` log-probabilities, unmapped classes folded into background."""
        self._check(name, logits, self.num_teacher)
        logp = torch.log_softmax(logits.float(), dim=-1)
        bg = torch.logsumexp(logp.index_select(-1, self._index((0, *self.unmapped), logp)), dim=-1, keepdim=True)
        fg = logp.index_select(-1, self._index(self.columns[1:], logp))
        return torch.cat([bg, fg], dim=-1).to(logits.dtype)

    def map_box_regression(self, reg: Tensor, name: str = "roi_box_regression") -> Tensor:
        """``[R, 4 K_t]`` per-class box deltas -> ``[R, 4 K_s]``: the student's classes' 4-column groups."""
        self._check(name, reg, 4 * self.num_teacher)
        cols = [4 * c + j for c in self.columns for j in range(4)]
        return reg.index_select(-1, self._index(cols, reg))

    def map_detections(self, detections: Sequence[Mapping[str, Any]], name: str = "detections"
                       ) -> list[dict[str, Any]]:
        """Per image: the detections of mapped teacher classes, relabelled to student labels."""
        out = []
        for i, det in enumerate(detections):
            labels = det["labels"]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_teacher):
                raise DataError(f"teacher target '{name}[{i}]' has labels {sorted(set(labels.tolist()))[:10]} "
                                f"outside the teacher's 0..{self.num_teacher - 1}: the targets come from another "
                                "teacher than the one the class map was built for")
            to_student = torch.full((self.num_teacher,), -1, dtype=torch.long, device=labels.device)
            to_student[self._index(self.columns[1:], labels)] = torch.arange(1, self.num_student,
                                                                             device=labels.device)
            new = to_student[labels.long()]
            keep = new > 0
            n = labels.shape[0]
            mapped = {k: v[keep] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
                      for k, v in det.items()}
            mapped["labels"] = new[keep].to(labels.dtype)
            out.append(mapped)
        return out

    def apply(self, tt: TeacherTargets) -> TeacherTargets:
        """`tt` in the student's labels (module docstring); an identity map returns `tt` itself."""
        if self.is_identity:
            return tt
        changes: dict[str, Any] = {}
        if tt.cls_logits is not None:
            changes["cls_logits"] = [self.map_sigmoid(t, f"cls_logits[{i}]") for i, t in enumerate(tt.cls_logits)]
        if tt.roi_class_logits is not None:
            changes["roi_class_logits"] = self.fold_softmax(tt.roi_class_logits)
        if tt.roi_box_regression is not None:
            changes["roi_box_regression"] = self.map_box_regression(tt.roi_box_regression)
        if tt.detections is not None:
            changes["detections"] = self.map_detections(tt.detections)
        if tt.roi_scorer is not None:
            scorer = tt.roi_scorer

            def mapped_scorer(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
                cls, reg = scorer(boxes)
                return (self.fold_softmax(cls, "roi_scorer class_logits"),
                        self.map_box_regression(reg, "roi_scorer box_regression"))

            changes["roi_scorer"] = mapped_scorer
        if tt.mask_scorer is not None:
            masks_of = tt.mask_scorer
            channels = list(self.columns)

            def mapped_masks(boxes: list[Tensor]) -> Tensor:  # the student's classes' mask channels
                logits = masks_of(boxes)
                return logits[:, logits.new_tensor(channels, dtype=torch.long)]

            changes["mask_scorer"] = mapped_masks
        return dataclasses.replace(tt, **changes)  # rebuilt: every tensor detached again


def resolve_class_map(student_names: Sequence[str], teacher_names: Sequence[str] | None, teacher_num_classes: int,
                      spec: str | Mapping[str, str] | None, where: str = "class_map") -> ClassMap | None:
    """The map a teacher's targets need for the student, or None when their classes are the same.

    `teacher_names`: the teacher checkpoint's ``class_names`` (None for a checkpoint that records none: it must
    then have the student's number of classes, taken as the same classes). `spec` None: the teacher's classes must
    be the student's (same names in the same order, as matching compares them).
    """
    ks, kt = len(student_names), int(teacher_num_classes)
    if teacher_names is None:
        if spec is None and kt == ks:
            return None
        if spec is None:
            what = (f"the teacher predicts {kt - 1} classes and the student's data has {ks - 1}, and its checkpoint "
                    "records no class names, so the classes cannot be paired by name")
        else:
            what = "its checkpoint records no class names, so a class map cannot be built"
        raise ConfigError(f"{where}: {what}: retrain the teacher (checkpoints written now record class_names) or "
                          "distil from a teacher trained on the student's classes"
                          f"{'' if kt != ks else ' (and drop class_map if they are the same, in the same order)'}")
    if len(teacher_names) != kt:
        raise ConfigError(f"{where}: the teacher checkpoint has {len(teacher_names)} class names for "
                          f"num_classes={kt}: the checkpoint is inconsistent; retrain or re-save it")
    if spec is None:
        same = kt == ks and all(_norm(a) == _norm(b) for a, b in zip(student_names[1:], teacher_names[1:]))
        if same:
            return None
        raise ConfigError(f"{where}: not set, but the teacher's classes are not the student's (teacher: "
                          f"{_listing(teacher_names)}; student: {_listing(student_names)}): add `class_map: auto` "
                          "(classes matched by name) or a mapping {student class: teacher class}")
    m = ClassMap.build(student_names, teacher_names, spec, where)
    return None if m.is_identity else m


__all__ = ["PLACEHOLDER", "ClassMap", "resolve_class_map"]
