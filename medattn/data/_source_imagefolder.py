"""The class-folder layout (torchvision ImageFolder; seed 002's ``data_prepare.py`` output):

    ROOT/train/<class>/*.png     ROOT/val/<class>/*.png     ROOT/test/<class>/*.png

Class order is the sorted folder names, as ImageFolder assigns indices (the seed names its
folders ``0NoFinding``, ``1Effusion``, ``2Pneumothorax`` so that the order is the one its loss
relies on). Folder names are mapped to the canonical ChestX-ray14 label where one matches after
dropping a leading number (``1Effusion`` -> ``Effusion``, ``0NoFinding`` -> ``No Finding``), so
class-specific options such as ``gradcam_loss.regions`` use the usual names; other folders keep
their name. The task is single-label.

Patients: files named like NIH images (``00012345_001.png``) belong to patient 12345, and a
patient in two splits is an error; other names are one patient per image (the layout's own
split is then trusted as given).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from medattn.data._sources import SPLITS, SourceTable, order_records
from medattn.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.[A-Za-z]+$")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def canonical_class(folder: str) -> str:
    """``1Effusion`` -> ``Effusion``, ``0NoFinding`` -> ``No Finding``; unknown names unchanged."""
    from medattn.data.labels import NIH_LABELS

    stripped = re.sub(r"^\d+[\s_\-.]*", "", folder)
    known = {_key(n): n for n in NIH_LABELS}
    return known.get(_key(stripped), folder)


def find_mask(mask_dir: Path | None, image_name: str) -> Path | None:
    """The mask of ``image_name``: ``DIR/<name>``, or ``DIR/<stem>_mask.png`` (the Shenzhen/Montgomery
    naming of the Kaggle "Chest X-ray Masks and Labels" set); None if neither exists."""
    if mask_dir is None:
        return None
    for cand in (mask_dir / image_name, mask_dir / f"{Path(image_name).stem}_mask.png",
                 mask_dir / f"{Path(image_name).stem}.png"):
        if cand.is_file():
            return cand
    return None


def imagefolder_table(root: str | Path, *, masks: str | Path | None = None, channels: int = 1) -> SourceTable:
    """The source table of a class-folder root (module docstring).

    Args:
        root: the folder holding ``train/``, ``val/`` and ``test/``.
        masks: lung-mask folder (files named like the images, nonzero = lung), optional.
        channels: 1 (gray, X-rays) or 3 (RGB).

    Raises:
        DataError: no ``train`` folder, a class folder of val/test that train lacks, an image
            name used twice, or a patient in two splits (each names the files).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "image-folder root does not exist (--layout imagefolder)")
    train_dir = root / "train"
    if not train_dir.is_dir():
        have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "nothing"
        raise DataError(root, f"--layout imagefolder expects train/, val/ and test/ folders of class folders; "
                              f"found {have}")
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(train_dir, "no class folders (expected train/<class>/*.png)")
    names = [canonical_class(f) for f in folders]
    if len(set(names)) != len(names):  # two folders map to one label: keep the folder names
        names = list(folders)
    mask_dir = Path(masks) if masks is not None else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise DataError(mask_dir, "lung-mask directory does not exist (--masks)")

    rows = []
    seen: dict[str, Path] = {}
    for split in SPLITS:
        sdir = root / split
        if not sdir.is_dir():
            continue
        for sub in sorted(p for p in sdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name not in folders:
                raise DataError(sub, f"class folder {sub.name!r} is not in train/ (classes: {', '.join(folders)})")
            k = folders.index(sub.name)
            for f in sorted(sub.iterdir()):
                if f.name.startswith(".") or f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                    continue
                if f.name in seen:
                    raise DataError(f, f"image name {f.name!r} is also used by {seen[f.name]}; image names must be "
                                       "unique across splits and classes")
                seen[f.name] = f
                m = _NIH_NAME.match(f.name)
                onehot = np.zeros(len(folders), np.uint8)
                onehot[k] = 1
                mp = find_mask(mask_dir, f.name)
                rows.append({
                    "image": f.name, "path": str(f), "patient": str(int(m.group(1))) if m else Path(f.name).stem,
                    "split": split, "labels": onehot, "target": k, "finding_labels": names[k],
                    "age": np.nan, "sex": None, "view": None, "boxes": [],
                    "mask_path": None if mp is None else str(mp),
                    "ref": str(f.relative_to(root)),
                })
    if not rows:
        raise DataError(root, "no images found (expected train|val|test/<class>/*.png)")
    records = order_records(pd.DataFrame(rows))
    # A patient in two splits is leakage between training and testing.
    parts = records.groupby("patient")["split"].nunique()
    if (parts > 1).any():
        p = parts[parts > 1].index[0]
        sub = records[records["patient"] == p]
        a = sub.iloc[0]
        b = sub[sub["split"] != a["split"]].iloc[0]
        raise DataError(root, f"patient {p} is in two splits: {a['ref']} ({a['split']}) and {b['ref']} ({b['split']}); "
                              "move that patient's images into one split")
    eval_labels = [names[1]] if len(names) == 2 else list(names)
    return SourceTable(
        records=records,
        label_names=names,
        eval_labels=eval_labels,
        task="singlelabel",
        channels=channels,
        expected_size=None,
        source={"kind": "imagefolder", "root": str(root.resolve()), "folders": folders},
        split="folders",
        split_seed=None,
        has_masks=mask_dir is not None,
        settings={"layout": "imagefolder", "masks": None if mask_dir is None else str(mask_dir.resolve())},
    )
