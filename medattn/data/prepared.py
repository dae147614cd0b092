"""A prepared directory (docs/data-format.md): :class:`Prepared` owns its layout (the file
names, spelled nowhere else in the product: tests/test_layers.py checks it), and
:class:`PreparedDataset` is its read side: the manifest, labels and pixels.

Both loaders (DALI and the PyTorch fallback) and evaluation go through :class:`PreparedDataset`,
so there is one definition of "sample i".

Example:
    >>> ds = PreparedDataset.open("demo-out/prep")          # doctest: +SKIP
    >>> idx = ds.indices("train")
    >>> ds.read_batch(idx[:4]).shape                        # (4, S, S, C) uint8
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medattn.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# source kinds of generated data: ``medattn synth`` output and medattn.data.fake's test blobs
SYNTHETIC_KINDS = ("synthetic", "synth", "test-blobs")


class Prepared:
    """The prepared directory ``root`` (it need not exist yet), as hpc.run.Run is for runs::

        ROOT/dataset.json        what the directory holds (written last: its presence means complete)
        ROOT/manifest.parquet    one row per sample (medattn.data._shards.write_manifest)
        ROOT/shards/, ROOT/masks/, ROOT/.partial/   pixels, lung masks, an unfinished prepare's state
    """

    INFO = "dataset.json"
    MANIFEST = "manifest.parquet"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Prepared({str(self.root)!r})"

    @property
    def info_path(self) -> Path:
        return self.root / self.INFO

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def exists(self) -> bool:
        """Whether a complete prepared directory is here (its dataset.json is written last)."""
        return self.info_path.is_file()

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def info(self) -> dict[str, Any]:
        """dataset.json. Raises DataError naming it when it is missing or unreadable."""
        try:
            info = json.loads(self.info_path.read_text())
        except FileNotFoundError:
            raise DataError(self.info_path, "missing: this is not a complete prepared directory") from None
        except (OSError, ValueError) as e:
            raise DataError(self.info_path, f"unreadable: {e}") from None
        if not isinstance(info, dict):
            raise DataError(self.info_path, "unreadable: not a JSON object")
        return info

    def write_info(self, info: dict[str, Any]) -> None:
        """dataset.json, atomically and durably (medattn.fileio): write it after everything else."""
        from medattn import fileio

        fileio.write_json(self.info_path, info)

    def write_manifest_bytes(self, data: bytes) -> None:
        from medattn import fileio

        fileio.write_bytes(self.manifest_path, data)

    def remove_outputs(self) -> None:
        """Delete the manifest and dataset.json (and their temporaries): an interrupted prepare
        that starts over."""
        from medattn import fileio

        for p in (self.manifest_path, self.info_path):
            p.unlink(missing_ok=True)
        fileio.remove_temporaries(self.root)


def is_synthetic(info: dict[str, Any]) -> bool:
    """Whether a prepared directory's dataset.json (``info``) describes generated images, not
    real films. ``medattn prepare`` records it (``synthetic``); directories prepared before it
    did are recognised by their source kind or the ``medattn synth`` marker in their source root.
    A model trained on such data must not be applied to patients' films without a warning."""
    if "synthetic" in info:
        return bool(info["synthetic"])
    src = info.get("source") or {}
    if str(src.get("kind", "")).lower() in SYNTHETIC_KINDS or src.get("synthetic"):
        return True
    root = src.get("root")
    if root:
        from medattn.data.synth import MARKER

        return (Path(root) / MARKER).is_file()
    return False


@dataclass
class PreparedDataset:
    root: Path
    info: dict[str, Any]
    manifest: pd.DataFrame
    _arrays: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _files: dict[int, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: str | Path) -> "PreparedDataset":
        root = Path(root)
        where = Prepared(root)
        info_path = where.info_path
        if not root.is_dir():
            raise DataError(root, "prepared directory does not exist (run `medattn prepare` first)")
        if not info_path.is_file():
            hint = " (an interrupted `medattn prepare`: run the same command again to resume)" \
                if (root / ".partial").exists() or (root / "shards").exists() else ""
            raise DataError(info_path, "missing: this is not a complete prepared directory" + hint)
        info = where.info()
        if info.get("format_version") != FORMAT_VERSION:
            raise DataError(info_path, f"format_version {info.get('format_version')!r} is not supported "
                                       f"(this medattn reads {FORMAT_VERSION}); prepare the data again")
        mpath = where.manifest_path
        try:
            manifest = pd.read_parquet(mpath)
        except Exception as e:  # pyarrow raises several types
            raise DataError(mpath, f"unreadable manifest: {e}") from None
        required = ("index", "image", "patient", "split", "labels", "shard", "slot", "offset", "nbytes")
        missing = [c for c in required if c not in manifest.columns]
        if missing:
            raise DataError(mpath, f"manifest lacks columns {missing}")
        if not np.array_equal(manifest["index"].to_numpy(), np.arange(len(manifest))):
            raise DataError(mpath, "column 'index' must equal the row position 0..N-1")
        for s in info.get("shards", []):
            if not (root / s["path"]).is_file():
                raise DataError(root / s["path"], "shard file listed in dataset.json is missing")
        return cls(root=root, info=info, manifest=manifest)

    # ---------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def label_names(self) -> list[str]:
        return list(self.info["label_names"])

    @property
    def eval_labels(self) -> list[str]:
        return list(self.info.get("eval_labels") or self.info["label_names"])

    @property
    def task(self) -> str:
        return self.info.get("task", "multilabel")

    @property
    def synthetic(self) -> bool:
        """Generated images (``medattn synth``, test blobs), not real films: :func:`is_synthetic`."""
        return is_synthetic(self.info)

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def channels(self) -> int:
        return int(self.info.get("channels", 1))

    @property
    def pixel_format(self) -> str:
        return self.info.get("pixel_format", "raw")

    @property
    def split_name(self) -> str:
        return str(self.info.get("split", ""))

    def split_record(self) -> dict[str, Any]:
        """The split behind this directory, as every checkpoint, metrics.json and report records it:
        ``name`` (``prepare --split``), ``seed`` (None where the split has none) and ``hash``, the first
        16 hex digits of SHA-256 over the sorted "image<TAB>part" lines of the manifest, so two
        directories with the same assignment of images to train/val/test agree whatever their order,
        image size or shards."""
        cached = self.__dict__.get("_split_record")
        if cached is None:
            import hashlib

            pairs = sorted(zip(self.manifest["image"].astype(str), self.manifest["split"].astype(str)))
            digest = hashlib.sha256("".join(f"{i}\t{p}\n" for i, p in pairs).encode()).hexdigest()[:16]
            seed = self.info.get("split_seed")
            cached = {"name": self.split_name or None, "seed": None if seed is None else int(seed), "hash": digest}
            self.__dict__["_split_record"] = cached
        return dict(cached)

    def indices(self, split: str) -> np.ndarray:
        """Sample indices of one split, ascending. Raises DataError when the split is empty."""
        if split == "all":
            return np.arange(len(self.manifest), dtype=np.int64)
        idx = np.flatnonzero(self.manifest["split"].to_numpy() == split).astype(np.int64)
        if len(idx) == 0:
            counts = self.manifest["split"].value_counts().to_dict()
            raise DataError(Prepared(self.root).manifest_path, f"split {split!r} is empty (have {counts})")
        return idx

    def labels_matrix(self) -> np.ndarray:
        """(N, L) float32 multi-hot (one-hot for single-label tasks)."""
        return np.stack(self.manifest["labels"].to_numpy()).astype(np.float32)

    def targets(self) -> np.ndarray:
        """(N,) int64 class indices for single-label tasks (-1 for multi-label)."""
        if "target" in self.manifest.columns:
            return self.manifest["target"].to_numpy().astype(np.int64)
        return np.full(len(self.manifest), -1, dtype=np.int64)

    def boxes(self, index: int) -> list[dict[str, Any]]:
        """Ground-truth boxes of one sample, normalised [0,1] (x, y, w, h), with their label."""
        if "boxes" not in self.manifest.columns:
            return []
        v = self.manifest["boxes"].iat[index]
        return [] if v is None else [dict(b) for b in v]

    def lung_boxes(self) -> np.ndarray | None:
        """(N, 4) float32 normalised lung boxes [x, y, w, h], NaN where unknown; None if absent."""
        if "lung_box" not in self.manifest.columns:
            return None
        out = np.full((len(self.manifest), 4), np.nan, dtype=np.float32)
        for i, v in enumerate(self.manifest["lung_box"].to_numpy()):
            if v is not None and len(v) == 4:
                out[i] = v
        return out

    # ---------------------------------------------------------------- pixels
    def pixel_reader(self) -> "PixelReader":
        """A picklable reader for loader workers (no manifest inside)."""
        return PixelReader(self)

    def _raw(self, shard: int) -> np.ndarray:
        arr = self._arrays.get(shard)
        if arr is None:
            with self._lock:
                arr = self._arrays.get(shard)
                if arr is None:
                    path = self.root / self.info["shards"][shard]["path"]
                    try:
                        arr = np.load(path, mmap_mode="r")
                    except Exception as e:
                        raise DataError(path, f"unreadable shard: {e}") from None
                    self._arrays[shard] = arr
        return arr

    def _encoded(self, shard: int, offset: int, nbytes: int) -> bytes:
        path = self.root / self.info["shards"][shard]["path"]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise DataError(path, f"truncated shard: wanted {nbytes} bytes at offset {offset}")
        return data

    def read_encoded(self, index: int) -> bytes:
        """The stored bytes of an encoded (png/jpeg) sample, for GPU decoders."""
        row = self.manifest.iloc[index]
        return self._encoded(int(row["shard"]), int(row["offset"]), int(row["nbytes"]))

    def read(self, index: int) -> np.ndarray:
        """One image, (S, S, C) uint8."""
        m = self.manifest
        shard, slot = int(m["shard"].iat[index]), int(m["slot"].iat[index])
        if self.pixel_format == "raw":
            return np.asarray(self._raw(shard)[slot])
        data = self._encoded(shard, int(m["offset"].iat[index]), int(m["nbytes"].iat[index]))
        return _decode(data, self.channels, f"{self.root} sample {index}")

    def read_batch(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """(B, S, S, C) uint8 in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        s, c = self.image_size, self.channels
        out = np.empty((len(indices), s, s, c), dtype=np.uint8)
        if self.pixel_format == "raw":
            shards = self.manifest["shard"].to_numpy()[indices]
            slots = self.manifest["slot"].to_numpy()[indices]
            for sh in np.unique(shards):
                sel = np.flatnonzero(shards == sh)
                # Sorted fancy indexing reads the memmap sequentially.
                order = np.argsort(slots[sel], kind="stable")
                out[sel[order]] = self._raw(int(sh))[slots[sel][order]]
            return out
        for j, i in enumerate(indices):
            out[j] = self.read(int(i))
        return out


def _decode(data: bytes, channels: int, what: str) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im = im.convert("L" if channels == 1 else "RGB")
    except Exception as e:
        raise DataError(None, f"{what}: cannot decode stored image: {e}") from None
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


class PixelReader:
    """A small picklable reader of prepared pixels, for loader worker processes.

    It carries only the shard paths and per-sample addresses (not the manifest), and opens
    memory maps lazily in whichever process uses it.
    """

    def __init__(self, ds: PreparedDataset):
        m = ds.manifest
        self.root = str(ds.root)
        self.paths = [str(ds.root / s["path"]) for s in ds.info["shards"]]
        self.pixel_format = ds.pixel_format
        self.size = ds.image_size
        self.channels = ds.channels
        self.shard = m["shard"].to_numpy().astype(np.int32)
        self.slot = m["slot"].to_numpy().astype(np.int64)
        self.offset = m["offset"].to_numpy().astype(np.int64)
        self.nbytes = m["nbytes"].to_numpy().astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _map(self, shard: int) -> np.ndarray:
        arr = self._maps.get(shard)
        if arr is None:
            try:
                arr = np.load(self.paths[shard], mmap_mode="r")
            except Exception as e:
                raise DataError(self.paths[shard], f"unreadable shard: {e}") from None
            self._maps[shard] = arr
        return arr

    def read_batch(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        if self.pixel_format == "raw":
            shards, slots = self.shard[indices], self.slot[indices]
            for sh in np.unique(shards):
                sel = np.flatnonzero(shards == sh)
                order = np.argsort(slots[sel], kind="stable")
                out[sel[order]] = self._map(int(sh))[slots[sel][order]]
            return out
        for j, i in enumerate(indices):
            with open(self.paths[self.shard[i]], "rb") as f:
                f.seek(int(self.offset[i]))
                data = f.read(int(self.nbytes[i]))
            out[j] = _decode(data, self.channels, f"{self.root} sample {i}")
        return out
