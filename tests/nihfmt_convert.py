"""Test helpers: the bundled real v2020 metadata, parsed once per test session, and converters
that re-emit it in the other real formattings of Data_Entry_2017.csv (research notes 1.2).

* :func:`to_2017`: the October 2017 original -- CRLF, header with a trailing comma, zero-padded
  ``Follow-up #`` / ``Patient ID``, ages as ``058Y``; the ages in :data:`UNIT_AGES` are written
  in months or days, as 27 rows of the real file are. Rows sorted by image id.
* :func:`to_updated`: Kaggle's "updated" file -- LF, same header, plain integers, sorted by id.
* :func:`to_v2020_sex`: the re-issued v2020 file -- ``Patient Sex`` and a trailing comma on the
  header and on every row, v2020 row order.
"""
from __future__ import annotations

import functools
import gzip
import shutil
from pathlib import Path

from medattn.data.nih import bundled_nih_dir, load_nih

HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
HEADER_SEX = HEADER_2017.replace("Patient Gender", "Patient Sex")

# image -> age written with a unit letter in the 2017 formatting, and its value in years.
UNIT_AGES = {
    "00000002_000.png": ("011M", 11 / 12),
    "00000005_000.png": ("006M", 0.5),
    "00024680_000.png": ("001D", 1 / 365.25),
    "00030805_000.png": ("030D", 30 / 365.25),
}


@functools.lru_cache(maxsize=None)
def bundled_meta():
    """load_nih(bundled_nih_dir()), parsed once per session. Do not mutate it."""
    return load_nih(bundled_nih_dir())


@functools.lru_cache(maxsize=None)
def v2020_lines() -> tuple[str, ...]:
    """The bundled Data_Entry_2017_v2020.csv as lines (header first), endings removed."""
    with gzip.open(bundled_nih_dir() / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as f:
        return tuple(f.read().splitlines())


def _rows() -> list[list[str]]:
    return [line.split(",") for line in v2020_lines()[1:]]


def to_2017(unit_ages: bool = True) -> bytes:
    out = [HEADER_2017]
    for f in sorted(_rows(), key=lambda r: r[0]):
        age = UNIT_AGES[f[0]][0] if unit_ages and f[0] in UNIT_AGES else f"{int(f[4]):03d}Y"
        out.append(",".join([f[0], f[1], f"{int(f[2]):03d}", f"{int(f[3]):08d}", age, *f[5:]]))
    return ("\r\n".join(out) + "\r\n").encode("ascii")


def to_updated() -> bytes:
    out = [HEADER_2017] + [",".join(f) for f in sorted(_rows(), key=lambda r: r[0])]
    return ("\n".join(out) + "\n").encode("ascii")


def to_v2020_sex() -> bytes:
    out = [HEADER_SEX] + [line + "," for line in v2020_lines()[1:]]
    return ("\n".join(out) + "\n").encode("ascii")


def make_root(root: Path, entries_name: str, data: bytes, *, lists: bool = True, boxes: bool = True,
              chexnet: bool = False) -> Path:
    """An NIH root holding ``data`` as ``entries_name`` plus copies of the bundled lists/boxes."""
    root.mkdir(parents=True, exist_ok=True)
    if entries_name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    (root / entries_name).write_bytes(data)
    src = bundled_nih_dir()
    names = (["BBox_List_2017.csv.gz"] if boxes else []) + (["train_val_list.txt.gz", "test_list.txt.gz"] if lists else [])
    for name in names:
        shutil.copyfile(src / name, root / name)
    if chexnet:
        shutil.copytree(src / "chexnet_split", root / "chexnet_split")
    return root
