"""scripts/sweep_cost.py's projection arithmetic against hand-computed values (the measurement
itself needs a Ray cluster and minutes of training: it is a benchmark, docs/benchmarks.md)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_cost.py"


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("sweep_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_asha_epoch_fraction(sc):
    # rungs 5, 15, 45 (Ray's ASHA for grace 5, reduction factor 3, max_t 100): every trial trains
    # 5 epochs, a third 10 more, a ninth 30 more, a 27th the last 55
    assert sc.asha_epoch_fraction(100, 5, 3) == pytest.approx((5 + 10 / 3 + 30 / 9 + 55 / 27) / 100)
    assert sc.asha_epoch_fraction(6, 6, 3) == pytest.approx(1.0)  # grace = max_t: nothing stopped


def test_projection_shared_global(sc):
    # per epoch on the 300 + 30 measured images: global 10 CPU-s, local 14, fusion 9
    size = {"train": 300, "val": 30, "test": 70}
    costs = {"global": {"cpu_s": 10.0}, "local": {"cpu_s": 14.0}, "fusion": {"cpu_s": 9.0}}
    p = sc.project(costs, size, ["global"], ["global", "local", "fusion"], 24,
                   {"global": 50, "local": 50, "fusion": 50}, 3000, 300)
    # 10x the images, 50 epochs: a stage costs 500x its epoch
    assert p["stage_s"] == pytest.approx({"global": 5000.0, "local": 7000.0, "fusion": 4500.0})
    assert p["independent_s"] == pytest.approx(24 * 16500.0)
    assert p["sweep_s"] == pytest.approx(5000.0 + 24 * 11500.0)
    assert p["ratio"] == pytest.approx(281000 / 396000)
    assert p["limit_ratio"] == pytest.approx(11500 / 16500)
    # 40 %: 5000 + 24 * x * 11500 = 0.4 * 396000
    assert p["trial_share_for_40pct"] == pytest.approx((158400 - 5000) / (24 * 11500))
    a = p["asha"]
    assert a["rungs"] == [5, 15, 45] and a["max_t"] == 100
    # epochs 1-50 local (140 s each), 51-100 fusion (90 s each), weighted by the share reaching them
    expected = 5 * 140 + (10 * 140) / 3 + (30 * 140) / 9 + (5 * 140 + 50 * 90) / 27
    assert a["cost_fraction"] == pytest.approx(expected / 11500)
    assert a["ratio"] == pytest.approx((5000 + 24 * expected) / 396000)


def test_projection_train_and_val_rates(sc):
    # wall-clock records: training time per training image, validation time per validation image
    size = {"train": 100, "val": 10}
    costs = {"global": {"train_s": 4.0, "val_s": 1.0}, "local": {"train_s": 8.0, "val_s": 1.0}}
    p = sc.project(costs, size, ["global"], ["global", "local"], 2, {"global": 3, "local": 1}, 1000, 50)
    assert p["stage_s"] == pytest.approx({"global": 3 * (40 + 5), "local": 80 + 5})
    assert p["ratio"] == pytest.approx((135 + 2 * 85) / (2 * 220))
