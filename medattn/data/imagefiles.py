"""Read arbitrary chest-film files into exactly the pixels ``medattn prepare`` would have produced.

A model trained on prepared data sees (S, S, C) uint8 arrays made by medattn.data._images:
colour -> gray (R channel when R = G = B, else PIL's ITU-R 601 luma), 16-bit gray ->
``round(v * 255 / 65535)``, LANCZOS resize to S x S. :func:`read_image` gives the same array for
any PNG or JPEG (it *is* prepare's decoder) and for DICOM files, which go through the rules
below and then the same conversion and resize. :func:`expand_inputs` turns files, folders and
list files into the list of images to read.

PNG / JPEG (any mode PIL reads: 8- and 16-bit gray, RGB, RGBA, LA, P): decoded, converted and
resized by prepare's own functions (``_images.load_image``), so the result is byte-identical to a
prepared shard sample of the same file.

DICOM (``*.dcm``, ``*.dicom``, or any file with ``DICM`` at byte 128, whatever its name). Needs
pydicom (``pip install 'medattn[dicom]'``); the pixel processing is pydicom's own
(``apply_modality_lut``, ``apply_voi_lut``, ``apply_color_lut``), the rest is stated here:

1. One frame. A file with Number of Frames > 1 is refused: a chest film is one frame, and there
   is no frame that is right to pick for every multi-frame object (tomosynthesis slices,
   dual-energy pairs, cine), so the user extracts the one they mean.
2. Decoding: ``pixel_array``. A compressed transfer syntax whose decoder is not installed is
   refused up front with its name and the decoder packages pydicom would use for it (e.g.
   JPEG-LS: pylibjpeg + pylibjpeg-libjpeg, pyjpegls or gdcm); a syntax pydicom cannot decode at
   all is named as such.
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

Errors are :class:`ImageFileError` (a DataError, so the CLI prints it with the path): missing,
corrupt or truncated files, undecodable transfer syntaxes, multi-frame or non-image DICOM objects.
Without pydicom a DICOM file raises MissingDependencyError naming the ``dicom`` extra.

Only numpy and PIL are imported at module level; pydicom when a DICOM file is read.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from medattn.data._images import ImageDecodeError, load_image, resize, to_array, to_uint8_linear
from medattn.errors import DataError, MissingDependencyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
LIST_COLUMNS = ("path", "image")   # the CSV column names looked for, in this order
_DICOM_PREAMBLE = 128


class ImageFileError(DataError):
    """An input image file is missing, corrupt, or in a form that cannot be read here.

    Args:
        path: the file.
        reason: what is wrong with it (printed after the path).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, reason)


# ---------------------------------------------------------------- reading one image
def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file starts with the DICOM preamble: 128 bytes, then ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_PREAMBLE + 4)
    except OSError:
        return False
    return head[_DICOM_PREAMBLE:] == b"DICM"


def read_image(path: str | os.PathLike, size: int, channels: int = 1) -> np.ndarray:
    """Decode one image file to the (size, size, channels) uint8 array prepare would store.

    Args:
        path: a PNG or JPEG (anything PIL reads), or a DICOM file (``.dcm``, ``.dicom`` or any
            name with the DICM preamble).
        size: the prepared side S.
        channels: 1 (gray) or 3 (RGB), as in the prepared dataset.

    Raises:
        ImageFileError: the file is missing, corrupt, or cannot be decoded (the reason says why).
        MissingDependencyError: a DICOM file and no pydicom.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(path, "no such file" if not path.exists() else "not a file")
    if is_dicom(path) or path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path, size, channels)
    try:
        return load_image(path, size, channels, expected_size=None).pixels
    except ImageDecodeError as e:
        raise ImageFileError(path, str(e)) from None


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


def _check_decodable(path: Path, ts) -> None:
    """Refuse, with the syntax's name and what would decode it, pixel data this pydicom cannot
    decode. pydicom < 3 has no decoder registry: its own error is wrapped after the attempt."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageFileError(path, f"pixel data in transfer syntax {ts.name} ({ts}) cannot be decoded: "
                                   "pydicom has no decoder for it") from None
    if not decoder.is_available:
        options = []
        for dep in decoder.missing_dependencies:  # "pylibjpeg - requires pylibjpeg>=2.0 and ..."
            plugin, _, needs = dep.partition(" - requires ")
            options.append(f"{needs} (pydicom's '{plugin}' plugin)" if needs else dep)
        raise ImageFileError(path, f"pixel data in transfer syntax {ts.name} ({ts}) cannot be decoded: no "
                                   "decoder for it is installed; install one of: " + "; ".join(options))


def _read_dicom(path: Path, size: int, channels: int) -> np.ndarray:
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
    except Exception as e:  # InvalidDicomError, EOFError, struct.error, ValueError, ...
        raise ImageFileError(path, f"cannot read DICOM file: {type(e).__name__}: {e}") from None
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            what = "DICOM file: float pixel data is not supported"
        elif forced and sop is None:
            what = "not a DICOM file (no DICM preamble, no SOP class, no pixel data) and not an image PIL reads"
        else:
            what = "DICOM file without pixel data (not an image object, or corrupt)"
        raise ImageFileError(path, what + (f"; SOP class {sop.name}" if sop else ""))
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise ImageFileError(path, f"DICOM file has {frames} frames; a chest film is one frame: extract the "
                                   "frame to use into its own file")
    ts = _transfer_syntax(ds)
    _check_decodable(path, ts)
    try:
        arr = ds.pixel_array
    except Exception as e:  # truncated pixel data, decoder failures, pydicom 2.x missing handlers
        raise ImageFileError(path, f"cannot decode the DICOM pixel data (transfer syntax {ts.name}): "
                                   f"{type(e).__name__}: {e}") from None

    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim != 2:
                raise ValueError(f"expected one gray frame, got pixel array shape {arr.shape}")
            im = Image.fromarray(_dicom_gray(ds, arr, invert=pi == "MONOCHROME1"), "L")
        elif pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"):
            im = Image.fromarray(_dicom_rgb(ds, arr, pi), "RGB")
        else:
            raise ValueError(f"photometric interpretation {pi or '(none)'!r} is not supported")
    except ImageFileError:
        raise
    except (ValueError, NotImplementedError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise ImageFileError(path, f"DICOM file: {e}") from None
    arr, _ = to_array(im, channels)
    return resize(arr, size)


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _dicom_gray(ds, arr: np.ndarray, invert: bool) -> np.ndarray:
    """Modality LUT, VOI LUT or window, scale to 0..255, MONOCHROME1 inversion (module docstring)."""
    apply_modality_lut, apply_voi_lut, apply_windowing, _ = _helpers()
    values = apply_modality_lut(arr, ds)
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
    if not hi > lo:
        raise ValueError(f"the Modality/VOI transform maps every stored value to {lo}")
    gray = to_uint8_linear(out, lo, hi)
    return 255 - gray if invert else gray


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
def expand_inputs(items: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """The image files named by ``items``: sorted absolute paths, each once.

    Each item is one of:

    - a folder: every image below it, recursively -- ``*.png, *.jpg, *.jpeg, *.dcm, *.dicom``
      (any case) and any other file with the DICOM preamble (extension-less or UID-named DICOM
      files). Names starting with ``.`` (hidden files and folders) are skipped, and symbolic
      links to folders are not followed (links to files are taken).
    - a ``.txt`` list: one path per line, relative to the list's folder (or absolute); blank lines
      and lines starting with ``#`` are skipped.
    - a ``.csv`` list: the column named ``path``, else ``image`` (case-insensitive), else the
      first column; paths relative to the list's folder. The first row is the header, except
      when there is no ``path``/``image`` column and its first cell names an image (an image
      extension, or an existing file): then the list has no header.
    - any other file: that file.

    Paths are made absolute without resolving symbolic links. Raises DataError naming the item
    when it does not exist, a folder holds no images, a list is empty, or (with the row) when a
    list row names a missing file.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    found: dict[str, Path] = {}
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise DataError(p, "no such file or folder")
        if p.is_dir():
            files = _scan_folder(p)
            if not files:
                raise DataError(p, "no image files in this folder (looked for " + ", ".join(
                    f"*{s}" for s in IMAGE_SUFFIXES) + " and DICOM files by content)")
        elif p.suffix.lower() == ".txt":
            files = _read_txt_list(p)
        elif p.suffix.lower() == ".csv":
            files = _read_csv_list(p)
        else:
            files = [p]
        for f in files:
            a = Path(os.path.abspath(f))
            found.setdefault(str(a), a)
    return [found[k] for k in sorted(found)]


def _scan_folder(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            if f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f):
                out.append(f)
    return out


def _list_entry(lst: Path, text: str, row: int) -> Path:
    q = Path(text).expanduser()
    if not q.is_absolute():
        q = lst.parent / q
    if not q.is_file():
        raise DataError(lst, f"{text!r} ({q}): " + ("not a file" if q.exists() else "no such file"), row=row)
    return q


def _open_list(lst: Path):
    try:
        return open(lst, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(lst, f"cannot read the list: {e.strerror or e}") from None


def _read_txt_list(lst: Path) -> list[Path]:
    out = []
    try:
        with _open_list(lst) as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(lst, f"not a UTF-8 text list: {e}") from None
    for row, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append(_list_entry(lst, text, row))
    if not out:
        raise DataError(lst, "the list names no files")
    return out


def _read_csv_list(lst: Path) -> list[Path]:
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
    out = []
    for row, cells in rows[start:]:
        text = cells[col].strip() if col < len(cells) else ""
        if not text:
            raise DataError(lst, "empty path cell", row=row, column=rows[0][1][col].strip() if start else None)
        out.append(_list_entry(lst, text, row))
    if not out:
        raise DataError(lst, "the list names no files (only a header)")
    return out
