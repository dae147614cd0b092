"""SLURM launches: submitit job chains with requeue, and plain sbatch scripts. Decides where and
how often ``hpc`` runs; never reimplements it."""
