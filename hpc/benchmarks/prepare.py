"""Prepare: decoding the original PNGs vs preparing shards (per format) vs reading the shards.

Measures, in images/s on this machine:
  (a) decode       PIL-decoding the original PNGs on --workers processes, with and without the
                   resize to --size: what a loader that reads the PNGs pays every epoch;
  (b) prepare      `medattn prepare` end to end (pool start, decode, resize, encode, write,
                   manifest) for each --formats entry, with size on disk and, for lossy
                   formats, the error against the raw pixels;
  (c) read         reading the prepared shards back in shuffled batches on one process:
                   PreparedDataset.read_batch for raw, PIL decode for png/jpeg.

The source images are read once before (a), so every stage sees a warm page cache. Prints a
table and writes a JSON record (machine, versions, command) under --json-out.

example:
  medattn bench prepare --nih-root /data/nih --size 512 --limit 2000 --formats raw,png,jpeg
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpc.benchmarks.common import print_table, write_result

READ_BATCH = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nih-root", required=True, metavar="DIR", help="NIH root (metadata + images)")
    p.add_argument("--size", type=int, default=512, metavar="S", help="prepared side (default 512)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images present (default: all)")
    p.add_argument("--formats", default="raw,png,jpeg", help="comma-separated pixel formats (default raw,png,jpeg)")
    p.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="JPEG quality (default 95)")
    p.add_argument("--png-level", type=int, default=1, metavar="L", help="PNG zlib level (default 1)")
    p.add_argument("--split", default="official", choices=("official", "chexnet", "random"),
                   help="split to prepare with (default official)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where the prepared copies go (default: a temporary directory, removed after)")


# ---------------------------------------------------------------- (a) decoding the originals
def _decode_only(path: str) -> float:
    """Decode one PNG; returns the CPU seconds it took."""
    from PIL import Image

    t0 = time.process_time()
    with Image.open(path) as im:
        im.load()
    return time.process_time() - t0


def _decode_resize(args: tuple[str, int]) -> float:
    """Decode one PNG, convert and resize it as prepare does; returns the CPU seconds."""
    from medattn.data.imagefiles import load_image

    t0 = time.process_time()
    load_image(args[0], args[1], 1, None)
    return time.process_time() - t0


def _timed_pool(fn, items: list, workers: int) -> tuple[float, float]:
    """(wall seconds, summed CPU seconds) for ``fn`` over ``items`` on a warm pool."""
    if workers == 1:
        t0 = time.perf_counter()
        cpu = sum(fn(it) for it in items)
        return time.perf_counter() - t0, cpu
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_noop, range(workers * 2))  # start and import before the clock runs
        t0 = time.perf_counter()
        cpu = sum(pool.map(fn, items, chunksize=max(1, len(items) // (workers * 16))))
        return time.perf_counter() - t0, cpu


def _noop(x: int) -> int:
    return x


def _warm(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            total += len(f.read())
    return total


# ---------------------------------------------------------------- (c) reading the shards
def _read_rate(prep: Path, seed: int = 0) -> tuple[float, float, int]:
    from medattn.data.prepared import PreparedDataset

    ds = PreparedDataset.open(prep)
    order = np.random.default_rng(seed).permutation(len(ds))
    ds.read_batch(order[:READ_BATCH])  # open the shards/memmaps before timing
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for a in range(0, len(order), READ_BATCH):
        b = ds.read_batch(order[a:a + READ_BATCH])
        n += len(b)
    return time.perf_counter() - t0, time.process_time() - c0, n


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _lossy_error(prep: Path, raw: Path) -> dict[str, float]:
    from medattn.data.prepared import PreparedDataset

    a, b = PreparedDataset.open(prep), PreparedDataset.open(raw)
    idx = np.arange(min(len(a), 200))
    x = a.read_batch(idx).astype(np.float64)
    y = b.read_batch(idx).astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    return {"max_abs_err": float(np.abs(x - y).max()),
            "psnr_db": "lossless" if mse == 0 else round(float(10 * np.log10(255.0 ** 2 / mse)), 2)}


def _versions() -> dict[str, str]:
    import PIL
    import pyarrow

    return {"pillow": PIL.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}


def run(args: argparse.Namespace) -> int:
    from medattn.data._sources import nih_table
    from medattn.data.prepare import _resolve_workers, prepare_source
    from medattn.errors import ConfigError

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("raw", "png", "jpeg")]
    if bad:
        raise ConfigError(f"--formats: unknown format(s) {bad} (expected raw, png, jpeg)")
    workers = _resolve_workers(args.workers)
    table = nih_table(args.nih_root, split=args.split, allow_missing=True, limit=args.limit)
    paths = table.records["path"].tolist()
    n = len(paths)
    src_bytes = _warm(paths)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []

    def row(stage: str, fmt: str, secs: float, cpu: float, count: int, **kw: Any) -> None:
        # images_per_cpu_s is what one core does: unlike wall time it does not depend on what
        # else the machine runs, and x cores gives the rate of an x-core node (no I/O bound).
        rows.append({"stage": stage, "format": fmt, "workers": kw.pop("workers", workers), "images": count,
                     "seconds": round(secs, 3), "images_per_s": round(count / secs, 1) if secs > 0 else None,
                     "cpu_s": round(cpu, 3), "images_per_cpu_s": round(count / cpu, 1) if cpu > 0 else None,
                     **kw})

    # (a) the training-time alternative: decode (and resize) every original PNG
    row("decode original PNG", "png (source)", *_timed_pool(_decode_only, paths, workers), n,
        bytes_per_image=round(src_bytes / n), disk_MB=round(src_bytes / 1e6, 1))
    row(f"decode+resize original PNG to {args.size}", "png (source)",
        *_timed_pool(_decode_resize, [(p, args.size) for p in paths], workers), n)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="medattn-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        preps: dict[str, Path] = {}
        for fmt in formats:
            out = work / f"prep-{fmt}-{args.size}"
            if out.exists():
                shutil.rmtree(out)
            # (b) preparing, end to end
            res = prepare_source(table, out, size=args.size, workers=workers, pixel_format=fmt,
                                 jpeg_quality=args.jpeg_quality, png_level=args.png_level,
                                 require_splits=False, progress=False)
            preps[fmt] = out
            size = _dir_bytes(out)
            extra: dict[str, Any] = {"bytes_per_image": round(size / n), "disk_MB": round(size / 1e6, 1)}
            if fmt == "jpeg":
                extra["quality"] = args.jpeg_quality
            if fmt == "png":
                extra["quality"] = f"zlib {args.png_level}"
            row("prepare (end to end)", fmt, res.seconds, res.cpu_seconds, n, **extra)
        for fmt in formats:
            # (c) reading the prepared shards back (shuffled, batches of READ_BATCH, 1 process)
            secs, cpu, cnt = _read_rate(preps[fmt])
            extra = {}
            if fmt != "raw" and "raw" in preps:
                extra = _lossy_error(preps[fmt], preps["raw"])
            row("read shards (shuffled)", fmt, secs, cpu, cnt, workers=1, **extra)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    cols = ["stage", "format", "workers", "images", "seconds", "images_per_s", "images_per_cpu_s", "bytes_per_image",
            "disk_MB", "quality", "max_abs_err", "psnr_db"]
    print(f"medattn bench prepare: {n} images from {args.nih_root}, size {args.size}, "
          f"{workers} worker(s), {os.cpu_count()} CPU(s)")
    print_table(rows, cols)
    path = write_result("prepare", rows, args.json_out,
                        extra={"settings": {"nih_root": str(args.nih_root), "size": args.size, "workers": workers,
                                            "limit": args.limit, "images": n, "formats": formats,
                                            "jpeg_quality": args.jpeg_quality, "png_level": args.png_level},
                               "versions": _versions(),
                               # other jobs on the machine skew every figure: keep the evidence
                               "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
    if path:
        print(f"wrote {path}")
    return 0
