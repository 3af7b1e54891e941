"""Imports only go down: ground (curriculum's errors, config, data, files, cluster, built-in data set), then
`teachers/`, then `trainers/`, then the application (curriculum's plan, pipeline, report, predict, cli; `tune_spaces/`).
Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUND = {"curriculum", "curriculum.errors", "curriculum.config", "curriculum.data", "curriculum.files",
          "curriculum.cluster", "curriculum.seeds", "curriculum.shapes"}
APPLICATION = {"curriculum.plan", "curriculum.pipeline", "curriculum.report", "curriculum.cli", "curriculum.predict",
               "curriculum.export", "curriculum.latency"}
LAYERS = ("ground", "teachers", "trainers", "application")


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    if top == "curriculum":
        return "ground" if module in GROUND else "application" if module in APPLICATION else "unknown"
    if top in ("teachers", "trainers"):
        return top
    if top == "tune_spaces":
        return "application"
    return None  # not ours


def imports_of(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
    return out


def test_imports_only_go_down():
    bad = []
    for package in ("curriculum", "teachers", "trainers", "tune_spaces"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            own = layer(module)
            for lineno, imported in imports_of(path):
                other = layer(imported)
                if other is not None and LAYERS.index(other) > LAYERS.index(own):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} ({own}) imports {imported} ({other})")
    assert not bad, "\n".join(bad)


def test_the_layer_map_knows_every_module():
    """A new module of `curriculum/` must be placed: ground or application."""
    for package in ("curriculum", "teachers", "trainers", "tune_spaces"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            assert layer(module) in LAYERS, f"{path}: add it to GROUND or APPLICATION in this test"
