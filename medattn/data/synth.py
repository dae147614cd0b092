"""Write a synthetic ChestX-ray14 in the exact NIH layout (the embedded demo dataset).

The output reads like a real download (Kaggle layout):

  OUT/images_001/images/00000001_000.png ...   8-bit grey S x S PNGs (a few RGBA, like the real set)
  OUT/Data_Entry_2017_v2020.csv                v2020 formatting, sorted by patient then follow-up
  OUT/BBox_List_2017.csv                       boxes of 8 classes on test images, 1024-px coordinates
  OUT/train_val_list.txt, OUT/test_list.txt    patient-disjoint official-style split (~77/23)
  OUT/masks/<image id>                         lung masks (255 = lung), same size as the image
  OUT/.medattn-synth.json                      how it was made (marks the directory as synthetic)

The films show chest anatomy (lungs, heart, diaphragm, ribs, clavicles) and lesions whose look
depends on the finding, so a small CNN learns them and its attention can be checked against
the boxes. Output is byte-identical for a seed, whatever --workers. See docs/synthetic-data.md.

example:
  medattn synth --out demo-out/nih --images 1600 --size 1024 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from medattn import fileio
from medattn.data import _synth_meta as meta
from medattn.data.labels import BOX_CLASSES, DISEASES, NO_FINDING
from medattn.progress import Progress
from medattn.errors import ConfigError, DataError

MARKER = ".medattn-synth.json"
DATA_ENTRY = "Data_Entry_2017_v2020.csv"
BBOX_LIST = "BBox_List_2017.csv"
MIN_SIZE = 64
MAX_SIZE = 4096
MAX_IMAGES = 10_000_000


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medattn synth``."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (created; replaced if it holds an earlier synth output)")
    parser.add_argument("--images", type=int, default=1600, metavar="N", help="number of images (default 1600)")
    parser.add_argument("--size", type=int, default=1024, metavar="S",
                        help="image side in pixels (default 1024, like NIH; boxes stay in 1024-px units)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="processes drawing images (default: all usable cores)")


def _check_args(n_images: int, size: int, seed: int, workers: int | None) -> int:
    if not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"--images must be at least 1 (got {n_images!r})")
    if n_images > MAX_IMAGES:
        raise ConfigError(f"--images must be at most {MAX_IMAGES} (got {n_images})")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels (got {size!r}); "
                          f"lesions are not drawable below {MIN_SIZE} px")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer (got {seed!r})")
    if workers is None:
        return _default_workers()
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers!r})")
    return workers


def is_synth_output(path: Path) -> bool:
    """True if ``path`` is a directory written by ``medattn synth`` (it has the marker file)."""
    try:
        return json.loads((path / MARKER).read_text()).get("generator") == "medattn synth"
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "--out exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_synth_output(out):
        raise DataError(out, f"--out is not empty and was not written by `medattn synth` (no {MARKER}); "
                             "choose a new or empty directory, so that nothing of yours is overwritten")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise DataError(parent, "parent of --out is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)   # `--out demo-out/nih` on a fresh checkout
    except OSError as e:
        raise DataError(parent, f"cannot create the parent directory of --out: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise DataError(parent, "parent directory of --out is not writable")


def _jobs(rows: list[meta.ImageMeta], root: Path, seed: int, size: int) -> list[dict]:
    by_patient: dict[int, list[meta.ImageMeta]] = {}
    for r in rows:
        by_patient.setdefault(r.patient, []).append(r)
    jobs = []
    for p, imgs in by_patient.items():
        imgs.sort(key=lambda r: r.follow_up)
        jobs.append({"root": str(root), "seed": seed, "size": size, "patient": p, "sex": imgs[0].sex,
                     "age": imgs[0].age,
                     "images": [{"index": r.index, "path": f"{meta.archive_of(r.index)}/images/{r.image}",
                                 "mask": f"masks/{r.image}", "labels": r.labels, "carried": r.carried,
                                 "view": r.view, "rgba": r.rgba} for r in imgs]})
    # big patients first: better load balance over the pool
    jobs.sort(key=lambda j: -len(j["images"]))
    return jobs


def _draw_all(jobs: list[dict], workers: int, progress: Progress) -> dict[int, dict]:
    from medattn.data._synth_worker import run_patient

    boxes: dict[int, dict] = {}
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            for idx, b in run_patient(job):
                boxes[idx] = b
            progress.update(len(job["images"]))
        return boxes
    import multiprocessing as mp
    # forkserver/spawn, not fork: the caller may hold threads (torch, pytest plugins).
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
        for res in pool.imap_unordered(run_patient, jobs, chunksize=1):
            for idx, b in res:
                boxes[idx] = b
            progress.update(len(res))
    return boxes


def generate(out: str | os.PathLike, n_images: int = 1600, size: int = 1024, seed: int = 0,
             workers: int | None = None, progress: bool = False) -> dict:
    """Write a synthetic ChestX-ray14 in the NIH layout to ``out``.

    The directory is built beside ``out`` and renamed into place at the end, so an
    interrupted run leaves nothing half-written; an earlier synth output at ``out`` is replaced.

    Args:
        out: output directory (must be new, empty, or an earlier synth output).
        n_images: number of images (>= 1).
        size: image side in pixels (64-4096); box coordinates are always in 1024-px units.
        seed: random seed; the bytes written depend only on (seed, n_images, size).
        workers: drawing processes (default: all usable cores); does not change the output.
        progress: print a progress line on stderr.

    Returns:
        Summary dict: out, images, patients, size, seed, train_val, test, boxes, box_images,
        rgba, labels (image count per label), test_labels, seconds.

    Raises:
        ConfigError: bad ``n_images``, ``size``, ``seed`` or ``workers``.
        DataError: ``out`` exists and is not an empty directory or an earlier synth output.
    """
    t0 = time.perf_counter()
    workers = _check_args(n_images, size, seed, workers)
    out = Path(out)
    _check_out(out)

    rows = meta.plan_patients(n_images, seed)
    meta.split_patients(rows, seed)
    meta.choose_extras(rows, seed)

    parent = out.parent if str(out.parent) else Path(".")
    tmp = parent / f".{out.name}.synth-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        (tmp / "masks").mkdir()
        for arch in sorted({meta.archive_of(r.index) for r in rows}):
            (tmp / arch / "images").mkdir(parents=True)
        # a bar on a terminal; with progress off (tests, the Python API) nothing is printed
        with Progress(len(rows), "medattn synth", unit="images", enabled=progress) as bar:
            boxes = _draw_all(_jobs(rows, tmp, seed, size), workers, bar)

        box_list = meta.box_rows(rows, boxes)
        (tmp / DATA_ENTRY).write_bytes(meta.data_entry_text(rows).encode("ascii"))
        (tmp / BBOX_LIST).write_bytes(meta.bbox_text(box_list).encode("ascii"))
        (tmp / "train_val_list.txt").write_bytes(
            meta.list_text([r.image for r in rows if r.split == "train_val"]).encode("ascii"))
        (tmp / "test_list.txt").write_bytes(meta.list_text([r.image for r in rows if r.split == "test"]).encode("ascii"))

        labels = Counter(lab for r in rows for lab in (r.labels or [NO_FINDING]))
        test_labels = Counter(lab for r in rows if r.split == "test" for lab in (r.labels or [NO_FINDING]))
        summary = {
            "generator": "medattn synth", "format_version": 1,
            "images": len(rows), "patients": len({r.patient for r in rows}), "size": size, "seed": seed,
            "train_val": sum(r.split == "train_val" for r in rows), "test": sum(r.split == "test" for r in rows),
            "boxes": len(box_list), "box_images": len({b[0] for b in box_list}),
            "rgba": sum(r.rgba for r in rows),
            "labels": {lab: labels.get(lab, 0) for lab in DISEASES + (NO_FINDING,)},
            "test_labels": {lab: test_labels.get(lab, 0) for lab in DISEASES + (NO_FINDING,)},
        }
        # the marker carries no time or path, so two runs stay byte-identical
        (tmp / MARKER).write_text(json.dumps(summary, indent=1) + "\n")

        fileio.publish(tmp, out)  # the old folder (if any) stays whole until the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = dict(summary, out=str(out), seconds=round(time.perf_counter() - t0, 2))
    return summary


def format_summary(s: dict) -> str:
    """Short human-readable summary of ``generate``'s result."""
    box_counts = ", ".join(f"{c} {s['test_labels'][c]}" for c in DISEASES)
    return "\n".join([
        f"wrote {s['images']} synthetic images ({s['patients']} patients, {s['size']}x{s['size']} px, "
        f"seed {s['seed']}) to {s['out']} in {s['seconds']:.1f} s",
        f"  split: train_val {s['train_val']} / test {s['test']} images (patient-disjoint)",
        f"  boxes: {s['boxes']} on {s['box_images']} test images ({len(BOX_CLASSES)} classes); "
        f"RGBA images: {s['rgba']}; No Finding: {s['labels'][NO_FINDING]}",
        f"  test positives: {box_counts}",
    ])


def run(args: argparse.Namespace) -> int:
    """``medattn synth``: generate and print the summary."""
    summary = generate(args.out, n_images=args.images, size=args.size, seed=args.seed, workers=args.workers,
                       progress=sys.stderr.isatty())
    print(format_summary(summary))
    return 0
