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
