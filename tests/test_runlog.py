"""What a run tells its user: TensorBoard (hparams, PR curves, heat-map overlays), ETAs in the log,
and the warnings about the data at the start (upsampling, a validation split too small for AUROC)."""
from __future__ import annotations

import pytest

from hpc import train as train_mod
from hpc.runlog import flatten, format_duration
from prepfix import make_prepared

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

N = 6  # data.max_samples: a validation split this small lacks positives for some labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of AG-CNN's global stage on 6 images per split, at 40 px from 32 px prepared
    images (upsampled), with the log captured."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("runlog")
    prep = make_prepared(tmp / "prep", n=64, size=32, seed=3)
    run = tmp / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), "--stages", "global",
                             "data.image_size=32", "data.resize=40", "stages.global.epochs=2",
                             "stages.*.batch_size=2", f"data.max_samples={N}", "data.num_workers=0",
                             "runtime.log_every=1", "runtime.progress=log"])
    assert rc == 0, buf.getvalue()[-3000:]
    return prep, run, buf.getvalue()


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_tensorboard_pr_curves_heatmaps_and_hparams(trained):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.pr_curve import metadata as pr_metadata

    from medattn.data.prepared import PreparedDataset

    prep, run, _ = trained
    ds = PreparedDataset.open(prep)
    val = ds.indices("val")[:N]
    y = ds.labels_matrix()[val]
    with_pos = [n for j, n in enumerate(ds.label_names) if n in ds.eval_labels and y[:, j].any()]
    assert with_pos
    ea = _events(run)
    tags = ea.Tags()
    # a PR curve per evaluated label with a positive, once per validation (2 epochs)
    pr_tags = sorted(t for t in tags["tensors"] if t.startswith("global/val_pr/"))
    assert pr_tags == sorted(f"global/val_pr/{n}" for n in with_pos)
    for t in pr_tags:
        events = ea.Tensors(t)
        assert [e.step for e in events] == sorted({e.step for e in events}) and len(events) == 2
        assert ea.SummaryMetadata(t).plugin_data.plugin_name == pr_metadata.PLUGIN_NAME
        curve = __import__("tensorboard.util.tensor_util", fromlist=["x"]).make_ndarray(events[-1].tensor_proto)
        tp, fp = curve[0], curve[1]  # rows: TP, FP, TN, FN, precision, recall; columns: thresholds
        n_pos = int(y[:, ds.label_names.index(t.rsplit("/", 1)[1])].sum())
        assert tp[0] == n_pos and tp[0] + fp[0] == N  # threshold 0: everything predicted positive
    # heat-map overlays: 4 images side by side, once per validation, RGB
    images = ea.Images("global/val_heatmaps")
    assert len(images) == 2 and images[0].width == 4 * images[0].height
    # hparams at the run's end: the flattened config and the final metrics
    meta = ea.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(meta).session_start_info
    assert start.hparams["stages.global.epochs"].number_value == 2
    assert start.hparams["model.backbone"].string_value == "resnet18"
    assert start.hparams["data.max_samples"].number_value == N
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        ea.SummaryMetadata("_hparams_/experiment").plugin_data.content).experiment
    metric_tags = {m.name.tag for m in exp.metric_infos}
    assert {"final/global/best", "final/val/global/mean_auroc"} <= metric_tags
    best = [e.value for e in ea.Scalars("final/global/best")]
    import json

    assert best == [pytest.approx(json.loads((run / "state.json").read_text())["stages"]["global"]["best_metric"])]


def test_eta_in_log_lines(trained):
    _, _, out = trained
    steps = [line for line in out.splitlines() if " step " in line and "[global] epoch" in line]
    assert steps and all("| ETA epoch " in line and " stage " in line and " run " in line for line in steps)
    ends = [line for line in out.splitlines() if "val/global/mean_auroc" in line]
    assert len(ends) == 2 and all("| ETA stage " in line for line in ends)
    assert ends[-1].endswith("ETA stage 0:00 run 0:00")  # nothing left after the last epoch
    assert (format_duration(75), format_duration(3725), format_duration(-3)) == ("1:15", "1:02:05", "0:00")
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}


def test_warnings_at_train_start(trained):
    from medattn.data.prepared import PreparedDataset

    prep, _, out = trained
    assert ("WARNING: data.resize=40, data.image_size=32: above the prepared size 32 of" in out
            and "prepare the data at --size 40 or more" in out)
    ds = PreparedDataset.open(prep)
    y = ds.labels_matrix()[ds.indices("val")[:N]]
    no_pos = [n for n in ds.eval_labels if not y[:, ds.label_names.index(n)].any()]
    assert no_pos, "the fixture should leave some label without a positive"
    line = next(x for x in out.splitlines() if "too small for per-class AUROC" in x)
    assert f"the validation split 'val' ({N} images)" in line and f"no positives for {', '.join(no_pos)}" in line


def test_eta_in_the_progress_bar(tmp_path, capsys, monkeypatch):
    import time as time_mod

    from hpc.run import Run
    from hpc.runlog import RunLogger

    now = [1000.0]
    monkeypatch.setattr(time_mod, "time", lambda: now[0])
    lg = RunLogger(Run(tmp_path / "r"), primary=True, progress="bar", tensorboard=False)
    lg.set_plan({"global": (3, 10), "local": (2, 5)})
    lg.start_epoch("global", 0, 3, 10, 0)
    for step in range(1, 5):
        now[0] += 2.0  # 2 s per step
        lg.step(step, {"loss": 0.5}, step * 8)
    # epoch: 6 steps left; stage: + 2 epochs of 10 steps; run: + local's 2 x 5 steps, all at 2 s/step
    assert lg.eta == {"epoch": 12.0, "stage": 52.0, "run": 72.0}
    assert lg._bar.postfix == "loss=0.5, stage_eta=0:52, run_eta=1:12"
    lg.close()
