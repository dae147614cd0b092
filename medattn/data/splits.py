"""Train/val/test splits of NIH ChestX-ray14: three patient-disjoint kinds and one that leaks.

Four kinds (docs/data-format.md section 1):

* ``official``: ``test_list.txt`` is the test set; validation patients are drawn from
  ``train_val_list.txt`` (``val_fraction`` of its *patients*, seeded), the rest is train.
* ``chexnet``: the 70/10/20 files of the CheXNet re-implementations (``chexnet_split/``).
* ``random``: patients shuffled with the seed and cut at ``fractions`` (of patients, so the image
  fractions are close to, not exactly, the same).
* ``image-random``: *images* shuffled with the seed and cut at ``fractions`` (70/10/20 exactly,
  up to rounding). This is the protocol of the AG-CNN paper ("randomly shuffle the dataset",
  Sec. IV-A) and of Wang et al. 2017, read as image-level: **it leaks patients** (a patient's
  follow-up films land in train and test), which inflates test AUROC. It exists to reproduce
  those tables and to measure how much of their gain is leakage; the number of patients that
  cross parts is in ``attrs["patients_crossing"]`` and reported by prepare and inspect.

A split is a ``pd.Series`` indexed by image id (in metadata order) with values ``train``,
``val`` or ``test``. Randomness comes only from ``numpy.random.default_rng(seed)`` applied to the
*sorted* patient ids, so a split depends on the seed and the set of images, not on
``PYTHONHASHSEED``, the row order of the files or the machine.

Example:
    >>> meta = load_nih(bundled_nih_dir())                      # doctest: +SKIP
    >>> split = make_split(meta, "official", seed=0)             # doctest: +SKIP
    >>> split.value_counts()["test"]                            # doctest: +SKIP
    25596
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medattn.data.nih import CHEXNET_DIRS, TEST_NAME, TRAIN_VAL_NAME, NIHMetadata, chexnet_files
from medattn.errors import ConfigError, DataError

SPLIT_KINDS = ("official", "chexnet", "random", "image-random")
# The kinds that keep every patient in one part (make_split checks it); image-random does not.
PATIENT_DISJOINT = ("official", "chexnet", "random")
PARTS = ("train", "val", "test")


def split_unit(kind: str) -> str:
    """``"patient"`` for the patient-disjoint kinds, ``"image"`` for image-random."""
    return "image" if kind == "image-random" else "patient"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _shuffled_patients(patients: np.ndarray, seed: int) -> np.ndarray:
    """Unique patient ids in a seeded order that does not depend on the input order."""
    uniq = np.unique(patients)  # sorted
    return uniq[np.random.default_rng(seed).permutation(len(uniq))]


def make_split(meta: NIHMetadata, kind: str, seed: int = 0, val_fraction: float = 0.1,
               fractions: Sequence[float] = (0.7, 0.1, 0.2), allow_unlisted: bool = False) -> pd.Series:
    """Assign every image of ``meta`` to train, val or test, keeping patients in one part.

    Args:
        meta: from :func:`medattn.data.nih.load_nih`.
        kind: ``official``, ``chexnet``, ``random`` or ``image-random`` (leaks patients).
        seed: seeds the patient shuffle (official validation carve-out, random).
        val_fraction: official only: fraction of train_val *patients* that become val
            (0 gives no val part).
        fractions: random / image-random: train/val/test fractions of patients / images, summing to 1.
        allow_unlisted: official/chexnet: images in the metadata but in none of the lists are
            left out of the result (their number is in ``result.attrs["unlisted"]``) instead
            of raising.

    Returns:
        Series named ``split``, index = image ids (metadata order), values ``train|val|test``;
        ``attrs`` holds ``kind``, ``seed``, ``unlisted`` (count of images left out) and
        ``patients_crossing`` (patients with images in more than one part: 0 except for
        image-random).

    Raises:
        DataError: a needed list file is missing (named), images are unlisted and not allowed,
        or a patient would be in two parts.
        ConfigError: an unknown kind or bad fractions.
    """
    if kind not in SPLIT_KINDS:
        raise ConfigError(f"unknown split kind {kind!r} (expected one of {', '.join(SPLIT_KINDS)})")
    entries = meta.entries
    images = entries["image"].to_numpy(dtype=object)
    patients = entries["patient"].to_numpy()
    source: Path | None = None

    if kind in ("random", "image-random"):
        fr = [float(x) for x in fractions]
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"split fractions must be three non-negative numbers (train, val, test) "
                              f"summing to 1, got {tuple(fractions)}")
    if kind == "image-random":
        # Sorted image ids, then a seeded permutation: independent of the row order of the file.
        uniq = np.unique(images.astype(str))
        order = uniq[np.random.default_rng(seed).permutation(len(uniq))]
        n = len(order)
        n_train = _round_half_up(fr[0] * n)
        n_val = min(_round_half_up(fr[1] * n), n - n_train)
        part_of = {im: ("train" if i < n_train else "val" if i < n_train + n_val else "test")
                   for i, im in enumerate(order.tolist())}
        values = np.array([part_of[str(im)] for im in images], dtype=object)
        unlisted = 0
    elif kind == "random":
        order = _shuffled_patients(patients, seed)
        n = len(order)
        n_train = _round_half_up(fr[0] * n)
        n_val = min(_round_half_up(fr[1] * n), n - n_train)
        part_of = {int(pt): ("train" if i < n_train else "val" if i < n_train + n_val else "test")
                   for i, pt in enumerate(order)}
        values = np.array([part_of[int(pt)] for pt in patients], dtype=object)
        unlisted = 0
    else:
        if kind == "official":
            assigned, source = _official(meta, patients, images, seed, val_fraction)
        else:
            assigned, source = _chexnet(meta)
        values = np.array([assigned.get(im) for im in images], dtype=object)
        missing = np.flatnonzero(pd.isna(values))
        unlisted = len(missing)
        if unlisted and not allow_unlisted:
            first = ", ".join(images[missing[:5]])
            raise DataError(source, f"{unlisted} image(s) of the metadata {meta.entries_path.name} are in none "
                                    f"of the {kind} split lists (first: {first}); pass allow_unlisted "
                                    f"to leave them out")
        if unlisted:
            keep = ~pd.isna(values)
            images, values = images[keep], values[keep]
    split = pd.Series(pd.array(values.tolist(), dtype="str"), index=pd.Index(images.tolist(), dtype="str", name="image"),
                      name="split")
    if kind in PATIENT_DISJOINT:
        check_patient_disjoint(entries, split, source=source)
        crossing = 0
    else:
        crossing = patients_crossing(entries, split)
    split.attrs.update({"kind": kind, "seed": int(seed), "unlisted": int(unlisted),
                        "patients_crossing": int(crossing)})
    return split


def patients_crossing(entries: pd.DataFrame, split: pd.Series) -> int:
    """How many patients have images in more than one part of ``split`` (0 for a patient-level
    split). ``entries`` needs ``image`` and ``patient``; images of ``split`` not in it raise."""
    patient_of = dict(zip(entries["image"].astype(str).tolist(), entries["patient"].astype(str).tolist()))
    missing = [im for im in split.index.tolist() if str(im) not in patient_of]
    if missing:
        raise DataError(None, f"{len(missing)} split image(s) are not in the metadata (first: {missing[0]})")
    df = pd.DataFrame({"patient": [patient_of[str(im)] for im in split.index.tolist()],
                       "part": split.astype(str).tolist()})
    return int((df.groupby("patient")["part"].nunique() > 1).sum())


def _official(meta: NIHMetadata, patients: np.ndarray, images: np.ndarray, seed: int,
              val_fraction: float) -> tuple[dict[str, str], Path]:
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, ids in ((TRAIN_VAL_NAME, meta.train_val), (TEST_NAME, meta.test)):
        if ids is None:
            raise DataError(meta.root / name, "missing: the official split needs train_val_list.txt and "
                                              "test_list.txt (plain or .gz)")
    tv = set(meta.train_val)
    in_tv = np.fromiter((im in tv for im in images), dtype=bool, count=len(images))
    order = _shuffled_patients(patients[in_tv], seed)
    n = len(order)
    n_val = _round_half_up(float(val_fraction) * n)
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1  # a tiny dataset still gets a validation patient
    n_val = min(n_val, n - 1) if n > 1 else 0
    val_patients = set(order[:n_val].tolist())
    out = {im: "test" for im in meta.test}
    for im, pt in zip(images[in_tv], patients[in_tv]):
        out[im] = "val" if int(pt) in val_patients else "train"
    return out, meta.files.get("train_val") or meta.root / TRAIN_VAL_NAME


def _chexnet(meta: NIHMetadata) -> tuple[dict[str, str], Path]:
    d = meta.files.get("chexnet") or meta.root / CHEXNET_DIRS[0]
    if meta.chexnet is None:
        have = chexnet_files(d) if d.is_dir() else {}
        for part in ("train", "val", "test"):
            if have.get(part) is None:
                raise DataError(d / f"{part}_list.txt", "missing: the chexnet split needs "
                                f"{CHEXNET_DIRS[0]}/{{train,val,test}}_list.txt (or {CHEXNET_DIRS[1]}/) in the NIH root")
    return {im: part for part, ids in meta.chexnet.items() for im in ids}, d


def check_patient_disjoint(entries: pd.DataFrame, split: pd.Series, source: str | Path | None = None) -> None:
    """Raise DataError if a patient has images in two parts of ``split``.

    Args:
        entries: metadata with ``image`` and ``patient`` columns.
        split: image id -> part (metadata images absent from ``split`` are ignored; split images
            absent from the metadata raise).
        source: the file the split came from, for the message.
    """
    patient_of = dict(zip(entries["image"].tolist(), entries["patient"].tolist()))
    images = split.index.tolist()
    parts = split.tolist()
    pats = np.fromiter((patient_of.get(im, -1) for im in images), dtype=np.int64, count=len(images))
    if (pats < 0).any():
        bad = [im for im in images if im not in patient_of]
        raise DataError(source, f"{len(bad)} split image(s) are not in the metadata (first: {bad[0]})")
    codes, names = pd.factorize(np.asarray(parts, dtype=object))
    # One (patient, part) pair per patient and part; a patient with two pairs is in two parts.
    k = max(len(names), 1)
    pairs = np.unique(pats * k + codes)
    pair_patients = pairs // k
    two = pair_patients[1:][pair_patients[1:] == pair_patients[:-1]]
    if len(two):
        patient = int(two.min())
        first: dict[str, str] = {}
        for im, pt, part in sorted(zip(images, pats.tolist(), parts)):
            if pt == patient:
                first.setdefault(part, im)
        where = "; ".join(f"{part}: {im}" for part, im in sorted(first.items()))
        raise DataError(source, f"patient {patient} is in more than one part of the split ({where})")


def split_summary(entries: pd.DataFrame, split: pd.Series) -> dict[str, dict[str, int]]:
    """``{part: {"images": n, "patients": m}}`` for the parts present in ``split``."""
    patient_of = dict(zip(entries["image"].tolist(), entries["patient"].tolist()))
    p = np.asarray([patient_of[im] for im in split.index.tolist()], dtype=np.int64)
    out = {}
    for part in PARTS:
        mask = (split == part).to_numpy()
        if mask.any():
            out[part] = {"images": int(mask.sum()), "patients": int(len(np.unique(p[mask])))}
    return out
