"""Per-step overheads of a distilled step on the CPU that are not the loss's arithmetic, each timed alone (2 threads by
default), with the choice the code makes beside the one it replaced:

- optimizer: AdamW's update over the built-in student's parameters, and with MGD's connectors on 32 components
  (five 1x1 aligns and ten 3x3 generation convolutions), `foreach` against the fused kernel `make_optimizer` uses;
- check_finite: `TeacherTargets.check_finite` on a batch's five FPN levels (one sum per tensor first) against the
  exact per-image search alone (`teachers.targets._bad_images` on every level, what it ran every step before);
- second_thread: the student's forward and backward from the process's main thread, then from a second thread once
  the main thread has run torch's parallel operations (a second OpenMP thread pool), then from the main thread again.

Writes `bench/results/cpu_overheads.json` ({"optimizer_ms", "check_finite_us", "second_thread_ms", "machine"}) and
prints it.

    python bench/cpu_overheads.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def per_call(fn: Callable[[], Any], n: int, warmup: int = 5) -> float:
    """Seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def connector_params(levels: int = 5, student: int = 64, teacher: int = 32) -> list[torch.nn.Parameter]:
    """MGD's connector parameters on `teacher` components: per level a 1x1 align and two 3x3 generation convs."""
    mods = []
    for _ in range(levels):
        mods += [torch.nn.Conv2d(student, teacher, 1), torch.nn.Conv2d(teacher, teacher, 3, padding=1),
                 torch.nn.Conv2d(teacher, teacher, 3, padding=1)]
    return [p for m in mods for p in m.parameters()]


def optimizer_ms(params: list[torch.nn.Parameter], impl: str, n: int) -> float:
    from curriculum.config import TrainConfig
    from trainers.train import make_optimizer

    opt = make_optimizer([(f"p{i}", p) for i, p in enumerate(params)], TrainConfig(optimizer="adamw"))
    if impl == "foreach":
        for g in opt.param_groups:
            g["fused"], g["foreach"] = None, True
    for p in params:
        p.grad = torch.randn_like(p)
    return 1e3 * per_call(opt.step, n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student", default="fcos_mobilenetv3_micro")
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "cpu_overheads.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from teachers.targets import TeacherTargets, _bad_images
    from teachers.zoo import build_detector

    model = build_detector(args.student, 4)
    student = [p for p in model.parameters() if p.requires_grad]
    extra = connector_params()
    out: dict[str, Any] = {"optimizer_ms": {}}
    for impl in ("foreach", "fused"):
        alone = optimizer_ms(student, impl, 200)
        both = optimizer_ms(student + extra, impl, 200)
        out["optimizer_ms"][impl] = {"student": round(alone, 3), "student_and_connectors": round(both, 3)}
    out["optimizer_ms"]["tensors"] = {"student": len(student), "connectors": len(extra)}

    feats = {f"p{k}": torch.randn(8, 32, s, s) for k, s in zip(range(3, 8), (16, 8, 4, 2, 1))}
    tt = TeacherTargets(features=feats)
    out["check_finite_us"] = {
        "check_finite": round(1e6 * per_call(tt.check_finite, 2000), 1),
        "per_image_search": round(1e6 * per_call(lambda: [_bad_images(t) for t in feats.values()], 2000), 1)}

    images = [torch.rand(3, 128, 128) for _ in range(8)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])} for _ in images]

    def step() -> None:
        sum(model(images, targets).losses.values()).backward()

    def timed_in_thread(result: list[float]) -> None:
        torch.set_num_threads(args.threads)
        result.append(per_call(step, 20, warmup=3))

    main_first = per_call(step, 20, warmup=3)
    second: list[float] = []
    worker = threading.Thread(target=timed_in_thread, args=(second,))
    worker.start()
    worker.join()
    out["second_thread_ms"] = {"main_thread": round(1e3 * main_first, 1), "second_thread": round(1e3 * second[0], 1),
                               "main_thread_again": round(1e3 * per_call(step, 20, warmup=3), 1)}
    out["machine"] = f"{os.cpu_count()} CPUs, torch threads {args.threads}, torch {torch.__version__}"
    print(json.dumps(out, indent=2))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
