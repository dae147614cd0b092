"""Lung segmentation for seed 002's lung boxes: masks stored by `medattn prepare --masks`, masks cut
to the loader's views, Dice/IoU by hand, training through the runtime, and `prepare --lung-model`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medattn.config import load_config
from medattn.data._masks import MaskStore, load_mask
from medattn.data.fake import write_fake_chest_folder
from medattn.data.prepare import prepare
from medattn.data.prepared import PreparedDataset
from medattn.errors import ConfigError, DataError
from medattn.methods import DataSpec, create_method
from medattn.methods.lungseg import box_of_mask, mask_scores


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    src = write_fake_chest_folder(root / "src", counts={"train": 20, "val": 6, "test": 4}, size=64, seed=5)
    prep = prepare(src / "images", root / "prep", layout="imagefolder", masks=src / "masks", size=32,
                   workers=1, progress=False).out
    return src, prep


def _boxes(man: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(v, np.float64) for v in man["lung_box"]])


def test_prepare_stores_mask_pixels_and_the_lung_box(pairs):
    src, prep = pairs
    ds = PreparedDataset.open(prep)
    assert ds.info["lung_masks"]["count"] == len(ds) and ds.info["lung_boxes_from"]["kind"] == "masks"
    store = MaskStore.open(prep)
    got = store.read(np.arange(len(ds)))
    assert got.shape == (len(ds), 32, 32) and store.known(np.arange(len(ds))).all()
    for i in (0, 7, len(ds) - 1):
        name = ds.manifest["image"].iat[i]
        full = np.asarray(Image.open(src / "masks" / name)) > 0  # 64 x 64
        # 2x2 box filter, then >= 50 %
        want = full.reshape(32, 2, 32, 2).mean(axis=(1, 3)) >= 0.5
        np.testing.assert_array_equal(got[i].astype(bool), want)
        np.testing.assert_array_equal(load_mask(src / "masks" / name, 32), want)
        rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        box = [cols[0] / 64, rows[0] / 64, (cols[-1] + 1 - cols[0]) / 64, (rows[-1] + 1 - rows[0]) / 64]
        np.testing.assert_allclose(ds.manifest["lung_box"].iat[i], box)
        assert box_of_mask(full) == pytest.approx(box)


def test_masks_follow_the_view_window_and_flip(pairs):
    _, prep = pairs
    ds = PreparedDataset.open(prep)
    cfg = load_config("lungseg_demo")
    method = create_method(cfg, DataSpec.from_dataset(ds, cfg))
    batch = {"image": torch.zeros(2, 1, 16, 16), "index": torch.tensor([0, 3]),
             "window": torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75]]),
             "flip": torch.tensor([False, True])}
    view, known = method.target_masks(batch, 16, 16)
    full = MaskStore.open(prep).read(np.array([0, 3])).astype(np.float64)
    # whole image at half size = 2x2 average >= 0.5; the window [8, 24) cropped, then mirrored
    avg = full[0].reshape(16, 2, 16, 2).mean(axis=(1, 3))
    sure = avg != 0.5  # exact ties are up to float rounding in grid_sample
    np.testing.assert_array_equal(view[0, 0].numpy()[sure], (avg >= 0.5)[sure])
    np.testing.assert_array_equal(view[1, 0].numpy(), full[1, 8:24, 8:24][:, ::-1])
    assert known.tolist() == [True, True]


def test_dice_and_iou_by_hand():
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    truth = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True      # 4 pixels
    truth[0, :2, :3] = True     # 6 pixels, 4 shared
    truth[1, 0, 0] = True       # prediction empty
    dice, iou = mask_scores(pred, truth)
    assert dice.tolist() == pytest.approx([2 * 4 / 10, 0.0, 1.0])  # both empty counts as perfect
    assert iou.tolist() == pytest.approx([4 / 6, 0.0, 1.0])


def test_lungseg_trains_scores_dice_and_fills_lung_boxes_in_prepare(pairs, tmp_path):
    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod

    src, prep = pairs
    run = tmp_path / "seg"
    assert train_mod.main(["--config", "lungseg_demo", "--data", str(prep), "--out", str(run), "data.image_size=32",
                           "data.resize=32", "runtime.progress=none", "runtime.tensorboard=false",
                           "data.loader=torch", "stages.train.epochs=14"]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dice = [r["val/main/dice"] for r in recs if "val/main/dice" in r]
    assert recs[-1]["select/metric"] == "val/main/dice" and len(dice) == 14
    # chance: calling every pixel lung gives Dice 2f / (1 + f), f = the lung share of the image
    f = MaskStore.open(prep).read(np.arange(len(PreparedDataset.open(prep)))).mean()
    print(f"\nvalidation Dice per epoch {np.round(dice, 3).tolist()}; all-lung baseline {2 * f / (1 + f):.3f}")
    assert max(dice) > 0.85 > 2 * f / (1 + f) + 0.3

    assert evaluate_mod.main(["--run", str(run), "--bootstrap", "0"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["per_image"]["dice"]["n"] == 8 and m["per_image"]["dice"]["mean"] > 0.8
    assert m["per_image"]["iou"]["mean"] <= m["per_image"]["dice"]["mean"]
    assert (run / "eval" / "per_image.csv").is_file() and not (run / "eval" / "preds.csv").exists()

    # prepare --lung-model RUN: one box per image from the trained model, close to the mask boxes
    from hpc.run import Run
    from medattn.cli import main as cli

    boxed = tmp_path / "boxed"
    assert cli(["prepare", "--nih-root", str(src / "images"), "--out", str(boxed), "--layout", "imagefolder",
                "--size", "32", "--workers", "1", "--no-progress", "--lung-model", str(run)]) == 0
    info = json.loads((boxed / "dataset.json").read_text())
    assert info["has_lung_boxes"] and info["lung_boxes_from"]["kind"] == "model"
    assert info["lung_boxes_from"]["checkpoint"] == str(Run(run).checkpoint("train", "best"))
    assert "lung_masks" not in info
    got = _boxes(PreparedDataset.open(boxed).manifest)
    want = _boxes(PreparedDataset.open(prep).manifest)
    x0 = np.maximum(got[:, 0], want[:, 0])
    y0 = np.maximum(got[:, 1], want[:, 1])
    x1 = np.minimum(got[:, 0] + got[:, 2], want[:, 0] + want[:, 2])
    y1 = np.minimum(got[:, 1] + got[:, 3], want[:, 1] + want[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    iou = inter / (got[:, 2] * got[:, 3] + want[:, 2] * want[:, 3] - inter)
    print(f"lung box IoU (model vs mask): mean {iou.mean():.3f}, min {iou.min():.3f}")
    assert iou.mean() > 0.8

    # a directory that is no run, and a run without finished stages, are no lung model
    argv = ["prepare", "--nih-root", str(src / "images"), "--out", str(tmp_path / "x"), "--layout", "imagefolder",
            "--size", "32", "--workers", "1", "--no-progress", "--lung-model"]
    assert cli(argv + [str(tmp_path)]) == 2
    unfinished = tmp_path / "unfinished"
    Run(unfinished).save_config(Run(run).config())
    assert cli(argv + [str(unfinished)]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="a run directory, not a checkpoint file"):
        prepare(src / "images", tmp_path / "x", layout="imagefolder", size=32, workers=1, progress=False,
                lung_model=run)


def test_lungseg_refuses_data_without_masks_and_rotations(tmp_path):
    from prepfix import make_prepared

    prep = make_prepared(tmp_path / "nomask", n=16, size=32)
    cfg = load_config("lungseg_demo")
    method = create_method(cfg, DataSpec.from_dataset(PreparedDataset.open(prep), cfg))
    with pytest.raises(ConfigError, match="has no lung masks"):
        method.target_masks({"image": torch.zeros(1, 1, 8, 8), "index": torch.tensor([0])}, 8, 8)
    with pytest.raises(ConfigError, match="rotate_deg"):
        create_method(load_config("lungseg_demo", ["data.rotate_deg=5"]), method.spec)
