"""Calibration, operating points and subgroups in `medattn eval` (metrics.json and the run's
calibration record), `medattn predict --calibrated / --operating-point` and the Python API, and
external validation (`medattn eval --dataset chexpert|mimic|padchest`) on synthetic fixtures in
each published layout, on one trained demo run (tests/conftest.py: trained_demo_run)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medattn import metrics as M
from medattn.cli import main as cli_main
from medattn.data.external_synth import write_chexpert, write_mimic, write_padchest
from medattn.data.prepared import PreparedDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluated(trained_demo_run):
    prep, run = trained_demo_run
    m = json.loads((run / "eval" / "metrics.json").read_text())
    preds = pd.read_csv(run / "eval" / "preds.csv")
    return prep, run, m, preds


def test_metrics_json_calibration_matches_preds(evaluated):
    prep, run, m, preds = evaluated
    labels = m["eval_labels"]
    cal = m["calibration"]
    assert cal["n_bins"] == 15 and cal["binnings"] == ["equal-width", "equal-mass"]
    assert cal["fitted_on"]["split"] == "val" and cal["fitted_on"]["n_images"] > 0
    for branch in m["auroc"]:
        e = cal[branch]
        rows = preds[preds.branch == branch]
        p = rows[[f"p_{k}" for k in labels]].to_numpy()
        y = rows[[f"y_{k}" for k in labels]].to_numpy()
        # ECE and Brier before, recomputed from the written predictions.
        for j, k in enumerate(labels):
            assert e["before"]["ece_equal_width"][k] == pytest.approx(M.ece(p[:, j], y[:, j]), abs=1e-4)  # preds.csv keeps 6 significant digits
            assert e["before"]["ece_equal_mass"][k] == pytest.approx(M.ece(p[:, j], y[:, j], binning="equal-mass"),
                                                                     abs=1e-4)  # preds.csv keeps 6 significant digits
            assert e["before"]["brier"][k] == pytest.approx(M.brier(p[:, j], y[:, j]), abs=1e-4)  # preds.csv keeps 6 significant digits
        # After: the stored per-label temperatures applied to the same predictions.
        t = M.Temperature.from_dict(e["temperature"])
        assert set(t.kind.values()) <= {"own", "pooled"}
        after = M.apply_temperature(p, t.vector(labels))
        for j, k in enumerate(labels):
            assert e["after"]["brier"][k] == pytest.approx(M.brier(after[:, j], y[:, j]), abs=1e-4)  # preds.csv keeps 6 significant digits
        rel = e["before"]["reliability"]
        assert rel["binning"] == "equal-width" and sum(rel["count"]) == p.size
    rec = json.loads((run / "calibration.json").read_text())
    assert rec["stage"] == m["stage"] and rec["checkpoint"] == "best" and rec["fitted_on"] == "val"
    assert rec["temperatures"]["fusion"] == cal["fusion"]["temperature"]


def test_metrics_json_operating_points_and_subgroups(evaluated):
    prep, run, m, preds = evaluated
    labels = m["eval_labels"]
    op = m["operating_points"]
    assert op["branch"] == "fusion" and op["chosen_on"] == "val" and set(op["points"]) == {"youden", "sens90", "sens95"}
    rows = preds[preds.branch == "fusion"]
    for k in labels:
        e = op["points"]["sens90"][k]
        p, y = rows[f"p_{k}"].to_numpy(), rows[f"y_{k}"].to_numpy().astype(bool)
        if e["threshold"] is None:
            continue
        pred = p >= e["threshold"] - 1e-7 * 0  # the stored threshold, as predict applies it
        assert e["tp"] == int(np.sum(pred & y)) and e["tn"] == int(np.sum(~pred & ~y))
        assert e["sensitivity"] == pytest.approx(e["tp"] / max(e["tp"] + e["fn"], 1))
        assert e["val_sensitivity"] >= 0.9
        lo, hi = e["sensitivity_ci"]
        assert e["too_few"] or (lo is not None and lo <= hi)
    sg = m["subgroups"]
    assert set(sg["attributes"]) == {"sex", "age", "view"} and sg["age_bands"] == ["<40", "40-60", ">60"]
    ds = PreparedDataset.open(prep)
    man = ds.manifest.set_index("image")
    sex = man.loc[rows.image, "sex"].to_numpy()
    k = labels[0]
    f = sex == "F"
    y = rows[f"y_{k}"].to_numpy()[f]
    if 0 < y.sum() < len(y):
        assert sg["attributes"]["sex"]["F"]["auroc"][k] == pytest.approx(M.auroc(rows[f"p_{k}"].to_numpy()[f], y),
                                                                         abs=1e-4)  # preds.csv keeps 6 significant digits
    assert sg["attributes"]["sex"]["F"]["n_images"] + sg["attributes"]["sex"]["M"]["n_images"] == len(rows)
    for g in sg["attributes"]["view"].values():  # tiny test split: many subgroups too small, and marked
        for lab in labels:
            assert (g["ci"][lab] == [None, None]) == (lab in g["too_few"] or g["ci"][lab][0] is None)


def _pngs(prep, tmp_path, n=6):
    ds = PreparedDataset.open(prep)
    files = []
    for i in ds.indices("test")[:n]:
        f = tmp_path / f"img{i}.png"
        Image.fromarray(ds.read(int(i))[..., 0]).save(f)
        files.append(f)
    return files


def test_predict_calibrated_and_operating_point(evaluated, tmp_path):
    prep, run, m, _ = evaluated
    files = _pngs(prep, tmp_path)
    raw, cal = tmp_path / "raw.csv", tmp_path / "cal.csv"
    assert cli_main(["predict", "--run", str(run), *map(str, files), "--out", str(raw), "--device", "cpu"]) == 0
    assert cli_main(["predict", "--run", str(run), *map(str, files), "--out", str(cal), "--device", "cpu",
                     "--calibrated", "--operating-point", "sens90"]) == 0
    a, b = pd.read_csv(raw), pd.read_csv(cal)
    rec = json.loads((run / "calibration.json").read_text())
    labels = [c for c in a.columns if c != "path" and "/" not in c]
    T = M.Temperature.from_dict(rec["temperatures"]["fusion"]).vector(labels)
    np.testing.assert_allclose(b[labels].to_numpy(), M.apply_temperature(a[labels].to_numpy(), T), atol=1e-4)  # from the CSV rounded to 7 digits
    thr = rec["operating_points"]["thresholds"]["sens90"]
    for k, t in thr.items():
        if t is not None:
            assert (b[f"call/{k}"].to_numpy() == (a[k].to_numpy() >= t)).all()
    import medattn

    with pytest.warns(UserWarning, match="synthetic"):
        p = medattn.load(run, device="cpu")
    df = p.predict([str(f) for f in files], calibrated=True, operating_point="youden")
    np.testing.assert_allclose(df[labels].to_numpy(), b[labels].to_numpy(), atol=1e-4)  # from the CSV rounded to 7 digits
    assert df.attrs["calibrated"] and any(c.startswith("call/") for c in df.columns)


def test_predict_without_calibration_is_refused(evaluated, tmp_path):
    prep, run, _, _ = evaluated
    other = tmp_path / "run"
    import shutil

    shutil.copytree(run, other, ignore=shutil.ignore_patterns("calibration.json", "eval", "report"))
    files = _pngs(prep, tmp_path, 1)
    out = tmp_path / "x.csv"
    assert cli_main(["predict", "--run", str(other), str(files[0]), "--out", str(out), "--device", "cpu",
                     "--calibrated"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("dataset", ["chexpert", "mimic", "padchest"])
def test_external_eval(evaluated, tmp_path, dataset):
    _, run, _, _ = evaluated
    if dataset == "chexpert":
        root = write_chexpert(tmp_path, n_patients=40, size=64, seed=5)
    elif dataset == "mimic":
        root = write_mimic(tmp_path / "mimic", n_subjects=45, size=64, seed=5)
    else:
        root = write_padchest(tmp_path / "pc", n_patients=30, size=64, seed=5)
    out = tmp_path / "out"
    assert cli_main(["eval", "--run", str(run), "--dataset", dataset, "--root", str(root), "--bootstrap", "40",
                     "--device", "cpu", "--out-dir", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == dataset and m["uncertain_policy"] == "ignore" and m["views"] == "frontal"
    assert m["n_lateral"] >= 1 and not m["laterals_evaluated"]
    assert m["label_map_source"]
    # The demo model knows 15 labels; every mapped label is shared (NIH names).
    assert "Effusion" in m["shared_labels"] and "Cardiomegaly" in m["shared_labels"]
    preds = pd.read_csv(out / "preds.csv")
    assert len(preds) == m["n_images_evaluated"]
    b = m["output_branch"]
    for k in m["shared_labels"]:
        y = preds[f"y_{k}"].to_numpy()
        ok = ~np.isnan(y)
        v = m["auroc"][b][k]
        if ok.any() and 0 < y[ok].sum() < ok.sum():
            assert v == pytest.approx(M.auroc(preds[f"p_{k}"].to_numpy()[ok], y[ok]), abs=1e-4)  # preds.csv keeps 6 significant digits
        lo, hi = m["auroc_ci"][b][k]
        assert (lo is None) == (m["per_label"][k]["too_few"] or v is None) or lo is None
    # Calibration on the external set with the run's own temperatures.
    assert "calibration" in m and "fusion" in m["calibration"]


def test_external_eval_bad_root_exit_2(evaluated, tmp_path):
    _, run, _, _ = evaluated
    assert cli_main(["eval", "--run", str(run), "--dataset", "chexpert", "--root", str(tmp_path)]) == 2
    assert not (run / "eval" / "external-chexpert").exists()


def test_report_sections(evaluated, tmp_path):
    """The report draws a reliability diagram per branch, the operating-point and subgroup tables,
    and an external-validation section once an external evaluation exists."""
    import shutil

    from hpc.report import build_report

    _, run, m, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    root = write_chexpert(tmp_path, n_patients=12, size=48, seed=9)
    assert cli_main(["eval", "--run", str(copy), "--dataset", "chexpert", "--root", str(root), "--bootstrap", "20",
                     "--device", "cpu"]) == 0
    res = build_report(copy, samples=0, log=lambda *a: None)
    html, md = res.html.read_text(), res.markdown.read_text()
    names = {p.name for p in res.figures}
    assert {f"reliability_{b}.png" for b in m["auroc"]} <= names
    for h in ("Calibration", "Operating points", "Subgroups", "External validation"):
        assert f">{h}<" in html and f"## {h}" in md
    e = m["calibration"]["fusion"]
    cell = f"{e['before']['ece_equal_width']['mean']:.3f} → {e['after']['ece_equal_width']['mean']:.3f}"
    assert cell in html
    assert "sex: F (n=" in html and "age: 40-60" in html and "view: PA" in html
    ext = json.loads((copy / "eval" / "external-chexpert" / "metrics.json").read_text())
    assert f"uncertain labels: {ext['uncertain_policy']}" in html


def test_export_calibrated_matches_predict_calibrated(evaluated, tmp_path):
    """`medattn export --calibrated` builds the run's temperatures into the model: its outputs
    are `predict --calibrated`'s; a run without a calibration record is refused, nothing written."""
    import torch

    import medattn

    prep, run, _, _ = evaluated
    files = _pngs(prep, tmp_path)
    out = tmp_path / "cal.pt"
    assert cli_main(["export", "--run", str(run), "--format", "torchscript", "--out", str(out), "--calibrated"]) == 0
    with pytest.warns(UserWarning, match="synthetic"):
        p = medattn.load(run, device="cpu")
    ref = p.predict([str(f) for f in files], calibrated=True)[list(p.labels)].to_numpy()
    raw = p.predict([str(f) for f in files])[list(p.labels)].to_numpy()
    px = torch.from_numpy(np.stack([p.read(f) for f in files]).transpose(0, 3, 1, 2))
    got = torch.jit.load(str(out))(px).numpy()
    assert np.abs(got - ref).max() < 1e-4 and np.abs(got - raw).max() > 1e-3  # the temperatures act
    meta = json.loads((tmp_path / "cal.pt.json").read_text())
    assert len(meta["output"]["calibrated"]["temperatures"]) == len(p.labels)

    import shutil

    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("calibration.json", "eval", "report"))
    out2 = tmp_path / "none.pt"
    assert cli_main(["export", "--run", str(other), "--format", "torchscript", "--out", str(out2), "--calibrated"]) == 2
    assert not out2.exists() and not (tmp_path / "none.pt.json").exists()
