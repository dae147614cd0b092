"""Source tables: what ``medattn prepare`` is asked to store, independent of the dataset layout.

A :class:`SourceTable` is one row per sample (image id, file, patient, split, multi-hot labels,
metadata, normalised boxes, optional lung mask) plus dataset-level facts (label names, task,
channels). The NIH reader builds one here; a CSV or image-folder layout only has to build
another, and the shard writer and manifest code stay as they are.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medattn.boxes import normalize
from medattn.errors import DataError

SPLITS = ("train", "val", "test")
NIH_SIZE = 1024  # BBox_List coordinates are pixels of the 1024² original
RANDOM_TEST = 0.2  # test share of patients of --split random (make_split's default 0.7/0.1/0.2)

# Columns of SourceTable.records (all required; None/NaN where unknown).
RECORD_COLUMNS = (
    "image",           # str: sample id, unique (NIH: "00000001_000.png")
    "path",            # str: the source image file
    "patient",         # str: the unit of every split
    "split",           # str: train | val | test
    "labels",          # np.ndarray uint8 (L,): multi-hot over label_names (one-hot for single-label)
    "target",          # int: class index for single-label tasks, -1 for multi-label
    "finding_labels",  # str: the source's own label text
    "age",             # float or NaN
    "sex",             # str or None
    "view",            # str or None
    "boxes",           # list[dict(label, x, y, w, h)] normalised to [0, 1]
    "mask_path",       # str or None: a lung mask (nonzero = lung) for the lung box
    "ref",             # str: where the row came from, for error messages ("FILE row N")
)


@dataclass
class SourceTable:
    """Everything prepare needs to know about a dataset, in storage order.

    Args:
        records: DataFrame with :data:`RECORD_COLUMNS`, one row per sample, in the order the
            samples are stored (= their manifest index).
        label_names: names of the label vector's entries.
        eval_labels: the labels metrics average over.
        task: ``multilabel`` or ``singlelabel``.
        channels: 1 (gray) or 3 (RGB).
        expected_size: the documented source side (NIH: 1024); others are counted ``not_1024``.
        source: the ``source`` object of dataset.json (kind, root, ...).
        split, split_seed: how the split column was made (dataset.json).
        skipped_missing: rows of the metadata left out because their image file is missing.
        has_masks: whether lung masks were looked for (dataset.json ``has_lung_boxes`` is true
            when at least one sample got a lung box).
        settings: extra source options that change the output (part of the resume check).
    """

    records: pd.DataFrame
    label_names: list[str]
    eval_labels: list[str]
    task: str
    channels: int
    expected_size: int | None
    source: dict[str, Any]
    split: str
    split_seed: int | None
    skipped_missing: int = 0
    has_masks: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    # Facts of the split made on the whole metadata (make_split's attrs), not part of the resume check.
    split_attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def digest(self) -> str:
        """sha256 over what determines the pixels and their order (ids, files, splits, masks)."""
        h = hashlib.sha256()
        cols = ["image", "path", "split", "mask_path"]
        for row in self.records[cols].itertuples(index=False):
            h.update(("\t".join(v if isinstance(v, str) else "" for v in row) + "\n").encode())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        vc = self.records["split"].value_counts()
        return {s: int(vc.get(s, 0)) for s in SPLITS}

    def split_protocol(self) -> dict[str, Any]:
        """How the stored split was drawn, for dataset.json and the report: ``kind``, ``seed``,
        ``unit`` (``patient``: no patient in two parts; ``image``: image-level, leaks patients),
        ``patients`` and ``patients_crossing`` (patients with images in more than one part, counted
        on the stored images)."""
        from medattn.data.splits import split_unit

        parts = self.records.groupby("patient")["split"].nunique()
        out = {"kind": self.split, "seed": self.split_seed, "unit": split_unit(self.split),
               "patients": int(len(parts)), "patients_crossing": int((parts > 1).sum())}
        if "patients_crossing" in self.split_attrs:
            out["patients_crossing_in_metadata"] = int(self.split_attrs["patients_crossing"])
        return out

    def check(self, require_splits: bool = True) -> None:
        """Raise DataError when the table cannot be prepared (empty, bad split names, ...)."""
        where = self.source.get("root")
        if len(self.records) == 0:
            raise DataError(where, "no images to prepare (every metadata row was skipped)")
        missing_cols = [c for c in RECORD_COLUMNS if c not in self.records.columns]
        if missing_cols:
            raise ValueError(f"source table lacks columns {missing_cols}")
        bad = ~self.records["split"].isin(SPLITS)
        if bad.any():
            r = self.records[bad].iloc[0]
            raise DataError(where, f"split {r['split']!r} of {r['image']} is not one of {SPLITS}",
                            row=r["ref"])
        dup = self.records["image"].duplicated()
        if dup.any():
            raise DataError(where, f"image {self.records['image'][dup].iloc[0]!r} is listed twice")
        if require_splits:
            counts = self.counts()
            for s in SPLITS:
                if counts[s] == 0:
                    extra = (f" after skipping {self.skipped_missing} rows whose images are missing"
                             if self.skipped_missing else "")
                    raise DataError(where, f"split {s!r} ({self.split}) is empty{extra}; "
                                           f"counts: {counts}")


def order_records(df: pd.DataFrame) -> pd.DataFrame:
    """Storage order: train, then val, then test, each by image id.

    Grouping by split keeps each split contiguous in the shards, so evaluating the test split
    reads only the test shards.
    """
    key = df["split"].map({s: i for i, s in enumerate(SPLITS)})
    out = df.assign(_k=key).sort_values(["_k", "image"], kind="stable").drop(columns="_k")
    return out.reset_index(drop=True)


# ---------------------------------------------------------------- NIH ChestX-ray14
def resolve_mask_dir(root: Path, masks: str | Path | None) -> Path | None:
    """The lung-mask directory: ``--masks`` if given (it must exist), else ROOT/masks if present."""
    mask_dir = Path(masks) if masks is not None else (root / "masks" if (root / "masks").is_dir() else None)
    if masks is not None and not mask_dir.is_dir():
        raise DataError(mask_dir, "lung-mask directory does not exist (--masks)")
    return mask_dir


def normalised_boxes(meta: Any) -> dict[str, list[dict[str, Any]]]:
    """BBox_List rows by image, as fractions of the image side."""
    boxes: dict[str, list[dict[str, Any]]] = {}
    if meta.boxes is not None and len(meta.boxes):
        # Normalise by the documented 1024 px, not the file's size: the box list refers to the
        # original 1024² images even where a downscaled copy is on disk.
        xywh = normalize(meta.boxes[["x", "y", "w", "h"]].to_numpy(dtype=np.float64), NIH_SIZE, NIH_SIZE)
        for image, label, (x, y, w, h) in zip(meta.boxes["image"], meta.boxes["label"], xywh.tolist()):
            boxes.setdefault(image, []).append({"label": str(label), "x": x, "y": y, "w": w, "h": h})
    return boxes


def nih_table(root: str | Path, *, split: str = "official", split_seed: int = 0,
              val_fraction: float | None = None, allow_missing: bool = False,
              masks: str | Path | None = None, limit: int | None = None) -> SourceTable:
    """The source table of an NIH ChestX-ray14 root (docs/data-format.md §1).

    The split is made on the full metadata and then restricted to the images present, so a
    partial download gets the same split as the complete one.

    Args:
        root: the NIH root (metadata beside ``images/`` or ``images_0NN/images/``).
        split: ``official``, ``chexnet`` or ``random``.
        split_seed: seed of the validation carve-out / random split.
        val_fraction: validation share of patients (None: the splitter's default, 0.1):
            official: of the train_val patients; random: of all patients, test stays 0.2.
        allow_missing: skip metadata rows whose image is absent (counted) instead of failing.
        masks: a lung-mask directory (``<image id>`` files); default ``root/masks`` if present.
        limit: keep only the first N present images (benchmarks); implies allow_missing.
    """
    from medattn.data.labels import DISEASES, NIH_LABELS
    from medattn.data.nih import find_images, load_nih
    from medattn.data.splits import PATIENT_DISJOINT, check_patient_disjoint, make_split

    root = Path(root)
    kwargs: dict[str, Any] = {}
    if val_fraction is not None:
        from medattn.errors import ConfigError

        if split == "chexnet":
            raise ConfigError("--val-fraction does not apply to --split chexnet (its val list is fixed)")
        upper = 1.0 if split == "official" else 1.0 - RANDOM_TEST
        if not 0.0 <= val_fraction < upper:
            raise ConfigError(f"--val-fraction {val_fraction}: must be in [0, {upper:g}) for --split {split}")
        if split in ("random", "image-random"):
            # Keep the random split's test share; val comes out of train.
            kwargs["fractions"] = (1.0 - RANDOM_TEST - val_fraction, val_fraction, RANDOM_TEST)
        else:
            kwargs["val_fraction"] = val_fraction
    meta = load_nih(root)
    entries = meta.entries.reset_index(drop=True)
    split_of = make_split(meta, split, split_seed, **kwargs)
    labels = np.asarray(meta.label_matrix(), dtype=np.uint8)
    if labels.shape != (len(entries), len(NIH_LABELS)):
        raise RuntimeError(f"label_matrix has shape {labels.shape}, expected {(len(entries), len(NIH_LABELS))}")
    images = find_images(root)
    meta_file = _metadata_name(meta, root)

    present = entries["image"].map(lambda i: i in images).to_numpy(dtype=bool)
    n_missing = int((~present).sum())
    if limit is not None:
        keep = np.flatnonzero(present)[:limit]
        present = np.zeros(len(entries), dtype=bool)
        present[keep] = True
        allow_missing = True
    if n_missing and not allow_missing:
        first = entries[~present].iloc[0]
        raise DataError(root, f"{n_missing} of {len(entries)} images listed in {meta_file} are missing, "
                              f"e.g. {first['image']} ({meta_file} row {first['source_row']}); "
                              "pass --allow-missing to prepare the images that are present",
                        row=None)

    mask_dir = resolve_mask_dir(root, masks)
    boxes = normalised_boxes(meta)

    sel = np.flatnonzero(present)
    e = entries.iloc[sel]
    split_values = e["image"].map(split_of)
    if split_values.isna().any():
        r = e[split_values.isna()].iloc[0]
        raise DataError(root, f"image {r['image']} got no split from make_split({split!r})",
                        row=int(r["source_row"]))
    # The reader keeps the parsed labels in file order (aliases such as No_Finding mapped), not
    # the raw text; joined again they are the Finding Labels value up to those spellings.
    if "finding_labels" in e.columns:
        finding = e["finding_labels"].astype(str).tolist()
    else:
        finding = ["|".join(v) for v in e["labels"]]
    mask_paths: list[str | None] = []
    for img in e["image"]:
        mp = mask_dir / img if mask_dir is not None else None
        mask_paths.append(str(mp) if mp is not None and mp.is_file() else None)

    def _str_or_none(v: Any) -> str | None:
        return None if v is None or (isinstance(v, float) and np.isnan(v)) or pd.isna(v) else str(v)

    records = pd.DataFrame({
        "image": e["image"].astype(str).tolist(),
        "path": [str(images[i]) for i in e["image"]],
        "patient": [str(int(p)) for p in e["patient"]],
        "split": split_values.astype(str).tolist(),
        "labels": list(labels[sel]),
        "target": -1,
        "finding_labels": finding,
        "age": e["age"].astype("float64").to_numpy(),
        "sex": [_str_or_none(v) for v in e["sex"]],
        "view": [_str_or_none(v) for v in e["view"]],
        "boxes": [boxes.get(i, []) for i in e["image"]],
        "mask_path": mask_paths,
        "ref": [f"{meta_file} row {int(r)}" for r in e["source_row"]],
    })
    records = order_records(records)
    stored = pd.Series(split_values.to_numpy(), index=e["image"].to_numpy())
    if split in PATIENT_DISJOINT:
        # Patient-disjointness is the splitter's promise; re-check it on what is actually stored.
        check_patient_disjoint(e, stored, source=f"split {split!r}")

    return SourceTable(
        records=records,
        label_names=list(NIH_LABELS),
        eval_labels=list(DISEASES),
        task="multilabel",
        channels=1,
        expected_size=NIH_SIZE,
        source={"kind": "nih", "root": str(root.resolve()), "metadata": meta_file,
                "variant": getattr(meta, "variant", None)},
        split=split,
        split_seed=split_seed,
        skipped_missing=int(len(entries) - len(sel)),
        has_masks=mask_dir is not None,
        settings={"val_fraction": val_fraction, "masks": None if mask_dir is None else str(mask_dir.resolve()),
                  "limit": limit},
        split_attrs=dict(split_of.attrs),
    )


def _metadata_name(meta: Any, root: Path) -> str:
    v = getattr(meta, "entries_path", None)
    if v:
        return Path(v).name
    for name in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"):
        if (root / name).is_file():
            return name
    return "Data_Entry_2017.csv"

