"""A tiny multi-label prepared directory for start-up checks (medattn.data.fake)."""
from pathlib import Path

from medattn.data.fake import write_fake_prepared


def make_multilabel(root: Path) -> Path:
    return write_fake_prepared(root, n=48, size=32, seed=5, classes=14)  # the 14 diseases, as NIH
