"""Atomic checkpoints and the run directory's stage state.

Layout of a run directory::

    RUN/config.yaml            resolved config (saved once; a resumed run must match it)
    RUN/provenance.json        git sha, versions, hosts, seed, command (per launch, appended)
    RUN/state.json             which stages are done and their best metric
    RUN/ckpt/<stage>/last.pt   everything needed to resume exactly (written every epoch + on signal)
    RUN/ckpt/<stage>/best.pt   model weights of the best validation epoch (feeds the next stage)
    RUN/metrics.jsonl          one JSON object per epoch (and per log interval)
    RUN/tb/                    TensorBoard

Every write goes to a temporary file in the same directory and is renamed into place, so a
kill at any moment leaves either the old or the new file, never a truncated one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CKPT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    from medattn.errors import DataError

    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise DataError(path, "checkpoint not found") from None
    except Exception as e:  # corrupt or foreign file
        raise DataError(path, f"unreadable checkpoint: {e}") from None


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def ckpt(self, stage: str, kind: str = "last") -> Path:
        return self.root / "ckpt" / stage / f"{kind}.pt"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"stages": {}}
        return json.loads(self.state_path.read_text())

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2))

    def stage_done(self, stage: str) -> bool:
        return bool(self.state()["stages"].get(stage, {}).get("done"))

    def mark_stage(self, stage: str, **info: Any) -> None:
        st = self.state()
        st["stages"].setdefault(stage, {}).update(info)
        self.save_state(st)
