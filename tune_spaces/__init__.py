"""Named search spaces for `curriculum tune`: loss weights, temperatures, decay schedules, stage lengths, lr.

A space maps config keys of `curriculum run` (dotted, as `--set` takes them) to a `Param`:

- `train.lr`, `kd_ratio`, `stages.1.epochs`: a key of the run config ("stages.1" is the second entry).
- `losses[mgd].lambda_mask`: an option of the run's (first) loss entry named `mgd`; the space does not depend on
  where in the list the entry is.
- `decay`: a whole schedule, `{"kind": ..., "params": {...}}`, merged into the `decay` section. Schedules are
  one choice because their parameters depend on the kind (exponential's gamma means nothing to linear).

Ranges. The feature losses of a run are rescaled at every stage start to `kd_ratio` x the detector loss (see
curriculum/config.py), because the authors' coefficients (MGD alpha 2e-5, Zhang w_f 7e-5 ...) were set for
800x1333 COCO batches and are 100 to 1500 times off on the built-in data. `kd_ratio` is therefore the weight to
search for feature terms; the ranges below span 4x either side of the default 1.0. The authors' own values of
each method option are inside every range and named in its `doc`.

A space can also be given as YAML (`--space path.yaml`), with the same keys::

    train.lr: {kind: loguniform, low: 0.0005, high: 0.005}
    losses[mgd].lambda_mask: {kind: uniform, low: 0.3, high: 0.85, doc: "MGD mask ratio"}
    decay: {kind: choice, values: [{kind: linear}, {kind: constant}]}

Kinds: uniform, loguniform (low, high), randint (low, high: integers, high included), choice (values), grid
(values: every value is tried, in every sample; `--num-samples` repeats the grid; PBT perturbs it as a choice).
`curriculum tune spaces` lists the spaces with their ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from curriculum.errors import ConfigError

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Param:
    """One searched value; see the module docstring for the kinds."""

    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"search parameter kind {self.kind!r} is unknown; kinds: {', '.join(KINDS)}")
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ConfigError(f"a {self.kind} parameter needs a non-empty `values` list")
            return
        if self.low is None or self.high is None:
            raise ConfigError(f"a {self.kind} parameter needs `low` and `high`")
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"a {self.kind} parameter's {name} must be a finite number, got {v!r}")
        if not self.low < self.high and not (self.kind == "randint" and self.low == self.high):
            raise ConfigError(f"a {self.kind} parameter needs low < high, got {self.low} and {self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"a loguniform parameter needs low > 0, got {self.low}")
        if self.kind == "randint" and (int(self.low) != self.low or int(self.high) != self.high):
            raise ConfigError(f"a randint parameter needs integer bounds, got {self.low} and {self.high}")

    def labels(self) -> list[Any]:
        """A choice's values as Tune sees them: schedules and other mappings by their text (`format_value`),
        because Tune would take a mapping for a nested search space; `decode` maps them back."""
        return [format_value(v) if isinstance(v, (dict, list)) else v for v in self.values]

    def decode(self, value: Any) -> Any:
        if self.kind in ("choice", "grid"):
            for label, v in zip(self.labels(), self.values):
                if label == value and type(label) is type(value):
                    return v
        return value

    def encode(self, value: Any) -> Any:
        """The Tune value of a config value (the default trial)."""
        if self.kind in ("choice", "grid") and isinstance(value, (dict, list)):
            return format_value(value)
        return value

    def to_tune(self, mutation: bool = False) -> Any:
        """The Ray Tune distribution; `mutation`: what PBT perturbs (lists for choices, grids and integers, whose
        values PBT shifts to a neighbour; a distribution for real values, which it scales by 0.8 or 1.2)."""
        from ray import tune

        if self.kind == "grid" and not mutation:
            return tune.grid_search(self.labels())
        if mutation and self.kind in ("choice", "grid"):  # PBT moves to a neighbouring value of a list
            return self.labels()
        if mutation and self.kind == "randint":  # PBT would multiply an integer by 0.8 or 1.2
            return list(range(int(self.low), int(self.high) + 1))
        if self.kind in ("choice", "grid"):
            return tune.choice(self.labels())
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high) + 1)  # tune's upper bound is exclusive

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return ("each of " if self.kind == "grid" else "one of ") + ", ".join(format_value(v) for v in self.values)
        return f"{self.kind} [{format_value(self.low)}, {format_value(self.high)}]"


@dataclass(frozen=True)
class Space:
    """A named set of parameters with what it is for."""

    name: str
    doc: str
    params: Mapping[str, Param] = field(default_factory=dict)

    def to_tune(self, mutation: bool = False) -> dict[str, Any]:
        return {key: p.to_tune(mutation) for key, p in self.params.items()}


def format_value(v: Any) -> str:
    """A short text for a parameter value (tables, plots): 3 significant digits, schedules as kind(params)."""
    if isinstance(v, dict) and "kind" in v:
        params = v.get("params") or {}
        return str(v["kind"]) + (f"({', '.join(f'{k}={format_value(x)}' for k, x in params.items())})" if params else "")
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


_DECAYS = (
    {"kind": "constant"}, {"kind": "linear"}, {"kind": "cosine"},
    {"kind": "step", "params": {"gamma": 0.3}}, {"kind": "exponential", "params": {"gamma": 0.7}},
)
_KD_RATIO = Param("loguniform", 0.25, 4.0, doc="feature terms = kd_ratio x the detector loss at each stage start "
                                                "(default 1.0)")
_LR = Param("loguniform", 5e-4, 5e-3, doc="student AdamW lr of every stage (default 2e-3)")

SPACES: dict[str, Space] = {s.name: s for s in (
    Space("mgd", "MGD (the default curriculum's loss): its weight, mask ratio, the decay schedule and the lr", {
        "kd_ratio": _KD_RATIO,
        "losses[mgd].lambda_mask": Param("uniform", 0.3, 0.85, doc="masked fraction of student features; authors "
                                                                   "0.65 (RetinaNet), 0.45 (Mask R-CNN)"),
        "decay": Param("choice", values=_DECAYS, doc="distillation decay r(t); TAR's is linear"),
        "train.lr": _LR,
    }),
    Space("decay", "the distillation decay alone: schedule kind and its parameter, restart per stage or not", {
        "decay": Param("choice", values=_DECAYS + (
            {"kind": "cosine", "params": {"floor": 0.2}}, {"kind": "exponential", "params": {"gamma": 0.5}},
            {"kind": "step", "params": {"gamma": 0.1}}), doc="r(t) of trainers/distill/schedules.py"),
        "decay.restart": Param("choice", values=(True, False), doc="r back to 1 at each new teacher, or one decay"),
    }),
    Space("weights", "the distillation weight against the detector loss, and the student lr", {
        "kd_ratio": _KD_RATIO,
        "train.lr": _LR,
    }),
    Space("stages", "the length of each of two stages (the total changes with it), the weight and the decay", {
        "stages.0.epochs": Param("randint", 1, 5, doc="epochs with the first (weakest) teacher"),
        "stages.1.epochs": Param("randint", 1, 5, doc="epochs with the second teacher"),
        "kd_ratio": _KD_RATIO,
        "decay": Param("choice", values=_DECAYS[:3], doc="r(t)"),
    }),
    Space("hinton", "plain KD on the dense head: temperature and weight (set `losses: [{name: hinton_kd}]`)", {
        "losses[hinton_kd].temperature": Param("uniform", 1.0, 8.0, doc="softening T; Hinton et al. give none"),
        "losses[hinton_kd].weight": Param("loguniform", 0.1, 10.0, doc="multiplier of the KD term (default 1)"),
        "train.lr": _LR,
    }),
    Space("zhang", "Zhang & Ma 2021 (zhang_feature + zhang_attention + zhang_nonlocal): the attention temperature, "
                   "the attention term against the feature terms, and their weight", {
        "losses[zhang_feature].tau": Param("uniform", 0.05, 1.0, doc="attention temperature; authors 0.1 (one-stage), "
                                                                     "0.5 (two-stage)"),
        "losses[zhang_attention].w_a": Param("loguniform", 2.4e-3, 2.4e-1, doc="attention-loss weight; authors "
                                                                               "2.4e-2 (one-stage)"),
        "kd_ratio": _KD_RATIO,
    }),
)}


def list_spaces() -> list[Space]:
    return [SPACES[k] for k in sorted(SPACES)]


def load_space(name_or_path: str) -> Space:
    """A space by name, or from a YAML file (module docstring)."""
    if name_or_path in SPACES:
        return SPACES[name_or_path]
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        raise ConfigError(f"search space {name_or_path!r} is neither a named space ({', '.join(sorted(SPACES))}) "
                          "nor a YAML file")
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a search space is a mapping of config keys to parameters, got {data!r}")
    params = {}
    for key, spec in data.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping with `kind` (and low/high or values), got {spec!r}")
        unknown = set(spec) - {"kind", "low", "high", "values", "doc"}
        if unknown:
            raise ConfigError(f"{path}: {key}: unknown field(s) {sorted(unknown)}; fields: kind, low, high, values, doc")
        try:
            params[str(key)] = Param(kind=spec.get("kind", ""), low=spec.get("low"), high=spec.get("high"),
                                     values=tuple(spec.get("values") or ()), doc=str(spec.get("doc", "")))
        except ConfigError as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
    return Space(path.stem, f"from {path}", params)


__all__ = ["KINDS", "Param", "Space", "SPACES", "format_value", "list_spaces", "load_space"]
