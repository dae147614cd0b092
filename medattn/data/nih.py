"""Readers for the real NIH ChestX-ray14 files: metadata, boxes, split lists and image layouts.

Every reader accepts the plain file and its gzipped copy (``name.gz``), checks what it reads, and
raises :class:`~medattn.errors.DataError` naming the file and the 1-based line for anything that
is malformed. The formats are described byte by byte in the project's research notes
(``chestxray14.md`` sections 1 and 9) and summarised in ``docs/data-format.md`` section 1.

Three real formattings of the metadata CSV exist, plus Kaggle's 5 % sample; they are told apart
from the content (:func:`read_data_entry` documents how) and all parse to the same columns.

Leniencies, each needed by a real copy of the files and nothing more:

* a header with or without a trailing comma (an extra empty column), and rows that end with one
  empty field (PyHealth's v2020 copy has a trailing comma on every row);
* ``Patient Gender`` or ``Patient Sex``; ``OriginalImage[Width,Height]`` or ``OriginalImageWidth``
  / ``OriginalImageHeight`` (Kaggle's sample); other extra named columns are ignored;
* CRLF or LF line endings, a UTF-8 byte-order mark (Excel-resaved copies), blank lines at the end
  of a file, surrounding spaces in a field;
* zero-padded ``Patient ID`` / ``Follow-up #``; ages ``58``, ``058Y``, ``011M``, ``001D``;
* ``Infiltrate`` (box list) and ``No_Finding`` (Kaggle's sample) are mapped to the canonical names;
* a box-list header truncated to ``Image Index,Finding Label,Bbox [x,y,w,h]`` (Excel re-saves).

Example:
    >>> meta = load_nih(bundled_nih_dir())       # the real metadata shipped with medattn
    >>> len(meta.entries), meta.variant
    (112120, 'v2020')
"""
from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medattn.data.labels import DISEASES, NIH_LABELS, NO_FINDING, canonical_label, parse_finding_labels
from medattn.errors import DataError

IMAGE_SIZE = 1024  # every ChestX-ray14 PNG is 1024x1024; boxes are in this pixel space

ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # first found wins
BOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_NAME = "train_val_list.txt"
TEST_NAME = "test_list.txt"
CHEXNET_DIRS = ("chexnet_split", "labels")  # medattn's layout, arnoweng/CheXNet's layout
CHEXNET_PARTS = ("train", "val", "test")
VARIANTS = ("2017", "updated", "v2020", "sample")

ENTRY_COLUMNS = ("image", "patient", "follow_up", "age", "sex", "view", "labels",
                 "orig_width", "orig_height", "source_row")
BOX_COLUMNS = ("image", "label", "x", "y", "w", "h", "source_row")

# Header field (as split on commas) -> output column.
_ENTRY_HEADER = {
    "Image Index": "image",
    "Finding Labels": "labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "Patient Sex": "sex",
    "View Position": "view",
    "OriginalImage[Width": "orig_width",
    "Height]": "orig_height",
    "OriginalImageWidth": "orig_width",
    "OriginalImageHeight": "orig_height",
}
# How a missing column is named in an error message.
_ENTRY_REQUIRED = {
    "image": "Image Index",
    "labels": "Finding Labels",
    "follow_up": "Follow-up #",
    "patient": "Patient ID",
    "age": "Patient Age",
    "sex": "Patient Gender (or Patient Sex)",
    "view": "View Position",
    "orig_width": "OriginalImage[Width",
    "orig_height": "Height]",
}
_SEXES = ("M", "F")
_VIEWS = ("PA", "AP")
# Age units of the 2017 original: years, months, days.
_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)([YMD]?)")
_AGE_UNIT = {"": 1.0, "Y": 1.0, "M": 12.0, "D": 365.25}


# ----------------------------------------------------------------------------- text helpers
def _resolve(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path.gz`` when only the gzipped copy exists."""
    p = Path(path)
    if not p.exists() and not p.name.endswith(".gz"):
        gz = p.with_name(p.name + ".gz")
        if gz.exists():
            return gz
    return p


def _split_header(line: str) -> tuple[list[str], int]:
    """Header fields (stripped) and how many of them are named: NIH headers end in empty fields
    from trailing commas (``Bbox [x,y,w,h],,,``; the 2017 file's ``...PixelSpacing[x,y],``)."""
    header = [h.strip() for h in line.split(",")]
    n_named = len(header)
    while n_named and not header[n_named - 1]:
        n_named -= 1
    return header, n_named


def _read_lines(path: str | os.PathLike) -> tuple[Path, list[str], bool]:
    """Read a text file (plain or .gz) into lines without their line endings.

    Returns (resolved path, lines, crlf). Trailing blank lines are dropped; line i of the file is
    ``lines[i - 1]``.
    """
    p = _resolve(path)
    if not p.is_file():
        raise DataError(p, "file not found" if not p.exists() else "not a regular file")
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as f:
                data = f.read()
        else:
            data = p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(p, f"unreadable: {e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM written by Excel
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(p, f"not UTF-8 text (byte {e.start} is {data[e.start]:#04x})",
                        row=data.count(b"\n", 0, e.start) + 1) from None
    first_nl = text.find("\n")
    crlf = first_nl > 0 and text[first_nl - 1] == "\r"
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        bare = text.find("\r")
        if bare >= 0:
            raise DataError(p, "bare carriage return (a line ending that is neither LF nor CRLF)",
                            row=text.count("\n", 0, bare) + 1)
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return p, lines, crlf


def _uint(text: str) -> int | None:
    """A non-negative decimal integer (zero padding allowed), or None."""
    return int(text) if text.isascii() and text.isdigit() else None


def parse_age(text: str) -> float:
    """Age in years from a ``Patient Age`` field.

    ``58`` and ``058Y`` are years, ``011M`` months (11/12 years), ``001D`` days (1/365.25 years);
    an empty field is NaN. Raises ValueError for anything else.
    """
    text = text.strip()
    if not text:
        return math.nan
    m = _AGE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"unparsable age {text!r} (expected e.g. 58, 058Y, 011M or 001D)")
    return float(m.group(1)) / _AGE_UNIT[m.group(2)]


# ----------------------------------------------------------------------------- Data_Entry
def read_data_entry(path: str | os.PathLike) -> tuple[pd.DataFrame, str]:
    """Read ``Data_Entry_2017*.csv`` (any real formatting, plain or .gz).

    Args:
        path: the CSV file.

    Returns:
        (entries, variant). ``entries`` has the columns ``ENTRY_COLUMNS``, one row per image,
        sorted by image id: image (str), patient and follow_up (int64), age (float years, NaN
        when empty), sex, view (str), labels (list of canonical label names, ``['No Finding']``
        for normal images), orig_width, orig_height (int64) and source_row (1-based line).
        ``variant`` is detected from the content, in this order:

        * ``"sample"``: Kaggle's 5 % sample header (``OriginalImageWidth`` ...);
        * ``"2017"``: the October 2017 original, recognised by ages with a unit letter (``058Y``);
        * ``"v2020"``: ``Data_Entry_2017_v2020.csv`` -- a header without the trailing comma, or
          ``Patient Sex``, or rows ending with a comma, or (when nothing else decides) a file name
          containing ``v2020``;
        * ``"updated"``: Kaggle's updated file (original header with trailing comma, plain ints).

        Ages are kept as written (the 2017 and updated files contain a few ages above 100, and the
        updated file lost the month/day unit of 27 ages); filter them before using age as a
        feature.

    Raises:
        DataError: naming the file and row for missing columns, a row with the wrong number of
        fields, an unknown label, a duplicate image id, an unparsable age, id, sex, view or size.
    """
    p, lines, _crlf = _read_lines(path)
    if not lines:
        raise DataError(p, "empty file (expected a header line and one row per image)")
    header, n_named = _split_header(lines[0])
    header_trailing = n_named < len(header)
    # Logical columns -> field positions; the bracketed size header spans two comma fields.
    pos: dict[str, int] = {}
    for i, name in enumerate(header[:n_named]):
        col = _ENTRY_HEADER.get(name)
        if col is None:
            continue  # unknown extra columns (e.g. pixel spacing) are not needed
        if col in pos:
            raise DataError(p, f"columns {header[pos[col]]!r} and {name!r} both give {col}", row=1)
        pos[col] = i
    missing = [label for col, label in _ENTRY_REQUIRED.items() if col not in pos]
    if missing:
        raise DataError(p, f"missing required column(s): {', '.join(missing)} (header: {lines[0].strip()!r})",
                        row=1)
    sex_header = header[pos["sex"]]
    sample_header = header[pos["orig_width"]] == "OriginalImageWidth"
    # Rows may carry one trailing empty field more than the named columns, or as many as the
    # header has (PyHealth's v2020 copy ends header and rows with a comma).
    max_fields = max(len(header), n_named + 1)

    i_img, i_lab, i_fu, i_pat = pos["image"], pos["labels"], pos["follow_up"], pos["patient"]
    i_age, i_sex, i_view, i_w, i_h = pos["age"], pos["sex"], pos["view"], pos["orig_width"], pos["orig_height"]
    images: list[str] = []
    patients: list[int] = []
    follow: list[int] = []
    ages: list[float] = []
    sexes: list[str] = []
    views: list[str] = []
    labels: list[list[str]] = []
    widths: list[int] = []
    heights: list[int] = []
    rows: list[int] = []
    seen: dict[str, int] = {}
    age_cache: dict[str, float] = {}
    ints: dict[str, int | None] = {}  # raw field -> value; ids and sizes repeat a lot
    label_cache: dict[str, tuple[str, ...]] = {}
    unit_ages = False
    trailing_rows = False

    for row, line in enumerate(lines[1:], start=2):
        f = line.split(",")
        if len(f) != n_named:
            if not line.strip():
                raise DataError(p, "empty line inside the file", row=row)
            if not (n_named < len(f) <= max_fields and not "".join(f[n_named:]).strip()):
                raise DataError(p, f"expected {n_named} comma-separated fields (as in the header), "
                                   f"found {len(f)}: {line.strip()[:120]!r}", row=row)
            trailing_rows = True
        image = f[i_img].strip()
        if not image.endswith(".png") or "/" in image or "\\" in image or " " in image:
            raise DataError(p, f"bad image id {image!r} (expected a file name like 00000001_000.png)",
                            row=row, column="Image Index")
        prev = seen.get(image)
        if prev is not None:
            raise DataError(p, f"duplicate image id {image} (also on row {prev})", row=row)
        seen[image] = row

        raw = f[i_lab]
        labs = label_cache.get(raw)
        if labs is None:
            raw = raw.strip()
            if not raw:
                raise DataError(p, f"empty Finding Labels for {image}", row=row, column="Finding Labels")
            try:
                labs = tuple(parse_finding_labels(raw))
            except ValueError as e:
                raise DataError(p, f"{e} for {image}", row=row, column="Finding Labels") from None
            if NO_FINDING in labs and len(labs) > 1:
                raise DataError(p, f"'No Finding' together with other labels ({raw!r}) for {image}",
                                row=row, column="Finding Labels")
            label_cache[f[i_lab]] = labs

        pat = ints.get(f[i_pat])
        if pat is None:
            pat = ints[f[i_pat]] = _uint(f[i_pat].strip())
        if pat is None:
            raise DataError(p, f"unparsable Patient ID {f[i_pat].strip()!r} for {image}", row=row,
                            column=header[i_pat])
        fu = ints.get(f[i_fu])
        if fu is None:
            fu = ints[f[i_fu]] = _uint(f[i_fu].strip())
        if fu is None:
            raise DataError(p, f"unparsable Follow-up # {f[i_fu].strip()!r} for {image}", row=row,
                            column=header[i_fu])
        a = f[i_age]
        age = age_cache.get(a)
        if age is None:
            try:
                age = parse_age(a)
            except ValueError as e:
                raise DataError(p, f"{e} for {image}", row=row, column=header[i_age]) from None
            age_cache[a] = age
            if a.strip()[-1:] in ("Y", "M", "D"):
                unit_ages = True
        sex = f[i_sex]
        if sex not in _SEXES:
            sex = sex.strip()
        if sex not in _SEXES:
            raise DataError(p, f"unknown {sex_header} {sex!r} for {image} (expected M or F)", row=row,
                            column=sex_header)
        view = f[i_view]
        if view not in _VIEWS:
            view = view.strip()
        if view not in _VIEWS:
            raise DataError(p, f"unknown View Position {view!r} for {image} (expected PA or AP)", row=row,
                            column="View Position")
        w, h = ints.get(f[i_w]), ints.get(f[i_h])
        if w is None:
            w = ints[f[i_w]] = _uint(f[i_w].strip())
        if h is None:
            h = ints[f[i_h]] = _uint(f[i_h].strip())
        if not w or not h:
            bad = header[i_w] if not w else header[i_h]
            raise DataError(p, f"original image size must be positive integers, got "
                               f"{f[i_w].strip()!r} x {f[i_h].strip()!r} for {image}", row=row, column=bad)
        images.append(image)
        patients.append(pat)
        follow.append(fu)
        ages.append(age)
        sexes.append(sex)
        views.append(view)
        labels.append(list(labs))
        widths.append(w)
        heights.append(h)
        rows.append(row)

    if not images:
        raise DataError(p, "no data rows after the header")
    if sample_header:
        variant = "sample"
    elif unit_ages:
        variant = "2017"
    elif not header_trailing or sex_header == "Patient Sex" or trailing_rows or "v2020" in p.name:
        variant = "v2020"
    else:
        variant = "updated"

    df = pd.DataFrame({
        "image": pd.array(images, dtype="str"),
        "patient": np.asarray(patients, dtype=np.int64),
        "follow_up": np.asarray(follow, dtype=np.int64),
        "age": np.asarray(ages, dtype=np.float64),
        "sex": pd.array(sexes, dtype="str"),
        "view": pd.array(views, dtype="str"),
        "labels": pd.Series(labels, dtype=object),
        "orig_width": np.asarray(widths, dtype=np.int64),
        "orig_height": np.asarray(heights, dtype=np.int64),
        "source_row": np.asarray(rows, dtype=np.int64),
    })
    order = np.argsort(np.asarray(images, dtype=object), kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        df = df.iloc[order].reset_index(drop=True)
    return df, variant


# ----------------------------------------------------------------------------- BBox_List
def read_bbox_list(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``BBox_List_2017.csv`` (plain or .gz).

    Args:
        path: the CSV file.

    Returns:
        DataFrame with ``BOX_COLUMNS`` in file order: image, label (canonical: ``Infiltrate`` ->
        ``Infiltration``), x, y, w, h (float, top-left corner and size in pixels of the 1024x1024
        PNG) and source_row (1-based line).

    Raises:
        DataError: naming file and row for a wrong header, a row with the wrong number of fields,
        an unknown label, unparsable numbers, a non-positive size or a box outside the image.
    """
    p, lines, _ = _read_lines(path)
    if not lines:
        raise DataError(p, "empty file (expected a header line and one row per box)")
    header, n_named = _split_header(lines[0])
    coords = [h.lower() for h in header[2:n_named]]
    if (header[:2] != ["Image Index", "Finding Label"]
            or coords not in (["bbox [x", "y", "w", "h]"], ["x", "y", "w", "h"])):
        raise DataError(p, f"unexpected header {lines[0].strip()!r} (expected "
                           f"'Image Index,Finding Label,Bbox [x,y,w,h]')", row=1)
    max_fields = max(len(header), 7)
    out: dict[str, list] = {c: [] for c in BOX_COLUMNS}
    for row, line in enumerate(lines[1:], start=2):
        f = line.split(",")
        if len(f) != 6:
            if not line.strip():
                raise DataError(p, "empty line inside the file", row=row)
            if not (6 < len(f) <= max_fields and not "".join(f[6:]).strip()):
                raise DataError(p, f"expected 6 comma-separated fields (image, label, x, y, w, h), "
                                   f"found {len(f)}: {line.strip()[:120]!r}", row=row)
        image = f[0].strip()
        if not image.endswith(".png"):
            raise DataError(p, f"bad image id {image!r}", row=row, column="Image Index")
        label = canonical_label(f[1])
        if label is None or label not in DISEASES:
            raise DataError(p, f"unknown box label {f[1].strip()!r} for {image} (expected one of "
                               f"{', '.join(DISEASES)}; 'Infiltrate' is accepted)", row=row,
                            column="Finding Label")
        try:
            x, y, w, h = (float(v) for v in f[2:6])
        except ValueError:
            raise DataError(p, f"unparsable box coordinates {','.join(f[2:6])!r} for {image}", row=row) from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DataError(p, f"non-finite box coordinates {','.join(f[2:6])!r} for {image}", row=row)
        if w <= 0 or h <= 0:
            raise DataError(p, f"box of {image} has non-positive size w={w:g}, h={h:g}", row=row)
        eps = 1e-6  # coordinates are printed with 15 significant digits
        if x < -eps or y < -eps or x + w > IMAGE_SIZE + eps or y + h > IMAGE_SIZE + eps:
            raise DataError(p, f"box of {image} (x={x:g}, y={y:g}, w={w:g}, h={h:g}) lies outside the "
                               f"{IMAGE_SIZE}x{IMAGE_SIZE} image", row=row)
        for c, v in zip(BOX_COLUMNS, (image, label, x, y, w, h, row)):
            out[c].append(v)
    return _box_frame(out)


def _box_frame(cols: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame({
        "image": pd.array(cols["image"], dtype="str"),
        "label": pd.array(cols["label"], dtype="str"),
        **{c: np.asarray(cols[c], dtype=np.float64) for c in ("x", "y", "w", "h")},
        "source_row": np.asarray(cols["source_row"], dtype=np.int64),
    })


# ----------------------------------------------------------------------------- split lists
def read_image_list(path: str | os.PathLike) -> list[str]:
    """Read ``train_val_list.txt`` / ``test_list.txt`` (plain or .gz): one image id per line.

    The official lists have no newline after the last line; surrounding spaces are stripped.

    Raises:
        DataError: for a missing or empty file, a line that is not a single image id, or a
        duplicate id (naming both lines).
    """
    p, lines, _ = _read_lines(path)
    if not lines:
        raise DataError(p, "empty list file (expected one image id per line)")
    out: list[str] = []
    seen: dict[str, int] = {}
    for row, line in enumerate(lines, start=1):
        image = line.strip()
        if not image:
            raise DataError(p, "empty line inside the file", row=row)
        if " " in image or "\t" in image or not image.endswith(".png"):
            raise DataError(p, f"expected one image id per line, found {image[:80]!r}", row=row)
        if image in seen:
            raise DataError(p, f"duplicate image id {image} (also on line {seen[image]})", row=row)
        seen[image] = row
        out.append(image)
    return out


def chexnet_files(directory: str | os.PathLike) -> dict[str, Path | None]:
    """``{part: file or None}`` for the CheXNet split files ``{train,val,test}_list.txt[.gz]``."""
    d = Path(directory)
    out: dict[str, Path | None] = {}
    for part in CHEXNET_PARTS:
        f = _resolve(d / f"{part}_list.txt")
        out[part] = f if f.is_file() else None
    return out


def read_chexnet_split(directory: str | os.PathLike) -> dict[str, list[str]]:
    """Read the CheXNet 70/10/20 split files ``{train,val,test}_list.txt`` (plain or .gz).

    Each line is ``<image id> l1 ... l14`` with 0/1 labels in CheXNet order (arnoweng/CheXNet);
    the labels are checked for form but not returned (the metadata is the label source).

    Args:
        directory: the folder holding the three files (``chexnet_split/`` or ``labels/``).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` image ids in file order.

    Raises:
        DataError: naming the missing file, or file and line for a malformed line or an image
        listed twice (in one file or in two).
    """
    files = chexnet_files(directory)
    for part, f in files.items():
        if f is None:
            raise DataError(Path(directory) / f"{part}_list.txt", "missing CheXNet split file "
                            "(the chexnet split needs train_list.txt, val_list.txt and test_list.txt)")
    out: dict[str, list[str]] = {}
    seen: dict[str, tuple[Path, int]] = {}
    valid = {"0", "1"}
    good_labels: set[str] = set()
    for part, f in files.items():
        p, lines, _ = _read_lines(f)
        if not lines:
            raise DataError(p, "empty list file (expected '<image id> l1 ... l14' per line)")
        ids = []
        for row, line in enumerate(lines, start=1):
            fields = line.split(None, 1)
            rest = fields[-1]
            if rest not in good_labels:
                labs = rest.split()
                if len(fields) != 2 or len(labs) != len(DISEASES) or not valid.issuperset(labs):
                    raise DataError(p, f"expected '<image id>' and {len(DISEASES)} labels 0/1, found "
                                       f"{line.strip()[:120]!r}", row=row)
                good_labels.add(rest)  # ~800 distinct label strings: validate each once
            image = fields[0]
            if not image.endswith(".png"):
                raise DataError(p, f"bad image id {image[:80]!r}", row=row)
            if image in seen:
                other, orow = seen[image]
                where = f"line {orow}" if other == p else f"{other.name} line {orow}"
                raise DataError(p, f"image {image} is listed twice (also on {where})", row=row)
            seen[image] = (p, row)
            ids.append(image)
        out[part] = ids
    return out


# ----------------------------------------------------------------------------- discovery
def find_metadata_files(root: str | os.PathLike) -> dict[str, Path | None]:
    """Locate the metadata files of an NIH root (plain or .gz names).

    Returns:
        ``{"entries", "entries_ignored", "boxes", "train_val", "test", "chexnet"}`` -> Path or
        None. ``entries`` is ``Data_Entry_2017_v2020.csv`` when present (it wins), else
        ``Data_Entry_2017.csv``; ``entries_ignored`` is the other one when both exist. ``chexnet``
        is the folder (``chexnet_split/`` or ``labels/``) holding at least one CheXNet list.

    Raises:
        DataError: when ``root`` is not a directory.
    """
    r = Path(root)
    if not r.is_dir():
        raise DataError(r, "NIH root is not a directory" if r.exists() else "NIH root does not exist")

    def find(name: str) -> Path | None:
        f = _resolve(r / name)
        return f if f.is_file() else None

    entries = [f for f in (find(n) for n in ENTRY_NAMES) if f is not None]
    chexnet = None
    for d in CHEXNET_DIRS:
        if (r / d).is_dir() and any(chexnet_files(r / d).values()):
            chexnet = r / d
            break
    return {
        "entries": entries[0] if entries else None,
        "entries_ignored": entries[1] if len(entries) > 1 else None,
        "boxes": find(BOX_NAME),
        "train_val": find(TRAIN_VAL_NAME),
        "test": find(TEST_NAME),
        "chexnet": chexnet,
    }


_ARCHIVE_DIR = re.compile(r"images_\d{3}")


def find_images(root: str | os.PathLike) -> dict[str, Path]:
    """Map image id -> PNG path over the accepted layouts of an NIH root.

    Layouts: ``images_0NN/images/*.png`` (Kaggle), ``images/*.png`` (the NIH tarballs unpacked
    into the root) and ``*.png`` directly in the root. Names starting with ``.`` (macOS
    ``._*`` resource forks) are skipped. Uses ``os.scandir`` (no per-file stat): ~0.5 s for 112k
    files on a local disk, most of it building the Path objects.

    Raises:
        DataError: when ``root`` is not a directory, or one image id appears in two places.
    """
    r = Path(root)
    if not r.is_dir():
        raise DataError(r, "NIH root is not a directory" if r.exists() else "NIH root does not exist")
    dirs = [r, r / "images"]
    with os.scandir(r) as it:
        dirs += sorted(r / e.name / "images" for e in it if e.is_dir() and _ARCHIVE_DIR.fullmatch(e.name))
    found: dict[str, Path] = {}
    for d in dirs:
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                name = e.name
                if name.endswith(".png") and not name.startswith(".") and e.is_file():
                    prev = found.get(name)
                    if prev is not None:
                        raise DataError(d / name, f"image {name} is also at {prev}: remove one copy")
                    found[name] = d / name  # cheaper than Path(e.path), which re-parses the whole path
    return found


def bundled_nih_dir() -> Path:
    """The real ChestX-ray14 metadata shipped inside medattn (gzipped; no images).

    Holds ``Data_Entry_2017_v2020.csv.gz``, ``BBox_List_2017.csv.gz``, the official lists and
    ``chexnet_split/``; ``load_nih(bundled_nih_dir())`` reads it like an NIH root.
    """
    d = Path(__file__).resolve().parent.parent / "resources" / "nih"
    if not (d / "Data_Entry_2017_v2020.csv.gz").is_file():
        raise DataError(d, "bundled NIH metadata is missing from this installation (reinstall medattn)")
    return d


# ----------------------------------------------------------------------------- load_nih
@dataclass
class NIHMetadata:
    """Everything read from an NIH root's metadata files (see :func:`load_nih`)."""

    root: Path
    entries: pd.DataFrame
    variant: str
    entries_path: Path
    boxes: pd.DataFrame
    boxes_path: Path | None = None
    train_val: list[str] | None = None
    test: list[str] | None = None
    chexnet: dict[str, list[str]] | None = None
    files: dict[str, Path | None] = field(default_factory=dict)

    def label_matrix(self, labels: tuple[str, ...] | list[str] = NIH_LABELS) -> np.ndarray:
        """(N, len(labels)) uint8 multi-hot matrix in ``entries`` row order.

        Args:
            labels: the label names (canonical spelling) in column order; default the 15 NIH
                labels (14 diseases, then No Finding).
        """
        col = {name: j for j, name in enumerate(labels)}
        unknown = [n for n in labels if n not in NIH_LABELS]
        if unknown:
            raise ValueError(f"unknown label name(s) {unknown}; expected names from {NIH_LABELS}")
        lab = self.entries["labels"]
        counts = lab.map(len).to_numpy()
        rows = np.repeat(np.arange(len(lab)), counts)
        flat = [col.get(x, -1) for labs in lab for x in labs]
        cols = np.asarray(flat, dtype=np.int64)
        keep = cols >= 0
        out = np.zeros((len(lab), len(labels)), dtype=np.uint8)
        out[rows[keep], cols[keep]] = 1
        return out

    def per_class_counts(self) -> dict[str, int]:
        """Image count per label (No Finding included), in NIH label order."""
        return dict(zip(NIH_LABELS, self.label_matrix().sum(axis=0).astype(int).tolist()))


def _check_listed(path: Path, ids: list[str], known: set[str], metadata: Path) -> None:
    for i, image in enumerate(ids, start=1):
        if image not in known:
            raise DataError(path, f"image {image} is not in the metadata {metadata.name}", row=i)


def load_nih(root: str | os.PathLike) -> NIHMetadata:
    """Read and cross-check all metadata files of an NIH root (images are not touched).

    Args:
        root: the download folder (see :func:`find_metadata_files` for the names looked for);
            ``bundled_nih_dir()`` gives the copy shipped with medattn.

    Returns:
        :class:`NIHMetadata`. ``boxes`` is an empty frame, and ``train_val`` / ``test`` /
        ``chexnet`` are None, when their files are absent; a CheXNet folder with one of the
        three files missing also gives ``chexnet=None`` (``make_split`` names the missing file).

    Raises:
        DataError: when there is no metadata file, any file is malformed, a box or list entry
        names an image that is not in the metadata, or an image is in both official lists or
        in two CheXNet parts.
    """
    files = find_metadata_files(root)
    r = Path(root)
    if files["entries"] is None:
        raise DataError(r, f"no metadata file: expected {ENTRY_NAMES[0]} or {ENTRY_NAMES[1]} (optionally .gz)")
    entries, variant = read_data_entry(files["entries"])
    epath: Path = files["entries"]
    known = set(entries["image"].tolist())

    if files["boxes"] is not None:
        boxes = read_bbox_list(files["boxes"])
        for image, row in zip(boxes["image"].tolist(), boxes["source_row"].tolist()):
            if image not in known:
                raise DataError(files["boxes"], f"box image {image} is not in the metadata {epath.name}", row=row)
    else:
        boxes = _box_frame({c: [] for c in BOX_COLUMNS})

    lists: dict[str, list[str] | None] = {}
    for key in ("train_val", "test"):
        f = files[key]
        lists[key] = None
        if f is not None:
            lists[key] = read_image_list(f)
            _check_listed(f, lists[key], known, epath)
    if lists["train_val"] is not None and lists["test"] is not None:
        tv = set(lists["train_val"])
        for i, image in enumerate(lists["test"], start=1):
            if image in tv:
                raise DataError(files["test"], f"image {image} is in both {files['train_val'].name} "
                                               f"and {files['test'].name}", row=i)

    chexnet = None
    if files["chexnet"] is not None and all(chexnet_files(files["chexnet"]).values()):
        chexnet = read_chexnet_split(files["chexnet"])
        for part, f in chexnet_files(files["chexnet"]).items():
            _check_listed(f, chexnet[part], known, epath)

    return NIHMetadata(root=r, entries=entries, variant=variant, entries_path=epath, boxes=boxes,
                       boxes_path=files["boxes"], train_val=lists["train_val"], test=lists["test"],
                       chexnet=chexnet, files=files)
