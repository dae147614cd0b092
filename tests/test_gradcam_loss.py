"""Seed 002's Grad-CAM attention loss: Grad-CAM and regions by hand, the published variant's
gradient (= lam * CE gradient), the task subsets and the class-folder layout, and both variants
through the runtime (the differentiable term raises r on synthetic lesions; eval reports the
binary-task table)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medattn.config import load_config
from medattn.errors import ConfigError, DataError
from medattn.gradcam import (REGION_CODE, gradcam, lung_box_in_view, region_masks, region_ratio)
from medattn.methods import DataSpec, create_method

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------------------------- Grad-CAM
class _ConvGapLinear(nn.Module):
    """A = conv(x); logits = W mean_xy(A) + b: Grad-CAM of class c is ReLU(sum_k W_ck A_k / hw)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))

    def gradcam_layer(self):
        return self.conv


def test_gradcam_equals_the_hand_computed_map():
    torch.manual_seed(0)
    model = _ConvGapLinear()
    x = torch.randn(2, 1, 5, 5)
    target = torch.tensor([1, 0])
    cam, logits = gradcam(model, x, target)
    a = model.conv(x).detach().numpy()  # (2, 3, 5, 5)
    w = model.fc.weight.detach().numpy()
    for i in range(2):
        m = np.maximum((w[target[i]][:, None, None] * a[i]).sum(0) / 25.0, 0)
        m = (m - m.min()) / (m.max() + 1e-7)
        np.testing.assert_allclose(cam[i].numpy(), m, rtol=1e-5, atol=1e-6)
    # target None = the predicted class, as the published code scores it
    pred, _ = gradcam(model, x, None)
    torch.testing.assert_close(pred, gradcam(model, x, logits.argmax(1))[0])
    assert not cam.requires_grad and all(p.grad is None for p in model.parameters())


def test_batched_gradcam_equals_one_sample_at_a_time():
    from medattn.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_chans=1).eval()
    x = torch.randn(4, 1, 64, 64)
    t = torch.tensor([0, 2, 1, 2])
    batched, _ = gradcam(model, x, t, layer="layer3")
    assert batched.shape == (4, 64, 64) and float(batched.min()) >= 0 and float(batched.max()) <= 1
    for i in range(4):
        one, _ = gradcam(model, x[i:i + 1], t[i:i + 1], layer="layer3")
        torch.testing.assert_close(batched[i], one[0], rtol=1e-4, atol=1e-5)
    # differentiable maps carry a graph to the parameters
    diff, _ = gradcam(model, x[:1], t[:1], layer="layer3", create_graph=True)
    assert diff.requires_grad
    with pytest.raises(ConfigError, match="no such submodule"):
        gradcam(model, x, t, layer="layer9")


def test_regions_are_cut_as_published():
    h = w = 10
    box = torch.tensor([[0.2, 0.1, 0.8, 0.9]])  # view [x0, y0, x1, y1] -> pixels 2..8 x 1..9, mid row 5
    rows, cols = np.mgrid[0:h, 0:w]
    inside = (cols >= 2) & (cols < 8)
    expected = {
        "lower": (rows >= 5) & (rows < 9) & inside,
        "upper": (rows >= 1) & (rows < 5) & inside,
        "outside": ~((rows >= 1) & inside),
        "lung": (rows >= 1) & (rows < 9) & inside,
        "none": np.zeros((h, w), bool),
    }
    for name, want in expected.items():
        got = region_masks(box, torch.tensor([REGION_CODE[name]]), h, w)[0].numpy().astype(bool)
        np.testing.assert_array_equal(got, want, err_msg=name)

    # lung box [x, y, w, h] of the prepared image -> the view: window x 0.2..0.7, then mirrored
    lung = torch.tensor([[0.25, 0.1, 0.2, 0.5], [float("nan")] * 4])
    window = torch.tensor([[0.2, 0.0, 0.7, 1.0]] * 2)
    out = lung_box_in_view(lung, window, torch.tensor([True, False]))
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.1, 0.9, 0.6]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # unknown: the whole view

    cam = torch.zeros(1, h, w)
    cam[0, 5:7, 2:8] = 0.9  # 12 of the 24 lower-region pixels above 0.3
    cam[0, 7, 2:8] = 0.3    # exactly at the threshold: not above it
    lower = region_masks(box, torch.tensor([1]), h, w)
    assert float(region_ratio(cam, lower, 0.3)) == pytest.approx(12 / 24)
    soft = region_ratio(cam, lower, 0.3, temperature=0.05)
    by_hand = (12 * torch.sigmoid(torch.tensor(12.0)) + 6 * 0.5 + 6 * torch.sigmoid(torch.tensor(-6.0))) / 24
    assert float(soft) == pytest.approx(float(by_hand), rel=1e-5)


# ------------------------------------------------------------------------------------- the loss
SPEC = DataSpec(("No Finding", "Effusion"), ("Effusion",), "singlelabel", 1, 32)


def _batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor([1, 0, 1, 1])[:n]
    return {"image": torch.randn(n, 1, 32, 32, generator=g), "target": target,
            "labels": nn.functional.one_hot(target, 2).float(),
            "lung_box": torch.tensor([[0.15, 0.1, 0.7, 0.8]] * n),
            "window": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n), "flip": torch.zeros(n, dtype=torch.bool)}


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _method_model_copy_batch(overrides):
    """gradcam_demo with ``overrides``: the method, a seeded model in train mode, an untouched
    copy of it for reference gradients, and a batch."""
    method = create_method(load_config("gradcam_demo", overrides), SPEC)
    torch.manual_seed(0)
    model = method.build_model().train()
    return method, model, copy.deepcopy(model), _batch()


@pytest.mark.parametrize("lam", [0.5, 0.25])
def test_published_variant_gradient_is_exactly_lambda_times_ce_gradient(lam):
    method, model, reference, batch = _method_model_copy_batch(
        ["gradcam_loss.variant=published", "gradcam_loss.target=predicted", f"gradcam_loss.lam={lam}",
         "gradcam_loss.layer=layer2"])

    loss, logs = method.training_loss(model, batch, "train", 0)
    assert all(p.grad is None for p in model.parameters())  # the map pass accumulated nothing
    assert all(m.training for m in model.modules())  # evaluation mode was restored
    assert 0 < float(logs["att"]) <= 1  # a real attention value, not zero
    loss.backward()
    ce = nn.functional.cross_entropy(reference(batch["image"]), batch["target"])
    (lam * ce).backward()
    for g, r in zip(_grads(model), _grads(reference)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert float(loss.detach()) == pytest.approx(lam * float(ce.detach()) + (1 - lam) * float(logs["att"]), rel=1e-5)


def test_differentiable_variant_moves_the_gradient():
    method, model, reference, batch = _method_model_copy_batch(["gradcam_loss.lam=0.5", "gradcam_loss.layer=layer2"])
    loss, logs = method.training_loss(model, batch, "train", 0)
    assert loss.requires_grad and logs["att"] > 0
    loss.backward()
    ce = nn.functional.cross_entropy(reference(batch["image"]), batch["target"])
    (0.5 * ce).backward()
    diff = max(float((g - r).abs().max()) for g, r in zip(_grads(model), _grads(reference)))
    assert diff > 1e-4  # the attention term has its own gradient
    # a batch of No Finding images has no region: the loss is lam * CE exactly
    nf = _batch(n=2)
    nf["target"] = torch.zeros(2, dtype=torch.long)
    loss_nf, logs_nf = method.training_loss(model, nf, "train", 0)
    assert float(logs_nf["att"]) == 0.0 and float(loss_nf.detach()) == pytest.approx(0.5 * float(logs_nf["ce"]))


def test_adaptive_lambda_and_config_checks():
    method = create_method(load_config("gradcam_demo", ["gradcam_loss.adaptive=true"]), SPEC)
    assert [round(method.lam(e), 6) for e in (0, 1, 10, 34, 35, 99)] == [1.0, 0.977, 0.77, 0.218, 0.2, 0.2]
    method.start_epoch_hook(None, "train", 10)
    assert method.current_lam == pytest.approx(0.77)
    multi = DataSpec(("Effusion", "Mass", "No Finding"), ("Effusion", "Mass"), "multilabel", 1, 32)
    with pytest.raises(ConfigError, match="target=predicted needs a single-label"):
        create_method(load_config("gradcam_demo", ["gradcam_loss.target=predicted"]), multi)
    with pytest.raises(ConfigError, match="regions.Effusion"):
        create_method(load_config("gradcam_demo", ["gradcam_loss.regions.Effusion=left"]), SPEC)
    nothing = DataSpec(("No Finding", "Mass"), ("Mass",), "singlelabel", 1, 32)
    with pytest.raises(ConfigError, match="none of the dataset's classes"):
        create_method(load_config("gradcam_demo"), nothing)
    create_method(load_config("gradcam_demo", ["gradcam_loss.regions.Mass=lung"]), nothing)
    with pytest.raises(ConfigError, match="rotate_deg"):
        create_method(load_config("gradcam_demo", ["data.rotate_deg=10"]), SPEC)
    with pytest.raises(ConfigError, match="lung boxes"):
        m = create_method(load_config("gradcam_demo"), SPEC)
        b = _batch()
        del b["lung_box"]
        m.training_loss(m.build_model(), b, "train", 0)


def test_multilabel_data_scores_each_positive_class_with_a_region():
    spec = DataSpec(("Effusion", "Mass", "Pneumothorax", "No Finding"), ("Effusion", "Mass", "Pneumothorax"),
                    "multilabel", 1, 32)
    method = create_method(load_config("gradcam_demo", ["gradcam_loss.layer=layer2"]), spec)
    torch.manual_seed(0)
    model = method.build_model().train()
    b = _batch()
    b["labels"] = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.float32)
    b["target"] = torch.full((4,), -1)
    loss, logs = method.training_loss(model, b, "train", 0)
    loss.backward()
    out = method.predict(model.eval(), b, "train")
    r = out["extras"]["r"]
    assert torch.isnan(r[1]) and torch.isnan(r[2]) and not torch.isnan(r[0]) and not torch.isnan(r[3])
    assert out["probs"]["main"].shape == (4, 4) and out["heatmap"].shape == (4, 32, 32)


# ------------------------------------------------------------------------------------- task subsets
def _entries() -> pd.DataFrame:
    """NIH-like metadata: 12 Effusion, 6 Pneumothorax and 40 healthy patients, plus noise."""
    rows = []

    def add(patient, labels, k):
        rows.append({"image": f"{patient:08d}_{k:03d}.png", "patient": patient, "labels": labels,
                     "source_row": len(rows) + 2})

    for p in range(1, 13):  # Effusion patients: 1-3 single-label images, one multi-label image
        for k in range(1 + p % 3):
            add(p, ["Effusion"], k)
        add(p, ["Effusion", "Mass"], 5)
    for p in range(13, 19):  # Pneumothorax patients (one also has an Effusion image)
        add(p, ["Pneumothorax"], 0)
        add(p, ["Pneumothorax"], 1)
    add(13, ["Effusion"], 2)
    for p in range(19, 25):  # sick elsewhere: No Finding images that must not be used
        add(p, ["No Finding"], 0)
        add(p, ["Effusion", "Infiltration"], 1)
    for p in range(25, 65):  # healthy patients
        add(p, ["No Finding"], 0)
        add(p, ["No Finding"], 1)
    for p in range(65, 70):
        add(p, ["Mass"], 0)
    return pd.DataFrame(rows)


def test_task_subsets_follow_the_published_recipe_patient_disjoint():
    from medattn.data._source_tasks import select_task

    e = _entries()
    labels = dict(zip(e["image"], e["labels"]))
    patient = dict(zip(e["image"], e["patient"]))
    for task, diseases in (("nf_effusion", ["Effusion"]), ("nf_pneumothorax", ["Pneumothorax"]),
                           ("nf_effusion_pneumothorax", ["Effusion", "Pneumothorax"])):
        split = select_task(e, task, seed=0)
        imgs = split.index.tolist()
        assert all(len(labels[i]) == 1 and labels[i][0] in ["No Finding", *diseases] for i in imgs)
        by_patient = pd.Series(split.values, index=[patient[i] for i in imgs]).groupby(level=0).nunique()
        assert (by_patient == 1).all(), task  # no patient in two splits
        nf = [i for i in imgs if labels[i] == ["No Finding"]]
        sick = {patient[i] for i, v in labels.items() if set(v) & set(diseases)}
        assert nf and not {patient[i] for i in nf} & sick  # never from a patient with the disease
        for s in ("train", "val", "test"):
            counts = {c: sum(1 for i in imgs if split[i] == s and labels[i] == [c]) for c in ["No Finding", *diseases]}
            # 1:1 (three-class: Effusion sampled down to the Pneumothorax count, No Finding to match)
            assert counts["No Finding"] == max(counts[d] for d in diseases) > 0, (task, s, counts)
            if len(diseases) == 2:
                assert counts["Effusion"] <= counts["Pneumothorax"], (task, s, counts)
        if task == "nf_effusion":  # every single-label Effusion image is used; ~60/20/20
            assert sum(1 for i in imgs if labels[i] == ["Effusion"]) == 25
            n = split.value_counts()
            assert n["train"] > n["val"] and n["train"] > n["test"]
    # reproducible, whatever the hash seed (the published random.sample over sets is not)
    code = ("import pickle,sys; sys.path.insert(0, 'tests'); from test_gradcam_loss import _entries; "
            "from medattn.data._source_tasks import select_task; "
            "print(select_task(_entries(), 'nf_effusion_pneumothorax', 7).to_json())")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = subprocess.run([sys.executable, "-c", code], env=_env(PYTHONHASHSEED=seed), cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == select_task(e, "nf_effusion_pneumothorax", 7).to_dict()


def test_task_sizes_on_the_real_metadata(shared_nih):
    """On the real v2020 metadata the Effusion task has the published size (791 per class in val
    and test, from the released log), from all 3,955 single-label Effusion images."""
    from medattn.data._source_tasks import select_task
    from medattn.data.nih import load_nih

    e = load_nih(shared_nih).entries.reset_index(drop=True)
    labels = dict(zip(e["image"], e["labels"]))
    split = select_task(e, "nf_effusion", 0)
    n = pd.crosstab(split.to_numpy(), [labels[i][0] for i in split.index])
    assert (n["Effusion"] == n["No Finding"]).all() and n["Effusion"].sum() == 3955
    assert abs(n.loc["val", "Effusion"] - 791) <= 20 and abs(n.loc["test", "Effusion"] - 791) <= 20


HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def _nih_root(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    (root / "images").mkdir()
    e = _entries()
    lines = [HEADER]
    for r in e.itertuples():
        lines.append(f"{r.image},{'|'.join(r.labels)},{r.image[9:12]},{r.patient},50,M,PA,1024,1024,0.14,0.14")
        Image.fromarray(np.full((16, 16), r.patient % 200, np.uint8)).save(root / "images" / r.image)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_task_and_imagefolder_layouts(tmp_path, capsys):
    from medattn.cli import main as cli
    from medattn.data.fake import write_fake_chest_folder
    from medattn.data.prepared import PreparedDataset

    nih = _nih_root(tmp_path / "nih")
    assert cli(["prepare", "--root", str(nih), "--task", "nf_pneumothorax", "--out", str(tmp_path / "p"),
                "--size", "16", "--workers", "1", "--no-progress"]) == 0
    ds = PreparedDataset.open(tmp_path / "p")
    assert ds.task == "singlelabel" and ds.label_names == ["No Finding", "Pneumothorax"]
    assert ds.eval_labels == ["Pneumothorax"] and ds.info["split"] == "task"
    man = ds.manifest
    assert set(man["finding_labels"]) == {"No Finding", "Pneumothorax"}
    assert (man["target"] == man["labels"].map(lambda v: int(np.argmax(v)))).all()
    assert (man["target"] == 1).sum() == (man["target"] == 0).sum() == 12
    assert cli(["prepare", "--root", str(nih), "--task", "nf_effusion", "--split", "random",
                "--out", str(tmp_path / "q")]) == 2
    assert "--split does not apply to --task" in capsys.readouterr().err

    src = write_fake_chest_folder(tmp_path / "folders", counts={"train": 2, "val": 1, "test": 1}, size=16,
                                  classes=("No Finding", "Effusion", "Pneumothorax"))
    assert cli(["prepare", "--layout", "imagefolder", "--root", str(src / "images"), "--out", str(tmp_path / "f"),
                "--size", "16", "--workers", "1", "--no-progress"]) == 0
    f = PreparedDataset.open(tmp_path / "f")
    # class order = sorted folder names (0NoFinding, 1Effusion, 2Pneumothorax), canonical names
    assert f.label_names == ["No Finding", "Effusion", "Pneumothorax"] and f.eval_labels == f.label_names
    assert f.info["source"]["folders"] == ["0NoFinding", "1Effusion", "2Pneumothorax"]
    assert f.info["counts"] == {"train": 6, "val": 3, "test": 3} and not f.info["has_lung_boxes"]
    # a patient in two splits, and a class folder that train/ lacks, are named
    from medattn.data._source_imagefolder import imagefolder_table

    one = next((src / "images" / "val" / "1Effusion").iterdir())
    dup = src / "images" / "test" / "1Effusion" / (one.name[:9] + "001.png")
    dup.write_bytes(one.read_bytes())
    with pytest.raises(DataError, match=f"patient {int(one.name[:8])} is in two splits"):
        imagefolder_table(src / "images")
    dup.unlink()
    (src / "images" / "val" / "3Mass").mkdir()
    with pytest.raises(DataError, match="'3Mass' is not in train/"):
        imagefolder_table(src / "images")


# ------------------------------------------------------------------------------------- runtime
@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """NF vs Effusion chest-like images whose Effusion images all carry a corner marker (a
    shortcut outside the lungs), prepared with lung boxes from the masks."""
    from medattn.data.fake import write_fake_chest_folder
    from medattn.data.prepare import prepare

    root = tmp_path_factory.mktemp("chest")
    write_fake_chest_folder(root / "src", counts={"train": 32, "val": 16, "test": 8}, size=64, seed=1, marker=1.0)
    prepare(root / "src/images", root / "prep", layout="imagefolder", masks=root / "src/masks", size=64,
            workers=1, progress=False)
    return root / "prep"


FAST = ["data.image_size=32", "data.resize=32", "gradcam_loss.layer=layer2", "stages.train.batch_size=8",
        "stages.train.epochs=2", "runtime.progress=none", "runtime.tensorboard=false", "data.loader=torch", "seed=1"]


def _val(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def test_differentiable_loss_raises_r_over_cross_entropy_and_eval_reports_the_binary_table(chest, tmp_path):
    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod

    runs = {}
    for name, lam in (("ce", 1.0), ("diff", 0.5)):
        runs[name] = tmp_path / name
        assert train_mod.main(["--config", "gradcam_demo", "--data", str(chest), "--out", str(runs[name]),
                               f"gradcam_loss.lam={lam}", *FAST]) == 0
    r = {k: _val(v, "val/main/r") for k, v in runs.items()}
    mass = {k: _val(v, "val/main/cam_in_region") for k, v in runs.items()}
    print(f"\nmean validation r: CE {np.mean(r['ce']):.3f} {r['ce']}, "
          f"differentiable {np.mean(r['diff']):.3f} {r['diff']}")
    print(f"map share in the region: CE {np.mean(mass['ce']):.3f}, differentiable {np.mean(mass['diff']):.3f}")
    assert np.mean(r["diff"]) >= 0.9 and np.mean(r["diff"]) > np.mean(r["ce"]) + 0.3
    assert np.mean(mass["diff"]) > np.mean(mass["ce"])
    assert _val(runs["diff"], "train/lam") == [0.5, 0.5] and _val(runs["ce"], "train/lam") == [1.0, 1.0]

    assert evaluate_mod.main(["--run", str(runs["diff"]), "--bootstrap", "0"]) == 0
    m = json.loads((runs["diff"] / "eval" / "metrics.json").read_text())
    b = m["binary"]
    assert b["positive_class"] == "Effusion" and m["task"] == "singlelabel"
    rep = b["main"]
    assert rep["n"] == 16 and rep["n_pos"] == 8 and rep["auroc"] == pytest.approx(m["auroc"]["main"]["Effusion"])
    assert {"threshold", "sensitivity", "specificity", "youden_j"} <= set(rep["at_youden"])
    per = pd.read_csv(runs["diff"] / "eval" / "per_image.csv")
    assert len(per) == 16 and per["r"].isna().sum() == 8  # No Finding images have no region
    assert m["per_image"]["r"]["n"] == 8 and m["per_image"]["r"]["mean"] == pytest.approx(per["r"].mean())
    # the report shows the same binary table
    from hpc.report.build import build_report

    build_report(runs["diff"], samples=2)
    md = (runs["diff"] / "report" / "report.md").read_text()
    assert "Binary task: Effusion vs the rest" in md
    youden = rep["at_youden"]
    assert f"| main | {rep['auroc']:.3f} | Youden | {youden['threshold']:.3f} | {youden['sensitivity']:.3f} |" in md


def test_differentiable_loss_under_torchrun_with_two_processes(chest, tmp_path):
    """The double backward inside DDP's forward: two gloo processes, one epoch, DALI-free."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "medattn",
           "train", "--config", "gradcam_demo", "--data", str(chest), "--out", str(out), "gradcam_loss.lam=0.5",
           *FAST, "stages.train.epochs=1", "data.num_workers=0"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["world_size"] == 2 and 0 <= rec["train/att"] <= 1 and 0 <= rec["val/main/r"] <= 1
    assert (out / "ckpt" / "train" / "best.pt").is_file()
