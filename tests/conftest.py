"""Shared fixtures. Tests run on CPU only; see tests/README.md for the markers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never let a test touch a GPU or the network by accident.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MEDATTN_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# The developers' workspace keeps the real NIH files beside the checkout (../shared); a user's
# clone has none, and those tests skip. MEDATTN_SHARED points elsewhere if needed.
SHARED = Path(os.environ.get("MEDATTN_SHARED", REPO.parent / "shared"))
SHARED_NIH = SHARED / "data" / "chestxray14"


@pytest.fixture(scope="session")
def shared_nih() -> Path:
    """The real ChestX-ray14 metadata (and 240 real images) beside the checkout, if present."""
    if not (SHARED_NIH / "Data_Entry_2017_v2020.csv").is_file():
        pytest.skip(f"real ChestX-ray14 files not found at {SHARED_NIH} (only in the developers' workspace)")
    return SHARED_NIH


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine where
    OpenMP threads spin waiting for each other (DenseNet at 64 px: 0.2 s vs 10 s here).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_demo_run(tmp_path_factory):
    """(prepared dir, run dir) of a finished demo AG-CNN run (global -> local -> fusion, ResNet-18,
    48 px) on 128 blob images with sex, age and view, evaluated on its test split with 50
    resamples: trained once per session for the tests that only read a run (about 30 s)."""
    import torch

    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod
    from medattn.data.fake import write_fake_prepared

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("demo_run")
        prep = write_fake_prepared(root / "prep", n=128, size=56, seed=1)
        run = root / "run"
        base = ["data.image_size=48", "data.resize=56", "stages.*.epochs=2", "stages.*.batch_size=16",
                "data.num_workers=0", "runtime.log_every=100", "runtime.tensorboard=false"]
        assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), *base]) == 0
        assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "50"]) == 0
    finally:
        torch.set_num_threads(before)
    return prep, run
