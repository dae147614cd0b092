"""Readers for the real NIH metadata (medattn.data.nih), on the real files.

Expected numbers are from the research notes (chestxray14.md sections 1.2-1.5 and 2), which
recomputed them from the same files; the first rows are quoted there verbatim.
"""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
from nihfmt_convert import UNIT_AGES, bundled_meta, make_root, to_2017, to_updated, to_v2020_sex

from medattn.data.labels import NIH_LABELS
from medattn.data.nih import (
    ENTRY_COLUMNS, bundled_nih_dir, find_images, find_metadata_files, load_nih, parse_age, read_bbox_list,
    read_chexnet_split, read_data_entry, read_image_list,
)
from medattn.errors import DataError

PER_CLASS_V2020 = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Effusion": 13317, "Infiltration": 19894, "Mass": 5782,
    "Nodule": 6331, "Pneumonia": 1431, "Pneumothorax": 5302, "Consolidation": 4667, "Edema": 2303,
    "Emphysema": 2516, "Fibrosis": 1686, "Pleural_Thickening": 3385, "Hernia": 227, "No Finding": 60361,
}
BOXES_PER_CLASS = {"Atelectasis": 180, "Effusion": 153, "Cardiomegaly": 146, "Infiltration": 123,
                   "Pneumonia": 120, "Pneumothorax": 98, "Mass": 85, "Nodule": 79}


def assert_real_counts(meta, lists: bool = True) -> None:
    e = meta.entries
    assert len(e) == 112_120
    assert e["patient"].nunique() == 30_805
    assert (e["patient"].min(), e["patient"].max()) == (1, 30_805)
    if lists:
        assert len(meta.train_val) == 86_524 and len(meta.test) == 25_596
        assert len(meta.boxes) == 984 and meta.boxes["image"].nunique() == 880
    assert meta.per_class_counts() == PER_CLASS_V2020
    assert list(meta.per_class_counts()) == list(NIH_LABELS)
    assert e["view"].value_counts().to_dict() == {"PA": 67_310, "AP": 44_810}
    assert e["sex"].value_counts().to_dict() == {"M": 63_340, "F": 48_780}
    assert (e["labels"].map(len) >= 2).sum() == 20_796
    assert e["image"].is_monotonic_increasing and e["image"].is_unique


# ----------------------------------------------------------------------------- the real files
def test_bundled_metadata_counts():
    meta = bundled_meta()
    assert meta.variant == "v2020"
    assert meta.entries_path.name == "Data_Entry_2017_v2020.csv.gz"
    assert_real_counts(meta)
    assert {k: len(v) for k, v in meta.chexnet.items()} == {"train": 78_468, "val": 11_219, "test": 22_433}
    assert meta.boxes["label"].value_counts().to_dict() == BOXES_PER_CLASS
    # All 880 boxed images are in the official test list (research notes 1.4).
    assert set(meta.boxes["image"]) <= set(meta.test)


def test_bundled_size_is_small():
    total = sum(p.stat().st_size for p in bundled_nih_dir().rglob("*") if p.is_file())
    assert total < 2_000_000


def test_shared_metadata_counts_and_equal_to_bundled(shared_nih):
    meta = load_nih(shared_nih)
    assert meta.entries_path.name == "Data_Entry_2017_v2020.csv" and meta.variant == "v2020"
    assert_real_counts(meta)
    b = bundled_meta()
    assert meta.entries.drop(columns="labels").equals(b.entries.drop(columns="labels"))
    assert meta.entries["labels"].tolist() == b.entries["labels"].tolist()
    assert meta.boxes.equals(b.boxes)
    assert meta.train_val == b.train_val and meta.test == b.test and meta.chexnet == b.chexnet


def test_full_metadata_parses():
    """All 112,120 rows (~0.4 s on 2 cores; speed is not asserted: timed tests fail on loaded machines)."""
    path = bundled_nih_dir() / "Data_Entry_2017_v2020.csv.gz"
    assert len(read_data_entry(path)[0]) == 112_120


def test_v2020_first_rows_and_dtypes():
    e = bundled_meta().entries
    assert tuple(e.columns) == ENTRY_COLUMNS
    assert {c: str(e[c].dtype) for c in ("patient", "follow_up", "age", "orig_width", "orig_height", "source_row")} == {
        "patient": "int64", "follow_up": "int64", "age": "float64", "orig_width": "int64", "orig_height": "int64",
        "source_row": "int64"}
    first = e.iloc[0]
    assert first["image"] == "00000001_000.png" and first["labels"] == ["Cardiomegaly"]
    assert (first["patient"], first["follow_up"], first["age"], first["sex"], first["view"]) == (1, 0, 57.0, "M", "PA")
    assert (first["orig_width"], first["orig_height"], first["source_row"]) == (2682, 2749, 2)
    # v2020 is ordered by (patient, follow-up): 00000003_000.png is the last row of patient 3.
    r = e.set_index("image").loc["00000003_000.png"]
    assert (r["follow_up"], r["source_row"]) == (7, 13)
    r = e.set_index("image").loc["00000003_001.png"]
    assert (r["follow_up"], r["age"], r["labels"], r["source_row"]) == (0, 74.0, ["Hernia"], 6)
    last = e.iloc[-1]
    assert (last["image"], last["age"], last["source_row"]) == ("00030805_000.png", 26.0, 112_121)
    # 51 corrected rows keep their labels unsorted; order is kept as written.
    assert e.set_index("image").loc["00001836_082.png", "labels"] == ["Atelectasis", "Nodule", "Mass"]


# Verbatim from the research notes, section 1.2.
TEXT_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\r\n"
    "00000001_000.png,Cardiomegaly,000,00000001,058Y,M,PA,2682,2749,0.143,0.143\r\n"
    "00000001_001.png,Cardiomegaly|Emphysema,001,00000001,058Y,M,PA,2894,2729,0.143,0.143\r\n"
    "00000001_002.png,Cardiomegaly|Effusion,002,00000001,058Y,M,PA,2500,2048,0.168,0.168\r\n"
    "00000002_000.png,No Finding,000,00000002,081Y,M,PA,2500,2048,0.171,0.171\r\n"
    "00000003_000.png,Hernia,000,00000003,081Y,F,PA,2582,2991,0.143,0.143\r\n"
    "00030805_000.png,No Finding,000,00030805,027Y,M,PA,2048,2500,0.171,0.171\r\n"
)
TEXT_UPDATED = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n"
    "00000001_002.png,Cardiomegaly|Effusion,2,1,58,M,PA,2500,2048,0.168,0.168\n"
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171\n"
    "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143\n"
    "00001836_082.png,Atelectasis|Nodule|Mass,82,1836,50,F,AP,2500,2048,0.168,0.168\n"
)
TEXT_SAMPLE = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y\n"
    "00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,005,00000013,060Y,M,AP,3056,2544,0.139,0.139\n"
    "00000013_026.png,Cardiomegaly|Emphysema,026,00000013,057Y,M,AP,2500,2048,0.168,0.168\n"
    "00000017_001.png,No_Finding,001,00000017,077Y,M,AP,2500,2048,0.168,0.168\n"
)
TEXT_PYHEALTH = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002,\n"
)


def _rec(e, i):
    r = e.iloc[i]
    return (r["image"], r["labels"], r["follow_up"], r["patient"], r["age"], r["sex"], r["view"],
            r["orig_width"], r["orig_height"], r["source_row"])


@pytest.mark.parametrize("gz", [False, True])
def test_first_rows_2017_verbatim(tmp_path, gz):
    p = tmp_path / ("Data_Entry_2017.csv.gz" if gz else "Data_Entry_2017.csv")
    p.write_bytes(gzip.compress(TEXT_2017.encode()) if gz else TEXT_2017.encode())
    e, variant = read_data_entry(p)
    assert variant == "2017"
    assert _rec(e, 0) == ("00000001_000.png", ["Cardiomegaly"], 0, 1, 58.0, "M", "PA", 2682, 2749, 2)
    assert _rec(e, 1) == ("00000001_001.png", ["Cardiomegaly", "Emphysema"], 1, 1, 58.0, "M", "PA", 2894, 2729, 3)
    assert _rec(e, 3) == ("00000002_000.png", ["No Finding"], 0, 2, 81.0, "M", "PA", 2500, 2048, 5)
    assert _rec(e, 4) == ("00000003_000.png", ["Hernia"], 0, 3, 81.0, "F", "PA", 2582, 2991, 6)
    assert _rec(e, 5) == ("00030805_000.png", ["No Finding"], 0, 30805, 27.0, "M", "PA", 2048, 2500, 7)
    # The plain name resolves to the .gz copy too.
    if gz:
        assert len(read_data_entry(tmp_path / "Data_Entry_2017.csv")[0]) == 6


def test_first_rows_updated_sample_and_pyhealth_verbatim(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text(TEXT_UPDATED, newline="")
    e, variant = read_data_entry(p)
    assert variant == "updated"
    assert _rec(e, 0) == ("00000001_000.png", ["Cardiomegaly"], 0, 1, 58.0, "M", "PA", 2682, 2749, 2)
    assert _rec(e, 5) == ("00001836_082.png", ["Atelectasis", "Nodule", "Mass"], 82, 1836, 50.0, "F", "AP",
                          2500, 2048, 7)

    p = tmp_path / "sample_labels.csv"
    p.write_text(TEXT_SAMPLE, newline="")
    e, variant = read_data_entry(p)
    assert variant == "sample"
    assert _rec(e, 0) == ("00000013_005.png", ["Emphysema", "Infiltration", "Pleural_Thickening", "Pneumothorax"],
                          5, 13, 60.0, "M", "AP", 3056, 2544, 2)
    assert _rec(e, 2) == ("00000017_001.png", ["No Finding"], 1, 17, 77.0, "M", "AP", 2500, 2048, 4)

    p = tmp_path / "Data_Entry_2017_v2020.csv"
    p.write_text(TEXT_PYHEALTH, newline="")
    e, variant = read_data_entry(p)
    assert variant == "v2020"
    assert _rec(e, 0) == ("00000001_000.png", ["Cardiomegaly"], 0, 1, 57.0, "M", "PA", 2682, 2749, 2)


def test_parse_age_units():
    assert parse_age("058Y") == 58.0
    assert parse_age("58") == 58.0
    assert parse_age("011M") == pytest.approx(11 / 12)
    assert parse_age("006M") == 0.5
    assert parse_age("001D") == pytest.approx(1 / 365.25)
    assert parse_age("030D") == pytest.approx(0.0821355, abs=1e-7)
    assert math.isnan(parse_age(""))
    for bad in ("58 years", "Y", "-5", "12W", "5.5.5"):
        with pytest.raises(ValueError, match="unparsable age"):
            parse_age(bad)


# ----------------------------------------------------------------------------- other formattings
@pytest.fixture(scope="module")
def formatted_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    return {
        "2017": make_root(base / "a", "Data_Entry_2017.csv", to_2017()),
        # The lists and boxes are the same files for every formatting: read them once (above).
        "updated": make_root(base / "b", "Data_Entry_2017.csv.gz", to_updated(), lists=False, boxes=False),
        "v2020": make_root(base / "c", "Data_Entry_2017_v2020.csv", to_v2020_sex(), lists=False, boxes=False),
    }


@pytest.mark.parametrize("variant", ["2017", "updated", "v2020"])
def test_same_counts_in_every_formatting(formatted_roots, variant):
    meta = load_nih(formatted_roots[variant])
    assert meta.variant == variant
    assert_real_counts(meta, lists=variant == "2017")
    ref = bundled_meta().entries
    e = meta.entries
    same = ["image", "patient", "follow_up", "sex", "view", "orig_width", "orig_height"]
    assert e[same].equals(ref[same])
    assert e["labels"].tolist() == ref["labels"].tolist()
    ages = e.set_index("image")["age"]
    ref_ages = ref.set_index("image")["age"]
    if variant == "2017":
        for image, (_, years) in UNIT_AGES.items():
            assert ages[image] == pytest.approx(years)
        ages, ref_ages = ages.drop(list(UNIT_AGES)), ref_ages.drop(list(UNIT_AGES))
    assert ages.equals(ref_ages)


def test_2017_formatting_is_byte_faithful():
    data = to_2017()
    head = data.split(b"\r\n", 2)
    assert head[0].endswith(b"OriginalImagePixelSpacing[x,y],")
    assert head[1] == b"00000001_000.png,Cardiomegaly,000,00000001,057Y,M,PA,2682,2749,0.14300000000000002,0.14300000000000002"
    assert data.endswith(b"00030805_000.png,No Finding,000,00030805,030D,M,PA,2048,2500,0.171,0.171\r\n")
    assert data.count(b"\r\n") == 112_121


def test_v2020_wins_over_2017(tmp_path):
    root = make_root(tmp_path, "Data_Entry_2017.csv", TEXT_2017.encode(), lists=False, boxes=False)
    (root / "Data_Entry_2017_v2020.csv").write_text(TEXT_PYHEALTH, newline="")
    files = find_metadata_files(root)
    assert files["entries"].name == "Data_Entry_2017_v2020.csv"
    assert files["entries_ignored"].name == "Data_Entry_2017.csv"
    meta = load_nih(root)
    assert meta.variant == "v2020" and len(meta.entries) == 1
    assert meta.train_val is None and meta.test is None and meta.chexnet is None and len(meta.boxes) == 0


def test_label_matrix():
    meta = bundled_meta()
    m = meta.label_matrix()
    assert m.shape == (112_120, 15) and m.dtype == np.uint8
    assert m.sum(axis=0).tolist() == list(PER_CLASS_V2020.values())
    assert m.sum() == 141_537  # label occurrences (research notes section 2)
    i = meta.entries.index[meta.entries["image"] == "00000001_001.png"][0]
    assert np.flatnonzero(m[i]).tolist() == [1, 10]  # Cardiomegaly, Emphysema
    sub = meta.label_matrix(["Hernia", "No Finding"])
    assert sub.sum(axis=0).tolist() == [227, 60_361]
    with pytest.raises(ValueError, match="Infiltrate"):
        meta.label_matrix(["Infiltrate"])


def test_bbox_first_rows_and_excel_header(tmp_path):
    b = bundled_meta().boxes
    r = b.iloc[0]
    assert (r["image"], r["label"], r["source_row"]) == ("00013118_008.png", "Atelectasis", 2)
    assert (r["x"], r["y"], r["w"], r["h"]) == (225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661)
    # The Infiltrate block starts after 161 Atelectasis, 146 Cardiomegaly and 153 Effusion rows.
    r = b.set_index("source_row").loc[2 + 161 + 146 + 153]
    assert (r["image"], r["label"]) == ("00020259_002.png", "Infiltration")  # 'Infiltrate' in the file
    assert b.set_index("source_row").loc[2 + 161 + 146 + 153 - 1, "label"] == "Effusion"
    last = b.iloc[-1]
    assert (last["image"], last["label"], last["source_row"]) == ("00026920_000.png", "Atelectasis", 985)
    assert float((b["x"] + b["w"]).max()) == pytest.approx(1012.08, abs=0.01)
    assert float((b["y"] + b["h"]).max()) == pytest.approx(1022.05, abs=0.01)
    # Excel re-saved copy: truncated header, CRLF, values rounded.
    p = tmp_path / "BBox_List_2017.csv"
    p.write_bytes(b"Image Index,Finding Label,Bbox [x,y,w,h]\r\n00013118_008.png,Infiltrate,225.0847458,547.0192168,86.77966102,79.18644068\r\n")
    b2 = read_bbox_list(p)
    assert b2.iloc[0][["image", "label", "source_row"]].tolist() == ["00013118_008.png", "Infiltration", 2]


def test_image_lists(tmp_path):
    meta = bundled_meta()
    assert meta.train_val[:3] == ["00000001_000.png", "00000001_001.png", "00000001_002.png"]
    assert meta.test[:3] == ["00000003_000.png", "00000003_001.png", "00000003_002.png"]
    assert meta.test[-1] == "00030805_000.png"
    assert not set(meta.train_val) & set(meta.test)
    assert len(set(meta.train_val) | set(meta.test)) == 112_120
    p = tmp_path / "test_list.txt"
    p.write_bytes(b" 00000003_000.png\n00000003_001.png \n\n")  # spaces stripped, trailing blank line ok
    assert read_image_list(p) == ["00000003_000.png", "00000003_001.png"]


def test_chexnet_files_read():
    cx = read_chexnet_split(bundled_nih_dir() / "chexnet_split")
    assert cx["train"][0] == "00001522_000.png"  # first line of arnoweng's train_list.txt
    assert cx["val"][:2] == ["00028178_000.png", "00030605_000.png"]
    assert sum(map(len, cx.values())) == 112_120


def test_find_images_layouts(tmp_path):
    for rel in ("images_001/images/00000001_000.png", "images_012/images/00030805_000.png",
                "images/00000002_000.png", "00000003_000.png", "images_001/images/._00000001_000.png",
                "images/notes.txt", "images_001/00000009_000.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = find_images(tmp_path)
    assert {k: v.relative_to(tmp_path).as_posix() for k, v in found.items()} == {
        "00000001_000.png": "images_001/images/00000001_000.png",
        "00030805_000.png": "images_012/images/00030805_000.png",
        "00000002_000.png": "images/00000002_000.png",
        "00000003_000.png": "00000003_000.png",
    }
    (tmp_path / "images" / "00000001_000.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"images_001/images/00000001_000.png: image 00000001_000.png is also at .*/images/00000001_000.png"):
        find_images(tmp_path)


def test_find_images_many_files(tmp_path):
    d = tmp_path / "images_003" / "images"
    d.mkdir(parents=True)
    for i in range(5000):
        (d / f"{i:08d}_000.png").write_bytes(b"")
    found = find_images(tmp_path)  # ~30 ms; 112k files take ~0.5 s (not asserted: timed tests flake)
    assert len(found) == 5000


# ----------------------------------------------------------------------------- bad input
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
GOOD = ["00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
        "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
        "00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171"]


def _entries_error(tmp_path, lines, header=HEADER) -> str:
    p = tmp_path / "Data_Entry_2017_v2020.csv"
    p.write_text("\n".join([header] + lines) + "\n")
    with pytest.raises(DataError) as ei:
        read_data_entry(p)
    msg = str(ei.value)
    assert "Data_Entry_2017_v2020.csv" in msg
    return msg


@pytest.mark.parametrize("bad_line, row, expected", [
    ("00000003_000.png,Hernia,0,3,74,F,PA,2500,2048,0.168", 5, "expected 11 comma-separated fields"),
    ("00000003_000.png,Hernia,0,3,74,F,PA,2500,2048,0.168,0.168,0.1", 5, "found 12"),
    ("00000003_000.png,Hernia|Lung Cancer,0,3,74,F,PA,2500,2048,0.168,0.168", 5, "unknown label 'Lung Cancer'"),
    ("00000003_000.png,,0,3,74,F,PA,2500,2048,0.168,0.168", 5, "empty Finding Labels"),
    ("00000003_000.png,No Finding|Hernia,0,3,74,F,PA,2500,2048,0.168,0.168", 5, "'No Finding' together"),
    ("00000001_001.png,Hernia,0,3,74,F,PA,2500,2048,0.168,0.168", 5, "duplicate image id 00000001_001.png (also on row 3)"),
    ("00000003_000.png,Hernia,0,3,74 years,F,PA,2500,2048,0.168,0.168", 5, "unparsable age '74 years'"),
    ("00000003_000.png,Hernia,0,P3,74,F,PA,2500,2048,0.168,0.168", 5, "unparsable Patient ID 'P3'"),
    ("00000003_000.png,Hernia,-1,3,74,F,PA,2500,2048,0.168,0.168", 5, "unparsable Follow-up # '-1'"),
    ("00000003_000.png,Hernia,0,3,74,X,PA,2500,2048,0.168,0.168", 5, "unknown Patient Gender 'X'"),
    ("00000003_000.png,Hernia,0,3,74,F,LL,2500,2048,0.168,0.168", 5, "unknown View Position 'LL'"),
    ("00000003_000.png,Hernia,0,3,74,F,PA,0,2048,0.168,0.168", 5, "must be positive integers"),
    ("00000003_000,Hernia,0,3,74,F,PA,2500,2048,0.168,0.168", 5, "bad image id '00000003_000'"),
])
def test_entry_errors_name_file_and_row(tmp_path, bad_line, row, expected):
    msg = _entries_error(tmp_path, GOOD + [bad_line] + GOOD[:0])
    assert f"row {row}" in msg
    assert expected in msg


def test_entry_error_missing_columns_and_empty(tmp_path):
    header = HEADER.replace("View Position,", "").replace("Patient Gender", "Gender")
    msg = _entries_error(tmp_path, [], header=header)
    assert "missing required column(s): Patient Gender (or Patient Sex), View Position" in msg and "row 1" in msg
    msg = _entries_error(tmp_path, [])
    assert "no data rows" in msg
    msg = _entries_error(tmp_path, [GOOD[0], "", GOOD[1]])
    assert "row 3" in msg and "empty line" in msg
    p = tmp_path / "x" / "Data_Entry_2017.csv"
    with pytest.raises(DataError, match="Data_Entry_2017.csv: file not found"):
        read_data_entry(p)
    p.parent.mkdir()
    p.write_bytes(b"")
    with pytest.raises(DataError, match="Data_Entry_2017.csv: empty file"):
        read_data_entry(p)
    p.write_bytes((HEADER + "\n" + GOOD[0]).encode() + b"\n\xff\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv, row 3: not UTF-8"):
        read_data_entry(p)


def test_entry_error_bare_cr_and_bad_gzip(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_bytes((HEADER + "\r" + GOOD[0] + "\n").encode())
    with pytest.raises(DataError, match="Data_Entry_2017.csv, row 1: bare carriage return"):
        read_data_entry(p)
    p = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    p.write_bytes(gzip.compress(("\n".join([HEADER] + GOOD) + "\n").encode())[:-20])
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020.csv.gz: unreadable"):
        read_data_entry(p)


BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


@pytest.mark.parametrize("line, expected", [
    ("00000001_000.png,Atelectasis,900,100,200.5,50", "lies outside the 1024x1024 image"),
    ("00000001_000.png,Atelectasis,-1,100,20,50", "lies outside"),
    ("00000001_000.png,Atelectasis,10,1000,20,30", "lies outside"),
    ("00000001_000.png,Atelectasis,10,100,0,50", "non-positive size"),
    ("00000001_000.png,Atelectasis,10,100,20,-5", "non-positive size"),
    ("00000001_000.png,Atelectasis,10,100,20", "expected 6 comma-separated fields"),
    ("00000001_000.png,Hernia|Mass,10,100,20,30", "unknown box label 'Hernia|Mass'"),
    ("00000001_000.png,No Finding,10,100,20,30", "unknown box label 'No Finding'"),
    ("00000001_000.png,Mass,ten,100,20,30", "unparsable box coordinates"),
    ("00000001_000.png,Mass,nan,100,20,30", "non-finite"),
])
def test_bbox_errors_name_file_and_row(tmp_path, line, expected):
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text(f"{BOX_HEADER}\n00000001_000.png,Mass,10,10,20,20\n{line}\n")
    with pytest.raises(DataError) as ei:
        read_bbox_list(p)
    assert "BBox_List_2017.csv, row 3" in str(ei.value) and expected in str(ei.value)


def test_bbox_bad_header(tmp_path):
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text("image,label,x,y,w,h\n")
    with pytest.raises(DataError, match=r"BBox_List_2017.csv, row 1: unexpected header"):
        read_bbox_list(p)


def _root_with_v2020(tmp_path, lines=GOOD):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join([HEADER] + lines) + "\n")
    return tmp_path


def test_cross_file_errors(tmp_path):
    root = _root_with_v2020(tmp_path / "boxes")
    (root / "BBox_List_2017.csv").write_text(f"{BOX_HEADER}\n00000001_000.png,Mass,10,10,20,20\n"
                                             f"00000009_000.png,Mass,10,10,20,20\n")
    with pytest.raises(DataError, match=r"BBox_List_2017.csv, row 3: box image 00000009_000.png is not in "
                                        r"the metadata Data_Entry_2017_v2020.csv"):
        load_nih(root)

    root = _root_with_v2020(tmp_path / "lists")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000007_000.png")
    with pytest.raises(DataError, match=r"train_val_list.txt, row 3: image 00000007_000.png is not in the metadata"):
        load_nih(root)
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png")
    (root / "test_list.txt").write_text("00000002_000.png\n00000001_001.png")
    with pytest.raises(DataError, match=r"test_list.txt, row 2: image 00000001_001.png is in both "
                                        r"train_val_list.txt and test_list.txt"):
        load_nih(root)
    (root / "test_list.txt").write_text("")
    with pytest.raises(DataError, match=r"test_list.txt: empty list file"):
        load_nih(root)
    (root / "test_list.txt").write_text("00000002_000.png\n00000002_000.png\n")
    with pytest.raises(DataError, match=r"test_list.txt, row 2: duplicate image id 00000002_000.png \(also on line 1\)"):
        load_nih(root)
    (root / "test_list.txt").write_text("00000002_000.png 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n")
    with pytest.raises(DataError, match=r"test_list.txt, row 1: expected one image id per line"):
        load_nih(root)

    with pytest.raises(DataError, match=r"no metadata file: expected Data_Entry_2017_v2020.csv"):
        load_nih(tmp_path / "boxes" / "..")
    with pytest.raises(DataError, match="NIH root does not exist"):
        load_nih(tmp_path / "nope")


def test_chexnet_errors(tmp_path):
    d = tmp_path / "chexnet_split"
    d.mkdir()
    zeros = " 0" * 14
    (d / "train_list.txt").write_text(f"00000001_000.png{zeros}\n00000001_001.png{zeros}\n")
    with pytest.raises(DataError, match=r"chexnet_split/val_list.txt: missing CheXNet split file"):
        read_chexnet_split(d)
    (d / "val_list.txt").write_text(f"00000002_000.png{zeros}")
    (d / "test_list.txt").write_text(f"00000003_000.png{zeros}\n00000001_001.png{zeros}")
    with pytest.raises(DataError, match=r"test_list.txt, row 2: image 00000001_001.png is listed twice "
                                        r"\(also on train_list.txt line 2\)"):
        read_chexnet_split(d)
    (d / "test_list.txt").write_text(f"00000003_000.png 0 2{zeros[4:]}")
    with pytest.raises(DataError, match=r"test_list.txt, row 1: expected '<image id>' and 14 labels 0/1"):
        read_chexnet_split(d)
    (d / "test_list.txt").write_text(f"00000003_000.png{zeros}")
    assert read_chexnet_split(d) == {"train": ["00000001_000.png", "00000001_001.png"],
                                     "val": ["00000002_000.png"], "test": ["00000003_000.png"]}
    # In an NIH root, chexnet ids must be in the metadata.
    root = _root_with_v2020(tmp_path)
    with pytest.raises(DataError, match=r"chexnet_split/test_list.txt, row 1: image 00000003_000.png is not in"):
        load_nih(root)
