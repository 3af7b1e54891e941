"""A multi-node Ray cluster simulated on one machine (`ray.cluster_utils.Cluster`), driven through the project's
real entry points; run by tests/test_cluster.py in a subprocess (a process holds one Ray connection, and the
pytest process may have its own local Ray). Run it with RAY_AUTH_MODE=disabled and a private RAY_TMPDIR (the
test does): Ray writes its "current cluster" address file there, where no other Ray of the machine looks.

    python tests/cluster_script.py WORKDIR [--nodes N] [--fault-actors N] [--notice-after S] [--fault-timeout S]

Phases (WORKDIR/summary.json is rewritten after each phase and each precompute event, so a failure or a hang
still leaves evidence):

1. cluster: a head with no CPUs (GCS, dashboard, this driver) and `--nodes` worker nodes of one logical CPU
   each (each also has a custom resource {"node_i": 1}, unused by the project: a handle to pin things by hand).
   One CPU per node and one CPU per actor / per train worker means Ray *must* spread them over the nodes.
2. run: `curriculum.pipeline.run_pipeline` on a tiny config (its own small shapes data set, one teacher
   `fcos_resnet_mini` trained for 2 iterations, a precompute with 2 actors over 12 shards, a 1-epoch stage on
   Ray Train with `trainer.num_workers: 2`). The precompute it calls is wrapped only to count commits.
3. fault: `teachers.precompute.precompute` of the same teacher and cache settings into another cache root with
   `--fault-actors` actors (default 3: one per node, no spare room); at the first dispatch after the first
   commit, the node of the actor just given that shard is removed (`cluster.remove_node(node,
   allow_graceful=False)`), and the driver is held for `--notice-after` seconds so that it meets the failures
   while shards are still queued and every surviving actor still counts as busy. The cache must end complete,
   every shard committed once, verified, and byte-identical to phase 2's cache.

Where actors and train workers ran is read from Ray's state API (`ray.util.state.list_actors` keeps dead actors
with their node id; `get_actor` for the actor a shard is dispatched to), not inferred from the config.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUMMARY: dict = {"phases": {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(work: Path) -> None:
    tmp = work / "summary.json.tmp"
    tmp.write_text(json.dumps(SUMMARY, indent=2, default=str))
    tmp.replace(work / "summary.json")


def _actors(cls: str) -> list[dict]:
    """Every actor of class `cls` this cluster has had (alive or dead), with the node it ran on."""
    from ray.util.state import list_actors

    out = []
    for a in list_actors(filters=[("class_name", "=", cls)], detail=True, limit=10000, raise_on_missing_output=False):
        out.append({"actor_id": a.actor_id, "node_id": a.node_id, "state": a.state, "pid": a.pid})
    return out


def _actor_node(actor) -> str:
    from ray.util.state import get_actor

    return get_actor(actor._actor_id.hex()).node_id


def _shard_files(cache_dir: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(cache_dir, "shards").iterdir())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--fault-actors", type=int, default=3)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--notice-after", type=float, default=6.0)
    ap.add_argument("--fault-timeout", type=float, default=150.0,
                    help="the faulty precompute must end within this many seconds (else: stacks dumped, exit 1)")
    ap.add_argument("--skip-run", action="store_true",
                    help="(debugging) prepare_run only: teacher and cache, no Ray Train stage")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(1)
    import ray
    from ray.cluster_utils import Cluster

    from curriculum.config import (
        CacheConfig, CompressionConfig, PrecomputeJobConfig, RunJobConfig, TeacherSpec, config_from_dict,
    )
    from curriculum.shapes import make_shapes
    import teachers.precompute as pool
    from teachers.verify import verify_cache

    t0 = time.perf_counter()
    shapes = work / "shapes"
    if not (shapes / "val" / "instances.json").is_file():
        make_shapes(shapes, train_images=args.images, val_images=8, image_size=128, seed=0)

    # ---- 1. the cluster
    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": _free_port(),
        "gcs_server_port": _free_port(), "dashboard_agent_listen_port": _free_port(),
        "object_store_memory": 100 * 2**20,
    })
    workers = [cluster.add_node(num_cpus=1, resources={f"node_{i}": 1}, object_store_memory=100 * 2**20)
               for i in range(args.nodes)]
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    # Everything that looks for "the" cluster (the state API, ensure_ray) finds this one, never another Ray of
    # the machine.
    os.environ["RAY_ADDRESS"] = cluster.address
    names = {cluster.head_node.node_id: "head"}
    names.update({n.node_id: f"node_{i}" for i, n in enumerate(workers)})
    by_id = {n.node_id: n for n in workers}
    SUMMARY["nodes"] = {v: k for k, v in names.items()}
    SUMMARY["phases"]["cluster"] = {"seconds": round(time.perf_counter() - t, 1),
                                    "alive": sum(1 for n in ray.nodes() if n["Alive"]),
                                    "cpus": ray.cluster_resources().get("CPU")}
    _save(work)

    def node_name(node_id: str | None) -> str | None:
        return names.get(node_id, node_id)

    # ---- 2. a short curriculum run on the cluster
    cfg = {
        "output_dir": str(work / "run"),
        "data": {"root": str(shapes), "builtin": "none", "flip": "random"},
        "student": {"name": "fcos_mobilenetv3_micro"},
        "train": {"batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1, "seed": 3},
        "teacher_train": {"epochs": 1, "batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1},
        "teachers_dir": str(work / "teachers"),
        "teachers": [{"name": "fcos_resnet_mini", "actors": 2, "cpus_per_actor": 1.0, "batch_size": 4}],
        "stages": [{"epochs": 1}], "kd_ratio": 1.0, "baseline": False,
        "eval": {"max_images": 4, "batch_size": 4},
        "cache": {"root": str(work / "cache"), "shard_size": args.shard_size},
        "trainer": {"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 0},
    }
    job = config_from_dict(RunJobConfig, cfg)
    run_commits: Counter = Counter()
    run_reports: list = []
    real_precompute = pool.precompute

    def counting_precompute(pjob, progress=True, on_dispatch=None, on_commit=None):
        def commit(teacher, shard):
            run_commits[shard] += 1
            if on_commit:
                on_commit(teacher, shard)

        reports = real_precompute(pjob, progress=progress, on_dispatch=on_dispatch, on_commit=commit)
        run_reports.extend(reports)
        return reports

    t = time.perf_counter()
    pool.precompute = counting_precompute  # prepare_run imports it from the module at call time
    try:
        if args.skip_run:
            from curriculum.pipeline import Phases, prepare_run

            (work / "run").mkdir(parents=True, exist_ok=True)
            prepare_run(job, work / "run", Phases(), progress=False)
        else:
            from curriculum.pipeline import run_pipeline

            run_pipeline(job, progress=False)
    finally:
        pool.precompute = real_precompute
    (report,) = run_reports
    ref_dir = report.cache
    results = work / "run" / "report" / "results.json"
    rows = json.loads(results.read_text())["rows"] if results.is_file() else []
    v = verify_cache(ref_dir, sample=4)
    pre_actors = _actors("PrecomputeActor")
    train_workers = _actors("RayTrainWorker")
    SUMMARY["phases"]["run"] = {
        "seconds": round(time.perf_counter() - t, 1),
        "cache": ref_dir, "num_shards": report.shards, "computed": report.computed,
        "commits": {str(k): c for k, c in sorted(run_commits.items())},
        "manifest_complete": json.loads(Path(ref_dir, "manifest.json").read_text())["complete"],
        "verify": {"ok": v["ok"], "checked": v["checked"], "problems": v["problems"]},
        "precompute_actor_nodes": [node_name(a["node_id"]) for a in pre_actors],
        "train_worker_nodes": [node_name(a["node_id"]) for a in train_workers],
        "report_roles": [r["role"] for r in rows],
        "student_pt": (work / "run" / "report" / "student.pt").is_file(),
    }
    _save(work)
    seen_actor_ids = {a["actor_id"] for a in pre_actors}

    # ---- 3. the same cache again, a node removed mid-precompute
    m = json.loads(Path(ref_dir, "manifest.json").read_text())
    spec, views = m["key"]["spec"], m["key"]["views"]
    fjob = PrecomputeJobConfig(
        data=job.data,
        teachers=[TeacherSpec(checkpoint=m["teacher"]["checkpoint"], actors=args.fault_actors, cpus_per_actor=1.0,
                              batch_size=m["batch_size"])],
        cache=CacheConfig(root=str(work / "cache_fault"), split="train", targets=spec["targets"],
                          levels=spec["levels"], views=views["views"], shard_size=m["shard_size"],
                          compression=CompressionConfig(**spec["compression"]), max_attempts=3),
    )
    commits: Counter = Counter()
    dispatched: list[int] = []
    removed: dict = {}

    def on_commit(teacher, shard):
        commits[shard] += 1
        SUMMARY.setdefault("fault_log", []).append([round(time.perf_counter() - t, 2), "commit", shard])
        _save(work)

    actor_nodes: dict[str, str] = {}

    def on_dispatch(teacher, shard, actor):
        dispatched.append(shard)
        aid = actor._actor_id.hex()
        if aid not in actor_nodes:  # looked up ahead, so that the removal below is immediate
            node = _actor_node(actor)  # None: an actor not placed on any node (yet)
            if node is not None:
                actor_nodes[aid] = node
        SUMMARY.setdefault("fault_log", []).append([round(time.perf_counter() - t, 2), "dispatch", shard,
                                                    node_name(actor_nodes.get(aid)), aid[:12]])
        _save(work)
        if removed or not commits:
            return
        # The first dispatch after a commit: this actor has just been given `shard` (and may hold another one).
        node_id = actor_nodes[aid]
        if node_id not in by_id:
            return  # (cannot happen: the head has no CPU) never remove the driver's node
        t_rm = time.perf_counter()
        cluster.remove_node(by_id[node_id], allow_graceful=False)
        removed.update({"node": node_name(node_id), "node_id": node_id, "while_dispatching": shard,
                        "after_commits": sorted(commits), "remove_s": round(time.perf_counter() - t_rm, 2),
                        "processes_alive": by_id[node_id].any_processes_alive()})
        SUMMARY.setdefault("fault_log", []).append([round(time.perf_counter() - t, 2), "removed", names[node_id]])
        _save(work)
        # The driver looks again only after the lost actor's calls have failed and the survivors have finished
        # the shards they hold (as on a big run, where shards take minutes and a node dies mid-way): it then meets
        # the failure with shards still queued and no live actor free, the case where a replacement actor that
        # the cluster has no room for must not be handed shards.
        time.sleep(args.notice_after)

    t = time.perf_counter()
    err = None
    freport = None
    SUMMARY["phases"]["fault"] = {"started": True}  # replaced when it ends; left as is if it hangs
    _save(work)
    if args.fault_timeout:
        faulthandler.dump_traceback_later(args.fault_timeout, exit=True, file=sys.stderr)
    try:
        (freport,) = pool.precompute(fjob, progress=False, on_dispatch=on_dispatch, on_commit=on_commit)
    except Exception as e:  # recorded: the test asserts on it
        err = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    faulthandler.cancel_dump_traceback_later()
    fault = {"seconds": round(time.perf_counter() - t, 1), "error": err, "removed": removed,
             "dispatched": dispatched, "commits": {str(k): c for k, c in sorted(commits.items())}}
    if freport is not None:
        fdir = freport.cache
        files, ref_files = _shard_files(fdir), _shard_files(ref_dir)
        fm = json.loads(Path(fdir, "manifest.json").read_text())
        v = verify_cache(fdir, sample=6)
        actors = [a for a in _actors("PrecomputeActor") if a["actor_id"] not in seen_actor_ids]
        fault.update({
            "cache": fdir,
            "same_relpath": os.path.relpath(fdir, work / "cache_fault") == os.path.relpath(ref_dir, work / "cache"),
            "num_shards": freport.shards, "computed": freport.computed, "retried": freport.retried,
            "actors_replaced": freport.actors_replaced,
            "manifest_complete": fm["complete"], "manifest_shards_equal": fm["shards"] == m["shards"],
            "files": sorted(files), "bytes_equal": files == ref_files,
            "verify": {"ok": v["ok"], "checked": v["checked"], "problems": v["problems"]},
            "actor_nodes": [[node_name(a["node_id"]), a["state"]] for a in actors],
        })
    fault["nodes_alive"] = sorted(names.get(n["NodeID"], n["NodeID"]) for n in ray.nodes() if n["Alive"])
    SUMMARY["phases"]["fault"] = fault
    SUMMARY["seconds"] = round(time.perf_counter() - t0, 1)
    _save(work)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
