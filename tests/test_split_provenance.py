"""Split provenance (issue 22): every checkpoint, provenance.json, eval's metrics.json and the report
record the split's name, seed and a hash of its assignment of images to train/val/test; eval
refuses, by name, a prepared directory whose assignment differs from the one the checkpoint was
trained on, unless --allow-split-mismatch (then both are recorded and the report warns)."""
from __future__ import annotations

import json

import pytest
import torch

from hpc import evaluate as evaluate_mod
from hpc import train as train_mod
from medattn.data.fake import write_fake_prepared
from medattn.data.prepared import PreparedDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

FAST = ["data.image_size=32", "data.resize=32", "stages.*.epochs=1", "stages.*.batch_size=16", "data.num_workers=0",
        "data.loader=torch", "runtime.tensorboard=false", "runtime.progress=none", "agcnn.crop_source=input"]


def test_split_hash_is_the_assignment(tmp_path):
    ds = PreparedDataset.open(write_fake_prepared(tmp_path / "a", n=48, size=32, seed=5, classes=4))
    rec = ds.split_record()
    assert rec["name"] == "random" and rec["seed"] == 5 and len(rec["hash"]) == 16
    # Row order, image size and shards do not change it; moving one image to another part does.
    shuffled = PreparedDataset(ds.root, ds.info, ds.manifest.sample(frac=1.0, random_state=0).reset_index(drop=True))
    assert shuffled.split_record() == rec
    moved = ds.manifest.copy()
    moved.loc[0, "split"] = "test" if moved.loc[0, "split"] != "test" else "train"
    assert PreparedDataset(ds.root, ds.info, moved).split_record()["hash"] != rec["hash"]


def test_checkpoint_eval_and_report_keep_the_split_and_eval_refuses_another(tmp_path, capsys):
    from hpc.report import build_report

    prep = write_fake_prepared(tmp_path / "prep", n=48, size=32, seed=5, classes=4)
    other = write_fake_prepared(tmp_path / "other", n=48, size=32, seed=6, classes=4)
    rec = PreparedDataset.open(prep).split_record()
    rec_other = PreparedDataset.open(other).split_record()
    assert rec["hash"] != rec_other["hash"]
    run = tmp_path / "run"
    assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), "--stages", "global",
                           *FAST]) == 0
    for kind in ("best", "last"):
        ck = torch.load(run / "ckpt" / "global" / f"{kind}.pt", map_location="cpu", weights_only=True)
        assert ck["spec"]["split"] == rec, kind
    assert json.loads((run / "provenance.json").read_text())[-1]["split"] == rec

    assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "0"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["split_provenance"] == {**rec, "trained_on": rec, "same_as_training": True}
    md = build_report(run, samples=0, log=lambda *a: None).markdown.read_text()
    assert f"Split 'random', seed 5, assignment hash {rec['hash']} (the split the model was trained on)" in md

    # Another split: refused by name, nothing written.
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert evaluate_mod.main(["--run", str(run), "--data", str(other), "--bootstrap", "0",
                              "--out-dir", str(refused)]) != 0
    err = capsys.readouterr().err
    assert f"split 'random' (seed 6, hash {rec_other['hash']}) differs from the split 'random' (seed 5, hash " \
           f"{rec['hash']})" in err and "--allow-split-mismatch" in err and str(other) in err
    assert not refused.exists()
    # Asked for: evaluated, both recorded, and the report warns.
    assert evaluate_mod.main(["--run", str(run), "--data", str(other), "--bootstrap", "0",
                              "--allow-split-mismatch"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["split_provenance"] == {**rec_other, "trained_on": rec, "same_as_training": False}
    md = build_report(run, samples=0, data=str(other), log=lambda *a: None).markdown.read_text()
    assert "Evaluated on another split than the model was trained on." in md
