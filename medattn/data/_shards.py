"""Pixel shards and the manifest of a prepared directory, and the resume state of ``medattn prepare``.

The one writer of the prepared format (docs/data-format.md): ``medattn prepare`` and the test
data of :mod:`medattn.data.fake` both write their pixels with :class:`ShardWriter`, turn the
shards' records into the manifest's address columns with :func:`record_columns`, and write the
manifest with :func:`write_manifest`, which owns the column types.

A shard is one file holding ``count`` consecutive samples of the manifest:

- raw:  ``pixels-NNNNN.npy``, a standard ``.npy`` array ``(count, S, S, C)`` uint8, written as
  header + samples in order (so ``np.load(path, mmap_mode="r")[slot]`` is one image);
- png / jpeg: ``pixels-NNNNN.bin``, the encoded files concatenated, located by offset/nbytes.

Crash safety: a shard is written to ``NAME.partial`` and renamed when it holds all its samples;
only then is its record list (offsets, sizes, conversions) written to
``.partial/shard-NNNNN.json`` (tmp + rename). A shard counts as finished on resume only when
both exist and the file has the recorded size, so a kill at any instant loses at most the shard
in progress. The writer knows nothing about where samples come from (NIH, CSV, folders).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medattn import fileio

SHARD_DIR = "shards"
PARTIAL_DIR = ".partial"
SETTINGS_FILE = "settings.json"
# ~1 GiB of raw pixels per shard: a few large files (28 for NIH at 512 px), each big enough
# for sequential reads and small enough to redo quickly after an interruption.
TARGET_SHARD_BYTES = 1 << 30


def default_shard_size(size: int, channels: int) -> int:
    """Images per shard: ~1 GiB of raw pixels (4096 at 512² gray), within [256, 65536]."""
    return int(min(65536, max(256, TARGET_SHARD_BYTES // (size * size * channels))))


def shard_name(index: int, pixel_format: str) -> str:
    ext = "npy" if pixel_format == "raw" else "bin"
    return f"{SHARD_DIR}/pixels-{index:05d}.{ext}"


@dataclass
class SampleRecord:
    """Where one sample landed in its shard, plus what the worker learnt about it."""

    slot: int
    offset: int
    nbytes: int
    orig_width: int
    orig_height: int
    conversion: str
    lung_box: list[float] | None


class ShardWriter:
    """Writes the samples of one shard in order to ``NAME.partial``; :meth:`finish` renames it.

    Args:
        root: the prepared directory.
        index: shard number.
        count: how many samples the shard will hold (raw needs it for the .npy header).
        pixel_format: ``raw``, ``png`` or ``jpeg``.
        sample_shape: (S, S, C) of one sample (raw only checks payload sizes against it).
    """

    def __init__(self, root: Path, index: int, count: int, pixel_format: str,
                 sample_shape: tuple[int, int, int]):
        self.root = Path(root)
        self.index = index
        self.count = count
        self.pixel_format = pixel_format
        self.rel = shard_name(index, pixel_format)
        self.path = self.root / self.rel
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.sample_bytes = int(np.prod(sample_shape))
        self.records: list[SampleRecord] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.partial, "wb")
        if pixel_format == "raw":
            header = {"descr": np.dtype(np.uint8).str, "fortran_order": False,
                      "shape": (count, *sample_shape)}
            np.lib.format.write_array_header_1_0(self._f, header)
        self._pos = self._f.tell()

    def add(self, payload: bytes, orig_width: int, orig_height: int, conversion: str,
            lung_box: list[float] | None) -> SampleRecord:
        """Append one sample's bytes; returns its record (slot, offset, nbytes, ...)."""
        if len(self.records) >= self.count:
            raise RuntimeError(f"shard {self.index} is full ({self.count} samples)")
        if self.pixel_format == "raw" and len(payload) != self.sample_bytes:
            raise RuntimeError(f"raw sample has {len(payload)} bytes, expected {self.sample_bytes}")
        self._f.write(payload)
        rec = SampleRecord(len(self.records), self._pos, len(payload), orig_width, orig_height,
                           conversion, lung_box)
        self._pos += len(payload)
        self.records.append(rec)
        return rec

    def finish(self) -> dict[str, Any]:
        """Flush, fsync and rename into place; returns the shard entry for dataset.json."""
        if len(self.records) != self.count:
            raise RuntimeError(f"shard {self.index} got {len(self.records)} of {self.count} samples")
        self._f.close()
        fileio.publish(self.partial, self.path)
        return {"path": self.rel, "count": self.count, "bytes": self._pos}

    def abort(self) -> None:
        """Close and delete the partial file (the shard will be redone)."""
        try:
            self._f.close()
        finally:
            self.partial.unlink(missing_ok=True)


class PartialState:
    """The ``PREP/.partial/`` directory: settings of the run, and one record file per finished shard."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / PARTIAL_DIR

    def exists(self) -> bool:
        return self.dir.is_dir()

    def settings(self) -> dict[str, Any] | None:
        p = self.dir / SETTINGS_FILE
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def start(self, settings: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fileio.write_json(self.dir / SETTINGS_FILE, settings)

    def _shard_file(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.json"

    def mark_done(self, entry: dict[str, Any], records: list[SampleRecord]) -> None:
        """Record a finished (already renamed) shard."""
        obj = {"shard": entry, "records": [r.__dict__ for r in records]}
        fileio.write_json(self._shard_file(self.index_of(entry)), obj)

    @staticmethod
    def index_of(entry: dict[str, Any]) -> int:
        return int(Path(entry["path"]).stem.split("-")[-1])

    def load_done(self, index: int, expected_path: str, expected_count: int
                  ) -> tuple[dict[str, Any], list[SampleRecord]] | None:
        """The entry and records of shard ``index`` if it was finished and its file is intact."""
        p = self._shard_file(index)
        try:
            obj = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        entry = obj.get("shard", {})
        if entry.get("path") != expected_path or entry.get("count") != expected_count:
            return None
        f = self.root / expected_path
        try:
            if f.stat().st_size != entry.get("bytes"):
                return None
        except OSError:
            return None
        recs = [SampleRecord(**r) for r in obj.get("records", [])]
        if len(recs) != expected_count:
            return None
        return entry, recs

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_stale_partials(root: Path) -> None:
    """Delete ``*.partial`` shard files left by an interrupted run (they are always redone)."""
    d = Path(root) / SHARD_DIR
    if d.is_dir():
        for p in d.glob("*.partial"):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- the manifest
def manifest_types() -> dict[str, Any]:
    """The pyarrow type of every manifest column, in the manifest's column order."""
    import pyarrow as pa

    box = pa.struct([("label", pa.string()), ("x", pa.float64()), ("y", pa.float64()),
                     ("w", pa.float64()), ("h", pa.float64())])
    return {
        "index": pa.int64(), "image": pa.string(), "patient": pa.string(), "split": pa.string(),
        "labels": pa.list_(pa.uint8()), "target": pa.int64(), "finding_labels": pa.string(),
        "age": pa.float64(), "sex": pa.string(), "view": pa.string(), "boxes": pa.list_(box),
        "lung_box": pa.list_(pa.float64()), "shard": pa.int32(), "slot": pa.int64(),
        "offset": pa.int64(), "nbytes": pa.int64(), "orig_width": pa.int32(),
        "orig_height": pa.int32(), "conversion": pa.string(),
    }


def record_columns(records: list[SampleRecord], shards: list[int]) -> dict[str, Any]:
    """The manifest columns that say where each sample lies and what the worker learnt about it
    (shard, slot, offset, nbytes, orig_width, orig_height, conversion, lung_box), from the
    records of every sample in sample order and the shard number of each."""
    return {
        "shard": np.asarray(shards, dtype=np.int32),
        "slot": np.array([r.slot for r in records], dtype=np.int64),
        "offset": np.array([r.offset for r in records], dtype=np.int64),
        "nbytes": np.array([r.nbytes for r in records], dtype=np.int64),
        "orig_width": np.array([r.orig_width for r in records], dtype=np.int32),
        "orig_height": np.array([r.orig_height for r in records], dtype=np.int32),
        "conversion": [r.conversion for r in records],
        "lung_box": [r.lung_box for r in records],
    }


def write_manifest(root: Path, columns: dict[str, Any]) -> None:
    """Write ``manifest.parquet`` (tmp + fsync + rename): each column given, with the format's
    type (:func:`manifest_types`), in the format's column order. Optional columns that are not
    given are left out; None is null (e.g. an unknown age)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    types = manifest_types()
    unknown = sorted(set(columns) - set(types))
    if unknown:
        raise ValueError(f"not manifest columns: {unknown} (docs/data-format.md)")
    table = pa.table({k: pa.array(columns[k], types[k]) for k in types if k in columns})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    from medattn.data.prepared import Prepared

    Prepared(root).write_manifest_bytes(buf.getvalue())
