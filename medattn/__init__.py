"""medattn: attention-guided chest X-ray classification at cluster scale.

Layers (imports point downwards only; tests/test_layers.py checks every import, lazy ones too):
    medattn.cli         one ``medattn`` command; lazy-imports what a subcommand needs
    sweeps/             Ray Tune search (uses jobs for a sweep's own SLURM allocation)
    jobs/               SLURM launches (submitit, sbatch)
    hpc/                runtime: distributed init, DALI loader, trainer, run directories, eval, report
    medattn/            science: data formats, views, models, methods, attention, boxes, metrics, figures

The science layer knows nothing of ranks, SLURM or Ray, and every part of it runs on a CPU.
docs/architecture.md says where each concept lives.
"""

from medattn.version import __version__  # noqa: F401  (pyproject.toml says the same)

# The public API (docs/predict.md), forwarded lazily so that ``import medattn`` loads no torch:
#   p = medattn.load("runs/r50"); p.predict(["film.dcm"])
_API = ("load", "Model", "Predictor")


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module("medattn.api"), name)
    raise AttributeError(f"module 'medattn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
