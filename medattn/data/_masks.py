"""Lung masks as pixels in a prepared directory (for training and scoring lung segmentation).

``medattn prepare --masks DIR`` stores, besides one lung box per image in the manifest, every
mask resized to the prepared size S (box filter, then >= 50 %), bit-packed along x:

    PREP/masks/lung.npy          (N, S, ceil(S/8)) uint8, np.packbits(mask, axis=-1); row = sample index
    PREP/masks/lung_known.npy    (N,) bool: the image has a mask (False rows are all zero)

and describes them in dataset.json under ``"lung_masks"``. Packed masks cost 1/8 of the raw
pixels; a batch is unpacked in microseconds. Resizing matches the images' (both are squashed to
S x S), so mask pixel (x, y) lies on image pixel (x, y).
"""
from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np

from medattn import fileio
from medattn.errors import DataError

MASK_FILE = "masks/lung.npy"
KNOWN_FILE = "masks/lung_known.npy"
_CHUNK = 32


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """One mask file -> (size, size) bool (nonzero = lung), resized like the images.

    Raises:
        ImageDecodeError / FileNotFoundError: unreadable or missing file.
    """
    from PIL import Image

    from medattn.data.imagefiles import open_image

    im, _ = open_image(path)
    a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2) if a.shape[2] >= 3 else a[..., 0]
    binary = Image.fromarray(((a > 0) * 255).astype(np.uint8))
    if binary.size != (size, size):
        binary = binary.resize((size, size), Image.Resampling.BOX)
    return np.asarray(binary) >= 128


def _work(task: tuple[int, list[tuple[int, str | None]]]) -> tuple[list[tuple[int, np.ndarray | None]], str | None]:
    size, items = task
    from medattn.data._images import ImageDecodeError

    out = []
    for i, path in items:
        if path is None:
            out.append((i, None))
            continue
        try:
            out.append((i, np.packbits(load_mask(path, size), axis=-1)))
        except (FileNotFoundError, ImageDecodeError) as e:
            return [], f"{path}\t{e}"
    return out, None


def write_mask_store(out: Path, mask_paths: list[str | None], images: list[str], size: int,
                     workers: int = 1) -> dict[str, Any] | None:
    """Write ``masks/lung.npy`` and ``masks/lung_known.npy`` for the samples in order.

    Args:
        out: the prepared directory.
        mask_paths: per sample, its mask file or None.
        images: per sample, its image id (for error messages).
        size: the prepared side S.
        workers: processes decoding masks.

    Returns:
        The ``lung_masks`` entry of dataset.json, or None when no sample has a mask.

    Raises:
        DataError: an unreadable mask (names the mask and its image).
    """
    n = len(mask_paths)
    if not any(p is not None for p in mask_paths):
        return None
    width = math.ceil(size / 8)
    (out / "masks").mkdir(exist_ok=True)
    tmp = out / (MASK_FILE + ".partial")
    # Written through a memory map: the packed masks of a large set need not fit in memory.
    packed = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, width))
    known = np.zeros(n, bool)
    tasks = [(size, [(i, mask_paths[i]) for i in range(a, min(n, a + _CHUNK))]) for a in range(0, n, _CHUNK)]
    workers = max(1, min(workers, len(tasks)))
    pool = None
    if workers > 1:
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
    try:
        results = pool.imap(_work, tasks) if pool is not None else map(_work, tasks)
        for got, err in results:
            if err is not None:
                path, msg = err.split("\t", 1)
                i = mask_paths.index(path)
                raise DataError(path, f"lung mask of image {images[i]}: {msg}")
            for i, bits in got:
                if bits is not None:
                    packed[i] = bits
                    known[i] = True
        packed.flush()
        del packed
        fileio.publish(tmp, out / MASK_FILE)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            tmp.unlink()
    with fileio.atomic_file(out / KNOWN_FILE) as f:
        np.save(f, known)
    return {"path": MASK_FILE, "known": KNOWN_FILE, "size": size, "count": int(known.sum()),
            "packing": "np.packbits(axis=-1)"}


class MaskStore:
    """Read side of the mask store: ``read(indices)`` -> (B, S, S) uint8 0/1, ``known(indices)``."""

    def __init__(self, root: str | Path, entry: dict[str, Any]):
        self.root = Path(root)
        self.size = int(entry["size"])
        self.path = self.root / entry["path"]
        self.known_path = self.root / entry["known"]
        for p in (self.path, self.known_path):
            if not p.is_file():
                raise DataError(p, "lung-mask store listed in dataset.json is missing; prepare the data again")
        self._bits: np.ndarray | None = None
        self._known: np.ndarray | None = None

    @classmethod
    def open(cls, root: str | Path) -> "MaskStore | None":
        """The store of a prepared directory, or None when it has no lung masks."""
        from medattn.data.prepared import Prepared

        info = Prepared(root).info()
        entry = info.get("lung_masks")
        return cls(root, entry) if entry else None

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._bits is None:  # lazily, in whichever process reads (memory maps do not pickle)
            self._bits = np.load(self.path, mmap_mode="r")
            self._known = np.load(self.known_path)
        return self._bits, self._known  # type: ignore[return-value]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bits"] = state["_known"] = None
        return state

    def read(self, indices: np.ndarray) -> np.ndarray:
        bits, _ = self._maps()
        idx = np.asarray(indices, dtype=np.int64)
        return np.unpackbits(bits[idx], axis=-1, count=self.size)

    def known(self, indices: np.ndarray) -> np.ndarray:
        _, known = self._maps()
        return known[np.asarray(indices, dtype=np.int64)]
