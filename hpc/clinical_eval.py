"""What ``medattn eval`` reports beyond AUROC, and what it stores in the run for ``predict``:

* **calibration** per branch: ECE (15 bins, equal-width and equal-mass) and Brier on the evaluated
  split before and after temperature scaling, the temperatures fitted on the validation split
  (per label for multi-label runs, one for single-label; :mod:`medattn.metrics.calibration`) and
  the pooled reliability-diagram data;
* **operating points** of the output branch: per label, thresholds chosen on the validation split
  (Youden's J, sensitivity 0.90, 0.95) and their sensitivity, specificity, PPV and NPV on the
  evaluated split with patient-clustered intervals (:mod:`medattn.metrics.operating`);
* **subgroups** of the output branch: AUROC per sex, age band and view with patient-clustered
  intervals and the largest gap per label (:mod:`medattn.metrics.subgroups`).

The temperatures and thresholds are written to the run (:attr:`hpc.run.Run.calibration_path`),
tied to the stage and checkpoint they were fitted for. Thresholds apply to the uncalibrated
probabilities (a temperature does not reorder them, so the calls are the same either way).

``hpc.evaluate`` calls :func:`validation_predictions` (on every rank) and :func:`beyond_auroc`
(on rank 0); nothing here changes the AUROC numbers.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medattn.errors import DataError
from medattn.metrics._inputs import MetricWarning

CALIBRATION_FORMAT = 1


def validation_predictions(ds, cfg, method, model, stage: str, device, world, precision: str):
    """Predictions of the validation split (rank 0; None elsewhere, or when the split is empty),
    through the same loader and inference path as the evaluated split."""
    from hpc.inference import run_inference
    from hpc.loader import EvalLoader

    idx = ds.indices("val")
    if len(idx) == 0:
        return None
    scfg = cfg.stages[stage]
    per_rank = max(1, (scfg.eval_batch_size or scfg.batch_size) // world.world_size)
    loader = EvalLoader(ds, cfg.data, idx, per_rank, world.rank, world.world_size, device, seed=cfg.seed,
                        hires=method.needs_hires(stage))
    from medattn.progress import Progress

    try:
        with Progress(len(loader), "medattn eval", desc=f"val ({stage})", unit="batch", enabled=world.is_primary) as bar:
            return run_inference(method, model, loader, stage, device, precision,
                                 channels_last=cfg.runtime.channels_last, progress=bar)
    finally:
        loader.close()


def beyond_auroc(preds, val_preds, ds, spec, branch: str, *, n_boot: int, seed: int) -> tuple[dict[str, Any], dict | None]:
    """``(metrics, calibration record)``: the metrics.json sections ``calibration``,
    ``operating_points`` and ``subgroups``, and what :func:`save_calibration` stores (None
    without validation predictions)."""
    from medattn import metrics as M

    if spec.task not in ("multilabel", "singlelabel") or not preds.probs:
        return {}, None
    names = list(spec.label_names)
    evl = list(spec.eval_labels)
    labels = ds.labels_matrix()
    y = labels[preds.index]
    out: dict[str, Any] = {}
    record: dict[str, Any] | None = None
    targets = ds.targets() if spec.task == "singlelabel" else None
    # --- calibration
    cal: dict[str, Any] = {"n_bins": M.N_BINS, "binnings": list(M.BINNINGS)}
    temps: dict[str, Any] = {}
    for b, p in preds.probs.items():
        entry: dict[str, Any] = {"before": M.calibration_summary(p, y, names, evl)}
        if val_preds is not None and b in val_preds.probs and len(val_preds.index):
            yv = labels[val_preds.index]
            t = M.fit_temperature(val_preds.probs[b], yv, names, task=spec.task,
                                  targets=None if targets is None else targets[val_preds.index])
            after = M.apply_temperature(p, t.vector(names), spec.task)
            entry["after"] = M.calibration_summary(after, y, names, evl)
            entry["temperature"] = t.to_dict()
            temps[b] = t.to_dict()
        cal[b] = entry
    if val_preds is None:
        cal["note"] = "no validation split: no temperature fitted"
    else:
        cal["fitted_on"] = {"split": "val", "n_images": int(len(val_preds.index))}
    out["calibration"] = cal
    # --- operating points (multi-label: a threshold per label)
    groups = ds.manifest["patient"].astype(str).to_numpy()[preds.index]
    p = preds.probs.get(branch)
    if p is not None and spec.task == "multilabel":
        if val_preds is None:
            out["operating_points"] = {"branch": branch, "note": "no validation split: no thresholds chosen"}
        else:
            cols = [names.index(k) for k in evl]
            chosen = M.choose_thresholds(val_preds.probs[branch][:, cols], labels[val_preds.index][:, cols], evl)
            points: dict[str, Any] = {}
            for point, per in chosen.items():
                thr = np.array([per[k]["threshold"] for k in evl], np.float64)
                r = M.rates_with_intervals(p[:, cols], y[:, cols], thr, groups=groups, n_boot=max(n_boot, 0),
                                           seed=seed)
                points[point] = {}
                for j, k in enumerate(evl):
                    e = {"threshold": _f(thr[j]), "val_sensitivity": _f(per[k]["sensitivity"]),
                         "val_specificity": _f(per[k]["specificity"])}
                    for rate in M.operating.RATES:
                        e[rate] = _f(r[rate][j])
                        e[f"{rate}_ci"] = [_f(r[f"{rate}_ci"][0, j]), _f(r[f"{rate}_ci"][1, j])]
                    e.update(tp=int(r["tp"][j]), fp=int(r["fp"][j]), fn=int(r["fn"][j]), tn=int(r["tn"][j]),
                             too_few=bool(r["too_few"][j]))
                    points[point][k] = e
            out["operating_points"] = {
                "branch": branch, "chosen_on": "val", "rule": "positive when probability >= threshold",
                "targets": {k: v for k, v in M.OPERATING_POINTS.items()}, "points": points,
                "interval": "patient-clustered percentile bootstrap" if n_boot > 0 else None, "n_boot": n_boot}
    # --- subgroups
    if p is not None:
        man = ds.manifest.iloc[preds.index]
        sex = man["sex"].to_numpy() if "sex" in man.columns else None
        age = man["age"].to_numpy(np.float64) if "age" in man.columns else None
        view = man["view"].to_numpy() if "view" in man.columns else None
        masks = M.subgroup_masks(sex, age, view)
        masks = {a: g for a, g in masks.items() if any(m.any() for m in g.values())}  # attribute absent: left out
        if masks:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)
                sg = M.subgroup_auroc(p, y, names, evl, masks, groups, n_boot=n_boot, seed=seed)
            sg["branch"] = branch
            out["subgroups"] = sg
        else:
            out["subgroups"] = {"branch": branch, "note": "the data carry no sex, age or view"}
    if temps or "operating_points" in out and "points" in out["operating_points"]:
        record = {"format": CALIBRATION_FORMAT, "fitted_on": "val", "task": spec.task, "labels": names,
                  "temperatures": temps}
        if "points" in out.get("operating_points", {}):
            record["operating_points"] = {
                "branch": branch,
                "thresholds": {pt: {k: v["threshold"] for k, v in per.items()}
                               for pt, per in out["operating_points"]["points"].items()}}
    return out, record


def save_calibration(run, record: dict[str, Any], stage: str, checkpoint: str | Path, data: str | None) -> Path:
    """Write the record to the run, tied to the stage and checkpoint (``best``/``last``) it was fitted for."""
    from medattn.fileio import write_text as atomic_write_text

    rec = dict(record, stage=stage, checkpoint=Path(checkpoint).stem, data=data)
    atomic_write_text(run.calibration_path, json.dumps(rec, indent=2))
    return run.calibration_path


def load_calibration(run, stage: str, checkpoint: str | Path) -> dict[str, Any]:
    """The stored record for this stage and checkpoint; a :class:`DataError` naming what to run
    when there is none or it was fitted for another model."""
    path = run.calibration_path
    if not path.is_file():
        raise DataError(path, "no calibration stored in this run: run `medattn eval --run RUN` first "
                              "(it fits temperatures and thresholds on the validation split)")
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"unreadable calibration file: {e}") from None
    kind = Path(checkpoint).stem
    if rec.get("stage") != stage or rec.get("checkpoint") != kind:
        raise DataError(path, f"calibration was fitted for stage {rec.get('stage')!r} ({rec.get('checkpoint')} "
                              f"checkpoint), not {stage!r} ({kind}); run `medattn eval --run RUN --stage {stage}`")
    return rec


def _f(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the eval's printed summary: calibration before/after, subgroup gaps."""
    lines = []
    cal = result.get("calibration") or {}
    branches = [b for b in result.get("auroc", {}) if b in cal]
    for b in branches[-1:]:
        e = cal[b]
        bef, aft = e.get("before") or {}, e.get("after") or {}
        s = (f"calibration ({b}, mean over labels): ECE equal-width {_fmt((bef.get('ece_equal_width') or {}).get('mean'))}"
             f", equal-mass {_fmt((bef.get('ece_equal_mass') or {}).get('mean'))}, Brier "
             f"{_fmt((bef.get('brier') or {}).get('mean'))}")
        if aft:
            s += (f"; after the validation temperature: {_fmt(aft['ece_equal_width'].get('mean'))}, "
                  f"{_fmt(aft['ece_equal_mass'].get('mean'))}, {_fmt(aft['brier'].get('mean'))}")
        lines.append(s)
    gaps = (result.get("subgroups") or {}).get("largest_gap") or {}
    big = [(k, g) for k, g in gaps.items() if g]
    if big:
        k, g = max(big, key=lambda kv: kv[1]["gap"])
        lines.append(f"largest subgroup AUROC gap: {k}, {g['attribute']} {g['high']} vs {g['low']}: {g['gap']:.3f}")
    if (result.get("operating_points") or {}).get("points"):
        lines.append("operating points (youden, sens90, sens95; chosen on val) and subgroups: see metrics.json "
                     "or the report; temperatures and thresholds stored in the run")
    return lines


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
