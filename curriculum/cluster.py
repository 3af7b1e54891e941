"""Joining Ray, the same way for every command: as is when already initialised, the cluster of RAY_ADDRESS
(`ray job submit` sets it), or a local Ray with the configured resources."""

from __future__ import annotations

import os
from typing import Any

from curriculum.config import RayInitConfig


def ensure_ray(cfg: RayInitConfig | None = None) -> None:
    """Join Ray: as is when already initialised; the cluster of RAY_ADDRESS when set (`ray job submit` sets it);
    otherwise a local Ray with the configured logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayInitConfig()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
        return
    kw: dict[str, Any] = {}
    if cfg.num_cpus is not None:
        kw["num_cpus"] = cfg.num_cpus
    if cfg.num_gpus is not None:
        kw["num_gpus"] = cfg.num_gpus
    if cfg.object_store_memory is not None:
        kw["object_store_memory"] = cfg.object_store_memory
    ray.init(**kw)
