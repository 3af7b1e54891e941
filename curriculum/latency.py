"""`curriculum latency`: milliseconds per image of detectors, eager PyTorch and onnxruntime, side by side.

Each model runs on random inputs of its input size (`curriculum.export.input_size`) after warm-up runs; the median
and the 90th percentile of the per-image times are reported, with the threads used. onnxruntime runs the graph of
`curriculum export` (batch 1), exported to a temporary file; without the `export` extra only eager is measured.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from curriculum.errors import ConfigError


def _stats(seconds: list[float], per: int) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0 / per
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "runs": len(ms)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eager_latency(detector: torch.nn.Module, size: tuple[int, int], device: str = "cpu", batch: int = 1,
                  runs: int = 20, warmup: int = 3) -> dict[str, float]:
    detector = detector.eval().to(device)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *size, generator=g).to(device) for _ in range(batch)]
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            _sync(device)
            t0 = time.perf_counter()
            detector.predict(images)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return _stats(times, batch)


def onnx_latency(path: str | Path, size: tuple[int, int], device: str = "cpu", threads: int = 0, runs: int = 20,
                 warmup: int = 3) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError("onnxruntime has no CUDA provider here: install onnxruntime-gpu, or use --device cpu")
    session = ort.InferenceSession(str(path), opts, providers=providers)
    x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _stats(times, 1)


def has_onnxruntime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def measure(detector: torch.nn.Module, size: tuple[int, int], device: str = "cpu", threads: int = 1,
            batch: int = 1, runs: int = 20, onnx: bool | None = None) -> dict[str, Any]:
    """Latency of one detector: eager, and onnxruntime when the extra is installed (`onnx` None) or asked."""
    from curriculum.export import export_detector

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device here")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        row: dict[str, Any] = {"input": [batch, 3, *size], "device": device, "threads": threads,
                               "eager_ms": eager_latency(detector, size, device, batch, runs)}
        if onnx or (onnx is None and has_onnxruntime()):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                export_detector(detector.cpu(), "onnx", path, size, check=False)
                row["onnxruntime_ms"] = onnx_latency(path, size, device, threads, runs)
    finally:
        torch.set_num_threads(previous)
    return row


def latency_of_checkpoints(checkpoints: Sequence[str | Path], device: str = "cpu", threads: int = 1, batch: int = 1,
                           runs: int = 20, image_size: tuple[int, int] | None = None,
                           trust: bool = False) -> list[dict[str, Any]]:
    """`curriculum latency`: one row per checkpoint."""
    from curriculum.export import input_size
    from teachers.zoo import load_detector, read_checkpoint

    rows = []
    for c in checkpoints:
        size = input_size(read_checkpoint(c, trust), image_size)
        det = load_detector(c, trust=trust)
        rows.append({"checkpoint": str(c), "name": det.config.name,
                     "label": f"{det.config.name} ({Path(c).parent.name}/{Path(c).name})",
                     **measure(det, size, device, threads, batch, runs)})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | input | device, threads | eager ms (median / p90) | onnxruntime ms (median / p90) |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        e, o = r["eager_ms"], r.get("onnxruntime_ms")
        lines.append(f"| {r.get('label', r['name'])} | {'x'.join(map(str, r['input']))} | {r['device']}, "
                     f"{r['threads']} | {e['median']:.1f} / {e['p90']:.1f} | "
                     + (f"{o['median']:.1f} / {o['p90']:.1f} |" if o else "- |"))
    return "\n".join(lines)
