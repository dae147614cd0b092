"""A training step waits for nothing: zero host-device synchronisations in steady-state steps of
every stage of the demo configs of AG-CNN, DualAttendMed, the Grad-CAM attention loss and
VGG16+LKA, counted by ``medattn bench train --count-syncs`` (hpc/syncs.py: the aten ops that make
a CUDA host wait, seen on a CPU), through the trainer's own step (hpc.train.Stepper) and loader.

Also zero tensors built from Python data per step (each one a blocking host-to-device copy on a
GPU, invisible as a copy on a CPU machine), and the periodic read of the logged means (every
``runtime.log_every`` steps) is the only place the trainer reads from the device.
"""
from __future__ import annotations

import argparse
import json

import pytest

from hpc.benchmarks import train as bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["data.image_size=32", "data.resize=40", "stages.*.batch_size=8", "data.num_workers=0"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    from medattn.data.fake import write_fake_prepared

    return write_fake_prepared(tmp_path_factory.mktemp("fake") / "prep", n=96, size=48, classes=14, lung_boxes=True,
                               splits=(0.8, 0.1, 0.1))


@pytest.mark.parametrize("config, extra", [
    ("demo", []),
    ("dualattendmed_demo", []),
    ("gradcam_demo", []),
    ("vgg_lka_demo", []),
    ("demo", ["agcnn.crop_source=input", "agcnn.threshold=otsu", "stages.local.loss=focal",
              "focal.class_alpha=[0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25]"]),
])
def test_steady_state_steps_have_no_host_sync(fake, config, extra, tmp_path):
    args = argparse.Namespace(config=config, overrides=[*SMALL, *extra], batch=0, per_gpu_batch=0, device="cpu",
                              threads=1)
    env = bench._setup(args, str(fake))
    from hpc import distributed

    try:
        stages = env["cfg"].stage_names()
        rows = []
        for stage in stages:
            rows += bench.measure_stage(env, stage, ["trainer"], steps=1, warmup=1, count=2)
    finally:
        distributed.shutdown()
    assert [r["stage"] for r in rows] == stages
    for r in rows:
        assert r["sync_ops_per_step"] == 0, (config, r["stage"], r["sync_ops"])
        assert r["host_tensors_per_step"] == 0, (config, r["stage"])
        assert r["ops_per_step"] > 50  # the counter saw the step
        assert 1 <= r["sync_ops_per_log"] <= 10  # one read per logged value, every log_every steps
    (tmp_path / f"{config}.json").write_text(json.dumps(rows, default=str))


def test_the_counter_sees_a_sync_in_a_step(fake):
    """The measurement is not blind: a method step that reads a value on the host is counted."""
    args = argparse.Namespace(config="demo", overrides=SMALL, batch=0, per_gpu_batch=0, device="cpu", threads=1)
    env = bench._setup(args, str(fake))
    method = env["method"]
    real = method.training_loss

    def leaky(model, batch, stage, epoch):
        loss, logs = real(model, batch, stage, epoch)
        if float(loss.detach()) < 0:  # a host read of a device value, as a careless log line would do
            pass
        return loss, logs

    method.training_loss = leaky
    from hpc import distributed

    try:
        (row,) = bench.measure_stage(env, "global", ["trainer"], steps=1, warmup=1, count=2)
    finally:
        distributed.shutdown()
    assert row["sync_ops_per_step"] == 1 and row["sync_ops"] == {"aten::_local_scalar_dense": 2}
