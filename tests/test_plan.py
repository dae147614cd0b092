"""The sample plan: global reshuffle per epoch, equal steps per rank, eval exactly once."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.loader.plan import EvalPlan, TrainPlan


def test_train_plan_ranks_partition_global_batches():
    idx = np.arange(100, 203)
    one = TrainPlan(idx, 8, 1, seed=3)
    two = TrainPlan(idx, 8, 2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 103 // 8
    for epoch in range(3):
        a = one.rank_batches(epoch, 0)
        r0, r1 = two.rank_batches(epoch, 0), two.rank_batches(epoch, 1)
        assert r0.shape == r1.shape == (12, 4)
        # the two ranks together see exactly the one-process batch at every step
        np.testing.assert_array_equal(np.concatenate([r0, r1], 1), a)
        flat = a.ravel()
        assert len(set(flat)) == len(flat) and set(flat) <= set(idx)


def test_train_plan_reshuffles_globally_and_deterministically():
    idx = np.arange(1000)
    p = TrainPlan(idx, 10, 2, seed=0)
    e0, e1 = p.epoch_order(0), p.epoch_order(1)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, TrainPlan(idx, 10, 2, seed=0).epoch_order(0))
    assert not np.array_equal(e0, TrainPlan(idx, 10, 2, seed=1).epoch_order(0))
    # global, not buffer-local: the first batch draws from the whole range
    assert e0[0].max() - e0[0].min() > 500


def test_train_plan_resume_mid_epoch():
    p = TrainPlan(np.arange(64), 8, 2, seed=5)
    np.testing.assert_array_equal(p.rank_batches(2, 1, start_step=3), p.rank_batches(2, 1)[3:])


def test_train_plan_rejects_bad_batch():
    with pytest.raises(ValueError, match="divisible"):
        TrainPlan(np.arange(64), 9, 2, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainPlan(np.arange(6), 8, 1, seed=0)


@pytest.mark.parametrize("n, world, batch", [(10, 3, 2), (7, 2, 4), (1, 4, 3), (64, 4, 16)])
def test_eval_plan_every_sample_exactly_once(n, world, batch):
    idx = np.arange(n) * 3
    plan = EvalPlan(idx, batch, world)
    seen = []
    steps = []
    for r in range(world):
        bs = plan.rank_batches(r)
        steps.append(len(bs))
        for ids, valid in bs:
            seen.extend(ids[valid].tolist())
    assert len(set(steps)) == 1  # every rank runs the same number of batches
    assert sorted(seen) == idx.tolist()
