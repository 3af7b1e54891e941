"""The sequence's lead against the budget: several results of `bench/curriculum_effect.py` at different total
student epochs (its `--set "stages=[{epochs: E}]"`), read back and drawn side by side. Runs nothing.

Prints a table (per budget: each arm's mean and std, progressive - direct per seed, its mean and std, and the issue's
first goal) and writes a PNG: each arm's mean and std against the total epochs, and the paired differences.

    python bench/curriculum_budget.py bench/results/curriculum_effect.json bench/results/curriculum_effect_18.json \\
        bench/results/curriculum_effect_27.json --out bench/results/curriculum_budget.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curriculum_effect import ARMS, direct_goal, mean_std  # noqa: E402  (bench/ is scripts, not a package)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std over seeds, x100 AP."""
    return mean_std([100 * x for x in values])


def lead(result: dict[str, Any]) -> list[float]:
    """progressive - direct per seed, x100 AP."""
    arms = result["arms"]
    return [100 * (p - d) for p, d in zip(arms["progressive"], arms["direct"])]


def table(results: list[dict[str, Any]]) -> str:
    """One row per budget, in the order of total epochs."""
    lines = ["| epochs | seeds | " + " | ".join(ARMS) + " | progressive - direct | mean (std) | goal 1 |",
             "|---:|---|" + "---:|" * len(ARMS) + "---|---:|---|"]
    for r in sorted(results, key=lambda r: r["epochs"]):
        cells = []
        for a in ARMS:
            cells.append("{:.2f} +- {:.2f}".format(*_mean_std(r["arms"][a])) if a in r["arms"] else "-")
        d = lead(r)
        pm, bar = (100 * x for x in direct_goal(r["arms"]))
        lines.append(f"| {r['epochs']} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{x:+.2f}" for x in d) + " | {:+.2f} ({:.2f}) | ".format(*mean_std(d))
                     + f"{pm:.2f} against {bar:.2f}: {'met' if pm >= bar else 'not met'} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["epochs"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, a in enumerate(ARMS):
        pts = [(r["epochs"], *_mean_std(r["arms"][a])) for r in results if a in r["arms"]]
        if pts:
            x, m, s = zip(*pts)
            ax.errorbar(x, m, yerr=s, marker="o", capsize=4, color=f"C{i}", label=a)
    for j, (name, ap) in enumerate(results[0]["teachers"].items()):
        ax.axhline(100 * ap, ls="--", lw=1, color=f"C{5 + j}", label=f"teacher {name} ({100 * ap:.1f})")
    ax.set_xlabel("total student epochs (every arm)")
    ax.set_ylabel("val AP x100 (mean, std over seeds)")
    ax.set_xticks([r["epochs"] for r in results])
    ax.legend(fontsize=8, loc="upper left")
    for r in results:
        d = lead(r)
        bx.scatter([r["epochs"]] * len(d), d, color="k", s=14, zorder=3)
        m, s = mean_std(d)
        bx.errorbar([r["epochs"]], [m], yerr=[s], marker="s", color="C2", capsize=5)
    bx.axhline(0, color="grey", lw=1)
    bx.set_xticks([r["epochs"] for r in results])
    bx.set_xlabel("total student epochs (every arm)")
    bx.set_ylabel("progressive - direct, AP x100 (per seed, mean, std)")
    fig.suptitle(f"{results[0]['student']}: the sequence of teachers against the budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="curriculum_effect JSONs (each with the progressive and direct arms)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "curriculum_budget.png"))
    args = ap.parse_args()
    results = [json.loads(Path(p).read_text()) for p in args.results]
    missing = [p for p, r in zip(args.results, results) if not {"progressive", "direct"} <= set(r["arms"])]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: no direct arm; rerun bench/curriculum_effect.py with it")
    print(table(results))
    plot(results, Path(args.out))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
