"""bench/trial_cost.py's CPU accounting on this process, and its figures from made-up rounds computed by hand (the
Tune trial and the distilled sequence are what tests/test_tune.py and the pipeline's tests run)."""

from __future__ import annotations

import os
import time

import pytest

from helpers import load_bench


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_cpu_watch_counts_what_this_process_spends_while_it_runs():
    bench = load_bench("trial_cost")
    before = bench.cpu_seconds_by_process()[os.getpid()][1]
    with bench.CpuWatch(every=0.05) as watch:
        _busy(0.6)
    spent = watch.spent()
    mine = spent[os.getpid()][1]
    assert 0.5 <= mine <= 1.5  # the busy loop, plus the watch's own sampling
    assert bench.cpu_seconds_by_process()[os.getpid()][1] >= before + mine - 0.05
    split = bench.split_cpu(spent, os.getpid(), trial_mark="no process has this in its command line")
    assert split["trial"] == 0 and split["driver"] == pytest.approx(mine, abs=0.01)
    assert split["total"] == pytest.approx(split["driver"] + split["other"], abs=0.02)


def test_the_cpu_split_and_the_summary_from_made_up_rounds():
    bench = load_bench("trial_cost")
    spent = {10: ("ray::ImplicitFunc.train", 30.0), 11: ("python driver.py", 2.0), 12: ("raylet", 1.5),
             13: ("ray::ImplicitFunc.train", 2.0)}
    assert bench.split_cpu(spent, 11) == {"trial": 32.0, "driver": 2.0, "other": 1.5, "total": 35.5}
    rounds = [
        {"alone_s": 26.0, "alone_epochs_s": [14.0, 12.0], "alone_tune_epochs_s": [16.0, 12.6],
         "distilled_s": 29.9, "distilled_epochs_s": [16.1, 13.8], "distilled_tune_epochs_s": [17.0, 14.52],
         "cpu_s": {"trial": 27.0, "total": 30.0}},
        {"alone_s": 39.0, "alone_epochs_s": [15.0, 13.0, 11.0], "alone_tune_epochs_s": [16.0, 12.0, 13.0],
         "distilled_s": 42.9, "distilled_epochs_s": [16.9, 13.0, 13.0],
         "distilled_tune_epochs_s": [17.0, 13.0, 13.0], "cpu_s": {"trial": 24.0, "total": 30.0}},
        {"alone_s": 23.0, "alone_epochs_s": [13.0, 10.0], "alone_tune_epochs_s": [16.0, 10.0],
         "distilled_s": 27.6, "distilled_epochs_s": [15.6, 12.0], "distilled_tune_epochs_s": [16.0, 13.2],
         "cpu_s": {"trial": 28.5, "total": 30.0}},
    ]
    # distilled / alone: 29.9/26 = 1.15, 42.9/39 = 1.1, 27.6/23 = 1.2 -> 1.15; its later epochs 13.8/12 = 1.15,
    # 13/12 = 1.0833, 12/10 = 1.2 -> 1.15; Tune's later epochs 12.6/12 = 1.05, 12.5/12 = 1.0417, 10/10 = 1 -> 1.0417;
    # Tune's first-epoch excess 2, 1, 3 -> 2; CPU shares 0.9, 0.8, 0.95 -> 0.9; the distilled trial's later epochs in
    # Tune over in process 14.52/13.8 = 1.0522, 13/13 = 1, 13.2/12 = 1.1 -> 1.052, over alone's 14.52/12 = 1.21,
    # 13/12 = 1.0833, 13.2/10 = 1.32 -> 1.21
    assert bench.summarise(rounds) == {"distilled_over_alone": 1.15, "distilled_later_epoch_ratio": 1.15,
                                       "tune_later_epoch_ratio": 1.042, "tune_first_epoch_excess_s": 2.0,
                                       "trial_cpu_share": 0.9, "distilled_tune_later_epoch_ratio": 1.052,
                                       "distilled_tune_over_alone": 1.21}
    # The plain Tune arm's later epochs over in process: 14.49/13.8 = 1.05, 13.26/13 = 1.02, 12.12/12 = 1.01 -> 1.02
    for r, later in zip(rounds, ([16.0, 14.49], [17.0, 13.26, 13.26], [16.0, 12.12])):
        r["distilled_plain_tune_epochs_s"] = later
    assert bench.summarise(rounds)["distilled_plain_tune_later_epoch_ratio"] == 1.02
    # The sweep's second (warm) trial: later epochs 14.21/13.8 = 1.03, 13.26/13 = 1.02, 12.6/12 = 1.05 -> 1.03 over
    # in process; over alone's 14.21/12 = 1.1842, 13.26/12 = 1.105, 12.6/10 = 1.26 -> 1.184
    for r, later in zip(rounds, ([15.0, 14.21], [15.0, 13.26, 13.26], [14.0, 12.6])):
        r["distilled_tune_warm_epochs_s"] = later
    got = bench.summarise(rounds)
    assert (got["distilled_tune_warm_later_epoch_ratio"], got["distilled_tune_warm_over_alone"]) == (1.03, 1.184)
    # --onednn-arm: the same trial with SmallMapConv2d off, over the distilled one: 31.395/29.9 = 1.05,
    # 42.9/42.9 = 1.0, 28.704/27.6 = 1.04 -> 1.04
    for r, s in zip(rounds, (31.395, 42.9, 28.704)):
        r["distilled_onednn_s"] = s
    assert bench.summarise(rounds)["onednn_over_small_conv"] == 1.04
