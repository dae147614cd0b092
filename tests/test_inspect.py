"""`medattn inspect` (medattn.data.inspect_cmd) through the real CLI entry point."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from nihfmt_convert import v2020_lines
from PIL import Image

from medattn.cli import main
from medattn.data.inspect_cmd import format_summary, png_header
from medattn.data.nih import bundled_nih_dir

PER_CLASS_V2020 = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Effusion": 13317, "Infiltration": 19894, "Mass": 5782,
    "Nodule": 6331, "Pneumonia": 1431, "Pneumothorax": 5302, "Consolidation": 4667, "Edema": 2303,
    "Emphysema": 2516, "Fibrosis": 1686, "Pleural_Thickening": 3385, "Hernia": 227, "No Finding": 60361,
}


def _json_run(capsys, argv):
    rc = main(["inspect", *argv, "--json"])
    out, err = capsys.readouterr()
    assert out.endswith("\n") and out.count("\n") == 1, "exactly one JSON object on stdout"
    return rc, json.loads(out), err


def _metadata_counts(r):
    assert (r["images"], r["patients"], r["train_val"], r["test"], r["boxes"], r["boxed_images"]) == \
        (112_120, 30_805, 86_524, 25_596, 984, 880)
    assert (r["train_val_patients"], r["test_patients"], r["unlisted"]) == (28_008, 2_797, 0)
    assert r["per_class"] == PER_CLASS_V2020 and list(r["per_class"]) == list(PER_CLASS_V2020)
    assert r["chexnet"] == {"train": 78_468, "val": 11_219, "test": 22_433}
    assert r["variant"] == "v2020"


@pytest.fixture(scope="module")
def bundled_result():
    """`medattn inspect --metadata-only --json` on the bundled metadata, run once."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["inspect", "--nih-root", str(bundled_nih_dir()), "--metadata-only", "--json"])
    return rc, buf.getvalue()


def test_metadata_only_json_on_bundled(bundled_result):
    rc, out = bundled_result
    assert out.endswith("\n") and out.count("\n") == 1, "exactly one JSON object on stdout"
    r = json.loads(out)
    assert rc == 0 and r["ok"] is True
    _metadata_counts(r)
    assert r["files"] == {"entries": "Data_Entry_2017_v2020.csv.gz", "entries_ignored": None,
                          "boxes": "BBox_List_2017.csv.gz", "train_val": "train_val_list.txt.gz",
                          "test": "test_list.txt.gz", "chexnet": "chexnet_split"}
    assert "images_found" not in r and "missing_images" not in r


def test_summary_text_and_help(bundled_result, capsys):
    out = format_summary(json.loads(bundled_result[1]))
    assert "images 112,120   patients 30,805" in out
    assert "train_val 86,524 images (28,008 patients), test 25,596 images (2,797 patients)" in out
    assert "boxes 984 on 880 images" in out
    assert "  No Finding           60,361" in out
    assert "OK: metadata is well-formed" in out
    with pytest.raises(SystemExit) as ei:
        main(["inspect", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "medattn inspect --nih-root /data/nih --metadata-only" in out and "--verify" in out


def test_shared_images_found_and_missing(shared_nih, capsys):
    rc, r, _ = _json_run(capsys, ["--nih-root", str(shared_nih), "--workers", "2"])
    assert rc == 1 and r["ok"] is False
    _metadata_counts(r)
    assert r["images_found"] == 240 and r["extra_images"] == 0
    assert r["missing_images"]["count"] == 112_120 - 240
    assert r["missing_images"]["first"][:3] == ["00000001_000.png", "00000001_001.png", "00000001_002.png"]
    assert r["unreadable"] == {"count": 0, "files": []}
    assert r["modes"] == {"L": 234, "RGBA": 6}
    assert (r["rgba"], r["16bit"], r["not_1024"]) == (6, 0, 1)  # 00027426_000.png is 512x512
    out = format_summary(r)
    assert "found 240 of 112,120" in out and "FAILED: 111,880 image(s) missing and 0 unreadable (exit status 1" in out


def _subset_root(root: Path, images: list[str]) -> Path:
    """An NIH root whose v2020 metadata holds only the rows of ``images`` (real rows)."""
    lines = v2020_lines()
    rows = [line for line in lines[1:] if line.split(",", 1)[0] in set(images)]
    assert len(rows) == len(images)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    return root


def test_truncated_and_corrupt_pngs_reported(shared_nih, tmp_path, capsys):
    names = ["00000013_004.png", "00000013_018.png", "00000100_000.png", "00000679_000.png", "00000801_000.png"]
    root = _subset_root(tmp_path, names + ["00000820_000.png"])  # the last one stays missing
    imgdir = root / "images_001" / "images"
    imgdir.mkdir(parents=True)
    for n in names:
        shutil.copyfile(shared_nih / "images" / n, imgdir / n)
    data = (imgdir / names[0]).read_bytes()
    (imgdir / names[0]).write_bytes(data[: len(data) - 1000])          # truncated download
    (imgdir / names[1]).write_bytes(b"GIF89a" + bytes(100))              # not a PNG
    d = bytearray((imgdir / names[4]).read_bytes())                       # IDAT damaged, ends fine
    d[len(d) // 2: len(d) // 2 + 2000] = bytes(2000)
    (imgdir / names[4]).write_bytes(bytes(d))

    rc, r, _ = _json_run(capsys, ["--nih-root", str(root), "--verify", "header"])
    assert rc == 1 and r["images_found"] == 5
    assert r["missing_images"] == {"count": 1, "first": ["00000820_000.png"]}
    assert r["unreadable"]["count"] == 2
    reasons = {Path(u["file"]).name: u["reason"] for u in r["unreadable"]["files"]}
    assert reasons == {names[0]: "truncated: the file does not end with an IEND chunk",
                       names[1]: "not a PNG (bad signature)"}
    assert r["train_val"] is None and r["files"]["train_val"] is None
    assert (r["rgba"], r["modes"]) == (1, {"L": 2, "RGBA": 1})

    rc, r, _ = _json_run(capsys, ["--nih-root", str(root), "--verify", "full", "--workers", "2"])
    assert rc == 1 and r["unreadable"]["count"] == 3
    reasons = {Path(u["file"]).name: u["reason"] for u in r["unreadable"]["files"]}
    assert reasons[names[4]].startswith("OSError: ") and "data stream" in reasons[names[4]]
    assert r["modes"] == {"L": 1, "RGBA": 1}


def test_generated_modes_counted_and_clean_root_passes(tmp_path, capsys):
    """Images in every layout, 16-bit, RGBA and a small one; all present -> exit 0."""
    names = ["00000001_000.png", "00000001_001.png", "00000001_002.png", "00000002_000.png"]
    root = _subset_root(tmp_path, names)
    (root / "images").mkdir()
    (root / "images_002" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((1024, 1024), np.uint8)).save(root / names[0])
    Image.fromarray(np.full((1024, 1024), 40000, np.uint16)).save(root / "images" / names[1])
    Image.fromarray(np.zeros((1024, 1024, 4), np.uint8)).save(root / "images_002" / "images" / names[2])
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "images" / names[3])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / "99999999_000.png")  # not in the metadata
    assert png_header(root / "images" / names[1]) == {"width": 1024, "height": 1024, "bit_depth": 16,
                                                      "colour_type": 0, "mode": "L;16"}
    for verify in ("header", "full"):
        rc, r, _ = _json_run(capsys, ["--nih-root", str(root), "--verify", verify, "--workers", "1"])
        assert rc == 0 and r["ok"] is True
        assert (r["images"], r["images_found"], r["extra_images"]) == (4, 4, 1)
        assert r["missing_images"]["count"] == 0 and r["unreadable"]["count"] == 0
        assert (r["rgba"], r["16bit"], r["not_1024"]) == (1, 1, 1)
        assert r["modes"] == {"L": 2, "L;16": 1, "RGBA": 1}
    assert main(["inspect", "--nih-root", str(root)]) == 0
    assert "OK: every image in the metadata is present and readable" in capsys.readouterr().out


def test_malformed_metadata_exits_2(tmp_path, capsys):
    lines = list(v2020_lines()[:4])
    lines[2] = lines[2].replace("Cardiomegaly|Emphysema", "Cardiomegaly|Emphysem")
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    assert main(["inspect", "--nih-root", str(tmp_path), "--metadata-only", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Data_Entry_2017_v2020.csv, row 3, column 'Finding Labels': unknown label 'Emphysem'" in err
    assert main(["inspect", "--nih-root", str(tmp_path / "absent")]) == 2
    assert "NIH root does not exist" in capsys.readouterr().err


def test_partial_download_points_at_allow_missing(bundled_result):
    """A partial download (some images present, some missing) names `prepare --allow-missing`."""
    r = json.loads(bundled_result[1])
    r.update({"verify": "header", "images_found": 240, "extra_images": 0, "ok": False,
              "missing_images": {"count": 112_120 - 240, "first": ["00000001_000.png"]},
              "unreadable": {"count": 0, "files": []}, "modes": {"L": 240}, "rgba": 0, "16bit": 0, "not_1024": 0})
    text = format_summary(r)
    assert "FAILED: 111,880 image(s) missing" in text
    assert "`medattn prepare --allow-missing ...` prepares the 240 images present" in text
    r.update({"images_found": 0, "missing_images": {"count": 112_120, "first": ["00000001_000.png"]}})
    assert "--allow-missing" not in format_summary(r)  # nothing downloaded: nothing to prepare
