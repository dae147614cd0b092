"""Using a trained model anywhere (issue 15): a tiny AG-CNN run trained here (~20 s once per
module), its prepared directory moved away, then `medattn predict` on the same pixels as an 8-bit
PNG, a 16-bit PNG, an RGBA PNG and MONOCHROME2/MONOCHROME1 DICOMs (identical probabilities), a
corrupt DICOM named on stderr while the rest is predicted, the Python API in a fresh process,
and `medattn export` (TorchScript, ONNX) against `predict`."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hpc import train as train_mod
from hpc.checkpoint import load as load_checkpoint
from medattn.cli import main as cli_main
from prepfix import make_prepared
from test_imagefiles import write_dicom

REPO = Path(__file__).resolve().parents[1]
PREP_SIZE, INPUT, RESIZE = 56, 48, 56
BASE = [f"data.image_size={INPUT}", f"data.resize={RESIZE}", "stages.*.epochs=1", "stages.*.batch_size=16",
        "data.num_workers=0", "runtime.log_every=100", "runtime.tensorboard=false"]
FORMATS = ("a8.png", "b16.png", "c_rgba.png", "d_mono2.dcm", "e_mono1.dcm")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_pydicom = pytest.mark.skipif(importlib.util.find_spec("pydicom") is None,
                                   reason="pydicom not installed (pip install 'medattn[dicom]')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished demo run (G -> L -> F, 1 epoch each) whose prepared directory is gone."""
    root = tmp_path_factory.mktemp("predict")
    prep = make_prepared(root / "prep", n=48, size=PREP_SIZE, seed=1)
    run = root / "run"
    assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), *BASE]) == 0
    prep.rename(root / "prep-moved-away")
    return run


def _film(seed: int, h: int = 70, w: int = 64) -> np.ndarray:
    """(h, w) uint8: noise and a bright square, like the training blobs, not at the prepared size."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((h, w)) * 12 + 60).clip(0, 255)
    y, x = rng.integers(5, h // 2), rng.integers(5, w // 2)
    a[y:y + 14, x:x + 14] = 220
    a[0, 0], a[-1, -1] = 0, 255
    return a.astype(np.uint8)


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """A folder with one film in five formats (same pixels), a second film, and a corrupt DICOM."""
    d = tmp_path_factory.mktemp("films")
    (d / "sub").mkdir()
    g = _film(3)
    Image.fromarray(g).save(d / FORMATS[0])
    Image.fromarray(g.astype(np.uint16) * 257).save(d / FORMATS[1])  # 16-bit gray, v * 257
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), "RGBA").save(d / FORMATS[2])
    if importlib.util.find_spec("pydicom") is not None:
        write_dicom(d / FORMATS[3], g.astype(np.uint16) * 257, bits_stored=16)
        write_dicom(d / FORMATS[4], 65535 - g.astype(np.uint16) * 257, photometric="MONOCHROME1", bits_stored=16)
        bad = write_dicom(d / "sub" / "z_cut.dcm", g.astype(np.uint16) * 257, bits_stored=16)
        bad.write_bytes(bad.read_bytes()[:-g.size])  # half the pixel data gone
    Image.fromarray(_film(4)).save(d / "sub" / "other.png")
    return d


@pytest.fixture(scope="module")
def predicted(run_dir, films, tmp_path_factory):
    """`medattn predict` on the folder (the CLI entry point, in this process: a fresh one is
    test_python_api_in_a_fresh_process): (exit status, stderr, the CSV, overlay folder)."""
    import contextlib
    import io

    from medattn import progress

    out = tmp_path_factory.mktemp("out")
    err = io.StringIO()
    every, progress.LOG_EVERY_S = progress.LOG_EVERY_S, 0.0  # a batch log: a line per image here
    try:
        with contextlib.redirect_stderr(err):
            code = cli_main(["predict", "--run", str(run_dir), str(films), "--out", str(out / "preds.csv"),
                             "--heatmaps", str(out / "heat"), "--device", "cpu", "--batch", "4"])
    finally:
        progress.LOG_EVERY_S = every
    df = pd.read_csv(out / "preds.csv") if (out / "preds.csv").is_file() else None
    return code, err.getvalue(), df, out / "heat"


def _load(run_dir, **kw):
    import medattn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return medattn.load(run_dir, device="cpu", **kw)


def test_checkpoint_carries_what_inference_needs(run_dir):
    state = load_checkpoint(run_dir / "ckpt" / "fusion" / "best.pt")  # weights_only=True
    spec, info = state["spec"], state["inference"]
    assert spec["label_names"][:4] == ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration"]
    assert spec["prepared_size"] == PREP_SIZE and spec["channels"] == 1 and spec["task"] == "multilabel"
    assert spec["synthetic"] is True and spec["source"] == "test-blobs"
    pre = info["preprocessing"]
    assert (info["method"], info["backbone"], info["branch"], info["output"]) == ("agcnn", "resnet18", "fusion", "sigmoid")
    assert (pre["input_size"], pre["resize"], pre["view"], pre["normalize"]) == (INPUT, RESIZE, "center", "imagenet")
    assert pre["window"] == pytest.approx([4 / 56, 4 / 56, 52 / 56, 52 / 56])  # 48 of 56, centred
    assert pre["mean"] == pytest.approx([0.449]) and pre["std"] == pytest.approx([0.226])
    assert info["medattn_version"] and info["synthetic"] is True


@needs_pydicom
def test_predict_formats_agree_and_corrupt_dicom_is_named(predicted, films):
    code, err, df, heat = predicted
    assert code == 1, err  # one unreadable file
    assert f"{films / 'sub' / 'z_cut.dcm'}: cannot decode the DICOM pixel data" in err
    assert "trained on synthetic images" in err
    assert df is not None and len(df) == 6
    assert list(df.columns[:4]) == ["path", "Atelectasis", "Cardiomegaly", "Effusion"]
    assert "global/Effusion" in df.columns and "fusion/No Finding" in df.columns
    assert np.allclose(df["Effusion"], df["fusion/Effusion"])  # the plain columns are the fusion branch
    probs = df.set_index(df["path"].map(lambda p: Path(p).name)).drop(columns="path")
    same = probs.loc[list(FORMATS)].to_numpy()
    assert np.abs(same - same[0]).max() < 1e-4, probs.loc[list(FORMATS)]
    assert np.abs(probs.loc["other.png"].to_numpy() - same[0]).max() > 1e-4  # a different film differs
    assert ((same > 0) & (same < 1)).all()
    assert sorted(p.name for p in heat.glob("*.png")) == sorted(Path(n).stem + ".png" for n in probs.index)


def test_predict_progress_lines_in_a_batch_log(predicted):
    """stderr is no terminal here: plain progress lines, counted over every input file."""
    import re

    _, err, df, _ = predicted
    counts = re.findall(r"^medattn predict: (\d+)/(\d+) img \(\d+%\), [\d.]+ img/s, ETA", err, re.M)
    assert counts, err
    total = int(counts[0][1])
    # one line per image (the interval is 0 here), then the closing line repeats the count
    assert [int(k) for k, _ in counts] == [*range(1, total + 1), total] and total == len(df) + 1  # + corrupt DICOM
    assert err.rstrip().splitlines()[-2].endswith("(done)")
    assert "\r" not in err


def test_api_matches_cli_and_takes_arrays(run_dir, films, predicted):
    p = _load(run_dir)
    assert p.labels[:2] == ["Atelectasis", "Cardiomegaly"] and p.input_size == INPUT and p.synthetic
    assert p.branches == ["global", "local", "fusion"] and p.branch == "fusion"
    png = films / FORMATS[0]
    df = p.predict([png, np.asarray(Image.open(png))], heatmaps=True, batch_size=2)
    assert df["path"].tolist() == [str(png), "<array 0>"]
    assert np.abs(df[p.labels].to_numpy()[0] - df[p.labels].to_numpy()[1]).max() < 1e-6
    cli = predicted[2]
    if cli is not None:
        row = cli[cli["path"] == str(png)][p.labels].to_numpy()[0]
        assert np.abs(df[p.labels].to_numpy()[0] - row).max() < 1e-5  # CSV keeps 7 digits
    heat = df["heatmap"][0]
    assert heat.shape == (INPUT, INPUT) and 0 <= heat.min() and heat.max() <= 1
    assert len(df["box"][0]) == 4
    x = p.transform(png)
    assert x.shape == (1, INPUT, INPUT) and x.dtype == torch.float32
    # the normalisation: back to 0..255 with the run's mean/std, within the film's range
    raw = x * 0.226 * 255 + 0.449 * 255
    assert raw.min() > -0.5 and raw.max() < 255.5
    with pytest.raises(Exception, match="z_cut.dcm") if importlib.util.find_spec("pydicom") else \
            pytest.raises(Exception, match="pydicom"):
        p.predict([films / "sub" / "z_cut.dcm"])
    skipped = p.predict([films / "sub"], errors="skip")
    assert skipped["path"].map(lambda s: Path(s).name).tolist() == ["other.png"]
    assert [Path(f).name for f, _ in skipped.attrs["errors"]] == (
        ["z_cut.dcm"] if importlib.util.find_spec("pydicom") else [])


def test_python_api_in_a_fresh_process(run_dir, films):
    img = films / FORMATS[0]
    code = f"import medattn; p = medattn.load({str(run_dir)!r}); print(p.predict([{str(img)!r}]).to_csv(index=False))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "trained on synthetic images" in r.stderr  # a UserWarning
    head, first = r.stdout.strip().splitlines()[:2]
    assert head.startswith("path,Atelectasis,Cardiomegaly")
    assert first.startswith(str(img) + ",")
    assert all(0 < float(v) < 1 for v in first.split(",")[1:])


def _export_inputs(p, films) -> tuple[np.ndarray, np.ndarray]:
    names = [FORMATS[0], "sub/other.png"]
    px = np.stack([p.read(films / n) for n in names]).transpose(0, 3, 1, 2)  # (B, 1, S, S) uint8
    ref = p.predict([films / n for n in names])[p.labels].to_numpy()
    return px, ref


def test_export_torchscript_matches_predict(run_dir, films, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert cli_main(["export", "--run", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    # AG-CNN's crop is torchvision's RoIAlign: the sidecar and the command say what loading needs
    assert meta["load_requires"] == ["torchvision"] and meta["input"]["dtype"] == "uint8 or float32"
    assert "import torch, torchvision; torch.jit.load(FILE)" in err
    p = _load(run_dir)
    px, ref = _export_inputs(p, films)
    m = torch.jit.load(str(out))
    for x in (torch.from_numpy(px), torch.from_numpy(px).float(), torch.from_numpy(px[:1])):
        got = m(x).detach().numpy()
        assert got.shape == (len(x), len(p.labels))
        assert np.abs(got - ref[:len(x)]).max() < 1e-4
    # A process that never imported torchvision: loading as the sidecar says works, and gives
    # the same numbers (the input saved as a plain tensor file, read by torch alone).
    torch.save(torch.from_numpy(px), tmp_path / "x.pt")
    code = ("import json, sys, torch\n"
            f"meta = json.load(open({str(out) + '.json'!r}))\n"
            "assert 'torchvision' not in sys.modules\n"
            "for name in meta['load_requires']: __import__(name)\n"
            f"m = torch.jit.load({str(out)!r})\n"
            f"print(json.dumps(m(torch.load({str(tmp_path / 'x.pt')!r})).tolist()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert np.abs(np.array(json.loads(r.stdout)) - ref).max() < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="onnx export needs onnx, onnxscript, onnxruntime (pip install 'medattn[onnx]')")
def test_export_onnx_matches_predict(run_dir, films, tmp_path):
    """The dynamo exporter takes ~30-70 s here (torch.export of the attention path)."""
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--run", str(run_dir), "--format", "onnx", "--out", str(out), "--no-optimize"]) == 0
    assert json.loads((tmp_path / "model.onnx.json").read_text())["input"]["dtype"] == "float32"
    p = _load(run_dir)
    px, ref = _export_inputs(p, films)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)"
    for x in (px, px[:1]):  # uint8 pixels passed as float32: every 0..255 value is exact
        got = sess.run(None, {"images": x.astype(np.float32)})[0]
        assert np.abs(got - ref[:len(x)]).max() < 1e-4
    # --input-dtype uint8 (here through the Python API): the graph takes the pixels as they are
    from medattn.api import load as api_load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        u8 = api_load(run_dir, device="cpu").export(tmp_path / "u8.onnx", "onnx", optimize=False, input_dtype="uint8")
    sess8 = ort.InferenceSession(str(u8), providers=["CPUExecutionProvider"])
    assert sess8.get_inputs()[0].type == "tensor(uint8)"
    assert json.loads((tmp_path / "u8.onnx.json").read_text())["input"]["dtype"] == "uint8"
    assert np.abs(sess8.run(None, {"images": px})[0] - ref).max() < 1e-4
    # the predictor itself is untouched by the export (tracing must not leak into its caches)
    assert np.abs(p.predict([films / FORMATS[0]])[p.labels].to_numpy()[0] - ref[0]).max() < 1e-6


def test_bad_arguments_write_nothing(run_dir, films, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert cli_main(["predict", "--run", str(tmp_path / "nope"), str(films), "--out", str(out)]) == 2
    assert "run directory does not exist" in capsys.readouterr().err
    assert cli_main(["predict", "--run", str(run_dir), str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    assert cli_main(["predict", "--run", str(run_dir), str(films), "--stage", "nope", "--out", str(out)]) == 2
    assert "not a stage of this run" in capsys.readouterr().err
    assert not out.exists()


@needs_pydicom
def test_predict_on_a_real_folder(run_dir, shared_nih, tmp_path):
    """issue 23: real films, a dangling link, a linked folder (with a link back up: no loop), a
    flat DICOM, a 12-bit JPEG Extended DICOM, a 1x1 PNG, a stretched film and a .txt list with a
    missing row. Each problem is named in one line (errors first, before the model loads; quality
    warnings with pydicom's folded in), the rest is predicted and written, and the exit status is 1."""
    import contextlib
    import io

    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    from test_imagefiles import pydicom_file

    real = sorted((shared_nih / "images").glob("*.png"))[:3]
    d, other = tmp_path / "in", tmp_path / "elsewhere"
    d.mkdir()
    other.mkdir()
    shutil.copy(real[0], d / "film1.png")
    shutil.copy(real[1], other / "film2.png")
    (d / "linked").symlink_to(other, target_is_directory=True)
    (other / "back").symlink_to(d, target_is_directory=True)
    (d / "gone.png").symlink_to(tmp_path / "deleted.png")
    flat = pydicom_file("CT_small.dcm", d)
    jpeg12 = pydicom_file("JPEG-lossy.dcm", d)
    Image.open(real[2]).resize((1024, 400), Image.Resampling.LANCZOS).save(d / "stretched.png")
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(d / "dot.png")
    lst = tmp_path / "list.txt"
    lst.write_text("in/film1.png\nmissing.png\n")
    out = tmp_path / "preds.csv"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["predict", "--run", str(run_dir), str(d), str(lst), "--out", str(out), "--device", "cpu",
                         "--batch", "4"])
    err = err.getvalue()
    assert code == 1, err
    decodes_12bit = bool(set(get_decoder(JPEGExtended12Bit).available_plugins) - {"pillow"})
    want = ["CT_small.dcm", "dot.png", "film1.png", "linked/film2.png", "stretched.png"]
    if decodes_12bit:
        want = sorted(want + ["JPEG-lossy.dcm"])
    df = pd.read_csv(out)
    assert [Path(p).relative_to(d).as_posix() for p in df["path"]] == want
    assert df.drop(columns="path").notna().all().all()
    lines = err.strip().splitlines()
    assert all(line.startswith("medattn predict: ") for line in lines), err  # nothing raw from pydicom
    errors = [line for line in lines if line.startswith("medattn predict: error: ")]
    warned = [line for line in lines if line.startswith("medattn predict: warning: ")]
    assert errors[:2] == [
        f"medattn predict: error: {d / 'gone.png'}: dangling symbolic link (to {tmp_path / 'deleted.png'})",
        f"medattn predict: error: {tmp_path / 'missing.png'}: no such file (listed in {lst}, row 2, as 'missing.png')"]
    if not decodes_12bit:
        assert len(errors) == 3 and errors[2].startswith(f"medattn predict: error: {jpeg12}: cannot decode")
        assert "pylibjpeg-libjpeg" in errors[2]
    assert [w.split(": ")[2] for w in warned] == [str(flat), str(d / "dot.png"), str(d / "stretched.png")]
    assert "almost no contrast: 9 grey levels" in warned[0] and "no window" in warned[0]
    assert "1x1 px, smaller than 64 px" in warned[1] and "aspect ratio beyond 1:2" in warned[2]
    assert lines[-1] == f"medattn predict: wrote {out} ({len(want)} image(s); {len(errors)} unreadable, named above)"
