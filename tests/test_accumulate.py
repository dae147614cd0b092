"""medattn.metrics.Accumulator: per-batch predictions kept on the device, padding dropped, the
ranks' parts merged in sample order, a sample seen twice refused; and the same Predictions as
the per-batch host copies that hpc.inference.run_inference made before."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.syncs import count_syncs
from medattn.metrics import Accumulator, Predictions

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def rank_batches(rank: int, world: int, n: int, batch: int, g: torch.Generator, boxes: bool = True):
    """The batches an evaluation loader gives one rank: samples rank, rank + world, ... and the
    last batches padded (valid False) with repeats so every rank runs as many batches."""
    per_rank = -(-n // world)
    steps = -(-per_rank // batch)
    mine = list(range(rank, n, world))
    out = []
    for s in range(steps):
        idx = mine[s * batch:(s + 1) * batch]
        pad = batch - len(idx)
        index = torch.tensor(idx + [mine[0]] * pad, dtype=torch.int64)
        valid = torch.tensor([True] * len(idx) + [False] * pad)
        b = {"index": index, "valid": valid,
             "probs": {"global": torch.rand(batch, 3, generator=g).to(torch.bfloat16),
                       "local": torch.rand(batch, 3, generator=g)},
             "extras": {"r": torch.rand(batch, generator=g)}}
        if boxes:
            b["boxes"] = torch.rand(batch, 4, generator=g)
        out.append(b)
    return out


def old_local(batches) -> dict:
    """What run_inference kept per rank before: each batch masked and copied to the host."""
    idx_l, probs_l, boxes_l, extras_l = [], {}, [], {}
    for b in batches:
        valid = b["valid"].bool()
        idx_l.append(b["index"][valid].cpu().numpy())
        for k, p in b["probs"].items():
            probs_l.setdefault(k, []).append(p[valid].float().cpu().numpy())
        if b.get("boxes") is not None:
            boxes_l.append(b["boxes"][valid].float().cpu().numpy())
        for k, v in b["extras"].items():
            extras_l.setdefault(k, []).append(v[valid].float().cpu().numpy())
    return {"index": np.concatenate(idx_l), "probs": {k: np.concatenate(v) for k, v in probs_l.items()},
            "boxes": np.concatenate(boxes_l) if boxes_l else None,
            "extras": {k: np.concatenate(v) for k, v in extras_l.items()}}


def accumulate(batches) -> Accumulator:
    acc = Accumulator()
    for b in batches:
        acc.add(b["index"], b["probs"], b["valid"], b.get("boxes"), b["extras"])
    return acc


@pytest.mark.parametrize("with_boxes", [True, False])
def test_padding_dropped_and_sample_order_restored_across_ranks(with_boxes):
    g = torch.Generator().manual_seed(0)
    n, world = 23, 3
    ranks = [rank_batches(r, world, n, 4, g, with_boxes) for r in range(world)]
    parts = [accumulate(bs).part() for bs in ranks]
    for part, bs in zip(parts, ranks):  # each part: this rank's valid samples, in the order seen
        old = old_local(bs)
        np.testing.assert_array_equal(part["index"], old["index"])
        for k in old["probs"]:
            assert part["probs"][k].dtype == np.float32
            np.testing.assert_array_equal(part["probs"][k], old["probs"][k])
        np.testing.assert_array_equal(part["extras"]["r"], old["extras"]["r"])
        if with_boxes:
            np.testing.assert_array_equal(part["boxes"], old["boxes"])
        else:
            assert part["boxes"] is None
    pred = Accumulator.merge(parts)
    assert isinstance(pred, Predictions)
    np.testing.assert_array_equal(pred.index, np.arange(n))  # every sample once, in order
    # each row still belongs to its sample: compare with the rank-local rows by index
    cat = {int(i): row for part in parts for i, row in zip(part["index"], part["probs"]["local"])}
    for row, i in enumerate(pred.index):
        np.testing.assert_array_equal(pred.probs["local"][row], cat[int(i)])
    assert pred.probs["global"].shape == (n, 3) and pred.extras["r"].shape == (n,)
    assert (pred.boxes.shape == (n, 4)) if with_boxes else pred.boxes is None


def test_result_of_one_process_and_an_empty_evaluation():
    g = torch.Generator().manual_seed(1)
    bs = rank_batches(0, 1, 10, 4, g)
    pred = accumulate(bs).result()
    np.testing.assert_array_equal(pred.index, np.arange(10))
    empty = Accumulator().result()
    assert empty.index.shape == (0,) and empty.probs == {} and empty.boxes is None and empty.extras == {}


def test_a_sample_seen_twice_raises():
    g = torch.Generator().manual_seed(2)
    bs = rank_batches(0, 1, 8, 4, g)
    parts = [accumulate(bs).part(), accumulate(bs[:1]).part()]  # samples 0-3 twice
    with pytest.raises(RuntimeError, match="saw a sample twice"):
        Accumulator.merge(parts)
    acc = Accumulator()
    b = bs[0]
    acc.add(b["index"], b["probs"], torch.ones(4, dtype=torch.bool), None, None)
    acc.add(b["index"], b["probs"], torch.ones(4, dtype=torch.bool), None, None)  # padding left valid
    with pytest.raises(RuntimeError, match="saw a sample twice"):
        acc.result()


def test_stores_copies_and_refuses_changing_outputs():
    acc = Accumulator()
    probs = torch.full((2, 1), 0.25)
    index = torch.tensor([0, 1])
    acc.add(index, {"main": probs}, torch.tensor([True, True]))
    probs.fill_(0.75)  # a reused output buffer
    index.fill_(5)
    pred = acc.result()
    assert pred.probs["main"].tolist() == [[0.25], [0.25]] and pred.index.tolist() == [0, 1]
    with pytest.raises(ValueError, match="changed between batches"):
        acc.add(torch.tensor([2, 3]), {"other": probs}, torch.tensor([True, True]))
    with pytest.raises(ValueError, match="changed between batches"):
        acc.add(torch.tensor([2, 3]), {"main": probs}, torch.tensor([True, True]), boxes=torch.zeros(2, 4))


def test_add_does_not_sync():
    """Per batch nothing waits for the device: the host copies happen once, in part()."""
    g = torch.Generator().manual_seed(3)
    bs = rank_batches(0, 2, 40, 8, g)
    acc = Accumulator()
    with count_syncs() as c:
        for b in bs:
            acc.add(b["index"], b["probs"], b["valid"], b["boxes"], b["extras"])
    assert c.syncs == 0 and c.host_tensors == 0, c.sync_ops
    assert c.ops > 0
