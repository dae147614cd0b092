"""DALI pipeline (CPU operators here) and the PyTorch fallback yield the same samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.loader import EvalLoader, TrainLoader, TrainPlan
from medattn.config import load_config
from medattn.data.prepared import PreparedDataset
from prepfix import make_prepared

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return PreparedDataset.open(make_prepared(tmp_path_factory.mktemp("prep"), n=90, size=64))


def _cfg(*extra):
    # num_workers=0: read in the calling thread (no worker start-up); one test covers workers.
    return load_config("demo", ["data.image_size=48", "data.resize=56", "data.num_workers=0", *extra]).data


def _collect(loader, epochs, start_step=0):
    idx, img, hires, vb = [], [], [], []
    for e in range(epochs):
        for b in loader.epoch(e, start_step if e == 0 else 0):
            idx.append(b["index"].clone())
            img.append(b["image"].clone())
            if "hires" in b:
                hires.append(b["hires"].clone())
                vb.append(b["view_box"].clone())
    return torch.cat(idx), torch.cat(img), hires and torch.cat(hires), vb and torch.cat(vb)


@pytest.mark.parametrize("extra", [(), ("data.rotate_deg=10", "data.brightness=0.2", "data.contrast=0.2")])
def test_dali_and_torch_yield_same_samples(ds, extra):
    data = _cfg(*extra)
    plan = TrainPlan(ds.indices("train"), 8, 2, seed=0)
    for rank in (0, 1):
        t = _collect(TrainLoader(ds, data, plan, rank, torch.device("cpu"), 0, hires=True, kind="torch"), 2)
        d = _collect(TrainLoader(ds, data, plan, rank, torch.device("cpu"), 0, hires=True, kind="dali"), 2)
        assert torch.equal(t[0], d[0])  # same samples, same order
        expect = np.concatenate([plan.rank_batches(e, rank).ravel() for e in range(2)])
        assert t[0].tolist() == expect.tolist()
        assert torch.equal(t[2], d[2])  # the prepared image, flipped like the view
        torch.testing.assert_close(t[3], d[3])
        # same view of the same pixels, up to the two libraries' resampling
        assert (t[1] - d[1]).abs().mean() < 0.15


def test_train_loader_resumes_mid_epoch(ds):
    plan = TrainPlan(ds.indices("train"), 8, 1, seed=4)
    for kind in ("torch", "dali"):
        full = _collect(TrainLoader(ds, _cfg(), plan, 0, torch.device("cpu"), 0, kind=kind), 1)
        tail = _collect(TrainLoader(ds, _cfg(), plan, 0, torch.device("cpu"), 0, kind=kind), 1, start_step=3)
        assert torch.equal(full[0][3 * 8:], tail[0])
        torch.testing.assert_close(full[1][3 * 8:], tail[1])  # augmentation redrawn identically


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_eval_every_sample_once_across_ranks(ds, kind):
    val = ds.indices("val")
    seen = []
    for rank in range(3):
        loader = EvalLoader(ds, _cfg(), val, 4, rank, 3, torch.device("cpu"), kind=kind)
        for _ in range(2):  # reusable across validations
            got = torch.cat([b["index"][b["valid"]] for b in loader])
        seen += got.tolist()
    assert sorted(seen) == val.tolist()


def test_view_box_locates_the_view_in_the_hires_image(ds):
    """Cropping the prepared image at view_box reproduces the network input."""
    from torchvision.ops import roi_align

    data = _cfg("data.normalize=none")
    plan = TrainPlan(ds.indices("train"), 8, 1, seed=1)
    b = next(iter(TrainLoader(ds, data, plan, 0, torch.device("cpu"), 0, hires=True, kind="torch").epoch(0)))
    s = b["hires"].shape[-1]
    rois = torch.cat([torch.arange(8).float().view(-1, 1), b["view_box"] * s], 1)
    crop = roi_align(b["hires"].float(), rois, output_size=48, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert (crop - 255.0 * b["image"]).abs().mean() < 3.0  # gray levels, out of 255


def test_labels_follow_the_index_with_worker_processes(ds):
    plan = TrainPlan(ds.indices("train"), 8, 1, seed=0)
    data = _cfg("data.num_workers=1")  # DALI parallel external source, one spawned worker
    b = next(iter(TrainLoader(ds, data, plan, 0, torch.device("cpu"), 0, kind="dali").epoch(0)))
    expect = torch.from_numpy(ds.labels_matrix())[b["index"]]
    assert torch.equal(b["labels"], expect)


def _children() -> set[int]:
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_workers_persist_across_epochs_and_validations(ds, kind):
    """With workers on, epoch 2 and the second validation reuse the processes of the first (no
    respawn per epoch) and yield exactly the samples a worker-less loader yields; close() ends
    them."""
    plan = TrainPlan(ds.indices("train"), 8, 1, seed=2)
    ref = _collect(TrainLoader(ds, _cfg(), plan, 0, torch.device("cpu"), 0, kind="torch"), 3)[0]
    data = _cfg("data.num_workers=2")
    before = _children()
    loader = TrainLoader(ds, data, plan, 0, torch.device("cpu"), 0, kind=kind)
    val = EvalLoader(ds, data, ds.indices("val"), 8, 0, 1, torch.device("cpu"), kind=kind)
    got, workers = [], []
    for e in range(3):
        got += [b["index"].clone() for b in loader.epoch(e)]
        seen = sorted(int(i) for b in val for i in b["index"][b["valid"]])
        assert seen == sorted(ds.indices("val").tolist())
        workers.append(_children() - before)
    assert workers[0] and workers[0] == workers[1] == workers[2]  # the same processes every epoch
    assert torch.equal(torch.cat(got), ref)
    loader.close()
    val.close()
    import time

    deadline = time.time() + 10
    while _children() - before and time.time() < deadline:
        time.sleep(0.1)
    assert not (_children() - before)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_an_epoch_left_half_way_does_not_upset_the_next(ds, kind):
    plan = TrainPlan(ds.indices("train"), 8, 1, seed=3)
    ref = _collect(TrainLoader(ds, _cfg(), plan, 0, torch.device("cpu"), 0, kind="torch"), 2)[0]
    loader = TrainLoader(ds, _cfg("data.num_workers=1"), plan, 0, torch.device("cpu"), 0, kind=kind)
    for k, b in enumerate(loader.epoch(0)):
        if k == 2:
            break
    got = torch.cat([b["index"].clone() for b in loader.epoch(1)])
    loader.close()
    assert torch.equal(got, ref[plan.steps_per_epoch * 8:])
