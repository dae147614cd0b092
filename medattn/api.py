"""The public Python API: ``import medattn; p = medattn.load("runs/r50")``.

A top-level module, like the command line (tests/test_layers.py: it may use every layer), because
using a trained model is the runtime's business (:mod:`hpc.predict`: run directories,
checkpoints, devices) while ``medattn`` is the name users import. ``medattn/__init__.py``
forwards ``medattn.load`` here lazily, so ``import medattn`` stays light and the science layer
itself still imports nothing above it.
"""
from __future__ import annotations

from hpc.predict import Predictor, load

__all__ = ["Predictor", "load"]
