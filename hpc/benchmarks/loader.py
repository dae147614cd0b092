"""Loader throughput: DALI (GPU operators on CUDA, CPU operators otherwise) vs the PyTorch
DataLoader fallback, on the same prepared shards, with the training view (resize -> random crop
-> flip). Reports images/s and how many CPU cores each loader kept busy (process CPU time /
wall time, worker processes included).

  medattn bench loader --data PREP
  medattn bench loader --fake-data 8192 --fake-size 512 --batch 128 --device cuda
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from hpc.benchmarks.common import print_table, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="prepared directory (or use --fake-data)")
    p.add_argument("--fake-data", type=int, default=0, metavar="N", help="write N fake images to a temp dir")
    p.add_argument("--fake-size", type=int, default=256, help="prepared size of the fake images")
    p.add_argument("--loaders", default="dali,torch", help="comma list of dali, torch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed batches (after 3 warm-up batches)")
    p.add_argument("--workers", type=int, default=2, help="DALI CPU threads + external-source workers / DataLoader workers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--hires", action="store_true", help="also deliver the prepared image (AG-CNN crops)")


def _cpu_seconds() -> float:
    """CPU seconds of this process and all its live descendants (loader workers) plus reaped
    children, from /proc (Linux); falls back to getrusage elsewhere."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[1] = ppid; [11], [12] = utime, stime (after the comm field)
            stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        me = os.getpid()
        tree, frontier = {me}, [me]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, _) in stats.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        live = sum(stats[p][1] for p in tree if p in stats) / tick
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return live + kids.ru_utime + kids.ru_stime
    except (OSError, ValueError):
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime


def measure(ds, kind: str, device: torch.device, batch: int, image_size: int, resize: int, steps: int,
            workers: int, hires: bool = False) -> dict:
    from hpc.loader import TrainLoader, TrainPlan
    from medattn.config import load_config

    data = load_config("demo", [f"data.image_size={image_size}", f"data.resize={resize}",
                                f"data.num_workers={workers}"]).data
    idx = ds.indices("train")
    reps = -(-((steps + 3) * batch) // len(idx))  # enough epochs' worth of samples
    import numpy as np

    plan = TrainPlan(np.tile(idx, max(1, reps)), batch, 1, seed=0)
    loader = TrainLoader(ds, data, plan, 0, device, 0, hires=hires, kind=kind)
    it = iter(loader.epoch(0))
    for _ in range(3):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for _ in range(steps):
        b = next(it)
        n += b["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    ops = "GPU" if (kind == "dali" and device.type == "cuda") else "CPU"
    return {"loader": f"{kind} ({ops} ops)", "images_per_s": n / wall, "cpu_cores_busy": cpu / wall,
            "cores_per_1000_img_s": (cpu / wall) / (n / wall / 1000.0), "batch": batch, "steps": steps,
            "workers": workers, "view": f"{ds.image_size}->{resize}->{image_size}"}


def run(args: argparse.Namespace) -> int:
    from medattn.data.prepared import PreparedDataset
    from medattn.errors import MedattnError

    if not args.data and not args.fake_data:
        raise MedattnError("give --data PREP or --fake-data N")
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    tmp = None
    data = args.data
    if args.fake_data:
        from medattn.data.fake import write_fake_prepared

        tmp = tempfile.TemporaryDirectory(prefix="medattn-bench-")
        data = write_fake_prepared(Path(tmp.name) / "prep", n=args.fake_data, size=args.fake_size,
                                   splits=(0.9, 0.05, 0.05), shard_size=4096)
    ds = PreparedDataset.open(data)
    rows = []
    for kind in [k.strip() for k in args.loaders.split(",") if k.strip()]:
        rows.append(measure(ds, kind, device, args.batch, args.image_size, args.resize, args.steps, args.workers,
                            args.hires))
    print_table(rows, ["loader", "images_per_s", "cpu_cores_busy", "cores_per_1000_img_s", "batch", "workers", "view"])
    path = write_result("loader", rows, args.json_out, extra={"data": str(data), "device": str(device),
                                                               "threads": os.cpu_count()})
    if path:
        print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0
