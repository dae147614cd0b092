"""`medattn prepare` and `medattn bench prepare`: a tiny NIH root written here in the real file
formats, prepared into every pixel format and read back through PreparedDataset."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medattn.cli import main as cli
from medattn.data.labels import DISEASES, NIH_LABELS
from medattn.data.prepared import PreparedDataset
from medattn.errors import DataError

REPO = Path(__file__).resolve().parents[1]
S = 64                       # prepared side: small keeps the tests fast
N_PATIENTS = 16
TEST_PATIENTS = {13, 14, 15, 16}
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
LABEL_CYCLE = ["No Finding", "Cardiomegaly", "Effusion|Mass", "No Finding", "Atelectasis|Infiltration",
               "Hernia", "Nodule", "No Finding", "Pneumothorax|Edema|Fibrosis"]
# Specials, by image id.
RGBA_IMG = "00000002_000.png"     # RGBA with R=G=B, alpha 255
BIT16_IMG = "00000003_001.png"    # 16-bit gray
SMALL_IMG = "00000014_000.png"    # 512x512 (a downscaled copy) with a box
# Boxes in the 1024-pixel space of BBox_List_2017.csv (test images only, as in the real file).
BOXES = [
    ("00000013_000.png", "Atelectasis", 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661),
    ("00000013_000.png", "Infiltrate", 611.555555555556, 535.077934027778, 249.173333333333, 199.111111111111),
    (SMALL_IMG, "Cardiomegaly", 256, 544, 64, 102.4),
]


def _image_ids() -> list[tuple[str, int]]:
    ids = []
    for p in range(1, N_PATIENTS + 1):
        for k in range(1 + (p % 3) + (p == 3)):  # 1-3 images per patient; patient 3 has 4
            ids.append((f"{p:08d}_{k:03d}.png", p))
    return ids


def _gray(i: int, size: int = 1024) -> np.ndarray:
    """Deterministic, smooth-ish gray image (compresses well, so the fixture is cheap)."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size]
    base = (x * (1 + i % 5) + y * (2 + i % 3)) // 8 + 40
    blocks = np.kron(rng.integers(0, 60, (16, 16)), np.ones((size // 16, size // 16), dtype=np.int64))
    return ((base + blocks) % 256).astype(np.uint8)


def _write_png(path: Path, image_id: str, i: int) -> np.ndarray:
    """Write the source PNG of ``image_id``; return the 8-bit gray image a correct reader sees."""
    if image_id == SMALL_IMG:
        g = _gray(i, 512)
        Image.fromarray(g).save(path, compress_level=1)
    elif image_id == RGBA_IMG:
        g = _gray(i)
        Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), "RGBA").save(path, compress_level=1)
    elif image_id == BIT16_IMG:
        g = _gray(i)
        Image.fromarray(g.astype(np.uint16) * 257).save(path, compress_level=1)  # 16-bit PNG
    else:
        g = _gray(i)
        Image.fromarray(g).save(path, compress_level=1)
    return g


def make_nih_root(root: Path, *, missing: tuple[str, ...] = (), masks: bool = False,
                  src: Path | None = None) -> dict[str, np.ndarray]:
    """Write a small NIH root in the real formats (tarball layout ``images/*.png``).

    Returns image id -> expected 8-bit gray source pixels. ``src``: copy PNGs from another
    root instead of encoding them again.
    """
    ids = _image_ids()
    (root / "images").mkdir(parents=True)
    rows, grays = [], {}
    for i, (image, p) in enumerate(ids):
        labels = LABEL_CYCLE[i % len(LABEL_CYCLE)]
        rows.append(f"{image},{labels},{int(image[9:12])},{p},{20 + p},{'MF'[p % 2]},{'PA' if i % 3 else 'AP'},"
                    f"2500,2048,0.14300000000000002,0.14300000000000002")
        if image in missing:
            continue
        dst = root / "images" / image
        if src is not None:
            shutil.copyfile(src / "images" / image, dst)
            grays[image] = None
        else:
            grays[image] = _write_png(dst, image, i)
    (root / "Data_Entry_2017_v2020.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    train_val = [im for im, p in ids if p not in TEST_PATIENTS]
    test = [im for im, p in ids if p in TEST_PATIENTS]
    (root / "train_val_list.txt").write_text("\n".join(train_val))   # no trailing newline, as NIH
    (root / "test_list.txt").write_text("\n".join(test))
    box_rows = [f"{im},{lab},{x},{y},{w},{h}" for im, lab, x, y, w, h in BOXES]
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "\n".join(box_rows) + "\n")
    if masks:
        (root / "masks").mkdir()
        for i, (image, p) in enumerate(ids[:-2]):  # the last two images have no mask
            m = np.zeros((1024, 1024), dtype=np.uint8)
            m[100 + i: 900, 200: 824 - i] = 255
            Image.fromarray(m).save(root / "masks" / image, compress_level=1)
    return grays


def expected_pixels(gray: np.ndarray, size: int = S) -> np.ndarray:
    """The documented resize: PIL LANCZOS to size x size, uint8, (size, size, 1)."""
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.LANCZOS))[..., None]


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("nih")
    return root, make_nih_root(root)


@pytest.fixture(scope="module")
def prepared_raw(nih, tmp_path_factory) -> Path:
    """The reference run: raw, 2 workers, shards of 16 (three shards)."""
    out = tmp_path_factory.mktemp("prep") / "raw"
    rc = cli(["prepare", "--nih-root", str(nih[0]), "--out", str(out), "--size", str(S),
              "--workers", "2", "--shard-size", "16"])
    assert rc == 0
    return out


def _variant(tmp_path: Path, nih, **kw) -> Path:
    root = tmp_path / "nih"
    make_nih_root(root, src=nih[0], **kw)
    return root


# ---------------------------------------------------------------------------- happy path
def test_raw_roundtrip_is_pixel_exact_and_manifest_follows_the_contract(nih, prepared_raw):
    root, grays = nih
    ds = PreparedDataset.open(prepared_raw)
    n = len(_image_ids())
    assert len(ds) == n and ds.image_size == S and ds.channels == 1 and ds.pixel_format == "raw"
    got = ds.read_batch(np.arange(n))
    for i, image in enumerate(ds.manifest["image"]):
        np.testing.assert_array_equal(got[i], expected_pixels(grays[image]), err_msg=image)

    info = ds.info
    assert info["format_version"] == 1 and info["task"] == "multilabel"
    assert info["label_names"] == list(NIH_LABELS) and info["eval_labels"] == list(DISEASES)
    assert info["source"]["kind"] == "nih" and info["source"]["metadata"] == "Data_Entry_2017_v2020.csv"
    assert info["split"] == "official" and info["split_seed"] == 0
    assert [s["count"] for s in info["shards"]] == [16, 16, n - 32]
    assert [s["path"] for s in info["shards"]] == [f"shards/pixels-0000{k}.npy" for k in range(3)]
    assert info["conversions"] == {"rgba": 1, "16bit": 1, "not_1024": 1}
    assert info["skipped_missing"] == 0 and info["has_lung_boxes"] is False
    assert not (prepared_raw / ".partial").exists()
    # Raw shards are plain .npy arrays (n, S, S, 1); offset/nbytes point at the pixels.
    arr = np.load(prepared_raw / "shards/pixels-00001.npy", mmap_mode="r")
    assert arr.shape == (16, S, S, 1) and arr.dtype == np.uint8
    m = ds.manifest
    r = m[m["shard"] == 1].iloc[3]
    with open(prepared_raw / "shards/pixels-00001.npy", "rb") as f:
        f.seek(int(r["offset"]))
        assert f.read(int(r["nbytes"])) == arr[3].tobytes()

    # Column types of docs/data-format.md §2.
    import pyarrow.parquet as pq

    schema = pq.read_schema(prepared_raw / "manifest.parquet")
    types = {f.name: str(f.type) for f in schema}
    assert types == {
        "index": "int64", "image": "string", "patient": "string", "split": "string",
        "labels": "list<element: uint8>", "target": "int64", "finding_labels": "string",
        "age": "double", "sex": "string", "view": "string",
        "boxes": "list<element: struct<label: string, x: double, y: double, w: double, h: double>>",
        "lung_box": "list<element: double>", "shard": "int32", "slot": "int64", "offset": "int64",
        "nbytes": "int64", "orig_width": "int32", "orig_height": "int32", "conversion": "string",
    }
    assert m["index"].tolist() == list(range(n))
    # Storage order: train, val, test; by image id inside each split.
    order = {"train": 0, "val": 1, "test": 2}
    keys = list(zip(m["split"].map(order), m["image"]))
    assert keys == sorted(keys)

    by = m.set_index("image")
    assert by.loc["00000001_000.png", "patient"] == "1" and by.loc["00000001_000.png", "target"] == -1
    assert by.loc["00000001_000.png", "age"] == 21.0 and by.loc["00000001_000.png", "sex"] == "F"
    assert by.loc[RGBA_IMG, "conversion"] == "rgba" and by.loc[BIT16_IMG, "conversion"] == "16bit"
    assert by.loc[SMALL_IMG, "conversion"] == "not_1024"
    assert (by.loc[SMALL_IMG, "orig_width"], by.loc[SMALL_IMG, "orig_height"]) == (512, 512)
    assert by.loc["00000001_000.png", "conversion"] == ""
    # Multi-hot labels over label_names, from Finding Labels.
    for image, row in by.iterrows():
        i = [im for im, _ in _image_ids()].index(image)
        names = LABEL_CYCLE[i % len(LABEL_CYCLE)].split("|")
        want = np.array([int(lab in names) for lab in NIH_LABELS], dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(row["labels"]), want, err_msg=image)
        assert set(row["finding_labels"].split("|")) == set(names)


def test_boxes_are_normalised_by_1024_even_for_a_downscaled_file(prepared_raw):
    ds = PreparedDataset.open(prepared_raw)
    m = ds.manifest.set_index("image")
    idx = {im: i for i, im in enumerate(ds.manifest["image"])}
    b = ds.boxes(idx["00000013_000.png"])
    assert [x["label"] for x in b] == ["Atelectasis", "Infiltration"]  # "Infiltrate" mapped
    assert b[0]["x"] == 225.084745762712 / 1024 and b[0]["h"] == 79.1864406779661 / 1024
    # SMALL_IMG is 512x512 on disk, its box still refers to the 1024 original.
    assert ds.boxes(idx[SMALL_IMG]) == [{"label": "Cardiomegaly", "x": 0.25, "y": 0.53125, "w": 0.0625, "h": 0.1}]
    assert ds.boxes(idx["00000001_000.png"]) == []
    assert all(len(v) == 0 for im, v in m["boxes"].items() if im not in ("00000013_000.png", SMALL_IMG))


def test_official_split_is_patient_disjoint_and_follows_the_lists(prepared_raw):
    ds = PreparedDataset.open(prepared_raw)
    m = ds.manifest
    parts = m.groupby("patient")["split"].nunique()
    assert (parts == 1).all()
    test_patients = set(m.loc[m["split"] == "test", "patient"].astype(int))
    assert test_patients == TEST_PATIENTS
    assert len(ds.indices("val")) > 0 and len(ds.indices("train")) > 0
    assert ds.info["counts"] == m["split"].value_counts().reindex(["train", "val", "test"]).to_dict()


def test_png_is_lossless_and_jpeg_is_close(nih, prepared_raw, tmp_path):
    root = nih[0]
    ref = PreparedDataset.open(prepared_raw)
    want = ref.read_batch(np.arange(len(ref)))
    for fmt in ("png", "jpeg"):
        out = tmp_path / fmt
        assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S),
                    "--workers", "1", "--format", fmt, "--shard-size", "100"]) == 0
        ds = PreparedDataset.open(out)
        assert ds.pixel_format == fmt and ds.info["shards"] == [
            {"path": "shards/pixels-00000.bin", "count": len(ref), "bytes": ds.info["shards"][0]["bytes"]}]
        # Same samples in the same order; only where the pixels live differs.
        where = ["shard", "slot", "offset", "nbytes"]
        pd.testing.assert_frame_equal(ds.manifest.drop(columns=where), ref.manifest.drop(columns=where))
        assert ds.manifest["slot"].tolist() == list(range(len(ref))) and set(ds.manifest["shard"]) == {0}
        got = ds.read_batch(np.arange(len(ds)))
        # Encoded samples are back to back: offsets are the running sum of the sizes.
        nb = ds.manifest["nbytes"].to_numpy()
        assert ds.manifest["offset"].tolist() == np.concatenate([[0], np.cumsum(nb)[:-1]]).tolist()
        raw0 = ds.read_encoded(0)
        assert len(raw0) == nb[0]
        if fmt == "png":
            assert raw0[:8] == b"\x89PNG\r\n\x1a\n"
            np.testing.assert_array_equal(got, want)
        else:
            assert raw0[:2] == b"\xff\xd8"
            err = np.abs(got.astype(int) - want.astype(int))
            assert err.mean() < 1.5 and err.max() <= 40


# ---------------------------------------------------------------------------- resume
_KILLER = textwrap.dedent("""
    import os, signal, sys
    from medattn.data.prepare import prepare

    def stop(k):
        if k == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)   # as hard as it gets: no cleanup runs

    if __name__ == "__main__":
        prepare(sys.argv[1], sys.argv[2], size=%d, workers=2, shard_size=16, on_shard_done=stop,
                progress=False)
""" % S)


def _same_output(a: Path, b: Path) -> None:
    ia, ib = (json.loads((d / "dataset.json").read_text()) for d in (a, b))
    ia.pop("created_utc"), ib.pop("created_utc")
    ia["source"], ib["source"] = ia["source"]["root"], ib["source"]["root"]
    ia.pop("prepare_settings"), ib.pop("prepare_settings")
    assert ia == ib
    pd.testing.assert_frame_equal(pd.read_parquet(a / "manifest.parquet"), pd.read_parquet(b / "manifest.parquet"))
    for s in ia["shards"]:
        assert (a / s["path"]).read_bytes() == (b / s["path"]).read_bytes(), s["path"]
    assert sorted(p.name for p in (a / "shards").iterdir()) == sorted(p.name for p in (b / "shards").iterdir())


def test_resume_after_sigkill_gives_identical_output(nih, prepared_raw, tmp_path):
    root = nih[0]
    out = tmp_path / "prep"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(script), str(root), str(out), "1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    # Two shards are durable, the third never started; nothing claims to be complete.
    assert not (out / "dataset.json").exists()
    assert (out / "shards/pixels-00000.npy").is_file() and (out / "shards/pixels-00001.npy").is_file()
    with pytest.raises(DataError, match="interrupted"):
        PreparedDataset.open(out)
    # Debris of a kill in the middle of the next shard.
    (out / "shards/pixels-00002.npy.partial").write_bytes(b"half a shard")
    (out / "manifest.parquet.tmp").write_bytes(b"junk")

    rc = cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S),
              "--workers", "2", "--shard-size", "16"])
    assert rc == 0
    _same_output(out, prepared_raw)
    assert not (out / ".partial").exists() and not (out / "shards/pixels-00002.npy.partial").exists()


def test_ctrl_c_leaves_resumable_state_and_rerun_reports_resumed_shards(nih, prepared_raw, tmp_path, capsys):
    from medattn.data.prepare import prepare

    root = nih[0]
    out = tmp_path / "prep"

    def interrupt(k):
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, size=S, workers=2, shard_size=16, on_shard_done=interrupt, progress=False)
    assert not (out / "dataset.json").exists() and (out / ".partial").is_dir()
    res = prepare(root, out, size=S, workers=1, shard_size=16, progress=False)
    assert res.resumed_shards == 1 and res.processed == len(_image_ids()) - 16
    _same_output(out, prepared_raw)
    # Running it once more is a no-op.
    assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--shard-size", "16"]) == 0
    assert "already prepared" in capsys.readouterr().out


def test_other_settings_on_the_same_out_are_refused(nih, prepared_raw, tmp_path, capsys):
    root = nih[0]
    before = (prepared_raw / "dataset.json").read_bytes()
    # A complete directory made with other settings.
    rc = cli(["prepare", "--nih-root", str(root), "--out", str(prepared_raw), "--size", "32", "--shard-size", "16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "image_size: 64 -> 32" in err and str(prepared_raw) in err
    assert (prepared_raw / "dataset.json").read_bytes() == before
    # An interrupted directory made with other settings.
    from medattn.data.prepare import prepare

    out = tmp_path / "prep"

    def interrupt(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, size=S, workers=1, shard_size=16, on_shard_done=interrupt, progress=False)
    rc = cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--shard-size", "16",
              "--format", "png"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "interrupted" in err and "pixel_format: 'raw' -> 'png'" in err
    assert not (out / "dataset.json").exists()
    # A directory that has nothing to do with prepare.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(["prepare", "--nih-root", str(root), "--out", str(other), "--size", str(S)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------- bad input
def test_missing_image_fails_unless_allowed(nih, tmp_path, capsys):
    gone = "00000005_001.png"
    root = _variant(tmp_path, nih, missing=(gone,))
    out = tmp_path / "prep"
    assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    row = [im for im, _ in _image_ids()].index(gone) + 2   # 1-based line, after the header
    assert gone in err and f"Data_Entry_2017_v2020.csv row {row}" in err and "--allow-missing" in err
    assert not (out / "dataset.json").exists()

    assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--workers", "1",
                "--allow-missing"]) == 0
    assert "skipped 1 metadata rows whose image is missing" in capsys.readouterr().out
    ds = PreparedDataset.open(out)
    assert ds.info["skipped_missing"] == 1 and len(ds) == len(_image_ids()) - 1
    assert gone not in set(ds.manifest["image"])


def test_split_emptied_by_missing_images_is_named(nih, tmp_path, capsys):
    test_images = [im for im, p in _image_ids() if p in TEST_PATIENTS]
    root = _variant(tmp_path, nih, missing=tuple(test_images))
    out = tmp_path / "prep"
    assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--workers", "1",
                "--allow-missing"]) == 2
    err = capsys.readouterr().err
    assert "split 'test'" in err and "empty" in err and f"skipping {len(test_images)} rows" in err
    assert not (out / "dataset.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_png_names_the_file_and_the_row(nih, tmp_path, capsys, damage):
    bad = "00000007_000.png"
    root = _variant(tmp_path, nih)
    f = root / "images" / bad
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a png at all" * 10, "empty": b""}[damage])
    out = tmp_path / "prep"
    rc = cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--workers", "2",
              "--shard-size", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    row = [im for im, _ in _image_ids()].index(bad) + 2
    assert str(f) in err and f"row {row}" in err and "cannot decode" in err
    assert not (out / "dataset.json").exists()
    with pytest.raises(DataError):
        PreparedDataset.open(out)


def test_lung_boxes_from_masks(nih, tmp_path):
    root = _variant(tmp_path, nih, masks=True)
    out = tmp_path / "prep"
    assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", str(S), "--workers", "1"]) == 0
    ds = PreparedDataset.open(out)
    assert ds.info["has_lung_boxes"] is True
    lb = ds.lung_boxes()
    ids = [im for im, _ in _image_ids()]
    for j, image in enumerate(ds.manifest["image"]):
        i = ids.index(image)
        if i >= len(ids) - 2:
            assert np.isnan(lb[j]).all(), image
        else:  # mask rows 100+i..899, columns 200..823-i
            want = [200 / 1024, (100 + i) / 1024, (824 - i - 200) / 1024, (900 - 100 - i) / 1024]
            np.testing.assert_allclose(lb[j], want, rtol=0, atol=1e-7, err_msg=image)
    # A corrupt mask is an error naming the mask.
    (root / "masks" / "00000001_000.png").write_bytes(b"broken")
    out2 = tmp_path / "prep2"
    assert cli(["prepare", "--nih-root", str(root), "--out", str(out2), "--size", str(S), "--workers", "1"]) == 2
    assert not (out2 / "dataset.json").exists()


# ---------------------------------------------------------------------------- generic writer
def test_rgb_source_table_is_stored_with_three_channels(tmp_path):
    """The writer is layout-independent: an RGB (fundus-like) single-label table."""
    from medattn.data._sources import SourceTable, order_records
    from medattn.data.prepare import prepare_source

    rng = np.random.default_rng(0)
    rows, want = [], {}
    for i in range(12):
        a = rng.integers(0, 256, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8)  # non-square too
        p = tmp_path / f"f{i:02d}.png"
        Image.fromarray(a).save(p)
        want[p.name] = np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.LANCZOS))
        y = i % 4
        rows.append(dict(image=p.name, path=str(p), patient=f"p{i}", split=("train", "val", "test")[i % 3],
                         labels=np.eye(4, dtype=np.uint8)[y], target=y, finding_labels=str(y), age=np.nan,
                         sex=None, view=None, boxes=[], mask_path=None, ref=f"train.csv row {i + 2}"))
    table = SourceTable(records=order_records(pd.DataFrame(rows)), label_names=list("abcd"),
                        eval_labels=list("abcd"), task="multiclass", channels=3, expected_size=None,
                        source={"kind": "csv", "root": str(tmp_path)}, split="given", split_seed=None)
    for fmt in ("raw", "png"):
        res = prepare_source(table, tmp_path / fmt, size=32, workers=1, pixel_format=fmt, shard_size=5)
        ds = PreparedDataset.open(res.out)
        assert ds.channels == 3 and ds.task == "multiclass" and res.shards == 3
        got = ds.read_batch(np.arange(12))
        assert got.shape == (12, 32, 32, 3)
        for j, image in enumerate(ds.manifest["image"]):
            np.testing.assert_array_equal(got[j], want[image])
        assert ds.targets().tolist() == [int(i) for i in ds.manifest["finding_labels"]]
        assert set(ds.manifest["conversion"]) == {""}
    assert np.load(tmp_path / "raw" / "shards/pixels-00000.npy").shape == (5, 32, 32, 3)


def test_image_conversions_by_hand():
    from medattn.data._images import _to_uint8_16bit, to_array

    v = np.array([[0, 128, 257, 32767, 32768, 65535]], dtype=np.uint16)
    # round(v * 255 / 65535): 0, 0.498 -> 0, 1, 127.498 -> 127, 127.502 -> 128, 255
    assert _to_uint8_16bit(v).tolist() == [[0, 0, 1, 127, 128, 255]]
    g = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    arr, conv = to_array(Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), "RGBA"), 1)
    assert arr[..., 0].tolist() == g.tolist() and conv == ["rgba"]
    arr, conv = to_array(Image.fromarray(g), 3)
    assert arr.shape == (2, 2, 3) and (arr == g[..., None]).all() and conv == []


def test_16bit_colour_png_is_counted(tmp_path):
    """PIL reduces 16-bit colour PNGs itself (high byte); prepare still has to count them."""
    import struct
    import zlib

    from medattn.data.imagefiles import load_image

    a = (np.arange(4 * 4 * 3).reshape(4, 4, 3) * 1000).astype(">u2")
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(4))   # filter 0 per row

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    p = tmp_path / "rgb16.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    got = load_image(p, 4, 3, None)
    assert got.conversion == "16bit"
    np.testing.assert_array_equal(got.pixels, (a.astype(np.int64) // 256).astype(np.uint8))


# ---------------------------------------------------------------------------- real files
def test_real_images_with_full_metadata(shared_nih, tmp_path):
    """The 240 real PNGs beside the full v2020 metadata: missing rows skipped, boxes = BBox/1024."""
    from medattn.data.prepare import prepare

    res = prepare(shared_nih, tmp_path / "prep", size=32, workers=2,
                  allow_missing=True, progress=False)
    n_png = len(list((shared_nih / "images").glob("*.png")))
    ds = PreparedDataset.open(res.out)
    assert len(ds) == n_png and ds.info["skipped_missing"] == 112120 - n_png
    assert ds.info["conversions"]["rgba"] == 6 and ds.info["conversions"]["not_1024"] == 1
    bbox = pd.read_csv(shared_nih / "BBox_List_2017.csv").iloc[:, :6]
    bbox.columns = ["image", "label", "x", "y", "w", "h"]
    idx = {im: i for i, im in enumerate(ds.manifest["image"])}
    boxed = [im for im in bbox["image"].unique() if im in idx]
    assert boxed, "expected some real boxed images"
    for im in boxed:
        want = sorted((r.x / 1024, r.y / 1024, r.w / 1024, r.h / 1024)
                      for r in bbox[bbox["image"] == im].itertuples())
        got = sorted((b["x"], b["y"], b["w"], b["h"]) for b in ds.boxes(idx[im]))
        assert got == want, im


# ---------------------------------------------------------------------------- benchmark
def test_bench_prepare_writes_a_table_and_json(nih, tmp_path, capsys):
    jout = tmp_path / "bench.json"
    rc = cli(["bench", "prepare", "--nih-root", str(nih[0]), "--size", "32", "--workers", "1", "--limit", "12",
              "--formats", "raw,jpeg", "--json-out", str(jout)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "decode original PNG" in out and "read shards" in out
    rec = json.loads(jout.read_text())
    stages = [(r["stage"], r["format"]) for r in rec["results"]]
    assert ("prepare (end to end)", "raw") in stages and ("read shards (shuffled)", "jpeg") in stages
    assert all(r["images"] == 12 and r["images_per_s"] > 0 for r in rec["results"])
    assert rec["machine"]["cpu_count"] and rec["command"].startswith("medattn ")


def test_random_split_and_val_fraction(nih, tmp_path, capsys):
    root = nih[0]
    out = tmp_path / "prep"
    assert cli(["prepare", "--nih-root", str(root), "--out", str(out), "--size", "16", "--workers", "1",
                "--split", "random", "--split-seed", "3", "--val-fraction", "0.25"]) == 0
    ds = PreparedDataset.open(out)
    m = ds.manifest
    assert ds.info["split"] == "random" and ds.info["split_seed"] == 3
    assert (m.groupby("patient")["split"].nunique() == 1).all()
    per = m.drop_duplicates("patient")["split"].value_counts()
    # 16 patients: round(0.55 * 16) = 9 train, round(0.25 * 16) = 4 val, the other 3 test.
    assert (per["train"], per["val"], per["test"]) == (9, 4, 3)
    assert cli(["prepare", "--nih-root", str(root), "--out", str(tmp_path / "x"), "--split", "chexnet",
                "--val-fraction", "0.2"]) == 2
    assert "--val-fraction does not apply to --split chexnet" in capsys.readouterr().err
