"""Zoo figures measured on this machine, side by side in one run.

For each detector: parameters, GFLOPs of one eval forward at the built-in resolution, and training
images/s (forward + backward + AdamW step on batches of the built-in data set, after warm-up steps).
With --ap RUNS_DIR it also reads the val AP of trained runs (`curriculum train` output folders named
after the configs) into the table.

    python bench/zoo.py [--all] [--batch 8] [--steps 6] [--threads 2] [--out runs/bench/zoo.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from curriculum.config import DataConfig
from curriculum.data import collate_fn
from curriculum.shapes import ensure_builtin_data
from teachers.zoo import build_detector, count_gflops, count_parameters, list_detectors
from trainers.train import build_dataset


def train_speed(name: str, batches: list, num_classes: int, steps: int, warmup: int = 2) -> float:
    torch.manual_seed(0)
    model = build_detector(name, num_classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n, elapsed = 0, 0.0
    for i in range(warmup + steps):
        images, targets = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = sum(model(images, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
            n += len(images)
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="also the full-size members (slow on a CPU)")
    p.add_argument("--names", nargs="*", help="only these detectors")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ap", help="folder of `curriculum train` runs: runs/<config name>/eval.json")
    p.add_argument("--out", default="runs/bench/zoo.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = DataConfig()
    ensure_builtin_data(data)
    ds = build_dataset(data, "train")
    batches = [collate_fn([ds[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(4)]
    names = args.names or list_detectors(builtin_only=not args.all)
    ap = {}
    if args.ap:
        for ev in Path(args.ap).glob("*/eval.json"):
            cfg = (ev.parent / "config.yaml").read_text()
            name = next(line.split(":")[1].strip() for line in cfg.splitlines() if line.strip().startswith("name:"))
            ap[name] = json.loads(ev.read_text())
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, batch {args.batch}, {data.image_size} px")
    header = "| detector | params (M) | GFLOPs @128 | train img/s | val AP | AP50 |"
    lines = [header, "|---|---|---|---|---|---|"]
    print(header)
    for name in names:
        det = build_detector(name, ds.num_classes)
        params, gflops = count_parameters(det) / 1e6, count_gflops(det, 128)
        speed = train_speed(name, batches, ds.num_classes, args.steps)
        m = ap.get(name)
        row = (f"| {name} | {params:.2f} | {gflops:.2f} | {speed:.1f} | "
               + (f"{100 * m['AP']:.1f} | {100 * m['AP50']:.1f} |" if m else " - | - |"))
        rows.append(dict(name=name, params_m=params, gflops=gflops, train_img_s=speed,
                         ap=m["AP"] if m else None))
        lines.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
