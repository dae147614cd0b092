"""Decode, convert and resize every image once, into a few large pixel shards + manifest.parquet.

One pass over the source PNGs on all cores: each worker process decodes, converts (RGBA → gray,
16 → 8 bit) and resizes (LANCZOS) its images; the main process appends them to shards of
--shard-size images. The output is the prepared directory of docs/data-format.md §2, which
training, evaluation and `medattn bench` read through PreparedDataset.

Interrupted? Run the same command again: finished shards are kept. dataset.json is written last,
so an unfinished directory is never taken for a complete one.

examples:
  medattn prepare --nih-root /data/nih --out /data/prep
  medattn prepare --nih-root /data/nih --out /data/prep256 --size 256 --split chexnet --workers 16
  medattn prepare --nih-root /data/nih-partial --out /tmp/prep --allow-missing
  medattn prepare --nih-root /data/nih --task nf_effusion --out /data/prep-ne --lung-model runs/lungseg
  medattn prepare --layout imagefolder --root /data/nofind_effusion --out /data/prep-ne --masks /data/masks
  medattn prepare --layout csv --root /data/aptos --out /data/prep-aptos --size 256
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from medattn.progress import Progress
from medattn.errors import DataError
from medattn.data._images import PIXEL_FORMATS, RESIZE_FILTER
from medattn.data._shards import (PARTIAL_DIR, SHARD_DIR, PartialState, SampleRecord, ShardWriter,
                                  default_shard_size, record_columns,
                                  remove_stale_partials, shard_name, write_manifest)
from medattn.data._masks import write_mask_store
from medattn.data.prepared import Prepared
from medattn.data._sources import SourceTable, nih_table

FORMAT_VERSION = 1
DEFAULT_SIZE = 512
DEFAULT_FORMAT = "raw"
DEFAULT_JPEG_QUALITY = 95
DEFAULT_PNG_LEVEL = 1
TASK_IMAGES = 8          # images per worker task: small enough to balance, big enough to amortise IPC


@dataclass
class PrepareResult:
    """What :func:`prepare` did.

    Attributes:
        out: the prepared directory.
        counts: images per split.
        skipped_missing: metadata rows skipped because their image is missing.
        conversions: ``{"rgba": n, "16bit": n, "not_1024": n}``.
        shards: number of shard files; ``resumed_shards`` of them were kept from an earlier run.
        processed: images decoded in this run; ``seconds`` wall time of this run;
            ``cpu_seconds`` CPU time of this run, main process and workers together.
        already_complete: the directory was already complete with the same settings.
    """

    out: Path
    counts: dict[str, int]
    skipped_missing: int
    conversions: dict[str, int]
    shards: int
    resumed_shards: int = 0
    processed: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    already_complete: bool = False
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return _summary(self)


# ====================================================================== Python API
def prepare(nih_root: str | Path, out: str | Path, *, size: int = DEFAULT_SIZE, split: str = "official",
            split_seed: int = 0, val_fraction: float | None = None, workers: int | None = None,
            allow_missing: bool = False, masks: str | Path | None = None,
            pixel_format: str = DEFAULT_FORMAT, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            png_level: int = DEFAULT_PNG_LEVEL, shard_size: int | None = None,
            limit: int | None = None, require_splits: bool = True, progress: bool | None = None,
            on_shard_done: Callable[[int], None] | None = None, layout: str = "nih",
            task: str | None = None, lung_model: str | Path | None = None) -> PrepareResult:
    """Prepare an NIH ChestX-ray14 root into ``out`` (see the module docstring).

    Args:
        nih_root: the NIH root directory.
        out: the prepared directory to write (must be empty, absent, or an interrupted run of
            the same command).
        size: output side S in pixels.
        split: ``official``, ``chexnet``, ``random`` or ``image-random`` (image-level, leaks patients).
        split_seed: seed for the validation carve-out / random split.
        val_fraction: validation share of patients (None: the splitter's default).
        workers: worker processes (None: all usable cores).
        allow_missing: skip metadata rows whose image file is missing.
        masks: lung-mask directory (default: ``nih_root/masks`` when present).
        pixel_format: ``raw`` (uint8 .npy), ``png`` or ``jpeg``.
        jpeg_quality: JPEG quality (jpeg only).
        png_level: zlib level (png only).
        shard_size: images per shard (None: ~1 GiB of raw pixels).
        limit: only the first N present images (benchmarks).
        require_splits: fail when a split ends up empty.
        progress: tqdm bar (True), log lines (False), or by whether stderr is a terminal (None).
        on_shard_done: called with the shard index after each shard is durable (tests).
        layout: ``nih`` (an NIH root), ``imagefolder`` (``train|val|test/<class>/*.png``;
            ``nih_root`` is that folder; single-label, the folders are the split) or ``csv``
            (DualAttendMed's ``train.csv``/``test.csv`` + ``*_images/``; see
            :mod:`medattn.data._source_csv`; ``split`` is ignored, ``val_fraction`` carves validation).
        task: a seed-002 subset of an NIH root: ``nf_effusion``, ``nf_pneumothorax`` or
            ``nf_effusion_pneumothorax`` (its own patient split, seeded by ``split_seed``).
        lung_model: a checkpoint file of a trained ``lungseg`` run: its predicted lung box
            of every image is stored in the manifest (run once, after the pixels are written).

    With more than one worker this starts processes (forkserver/spawn), so a script that calls
    it must do so under ``if __name__ == "__main__":``, as for any multiprocessing code.
    ``workers=1`` decodes in the calling process.
    """
    _check_options(size, pixel_format, jpeg_quality, png_level, shard_size, workers)
    if layout == "csv":
        from medattn.errors import ConfigError

        for flag, value in (("--task", task), ("--masks", masks), ("--lung-model", lung_model)):
            if value is not None:
                raise ConfigError(f"{flag} does not apply to --layout csv (fundus photos: no lung masks or NIH subsets)")
        from medattn.data._source_csv import csv_table

        table = csv_table(nih_root, split_seed=split_seed, val_fraction=val_fraction, allow_missing=allow_missing,
                          limit=limit)
    elif layout == "imagefolder":
        if task is not None:
            from medattn.errors import ConfigError

            raise ConfigError("--task builds a subset of an NIH root; it does not apply to --layout imagefolder")
        from medattn.data._source_imagefolder import imagefolder_table

        table = imagefolder_table(nih_root, masks=masks)
    elif task is not None:
        from medattn.data._source_tasks import task_table

        table = task_table(nih_root, task, split_seed=split_seed, allow_missing=allow_missing, masks=masks)
    else:
        table = nih_table(nih_root, split=split, split_seed=split_seed, val_fraction=val_fraction,
                          allow_missing=allow_missing, masks=masks, limit=limit)
    return prepare_source(table, out, size=size, workers=workers, pixel_format=pixel_format,
                          jpeg_quality=jpeg_quality, png_level=png_level, shard_size=shard_size,
                          require_splits=require_splits, progress=progress, on_shard_done=on_shard_done,
                          lung_model=lung_model)


def prepare_source(table: SourceTable, out: str | Path, *, size: int = DEFAULT_SIZE,
                   workers: int | None = None, pixel_format: str = DEFAULT_FORMAT,
                   jpeg_quality: int = DEFAULT_JPEG_QUALITY, png_level: int = DEFAULT_PNG_LEVEL,
                   shard_size: int | None = None, require_splits: bool = True,
                   progress: bool | None = None,
                   on_shard_done: Callable[[int], None] | None = None,
                   lung_model: str | Path | None = None) -> PrepareResult:
    """Write any :class:`SourceTable` as a prepared directory (the layout-independent part).

    Args: as :func:`prepare`; ``table`` says which images, labels and splits to store.
    """
    out = Path(out)
    _check_options(size, pixel_format, jpeg_quality, png_level, shard_size, workers)
    table.check(require_splits=require_splits)
    channels = table.channels
    shard_size = int(shard_size or default_shard_size(size, channels))
    settings = _settings(table, size, pixel_format, jpeg_quality, png_level, shard_size)
    lung_ckpt = None
    if lung_model is not None:
        lung_ckpt = Path(lung_model)
        if lung_ckpt.is_dir():
            raise DataError(lung_ckpt, "a run directory, not a checkpoint file (the `medattn prepare` command "
                                       "takes a run and picks its best checkpoint)")
        if not lung_ckpt.is_file():
            raise DataError(lung_ckpt, "--lung-model: no such lungseg run or checkpoint file")
        settings["lung_model"] = {"checkpoint": str(lung_ckpt), "sha256": _file_sha256(lung_ckpt)}

    done = _open_out(out, settings)
    if done is not None:
        return done

    t0 = time.perf_counter()
    n = len(table)
    n_shards = math.ceil(n / shard_size)
    state = PartialState(out)
    remove_stale_partials(out)
    finished: dict[int, tuple[dict[str, Any], list[SampleRecord]]] = {}
    for k in range(n_shards):
        cnt = min(shard_size, n - k * shard_size)
        got = state.load_done(k, shard_name(k, pixel_format), cnt)
        if got is not None:
            finished[k] = got
    pending = [k for k in range(n_shards) if k not in finished]
    resumed = len(finished)
    if resumed:
        _log(f"resuming {out}: {resumed} of {n_shards} shards already done")

    n_todo = sum(min(shard_size, n - k * shard_size) for k in pending)
    # No more processes than tasks: a small resume should not start 64 workers.
    nworkers = min(_resolve_workers(workers), max(1, math.ceil(n_todo / TASK_IMAGES)))
    _log(f"preparing {n} images ({n_todo} to decode) from {table.source.get('root')} -> {out}: "
         f"{size}px, {pixel_format}, {n_shards} shard(s) of <= {shard_size}, {nworkers} worker(s)")
    bar = Progress(n_todo, "medattn prepare", desc="prepare", unit="images", bar=progress)
    stats: dict[str, float] = {}
    cpu0 = time.process_time()
    shards = _write_shards(table, out, pending, shard_size, size, channels, pixel_format,
                           jpeg_quality, png_level, nworkers, bar, stats)
    # closing(): stop the worker pool as soon as anything goes wrong here (Ctrl-C, a bad image),
    # not when the generator happens to be garbage-collected.
    with contextlib.closing(shards), contextlib.closing(bar):
        for k, entry, recs in shards:
            state.mark_done(entry, recs)
            finished[k] = (entry, recs)
            if on_shard_done is not None:
                on_shard_done(k)

    extra_info: dict[str, Any] = {}
    # Lung masks as pixels (lung segmentation trains and is scored on them), then the lung
    # boxes a trained segmentation model predicts; both before the manifest and dataset.json.
    mask_entry = write_mask_store(out, _opt_str(table.records["mask_path"]), table.records["image"].tolist(),
                                  size, _resolve_workers(workers))
    if mask_entry is not None:
        extra_info["lung_masks"] = mask_entry
    lung_override = None
    if lung_ckpt is not None:
        from medattn.methods.lungseg import predict_lung_boxes

        reader = _shard_reader(out, finished, n_shards, size, channels, pixel_format)
        _log(f"predicting lung boxes with {lung_ckpt} ({n} images)")
        lung_override = predict_lung_boxes(reader.read_batch, n, lung_ckpt)
        extra_info["lung_boxes_from"] = {"kind": "model", **settings["lung_model"]}
    elif mask_entry is not None or table.has_masks:
        extra_info["lung_boxes_from"] = {"kind": "masks", "dir": table.settings.get("masks")}
    info = _finish(table, out, settings, finished, n_shards, size, pixel_format, lung_override, extra_info)
    secs = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + stats.get("worker_cpu_s", 0.0)
    return _result(out, info, resumed_shards=resumed, processed=n_todo, seconds=secs, cpu_seconds=cpu)


# ====================================================================== CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nih-root", "--root", dest="nih_root", required=True, metavar="DIR",
                   help="NIH ChestX-ray14 root: metadata CSV, split lists, box list and the images "
                        "(images/*.png, images_0NN/images/*.png or *.png); with --layout imagefolder, "
                        "the folder holding train/, val/ and test/; with --layout csv, the folder holding "
                        "train.csv, test.csv, train_images/ and test_images/")
    p.add_argument("--layout", choices=("nih", "imagefolder", "csv"), default="nih",
                   help="nih (default); imagefolder: train|val|test/<class>/*.png, single-label, class "
                        "order = sorted folder names (as torchvision's ImageFolder); csv: DualAttendMed's "
                        "filename,label CSVs (APTOS/DDR/Messidor-2), single-label, RGB kept, val = a seeded "
                        "--val-fraction (default 0.1) of each class of train.csv")
    p.add_argument("--task", choices=("nf_effusion", "nf_pneumothorax", "nf_effusion_pneumothorax"), default=None,
                   help="seed 002's single-label subsets of an NIH root: No Finding vs Effusion / Pneumothorax / "
                        "both, No Finding sampled 1:1 from other patients, patient split 60/20/20 seeded by "
                        "--split-seed")
    p.add_argument("--lung-model", default=None, metavar="RUN",
                   help="a trained lungseg run (or its checkpoint): store its predicted lung box per image")
    p.add_argument("--out", required=True, metavar="PREP", help="prepared directory to write")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="S",
                   help=f"output side in pixels (default {DEFAULT_SIZE})")
    p.add_argument("--split", choices=("official", "chexnet", "random", "image-random"), default=None,
                   help="official lists (+ val carved by patient), CheXNet 70/10/20 files, a "
                        "seeded random patient split (default official), or image-random: 70/10/20 of "
                        "the images (AG-CNN's and Wang et al.'s protocol; leaks patients, reported)")
    p.add_argument("--split-seed", type=int, default=0, metavar="K", help="split seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="validation share of patients (default 0.1): official, of the train_val "
                        "patients; random, of all patients (test stays 0.2); image-random, of all "
                        "images (test stays 0.2); not for chexnet")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: all usable cores)")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip metadata rows whose image file is missing (counted and reported)")
    p.add_argument("--masks", default=None, metavar="DIR",
                   help="lung masks <image id> (nonzero = lung) for lung boxes "
                        "(default: NIH_ROOT/masks when present)")
    p.add_argument("--format", dest="pixel_format", choices=PIXEL_FORMATS, default=DEFAULT_FORMAT,
                   help=f"pixel storage (default {DEFAULT_FORMAT}; see docs/benchmarks.md)")
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                   help=f"JPEG quality for --format jpeg (default {DEFAULT_JPEG_QUALITY})")
    p.add_argument("--png-level", type=int, default=DEFAULT_PNG_LEVEL, metavar="L",
                   help=f"zlib level 0-9 for --format png (default {DEFAULT_PNG_LEVEL})")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="images per shard (default: ~1 GiB of pixels, 4096 at 512 px)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def run(args: argparse.Namespace) -> int:
    from medattn.errors import ConfigError

    if args.split is not None and (args.layout in ("imagefolder", "csv") or args.task):
        raise ConfigError("--split does not apply to " + {
            "imagefolder": "--layout imagefolder (the folders are the split)",
            "csv": "--layout csv (test is test.csv, validation a seeded --val-fraction of train.csv)"}.get(
                args.layout, "--task (it makes its own patient split)"))
    if args.val_fraction is not None and (args.layout == "imagefolder" or args.task):
        raise ConfigError("--val-fraction does not apply to --layout imagefolder or --task")
    res = prepare(args.nih_root, args.out, size=args.size, split=args.split or "official",
                  split_seed=args.split_seed, layout=args.layout, task=args.task, lung_model=args.lung_model,
                  val_fraction=args.val_fraction, workers=args.workers, allow_missing=args.allow_missing,
                  masks=args.masks, pixel_format=args.pixel_format, jpeg_quality=args.jpeg_quality,
                  png_level=args.png_level, shard_size=args.shard_size,
                  progress=False if args.no_progress else None)
    if res.already_complete:
        print(f"{res.out} is already prepared with these settings; nothing to do")
    print(res)
    return 0


# ====================================================================== internals
def _check_options(size: int, pixel_format: str, jpeg_quality: int, png_level: int,
                   shard_size: int | None, workers: int | None) -> None:
    from medattn.errors import ConfigError

    if not 8 <= size <= 8192:
        raise ConfigError(f"--size {size}: must be between 8 and 8192")
    if pixel_format not in PIXEL_FORMATS:
        raise ConfigError(f"--format {pixel_format!r}: expected one of {', '.join(PIXEL_FORMATS)}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality {jpeg_quality}: must be 1-100")
    if not 0 <= png_level <= 9:
        raise ConfigError(f"--png-level {png_level}: must be 0-9")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be >= 1")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")


def _resolve_workers(workers: int | None) -> int:
    if workers:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _settings(table: SourceTable, size: int, pixel_format: str, jpeg_quality: int, png_level: int,
              shard_size: int) -> dict[str, Any]:
    """Everything that determines the output; a resume must match it exactly."""
    s: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": table.source,
        "split": table.split,
        "split_seed": table.split_seed,
        **table.settings,
        "image_size": size,
        "channels": table.channels,
        "pixel_format": pixel_format,
        "resize": RESIZE_FILTER,
        "shard_size": shard_size,
        "images": len(table),
        "table_sha256": table.digest(),
    }
    if pixel_format == "jpeg":
        s["jpeg_quality"] = jpeg_quality
    if pixel_format == "png":
        s["png_level"] = png_level
    return s


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:6]:
        a, b = old.get(k), new.get(k)
        if k == "table_sha256":
            parts.append("the list of images/splits differs")
        else:
            parts.append(f"{k}: {a!r} -> {b!r}")
    return "; ".join(parts)


def _open_out(out: Path, settings: dict[str, Any]) -> PrepareResult | None:
    """Decide between fresh start, resume, nothing-to-do and refusal for ``out``."""
    prepared = Prepared(out)
    state = PartialState(out)
    if prepared.exists():
        try:
            info = prepared.info()
        except DataError as e:
            raise DataError(None, f"{e}; delete {out} or choose another --out") from None
        old = info.get("prepare_settings")
        if old != settings:
            why = _diff(old or {}, settings) if old else "it was not written by this version"
            raise DataError(out, f"already holds a complete prepared dataset made differently ({why}); "
                                 "choose another --out or delete it")
        state.remove()  # a kill between dataset.json and the cleanup leaves it behind
        return _result(out, info, already_complete=True)
    if state.exists():
        old = state.settings()
        if old is None:
            # Killed before the settings were durable: nothing of value can be there yet.
            _clean_ours(out)
        elif old != settings:
            raise DataError(out / PARTIAL_DIR / "settings.json",
                            f"{out} holds an interrupted `medattn prepare` with other settings "
                            f"({_diff(old, settings)}): re-run that command to finish it, or delete {out}")
        else:
            return None
    elif out.exists():
        if not out.is_dir():
            raise DataError(out, "--out exists and is not a directory")
        if any(out.iterdir()):
            raise DataError(out, "--out exists and is not empty (and holds no interrupted "
                                 "`medattn prepare`); choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    state.start(settings)
    return None


def _clean_ours(out: Path) -> None:
    import shutil

    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    d = out / SHARD_DIR
    if d.is_dir():
        for p in d.glob("pixels-*"):
            p.unlink(missing_ok=True)
    Prepared(out).remove_outputs()


# ---------------------------------------------------------------- workers
_W: dict[str, Any] = {}


def _init_worker(cfg: dict[str, Any]) -> None:
    # Ctrl-C goes to the whole process group; the main process handles it and terminates the
    # pool, so workers must not die with their own tracebacks first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _W.clear()
    _W.update(cfg)


def _work(task: list[tuple[int, str, str | None, str]]) -> tuple[float, list[tuple]]:
    """Load + encode a few images.

    Returns the CPU seconds spent (contention-proof throughput figures) and the result
    tuples, or a single ("error", ...) tuple.
    """
    from medattn.data._images import ImageDecodeError, encode
    from medattn.data.imagefiles import load_image, mask_box

    t0 = time.process_time()
    out: list[tuple] = []
    for pos, path, mask_path, ref in task:
        try:
            im = load_image(path, _W["size"], _W["channels"], _W["expected_size"])
        except FileNotFoundError:
            return 0.0, [("error", pos, path, ref, "image file disappeared during prepare")]
        except ImageDecodeError as e:
            return 0.0, [("error", pos, path, ref, str(e))]
        lung = None
        if mask_path is not None:
            try:
                lung = mask_box(mask_path)
            except (FileNotFoundError, ImageDecodeError) as e:
                return 0.0, [("error", pos, mask_path, ref, f"lung mask: {e}")]
        payload = encode(im.pixels, _W["pixel_format"], _W["jpeg_quality"], _W["png_level"])
        out.append(("ok", pos, payload, im.orig_width, im.orig_height, im.conversion, lung))
    return time.process_time() - t0, out


def _opt_str(col: pd.Series) -> list[str | None]:
    """Values as str, None where missing (pandas 3 turns None into NaN in string columns)."""
    return [v if isinstance(v, str) else None for v in col.tolist()]


def _tasks(table: SourceTable, pending: list[int], shard_size: int) -> Iterator[list[tuple]]:
    recs = table.records
    paths = recs["path"].tolist()
    masks = _opt_str(recs["mask_path"])
    refs = recs["ref"].tolist()
    n = len(recs)
    for k in pending:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        for a in range(lo, hi, TASK_IMAGES):
            b = min(hi, a + TASK_IMAGES)
            yield [(i, paths[i], masks[i], refs[i]) for i in range(a, b)]


def _write_shards(table: SourceTable, out: Path, pending: list[int], shard_size: int, size: int,
                  channels: int, pixel_format: str, jpeg_quality: int, png_level: int, nworkers: int,
                  bar: Progress, stats: dict[str, float]
                  ) -> Iterator[tuple[int, dict[str, Any], list[SampleRecord]]]:
    """Decode the pending shards' images on ``nworkers`` processes; yield each shard when durable.

    ``stats["worker_cpu_s"]`` accumulates the CPU time of the worker processes.
    """
    if not pending:
        return
    cfg = {"size": size, "channels": channels, "expected_size": table.expected_size,
           "pixel_format": pixel_format, "jpeg_quality": jpeg_quality, "png_level": png_level}
    n = len(table)
    tasks = _tasks(table, pending, shard_size)
    pool = None
    if nworkers > 1:
        # forkserver/spawn, not fork: the main process may hold pyarrow/pandas threads, and
        # forking a threaded process can deadlock. Preloading this module in the fork server
        # pays the numpy/pandas/PIL imports once, not once per worker.
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["medattn.data.prepare", "medattn.data._images"])
        else:
            ctx = mp.get_context("spawn")
        pool = ctx.Pool(nworkers, initializer=_init_worker, initargs=(cfg,))
        results: Iterator[tuple[float, list[tuple]]] = pool.imap(_work, tasks, chunksize=1)
    else:
        _W.clear()
        _W.update(cfg)
        results = map(_work, tasks)
    images = table.records["image"].tolist()
    writer: ShardWriter | None = None
    try:
        for k in pending:
            lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
            writer = ShardWriter(out, k, hi - lo, pixel_format, (size, size, channels))
            while len(writer.records) < hi - lo:
                cpu, batch = next(results)
                if pool is not None:
                    stats["worker_cpu_s"] = stats.get("worker_cpu_s", 0.0) + cpu
                for r in batch:
                    if r[0] == "error":
                        _, pos, path, ref, msg = r
                        raise DataError(path, f"{msg} (image {images[pos]}, {ref}); replace the file "
                                              "and run the same command again to resume")
                    _, pos, payload, ow, oh, conv, lung = r
                    if pos != lo + len(writer.records):
                        raise RuntimeError(f"sample {pos} arrived out of order")
                    writer.add(payload, ow, oh, conv, lung)
                bar.update(len(batch))
            entry = writer.finish()
            recs = writer.records
            writer = None
            yield k, entry, recs
    finally:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()


# ---------------------------------------------------------------- manifest and dataset.json
def _manifest_columns(table: SourceTable, finished: dict[int, tuple[dict[str, Any], list[SampleRecord]]],
                      n_shards: int, lung_override: list[list[float] | None] | None = None):
    recs = table.records
    n = len(recs)
    records = [r for k in range(n_shards) for r in finished[k][1]]
    shards = [k for k in range(n_shards) for _ in finished[k][1]]
    if len(records) != n:
        raise RuntimeError(f"shards hold {len(records)} samples, the table has {n}")
    where = record_columns(records, shards)
    if lung_override is not None:
        where["lung_box"] = list(lung_override)
    age = recs["age"].to_numpy(dtype=np.float64)
    cols = {
        "index": np.arange(n, dtype=np.int64),
        "image": recs["image"].tolist(),
        "patient": recs["patient"].tolist(),
        "split": recs["split"].tolist(),
        "labels": [np.asarray(v, dtype=np.uint8) for v in recs["labels"]],
        "target": recs["target"].to_numpy(dtype=np.int64),
        "finding_labels": recs["finding_labels"].tolist(),
        "age": [None if np.isnan(a) else float(a) for a in age],
        "sex": _opt_str(recs["sex"]),
        "view": _opt_str(recs["view"]),
        "boxes": recs["boxes"].tolist(),
        **where,
    }
    return cols, where["conversion"], where["lung_box"]


def _finish(table: SourceTable, out: Path, settings: dict[str, Any],
            finished: dict[int, tuple[dict[str, Any], list[SampleRecord]]], n_shards: int, size: int,
            pixel_format: str, lung_override: list[list[float] | None] | None = None,
            extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write manifest.parquet (tmp + rename), then dataset.json (last), then drop .partial."""
    from medattn.version import __version__

    cols, conv, lung = _manifest_columns(table, finished, n_shards, lung_override)
    write_manifest(out, cols)

    conversions = {"rgba": 0, "16bit": 0, "not_1024": 0}
    for c in conv:
        for part in filter(None, c.split("+")):
            conversions[part] = conversions.get(part, 0) + 1
    info = {
        "format_version": FORMAT_VERSION,
        "source": table.source,
        "task": table.task,
        "label_names": table.label_names,
        "eval_labels": table.eval_labels,
        "split": table.split,
        "split_seed": table.split_seed,
        "counts": table.counts(),
        "split_protocol": table.split_protocol(),
        "image_size": size,
        "channels": table.channels,
        "pixel_format": pixel_format,
        "shards": [{"path": finished[k][0]["path"], "count": finished[k][0]["count"],
                    "bytes": finished[k][0]["bytes"]} for k in range(n_shards)],
        "skipped_missing": table.skipped_missing,
        "conversions": conversions,
        "has_lung_boxes": any(v is not None for v in lung),
        # generated images (a `medattn synth` root): checkpoints carry it, `predict` warns on it
        "synthetic": _synthetic_root(table.source.get("root")),
        "resize": RESIZE_FILTER,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "medattn_version": __version__,
        "prepare_settings": settings,
        **(extra_info or {}),
    }
    Prepared(out).write_info(info)
    PartialState(out).remove()
    return info


def _synthetic_root(root: str | None) -> bool:
    from medattn.data.synth import is_synth_output

    return bool(root) and is_synth_output(Path(root))


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_reader(out: Path, finished: dict[int, tuple[dict[str, Any], list[SampleRecord]]], n_shards: int,
                  size: int, channels: int, pixel_format: str):
    """A PreparedDataset over the finished shards, before the manifest exists (for the lung model)."""
    from medattn.data.prepared import PreparedDataset

    rows = [(k, r.slot, r.offset, r.nbytes) for k in range(n_shards) for r in finished[k][1]]
    man = pd.DataFrame(rows, columns=["shard", "slot", "offset", "nbytes"])
    info = {"shards": [finished[k][0] for k in range(n_shards)], "pixel_format": pixel_format,
            "image_size": size, "channels": channels}
    return PreparedDataset(root=out, info=info, manifest=man)


def _result(out: Path, info: dict[str, Any], **kw: Any) -> PrepareResult:
    return PrepareResult(out=out, counts=dict(info.get("counts", {})),
                         skipped_missing=int(info.get("skipped_missing", 0)),
                         conversions=dict(info.get("conversions", {})),
                         shards=len(info.get("shards", [])), info=info, **kw)


def _summary(r: PrepareResult) -> str:
    c = r.counts
    conv = ", ".join(f"{k} {v}" for k, v in r.conversions.items())
    s = (f"prepared {sum(c.values())} images -> {r.out} (train {c.get('train', 0)}, val {c.get('val', 0)}, "
         f"test {c.get('test', 0)}); {r.shards} shard(s)")
    if r.resumed_shards:
        s += f", {r.resumed_shards} kept from an interrupted run"
    s += f"; conversions: {conv}"
    sp = r.info.get("split_protocol") or {}
    if sp.get("unit") == "image":
        s += (f"; split {sp.get('kind')} is image-level and leaks patients: {sp.get('patients_crossing')} of "
              f"{sp.get('patients')} patients have images in more than one part"
              + (f" ({sp['patients_crossing_in_metadata']} in the split of the whole metadata)"
                 if "patients_crossing_in_metadata" in sp else ""))
    elif sp:
        s += f"; split {sp.get('kind')} is patient-disjoint ({sp.get('patients')} patients, none in two parts)"
    if r.skipped_missing:
        s += f"; skipped {r.skipped_missing} metadata rows whose image is missing"
    if r.processed and r.seconds > 0:
        s += f"; {r.processed} images in {r.seconds:.1f} s ({r.images_per_s:.1f} images/s"
        if r.cpu_seconds > 0:
            s += f", {r.processed / r.cpu_seconds:.1f} per CPU-second"
        s += ")"
    return s


def _log(msg: str) -> None:
    print(f"medattn prepare: {msg}", file=sys.stderr, flush=True)
