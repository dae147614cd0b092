"""`make demo`'s commands on data the project did not generate itself.

The training issue asks that the demo's commands (inspect -> prepare -> train -> eval -> report)
work on a dataset made by a different generator and on the 240 real ChestX-ray14 images. Both
run here as subprocesses, exactly as a user types them, with the demo config shortened to one
epoch per stage (the learning itself is checked by `make demo`, see docs/benchmarks.md).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medattn.data.labels import DISEASES

SHORT = ["stages.*.epochs=1", "stages.*.batch_size=16", "data.image_size=56", "data.resize=64",
         "runtime.progress=none", "runtime.tensorboard=false"]


def medattn(*args: str, cwd: Path, rc: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "medattn", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == rc, f"medattn {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def write_other_generator(root: Path, n_patients: int = 70, size: int = 160) -> None:
    """An NIH-layout tree drawn by a generator unrelated to `medattn synth`: flat gray films with
    bright discs (Mass, Nodule), a dark side (Pneumothorax) or a raised base (Effusion); the
    metadata in the original 2017 formatting (CRLF, trailing commas, zero-padded ids, ages "045Y");
    images not 1024 px, in one flat images/ folder; boxes for the test discs."""
    rng = np.random.default_rng(123)
    (root / "images").mkdir(parents=True)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    rows, train_val, test, boxes = [header], [], [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for p in range(1, n_patients + 1):
        for k in range(1 + p % 3):
            image = f"{p:08d}_{k:03d}.png"
            img = np.full((size, size), 90.0) + rng.normal(0, 6, (size, size))
            labels = [c for c in ("Mass", "Nodule", "Pneumothorax", "Effusion") if rng.uniform() < 0.22]
            for c in labels:
                if c in ("Mass", "Nodule"):
                    r = size * (0.12 if c == "Mass" else 0.05)
                    cx, cy = rng.uniform(0.25 * size, 0.75 * size, 2)
                    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] += 80
                    if p > 0.8 * n_patients:
                        s = 1024 / size
                        boxes.append(f"{image},{c},{(cx - r) * s:.3f},{(cy - r) * s:.3f},{2 * r * s:.3f},{2 * r * s:.3f}")
                elif c == "Pneumothorax":
                    img[:, : size // 3] -= 50
                else:
                    img[int(0.8 * size):] += 60
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / image)
            rows.append(f"{image},{'|'.join(labels) or 'No Finding'},{k:03d},{p:08d},{30 + p % 50:03d}Y,"
                        f"{'MF'[p % 2]},PA,{size},{size},0.143,0.143,")
            (test if p > 0.8 * n_patients else train_val).append(image)
    (root / "Data_Entry_2017.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "\n".join(boxes) + "\n")


def run_demo_commands(nih: Path, work: Path, *prepare_flags: str, partial: bool = False) -> dict:
    out = medattn("inspect", "--nih-root", str(nih), cwd=work, rc=1 if partial else 0)
    # a partial download: inspect says what is missing (exit 1), prepare --allow-missing goes on
    assert ("missing" in out) if partial else ("OK: every image" in out), out
    medattn("prepare", "--nih-root", str(nih), "--out", str(work / "prep"), "--size", "96", "--split", "official",
            "--workers", "2", *prepare_flags, cwd=work)
    medattn("train", "--config", "demo", "--data", str(work / "prep"), "--out", str(work / "run"), *SHORT, cwd=work)
    out = medattn("eval", "--run", str(work / "run"), "--split", "test", "--bootstrap", "50", cwd=work)
    assert "| **mean** |" in out and "localisation" in out
    medattn("report", "--run", str(work / "run"), cwd=work)
    assert (work / "run" / "report" / "index.html").stat().st_size > 10_000
    return json.loads((work / "run" / "eval" / "metrics.json").read_text())


def check_metrics(m: dict, n_test: int) -> None:
    assert m["n_images"] == n_test and m["stage"] == "fusion"
    assert set(m["auroc"]) == {"global", "local", "fusion"}
    scored = [v for v in m["auroc"]["fusion"].values() if isinstance(v, float) and not math.isnan(v)]
    assert scored and all(0.0 <= v <= 1.0 for v in scored)
    assert m["localization"]["n_boxes"] > 0


def test_other_generator(tmp_path):
    nih = tmp_path / "nih"
    write_other_generator(nih)
    test_ids = (nih / "test_list.txt").read_text().split()
    m = run_demo_commands(nih, tmp_path)
    check_metrics(m, len(test_ids))
    assert set(m["eval_labels"]) == set(DISEASES)


def test_real_images(shared_nih, tmp_path):
    """The 240 real PNGs with the full metadata (--allow-missing prepares what is there)."""
    m = run_demo_commands(shared_nih, tmp_path, "--allow-missing", partial=True)
    test = set((shared_nih / "test_list.txt").read_text().split())
    present = {p.name for p in (shared_nih / "images").glob("*.png")}
    check_metrics(m, len(test & present))
