"""Worker side of ``medattn synth``: draw one patient's images and write their PNGs.

A job is one patient (its images in follow-up order, so chronic lesions can be carried from
one film to the next). Every random draw is keyed by (seed, patient) or (seed, image index),
so the bytes written do not depend on how patients are spread over processes.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from medattn.data._synth_anatomy import sample_anatomy
from medattn.data._synth_draw import render
from medattn.data._synth_lesions import plan_findings

# zlib level 1 + run-length strategy: ~4x faster than the defaults, files about as small as
# NIH's (~0.5 MB at 1024 px).
PNG_LEVEL = 1
PNG_STRATEGY = 3   # zlib Z_RLE: with level 1 the fastest here, and smaller than the default strategy


def _time_chunk(seed: int, index: int) -> bytes:
    # NIH's PNGs carry a tIME chunk (their conversion date, autumn 2017); a fixed,
    # seed-derived time keeps the files byte-identical between runs.
    rng = np.random.default_rng([seed, 9, index])
    return struct.pack(">HBBBBB", 2017, 9, int(rng.integers(20, 31)), int(rng.integers(0, 24)),
                       int(rng.integers(0, 60)), int(rng.integers(0, 60)))


def _chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data) & 0xFFFFFFFF)


def save_png(path: Path, img: np.ndarray, *, rgba: bool, seed: int, index: int) -> None:
    """Write an 8-bit grey PNG (chunks IHDR, tIME, IDAT), or for ``rgba`` the odd RGBA kind
    of the real set (R = G = B, alpha 255; chunks IHDR, sRGB, gAMA, pHYs, tIME, IDAT)."""
    info = PngImagePlugin.PngInfo()
    if not rgba:
        info.add(b"tIME", _time_chunk(seed, index))
        Image.fromarray(img, "L").save(path, format="PNG", compress_level=PNG_LEVEL, compress_type=PNG_STRATEGY,
                                     pnginfo=info)
        return
    info.add(b"sRGB", b"\x00")
    info.add(b"gAMA", struct.pack(">I", 45455))
    arr = np.empty(img.shape + (4,), np.uint8)
    arr[..., 0] = arr[..., 1] = arr[..., 2] = img
    arr[..., 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG", compress_level=PNG_LEVEL, compress_type=PNG_STRATEGY,
                                      pnginfo=info)
    data = buf.getvalue()
    # PIL writes no pHYs from pnginfo and puts its own after tIME; splice both in NIH's order
    # right after gAMA (IHDR is 8 + 25 bytes, sRGB 13, gAMA 16).
    at = 8 + 25 + 13 + 16
    assert data[at - 12:at - 8] == b"gAMA"
    extra = _chunk(b"pHYs", struct.pack(">IIB", 3780, 3780, 1)) + _chunk(b"tIME", _time_chunk(seed, index))
    path.write_bytes(data[:at] + extra + data[at:])


def run_patient(job: dict) -> list[tuple[int, dict]]:
    """Draw and write every image of one patient.

    Args:
        job: ``root`` (output dir), ``seed``, ``size``, ``patient``, ``sex``, ``age`` and
            ``images``: dicts with ``index``, ``path`` (relative image path), ``mask`` (relative
            mask path), ``labels``, ``carried``, ``view``, ``rgba``, in follow-up order.

    Returns:
        [(image index, {label: (u0, v0, u1, v1)} of the box-class lesions)].
    """
    root = Path(job["root"])
    seed = int(job["seed"])
    anat = sample_anatomy(np.random.default_rng([seed, 1, int(job["patient"])]), job["sex"], int(job["age"]))
    prev: dict[str, dict] = {}
    out = []
    for im in job["images"]:
        rng = np.random.default_rng([seed, 3, int(im["index"])])
        carried = {c: prev[c] for c in im["carried"] if c in prev}
        anat_i, lesions = plan_findings(anat, im["labels"], carried, rng)
        img, mask, boxes = render({"seed": seed, "index": im["index"], "size": job["size"], "anat": anat_i,
                                   "lesions": lesions, "view": im["view"]})
        save_png(root / im["path"], img, rgba=im["rgba"], seed=seed, index=im["index"])
        Image.fromarray(mask, "L").save(root / im["mask"], format="PNG", compress_level=PNG_LEVEL)
        prev = {les["cls"]: les for les in lesions}
        out.append((int(im["index"]), boxes))
    return out
