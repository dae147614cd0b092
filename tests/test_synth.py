"""`medattn synth`: the synthetic ChestX-ray14 in the exact NIH layout.

Real files, real PNG decoding, real multiprocessing; ~120 images at 256 px per generation.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medattn.cli import main
from medattn.data import _synth_meta as meta
from medattn.data._synth_anatomy import sample_anatomy
from medattn.data._synth_draw import render
from medattn.data._synth_lesions import plan_findings
from medattn.data.labels import BOX_CLASSES, DISEASES, NIH_LABELS, NO_FINDING, parse_finding_labels
from medattn.data.synth import MARKER, generate
from medattn.errors import ConfigError, DataError

N = 120
S = 256
HEADER = (b"Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          b"OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
BOX_HEADER = b"Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
ID_RE = re.compile(r"^(\d{8})_(\d{3})\.png$")


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "nih"
    s = generate(out, n_images=N, size=S, seed=3, workers=2)
    assert s["images"] == N and s["out"] == str(out)
    return out


def _entries(root: Path) -> list[list[str]]:
    with open(root / "Data_Entry_2017_v2020.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:]


def _boxes(root: Path) -> list[list[str]]:
    with open(root / "BBox_List_2017.csv", newline="") as f:
        return list(csv.reader(f))[1:]


def _lists(root: Path) -> tuple[list[str], list[str]]:
    return ((root / "train_val_list.txt").read_text().split("\n"), (root / "test_list.txt").read_text().split("\n"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ layout and formats
def test_layout(ds):
    pngs = sorted((ds / "images_001" / "images").glob("*.png"))
    assert len(pngs) == N
    assert sorted(p.name for p in (ds / "masks").iterdir()) == [p.name for p in pngs]
    assert [p.name for p in ds.iterdir() if p.name.startswith("images_")] == ["images_001"]
    ids = {r[0] for r in _entries(ds)}
    assert ids == {p.name for p in pngs}
    info = json.loads((ds / MARKER).read_text())
    assert info["generator"] == "medattn synth" and info["images"] == N and info["size"] == S


def test_archive_spill_like_nih():
    # images_001 holds 4,999 images, every later archive 10,000 (sorted image-id order)
    assert meta.archive_of(0) == "images_001"
    assert meta.archive_of(4998) == "images_001"
    assert meta.archive_of(4999) == "images_002"
    assert meta.archive_of(14998) == "images_002"
    assert meta.archive_of(14999) == "images_003"


def test_data_entry_v2020_format(ds):
    raw = (ds / "Data_Entry_2017_v2020.csv").read_bytes()
    assert raw.startswith(HEADER)
    assert b"\r" not in raw and raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    rows = _entries(ds)
    assert len(rows) == N
    per_patient: dict[int, list[tuple[int, int]]] = {}
    keys = []
    for r in rows:
        assert len(r) == 11, r
        img, labels, fu, pid, age, sex, view, w, h, sx, sy = r
        m = ID_RE.match(img)
        assert m and int(m.group(1)) == int(pid), r
        assert pid == str(int(pid)) and fu == str(int(fu))          # v2020: no zero padding
        assert sex in ("M", "F") and view in ("PA", "AP")
        assert 0 <= int(age) <= 95
        assert 1500 <= int(w) <= 3100 and 1500 <= int(h) <= 3100
        assert sx == sy and 0.1 < float(sx) < 0.2
        parts = labels.split("|")
        assert parse_finding_labels(labels) == parts              # canonical spellings, no duplicates
        assert all(p in NIH_LABELS for p in parts)
        assert NO_FINDING not in parts or parts == [NO_FINDING]   # No Finding alone
        keys.append((int(pid), int(fu)))
        per_patient.setdefault(int(pid), []).append((int(fu), int(age)))
    assert keys == sorted(keys)                                   # by patient, then follow-up
    for fus in per_patient.values():
        assert [f for f, _ in fus] == list(range(len(fus)))       # contiguous follow-ups
        ages = [a for _, a in fus]
        assert ages == sorted(ages)                               # chronological
    assert len(per_patient) < N                                   # several images per patient
    assert max(len(v) for v in per_patient.values()) >= 3


def test_label_frequencies_like_nih(ds):
    rows = _entries(ds)
    nf = sum(r[1] == NO_FINDING for r in rows) / len(rows)
    assert 0.35 < nf < 0.65
    # at 1,600 images (the demo) every finding has enough test positives to evaluate
    rows = meta.plan_patients(1600, 0)
    meta.split_patients(rows, 0)
    test = [r for r in rows if r.split == "test"]
    for d in DISEASES:
        assert sum(d in r.labels for r in test) >= 8, d
    counts = {d: sum(d in r.labels for r in rows) for d in DISEASES}
    assert max(counts, key=counts.get) == "Infiltration"
    assert counts["Hernia"] < counts["Effusion"] / 2


def test_split_lists(ds):
    raw_tv = (ds / "train_val_list.txt").read_bytes()
    raw_te = (ds / "test_list.txt").read_bytes()
    for raw in (raw_tv, raw_te):
        assert not raw.endswith(b"\n") and b"\r" not in raw
    tv, te = _lists(ds)
    assert tv == sorted(tv) and te == sorted(te)
    assert not set(tv) & set(te)
    assert set(tv) | set(te) == {r[0] for r in _entries(ds)}
    assert {i[:8] for i in tv}.isdisjoint({i[:8] for i in te})    # patient-disjoint
    assert 0.12 < len(te) / N < 0.35


def test_bbox_list_format(ds):
    raw = (ds / "BBox_List_2017.csv").read_bytes()
    assert raw.startswith(BOX_HEADER) and raw.endswith(b"\n") and b"\r" not in raw
    boxes = _boxes(ds)
    assert boxes, "no boxes written"
    labels = {r[0]: parse_finding_labels(r[1]) for r in _entries(ds)}
    _, test = _lists(ds)
    spellings = {"Infiltrate" if c == "Infiltration" else c for c in BOX_CLASSES}
    for r in boxes:
        assert len(r) == 6, r
        img, lab = r[0], r[1]
        x, y, w, h = map(float, r[2:])
        assert lab in spellings, lab                              # Infiltrate, never Infiltration
        assert img in test                                        # boxes only on test images
        canon = "Infiltration" if lab == "Infiltrate" else lab
        assert canon in labels[img]
        # 1024-px coordinates whatever the PNG size (here 256)
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= 1024 + 1e-6 and y + h <= 1024 + 1e-6
    # most test images with a box class get a box (the real file: 880 images, all test)
    boxed = {r[0] for r in boxes}
    with_box_class = [i for i in test if any(c in BOX_CLASSES for c in labels[i])]
    assert 0.3 <= len(boxed) / len(with_box_class) <= 1.0


def test_box_coordinates_are_1024_space_when_images_are_smaller(tmp_path):
    # a nodule is 0.056-0.072 of the image wide: 55-76 px in 1024 space whatever S (here 64 px,
    # so one pixel = 16 box units of quantisation)
    generate(tmp_path / "a", n_images=400, size=64, seed=5, workers=2)
    rows = _boxes(tmp_path / "a")
    nod = [r for r in rows if r[1] == "Nodule"]
    heart = [r for r in rows if r[1] == "Cardiomegaly"]
    assert nod and heart
    for r in nod:
        assert 36 <= float(r[4]) <= 96 and 36 <= float(r[5]) <= 96, r
    for r in heart:   # an enlarged heart is over 0.42 of the image wide
        assert float(r[4]) >= 0.42 * 1024, r


def test_images_gray_and_rgba(ds):
    modes = {}
    for p in sorted((ds / "images_001" / "images").glob("*.png")):
        im = Image.open(p)
        assert im.size == (S, S)
        modes[p.name] = im.mode
        if im.mode == "RGBA":
            a = np.asarray(im)
            assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
            assert (a[..., 3] == 255).all()
            assert {"srgb", "gamma", "dpi"} <= set(im.info)
        else:
            assert im.mode == "L"
    n_rgba = sum(m == "RGBA" for m in modes.values())
    assert 1 <= n_rgba <= 3


def _chunk_types(path) -> list[bytes]:
    """PNG chunk types in file order (after the 8-byte signature)."""
    data = path.read_bytes()
    chunks, i = [], 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        chunks.append(data[i + 4:i + 8])
        i += 12 + n
    return chunks


def test_png_chunks_like_nih(ds):
    p = next(q for q in sorted((ds / "images_001" / "images").glob("*.png")) if Image.open(q).mode == "L")
    chunks = _chunk_types(p)
    assert chunks[:3] == [b"IHDR", b"tIME", b"IDAT"] and chunks[-1] == b"IEND"
    rgba = next(q for q in sorted((ds / "images_001" / "images").glob("*.png")) if Image.open(q).mode == "RGBA")
    chunks = _chunk_types(rgba)
    assert chunks[:6] == [b"IHDR", b"sRGB", b"gAMA", b"pHYs", b"tIME", b"IDAT"] and chunks[-1] == b"IEND"
    assert round(Image.open(rgba).info["dpi"][0], 2) == 96.01


def test_masks_cover_the_lungs(ds):
    names = sorted(p.name for p in (ds / "masks").iterdir())[:40]
    for name in names:
        m = np.asarray(Image.open(ds / "masks" / name))
        img = np.asarray(Image.open(ds / "images_001" / "images" / name).convert("L")).astype(float)
        assert m.shape == (S, S) and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 255}
        lung = m == 255
        assert 0.12 < lung.mean() < 0.45, name
        assert lung[:, : S // 2].sum() > 0.3 * lung.sum() and lung[:, S // 2:].sum() > 0.3 * lung.sum()
        # lungs are the dark fields of the chest: darker than the mediastinum strip between them
        mid = img[S // 4: 3 * S // 4, S // 2 - S // 32: S // 2 + S // 32]
        assert img[lung].mean() < mid.mean() - 30, name


# ------------------------------------------------------------------ what the lesions look like
def _render_pair(cls: str, index: int):
    """The same film with and without one finding (same anatomy, noise and jitter)."""
    rng = np.random.default_rng([11, index])
    anat = sample_anatomy(rng, "M", 50)
    a_with, lesions = plan_findings(anat, [cls], {}, np.random.default_rng([12, index]))
    a_none, _ = plan_findings(anat, [], {}, np.random.default_rng([12, index]))
    job = {"seed": 1, "index": index, "size": S, "view": "PA"}
    img1, _, boxes = render(dict(job, anat=a_with, lesions=lesions))
    img0, mask0, _ = render(dict(job, anat=a_none, lesions=[]))
    return img1.astype(float), img0.astype(float), mask0 == 255, boxes


def _box_px(box):
    u0, v0, u1, v1 = box
    return int(v0 * S), int(np.ceil(v1 * S)), int(u0 * S), int(np.ceil(u1 * S))


@pytest.mark.parametrize("cls,sign", [("Nodule", 1), ("Mass", 1), ("Effusion", 1), ("Atelectasis", 1),
                                      ("Infiltration", 1), ("Pneumonia", 1), ("Pneumothorax", -1)])
def test_box_class_lesions_are_visible_and_boxed(cls, sign):
    for index in range(4):
        img1, img0, lung, boxes = _render_pair(cls, index)
        assert cls in boxes
        diff = img1 - img0
        outside = np.ones_like(diff, bool)
        inside_max = 0.0
        for box in boxes[cls]:   # one box per drawn part (e.g. per nodule, per effusion side)
            r0, r1, c0, c1 = _box_px(box)
            inside = diff[r0:r1, c0:c1]
            # strong signal inside the box (grey levels), in the expected direction
            assert sign * inside.mean() > 12, (cls, index, inside.mean())
            inside_max = max(inside_max, float(np.abs(inside).max()))
            outside[max(r0 - 3, 0):r1 + 3, max(c0 - 3, 0):c1 + 3] = False
        # and the boxes are the lesion's true extent: almost nothing changes outside them
        assert np.abs(diff[outside]).mean() < 0.5, (cls, index)
        assert np.abs(diff[outside]).max() < 0.35 * inside_max, (cls, index)


def test_nodule_and_mass_brighter_than_surrounding_lung():
    for cls in ("Nodule", "Mass"):
        for index in range(4):
            img1, _, lung, boxes = _render_pair(cls, index)
            r0, r1, c0, c1 = _box_px(boxes[cls][0])
            ring = np.zeros_like(lung)
            pad = max(r1 - r0, c1 - c0)
            ring[max(r0 - pad, 0):r1 + pad, max(c0 - pad, 0):c1 + pad] = True
            ring[r0:r1, c0:c1] = False
            ring &= lung
            assert img1[r0:r1, c0:c1].mean() > img1[ring].mean() + 20, (cls, index)


def test_pneumothorax_darker_and_without_markings():
    for index in range(4):
        img1, img0, lung, boxes = _render_pair("Pneumothorax", index)
        r0, r1, c0, c1 = _box_px(boxes["Pneumothorax"][0])
        sub1, sub0 = img1[r0:r1, c0:c1], img0[r0:r1, c0:c1]
        dark = sub1 < sub0 - 15
        assert dark.mean() > 0.2
        # no lung markings in the air space: the texture there is flatter than in normal lung
        assert sub1[dark].std() < sub0[dark].std()


@pytest.mark.parametrize("cls", ["Cardiomegaly", "Emphysema", "Edema", "Fibrosis", "Consolidation",
                                 "Pleural_Thickening", "Hernia"])
def test_other_findings_change_the_film(cls):
    for index in range(3):
        img1, img0, lung, boxes = _render_pair(cls, index)
        diff = img1 - img0
        assert (np.abs(diff) > 10).mean() > 0.004, (cls, index)
        if cls == "Cardiomegaly":
            # the enlarged heart: its box is over half the 1024-px image wide (CTR > 0.5)
            u0, _, u1, _ = boxes["Cardiomegaly"][0]
            assert u1 - u0 > 0.42
            assert diff.mean() > 0        # more of the chest is heart, less is lung
        if cls == "Emphysema":
            assert img1[lung].mean() < img0[lung].mean() - 10     # hyperlucent lungs


# ------------------------------------------------------------------ determinism
def test_deterministic_regardless_of_workers(ds, tmp_path):
    again = tmp_path / "again"
    generate(again, n_images=N, size=S, seed=3, workers=1)
    assert _tree_digest(again) == _tree_digest(ds)
    other = tmp_path / "other"
    generate(other, n_images=N, size=S, seed=4, workers=2)
    assert (other / "Data_Entry_2017_v2020.csv").read_bytes() != (ds / "Data_Entry_2017_v2020.csv").read_bytes()


def test_rerun_replaces_an_earlier_synth_output(tmp_path):
    out = tmp_path / "nih"
    generate(out, n_images=30, size=64, seed=1, workers=1)
    generate(out, n_images=25, size=64, seed=1, workers=1)
    assert len(list((out / "images_001" / "images").iterdir())) == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nih"]       # no temp dirs left


# ------------------------------------------------------------------ command line and bad input
def test_cli_prints_summary(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "o"), "--images", "40", "--size", "64", "--seed", "2",
               "--workers", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 40 synthetic images" in out and "train_val" in out and "test" in out


@pytest.mark.parametrize("args,word", [(["--images", "0"], "--images"), (["--images", "-3"], "--images"),
                                       (["--size", "32"], "--size"), (["--workers", "0"], "--workers"),
                                       (["--seed", "-1"], "--seed")])
def test_bad_arguments_exit_2(tmp_path, capsys, args, word):
    out = tmp_path / "o"
    rc = main(["synth", "--out", str(out)] + args)
    assert rc == 2
    err = capsys.readouterr().err
    assert "medattn synth: error:" in err and word in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_foreign_nonempty_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    rc = main(["synth", "--out", str(out), "--images", "20", "--size", "64"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    with pytest.raises(DataError):
        generate(out, n_images=20, size=64)


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        generate(f, n_images=5, size=64)


def test_missing_parents_are_created(tmp_path):
    out = tmp_path / "demo-out" / "deeper" / "nih"
    generate(out, n_images=3, size=64, workers=1)
    assert len(list((out / "images_001" / "images").iterdir())) == 3


def test_empty_directory_is_accepted(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    s = generate(out, n_images=5, size=64, workers=1)
    assert s["images"] == 5 and (out / MARKER).is_file()


def test_api_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--images"):
        generate(tmp_path / "x", n_images=0)
    with pytest.raises(ConfigError, match="--size"):
        generate(tmp_path / "x", n_images=5, size=63)


# ------------------------------------------------------------------ agreement with the real files
def test_headers_match_the_real_files(ds, shared_nih):
    real_entry = (shared_nih / "Data_Entry_2017_v2020.csv").read_bytes()
    real_box = (shared_nih / "BBox_List_2017.csv").read_bytes()
    assert (ds / "Data_Entry_2017_v2020.csv").read_bytes().split(b"\n", 1)[0] == real_entry.split(b"\n", 1)[0]
    assert (ds / "BBox_List_2017.csv").read_bytes().split(b"\n", 1)[0] == real_box.split(b"\n", 1)[0]
    real_labels = set()
    for line in io.StringIO(real_entry.decode()).readlines()[1:2000]:
        real_labels.update(line.split(",")[1].split("|"))
    ours = {p for r in _entries(ds) for p in r[1].split("|")}
    assert ours <= real_labels | set(NIH_LABELS)
    real_box_labels = {line.split(",")[1] for line in real_box.decode().splitlines()[1:]}
    assert {r[1] for r in _boxes(ds)} <= real_box_labels
    assert not (shared_nih / "test_list.txt").read_bytes().endswith(b"\n")
