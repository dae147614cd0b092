"""The image-level random split (`image-random`, AG-CNN's and Wang et al.'s protocol): sizes,
determinism, the patients it leaks, and that the patient-level kinds still prove disjointness.

Hand-computed expectations on the real metadata (112,120 images): 0.7 * 112,120 = 78,484 train,
0.1 * 112,120 = 11,212 val, 112,120 - 78,484 - 11,212 = 22,424 test (all exact, no rounding).
The patients that cross parts are counted here independently (a set per patient) and must equal
what make_split, prepare and inspect report.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nihfmt_convert import bundled_meta

from medattn.data._sources import nih_table
from medattn.data.splits import PATIENT_DISJOINT, check_patient_disjoint, make_split, split_summary
from medattn.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _crossing(entries: pd.DataFrame, split: pd.Series) -> int:
    parts: dict[int, set[str]] = {}
    patient_of = dict(zip(entries["image"], entries["patient"]))
    for im, part in split.items():
        parts.setdefault(int(patient_of[im]), set()).add(part)
    return sum(len(v) > 1 for v in parts.values())


def test_image_random_sizes_leak_and_determinism():
    meta = bundled_meta()
    split = make_split(meta, "image-random", seed=0)
    assert split.index.tolist() == meta.entries["image"].tolist()
    s = split_summary(meta.entries, split)
    assert [s[p]["images"] for p in ("train", "val", "test")] == [78_484, 11_212, 22_424]
    crossing = _crossing(meta.entries, split)
    assert split.attrs["patients_crossing"] == crossing
    assert 9_000 < crossing < 11_000  # a third of the 30,805 patients leak: the point of measuring it
    assert split.attrs["kind"] == "image-random" and split.attrs["seed"] == 0
    with pytest.raises(DataError, match="is in more than one part"):
        check_patient_disjoint(meta.entries, split)
    # Independent of the row order of the metadata; another seed gives another split.
    shuffled = dataclasses.replace(meta, entries=meta.entries.sample(frac=1.0, random_state=3).reset_index(drop=True))
    assert make_split(shuffled, "image-random", seed=0).sort_index().equals(split.sort_index())
    assert (make_split(meta, "image-random", seed=1) != split).sum() > 10_000
    with pytest.raises(ConfigError, match="summing to 1"):
        make_split(meta, "image-random", fractions=(0.7, 0.2, 0.2))


def test_patient_level_kinds_still_disjoint():
    meta = bundled_meta()
    for kind in PATIENT_DISJOINT:
        split = make_split(meta, kind, seed=0)
        assert split.attrs["patients_crossing"] == 0 == _crossing(meta.entries, split)
        check_patient_disjoint(meta.entries, split)


def test_nih_table_on_real_metadata_with_missing_images(shared_nih):
    """The 240 real images with --allow-missing: the split is drawn on the whole metadata, the
    table keeps the present images and says how many patients cross parts, both ways."""
    table = nih_table(shared_nih, split="image-random", allow_missing=True)
    assert len(table) == 240
    c = table.counts()
    assert sum(c.values()) == 240
    # 240 draws from 70/10/20: each share within 4 binomial standard deviations.
    for part, f in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(c[part] / 240 - f) < 4 * np.sqrt(f * (1 - f) / 240), (part, c)
    sp = table.split_protocol()
    recs = table.records
    expect = int((recs.groupby("patient")["split"].nunique() > 1).sum())
    assert sp == {"kind": "image-random", "seed": 0, "unit": "image", "patients": recs["patient"].nunique(),
                  "patients_crossing": expect,
                  "patients_crossing_in_metadata": make_split(bundled_meta(), "image-random").attrs["patients_crossing"]}
    official = nih_table(shared_nih, split="official", allow_missing=True).split_protocol()
    assert official["unit"] == "patient" and official["patients_crossing"] == 0


def test_inspect_reports_image_random_leak(shared_nih):
    out = subprocess.run([sys.executable, "-m", "medattn", "inspect", "--nih-root", str(shared_nih),
                          "--metadata-only"], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 0, out.stderr
    n = make_split(bundled_meta(), "image-random", seed=0).attrs["patients_crossing"]
    assert (f"image-random split (70/10/20 of images, seed 0): train 78,484, val 11,212, test 22,424 images; "
            f"{n:,} of 30,805 patients would have images in more than one part") in out.stdout


@pytest.mark.slow
def test_prepare_image_random_real_images(shared_nih, tmp_path):
    """`medattn prepare --split image-random --allow-missing` on the 240 real images (decodes
    them all: ~25 s on one core)."""
    import json

    out = subprocess.run([sys.executable, "-m", "medattn", "prepare", "--nih-root", str(shared_nih), "--out",
                          str(tmp_path / "prep"), "--size", "32", "--split", "image-random", "--allow-missing",
                          "--workers", "2", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    sp = info["split_protocol"]
    assert info["split"] == "image-random" and sp["unit"] == "image" and sum(info["counts"].values()) == 240
    assert (f"split image-random is image-level and leaks patients: {sp['patients_crossing']} of "
            f"{sp['patients']} patients have images in more than one part") in out.stdout
