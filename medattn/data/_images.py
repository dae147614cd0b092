"""The pixel rules of every image read (convert a decoded image to uint8 gray/RGB, resize it) and
the shard encoder.

Decoding a *file* is :mod:`medattn.data.imagefiles`' (its ``load_image`` is the one reader that
prepare, predict, the report and viz use); this module is what that reader and the shard writer
share: array -> array rules and array -> bytes. It runs inside the prepare worker processes, so it
imports only numpy and PIL.

Conversions (each one is recorded per image in the manifest's ``conversion`` column and counted
in ``dataset.json``):

- ``rgba``: a colour image (RGBA, RGB, LA, P) turned into 1-channel gray. NIH ships ~519 RGBA
  PNGs whose R = G = B and alpha = 255; for those the R channel *is* the gray image, bit for bit.
  Other colour images go through PIL's ITU-R 601 luma (``convert("L")``). Alpha is dropped.
- ``16bit``: a 16-bit gray image scaled linearly to 8 bit over the full 16-bit range,
  ``round(v * 255 / 65535)`` (= ``round(v / 257)``), so 16-bit copies of 8-bit data (v * 257)
  come back exactly. No per-image contrast stretch: the brightness scale stays comparable
  across images. (16-bit *colour* PNGs are reduced by PIL itself, keeping the high byte,
  ``v // 256``; they are counted too.)
- ``dicom``: the source is a DICOM file, read by the rules in medattn.data.imagefiles.
- ``not_1024``: the source is not the size the dataset documents (1024 × 1024 for NIH; a few
  downscaled copies circulate). It is resized like every other image.

Resizing: PIL's LANCZOS (3-lobe, support scaled by the reduction factor, i.e. a proper
anti-aliasing filter). Measured on real 1024² ChestX-ray14 PNGs against an ideal low-pass
(FFT) reference, at 512 px: RMSE 0.66 gray levels for LANCZOS, 0.78 BICUBIC, 1.01 BOX,
1.15 BILINEAR, 2.33 NEAREST; it costs ~4 ms of the ~14 ms per image (decoding the PNG is the
rest). See docs/benchmarks.md, "Prepare".
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

RESIZE_FILTER = "LANCZOS"
_RESAMPLE = Image.Resampling.LANCZOS
# PIL guards against decompression bombs at ~89 Mpx; medical images can be large but real
# chest films stay far below 16k x 16k.
Image.MAX_IMAGE_PIXELS = 16384 * 16384

PIXEL_FORMATS = ("raw", "png", "jpeg")


class ImageDecodeError(Exception):
    """The file is not a readable image (corrupt, truncated, unsupported). Prepare's workers turn
    it into a DataError naming the file and the metadata row; ``imagefiles.read_image`` into an
    ImageFileError naming the file."""


def to_uint8_linear(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto 0..255: ``round((v - lo) * 255 / (hi - lo))``, halves rounded
    up, clipped to 0..255.

    Integer input with integer bounds is computed exactly in int64 (``(a * 255 + d // 2) // d``
    with ``a = v - lo``, ``d = hi - lo``); anything else in float64. Shared by the 16-bit PNG rule
    below and by the DICOM reader (medattn.data.imagefiles), so both round the same way.
    """
    if not hi > lo:
        raise ValueError(f"empty intensity range {lo}..{hi}")
    if np.issubdtype(arr.dtype, np.integer) and float(lo).is_integer() and float(hi).is_integer():
        lo_i, d = int(lo), int(hi) - int(lo)
        a = arr.astype(np.int64) - lo_i
        return ((a * 255 + d // 2) // d).clip(0, 255).astype(np.uint8)
    a = (arr.astype(np.float64) - lo) * 255.0 / (hi - lo)
    return np.floor(a + 0.5).clip(0, 255).astype(np.uint8)


def _to_uint8_16bit(arr: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535) without float: (v * 255 + 32767) // 65535 in int64.
    return to_uint8_linear(arr, 0, 65535)


def to_array(im: Image.Image, channels: int) -> tuple[np.ndarray, list[str]]:
    """Convert a decoded PIL image to (H, W, channels) uint8.

    Args:
        im: the decoded image, any PIL mode.
        channels: 1 (gray) or 3 (RGB).

    Returns:
        The array and the list of conversions applied ("rgba", "16bit").
    """
    conv: list[str] = []
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit gray (PIL reads 16-bit PNGs as I;16, some TIFFs/PNGs as 32-bit I).
        arr = _to_uint8_16bit(np.asarray(im))
        conv.append("16bit")
        gray = arr
        return (gray[..., None] if channels == 1 else np.repeat(gray[..., None], 3, axis=2)), conv
    if mode == "F":
        raise ImageDecodeError("floating-point images are not supported")
    if mode == "1":
        im = im.convert("L")
        mode = "L"
    if channels == 1:
        if mode == "L":
            arr = np.asarray(im)
        elif mode in ("RGBA", "RGB", "RGBX"):
            rgb = np.asarray(im)
            r = rgb[..., 0]
            # R = G = B (the NIH RGBA files): the red channel is the gray image exactly.
            if np.array_equal(r, rgb[..., 1]) and np.array_equal(r, rgb[..., 2]):
                arr = np.ascontiguousarray(r)
            else:
                arr = np.asarray(im.convert("L"))
            conv.append("rgba")
        elif mode == "LA":
            arr = np.ascontiguousarray(np.asarray(im)[..., 0])
            conv.append("rgba")
        else:  # P, CMYK, YCbCr, ...
            arr = np.asarray(im.convert("L"))
            conv.append("rgba")
        return arr[..., None], conv
    if channels == 3:
        if mode == "RGB":
            arr = np.asarray(im)
        elif mode == "L":
            arr = np.repeat(np.asarray(im)[..., None], 3, axis=2)
        else:
            if mode in ("RGBA", "LA"):
                conv.append("rgba")
            arr = np.asarray(im.convert("RGB"))
        return arr, conv
    raise ValueError(f"channels must be 1 or 3, not {channels}")


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, C) uint8 to (size, size, C) with LANCZOS anti-aliasing; no-op at that size."""
    h, w, c = arr.shape
    if (h, w) == (size, size):
        return arr
    im = Image.fromarray(arr[..., 0] if c == 1 else arr)
    out = np.asarray(im.resize((size, size), _RESAMPLE))
    return out[..., None] if out.ndim == 2 else out


# ---------------------------------------------------------------- encoding for shards
def encode(pixels: np.ndarray, pixel_format: str, jpeg_quality: int = 95, png_level: int = 1) -> bytes:
    """Bytes of one (S, S, C) uint8 image as stored in a shard.

    raw: the C-order pixel bytes (what ``np.load(shard)[slot]`` returns). png: lossless, zlib
    level ``png_level`` (1 by default: the measured best speed/size trade-off, see
    docs/benchmarks.md). jpeg: baseline JPEG at ``jpeg_quality``, 4:4:4 for colour.
    """
    if pixel_format == "raw":
        return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    im = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    buf = io.BytesIO()
    if pixel_format == "png":
        im.save(buf, format="PNG", compress_level=png_level)
    elif pixel_format == "jpeg":
        im.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        raise ValueError(f"unknown pixel format {pixel_format!r} (expected one of {PIXEL_FORMATS})")
    return buf.getvalue()
