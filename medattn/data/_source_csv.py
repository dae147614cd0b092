"""The csv layout (DualAttendMed's single-label datasets: APTOS, DDR, Messidor-2 DR grades) as a
:class:`SourceTable`, so ``medattn prepare --layout csv`` writes the same manifest and shards as
for NIH, and the same loaders, trainer and evaluation run on it.

Layout (DualAttendMed README, ``datasets/mydataset.py``)::

    ROOT/train_images/*.png   ROOT/train.csv   (header row, then filename,label)
    ROOT/test_images/*.png    ROOT/test.csv

* column 0 is the file name inside ``<split>_images/``; ``.png`` is appended when it has no
  extension (as the seed's loader does); column 1 is the label. Other columns are ignored.
* labels are integers (DR grades) or names. ``label_names`` are the distinct values of both
  CSVs, sorted (numerically for integers), as strings; the class index is the position in that
  list (for grades 0..K-1 it is the grade itself).
* image ids are ``train_images/<file>`` and ``test_images/<file>`` (the same file name may occur
  in both folders); every image is its own "patient".
* validation is carved from train.csv: a seeded ``val_fraction`` of the images of each class
  (stratified; at least one image overall), test is test.csv. The seed has no validation split
  and selects its checkpoint on test.csv; here selection never sees the test images.
* images keep their colour: ``channels=3`` by default (fundus photos are RGB).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medattn.data._sources import SourceTable, order_records
from medattn.errors import ConfigError, DataError

PARTS = (("train", "train.csv", "train_images"), ("test", "test.csv", "test_images"))
DEFAULT_VAL_FRACTION = 0.1


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(path, "missing: the csv layout needs train.csv and test.csv beside "
                              "train_images/ and test_images/ (header row, then filename,label)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a readable CSV: {e}") from None
    if df.shape[1] < 2:
        raise DataError(path, f"needs two columns (filename,label), found {df.shape[1]}: {list(df.columns)}")
    if len(df) == 0:
        raise DataError(path, "has a header but no rows")
    return df


def _label_key(values: list[str]) -> tuple[list[str], bool]:
    """Distinct label strings, sorted numerically when all are integers."""
    uniq = sorted(set(values))
    try:
        ints = {v: int(v) for v in uniq}
    except ValueError:
        return uniq, False
    return sorted(uniq, key=lambda v: ints[v]), True


def csv_table(root: str | Path, *, split_seed: int = 0, val_fraction: float | None = None,
              allow_missing: bool = False, channels: int = 3, limit: int | None = None) -> SourceTable:
    """The source table of a csv-layout root (see the module docstring).

    Args:
        root: directory holding train.csv, test.csv, train_images/, test_images/.
        split_seed: seed of the validation carve-out.
        val_fraction: share of each class of train.csv that becomes validation (default 0.1).
        allow_missing: skip rows whose image file is missing (counted) instead of failing.
        channels: 3 (RGB, default) or 1 (gray).
        limit: keep only the first N rows of each CSV (benchmarks); implies allow_missing.

    Raises:
        DataError: a missing or malformed CSV or image, naming the file and row.
        ConfigError: bad options.
    """
    root = Path(root)
    frac = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"--val-fraction {frac}: must be in [0, 1) for --layout csv")
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels} must be 1 or 3")
    if not root.is_dir():
        raise DataError(root, "dataset root does not exist (--layout csv expects train.csv, test.csv, "
                              "train_images/, test_images/)")
    if limit is not None:
        allow_missing = True

    rows: list[dict[str, Any]] = []
    skipped = 0
    for part, csv_name, img_dir in PARTS:
        path = root / csv_name
        df = _read_csv(path)
        if limit is not None:
            df = df.iloc[:limit]
        fcol, lcol = df.columns[0], df.columns[1]
        seen: dict[str, int] = {}
        for pos, (fname, label) in enumerate(zip(df[fcol].tolist(), df[lcol].tolist())):
            line = pos + 2  # 1-based, after the header
            fname, label = str(fname).strip(), str(label).strip()
            if not fname:
                raise DataError(path, "empty file name", row=line)
            if not label:
                raise DataError(path, f"empty label for {fname!r}", row=line)
            if not Path(fname).suffix:
                fname += ".png"
            if fname in seen:
                raise DataError(path, f"{fname!r} is listed twice (rows {seen[fname]} and {line})", row=line)
            seen[fname] = line
            file = root / img_dir / fname
            if not file.is_file():
                if allow_missing:
                    skipped += 1
                    continue
                raise DataError(path, f"image {img_dir}/{fname} does not exist; pass --allow-missing to "
                                      "prepare the images that are present", row=line)
            rows.append({"part": part, "image": f"{img_dir}/{fname}", "path": str(file), "label": label,
                         "ref": f"{csv_name} row {line}"})
    if not rows:
        raise DataError(root, "no images to prepare (every row was skipped)")

    names, numeric = _label_key([r["label"] for r in rows])
    index = {n: i for i, n in enumerate(names)}
    split = _carve_val(rows, index, frac, split_seed)
    k = len(names)
    eye = np.eye(k, dtype=np.uint8)
    records = pd.DataFrame({
        "image": [r["image"] for r in rows],
        "path": [r["path"] for r in rows],
        "patient": [r["image"] for r in rows],
        "split": split,
        "labels": [eye[index[r["label"]]] for r in rows],
        "target": np.array([index[r["label"]] for r in rows], dtype=np.int64),
        "finding_labels": [r["label"] for r in rows],
        "age": np.full(len(rows), np.nan),
        "sex": [None] * len(rows),
        "view": [None] * len(rows),
        "boxes": [[] for _ in rows],
        "mask_path": [None] * len(rows),
        "ref": [r["ref"] for r in rows],
    })
    return SourceTable(
        records=order_records(records),
        label_names=names,
        eval_labels=list(names),
        task="singlelabel",
        channels=channels,
        expected_size=None,
        source={"kind": "csv", "root": str(root.resolve()), "train_csv": "train.csv", "test_csv": "test.csv",
                "labels": "integer" if numeric else "text"},
        split="csv",
        split_seed=split_seed,
        skipped_missing=skipped,
        has_masks=False,
        settings={"val_fraction": frac, "limit": limit},
    )


def _carve_val(rows: list[dict[str, Any]], index: dict[str, int], frac: float, seed: int) -> list[str]:
    """train.csv rows -> train/val (per class, seeded, round(frac * n_class)); test.csv rows -> test."""
    split = ["test" if r["part"] == "test" else "train" for r in rows]
    train = [i for i, r in enumerate(rows) if r["part"] == "train"]
    if frac <= 0 or not train:
        return split
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xC5F]))
    by_class: dict[int, list[int]] = {}
    for i in train:
        by_class.setdefault(index[rows[i]["label"]], []).append(i)
    chosen: list[int] = []
    for c in sorted(by_class):
        members = sorted(by_class[c], key=lambda i: rows[i]["image"])
        take = int(math.floor(frac * len(members) + 0.5))
        chosen += [members[j] for j in rng.permutation(len(members))[:take]]
    if not chosen and len(train) > 1:
        chosen = [sorted(train, key=lambda i: rows[i]["image"])[int(rng.integers(len(train)))]]
    for i in chosen:
        split[i] = "val"
    return split

