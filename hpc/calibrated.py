"""Calibrated probabilities and binary calls for ``medattn predict --calibrated / --operating-point``
and ``medattn.load(...).predict(..., calibrated=True, operating_point=...)``.

Both come from the run's calibration record (:func:`hpc.clinical_eval.load_calibration`), which
``medattn eval`` fits on the validation split for one stage and checkpoint: per-label temperatures
(:func:`medattn.metrics.apply_temperature`) and per-label thresholds of each operating point.
Thresholds were chosen on the uncalibrated probabilities of the output branch, and a call is
``probability >= threshold`` on those; a temperature does not reorder the probabilities of a
label, so the calls are the same with or without ``--calibrated``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medattn.errors import DataError


def record_for(predictor, calibrated: bool, operating_point: str | None) -> dict[str, Any]:
    """The run's calibration record for this predictor's stage and checkpoint, checked to hold
    what was asked for (a :class:`DataError` naming the file and what to run otherwise)."""
    from hpc.clinical_eval import load_calibration

    run = predictor.run
    rec = load_calibration(run, predictor.stage, predictor.checkpoint)
    if calibrated:
        missing = [b for b in predictor.branches if b not in rec.get("temperatures", {})]
        if missing:
            raise DataError(run.calibration_path, f"no temperature for branch(es) {missing}")
    if operating_point:
        ops = rec.get("operating_points") or {}
        if operating_point not in ops.get("thresholds", {}):
            raise DataError(run.calibration_path, f"no operating point {operating_point!r} stored "
                                                  f"(have {sorted(ops.get('thresholds', {}))})")
    return rec


def apply_to_frame(predictor, df, calibrated: bool, operating_point: str | None, record: dict | None = None):
    """``df`` (from :meth:`hpc.predict.Predictor.predict`) with calibrated probability columns
    and/or ``call/<label>`` 0/1 columns (labels with a threshold) after the probabilities."""
    from medattn.metrics import Temperature, apply_temperature

    rec = record or record_for(predictor, calibrated, operating_point)
    df = df.copy()
    labels = list(predictor.labels)
    calls = {}
    if operating_point:
        ops = rec["operating_points"]
        branch = ops["branch"]
        cols = labels if branch == predictor.branch else [f"{branch}/{k}" for k in labels]
        raw = df[cols].to_numpy(np.float64) if len(df) else np.zeros((0, len(labels)))
        for j, k in enumerate(labels):
            thr = ops["thresholds"][operating_point].get(k)
            if thr is not None:
                calls[f"call/{k}"] = (raw[:, j] >= thr).astype(np.int8)
    if calibrated and len(df):
        task = rec.get("task", "multilabel")
        groups = [(predictor.branch, labels)]
        if len(predictor.branches) > 1:
            groups += [(b, [f"{b}/{k}" for k in labels]) for b in predictor.branches]
        for b, cols in groups:
            T = Temperature.from_dict(rec["temperatures"][b]).vector(labels)
            df[cols] = apply_temperature(df[cols].to_numpy(np.float64), T, task)
    for name, v in calls.items():
        df[name] = v
    df.attrs["calibrated"] = bool(calibrated)
    df.attrs["operating_point"] = operating_point
    return df
