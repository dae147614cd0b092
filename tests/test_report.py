"""`medattn report` and `medattn viz` on a real tiny run (trained and evaluated here, ~30 s once
per module): the HTML and Markdown content against metrics.json and hand-computed numbers, the
embedded figures, partial and stale runs, the split and data caveats, overlays on the real NIH
PNGs, and the page rendered by a real headless chromium."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpc import evaluate as evaluate_mod
from hpc import train as train_mod
from medattn.cli import main as cli_main
from hpc.report import build_report
from hpc import overlays
from hpc.inference import load_model, predict_images, read_pixels
from medattn.data.prepared import PreparedDataset
from hpc.report.viz import resolve_targets, visualize
from prepfix import make_prepared

# 48 px input (2x2 last feature map for ResNet-18, so heat maps and boxes vary), 56 px prepared.
PREP_SIZE, INPUT, RESIZE = 56, 48, 56
BASE = [f"data.image_size={INPUT}", f"data.resize={RESIZE}", "stages.*.epochs=2", "stages.*.batch_size=16",
        "data.num_workers=0", "runtime.log_every=100", "runtime.tensorboard=false"]
CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration"]  # prepfix classes=4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(prepared dir, run dir) of a finished G -> L -> F run, evaluated on its test split."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    prep = make_prepared(root / "prep", n=128, size=PREP_SIZE, seed=1)
    run = root / "run"
    assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), *BASE]) == 0
    assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "50"]) == 0
    return prep, run


@pytest.fixture(scope="module")
def report(trained):
    _, run = trained
    res = build_report(run, samples=4, log=lambda *a: None)
    return res, res.html.read_text(), res.markdown.read_text()


def _link_run(src: Path, dst: Path, stages=("global", "local", "fusion")) -> Path:
    """A cheap copy of a run: small files copied, checkpoints of ``stages`` linked."""
    dst.mkdir(parents=True)
    for name in ("config.yaml", "state.json", "provenance.json", "metrics.jsonl"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    (dst / "ckpt").mkdir()
    for s in stages:
        (dst / "ckpt" / s).symlink_to(src / "ckpt" / s, target_is_directory=True)
    return dst


def _data_uris(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _std(png: bytes | Path) -> float:
    im = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("L")
    return float(np.asarray(im, np.float64).std())


# --------------------------------------------------------------------------------------------
# the full report
# --------------------------------------------------------------------------------------------
def test_report_files_and_self_contained(report, trained):
    res, html, md = report
    _, run = trained
    assert res.html == run / "report" / "index.html" and res.markdown == run / "report" / "report.md"
    # ROC grid of the output branch + training + IoBB + IoU + 4 overlays
    names = sorted(p.name for p in res.figures)
    assert [n for n in names if n.startswith("roc_")] == ["roc_fusion.png"]
    assert {"training.png", "iobb_distribution.png", "iou_distribution.png"} <= set(names)
    assert len([n for n in names if n.startswith("overlay_")]) == 4
    # Self-contained: no script, no external resource, every figure embedded and decodable.
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html
    pngs = _data_uris(html)
    assert len(pngs) == len(res.figures) == html.count("<img ")
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert _std(png) > 5.0  # not blank
    for p in res.figures:
        assert _std(p) > 5.0
    # The Markdown links every figure relatively, and the files are there.
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert sorted(Path(link).name for link in links) == names
    assert not list(run.glob(".report*"))  # no temporary directory left


def test_auroc_table_matches_metrics_and_papers(report, trained):
    _, html, md = report
    _, run = trained
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["eval_labels"] == CLASSES
    for branch in ("global", "local", "fusion"):
        for c in CLASSES + ["mean"]:
            v, (lo, hi) = m["auroc"][branch][c], m["auroc_ci"][branch][c]
            cell = f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            assert f">{cell}<" in html, (branch, c, cell)
            assert cell in md
    # Published per-class numbers beside them (AG-CNN Table I R-50 / D-121, CheXNet, Wang, Yao).
    row = re.search(r"<tr><td>Atelectasis</td>(.*?)</tr>", html).group(1)
    for v in ("0.844", "0.853", "0.809", "0.716", "0.772"):
        assert f">{v}<" in row
    # Means over the same four classes, by hand from Table I and the CheXNet table.
    assert f">{(0.844 + 0.937 + 0.904 + 0.753) / 4:.3f}<" in html
    assert f">{(0.8094 + 0.9248 + 0.8638 + 0.7345) / 4:.3f}<" in html
    # The published 14-disease means, and AG-CNN's branch means (Table I).
    for v in ("0.868", "0.871", "0.841", "0.738", "0.803", "0.817", "0.810", "0.840"):
        assert f">{v}<" in html
    # n+ = positives of the class in the test split (from the prepared labels).
    import pandas as pd

    man = pd.read_parquet(trained[0] / "manifest.parquet")
    test = np.stack(man[man["split"] == "test"]["labels"].to_numpy())
    assert re.search(rf"<td>Effusion</td><td class=\"num\">{int(test[:, 2].sum())}</td>", html)


def test_caveats_are_prominent(report):
    _, html, md = report
    # test-blobs data = synthetic: the first banner says so, before any number.
    first_banner = html.index('class="banner')
    assert html.index("Synthetic data — do not compare with papers.") < html.index("<table")
    assert 'class="banner danger"' in html[first_banner:first_banner + 40]
    # No source states its split's unit, so no column is comparable; medattn's reading is said as such.
    assert "Split: random — not comparable with the papers below." in html
    assert "Same split as medattn's reading of CheXNet (CheXNet: CheXNet's 14-class split was not released" in md
    assert "Mean AUROC over 4 classes, not the 14 diseases." in html
    assert ("CheXNet (random 70/10/20, image or patient not stated by the source, read as random 70/10/20 by "
            "patient: not comparable)") in html
    assert "Not comparable: the data are synthetic" in html
    assert "⛔ **Synthetic data" in md


def test_training_localisation_throughput_provenance(report, trained):
    _, html, md = report
    _, run = trained
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    g = [r for r in recs if r["stage"] == "global"]
    best = max(g, key=lambda r: r["val/global/mean_auroc"])
    assert f"best {best['val/global/mean_auroc']:.3f} (epoch {best['epoch']})" in html
    # throughput: mean images/s of the global stage and its total loop time
    ips = np.mean([r["train/images_per_s"] for r in g])
    assert f">{ips:.1f}<" in html
    # T(IoBB) table: run accuracy beside Wang et al. Table 4 (Atelectasis at 0.1: 0.7277)
    m = json.loads((run / "eval" / "metrics.json").read_text())
    acc = m["localization"]["per_class"]["Atelectasis"]["acc_iobb"]["0.1"]
    assert f">{acc:.3f} / 0.728<" in html
    assert f"{(0.7277 + 0.9931 + 0.7124 + 0.7886 + 0.4352 + 0.1645 + 0.7500 + 0.4591) / 8:.3f}" in html
    # provenance and the resolved config
    prov = json.loads((run / "provenance.json").read_text())[-1]
    assert f"torch {prov['versions']['torch']}" in html
    assert "Resolved config (config.yaml)" in html and "crop_source: prepared" in html


# --------------------------------------------------------------------------------------------
# the model behind the overlays
# --------------------------------------------------------------------------------------------
def test_overlay_inference_geometry(trained):
    prep, run = trained
    lm = load_model(run, data=prep, overrides=["runtime.device=cpu"])
    assert lm.stage == "fusion" and lm.checkpoint == run / "ckpt" / "fusion" / "best.pt"
    ds = PreparedDataset.open(prep)
    idx = overlays.select_samples(ds, ds.indices("test"), 4, CLASSES)
    # Images with boxes first, one box class after the other (sorted class names).
    box_labels = sorted({b["label"] for i in ds.indices("test") for b in ds.boxes(int(i))})
    for k, i in enumerate(idx):
        assert box_labels[k % len(box_labels)] in {b["label"] for b in ds.boxes(i)}
    imgs = ds.read_batch(idx)
    preds = predict_images(lm, imgs)
    off = (RESIZE - INPUT) / (2 * RESIZE)  # centre crop window of the evaluation view
    for i, p in zip(idx, preds):
        np.testing.assert_allclose(p.window, [off, off, 1 - off, 1 - off], atol=1e-6)
        assert set(p.probs) == {"global", "local", "fusion"}
        assert p.heatmap.shape == (INPUT, INPUT) and p.heatmap.min() >= 0 and p.heatmap.max() <= 1
        assert p.heatmap.std() > 0  # a 2x2 feature map: not constant
        # the image-space box is the view box mapped through the window
        np.testing.assert_allclose(p.box, off + p.view_box * (1 - 2 * off), atol=1e-5)
        # the crop (agcnn.crop_source=prepared) shows the prepared pixels inside the box
        assert p.crop.shape == (INPUT, INPUT, 1) and p.crop.dtype == np.uint8
        x0, y0, x1, y1 = np.round(p.box * PREP_SIZE).astype(int)
        region = imgs[list(idx).index(i), y0:y1, x0:x1, 0].astype(float)
        assert abs(p.crop.mean() - region.mean()) < 6.0
        # the overlay shows the view region at the prepared resolution
        lo, hi = round(off * PREP_SIZE), round((1 - off) * PREP_SIZE)
        np.testing.assert_array_equal(p.view, imgs[list(idx).index(i), lo:hi, lo:hi])


# --------------------------------------------------------------------------------------------
# partial, stale and foreign runs
# --------------------------------------------------------------------------------------------
def test_partial_run_without_eval(trained, tmp_path):
    _, run = trained
    part = _link_run(run, tmp_path / "part", stages=("global",))
    state = json.loads((part / "state.json").read_text())
    for s in ("local", "fusion"):
        del state["stages"][s]
    (part / "state.json").write_text(json.dumps(state))
    lines = [x for x in (part / "metrics.jsonl").read_text().splitlines() if '"stage": "global"' in x]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"stage\": \"loc")  # torn last line
    res = build_report(part, samples=2, log=lambda *a: None)
    html = res.html.read_text()
    assert "Not evaluated yet." in html
    assert f"medattn eval --run {part} --split test" in html
    assert "Stages not finished: local, fusion." in html
    assert "skipped 1 unreadable line(s)" in html
    assert "model of stage &#x27;global&#x27;" in html  # overlays from the global stage's best.pt
    assert len([p for p in res.figures if p.name.startswith("overlay_")]) == 2
    assert "training.png" in {p.name for p in res.figures}
    # --eval evaluates first (the global stage), then reports it
    rc = cli_main(["report", "--run", str(part), "--eval", "--bootstrap", "20", "--samples", "0"])
    assert rc == 0
    m = json.loads((part / "eval" / "metrics.json").read_text())
    assert m["stage"] == "global" and list(m["auroc"]) == ["global"]
    html = res.html.read_text()
    assert "Not evaluated yet." not in html and f">{m['auroc']['global']['mean']:.3f} [" in html


def test_stale_eval_and_official_split(trained, tmp_path, capsys):
    _, run = trained
    other = _link_run(run, tmp_path / "other", stages=())
    (other / "eval").mkdir()
    m = json.loads((run / "eval" / "metrics.json").read_text())
    m["stage"], m["split_kind"] = "local", "official"
    (other / "eval" / "metrics.json").write_text(json.dumps(m))
    assert cli_main(["report", "--run", str(other), "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"report: {(other / 'report' / 'index.html').resolve()}"
    html = (other / "report" / "index.html").read_text()
    assert "The evaluation is out of date." in html and "evaluated stage &#x27;local&#x27;" in html
    assert "Split: official — not comparable with the papers below." in html
    assert "Official-split references" in html and ">0.822<" in html  # XProtoNet
    assert "No ROC curves" in html  # no preds.csv in this copy
    # the report is replaced whole: a second run swaps in a new directory, leaving no temporaries
    assert cli_main(["report", "--run", str(other), "--samples", "0"]) == 0
    assert sorted(p.name for p in other.iterdir() if p.name.startswith((".report", "report"))) == ["report"]


def test_report_of_a_bare_run_and_bad_input(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("method: agcnn\nstages:\n  global: {epochs: 3}\n")
    assert cli_main(["report", "--run", str(bare)]) == 0
    html = (bare / "report" / "index.html").read_text()
    assert "No epoch recorded yet" in html and "Not evaluated yet." in html and "Data source unknown." in html
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert cli_main(["report", "--run", str(nothing)]) == 2
    err = capsys.readouterr().err
    assert f"{nothing / 'config.yaml'}: not a run directory" in err
    assert list(nothing.iterdir()) == []


def test_report_on_real_nih_images(trained, tmp_path, shared_nih):
    """The run's model evaluated and reported on a prepared set of the 240 real NIH PNGs."""
    _, run = trained
    real, n_test_boxes = _prepare_real(shared_nih, tmp_path / "real")
    other = _link_run(run, tmp_path / "run", stages=("global", "local", "fusion"))
    # The model was trained on another split (synthetic images): eval refuses it unless asked.
    assert evaluate_mod.main(["--run", str(other), "--data", str(real), "--bootstrap", "0"]) != 0
    assert evaluate_mod.main(["--run", str(other), "--data", str(real), "--bootstrap", "0",
                              "--allow-split-mismatch"]) == 0
    res = build_report(other, samples=3, data=str(real), log=lambda *a: None)
    html = res.html.read_text()
    assert "Data: NIH ChestX-ray14." in html and "Synthetic data" not in html
    assert "not the 14 diseases" not in html  # all 14 diseases evaluated
    m = json.loads((other / "eval" / "metrics.json").read_text())
    if m["mean_over"]["excluded"]:  # a class without positives among these few test images: named
        assert f"Mean AUROC over {m['mean_over']['n']} of 14 classes (" in html
    assert "(no bootstrap intervals" in html
    m = json.loads((other / "eval" / "metrics.json").read_text())
    assert m["localization"]["n_boxes"] == n_test_boxes
    overlays_drawn = [p for p in res.figures if p.name.startswith("overlay_")]
    assert len(overlays_drawn) == 3 and all(_std(p) > 5 for p in overlays_drawn)


def _prepare_real(nih: Path, out: Path) -> tuple[Path, int]:
    """A prepared directory (docs/data-format.md) of the real PNGs, labels from the v2020 CSV and
    boxes from BBox_List_2017, split at random by patient, with every boxed image in test.
    Written directly (as tests/prepfix.py does) so that this test does not depend on prepare."""
    import pandas as pd

    from medattn.data import nih as N
    from medattn.data.labels import DISEASES, NIH_LABELS

    ent = N.read_data_entry(nih / "Data_Entry_2017_v2020.csv")[0].set_index("image")
    bx = N.read_bbox_list(nih / "BBox_List_2017.csv")
    # every image with a box (12 of the 240) and the first 36 others: enough, and quick to decode
    files = sorted((nih / "images").glob("*.png"))
    files = [f for f in files if f.name in set(bx["image"])] + [f for f in files if f.name not in set(bx["image"])][:36]
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    (out / "shards").mkdir()
    pix = np.stack([read_pixels(f, PREP_SIZE, 1) for f in files])
    np.save(out / "shards" / "pixels-00000.npy", pix)
    header = (out / "shards" / "pixels-00000.npy").stat().st_size - pix.nbytes
    rows = []
    boxed = set(bx["image"])
    n_test_boxes = 0
    for k, f in enumerate(files):
        e = ent.loc[f.name]
        lab = [1 if n in e["labels"] else 0 for n in NIH_LABELS]
        boxes = [{"label": r.label, "x": r.x / 1024, "y": r.y / 1024, "w": r.w / 1024, "h": r.h / 1024}
                 for r in bx[bx["image"] == f.name].itertuples()]
        split = "test" if f.name in boxed else str(rng.choice(["train", "val", "test"], p=[0.7, 0.1, 0.2]))
        n_test_boxes += len(boxes) if split == "test" else 0
        rows.append({"index": k, "image": f.name, "patient": str(e["patient"]), "split": split, "labels": lab,
                     "target": -1, "finding_labels": "|".join(e["labels"]), "boxes": boxes, "shard": 0, "slot": k,
                     "offset": header + k * pix[0].nbytes, "nbytes": pix[0].nbytes,
                     "orig_width": 1024, "orig_height": 1024, "conversion": ""})
    df = pd.DataFrame(rows)
    # a patient in two splits would be a leak; these few images are taken as they come
    df.to_parquet(out / "manifest.parquet", index=False)
    info = {"format_version": 1, "source": {"kind": "nih", "root": str(nih), "metadata": "Data_Entry_2017_v2020.csv",
                                            "variant": "v2020"},
            "task": "multilabel", "label_names": list(NIH_LABELS), "eval_labels": list(DISEASES),
            "split": "random", "split_seed": 0, "counts": df["split"].value_counts().to_dict(),
            "image_size": PREP_SIZE, "channels": 1, "pixel_format": "raw",
            "shards": [{"path": "shards/pixels-00000.npy", "count": len(files)}], "skipped_missing": 0,
            "conversions": {}, "has_lung_boxes": False}
    (out / "dataset.json").write_text(json.dumps(info))
    return out, n_test_boxes


# --------------------------------------------------------------------------------------------
# medattn viz
# --------------------------------------------------------------------------------------------
def test_viz_ids_list_file_and_errors(trained, tmp_path, capsys):
    prep, run = trained
    import pandas as pd

    man = pd.read_parquet(prep / "manifest.parquet")
    ids = man["image"].tolist()
    lst = tmp_path / "ids.txt"
    lst.write_text(f"# chosen\n{ids[3]}\n\n{Path(ids[4]).stem}\n")
    out = tmp_path / "viz"
    rc = cli_main(["viz", "--run", str(run), "--images", f"{ids[0]},{ids[1]}", str(lst), "--classes",
                   "effusion,pleural thickening", "--out", str(out)])
    assert rc == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(Path(i).stem + ".png" for i in (ids[0], ids[1], ids[3], ids[4]))
    assert all(_std(p) > 5 for p in out.glob("*.png"))
    text = capsys.readouterr().out
    assert "Effusion: global " in text and "Pleural_Thickening: global " in text
    # errors name what is wrong; nothing is written
    bad = tmp_path / "bad"
    lst.write_text(f"{ids[0]}\nno_such_image\n")
    assert cli_main(["viz", "--run", str(run), "--images", str(lst), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{lst}, row 2: 'no_such_image' is neither an image id" in err
    assert cli_main(["viz", "--run", str(run), "--images", ids[0], "--classes", "Pneumonitis", "--out", str(bad)]) == 2
    assert "unknown class 'Pneumonitis'" in capsys.readouterr().err
    assert cli_main(["viz", "--run", str(run), "--images", "/nope/x.png", "--out", str(bad)]) == 2
    assert "'/nope/x.png' is neither" in capsys.readouterr().err
    assert not bad.exists()


def test_viz_on_real_nih_pngs(trained, tmp_path, shared_nih):
    """Raw 1024 px PNGs (gray and RGBA) decoded and resized like prepare; NIH truth and boxes drawn."""
    from medattn import figures

    _, run = trained
    imgs = shared_nih / "images"
    files = [imgs / "00001369_000.png", imgs / "00000013_003.png"]  # RGBA with a Cardiomegaly box; gray
    ds = PreparedDataset.open(trained[0])
    t = resolve_targets([",".join(map(str, files))], ds)
    assert [x.path for x in t] == files
    lines: list[str] = []
    paths = visualize(run, [str(f) for f in files], out=tmp_path / "v", log=lines.append)
    assert [p.name for p in paths] == ["00001369_000.png", "00000013_003.png"]
    assert "IoBB Cardiomegaly" in lines[0] and "IoBB" not in lines[1]
    # the GT box (336.999, 276.317, 553.719 x 386.844 px of 1024) is drawn in the GT colour
    arr = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    gt = np.array([int(figures.GT_BOX_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(arr - gt).sum(-1) < 30).sum() > 100
    arr2 = np.asarray(Image.open(paths[1]).convert("RGB")).astype(int)
    assert (np.abs(arr2[60:, :] - gt).sum(-1) < 30).sum() < 20  # no box on the gray image
    # the prepare conversion: RGBA with R = G = B -> R, resized to the prepared size
    px = read_pixels(files[0], PREP_SIZE, 1)
    ref = np.asarray(Image.open(files[0]))[..., 0]
    ref = np.asarray(Image.fromarray(ref).resize((PREP_SIZE, PREP_SIZE), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(px[..., 0], ref)


# --------------------------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser, checked before the (slow, module-scoped) run fixture is built."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian chromium not installed (make system-deps installs it)")
    return exe


def _chrome(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_report_renders_in_chromium(chromium, report, tmp_path):
    exe = chromium
    res, html, _ = report
    shot = tmp_path / "shot.png"
    p = _chrome(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", res.html.as_uri())
    assert shot.is_file(), p.stderr[-2000:]
    arr = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert arr.shape == (4000, 1280)
    assert arr.std() > 20  # text, tables and figures, not an empty page
    # Every band of the first 3000 px holds something (the page is long enough to fill them).
    for y in range(0, 3000, 500):
        assert arr[y:y + 500].std() > 5, y
    # Did every embedded image decode in the browser? The report has no scripts; a copy with a
    # checker appended reports each <img>'s natural size in the DOM.
    probe = tmp_path / "probe.html"
    checker = ("<script>window.addEventListener('load',()=>{const r=[...document.images].map("
               "i=>i.complete&&i.naturalWidth>0?'ok':'broken');const d=document.createElement('pre');"
               "d.id='probe';d.textContent=r.join(',')+'|tables='+document.querySelectorAll('table').length;"
               "document.body.appendChild(d);});</script>")
    probe.write_text(html.replace("</body>", checker + "</body>"))
    p = _chrome(exe, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="probe">([^<]*)</pre>', p.stdout)
    assert m, p.stderr[-2000:]
    imgs, tables = m.group(1).split("|tables=")
    assert imgs.split(",") == ["ok"] * len(res.figures)
    assert int(tables) == html.count("<table>")


def test_split_protocol_decides_comparable(trained, tmp_path):
    """image-random matches AG-CNN's and Wang et al.'s protocol, not CheXNet's; patient-clustered
    intervals are named with their resamples and patients; a too-few class has no interval."""
    _, run = trained
    other = _link_run(run, tmp_path / "ir")
    (other / "eval").mkdir()
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["bootstrap_method"] == "patient-clustered percentile bootstrap" and m["bootstrap"] == 50
    assert m["bootstrap_units"] > 0 and m["bootstrap_min_positives"] == 5
    m["split_kind"] = "image-random"
    cls = m["eval_labels"][0]
    m["auroc_ci_too_few"] = {b: [cls] for b in m["auroc"]}
    for b in m["auroc"]:
        m["auroc_ci"][b][cls] = [float("nan"), float("nan")]
    (other / "eval" / "metrics.json").write_text(json.dumps(m))
    html = build_report(other, samples=0, log=lambda *a: None).html.read_text()
    assert "Split: image-random — not comparable with the papers below." in html
    assert "Same split as medattn&#x27;s reading of AG-CNN ResNet-50, AG-CNN DenseNet-121, Wang et al." in html
    assert "It leaks patients" in html
    assert "AG-CNN ResNet-50 (random 70/10/20, image or patient not stated by the source, read as random " \
           "70/10/20 by image (patients leak across parts): not comparable)" in html
    assert f"patient-clustered percentile bootstrap (50 resamples of {m['bootstrap_units']} patients" in html
    assert "(too few)" in html
    from medattn import published as P
    from medattn.methods.agcnn import AGCNN_R50, AGCNNMethod

    assert P.protocol_matches("image-random", "image-random") and not P.protocol_matches("random", "image-random")
    # Protocols from the sources only: none of the columns' sources says image or patient.
    assert all(c.protocol == "unstated" for c in AGCNNMethod.published.auroc + P.REFERENCE_AUROC)
    assert not P.protocol_matches("chexnet", P.CHEXNET.protocol) and P.reading_matches("chexnet", P.CHEXNET)
    assert P.reading_matches("image-random", AGCNN_R50) and not P.reading_matches("random", AGCNN_R50)
    assert not P.protocol_matches(None, "unstated") and not P.reading_matches("random", P.YAO)
    # The 'too few' classes that the mean's interval still averages are named.
    assert f"including the &#x27;too few&#x27; ones ({cls})" in html


def test_mean_names_the_classes_it_averages(trained, tmp_path):
    """A class without positives leaves the mean, and eval and the report say which and why."""
    from types import SimpleNamespace

    from medattn.data.labels import DISEASES

    y = np.zeros((6, 14), np.int8)
    y[:3, :13] = 1
    auroc = {"main": {**{c: 0.7 for c in DISEASES[:13]}, "Hernia": None, "mean": 0.7}}
    spec = SimpleNamespace(label_names=tuple(DISEASES), eval_labels=tuple(DISEASES), task="multilabel")
    mo = evaluate_mod.mean_coverage(auroc, y, spec)
    assert mo["text"] == "13 of 14: Hernia has no positives in this split"
    assert mo["n"] == 13 and mo["classes"] == list(DISEASES[:13]) and mo["excluded"] == {
        "Hernia": "no positives in this split"}
    _, run = trained
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["mean_over"] == {"n": 4, "of": 4, "classes": CLASSES, "excluded": {}, "text": "4 of 4"}
    other = _link_run(run, tmp_path / "few")
    (other / "eval").mkdir()
    m["mean_over"] = {"n": 3, "of": 4, "classes": CLASSES[:3], "excluded": {CLASSES[3]: "no positives in this split"},
                      "text": f"3 of 4: {CLASSES[3]} has no positives in this split"}
    (other / "eval" / "metrics.json").write_text(json.dumps(m))
    md = build_report(other, samples=0, log=lambda *a: None).markdown.read_text()
    assert f"Mean AUROC over 3 of 4 classes ({CLASSES[3]} has no positives in this split)" in md
    assert f"mean over 3 of 4 classes ({CLASSES[3]} has no positives in this split)" in md


# --------------------------------------------------------------------------------------------
# published numbers and data classification (no run needed)
# --------------------------------------------------------------------------------------------
def test_published_numbers_are_consistent():
    """Transcription check: each column's per-class values average to the mean its source (or the
    research notes, chestxray14.md §5.2) gives."""
    from medattn.data.labels import DISEASES
    from medattn import published as P
    from medattn.methods import method_class, method_names

    expected = {"agcnn_r50": 0.868, "agcnn_d121": 0.871, "chexnet": 0.8414, "wang": 0.7381, "yao": 0.8027}
    # every method's own columns (the methods own their papers' tables) and the dataset's references
    columns = [c for m in method_names() for c in method_class(m).published.auroc] + list(P.REFERENCE_AUROC)
    assert sorted(c.key for c in columns) == sorted(expected)
    for col in columns:
        assert list(col.per_class) == list(DISEASES)
        assert abs(np.mean(list(col.per_class.values())) - expected[col.key]) < 6e-4, col.key
        assert abs(col.reported_mean() - expected[col.key]) < 6e-4
    r50 = method_class("agcnn").published.auroc[0]
    assert P.published_mean(r50, ["Atelectasis", "Hernia", "No Finding"]) == (0.844 + 0.903) / 2
    assert P.published_mean(r50, ["No Finding"]) is None
    # Wang et al. Table 4: accuracy falls as T rises, for every class
    for c, acc in P.WANG_TIOBB.items():
        vals = [acc[t] for t in P.WANG_TIOBB_THRESHOLDS]
        assert vals == sorted(vals, reverse=True), c


@pytest.mark.parametrize("source,marker,kind", [
    ({"kind": "test-blobs"}, False, "synthetic"),
    ({"kind": "nih", "root": "ROOT"}, True, "synthetic"),  # prepared from `medattn synth` output
    ({"kind": "nih", "root": "ROOT"}, False, "nih"),
    ({"kind": "nih", "synthetic": True}, False, "synthetic"),
    ({"kind": "fundus"}, False, "other"),
])
def test_data_kind(tmp_path, source, marker, kind):
    from hpc.report.collect import collect

    root = tmp_path / "nih"
    root.mkdir()
    if marker:
        (root / ".medattn-synth.json").write_text("{}")
    source = {k: (str(root) if v == "ROOT" else v) for k, v in source.items()}
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "dataset.json").write_text(json.dumps({"source": source, "split": "official"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: agcnn\n")
    (run / "provenance.json").write_text(json.dumps([{"data": str(prep)}]))
    art = collect(run)
    assert art.data_kind == kind and art.split_kind == "official" and art.data_dir == prep


def test_overlay_panel_crop(tmp_path):
    """The additive fourth panel of medattn.figures.overlay_panel shows the crop as given."""
    from medattn import figures

    img = np.zeros((40, 40), np.uint8)
    crop = np.zeros((20, 20, 1), np.uint8)
    crop[:, 10:] = 255  # right half white
    fig = figures.overlay_panel(img, np.random.default_rng(0).random((5, 5)), attn_box=[0.2, 0.2, 0.6, 0.6],
                                crop=crop, path=tmp_path / "o.png", dpi=50)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["image", "attention heat map", "overlay", "local branch input (crop)"]
    shown = panels[3].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown), crop[..., 0])
    assert Image.open(tmp_path / "o.png").size == (16 * 50, int(4.4 * 50))
    # without a crop: the three panels as before
    fig3 = figures.overlay_panel(img, np.zeros((5, 5)))
    assert len([ax for ax in fig3.axes if ax.get_title()]) == 3
