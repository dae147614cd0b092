"""Calibration, operating points and subgroups (medattn.metrics.calibration / operating /
subgroups) against values computed by hand in the comments, and against explicit resamples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medattn import metrics as M
from medattn.metrics.bootstrap import _resample_indices

P5 = np.array([0.05, 0.10, 0.95, 0.62, 0.65])
Y5 = np.array([0, 1, 1, 0, 1])


# --------------------------------------------------------------------------------------------
# ECE, Brier, reliability
# --------------------------------------------------------------------------------------------
def test_ece_equal_width_by_hand():
    # 15 bins of width 1/15: 0.05 -> bin 0, 0.10 -> bin 1, 0.95 -> bin 14, 0.62 and 0.65 -> bin 9.
    # bin 0: |0 - 0.05| = 0.05; bin 1: |1 - 0.10| = 0.90; bin 14: |1 - 0.95| = 0.05 (1/5 each);
    # bin 9: mean p 0.635, frequency 1/2 -> 0.135, weight 2/5.
    # ECE = (0.05 + 0.90 + 0.05) / 5 + 2/5 * 0.135 = 0.2 + 0.054 = 0.254
    assert M.ece(P5, Y5) == pytest.approx(0.254, abs=1e-12)
    r = M.reliability(P5, Y5)
    assert r.count[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1]
    assert r.confidence[0, 9] == pytest.approx(0.635) and r.frequency[0, 9] == 0.5
    assert math.isnan(r.confidence[0, 2])  # empty bin


def test_ece_equal_mass_by_hand():
    # 2 equal-mass bins of 5 images: ranks 0..4 by p, bin = rank * 2 // 5 -> 0, 0, 0, 1, 1.
    # bin 0 = {0.05 (y0), 0.10 (y1), 0.62 (y0)}: mean p 0.77/3, frequency 1/3 -> |1/3 - 0.256667| * 3/5 = 0.046
    # bin 1 = {0.65 (y1), 0.95 (y1)}: mean p 0.8, frequency 1 -> 0.2 * 2/5 = 0.08.  ECE = 0.126
    assert M.ece(P5, Y5, n_bins=2, binning="equal-mass") == pytest.approx(0.126, abs=1e-12)
    # 15 equal-mass bins of 5 images: each image alone -> mean |y - p| = (0.05+0.9+0.05+0.62+0.35)/5
    assert M.ece(P5, Y5, binning="equal-mass") == pytest.approx(1.97 / 5, abs=1e-12)
    with pytest.raises(ValueError, match="binning"):
        M.ece(P5, Y5, binning="quantile")


def test_brier_by_hand_and_columns():
    # (0.05^2 + 0.9^2 + 0.05^2 + 0.62^2 + 0.35^2) / 5 = 1.3219 / 5
    assert M.brier(P5, Y5) == pytest.approx(0.26438, abs=1e-12)
    p2 = np.stack([P5, 1 - P5], 1)
    y2 = np.stack([Y5, 1 - Y5], 1)
    np.testing.assert_allclose(M.brier(p2, y2), [0.26438, 0.26438])
    # Column 2 mirrors column 1 (1 - p, 1 - y). Equal-width keeps the same groups -> 0.254 again.
    # Equal-mass re-sorts: {0.05 y0, 0.35 y0, 0.38 y1} mean p 0.26, freq 1/3 -> 0.07333 * 3/5 = 0.044;
    # {0.90 y0, 0.95 y1} mean p 0.925, freq 1/2 -> 0.425 * 2/5 = 0.17; ECE 0.214.
    np.testing.assert_allclose(M.ece(p2, y2), [0.254, 0.254], atol=1e-12)
    np.testing.assert_allclose(M.ece(p2, y2, n_bins=2, binning="equal-mass"), [0.126, 0.214], atol=1e-12)


def test_ece_vectorised_equals_column_by_column():
    rng = np.random.default_rng(0)
    p = rng.random((500, 6))
    y = rng.random((500, 6)) < p ** 2
    for binning in M.BINNINGS:
        whole = M.ece(p, y, binning=binning)
        one = [M.ece(p[:, j], y[:, j], binning=binning) for j in range(6)]
        np.testing.assert_allclose(whole, one, atol=1e-12)


# --------------------------------------------------------------------------------------------
# temperature scaling
# --------------------------------------------------------------------------------------------
def _sig(z):
    return 1 / (1 + np.exp(-z))


def test_temperature_per_label_by_hand():
    # Logits +2 (4 images, 3 positive) and -2 (4 images, 1 positive). The NLL is minimal where
    # sigmoid(2a) = 3/4, i.e. a = ln(3) / 2 and T = 1/a = 2 / ln 3 = 1.8205.
    z = np.array([2, 2, 2, 2, -2, -2, -2, -2.0])
    y0 = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    # Label 1 has 3 positives (< min_positives 4): it gets the pooled temperature. Pooled over the
    # 16 pairs: at +2, 6 of 8 positive; at -2, 1 of 8. d NLL/da = 0 <=> (s(2a) - 6/8) = (s(-2a) - 1/8)
    # <=> 2 s(2a) - 1 = 5/8 <=> s(2a) = 13/16 <=> T = 2 / ln(13/3) = 1.3638.
    y1 = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = _sig(np.stack([z, z], 1))
    t = M.fit_temperature(p, np.stack([y0, y1], 1), ["a", "b"], min_positives=4)
    assert t.temperature["a"] == pytest.approx(2 / math.log(3), rel=1e-9)
    assert t.kind == {"a": "own", "b": "pooled"}
    assert t.pooled == pytest.approx(2 / math.log(13 / 3), rel=1e-9)
    assert t.temperature["b"] == t.pooled
    # Applying it: sigmoid(2 / T) = 3/4 exactly for label a.
    cal = M.apply_temperature(p, t.vector(["a", "b"]))
    assert cal[0, 0] == pytest.approx(0.75, abs=1e-9) and cal[4, 0] == pytest.approx(0.25, abs=1e-9)
    # The round trip through the dict stored in a run.
    assert M.Temperature.from_dict(t.to_dict()).temperature == t.temperature


def test_temperature_softmax_by_hand_and_apply():
    # Two classes, softmax of log p: class 1 vs 0 is sigmoid(a * (logit)), the same problem as above.
    p1 = _sig(np.array([2, 2, 2, 2, -2, -2, -2, -2.0]))
    probs = np.stack([1 - p1, p1], 1)
    target = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    t = M.fit_temperature(probs, np.eye(2)[target], ["neg", "pos"], task="singlelabel", targets=target)
    assert t.pooled == pytest.approx(2 / math.log(3), rel=1e-9) and t.kind["pos"] == "softmax"
    cal = M.apply_temperature(probs, t.pooled, "singlelabel")
    np.testing.assert_allclose(cal.sum(1), 1.0)
    assert cal[0, 1] == pytest.approx(0.75, abs=1e-9)
    # sigmoid(logit(sigmoid(2)) / 2) = sigmoid(1); 0.5 stays 0.5; AUROC is unchanged by any T.
    assert M.apply_temperature(np.array([_sig(2.0), 0.5]), 2.0).tolist() == pytest.approx([_sig(1.0), 0.5])
    with pytest.raises(ValueError, match="positive"):
        M.apply_temperature(probs, 0.0)


def test_temperature_recovers_a_known_temperature():
    # Labels drawn from sigmoid(z / 2.5): the fitted T is close to 2.5; ECE falls after scaling.
    rng = np.random.default_rng(3)
    z = rng.normal(0, 3, size=(20000, 3))
    y = rng.random(z.shape) < _sig(z / 2.5)
    p = _sig(z)
    t = M.fit_temperature(p, y, ["a", "b", "c"])
    np.testing.assert_allclose(t.vector(["a", "b", "c"]), 2.5, rtol=0.06)
    after = M.apply_temperature(p, t.vector(["a", "b", "c"]))
    assert np.all(M.ece(after, y) < M.ece(p, y) / 3)


# --------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------
S10 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
Y10 = np.array([0, 0, 1, 0, 0, 1, 1, 0, 1, 1])  # 5 positives: 0.3, 0.6, 0.7, 0.9, 0.95


def test_sensitivity_threshold_by_hand():
    # sens >= 0.90 needs all 5 positives: the lowest positive 0.3; negatives below it: 0.1, 0.2 -> spec 2/5
    assert M.sensitivity_threshold(S10, Y10, 0.90) == pytest.approx((0.3, 1.0, 0.4))
    # sens >= 0.80 needs 4: threshold 0.6; negatives below 0.6: 0.1, 0.2, 0.4, 0.5 -> spec 4/5
    assert M.sensitivity_threshold(S10, Y10, 0.80) == pytest.approx((0.6, 0.8, 0.8))
    # Youden: J = 0.2, 0.4, 0.2, 0.4, 0.6 (at 0.6), 0.4, ... -> 0.6
    ch = M.choose_thresholds(S10[:, None], Y10[:, None], ["x"])
    assert ch["youden"]["x"]["threshold"] == 0.6
    assert ch["sens90"]["x"] == pytest.approx({"threshold": 0.3, "sensitivity": 1.0, "specificity": 0.4})
    assert ch["sens95"]["x"]["threshold"] == 0.3


def test_rates_at_threshold_by_hand_and_against_explicit_resamples():
    # At 0.35: called positive 0.4 .. 0.95 -> tp 4 (0.6, 0.7, 0.9, 0.95), fp 3 (0.4, 0.5, 0.8),
    # fn 1 (0.3), tn 2 (0.1, 0.2): sens 4/5, spec 2/5, PPV 4/7, NPV 2/3.
    p = np.stack([S10, S10], 1)
    y = np.stack([Y10, Y10], 1)
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])  # 5 patients of 2 images
    r = M.rates_with_intervals(p, y, [0.35, np.nan], groups=groups, n_boot=30, seed=4, min_positives=1)
    assert (r["tp"][0], r["fp"][0], r["fn"][0], r["tn"][0]) == (4, 3, 1, 2)
    assert (r["sensitivity"][0], r["specificity"][0]) == pytest.approx((0.8, 0.4))
    assert (r["ppv"][0], r["npv"][0]) == pytest.approx((4 / 7, 2 / 3))
    assert math.isnan(r["sensitivity"][1]) and np.isnan(r["sensitivity_ci"][:, 1]).all()  # no threshold
    # The intervals are the percentiles over resamples of whole patients (explicit copies of the rows).
    sens = []
    for idx in _resample_indices(5, 30, 4):
        for draw in idx:
            rows = np.concatenate([np.flatnonzero(groups == g) for g in draw])
            pred = S10[rows] >= 0.35
            tp, fn = np.sum(pred & (Y10[rows] == 1)), np.sum(~pred & (Y10[rows] == 1))
            sens.append(tp / (tp + fn) if tp + fn else np.nan)
    lo, hi = np.nanpercentile(sens, [2.5, 97.5])
    assert r["sensitivity_ci"][:, 0] == pytest.approx([lo, hi])
    assert r["positives"].tolist() == [4, 4]  # patients 1..4 have a positive image
    few = M.rates_with_intervals(p, y, [0.35, 0.35], groups=groups, n_boot=30, seed=4)  # default 5 patients
    assert few["too_few"].all() and np.isnan(few["ppv_ci"]).all() and few["ppv"][0] == pytest.approx(4 / 7)


# --------------------------------------------------------------------------------------------
# subgroups
# --------------------------------------------------------------------------------------------
def test_age_bands_and_sex_names():
    assert M.age_band([30, 39.9, 40, 45, 60, 60.5, np.nan]).tolist() == ["<40", "<40", "40-60", "40-60",
                                                                            "40-60", ">60", ""]
    assert M.normalise_sex(["M", "Female", "f", "male", "Unknown", None]).tolist() == ["M", "F", "F", "M", "", ""]


def test_subgroup_auroc_by_hand():
    # F: scores 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1 -> AUROC 3/4 (pairs: 0.35 > 0.1 only, 0.8 > both)
    # M: scores 0.2, 0.9, 0.3, 0.6 for labels 0, 1, 0, 1 -> AUROC 1
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.3, 0.6])
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    sex = ["F", "F", "F", "F", "M", "M", "M", "M"]
    age = [30, 45, 61, 60, 39, 40, 70, 55]
    view = ["PA", "AP", "PA", "AP", "PA", "AP", "LL", "PA"]
    patients = np.arange(8)
    masks = M.subgroup_masks(sex, age, view)
    assert masks["age"]["40-60"].tolist() == [False, True, False, True, False, True, False, True]
    assert masks["view"]["PA"].sum() == 4 and masks["view"]["AP"].sum() == 3  # LL in neither
    out = M.subgroup_auroc(s[:, None], y[:, None], ["x"], ["x"], masks, patients, n_boot=20, min_positives=1)
    sx = out["attributes"]["sex"]
    assert sx["F"]["auroc"]["x"] == 0.75 and sx["M"]["auroc"]["x"] == 1.0
    assert sx["F"]["n_images"] == 4 and sx["F"]["n_patients"] == 4
    assert out["gaps"]["sex"]["x"] == {"gap": 0.25, "high": "M", "low": "F"}
    # age <40: rows 0 (0.1, y0) and 4 (0.2, y0): no positive -> no AUROC, too few, not in the gap.
    assert out["attributes"]["age"]["<40"]["auroc"]["x"] is None
    assert "x" in out["attributes"]["age"]["<40"]["too_few"]
    # 40-60: rows 1 (0.4, 0), 3 (0.8, 1), 5 (0.9, 1), 7 (0.6, 1) -> 1.0; >60: rows 2 (0.35, 1), 6 (0.3, 0) -> 1.0
    assert out["gaps"]["age"]["x"]["gap"] == 0.0
    # With the default 5 positive patients nothing has an interval and no gap is claimed.
    strict = M.subgroup_auroc(s[:, None], y[:, None], ["x"], ["x"], masks, patients, n_boot=20)
    assert strict["attributes"]["sex"]["F"]["ci"]["x"] == [None, None]
    assert strict["attributes"]["sex"]["F"]["too_few"] == ["x"] and strict["largest_gap"]["x"] is None
    assert out["largest_gap"]["x"]["gap"] == 0.25 and out["largest_gap"]["x"]["attribute"] == "sex"
