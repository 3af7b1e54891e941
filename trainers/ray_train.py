"""Detector training on Ray Train (`TorchTrainer`, Train V2): DDP over workers, a checkpoint per epoch.

Each worker builds the data set and the detector itself (nothing big travels through the driver), reads its
shard of the images through a `DistributedSampler`, and trains with the same `train_one_epoch` as local
training. Rank 0 reports a checkpoint after every epoch (model, optimizer, scheduler, epoch, history); a worker
group that dies is restarted by Ray Train from the last checkpoint (`FailureConfig(max_failures)`), and calling
`fit_on_ray` again with the same storage path and name resumes the run (see shared/RAY_NOTES.md).

The driver evaluates the final model afterwards: evaluation is a single pass that does not need DDP.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from curriculum.config import TrainJobConfig, config_from_dict, to_dict

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from curriculum.data import collate_fn
    from teachers.zoo import build_detector
    from trainers.train import (build_dataset, load_train_state, make_optimizer, make_scheduler, seed_everything,
                                train_one_epoch, TRAIN_STATE_FORMAT)

    job: TrainJobConfig = config_from_dict(TrainJobConfig, loop_config["job"])
    t = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if loop_config.get("threads_per_worker"):
        torch.set_num_threads(loop_config["threads_per_worker"])
    seed_everything(t.seed)
    ds = build_dataset(job.data, "train", seed=t.seed)
    model = build_detector(job.model.name, ds.num_classes, image_size=job.data.image_size, **job.model.overrides())
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed, drop_last=True)
    per_worker = max(1, t.batch_size // world)  # batch_size is the global batch
    loader = DataLoader(ds, batch_size=per_worker, sampler=sampler, collate_fn=collate_fn, drop_last=True,
                        num_workers=job.data.workers)
    iters = min(len(loader), t.max_iters_per_epoch or len(loader))
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    opt = make_optimizer(ddp_model.parameters(), t)
    sched = make_scheduler(opt, t, iters * t.epochs)
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_train_state(Path(d) / STATE_FILE)
        model.load_state_dict(state["model"]["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = json.loads(state["history"])
        start = state["epoch"] + 1
    for epoch in range(start, t.epochs):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(ddp_model, loader, opt, sched, t, epoch, progress=rank == 0)
        history.append({"epoch": epoch + 1, **stats})
        metrics = {"epoch": epoch + 1, "loss": stats["loss"], "images_per_s_worker": stats["images_per_s"]}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({
                    "format": TRAIN_STATE_FORMAT, "epoch": epoch, "model": model.checkpoint(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "history": json.dumps(history), "torch_rng": torch.get_rng_state(),
                }, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)


def fit_on_ray(
    job: TrainJobConfig,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    threads_per_worker: int = 1,
    max_failures: int = 2,
    storage_path: str | None = None,
    name: str = "train",
) -> dict[str, Any]:
    """Train `job` on Ray Train; returns the final training state (model checkpoint dict, history).

    Resumes when a run with this `storage_path`/`name` exists (a killed job started again goes on from its
    last reported epoch).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.train import load_train_state

    storage = storage_path or str(Path(job.output_dir).resolve() / "ray")
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": to_dict(job), "threads_per_worker": threads_per_worker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=name,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {storage}/{name} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        return load_train_state(Path(d) / STATE_FILE)
