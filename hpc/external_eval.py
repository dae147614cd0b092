"""External validation: a run trained on ChestX-ray14 evaluated on another hospital's data.

  medattn eval --run runs/r50 --dataset chexpert --root /data/CheXpert-v1.0-small
  medattn eval --run runs/r50 --dataset mimic --root /data/mimic-cxr-jpg/2.0.0 --external-split test
  medattn eval --run runs/r50 --dataset padchest --root /data/padchest --views all

The dataset is read in its published layout (:mod:`medattn.data.external`: label map, uncertain
policy, frontal films by default); every image goes through the path of ``medattn predict``
(:class:`hpc.predict.Predictor`: decoded and resized as ``medattn prepare`` would, the loaders'
evaluation view, the method's own prediction), so no prepare step is needed. For each ChestX-ray14
label the dataset shares, per branch: AUROC over the images labelled for it (an uncertain label
ignored under ``--uncertain ignore``) with a patient-clustered percentile-bootstrap interval,
and, when the run holds a temperature for this model (``medattn eval`` on its own test split
stores one), ECE and Brier before and after it.

Writes RUN/eval/external-<dataset>/metrics.json and preds.csv (one row per image: path, patient,
view, the output branch's probability and the label of each shared label, NaN where not counted).
Unreadable image files are named on stderr and counted in metrics.json; if none can be read,
nothing is written (exit 2).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medattn.data.external import DATASETS, UNCERTAIN_POLICIES, VIEW_CHOICES, read_external
from medattn.errors import DataError, MedattnError
from medattn.metrics._inputs import MetricWarning


def add_external_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("external validation (docs/evaluation.md)")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="evaluate on an external dataset in its published layout instead of a split")
    g.add_argument("--root", default=None, help="the dataset's folder (CheXpert: the one with train.csv/valid.csv)")
    g.add_argument("--external-split", default=None,
                   help="chexpert: valid (default) or train; mimic: test (default), validate, train or all; padchest: all")
    g.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                   help="uncertain (-1.0) labels: left out of that label's AUROC (ignore), positive or negative")
    g.add_argument("--views", choices=VIEW_CHOICES, default="frontal",
                   help="frontal films only (default; laterals are counted and reported) or all")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when there is one")
    g.add_argument("--batch", type=int, default=32, help="images per forward pass")


def run_external(args: argparse.Namespace) -> int:
    if not args.root:
        raise MedattnError("--dataset needs --root DIR (the dataset's folder)")
    return evaluate_external(args.run, args.dataset, args.root, split=args.external_split, uncertain=args.uncertain,
                             views=args.views, stage=args.stage, checkpoint=args.checkpoint, bootstrap=args.bootstrap,
                             device=args.device, batch=args.batch, out_dir=args.out_dir)


def evaluate_external(run_dir: str, dataset: str, root: str, split: str | None = None, uncertain: str = "ignore",
                      views: str = "frontal", stage: str | None = None, checkpoint: str = "best",
                      bootstrap: int = 1000, device: str = "auto", batch: int = 32, out_dir: str | None = None,
                      log=print) -> int:
    from hpc.predict import load
    from hpc.run import Run

    if batch < 1:
        raise MedattnError(f"--batch must be at least 1, got {batch}")
    run = Run(run_dir).require()
    ext = read_external(dataset, root, split, uncertain, views)  # bad layout: exit 2, nothing written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # synthetic runs: said in the output instead
        pred = load(run.root, stage, checkpoint, device)
    shared = [k for k in ext.label_names if k in pred.labels]
    if not shared:
        raise DataError(ext.root, f"the run's labels {pred.labels} share none of {dataset}'s mapped labels "
                                  f"{ext.label_names}")
    cols = [pred.labels.index(k) for k in shared]
    ycols = [ext.label_names.index(k) for k in shared]
    t0 = time.time()
    probs: dict[str, list[np.ndarray]] = {b: [] for b in pred.branches}
    ok_rows, failed = [], []
    from medattn.progress import Progress

    bar = Progress(len(ext.paths), "medattn eval", desc=dataset, unit="img")
    for i, (name, pr, err) in enumerate(pred.iter_predictions(ext.paths, batch, errors="skip")):
        bar.update(1)
        if pr is None:
            failed.append(name)
            bar.line(f"error: {err}")
            continue
        ok_rows.append(i)
        for b in pred.branches:
            probs[b].append(np.asarray(pr.probs[b], np.float64))
    bar.close()
    elapsed = time.time() - t0
    if not ok_rows:
        raise DataError(ext.root, f"none of the {len(ext)} images of {dataset} could be read (first: {failed[:1]})")
    rows = np.asarray(ok_rows)
    P = {b: np.stack(v)[:, cols] for b, v in probs.items()}
    Y = ext.labels[rows][:, ycols]
    patients = ext.patient[rows]
    seed = int(pred.cfg.seed)
    result: dict[str, Any] = {
        "kind": "external", **ext.describe(), "n_images_evaluated": int(len(rows)), "n_unreadable": len(failed),
        "unreadable": failed[:20], "stage": pred.stage, "checkpoint": str(pred.checkpoint), "method": pred.method.name,
        "output_branch": pred.branch, "shared_labels": shared,
        "mean_over": [k for k in shared if k in pred.spec.eval_labels],
        "synthetic_run": bool(pred.synthetic), "bootstrap": bootstrap, "time_s": elapsed,
        "auroc": {}, "auroc_ci": {}, "per_label": {},
    }
    result["n_patients_evaluated"] = int(len(np.unique(patients)))
    for b, p in P.items():
        result["auroc"][b], result["auroc_ci"][b], per = _label_auroc(p, Y, shared, patients, bootstrap, seed)
        vals = [result["auroc"][b][k] for k in result["mean_over"] if result["auroc"][b][k] is not None]
        result["auroc"][b]["mean"] = float(np.mean(vals)) if vals else None
        if b == pred.branch:
            result["per_label"] = per
    cal = _calibration(run, pred, P, Y, shared)
    if cal is not None:
        result["calibration"] = cal
    out = run.external_evaluation(dataset, out_dir)
    _write(out, result, ext, rows, P[pred.branch], Y, shared)
    _print(result, out, log)
    return 0


def _label_auroc(p: np.ndarray, y: np.ndarray, names: list[str], patients: np.ndarray, n_boot: int, seed: int):
    """Per label, over the images labelled for it (NaN = not counted): AUROC, interval, counts."""
    from medattn import metrics as M

    est, ci, per = {}, {}, {}
    for j, k in enumerate(names):
        m = ~np.isnan(y[:, j])
        yy = y[m, j].astype(bool)
        entry: dict[str, Any] = {"n_labelled": int(m.sum()), "n_positive": int(yy.sum()),
                                 "positive_patients": int(len(np.unique(patients[m][yy])))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            if m.sum() and 0 < yy.sum() < m.sum() and n_boot > 0:
                c = M.bootstrap_auroc_ci(p[m, j:j + 1], yy[:, None], [k], n_boot=n_boot, seed=seed, groups=patients[m])
                est[k] = _f(c.estimate[k])
                ci[k] = [_f(c.per_class[k][0]), _f(c.per_class[k][1])]
                entry["too_few"] = k in c.too_few
            else:
                est[k] = _f(M.auroc(p[m, j], yy)) if m.sum() else None
                ci[k] = [None, None]
                entry["too_few"] = True
        per[k] = entry
    return est, ci, per


def _calibration(run, pred, P, Y, shared) -> dict[str, Any] | None:
    """ECE and Brier per shared label before/after the run's stored temperature (None without one)."""
    from hpc.clinical_eval import load_calibration
    from medattn import metrics as M

    try:
        rec = load_calibration(run, pred.stage, pred.checkpoint)
    except DataError:
        return None
    out: dict[str, Any] = {"temperature_from": str(run.calibration_path), "n_bins": M.N_BINS}
    for b, p in P.items():
        t = rec.get("temperatures", {}).get(b)
        if not t or rec.get("task") != "multilabel":
            continue
        T = M.Temperature.from_dict(t).vector(shared)
        after = M.apply_temperature(p, T)
        entry: dict[str, Any] = {}
        for j, k in enumerate(shared):
            m = ~np.isnan(Y[:, j])
            if not m.any():
                continue
            y = Y[m, j].astype(bool)
            entry[k] = {
                "ece_equal_width": [_f(M.ece(p[m, j], y)), _f(M.ece(after[m, j], y))],
                "ece_equal_mass": [_f(M.ece(p[m, j], y, binning="equal-mass")),
                                   _f(M.ece(after[m, j], y, binning="equal-mass"))],
                "brier": [_f(M.brier(p[m, j], y)), _f(M.brier(after[m, j], y))],
            }
        out[b] = {"before_after": entry}
    return out


def _write(out, result: dict[str, Any], ext, rows: np.ndarray, p: np.ndarray, y: np.ndarray,
           shared: list[str]) -> None:
    import pandas as pd

    from medattn.fileio import write_text as atomic_write_text

    out.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.metrics_path, json.dumps(result, indent=2, default=_json_default))
    df = pd.DataFrame({"path": [ext.paths[i] for i in rows], "patient": ext.patient[rows], "view": ext.view[rows]})
    for j, k in enumerate(shared):
        df[f"p_{k}"] = p[:, j]
    for j, k in enumerate(shared):
        df[f"y_{k}"] = y[:, j]
    atomic_write_text(out.preds_path, df.to_csv(index=False, float_format="%.6g"))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _print(result: dict[str, Any], out, log) -> None:
    b = result["output_branch"]
    log(f"\nexternal validation on {result['dataset']} ({result['split']}, {result['views']} films: "
        f"{result['n_images_evaluated']} images of {result['n_patients_evaluated']} patients; "
        f"{result['n_lateral']} laterals {'evaluated' if result['laterals_evaluated'] else 'counted, not evaluated'}; "
        f"uncertain labels: {result['uncertain_policy']}), branch {b}:\n")
    log("| label | AUROC [95% CI] | labelled | positive |")
    log("|---|---|---|---|")
    for k in result["shared_labels"]:
        lo, hi = result["auroc_ci"][b][k]
        e = result["per_label"][k]
        ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else " (too few for an interval)"
        log(f"| {k} | {_fmt(result['auroc'][b][k])}{ci} | {e['n_labelled']} | {e['n_positive']} |")
    log(f"| **mean** ({', '.join(result['mean_over'])}) | **{_fmt(result['auroc'][b]['mean'])}** | | |")
    if result["synthetic_run"]:
        log("\nnote: this run was trained on synthetic images")
    log(f"\nwrote {out.metrics_path}, {out.preds_path}")


def _f(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v
