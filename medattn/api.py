"""The public Python API: ``import medattn; p = medattn.load("runs/r50")``.

A top-level module, like the command line (tests/test_layers.py: it may use every layer), because
using a trained model is the runtime's business (:mod:`hpc.predict`: run directories,
checkpoints, devices) while ``medattn`` is the name users import. ``medattn/__init__.py``
forwards ``medattn.load`` here lazily, so ``import medattn`` stays light and the science layer
itself still imports nothing above it.

The model ``load`` returns is a :class:`hpc.predict.Predictor` that can also export itself
(:meth:`Model.export`): export stands on predict (:mod:`hpc.export` imports :mod:`hpc.predict`),
so the method that joins the two lives here, above both.
"""
from __future__ import annotations

import os
from pathlib import Path

from hpc import predict as _predict
from hpc.predict import Predictor

__all__ = ["Model", "Predictor", "load"]


class Model(Predictor):
    """A :class:`hpc.predict.Predictor` (``predict``, ``read``, ``transform``, ``labels``, ...)
    that can also write itself for deployment."""

    def export(self, out: str | os.PathLike, fmt: str = "onnx", optimize: bool = True,
               calibrated: bool = False, input_dtype: str = "float32") -> Path:
        """Write the model as a deployable TorchScript or ONNX file, preprocessing included
        (:func:`hpc.export.export_predictor`; ``calibrated``: the run's temperatures built in;
        ``input_dtype``: the ONNX graph's input type, ``float32`` or ``uint8``)."""
        from hpc.export import export_predictor

        return export_predictor(self, out, fmt, optimize=optimize, calibrated=calibrated, input_dtype=input_dtype)


def load(run: str | os.PathLike, stage: str | None = None, checkpoint: str = "best",
         device: str | None = None) -> Model:
    """A run's model, ready for new images (:func:`hpc.predict.load`; the same arguments)."""
    return _predict.load(run, stage, checkpoint, device, cls=Model, stacklevel=3)


load.__doc__ = _predict.load.__doc__
