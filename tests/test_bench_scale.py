"""`medattn bench scale` at a few hundred films: every phase runs as a user runs it (its own
processes, workers on, torchrun with 2 processes), the JSON has what docs/benchmarks.md quotes,
nothing is written outside --work and the JSON, and Ctrl-C leaves no JSON behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.benchmarks.scale import build_tree, exponent, sample_images
from medattn.data.nih import load_nih

pytest.importorskip("nvidia.dali")

SMALL = ["--images", "300", "--bootstrap", "50", "--predict-images", "40", "--workers", "1"]


def _bench(tmp: Path, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmp / "systmp"), HOME=str(tmp / "home"))
    for d in ("systmp", "home", "cwd"):
        (tmp / d).mkdir(exist_ok=True)
    # SIGINT as on a terminal: a suite started in the background (``cmd &``) inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler.
    return subprocess.Popen([sys.executable, "-m", "medattn", "bench", "scale", *args], cwd=tmp / "cwd", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def test_tree_keeps_patients_whole_and_copies_real_lines(tmp_path, shared_nih):
    info = build_tree(tmp_path / "nih", 500, shared_nih, 16, seed=3)
    meta = load_nih(tmp_path / "nih")
    real = load_nih(shared_nih)
    assert info["images"] == len(meta.entries) <= 500
    counts = real.entries.groupby("patient").size()
    mine = meta.entries.groupby("patient").size()
    assert (mine == counts[mine.index]).all()  # every sampled patient with all of their films
    assert set(meta.test) | set(meta.train_val) == set(meta.entries["image"])
    real_lines = set((shared_nih / "Data_Entry_2017_v2020.csv").read_text().splitlines())
    lines = (tmp_path / "nih" / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert set(lines) <= real_lines  # byte-identical rows of the real file
    assert len(list((tmp_path / "nih").glob("images_*/images/*.png"))) == info["images"]
    # the whole set when N reaches the count
    text = (shared_nih / "Data_Entry_2017_v2020.csv").read_text()
    assert len(sample_images(text, 10**6, 0)[1]) == 112_120


def test_exponent():
    assert exponent(1000, 2.0, 4000, 8.0) == pytest.approx(1.0)
    assert exponent(1000, 5.0, 4000, 5.0) == pytest.approx(0.0)
    assert exponent(1000, 0.0, 4000, 5.0) is None


def test_scale_run_measures_every_phase(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out" / "scale.json"
    p = _bench(tmp_path, *SMALL, "--work", str(work), "--json-out", str(out))
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log[-4000:]
    rec = json.loads(out.read_text())
    assert 250 <= rec["images"] <= 300 and rec["patients"] > 50
    phases = rec["phases"]
    for word in ("prepare", "loader", "train", "eval", "report", "predict"):
        assert any(word in name for name in phases), word
    assert set(phases) == {"build", "inspect", "prepare", "loader_dali", "loader_torch", "train", "train_model",
                           "eval", "report", "predict"}
    for name, ph in phases.items():
        assert ph["seconds"] > 0, name
        if name != "build":
            assert ph["peak_rss_mib"] > 50 and 0 < ph["peak_pss_mib"] <= ph["peak_rss_mib"], name
    # the whole tree: torchrun, two ranks and their loader workers
    assert phases["train"]["peak_processes"] >= 5
    assert set(phases["train"]["stage_seconds"]) == {"global"}  # one epoch of the global stage
    assert set(phases["train_model"]["stage_seconds"]) == {"global", "local", "fusion"}
    for kind in ("dali", "torch"):
        eps = phases[f"loader_{kind}"]["epochs"]
        assert len(eps) == 2 and all(e["train"]["first_batch_s"] > 0 and e["val"]["images"] > 0 for e in eps)
        assert eps[0]["train"]["images"] == eps[1]["train"]["images"]
    assert phases["predict"]["images"] == 40
    assert phases["report"]["html_bytes"] > 10_000
    assert rec["disk_bytes"]["prepared"] > 0 and rec["disk_bytes"]["tree"] > 0
    assert "[scale 300] train:" in log  # a progress line per phase
    # nothing outside --work and the JSON: the system temp dir, HOME and the working directory
    # stay empty, and --work is gone (no --keep)
    for d in ("systmp", "home", "cwd"):
        assert not list((tmp_path / d).iterdir()), d
    assert not work.exists()
    assert [f.name for f in out.parent.iterdir()] == ["scale.json"]


def test_ctrl_c_leaves_no_json(tmp_path):
    work, out = tmp_path / "work", tmp_path / "scale.json"
    p = _bench(tmp_path, *SMALL, "--work", str(work), "--json-out", str(out))
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline:  # wait until the benchmark is inside a phase's processes
        line = p.stdout.readline()
        seen += line
        if "loader_dali ..." in line:
            break
    time.sleep(2)
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == 130, seen + rest
    assert "no JSON written" in rest
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert not work.exists()
