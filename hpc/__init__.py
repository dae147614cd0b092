"""Runtime: distributed init, data loaders (DALI and a PyTorch fallback), the trainer,
checkpoints, evaluation and benchmarks. Turns a Config into a run directory."""
