"""Splits of the real metadata (medattn.data.splits): sizes, patient-disjointness, determinism.

Hand-computed expectations:
* official: test = test_list.txt (25,596 images, 2,797 patients); val = round(0.1 * 28,008)
  = 2,801 of the 28,008 train_val patients.
* chexnet: the files' 78,468 / 11,219 / 22,433 images on 21,528 / 3,090 / 6,187 patients.
* random 0.7/0.1/0.2 of 30,805 patients: 21,563.5 -> 21,564 train, 3,080.5 -> 3,081 val,
  30,805 - 21,564 - 3,081 = 6,160 test (halves round up).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nihfmt_convert import bundled_meta

from medattn.data.nih import load_nih
from medattn.data.splits import check_patient_disjoint, make_split, split_summary
from medattn.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _digest(split: pd.Series) -> str:
    s = split.sort_index()
    return hashlib.sha256("\n".join(f"{i} {v}" for i, v in zip(s.index.tolist(), s.tolist())).encode()).hexdigest()


def test_official_split_sizes_and_disjoint():
    meta = bundled_meta()
    split = make_split(meta, "official", seed=0)
    assert split.name == "split" and split.index.name == "image"
    assert split.index.tolist() == meta.entries["image"].tolist()
    summary = split_summary(meta.entries, split)
    assert summary["test"] == {"images": 25_596, "patients": 2_797}
    assert summary["val"]["patients"] == 2_801
    assert summary["train"]["patients"] + summary["val"]["patients"] == 28_008
    assert summary["train"]["images"] + summary["val"]["images"] == 86_524
    assert set(split[split == "test"].index) == set(meta.test)
    assert split.attrs == {"kind": "official", "seed": 0, "unlisted": 0, "patients_crossing": 0}
    check_patient_disjoint(meta.entries, split)
    # val_fraction 0: no validation part at all.
    assert set(make_split(meta, "official", val_fraction=0.0).unique()) == {"train", "test"}


def test_chexnet_split_sizes_and_disjoint():
    meta = bundled_meta()
    split = make_split(meta, "chexnet")
    assert split_summary(meta.entries, split) == {
        "train": {"images": 78_468, "patients": 21_528},
        "val": {"images": 11_219, "patients": 3_090},
        "test": {"images": 22_433, "patients": 6_187},
    }
    assert split["00001522_000.png"] == "train" and split["00028178_000.png"] == "val"


def test_random_split_sizes_and_disjoint():
    meta = bundled_meta()
    split = make_split(meta, "random", seed=0)
    s = split_summary(meta.entries, split)
    assert [s[p]["patients"] for p in ("train", "val", "test")] == [21_564, 3_081, 6_160]
    assert sum(s[p]["images"] for p in s) == 112_120
    other = make_split(meta, "random", seed=0, fractions=(0.8, 0.0, 0.2))
    assert [split_summary(meta.entries, other)[p]["patients"] for p in ("train", "test")] == [24_644, 6_161]


def test_splits_deterministic_and_order_independent():
    meta = bundled_meta()
    shuffled = dataclasses.replace(meta, entries=meta.entries.sample(frac=1.0, random_state=7).reset_index(drop=True))
    for kind in ("official", "random"):
        a = make_split(meta, kind, seed=3)
        assert a.equals(make_split(meta, kind, seed=3))
        assert a.equals(make_split(shuffled, kind, seed=3).sort_index())
        b = make_split(meta, kind, seed=4)  # checks patient-disjointness itself
        assert (a != b).sum() > 1000


def test_split_independent_of_hash_seed():
    meta = bundled_meta()
    expected = {kind: _digest(make_split(meta, kind, seed=5)) for kind in ("official", "random")}
    code = ("import hashlib\n"
            "from medattn.data.nih import load_nih, bundled_nih_dir\n"
            "from medattn.data.splits import make_split\n"
            "m = load_nih(bundled_nih_dir())\n"
            "for kind in ('official', 'random'):\n"
            "    s = make_split(m, kind, seed=5).sort_index()\n"
            "    print(kind, hashlib.sha256('\\n'.join(f'{i} {v}' for i, v in zip(s.index.tolist(), s.tolist())).encode()).hexdigest())\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert dict(line.split() for line in out.splitlines()) == expected


def test_patient_disjoint_check_names_patient():
    meta = bundled_meta()
    split = make_split(meta, "official").copy()
    split["00000001_001.png"] = "test"  # patient 1 is in train_val
    with pytest.raises(DataError) as ei:
        check_patient_disjoint(meta.entries, split, source="my_split.csv")
    msg = str(ei.value)
    assert msg.startswith("my_split.csv: patient 1 is in more than one part")
    assert "test: 00000001_001.png" in msg and "00000001_000.png" in msg
    bad = pd.Series(["train"], index=pd.Index(["99999999_000.png"], name="image"))
    with pytest.raises(DataError, match=r"1 split image\(s\) are not in the metadata \(first: 99999999_000.png\)"):
        check_patient_disjoint(meta.entries, bad)


def test_unlisted_images(tmp_path):
    meta = bundled_meta()
    dropped = meta.train_val[:5]
    partial = dataclasses.replace(meta, train_val=meta.train_val[5:])
    with pytest.raises(DataError) as ei:
        make_split(partial, "official")
    msg = str(ei.value)
    assert "train_val_list.txt" in msg and "5 image(s)" in msg and dropped[0] in msg
    split = make_split(partial, "official", allow_unlisted=True)
    assert split.attrs["unlisted"] == 5 and len(split) == 112_115
    assert not set(dropped) & set(split.index)

    cx = dict(meta.chexnet)
    cx["val"] = cx["val"][1:]
    with pytest.raises(DataError, match=r"chexnet_split: 1 image\(s\) .* none of the chexnet split lists"):
        make_split(dataclasses.replace(meta, chexnet=cx), "chexnet")


def test_missing_list_files_named(tmp_path):
    root = tmp_path
    (root / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
        "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143\n")
    (root / "train_val_list.txt").write_text("00000001_000.png")
    meta = load_nih(root)
    with pytest.raises(DataError, match=r"test_list.txt: missing: the official split needs"):
        make_split(meta, "official")
    with pytest.raises(DataError, match=r"chexnet_split/train_list.txt: missing: the chexnet split needs"):
        make_split(meta, "chexnet")
    (root / "chexnet_split").mkdir()
    (root / "chexnet_split" / "train_list.txt").write_text("00000001_000.png" + " 0" * 14)
    (root / "chexnet_split" / "test_list.txt").write_text("")
    meta = load_nih(root)  # an incomplete chexnet folder does not stop the other splits
    assert meta.chexnet is None
    with pytest.raises(DataError, match=r"chexnet_split/val_list.txt: missing: the chexnet split needs"):
        make_split(meta, "chexnet")
    # The random split needs no lists.
    assert make_split(meta, "random", fractions=(1, 0, 0)).tolist() == ["train"]


def test_bad_parameters():
    meta = bundled_meta()
    with pytest.raises(ConfigError, match="unknown split kind 'kfold'"):
        make_split(meta, "kfold")
    with pytest.raises(ConfigError, match="summing to 1"):
        make_split(meta, "random", fractions=(0.7, 0.1, 0.1))
    with pytest.raises(ConfigError, match="summing to 1"):
        make_split(meta, "random", fractions=(1.2, -0.2, 0.0))
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
        make_split(meta, "official", val_fraction=1.0)


def test_split_values_are_strings():
    split = make_split(bundled_meta(), "chexnet")
    assert split.dtype == "str" and np.array_equal(np.sort(split.unique()), ["test", "train", "val"])
