"""bench/curriculum_effect.py's table and goals, computed by hand on made-up APs (the runs themselves are the
pipeline's, tested elsewhere)."""

from __future__ import annotations

from pathlib import Path

from helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("curriculum_effect")


RESULT = {
    "student": "s", "ladder": ["a", "b"], "teachers": {"a": 0.10, "b": 0.20}, "epochs": 6, "seeds": [0, 1],
    "arms": {"baseline": [0.05, 0.07], "direct": [0.10, 0.12], "progressive": [0.13, 0.13],
             "progressive_auto": [0.12, 0.12], "all_at_once": [0.11, 0.15]},
}


def test_table_paired_differences_and_goals(tmp_path):
    bench = _bench()
    text = bench.summarize(RESULT)
    assert "| progressive | 13.00 | 0.00 | 13.00 | 13.00 |" in text
    assert "| direct | 11.00 | 1.41 | 10.00 | 12.00 |" in text  # stdev of (10, 12)
    assert "- progressive - direct: +3.00, +1.00 (mean +2.00)" in text
    # 13.00 >= 11.00 + 1.41; 13 >= 6 + 5; 13 >= 10 (the weakest teacher); auto 12 < 13
    assert ("progressive >= direct + max(std): met; progressive >= baseline + 5 AP: met; "
            "progressive >= weakest teacher: met; auto order >= given order: NOT met") in text
    bench.plot(RESULT, tmp_path / "effect.png")
    assert (tmp_path / "effect.png").stat().st_size > 10_000


def test_a_subset_of_arms_is_tabled_and_judged_alone(tmp_path):
    bench = _bench()
    subset = dict(RESULT, arms={a: RESULT["arms"][a] for a in ("baseline", "direct", "progressive")})
    text = bench.summarize(subset)
    assert "| progressive_auto |" not in text and "| all_at_once |" not in text
    assert "- progressive - baseline: +8.00, +6.00 (mean +7.00)" in text
    assert "progressive_auto - progressive" not in text and "all_at_once" not in text
    assert text.endswith("Goals: progressive >= direct + max(std): met; progressive >= baseline + 5 AP: met; "
                         "progressive >= weakest teacher: met")
    bench.plot(subset, tmp_path / "subset.png")
    assert (tmp_path / "subset.png").stat().st_size > 10_000


def test_budget_table_rows_by_epochs_with_the_lead_and_goal(tmp_path):
    budget = load_bench("curriculum_budget")
    short = dict(RESULT)
    long = dict(RESULT, epochs=12, arms={"direct": [0.20, 0.20], "progressive": [0.22, 0.20]})
    text = budget.table([long, short])  # drawn in the order of the epochs, not of the arguments
    rows = text.splitlines()[2:]
    assert rows[0].startswith("| 6 | 0, 1 | 6.00 +- 1.41 | 11.00 +- 1.41 | 13.00 +- 0.00 | 12.00 +- 0.00 | 13.00 +- 2.83 |")
    assert rows[0].endswith("| +3.00, +1.00 | +2.00 (1.41) | 13.00 against 12.41: met |")
    # 12 epochs: leads +2 and 0; progressive std = stdev(22, 20) = 1.41 > direct's 0, so the bar is 20 + 1.41
    assert rows[1].startswith("| 12 | 0, 1 | - | 20.00 +- 0.00 | 21.00 +- 1.41 | - | - |")
    assert rows[1].endswith("| +2.00, +0.00 | +1.00 (1.41) | 21.00 against 21.41: not met |")
    budget.plot([short, long], tmp_path / "budget.png")
    assert (tmp_path / "budget.png").stat().st_size > 10_000
