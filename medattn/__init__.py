"""medattn: attention-guided chest X-ray classification at cluster scale.

Layers (imports point downwards only):
    medattn.cli         one ``medattn`` command; lazy-imports what a subcommand needs
    jobs/, sweeps/      SLURM launches (submitit, sbatch) | Ray Tune search
    hpc/                runtime: distributed init, DALI loader, trainer, checkpoints
    medattn/            science: data formats, models, attention ops, losses, metrics, figures

The science layer knows nothing of ranks, SLURM or Ray, and every part of it runs on a CPU.
"""

__version__ = "0.1.0"
