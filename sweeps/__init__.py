"""Ray Tune sweeps over tau, lambda and focal gamma. Trials run the same ``hpc`` trainer."""
