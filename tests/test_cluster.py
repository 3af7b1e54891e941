"""Several Ray nodes simulated on one machine (issue "cost, scale and faults"): a precompute and a short
`curriculum run` with their actors and train workers spread over the nodes, and a node lost mid-precompute.

The cluster (`ray.cluster_utils.Cluster`) lives in a subprocess, tests/cluster_script.py: a process holds one Ray
connection and this pytest process has its own local Ray (`ray_session`). The script runs the project's real
entry points (`curriculum.pipeline.run_pipeline`, `teachers.precompute.precompute`, `teachers.verify.verify_cache`) and
writes a JSON summary; where actors and train workers ran is what Ray's state API says (node ids of every
`PrecomputeActor` and `RayTrainWorker`, alive or dead), not what the config asked for.

Layout: a head with no CPUs (GCS, dashboard, the driver) and three worker nodes of one logical CPU each; one CPU
per precompute actor and per train worker, so Ray has to put them on different nodes.

The node loss: a precompute with three actors, one per node (no spare room), over 12 shards; at the first dispatch
after a shard was committed, the node of the actor just given a shard is removed (`remove_node(allow_graceful=
False)`: its raylet and workers killed). The driver then meets the failures while shards are still queued. The
lost node's shards must be redone by the survivors (the replacement actor never finds room, and must never be
given shards), each shard committed exactly once, and the cache must equal the fault-free one of the run, byte for
byte, and verify against the live teacher.

About 1.5 minutes on an idle 2-core machine, 3 or more when it is busy; the subprocess is given 8 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("cluster_script.py")
TIMEOUT_S = 480

pytestmark = pytest.mark.slow  # a 4-node Ray cluster, a teacher, two precomputes and a Ray Train stage


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, kill_matching):
    work = tmp_path_factory.mktemp("cluster")
    # A private Ray temp dir (short: Ray's socket paths live under it). RAY_TMPDIR also moves Ray's
    # "current cluster" address file, so that no other Ray of this machine (e.g. a test session's `ray.init()`)
    # can find and join this cluster, nor this script another one.
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1",
               RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    log_path = work / "script.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(work / "w")], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        finally:
            kill_matching(ray_tmp)  # our cluster's processes, if the script died before shutdown
            shutil.rmtree(ray_tmp, ignore_errors=True)
    summary_file = work / "w" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"phases": {}}
    tail = log_path.read_text(errors="replace")[-6000:]
    return {"rc": rc, "summary": summary, "log": tail, "work": work / "w"}


def _phase(cluster_run: dict, name: str) -> dict:
    ph = cluster_run["summary"]["phases"].get(name)
    assert ph is not None, f"phase {name!r} did not finish (rc {cluster_run['rc']}):\n{cluster_run['log']}"
    return ph


def test_precompute_and_run_spread_over_nodes(cluster_run):
    s = cluster_run["summary"]
    c = _phase(cluster_run, "cluster")
    assert c["alive"] == 4 and c["cpus"] == 3.0, c
    run = _phase(cluster_run, "run")
    workers = {f"node_{i}" for i in range(3)}
    # Precompute: 2 actors of one teacher, on 2 different worker nodes (the head has no CPU).
    assert len(run["precompute_actor_nodes"]) == 2, run
    assert len(set(run["precompute_actor_nodes"])) == 2 and set(run["precompute_actor_nodes"]) <= workers, run
    # Ray Train: trainer.num_workers 2, on 2 different nodes.
    assert len(run["train_worker_nodes"]) == 2, run
    assert len(set(run["train_worker_nodes"])) == 2 and set(run["train_worker_nodes"]) <= workers, run
    # The cache: every shard committed exactly once, complete, verified against the live teacher.
    n = run["num_shards"]
    assert n >= 8 and run["commits"] == {str(i): 1 for i in range(n)}, run
    assert sorted(run["computed"]) == list(range(n))
    assert run["manifest_complete"]
    assert run["verify"]["ok"] and run["verify"]["checked"] >= 4, run["verify"]
    # The run's report: the teacher and the student after its stage; the final student as a plain checkpoint.
    assert run["report_roles"] == ["teacher", "stage"], run
    assert run["student_pt"]
    results = json.loads((cluster_run["work"] / "run" / "report" / "results.json").read_text())
    stage = [r for r in results["rows"] if r["role"] == "stage"]
    assert len(stage) == 1 and set(stage[0]["val"]) >= {"AP", "AP50"}
    assert s["nodes"].keys() == {"head"} | workers


def test_node_lost_mid_precompute_shards_redone_elsewhere_once(cluster_run):
    f = _phase(cluster_run, "fault")
    log = cluster_run["summary"].get("fault_log", [])
    assert "started" not in f or "seconds" in f, (
        f"the precompute did not end after the node was lost (rc {cluster_run['rc']}); events {log}\n"
        f"{cluster_run['log']}")
    assert f["error"] is None, f["error"]
    removed = f["removed"]
    assert removed and removed["node"].startswith("node_") and not removed["processes_alive"], removed
    lost = removed["node"]
    n = f["num_shards"]

    # The lost node's actor held shards: they failed and were handed out again, once each.
    retried = [s for s, _ in f["retried"]]
    assert retried and len(set(retried)) == len(retried), f["retried"]
    assert all("actor died" in why for _, why in f["retried"]), f["retried"]
    assert f["actors_replaced"] >= 1

    dispatches = [e for e in log if e[1] == "dispatch"]
    t_removed = next(e[0] for e in log if e[1] == "removed")
    for shard in retried:
        tries = [e for e in dispatches if e[2] == shard]
        assert tries[0][3] == lost, (shard, tries)  # it was on the lost node, and was redone on another one
        assert tries[-1][3] not in (lost, None) and tries[-1][0] >= t_removed, (shard, tries)
    # No shard was ever given to an actor that had no node (the replacement, for which there is no room).
    assert all(e[3] is not None for e in dispatches), dispatches

    # Every shard committed exactly once; the cache is complete, equals the fault-free one byte for byte, verifies.
    assert f["commits"] == {str(i): 1 for i in range(n)}, f["commits"]
    assert sorted(f["computed"]) == list(range(n))
    assert f["manifest_complete"] and f["manifest_shards_equal"]
    assert f["same_relpath"] and f["bytes_equal"], f["files"]  # no temporary file left either
    assert f["files"] == [f"shard-{i:05d}.parquet" for i in range(n)]
    assert f["verify"]["ok"] and f["verify"]["checked"] >= 6, f["verify"]
    # Actors: three on the three worker nodes, plus a replacement that was never placed.
    placed = sorted(node for node, _ in f["actor_nodes"] if node is not None)
    assert placed == ["node_0", "node_1", "node_2"], f["actor_nodes"]
    assert len(f["actor_nodes"]) == 3 + f["actors_replaced"]
