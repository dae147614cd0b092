"""runtime.sync_bn: where batch norm is synchronised (auto: every multi-process CUDA run of a model
with batch norm; never on one process; never on CPU, where PyTorch cannot), what the log says
about it, and that a SyncBatchNorm model's checkpoint (weights and running statistics) loads into
the plain model that eval, predict and export build.

No GPU here: the decision is tested with a CUDA device object (creating one needs no GPU), and
the conversion is PyTorch's own (convert_sync_batchnorm) on CPU tensors; without a process group
a SyncBatchNorm in training mode normalises like BatchNorm and updates its running statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc import distributed
from hpc.distributed import World, sync_bn_plan
from medattn.config import list_configs, load_config
from medattn.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

FAST = ["model.weights=none", "data.image_size=32", "data.resize=32", "agcnn.crop_source=input"]
STAGES = ["global", "local", "fusion"]


def _bn_kinds(model: torch.nn.Module) -> tuple[int, int]:
    """(SyncBatchNorm modules, other batch norm modules)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    return sync, len(bns) - sync


def test_sync_bn_default_and_choices():
    assert load_config("demo").runtime.sync_bn == "auto"
    assert load_config("demo", ["runtime.sync_bn=false"]).runtime.sync_bn is False
    assert load_config("demo", ["runtime.sync_bn=true"]).runtime.sync_bn is True
    with pytest.raises(ConfigError, match="runtime.sync_bn.*auto, true, false"):
        load_config("demo", ["runtime.sync_bn=sometimes"])
    # Every shipped preset (the multi-GPU ones in docs/reproduce.md included) synchronises.
    for name in list_configs():
        assert load_config(name).runtime.sync_bn in ("auto", True), name
    # A config saved before sync_bn had 'auto' still loads, as it ran.
    assert "sync_bn: auto" in load_config("dualattendmed_cal").to_yaml()


@pytest.mark.parametrize("setting,world,dev,has_bn,convert", [
    ("auto", 8, "cuda", True, True),
    (True, 2, "cuda", True, True),
    ("auto", 1, "cuda", True, False),   # one process sees the whole global batch
    ("auto", 8, "cuda", False, False),  # nothing to synchronise (e.g. VGG16 without BN, PVT)
    ("auto", 2, "cpu", True, False),    # gloo: SyncBatchNorm is CUDA-only
    (False, 8, "cuda", True, False),
])
def test_sync_bn_decision(setting, world, dev, has_bn, convert):
    got, msgs = sync_bn_plan(setting, world, dev, has_bn, {"main": 16 // world or 1})
    assert got is convert
    text = " ".join(m for _, m in msgs)
    if dev == "cpu":
        assert [lvl for lvl, _ in msgs] == ["info"]
        assert "cannot be synchronised on cpu" in text and "CUDA-only" in text
    if convert:
        assert "SyncBatchNorm" in text
    if world == 1 or not has_bn:
        assert msgs == []


def test_sync_bn_off_warns_naming_the_per_gpu_batch():
    convert, msgs = sync_bn_plan(False, 8, "cuda", True, {"global": 128 // 8, "local": 32 // 8})
    assert not convert
    assert [lvl for lvl, _ in msgs] == ["warning"]
    assert "4 per GPU in stage local" in msgs[0][1] and "global" not in msgs[0][1].split("(")[0]
    # 16 or more per GPU: no warning
    assert sync_bn_plan(False, 8, "cuda", True, {"global": 16})[1] == []


def _demo_model():
    from medattn.methods import DataSpec, build

    cfg = load_config("demo", FAST)
    names = tuple(f"c{i}" for i in range(4))
    spec = DataSpec(names, names, "multilabel", 1, 32)
    return cfg, spec, *build(cfg, spec)


def test_conversion_happens_where_it_should():
    from hpc.train import apply_sync_bn

    cfg, _, _, model = _demo_model()
    n_bn = _bn_kinds(model)[1]
    assert n_bn > 0
    out, msgs = apply_sync_bn(model, cfg, World(rank=0, world_size=4, local_world_size=4), torch.device("cuda"),
                              STAGES)
    assert _bn_kinds(out) == (n_bn, 0)
    assert any("SyncBatchNorm" in m for _, m in msgs)
    for world, dev, sync_bn in ((World(), "cuda", "auto"), (World(world_size=4), "cpu", "auto"),
                                (World(world_size=4), "cuda", "false")):
        cfg2, _, _, plain = _demo_model()
        cfg2.runtime.sync_bn = False if sync_bn == "false" else sync_bn
        out, _ = apply_sync_bn(plain, cfg2, world, torch.device(dev), STAGES)
        assert _bn_kinds(out) == (0, n_bn), (world, dev, sync_bn)


def test_synced_checkpoint_loads_into_plain_model_for_eval_predict_export(tmp_path):
    """A model trained with SyncBatchNorm: its running statistics move, its checkpoint is saved as
    the trainer saves it, and load_model (eval), predict.load and export rebuild a plain BatchNorm
    model that gives the synced model's eval-mode outputs."""
    from hpc.checkpoint import weights_payload
    from hpc.export import ExportedModel, export_predictor
    from hpc.predict import load as load_predictor
    from hpc.inference import load_model
    from hpc.run import Run

    torch.manual_seed(0)
    cfg, spec, method, model = _demo_model()
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert _bn_kinds(model)[0] > 0
    sync_bn = next(m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm))
    before = sync_bn.running_mean.clone()
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = {"image": torch.rand(4, 1, 32, 32, generator=g) * 2,
                 "view_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4)}
        method.forward(model, batch, "global")
    assert not torch.equal(sync_bn.running_mean, before)  # the statistics were trained
    model.eval()

    run = Run(tmp_path / "run")
    run.root.mkdir()
    run.save_config(cfg)
    run.save_checkpoint("global", "best", weights_payload("global", model, method, epoch=1, metric=0.5,
                                                          metric_name="val/global/mean_auroc",
                                                          config=cfg.to_dict()))
    run.mark_stage("global", done=True, best_metric=0.5, best_epoch=1)

    lr = load_model(run, "global", "best", "cpu")
    assert _bn_kinds(lr.model) == (0, _bn_kinds(model)[0])
    synced = dict(model.state_dict())
    for k, v in lr.model.state_dict().items():
        torch.testing.assert_close(v, synced[k], rtol=0, atol=0)
    x = {"image": torch.rand(3, 1, 32, 32, generator=g),
         "view_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)}
    with torch.no_grad():
        ref = method.predict(model, x, "global")["probs"]["global"]
        got = lr.method.predict(lr.model, x, "global")["probs"]["global"]
    torch.testing.assert_close(got, ref)

    p = load_predictor(run, "global", device="cpu")
    assert _bn_kinds(p.model)[0] == 0
    path = export_predictor(p, tmp_path / "model.pt", fmt="torchscript")
    images = torch.randint(0, 256, (2, 1, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        exported = torch.jit.load(str(path))(images)
        from_synced = ExportedModel(method, model, "global", p.view, p.branch).eval()(images)
    np.testing.assert_allclose(exported.numpy(), from_synced.numpy(), rtol=1e-5, atol=1e-6)
