"""medattn.metrics: hand-computed cases, and agreement with sklearn / torchvision on random data."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from sklearn.metrics import roc_auc_score, roc_curve

from medattn import metrics as M
from medattn.data.labels import DISEASES, NIH_LABELS, canonical_label


# --------------------------------------------------------------------------------------------
# auroc
# --------------------------------------------------------------------------------------------
def test_auroc_hand_computed():
    # Positive 0.35 beats negative 0.1 but not 0.4; positive 0.8 beats both: 3 of 4 pairs.
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auroc_ties_count_half():
    assert M.auroc([0.5, 0.5], [0, 1]) == 0.5
    assert M.auroc([0.3] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    # pos 0.5: beats neg 0.2 (1) and ties neg 0.5 (1/2); pos 0.9 beats both (2): 3.5 / 4.
    assert M.auroc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == 0.875


def test_auroc_accepts_bool_float_and_torch():
    s = [0.1, 0.4, 0.35, 0.8]
    assert M.auroc(np.array(s), np.array([False, False, True, True])) == 0.75
    assert M.auroc(s, [0.0, 0.0, 1.0, 1.0]) == 0.75
    assert M.auroc(torch.tensor(s, requires_grad=True), torch.tensor([0, 0, 1, 1])) == 0.75


@pytest.mark.parametrize("seed,prevalence,decimals", [(0, 0.5, 6), (1, 0.05, 2), (2, 0.002, 1),
                                                      (3, 0.3, 0)])
def test_auroc_equals_sklearn_on_random_data(seed, prevalence, decimals):
    # Rounding creates many ties (decimals=0 leaves a handful of distinct scores).
    rng = np.random.default_rng(seed)
    y = rng.random(5000) < prevalence
    y[:2] = [True, False]
    s = np.round(rng.normal(size=5000) + 0.8 * y, decimals)
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_undefined_is_nan_with_warning():
    with pytest.warns(M.MetricWarning, match="'Hernia'.*no positives"):
        assert math.isnan(M.auroc([0.1, 0.2], [0, 0], name="Hernia"))
    with pytest.warns(M.MetricWarning, match="no negatives"):
        assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))


@pytest.mark.parametrize("scores,labels,match", [
    ([0.1, 0.2], [0, 2], "0 or 1"),
    ([0.1, float("nan")], [0, 1], "non-finite"),
    ([0.1, 0.2, 0.3], [0, 1], "3 rows but labels has 2"),
    ([[0.1, 0.2]], [[0, 1]], "1-D"),
])
def test_auroc_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        M.auroc(scores, labels)


# --------------------------------------------------------------------------------------------
# per-class and mean
# --------------------------------------------------------------------------------------------
def test_per_class_auroc_and_mean_over_eval_labels():
    probs = np.array([[0.1, 0.9, 0.2], [0.4, 0.1, 0.3], [0.35, 0.8, 0.9], [0.8, 0.2, 0.1]])
    labels = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]])
    names = ["A", "B", "No Finding"]
    pc = M.per_class_auroc(probs, labels, names)
    # No Finding: positive 0.3 beats negative 0.2 only, positive 0.1 beats none: 1 of 4.
    assert pc == {"A": 0.75, "B": 1.0, "No Finding": 0.25}
    # eval_labels picks (and orders) the columns; the mean never sees No Finding.
    ev = M.per_class_auroc(probs, labels, names, eval_labels=["B", "A"])
    assert list(ev) == ["B", "A"]
    assert M.mean_auroc(pc, ["A", "B"]) == pytest.approx(0.875)
    assert M.mean_auroc(pc) == pytest.approx((0.75 + 1.0 + 0.25) / 3)


def test_mean_auroc_ignores_nan_classes():
    assert M.mean_auroc({"a": 0.8, "b": math.nan, "c": 0.6}) == pytest.approx(0.7)
    with pytest.warns(M.MetricWarning):
        assert math.isnan(M.mean_auroc({"a": math.nan}))
    with pytest.raises(ValueError, match="Hernia"):
        M.mean_auroc({"a": 0.8}, ["a", "Hernia"])


def test_per_class_auroc_nih_layout_matches_sklearn():
    rng = np.random.default_rng(5)
    y = (rng.random((3000, 15)) < 0.08).astype(np.int64)
    p = np.clip(rng.random((3000, 15)) * 0.7 + 0.25 * y, 0, 1).astype(np.float32)
    pc = M.per_class_auroc(p, y, NIH_LABELS, eval_labels=DISEASES)
    assert list(pc) == list(DISEASES)
    for j, name in enumerate(DISEASES):
        assert pc[name] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)


def test_per_class_auroc_bad_input():
    with pytest.raises(ValueError, match="shape"):
        M.per_class_auroc(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="2 names but the arrays have 3"):
        M.per_class_auroc(np.zeros((4, 3)), np.zeros((4, 3)), ["a", "b"])
    with pytest.raises(ValueError, match=r"\['Hernia'\]"):
        M.per_class_auroc(np.zeros((4, 2)), np.zeros((4, 2)), ["a", "b"], ["Hernia"])


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------
def _toy(n, l, seed=0, prevalence=0.2):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, l)) < prevalence).astype(int)
    p = np.round(rng.random((n, l)) * 0.6 + 0.3 * y, 2)  # rounded: ties inside resamples
    return p, y


def test_bootstrap_samples_equal_sklearn_on_explicit_resamples():
    p, y = _toy(60, 3, seed=1)
    names = ["a", "b", "c"]
    ci = M.bootstrap_auroc_ci(p, y, names, n_boot=40, seed=7)
    idx = np.concatenate(list(M._resample_indices(60, 40, 7)))
    assert idx.shape == (40, 60)
    expected = np.full((40, 3), np.nan)
    for r in range(40):
        for j in range(3):
            yy, pp = y[idx[r], j], p[idx[r], j]
            if 0 < yy.sum() < yy.size:
                expected[r, j] = roc_auc_score(yy, pp)
    np.testing.assert_allclose(ci.samples, expected, atol=1e-12)
    lo, hi = np.percentile(expected[:, 0][~np.isnan(expected[:, 0])], [2.5, 97.5])
    assert ci.per_class["a"] == pytest.approx((lo, hi))
    mean = np.nanmean(expected, axis=1)
    assert ci.mean == pytest.approx(tuple(np.percentile(mean, [2.5, 97.5])))


def test_bootstrap_ci_properties():
    p, y = _toy(800, 4, seed=2)
    names = ["a", "b", "c", "d"]
    ci = M.bootstrap_auroc_ci(p, y, names, eval_labels=["a", "b", "c"], n_boot=300, seed=0)
    assert list(ci.per_class) == ["a", "b", "c"]
    assert ci.samples.shape == (300, 3)
    for k, (lo, hi) in ci.per_class.items():
        assert lo < ci.estimate[k] < hi
        assert ci.estimate[k] == M.auroc(p[:, names.index(k)], y[:, names.index(k)])
    assert ci.mean[0] < ci.mean_estimate < ci.mean[1]
    assert ci.mean_estimate == pytest.approx(M.mean_auroc(ci.estimate))
    # Same seed, same answer; another seed, another answer; a 90% CI is narrower than a 95% one.
    again = M.bootstrap_auroc_ci(p, y, names, eval_labels=["a", "b", "c"], n_boot=300, seed=0)
    assert again.per_class == ci.per_class
    other = M.bootstrap_auroc_ci(p, y, names, eval_labels=["a", "b", "c"], n_boot=300, seed=1)
    assert other.per_class != ci.per_class
    ci90 = M.bootstrap_auroc_ci(p, y, names, eval_labels=["a", "b", "c"], n_boot=300, seed=0,
                                alpha=0.10)
    assert ci90.per_class["a"][0] > ci.per_class["a"][0]
    assert ci90.per_class["a"][1] < ci.per_class["a"][1]
    # Ten times the data: the interval shrinks by about sqrt(10).
    p2, y2 = _toy(8000, 4, seed=2)
    big = M.bootstrap_auroc_ci(p2, y2, names, n_boot=300, seed=0)
    w_small = ci.per_class["a"][1] - ci.per_class["a"][0]
    w_big = big.per_class["a"][1] - big.per_class["a"][0]
    assert 2.0 < w_small / w_big < 5.0


def test_bootstrap_class_without_positives():
    p, y = _toy(200, 3, seed=3)
    y[:, 2] = 0
    with pytest.warns(M.MetricWarning, match="'c'"):
        ci = M.bootstrap_auroc_ci(p, y, ["a", "b", "c"], n_boot=50)
    assert all(math.isnan(v) for v in ci.per_class["c"])
    assert np.isnan(ci.samples[:, 2]).all()
    # The mean is over the classes that have an AUROC.
    np.testing.assert_allclose(ci.mean_samples, ci.samples[:, :2].mean(axis=1))


def test_bootstrap_rare_class_resamples_without_positives_are_left_out():
    rng = np.random.default_rng(4)
    p = rng.random((300, 1))
    y = np.zeros((300, 1), dtype=int)
    y[0] = 1  # one positive: about 37% of resamples miss it
    ci = M.bootstrap_auroc_ci(p, y, ["rare"], n_boot=200, seed=0)
    frac_nan = np.isnan(ci.samples).mean()
    assert 0.25 < frac_nan < 0.5
    # Fewer than MIN_POSITIVES (5) positives: marked too few, no (conditional, too narrow) interval.
    assert ci.too_few == ("rare",) and ci.positives == {"rare": 1}
    assert all(math.isnan(v) for v in ci.per_class["rare"])
    ci = M.bootstrap_auroc_ci(p, y, ["rare"], n_boot=200, seed=0, min_positives=1)
    assert ci.too_few == () and not any(math.isnan(v) for v in ci.per_class["rare"])


def test_bootstrap_bad_arguments():
    p, y = _toy(20, 2)
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_auroc_ci(p, y, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_auroc_ci(p, y, alpha=1.5)


def test_bootstrap_at_full_size():
    # The size of the official test split's evaluation: 25,596 images x 14 diseases, rare classes
    # included. Its speed is not asserted here (timed tests fail on a loaded machine); it takes a
    # few seconds on a 2-core VM.
    rng = np.random.default_rng(0)
    y = (rng.random((25_596, 14)) < np.linspace(0.002, 0.2, 14)).astype(np.int8)
    p = rng.random((25_596, 14)).astype(np.float32) * 0.6 + 0.3 * y
    ci = M.bootstrap_auroc_ci(p, y, DISEASES, n_boot=1000, seed=0)
    assert ci.samples.shape == (1000, 14) and not np.isnan(ci.samples).any()


# --------------------------------------------------------------------------------------------
# ROC points, Youden, binary report
# --------------------------------------------------------------------------------------------
def test_roc_curve_points_hand_computed():
    fpr, tpr, thr = M.roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], drop_intermediate=False)
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("decimals", [1, 3])
def test_roc_curve_points_equal_sklearn(drop, decimals):
    rng = np.random.default_rng(decimals)
    y = rng.random(2000) < 0.3
    s = np.round(rng.normal(size=2000) + y, decimals)
    fpr, tpr, thr = M.roc_curve_points(s, y, drop_intermediate=drop)
    efpr, etpr, ethr = roc_curve(y, s, drop_intermediate=drop)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    np.testing.assert_array_equal(thr, ethr)
    # The trapezoid under the points is the AUROC (ties are straight segments = 1/2 credit).
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auroc(s, y), abs=1e-12)


def test_youden_threshold_hand_computed():
    # J along the curve: 0, .5 (thr .8), 0, .5 (thr .35), 0 -> the first maximum, threshold 0.8.
    assert M.youden_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == (0.8, 0.5, 1.0, 0.5)
    thr, sens, spec, j = M.youden_threshold([0.1, 0.2, 0.6, 0.7, 0.3, 0.9], [0, 0, 1, 1, 0, 1])
    assert (thr, sens, spec, j) == (0.6, 1.0, 1.0, 1.0)


def test_youden_threshold_matches_sklearn_argmax():
    rng = np.random.default_rng(9)
    y = rng.random(3000) < 0.4
    s = np.round(rng.normal(size=3000) + y, 2)
    fpr, tpr, thr = roc_curve(y, s)
    t, sens, spec, j = M.youden_threshold(s, y)
    assert j == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert t == thr[np.argmax(tpr - fpr)]  # no tie in J here
    assert sens == pytest.approx(np.mean(s[y] >= t))
    assert spec == pytest.approx(np.mean(s[~y] < t))


def test_youden_threshold_exact_ties_go_to_the_highest_threshold():
    # J = 1/3 at 0.8 (tpr 1/3, fpr 0) and at 0.35 (tpr 1, fpr 2/3); in floats the second is
    # 0.33333333333333337 and argmax(tpr - fpr) would pick it.
    s, y = [0.1, 0.4, 0.35, 0.8, 0.6, 0.55], [0, 0, 1, 1, 0, 1]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    assert thr[np.argmax(tpr - fpr)] == 0.35
    assert M.youden_threshold(s, y) == (0.8, pytest.approx(1 / 3), 1.0, pytest.approx(1 / 3))


def test_binary_report_hand_computed():
    s = [0.1, 0.4, 0.35, 0.8, 0.6, 0.55]
    y = [0, 0, 1, 1, 0, 1]
    r = M.binary_report(s, y)
    # Positives .35/.8/.55 beat 1/3/2 of the negatives .1/.4/.6: 6 of 9 pairs.
    assert r["auroc"] == pytest.approx(6 / 9)
    assert (r["n"], r["n_pos"], r["n_neg"]) == (6, 3, 3)
    a = r["at_threshold"]
    # >= 0.5: .8 .6 .55 -> tp 2 (.8, .55), fp 1 (.6), fn 1 (.35), tn 2.
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 1, 2)
    assert a["accuracy"] == pytest.approx(4 / 6)
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(2 / 3)
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["youden_j"] == pytest.approx(1 / 3)
    assert a["fdr"] == pytest.approx(1 / 3) and a["for"] == pytest.approx(1 / 3)
    assert a["discriminant_power"] == pytest.approx(math.sqrt(3) / math.pi * 2 * math.log(2))
    # Youden: J = 1/3 first at threshold 0.8 (tp 1, tn 3).
    b = r["at_youden"]
    assert b["threshold"] == 0.8
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (1, 0, 2, 3)
    assert b["sensitivity"] == pytest.approx(1 / 3) and b["specificity"] == 1.0
    assert b["youden_j"] == pytest.approx(1 / 3)
    assert b["discriminant_power"] == math.inf
    # A two-column softmax gives the same report (column 1 is the positive class).
    soft = np.stack([1 - np.array(s), np.array(s)], axis=1)
    assert M.binary_report(soft, y) == r


def test_binary_report_one_class_only():
    with pytest.warns(M.MetricWarning):
        r = M.binary_report([0.2, 0.7], [0, 0])
    assert math.isnan(r["auroc"]) and r["at_youden"] is None
    assert math.isnan(r["at_threshold"]["sensitivity"])
    assert r["at_threshold"]["specificity"] == 0.5


# --------------------------------------------------------------------------------------------
# single-label (softmax)
# --------------------------------------------------------------------------------------------
def test_accuracy_hand_computed():
    logits = [[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]
    assert M.accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert M.accuracy(torch.tensor(logits).softmax(1), torch.tensor([0, 1, 0])) == 1.0
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        M.accuracy(logits, [0, 1, 2])
    with pytest.raises(ValueError, match="shape"):
        M.accuracy(logits, [0, 1])


def test_ovr_auroc_equals_sklearn():
    rng = np.random.default_rng(11)
    t = rng.integers(0, 5, size=1000)  # 5 DR grades
    logits = rng.normal(size=(1000, 5)) + 1.5 * np.eye(5)[t]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["0 none", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
    pc = M.per_class_auroc_ovr(probs, t, names)
    assert list(pc) == names
    for c, n in enumerate(names):
        assert pc[n] == pytest.approx(roc_auc_score(t == c, probs[:, c]), abs=1e-12)
    macro = roc_auc_score(t, probs, multi_class="ovr", average="macro")
    assert M.macro_auroc_ovr(probs, t) == pytest.approx(macro, abs=1e-12)
    assert M.macro_auroc_ovr(logits, t, from_logits=True) == pytest.approx(macro, abs=1e-12)
    with pytest.raises(ValueError, match="from_logits"):
        M.macro_auroc_ovr(logits, t)


def test_ovr_auroc_absent_class_is_nan():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    with pytest.warns(M.MetricWarning, match="'2'"):
        pc = M.per_class_auroc_ovr(probs, [0, 1, 0, 1])
    assert pc["0"] == 1.0 and pc["1"] == 1.0 and math.isnan(pc["2"])
    with pytest.warns(M.MetricWarning):
        assert M.macro_auroc_ovr(probs, [0, 1, 0, 1]) == 1.0


# --------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------
def test_box_overlaps_hand_computed():
    p, g = [0, 0, 10, 10], [5, 5, 10, 10]
    # xywh: P = [0,10]^2, G = [5,15]^2: intersection 5x5 = 25, union 100 + 100 - 25 = 175.
    assert M.box_intersection(p, g, fmt="xywh") == 25
    assert M.box_iou(p, g, fmt="xywh") == pytest.approx(25 / 175)
    assert M.box_iobb(p, g, fmt="xywh") == pytest.approx(25 / 100)
    # xyxy: G = [5,10]^2 lies inside P: intersection 25, union 100.
    assert M.box_iou(p, g, fmt="xyxy") == pytest.approx(0.25)
    assert M.box_iobb(p, g, fmt="xyxy") == pytest.approx(0.25)
    # IoBB is not symmetric: a small prediction inside the ground truth scores 1.
    assert M.box_iobb([2, 2, 2, 2], [0, 0, 10, 10], fmt="xywh") == 1.0
    assert M.box_iou([2, 2, 2, 2], [0, 0, 10, 10], fmt="xywh") == pytest.approx(4 / 100)
    assert M.box_iobb([0, 0, 10, 10], [2, 2, 2, 2], fmt="xywh") == pytest.approx(4 / 100)
    # Disjoint, touching and zero-area boxes.
    assert M.box_iou([0, 0, 1, 1], [5, 5, 1, 1], fmt="xywh") == 0
    assert M.box_iou([0, 0, 1, 1], [1, 0, 1, 1], fmt="xywh") == 0
    assert M.box_iobb([3, 3, 0, 0], [0, 0, 10, 10], fmt="xywh") == 0
    np.testing.assert_array_equal(M.to_xyxy([[1, 2, 3, 4]], "xywh"), [[1, 2, 4, 6]])


def test_box_overlaps_broadcast_and_match_torchvision():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 900, size=(30, 2))
    p = np.concatenate([xy, xy + rng.uniform(1, 300, size=(30, 2))], axis=1)
    xy = rng.uniform(0, 900, size=(20, 2))
    g = np.concatenate([xy, xy + rng.uniform(1, 300, size=(20, 2))], axis=1)
    iou = M.box_iou(p[:, None], g[None], fmt="xyxy")
    assert iou.shape == (30, 20)
    expected = torchvision.ops.box_iou(torch.from_numpy(p), torch.from_numpy(g)).numpy()
    np.testing.assert_allclose(iou, expected, atol=1e-12)
    inter = M.box_intersection(p[:, None], g[None], fmt="xyxy")
    np.testing.assert_allclose(M.box_iobb(p[:, None], g[None], fmt="xyxy"),
                               inter / M.box_area(p, fmt="xyxy")[:, None])
    # Elementwise pairs, and the same pairs given as xywh.
    pw = np.concatenate([p[:20, :2], p[:20, 2:] - p[:20, :2]], axis=1)
    gw = np.concatenate([g[:, :2], g[:, 2:] - g[:, :2]], axis=1)
    np.testing.assert_allclose(M.box_iou(pw, gw, fmt="xywh"), np.diag(iou[:20]))


@pytest.mark.parametrize("box,fmt,match", [
    ([0, 0, 1, 1], "cxcywh", "not one of"),
    ([0, 0, -1, 1], "xywh", "negative width"),
    ([5, 0, 1, 1], "xyxy", "negative width"),
    ([0, 0, 1], "xyxy", r"\(\.\.\., 4\)"),
    ([0, 0, float("inf"), 1], "xyxy", "non-finite"),
])
def test_box_bad_input(box, fmt, match):
    with pytest.raises(ValueError, match=match):
        M.box_iou(box, [0, 0, 1, 1], fmt=fmt)


# --------------------------------------------------------------------------------------------
# localisation accuracy
# --------------------------------------------------------------------------------------------
GT_IMAGES = ["A", "B", "B", "C"]
GT_LABELS = ["Mass", "Nodule", "Mass", "Nodule"]
GT_BOXES = [[0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 20, 20], [50, 50, 10, 10]]  # xywh


def test_localization_accuracy_one_box_per_image_hand_computed():
    # A: P=[0,0,10,10]+5 vs G -> IoBB 25/100. B: P=[0,0,5,5] lies inside the Nodule box
    # (IoBB 1) and misses the Mass box (0). C: no prediction -> a miss with overlap 0.
    pred = {"A": [5, 5, 10, 10], "B": [0, 0, 5, 5]}
    r = M.localization_accuracy(pred, GT_BOXES, GT_LABELS, GT_IMAGES, fmt="xywh",
                                thresholds=(0.1, 0.25, 0.9))
    np.testing.assert_allclose(r.overlaps, [0.25, 1.0, 0.0, 0.0])
    assert r.classes == ("Mass", "Nodule")
    assert r.accuracy["Mass"] == {0.1: 0.5, 0.25: 0.0, 0.9: 0.0}  # 0.25 > 0.25 is false
    assert r.accuracy["Nodule"] == {0.1: 0.5, 0.25: 0.5, 0.9: 0.5}
    assert r.overall == {0.1: 0.5, 0.25: 0.25, 0.9: 0.25}
    assert r.macro == {0.1: 0.5, 0.25: 0.25, 0.9: 0.25}
    assert r.mean_overlap == {"Mass": 0.125, "Nodule": 0.5}
    assert r.overall_mean_overlap == pytest.approx(0.3125)
    assert r.n_boxes == {"Mass": 2, "Nodule": 2}
    assert r.n_missing == {"Mass": 0, "Nodule": 1}
    iou = M.localization_accuracy(pred, GT_BOXES, GT_LABELS, GT_IMAGES, fmt="xywh",
                                  metric="iou", thresholds=(0.1, 0.2))
    np.testing.assert_allclose(iou.overlaps, [25 / 175, 25 / 100, 0, 0])
    assert iou.accuracy["Mass"] == {0.1: 0.5, 0.2: 0.0}
    assert iou.accuracy["Nodule"] == {0.1: 0.5, 0.2: 0.5}


def test_localization_accuracy_per_class_and_several_boxes():
    per_class = {("A", "Mass"): [5, 5, 10, 10], ("B", "Nodule"): [0, 0, 5, 5],
                 ("B", "Mass"): [100, 100, 20, 20], ("C", "Nodule"): None}
    r = M.localization_accuracy(per_class, GT_BOXES, GT_LABELS, GT_IMAGES, fmt="xywh")
    np.testing.assert_allclose(r.overlaps, [0.25, 1.0, 1.0, 0.0])
    assert r.n_missing == {"Mass": 0, "Nodule": 1}
    # Several boxes for one image: each GT box takes its best-overlapping prediction.
    several = {"A": [5, 5, 10, 10], "B": [[0, 0, 5, 5], [105, 105, 10, 10]], "C": np.zeros((0, 4))}
    r = M.localization_accuracy(several, GT_BOXES, GT_LABELS, GT_IMAGES, fmt="xywh")
    np.testing.assert_allclose(r.overlaps, [0.25, 1.0, 1.0, 0.0])
    # The same boxes as xyxy give the same result.
    xyxy = {k: M.to_xyxy(np.asarray(v, float).reshape(-1, 4), "xywh") for k, v in several.items()}
    r2 = M.localization_accuracy(xyxy, M.to_xyxy(GT_BOXES, "xywh"), GT_LABELS, GT_IMAGES,
                                 fmt="xyxy")
    np.testing.assert_allclose(r2.overlaps, r.overlaps)


def test_localization_accuracy_aligned_array_and_table():
    pred = [[5, 5, 10, 10], [0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 1, 1]]
    r = M.localization_accuracy(pred, GT_BOXES, GT_LABELS, fmt="xywh", thresholds=(0.1, 0.5),
                                classes=["Nodule", "Mass", "Pneumonia"])
    np.testing.assert_allclose(r.overlaps, [0.25, 1.0, 0.0, 0.0])
    assert r.classes == ("Nodule", "Mass", "Pneumonia")
    assert r.n_boxes["Pneumonia"] == 0 and math.isnan(r.accuracy["Pneumonia"][0.1])
    assert r.macro[0.1] == pytest.approx(0.5)  # nan class left out of the macro mean
    df = r.to_frame()
    assert list(df.columns) == ["class", "n_boxes", "n_missing", "mean_iobb", "acc@0.1", "acc@0.5"]
    assert list(df["class"]) == ["Nodule", "Mass", "Pneumonia", "all (micro)", "mean (macro)"]
    assert df.set_index("class").loc["all (micro)", "acc@0.1"] == 0.5
    macro_mean = df.set_index("class").loc["mean (macro)", "mean_iobb"]
    assert macro_mean == pytest.approx((0.5 + 0.125) / 2)


def test_localization_accuracy_bad_input():
    with pytest.raises(ValueError, match="gt_images"):
        M.localization_accuracy({"A": [0, 0, 1, 1]}, GT_BOXES, GT_LABELS, fmt="xywh")
    with pytest.raises(ValueError, match="3 rows but gt_boxes has 4"):
        M.localization_accuracy(GT_BOXES[:3], GT_BOXES, GT_LABELS, fmt="xywh")
    with pytest.raises(ValueError, match="metric"):
        M.localization_accuracy(GT_BOXES, GT_BOXES, GT_LABELS, fmt="xywh", metric="dice")
    with pytest.raises(ValueError, match="thresholds"):
        M.localization_accuracy(GT_BOXES, GT_BOXES, GT_LABELS, fmt="xywh", thresholds=(1.5,))
    with pytest.raises(ValueError, match=r"\['Nodule'\] not in classes"):
        M.localization_accuracy(GT_BOXES, GT_BOXES, GT_LABELS, fmt="xywh", classes=["Mass"])
    with pytest.raises(TypeError):
        M.localization_accuracy(GT_BOXES, GT_BOXES, GT_LABELS)  # fmt has no default on purpose


def test_localization_on_the_real_box_list(shared_nih):
    """The 984 real NIH boxes: scored against themselves every box is found at every T; scored
    against a whole-image box, IoBB is the box's share of the 1024 x 1024 image."""
    bb = pd.read_csv(shared_nih / "BBox_List_2017.csv")
    boxes = bb.iloc[:, 2:6].to_numpy(dtype=float)
    labels = [canonical_label(lab) for lab in bb["Finding Label"]]
    images = list(bb["Image Index"])
    assert boxes.shape == (984, 4)
    same = M.localization_accuracy(boxes, boxes, labels, fmt="xywh")
    assert all(v == 1.0 for v in same.overall.values())
    assert len(same.classes) == 8 and sum(same.n_boxes.values()) == 984
    whole = {img: [0, 0, 1024, 1024] for img in images}
    r = M.localization_accuracy(whole, boxes, labels, images, fmt="xywh")
    share = boxes[:, 2] * boxes[:, 3] / 1024 ** 2
    np.testing.assert_allclose(r.overlaps, share)
    for t in r.thresholds:
        assert r.overall[t] == pytest.approx(np.mean(share > t))
    # Cardiomegaly boxes are the largest (the heart): the most often "found" by a whole image.
    assert r.accuracy["Cardiomegaly"][0.1] == max(r.accuracy[c][0.1] for c in r.classes)
    # And against a whole-image box the IoU equals the same share (G lies inside P).
    iou = M.localization_accuracy(whole, boxes, labels, images, fmt="xywh", metric="iou")
    np.testing.assert_allclose(iou.overlaps, share)
