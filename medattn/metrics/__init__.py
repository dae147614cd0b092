"""Evaluation metrics: AUROC (multi-label, binary, one-vs-rest), bootstrap CIs, ROC points,
Youden operating points, Wang et al. (2017) box localisation accuracy, and what an evaluation
reports, composed from them.

One module per concept; this package re-exports the public API, so ``from medattn import metrics
as M; M.per_class_auroc(...)`` is the way to call them:

==========================  ===============================================================
``metrics.auroc``           AUROC of one task, per class, mean; one-vs-rest; accuracy; ROC points
``metrics.bootstrap``       percentile-bootstrap CIs of per-class and mean AUROC
``metrics.operating``       Youden / sensitivity-target thresholds, rates at thresholds with intervals
``metrics.calibration``     ECE (equal-width, equal-mass), Brier, reliability data, temperature scaling
``metrics.subgroups``       AUROC per sex, age band and view, with intervals and gaps
``metrics.localization``    IoU, IoBB, T(IoBB)/T(IoU) accuracy (box geometry: ``medattn.boxes``)
``metrics.accumulate``      per-batch predictions on the device -> :class:`Predictions`
``metrics.summary``         the metrics an evaluation writes (trainer validation, ``medattn eval``)
==========================  ===============================================================

Everything takes numpy arrays (torch tensors are accepted and moved to the CPU) and returns
plain floats, dicts and small dataclasses, so the results can be written to JSON/CSV as is.

Conventions used throughout:

* A *score* is anything monotone in the model's belief that the label is present (probability,
  logit); AUROC only depends on the order of the scores.
* Labels are 0/1 (bool, int or float). Anything else raises ``ValueError``.
* A metric that is undefined (a class with no positives or no negatives) is ``nan`` and a
  :class:`MetricWarning` names the class; means over classes are nan-means.
* Operating points call a sample positive when ``score >= threshold`` (the same rule as
  ``sklearn.metrics.roc_curve``).

The AUROC is computed from ranks (Mann-Whitney U): with average ranks for tied scores, a tied
positive/negative pair counts 1/2, exactly as ``sklearn.metrics.roc_auc_score``.

Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
"""
from __future__ import annotations

# Input readers shared with medattn.figures (M._scores, ...), and the resampler the tests pin.
from medattn.metrics._inputs import (MetricWarning, _as_array, _binary_labels, _eval_names,  # noqa: F401
                                     _names, _scores)
from medattn.metrics.accumulate import Accumulator, Predictions
from medattn.metrics.auroc import (accuracy, auroc, macro_auroc_ovr, mean_auroc, per_class_auroc,
                                   per_class_auroc_ovr, roc_curve_points)
from medattn.metrics.bootstrap import (BootstrapCI, _resample_indices, bootstrap_auroc_ci,  # noqa: F401
                                       group_codes, percentile_interval, resample_counts)
from medattn.metrics.calibration import (BINNINGS, N_BINS, Reliability, Temperature, apply_temperature, brier,
                                         calibration_summary, ece, fit_temperature, reliability)
from medattn.metrics.localization import (BOX_FORMATS, WANG_THRESHOLDS, LocalizationResult, box_area,
                                          box_intersection, box_iobb, box_iou, localization_accuracy, to_xyxy)
from medattn.metrics.operating import (OPERATING_POINTS, binary_report, choose_thresholds, rates_with_intervals,
                                       sensitivity_threshold, youden_threshold)
from medattn.metrics.subgroups import AGE_BANDS, age_band, normalise_sex, subgroup_auroc, subgroup_masks
from medattn.metrics.summary import (binary_metrics, classification_metrics, extras_means,
                                     localization_metrics, probability_loss)

__all__ = [
    "MetricWarning", "auroc", "per_class_auroc", "mean_auroc", "BootstrapCI", "bootstrap_auroc_ci",
    "roc_curve_points", "youden_threshold", "binary_report", "accuracy", "per_class_auroc_ovr",
    "macro_auroc_ovr", "BOX_FORMATS", "WANG_THRESHOLDS", "to_xyxy", "box_area", "box_intersection",
    "box_iou", "box_iobb", "LocalizationResult", "localization_accuracy",
    "Predictions", "Accumulator", "classification_metrics", "probability_loss", "binary_metrics",
    "localization_metrics", "extras_means", "resample_counts", "group_codes", "percentile_interval",
    "N_BINS", "BINNINGS", "Reliability", "Temperature", "reliability", "ece", "brier", "fit_temperature",
    "apply_temperature", "calibration_summary", "OPERATING_POINTS", "sensitivity_threshold",
    "choose_thresholds", "rates_with_intervals", "AGE_BANDS", "age_band", "normalise_sex", "subgroup_masks",
    "subgroup_auroc",
]
