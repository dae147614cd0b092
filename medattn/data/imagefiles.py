"""The one image reader: an image file (PNG, JPEG, DICOM) -> the (S, S, C) uint8 pixels
``medattn prepare`` stores; and which files a user's inputs name.

:func:`load_image` is the reader prepare's workers, ``medattn predict`` / :func:`medattn.load`,
external evaluation, the report and viz all go through (:func:`read_image` is its face for
everything but prepare: path-named errors and one :class:`ImageWarning` per file); the pixel
rules it applies after decoding live in :mod:`medattn.data._images` (colour -> gray: R channel
when R = G = B, else PIL's ITU-R 601 luma; 16-bit gray -> ``round(v * 255 / 65535)``; LANCZOS
resize to S x S), shared with nothing else. So a file read for predict is byte-identical to the
prepared shard sample of the same file. :func:`expand_inputs` turns files, folders and list
files into the images to read, and names what cannot be read.

PNG / JPEG (any mode PIL reads: 8- and 16-bit gray, RGB, RGBA, LA, P): decoded by PIL, then the
rules above.

DICOM (``*.dcm``, ``*.dicom``, or any file with ``DICM`` at byte 128, whatever its name). Needs
pydicom (``pip install 'medattn[dicom]'``); the pixel processing is pydicom's own
(``apply_modality_lut``, ``apply_voi_lut``, ``apply_color_lut``), the rest is stated here:

1. One frame. A file with Number of Frames > 1 is refused: a chest film is one frame, and there
   is no frame that is right to pick for every multi-frame object (tomosynthesis slices,
   dual-energy pairs, cine), so the user extracts the one they mean.
2. Decoding: ``pixel_array``. A compressed transfer syntax whose decoder is not installed is
   refused up front with its name and the packages of the plugins pydicom would use for it, read
   from pydicom's own plugin table (e.g. JPEG-LS: pylibjpeg + pylibjpeg-libjpeg, pyjpegls or
   python-gdcm). When an installed plugin fails (Pillow reads no 12-bit JPEG Extended; corrupt
   data), the error gives what it said and names the plugins that are not installed. A syntax
   pydicom has no decoder for at all (JPEG 2000 Part 2, the video syntaxes, JPIP) is named with
   the tool to convert it with.
3. MONOCHROME1 / MONOCHROME2: first the Modality LUT (Rescale Slope / Intercept, or a Modality
   LUT Sequence), then the VOI transform when the file has one:

   - a VOI LUT Sequence (preferred when both are present, as pydicom does): its first LUT; the
     output range ``0 .. 2^n - 1`` (n = the LUT Descriptor's bits per entry) maps to 0..255;
   - else Window Center / Window Width (the first value of each when multi-valued; the VOI LUT
     Function, LINEAR by default, as pydicom implements it). pydicom spreads the window over the
     range the modality values can take; that range maps to 0..255, so a LINEAR window gives the
     standard's formula with an 8-bit output:
     ``y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255``, clipped to 0..255.

   Without a VOI transform: **the full range the stored values can take** -- ``0 ..
   2^BitsStored - 1`` (``-2^(BitsStored-1) .. 2^(BitsStored-1) - 1`` when signed), passed
   through the Modality LUT (the least and greatest value it makes of any stored value) -- maps
   linearly to 0..255. Never the image's own min..max. Why:
   (a) it is prepare's rule for 16-bit PNGs (for BitsStored 16 it *is* ``round(v * 255 /
   65535)``), so no per-image contrast stretch and a brightness scale comparable across images,
   as in training; (b) a DICOM written from an 8-bit PNG (BitsStored 8) or from its 16-bit copy
   (v * 257, BitsStored 16) comes back exactly, which min..max would not do for an image that
   does not span 0..255. The price: a file whose values fill only part of the declared range
   (12-bit data declared as BitsStored 16) comes out dark; such files normally carry a window,
   which then decides.

   Every linear map above rounds halves up and clips to 0..255 (``_images.to_uint8_linear``,
   shared with prepare's 16-bit rule). MONOCHROME1 (bone dark) is then inverted, ``255 - y``,
   so bone is bright as in MONOCHROME2 and in the PNGs a model was trained on. Presentation LUT
   Shape is not applied: in DX objects it only restates the photometric interpretation.
4. Colour (RGB; YBR_FULL / YBR_FULL_422, converted to RGB by pydicom; PALETTE COLOR through its
   palette): samples wider than 8 bits map ``0 .. 2^BitsStored - 1`` (a palette:
   ``0 .. 2^n - 1``) to 0..255 as above (prepare's 16-bit *colour* PNGs keep PIL's high byte
   instead, ``v // 256``; the two differ by at most one level); then prepare's colour
   conversion (R channel when R = G = B, else luma).
5. Then prepare's resize (LANCZOS to S x S) and, for ``channels=3``, gray repeated as prepare does.

Errors are :class:`ImageFileError` (a DataError, so the CLI prints it with the path): missing
files and dangling links, corrupt or truncated files, undecodable transfer syntaxes, multi-frame
or non-image DICOM objects.

Warnings (:func:`read_image`; ``load_image(check=True)`` returns them as ``notes``): one
:class:`ImageWarning` per file that was read but should not be trusted blindly -- almost no
contrast (16 or fewer grey levels as read, before the resize; for a DICOM without a window the
note says its whole stored range was mapped), a side under 64 px, or sides beyond 1:2. Warnings
PIL or pydicom raise while reading the file are caught and folded into that one warning
(``pydicom: ...``), not shown raw. Prepare does not run these checks: its pixels and speed are
unchanged.
Without pydicom a DICOM file raises MissingDependencyError naming the ``dicom`` extra.

Only numpy and PIL are imported at module level; pydicom when a DICOM file is read.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from medattn.boxes import mask_xywh
from medattn.data._images import ImageDecodeError, resize, to_array, to_uint8_linear
from medattn.errors import DataError, MissingDependencyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
LIST_COLUMNS = ("path", "image")   # the CSV column names looked for, in this order
_DICOM_PREAMBLE = 128

# Quality checks (the ImageWarning of read_image). A chest film read as 8 bits spans well over a
# hundred grey levels; 16 or fewer after reading means the file's values fill a sliver of the
# range they were mapped from (typically a DICOM without a window whose data use a few of its
# BitsStored, e.g. pydicom's CT_small: grey 128..136), or a blank/synthetic image. Under 64 px a
# side there is no film left to see at any size a model here is trained on, and a side ratio
# beyond 1:2 is no chest film (stretched, cropped, or a strip of one); both are resized to a
# square like any input, so the model still answers: the warning says not to trust it.
MIN_GREY_LEVELS = 16
MIN_SIDE = 64
MAX_ASPECT = 2.0
# Warning categories that speak to developers, not to whoever runs predict: not folded.
_DEV_WARNINGS = (DeprecationWarning, PendingDeprecationWarning)


class ImageFileError(DataError):
    """An input image file is missing, corrupt, or in a form that cannot be read here.

    Args:
        path: the file.
        reason: what is wrong with it (printed after the path).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, reason)


class ImageWarning(UserWarning):
    """What a user should know about one input image that was read all the same: one warning per
    file, its notes joined in one line (quality notes, then the warnings PIL or pydicom raised
    while reading it).

    Attributes:
        path: the file.
        notes: the notes, each a phrase.
    """

    def __init__(self, path: str | os.PathLike, notes: Iterable[str]):
        self.path = Path(path)
        self.notes = list(notes)
        super().__init__(f"{path}: " + "; ".join(self.notes))


@dataclass
class Loaded:
    """One decoded, converted and resized image (:func:`load_image`)."""

    pixels: np.ndarray          # (S, S, C) uint8
    orig_width: int
    orig_height: int
    conversion: str             # "", "rgba", "16bit", "dicom", "not_1024" or a "+"-joined combination
    notes: list[str] = field(default_factory=list)   # quality notes and folded warnings (check=True)


# ---------------------------------------------------------------- reading one image
def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file starts with the DICOM preamble: 128 bytes, then ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_PREAMBLE + 4)
    except OSError:
        return False
    return head[_DICOM_PREAMBLE:] == b"DICM"


def open_image(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """Open and fully decode a file PIL reads; also says whether it stores 16 bits per sample.

    Raises:
        FileNotFoundError: no such file.
        ImageDecodeError: anything else (corrupt, truncated, not an image).
    """
    try:
        im = Image.open(path)
        # PIL hands 16-bit colour PNGs over as 8-bit RGB (it keeps the high byte); the raw
        # mode of the first tile still tells, before load() drops the tile list.
        wide = any(";16" in str(getattr(t, "args", t[3] if len(t) > 3 else "")) for t in (im.tile or []))
        im.load()  # force the full decode: a truncated IDAT only fails here
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return im, wide


def load_image(path: str | os.PathLike, size: int, channels: int, expected_size: int | None = 1024,
               check: bool = False) -> Loaded:
    """The one image reader: decode a PNG/JPEG (anything PIL reads) or DICOM file, convert it to
    ``channels`` uint8 and resize it to ``size``² (the rules: :mod:`medattn.data._images` and
    this module's docstring). ``medattn prepare`` stores what this returns; predict, eval on
    external data, the report and viz read their files through it (:func:`read_image`).

    Args:
        path: the source image.
        size: output side length S.
        channels: 1 or 3.
        expected_size: the documented source side (1024 for NIH); other sizes are counted as
            ``not_1024``. None: no check.
        check: also run the quality checks (grey levels, size, aspect ratio) on the image as
            read, before the resize, and fold the warnings PIL/pydicom raise while reading it into
            ``notes`` (instead of letting them reach stderr raw). Prepare leaves it off: its
            pixels and speed are what they were.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageDecodeError: the file is corrupt, truncated, not an image, or a DICOM this pydicom
            cannot decode (the reason says why and what to install).
        MissingDependencyError: a DICOM file and no pydicom.
    """
    path = Path(path)
    notes: list[str] = []
    if not check:
        arr, w, h, conv, unwindowed = _decode_file(path, channels)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                arr, w, h, conv, unwindowed = _decode_file(path, channels)
            except ImageDecodeError as e:
                said = _folded(caught)
                if said:  # what the decoder warned before it failed is part of the reason
                    raise ImageDecodeError(f"{e} (while reading: {'; '.join(said)})") from None
                raise
        notes = quality_notes(arr, w, h, unwindowed) + _folded(caught)
    if expected_size is not None and (w, h) != (expected_size, expected_size):
        conv.append("not_1024")
    return Loaded(resize(arr, size), w, h, "+".join(conv), notes)


def _decode_file(path: Path, channels: int) -> tuple[np.ndarray, int, int, list[str], str | None]:
    """(H, W, C) uint8 at the source size, its width and height, the conversions, and the stored
    range a DICOM without a window was mapped from (None otherwise)."""
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom(path):
        return _decode_dicom(path, channels)
    im, wide = open_image(path)
    w, h = im.size
    arr, conv = to_array(im, channels)
    if wide and "16bit" not in conv:
        conv.insert(0, "16bit")
    return arr, w, h, conv, None


def quality_notes(arr: np.ndarray, width: int, height: int, unwindowed: str | None = None) -> list[str]:
    """The quality notes on one image as read (uint8, before the resize): almost no contrast
    (<= MIN_GREY_LEVELS grey levels), smaller than MIN_SIDE px, a side ratio beyond 1:MAX_ASPECT.

    ``unwindowed``: for a DICOM file without a window, the stored range that was mapped to
    0..255 (it says why such a file comes out flat)."""
    notes = []
    levels = int(np.count_nonzero(np.bincount(arr.ravel(), minlength=256)))
    if levels <= MIN_GREY_LEVELS:
        lo, hi = int(arr.min()), int(arr.max())
        note = (f"almost no contrast: {levels} grey level{'s' if levels > 1 else ''} after reading "
                f"({'all ' + str(lo) if lo == hi else f'{lo}..{hi}'})")
        if unwindowed is not None:
            note += (f"; the DICOM file has no window (Window Center/Width or VOI LUT), so its whole stored "
                     f"range {unwindowed} was mapped to 0..255")
        notes.append(note)
    if min(width, height) < MIN_SIDE:
        notes.append(f"{width}x{height} px, smaller than {MIN_SIDE} px")
    if max(width, height) > MAX_ASPECT * min(width, height):
        notes.append(f"{width}x{height} px, an aspect ratio beyond 1:{MAX_ASPECT:g} (stretched or cropped?); "
                     "it is resized to a square like every input")
    return notes


def _folded(caught) -> list[str]:
    """The warnings caught while reading a file, one phrase each (``pydicom: ...``), once each."""
    out: list[str] = []
    for w in caught:
        if issubclass(w.category, _DEV_WARNINGS):
            continue
        text = f"{_origin(w.filename)}: " + " ".join(str(w.message).split())
        if text not in out:
            out.append(text)
    return out


def _origin(filename: str) -> str:
    """The package a warning came from: ``.../site-packages/pydicom/filereader.py`` -> pydicom."""
    parts = Path(filename).parts
    for key in ("site-packages", "dist-packages"):
        if key in parts and parts.index(key) + 1 < len(parts):
            return parts[parts.index(key) + 1].removesuffix(".py")
    return "medattn" if "medattn" in parts else (Path(filename).stem or "warning")


def _missing(path: Path) -> str:
    """Why ``path`` is not a file to read."""
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link (to {os.readlink(path)})"
    return "no such file" if not path.exists() else "not a file"


def read_image(path: str | os.PathLike, size: int, channels: int = 1) -> np.ndarray:
    """Decode one image file to the (size, size, channels) uint8 array prepare would store.

    Args:
        path: a PNG or JPEG (anything PIL reads), or a DICOM file (``.dcm``, ``.dicom`` or any
            name with the DICM preamble).
        size: the prepared side S.
        channels: 1 (gray) or 3 (RGB), as in the prepared dataset.

    Warns:
        ImageWarning: one per file, naming it, when it has almost no contrast, is smaller than
            64 px or stretched beyond 1:2, or when PIL/pydicom warned while reading it (their
            warnings are folded into this one, not shown raw).

    Raises:
        ImageFileError: the file is missing, corrupt, or cannot be decoded (the reason says why).
        MissingDependencyError: a DICOM file and no pydicom.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(path, _missing(path))
    try:
        im = load_image(path, size, channels, expected_size=None, check=True)
    except FileNotFoundError:  # removed since the check above
        raise ImageFileError(path, "no such file") from None
    except ImageDecodeError as e:
        raise ImageFileError(path, str(e)) from None
    if im.notes:
        warnings.warn(ImageWarning(path, im.notes), stacklevel=2)
    return im.pixels


def mask_box(path: str | os.PathLike) -> list[float] | None:
    """Bounding box ``[x, y, w, h]`` of a mask file's nonzero pixels, normalised by the mask's size.

    Returns None for an all-zero mask. Raises FileNotFoundError, or ImageDecodeError for an
    unreadable mask.
    """
    im, _ = open_image(path)
    a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2) if a.shape[2] >= 3 else a[..., 0]
    return mask_xywh(a)


def image_from_array(arr, size: int, channels: int = 1) -> np.ndarray:
    """An image already in memory -> the (size, size, channels) uint8 array prepare would store,
    by the rules a PNG file of the same pixels goes through (so an array and its PNG agree).

    Args:
        arr: (H, W) gray, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8, or uint16 for 16-bit
            gray (scaled ``round(v * 255 / 65535)`` as prepare does). A torch tensor is taken as
            its NumPy array.
        size, channels: as :func:`read_image`.

    Raises:
        ValueError: another shape or dtype (e.g. float: say how it maps to 0..255 by converting).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    a = np.asarray(arr.detach().cpu().numpy() if hasattr(arr, "detach") else arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16 and a.ndim == 2:
        im = Image.fromarray(a)  # mode I;16, as PIL reads a 16-bit PNG
    elif a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        im = Image.fromarray(np.ascontiguousarray(a))
    else:
        raise ValueError(f"image arrays must be (H, W[, 1|3|4]) uint8 or (H, W) uint16, got shape "
                         f"{a.shape} {a.dtype}")
    out, _ = to_array(im, channels)
    return resize(out, size)


# ---------------------------------------------------------------- DICOM
def _pydicom(path: Path):
    try:
        import pydicom
    except ImportError:
        raise MissingDependencyError("pydicom", "dicom", f"needed to read DICOM files such as {path}") from None
    return pydicom


def _helpers():
    """pydicom's pixel-processing functions (pydicom.pixels since 3.0, the handlers' util before)."""
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (apply_color_lut, apply_modality_lut, apply_voi_lut,
                                                      apply_windowing)
    return apply_modality_lut, apply_voi_lut, apply_windowing, apply_color_lut


def _transfer_syntax(ds):
    """The dataset's transfer syntax UID; set from how it was read when the file meta lacks it
    (a ``.dcm`` without preamble and meta header)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = None if meta is None else meta.get("TransferSyntaxUID")
    if ts:
        return ts
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            implicit, little = ds.is_implicit_VR, ds.is_little_endian
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    return ts


# What decodes the compressed syntaxes pydicom itself has no decoder for (its decoder registry ends
# at JPEG, JPEG-LS, JPEG 2000, HTJ2K and RLE). Keyed by the UID's prefix; video and audio syntaxes
# are no single film: the frame to use must be extracted first.
_J2K_PART2 = ("decompress it into an uncompressed transfer syntax with a DICOM toolkit that decodes JPEG 2000 "
              "Part 2 (e.g. GDCM: `gdcmconv --raw IN OUT`), then read that copy")
_NO_PYDICOM_DECODER = (
    ("1.2.840.10008.1.2.4.92", _J2K_PART2),
    ("1.2.840.10008.1.2.4.93", _J2K_PART2),
    ("1.2.840.10008.1.2.4.10", "a video syntax (MPEG-2/H.264/HEVC): extract the frame to use into an image file "
                               "with a video decoder such as ffmpeg"),
    ("1.2.840.10008.1.2.4.20", "JPIP-referenced pixel data is not in the file: fetch it from the JPIP server the "
                               "file names (or ask for the images in a stored syntax)"),
    ("1.2.840.10008.1.2.7.", "an SMPTE ST 2110 video/audio syntax: extract the frame to use into an image file"),
)
# pydicom names a plugin's needs by import name; where the pip package is named otherwise.
_PIP_NAMES = {"gdcm": "python-gdcm"}


def _pip(requirement: str) -> str:
    """``gdcm>=3.0.10`` -> ``python-gdcm>=3.0.10``: the name to give pip."""
    name = requirement.strip()
    for i, ch in enumerate(name):
        if ch in "<>=!~ ;[":
            name = name[:i]
            break
    return _PIP_NAMES.get(name, name) + requirement.strip()[len(name):]


def _plugin_options(decoder) -> list[str]:
    """What to install for each of the decoder's plugins that is not usable here, from pydicom's
    own plugin table: ``pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1 (pydicom's 'pylibjpeg' plugin)``."""
    out = []
    unavailable = getattr(decoder, "_unavailable", None)
    if isinstance(unavailable, dict):
        for plugin, needs in unavailable.items():
            out.append(" and ".join(_pip(n) for n in needs) + f" (pydicom's '{plugin}' plugin)")
        return out
    for dep in decoder.missing_dependencies:  # "pylibjpeg - requires pylibjpeg>=2.0 and ..."
        plugin, _, needs = dep.partition(" - requires ")
        out.append(" and ".join(_pip(n) for n in needs.split(" and ")) + f" (pydicom's '{plugin}' plugin)"
                   if needs else dep)
    return out


def _no_decoder_advice(ts) -> str:
    for prefix, advice in _NO_PYDICOM_DECODER:
        if str(ts).startswith(prefix):
            return advice
    return "decompress it with a DICOM toolkit that decodes it (e.g. GDCM: `gdcmconv --raw IN OUT`), then read the copy"


def _decoder(ts):
    """pydicom's decoder for ``ts`` (None before pydicom 3, which has no decoder registry: its own
    error, which names its handlers' packages, is wrapped after the attempt)."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return None
    try:
        return get_decoder(ts)
    except NotImplementedError:
        raise ImageDecodeError(f"pixel data in transfer syntax {ts.name} ({ts}) cannot be decoded: pydicom has "
                               f"no decoder for it; {_no_decoder_advice(ts)}") from None


def _check_decodable(ts):
    """Refuse, with the syntax's name and what would decode it, pixel data no installed decoder
    can take; returns the decoder (or None, pydicom < 3)."""
    decoder = _decoder(ts)
    if decoder is not None and not decoder.is_available:
        raise ImageDecodeError(f"pixel data in transfer syntax {ts.name} ({ts}) cannot be decoded: no decoder for "
                               "it is installed; install one of: " + "; ".join(_plugin_options(decoder)))
    return decoder


def _decode_failed(ts, decoder, e: Exception) -> str:
    """The reason for pixel data an installed decoder failed on. pydicom tries every available
    plugin and lists what each said; the ones that are not installed might decode it (e.g.
    Pillow reads no 12-bit JPEG Extended, pylibjpeg-libjpeg and GDCM do), so they are named."""
    said = " ".join(str(e).split())
    reason = f"cannot decode the DICOM pixel data (transfer syntax {ts.name}): {type(e).__name__}: {said}"
    if decoder is not None and ts.is_compressed:
        options = _plugin_options(decoder)
        if options:
            reason += ("; other decoders pydicom can use for this syntax are not installed (one may read it): "
                       + "; ".join(options))
    return reason


def _decode_dicom(path: Path, channels: int) -> tuple[np.ndarray, int, int, list[str], str | None]:
    """A DICOM file -> (H, W, C) uint8 at its own size by the module docstring's rules, its width
    and height, the conversions (``dicom``), and the stored range a file without a window was
    mapped from. Errors are ImageDecodeError (the reason; read_image adds the path)."""
    pydicom = _pydicom(path)
    from pydicom.errors import InvalidDicomError

    forced = False
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            if path.suffix.lower() not in DICOM_SUFFIXES:
                raise
            ds = pydicom.dcmread(path, force=True)  # a .dcm without the preamble and meta header
            forced = True
    except FileNotFoundError:
        raise
    except Exception as e:  # InvalidDicomError, EOFError, struct.error, ValueError, ...
        raise ImageDecodeError(f"cannot read DICOM file: {type(e).__name__}: {e}") from None
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            what = "DICOM file: float pixel data is not supported"
        elif forced and sop is None:
            what = "not a DICOM file (no DICM preamble, no SOP class, no pixel data) and not an image PIL reads"
        else:
            what = "DICOM file without pixel data (not an image object, or corrupt)"
        raise ImageDecodeError(what + (f"; SOP class {sop.name}" if sop else ""))
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise ImageDecodeError(f"DICOM file has {frames} frames; a chest film is one frame: extract the frame to "
                               "use into its own file")
    ts = _transfer_syntax(ds)
    decoder = _check_decodable(ts)
    try:
        arr = ds.pixel_array
    except Exception as e:  # truncated pixel data, decoder failures, pydicom 2.x missing handlers
        raise ImageDecodeError(_decode_failed(ts, decoder, e)) from None

    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    unwindowed = None
    try:
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim != 2:
                raise ValueError(f"expected one gray frame, got pixel array shape {arr.shape}")
            gray, unwindowed = _dicom_gray(ds, arr, invert=pi == "MONOCHROME1")
            im = Image.fromarray(gray, "L")
        elif pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"):
            im = Image.fromarray(_dicom_rgb(ds, arr, pi), "RGB")
        else:
            raise ValueError(f"photometric interpretation {pi or '(none)'!r} is not supported")
    except (ValueError, NotImplementedError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise ImageDecodeError(f"DICOM file: {e}") from None
    out, conv = to_array(im, channels)
    return out, im.size[0], im.size[1], ["dicom", *conv], unwindowed


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _dicom_gray(ds, arr: np.ndarray, invert: bool) -> tuple[np.ndarray, str | None]:
    """Modality LUT, VOI LUT or window, scale to 0..255, MONOCHROME1 inversion (module docstring).
    Also returns, for a file without a window, the range mapped to 0..255 (``"0..65535"``)."""
    apply_modality_lut, apply_voi_lut, apply_windowing, _ = _helpers()
    values = apply_modality_lut(arr, ds)
    unwindowed = None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if _has_voi_lut(ds):
        if values.dtype.kind == "f":  # the LUT indexes integers; rescaled values are whole numbers
            values = np.rint(values).astype(np.int64)
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        lo, hi = 0, (1 << int(ds.VOILUTSequence[0].LUTDescriptor[2])) - 1
    elif has_window:
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        # The range pydicom spreads the window over: the window function's two extremes.
        with np.errstate(all="ignore"):
            ends = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
        lo, hi = float(np.min(ends)), float(np.max(ends))
    else:
        out = values
        smin, smax = _stored_range(ds)
        stored = np.arange(smin, smax + 1) if smax - smin < (1 << 16) else np.array([smin, smax])
        probe = apply_modality_lut(stored, ds)  # what the Modality LUT makes of every stored value
        lo, hi = float(np.min(probe)), float(np.max(probe))
        unwindowed = "..".join(str(int(v)) if v.is_integer() else f"{v:g}" for v in (lo, hi))
    if not hi > lo:
        raise ValueError(f"the Modality/VOI transform maps every stored value to {lo}")
    gray = to_uint8_linear(out, lo, hi)
    return (255 - gray if invert else gray), unwindowed


def _dicom_rgb(ds, arr: np.ndarray, pi: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB: palette applied, YBR converted (pydicom < 3 only; pydicom 3's
    pixel_array already returns RGB), wide samples scaled to 8 bits."""
    *_, apply_color_lut = _helpers()
    if pi == "PALETTE COLOR":
        if arr.ndim != 2:
            raise ValueError(f"expected one palette frame, got pixel array shape {arr.shape}")
        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        import pydicom

        if pi.startswith("YBR_FULL") and int(pydicom.__version__.split(".")[0]) < 3:
            from pydicom.pixel_data_handlers.util import convert_color_space

            arr = convert_color_space(arr, pi, "RGB")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected one RGB frame, got pixel array shape {arr.shape}")
    if arr.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(arr)
    return to_uint8_linear(arr, 0, (1 << bits) - 1)


# ---------------------------------------------------------------- which files
class Inputs(NamedTuple):
    """What :func:`expand_inputs` found: the image files to read, and what was named but cannot be
    read, each with the reason (dangling links, missing list rows, folders that cannot be listed);
    the caller names each problem, reads the files, and fails at the end (predict: exit 1)."""

    files: list[Path]
    problems: list[tuple[Path, str]]


def expand_inputs(items: Iterable[str | os.PathLike] | str | os.PathLike) -> Inputs:
    """The image files named by ``items``: sorted absolute paths, each once, and the problems.

    Each item is one of:

    - a folder: every image below it, recursively -- ``*.png, *.jpg, *.jpeg, *.dcm, *.dicom``
      (any case) and any other file with the DICOM preamble (extension-less or UID-named DICOM
      files). Names starting with ``.`` (hidden files and folders) are skipped. Symbolic links
      are followed, to files and to folders; a folder reached twice (a link to a parent, or two
      links to one folder) is listed once, under the first path it was reached by (names sorted),
      so a link loop ends.
    - a ``.txt`` list: one path per line, relative to the list's folder (or absolute); blank lines
      and lines starting with ``#`` are skipped.
    - a ``.csv`` list: the column named ``path``, else ``image`` (case-insensitive), else the
      first column; paths relative to the list's folder. The first row is the header, except
      when there is no ``path``/``image`` column and its first cell names an image (an image
      extension, or an existing file): then the list has no header.
    - any other file: that file.

    Problems, returned as ``(path, reason)`` and not raised, so that one broken entry does not
    lose the batch: a dangling symbolic link (named on the command line, or in a folder when its
    name or target has an image extension or none), a list row naming a missing file or a folder
    (the path is the missing file; the reason names the list and row), an empty CSV path cell
    (the path is the list), a subfolder that cannot be listed.

    Paths are made absolute without resolving symbolic links.

    Raises:
        DataError: naming the item, when an item does not exist at all (a typo: nothing is read),
            a folder holds no images (and no problems), or a list is unreadable or names no files.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    found: dict[str, Path] = {}
    problems: dict[str, tuple[Path, str]] = {}
    for item in items:
        p = Path(item).expanduser()
        bad: list[tuple[Path, str]] = []
        if p.is_symlink() and not p.exists():
            bad.append((p, _missing(p)))
            files = []
        elif not p.exists():
            raise DataError(p, "no such file or folder")
        elif p.is_dir():
            files = _scan_folder(p, bad)
            if not files and not bad:
                raise DataError(p, "no image files in this folder (looked for " + ", ".join(
                    f"*{s}" for s in IMAGE_SUFFIXES) + " and DICOM files by content)")
        elif p.suffix.lower() == ".txt":
            files = _read_txt_list(p, bad)
        elif p.suffix.lower() == ".csv":
            files = _read_csv_list(p, bad)
        else:
            files = [p]
        for f in files:
            a = Path(os.path.abspath(f))
            found.setdefault(str(a), a)
        for f, why in bad:
            a = Path(os.path.abspath(f))
            problems.setdefault(f"{a}\0{why}", (a, why))
    return Inputs([found[k] for k in sorted(found)], [problems[k] for k in sorted(problems)])


def _may_be_image(name: str) -> bool:
    """An image extension, or none (DICOM files often have none): a dangling link so named was
    meant as an input."""
    suffix = Path(name).suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix == ""


def _scan_folder(root: Path, problems: list[tuple[Path, str]]) -> list[Path]:
    out = []
    seen: set[tuple[int, int]] = set()

    def unlistable(e: OSError) -> None:
        problems.append((Path(e.filename), f"cannot list this folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            unlistable(e)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: listed already
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            if f.is_symlink() and not f.exists():
                if _may_be_image(name) or _may_be_image(os.readlink(f)):
                    problems.append((f, _missing(f)))
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f):
                out.append(f)
    return out


def _list_entry(lst: Path, text: str, row: int, problems: list[tuple[Path, str]]) -> Path | None:
    q = Path(text).expanduser()
    if not q.is_absolute():
        q = lst.parent / q
    if q.is_file():
        return q
    problems.append((q, f"{_missing(q)} (listed in {lst}, row {row}, as {text!r})"))
    return None


def _open_list(lst: Path):
    try:
        return open(lst, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(lst, f"cannot read the list: {e.strerror or e}") from None


def _read_txt_list(lst: Path, problems: list[tuple[Path, str]]) -> list[Path]:
    out, rows = [], 0
    try:
        with _open_list(lst) as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(lst, f"not a UTF-8 text list: {e}") from None
    for row, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            rows += 1
            q = _list_entry(lst, text, row, problems)
            if q is not None:
                out.append(q)
    if not rows:
        raise DataError(lst, "the list names no files")
    return out


def _read_csv_list(lst: Path, problems: list[tuple[Path, str]]) -> list[Path]:
    try:
        with _open_list(lst) as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(lst, f"not a readable CSV list: {e}") from None
    if not rows:
        raise DataError(lst, "the list names no files")
    header = [c.strip().lower() for c in rows[0][1]]
    col, start = 0, 1
    for name in LIST_COLUMNS:
        if name in header:
            col = header.index(name)
            break
    else:
        first = rows[0][1][0].strip()
        if Path(first).suffix.lower() in IMAGE_SUFFIXES or (first and (lst.parent / first).is_file()):
            start = 0  # no header: the first row is already a file
    if not rows[start:]:
        raise DataError(lst, "the list names no files (only a header)")
    out = []
    for row, cells in rows[start:]:
        text = cells[col].strip() if col < len(cells) else ""
        if not text:
            where = f"row {row}" + (f", column {rows[0][1][col].strip()!r}" if start else "")
            problems.append((lst, f"{where}: empty path cell"))
            continue
        q = _list_entry(lst, text, row, problems)
        if q is not None:
            out.append(q)
    return out
