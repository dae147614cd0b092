"""Patient-clustered bootstrap (medattn/metrics/bootstrap.py), against independent computations.

Hand-made case: every patient has k identical images (same score, same label). Resampling
patients then draws each image k times as often as its patient, and AUROC does not change when
every count is multiplied by k, so the patient-clustered interval on the k-copy data must equal,
exactly, the image-level interval on the one-copy data with the same seed (both draw
``rng.integers(0, G, size=(B, G))``). The image-level interval on the k-copy data pretends to have
k times the data and is about sqrt(k) times narrower: the known difference.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medattn import metrics as M
from medattn.metrics.bootstrap import METHOD_IMAGE, METHOD_PATIENT, MIN_POSITIVES


def _patients(g=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros((g, 2), dtype=int)
    y[: g // 2, 0] = 1
    y[::3, 1] = 1
    p = np.round(rng.random((g, 2)) * 0.6 + 0.3 * y, 3)
    return p, y


def test_identical_images_per_patient_equal_one_image_per_patient():
    p1, y1 = _patients()
    k = 4
    p4, y4 = np.repeat(p1, k, axis=0), np.repeat(y1, k, axis=0)
    groups = np.repeat(np.arange(1000, 1040), k)
    one = M.bootstrap_auroc_ci(p1, y1, ["a", "b"], n_boot=200, seed=3)
    clustered = M.bootstrap_auroc_ci(p4, y4, ["a", "b"], n_boot=200, seed=3, groups=groups)
    naive = M.bootstrap_auroc_ci(p4, y4, ["a", "b"], n_boot=200, seed=3)
    np.testing.assert_allclose(clustered.samples, one.samples, atol=1e-12)
    for c in ("a", "b"):
        assert clustered.per_class[c] == pytest.approx(one.per_class[c])
    assert clustered.mean == pytest.approx(one.mean)
    assert clustered.method == METHOD_PATIENT and clustered.n_units == 40
    assert naive.method == METHOD_IMAGE and naive.n_units == 160
    # Same point estimate, but image resampling believes it has 4x the data: about half as wide.
    assert clustered.estimate == naive.estimate
    for c in ("a", "b"):
        w_cl = clustered.per_class[c][1] - clustered.per_class[c][0]
        w_im = naive.per_class[c][1] - naive.per_class[c][0]
        assert 1.5 < w_cl / w_im < 2.7, (c, w_cl, w_im)


def test_clustered_resamples_equal_sklearn_on_explicit_patient_draws():
    """Independent numpy/sklearn: draw patients exactly as documented, expand to their images,
    compute each resample's AUROC with scikit-learn and take the percentiles."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 6, size=25)  # 25 patients with 1-5 images each
    groups = np.repeat([f"p{i:02d}" for i in range(25)], sizes)
    n = len(groups)
    y = (rng.random((n, 1)) < 0.35).astype(int)
    p = np.round(rng.random((n, 1)) * 0.7 + 0.2 * y, 2)
    ci = M.bootstrap_auroc_ci(p, y, ["x"], n_boot=120, seed=5, groups=groups)
    ids = np.unique(groups)  # sorted: the documented numbering of the groups
    rows_of = [np.flatnonzero(groups == g) for g in ids]
    draws = np.random.default_rng(5).integers(0, len(ids), size=(120, len(ids)))
    expected = np.full(120, np.nan)
    for b in range(120):
        rows = np.concatenate([rows_of[j] for j in draws[b]])
        if 0 < y[rows, 0].sum() < len(rows):
            expected[b] = roc_auc_score(y[rows, 0], p[rows, 0])
    np.testing.assert_allclose(ci.samples[:, 0], expected, atol=1e-12)
    lo, hi = np.percentile(expected[~np.isnan(expected)], [2.5, 97.5])
    assert ci.per_class["x"] == pytest.approx((lo, hi))


def test_too_few_positive_patients_get_no_interval():
    # 30 patients x 3 images; class "rare" is positive on all 3 images of 2 patients: 6 positive
    # images (enough by images) but 2 positive patients (< MIN_POSITIVES = 5): too few.
    g, k = 30, 3
    rng = np.random.default_rng(2)
    y = np.zeros((g * k, 2), dtype=int)
    y[:, 0] = np.repeat(np.arange(g) % 2, k)
    y[: 2 * k, 1] = 1
    p = rng.random((g * k, 2)) * 0.5 + 0.4 * y
    groups = np.repeat(np.arange(g), k)
    ci = M.bootstrap_auroc_ci(p, y, ["common", "rare"], n_boot=100, groups=groups)
    assert MIN_POSITIVES == 5
    assert ci.positives == {"common": 15, "rare": 2} and ci.too_few == ("rare",)
    assert all(math.isnan(v) for v in ci.per_class["rare"]) and not math.isnan(ci.estimate["rare"])
    assert not any(math.isnan(v) for v in ci.per_class["common"])
    by_image = M.bootstrap_auroc_ci(p, y, ["common", "rare"], n_boot=100)
    assert by_image.positives["rare"] == 6 and by_image.too_few == ()
    with pytest.raises(ValueError, match="one id per row"):
        M.bootstrap_auroc_ci(p, y, ["common", "rare"], n_boot=10, groups=groups[:-1])
