"""What a sweep is: its arguments, the plan checked before Ray or any job starts, and the spec
saved as DIR/sweep.json that a resumed sweep must match.

Shared by the local sweep (sweeps.cli) and the SLURM submission (sweeps.slurm), which checks
exactly what a local sweep checks and writes the same arguments into its batch script. Nothing
here imports Ray, torch or SLURM clients at import time: ``medattn sweep --help`` builds its
parser from this module.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpc.launch_args import run_arguments_parser
from medattn.errors import ConfigError

SPEC_VERSION = 1


def parents() -> list[argparse.ArgumentParser]:
    """The trainer's run arguments (hpc.launch_args): a sweep's base config, data and directory."""
    return [run_arguments_parser(stages=False, title="the sweep (every trial is a run of this config on this data)",
                                 out_help="sweep directory on a shared filesystem; rerunning resumes",
                                 overrides_help="config overrides for every trial")]


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's own arguments: the space, the search, the scheduler and the trials' resources."""
    p.add_argument("--space", action="append", default=[], metavar="NAME=FUNC(ARGS)", required=True,
                   help="a swept parameter, e.g. 'tau=uniform(0.5,0.9)' (repeat for each parameter)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials to sample (default 8; with --search grid: repeats of the grid, default 1)")
    p.add_argument("--search", choices=("optuna", "random", "grid"), default="optuna",
                   help="search algorithm (default optuna TPE)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="early stopping (default asha)")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: epochs every trial trains before it can be stopped (default min(5, epochs))")
    p.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA: keep 1/N at each rung (default 3)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the resources allow)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial (default: one per trainer process when the Ray cluster has GPUs, "
                        "else 0; give 0 to train on CPUs next to idle GPUs)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--nproc-per-trial", type=int, default=None,
                   help="trainer processes per trial (DDP via torchrun; default: GPUs per trial, at least 1)")
    p.add_argument("--trial-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each trial needs (e.g. slot=1 to place one trial per node)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: auto, or HOST:PORT (default: start a local Ray on this machine)")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search algorithm (default 0)")
    p.add_argument("--no-reuse", action="store_true",
                   help="every trial trains every stage (no shared base run)")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    # Used by the SLURM batch script: wait until the whole allocation has joined the cluster.
    p.add_argument("--wait-nodes", type=int, default=0, help=argparse.SUPPRESS)


def sweep_parser() -> argparse.ArgumentParser:
    """A sweep's arguments without the SLURM ones: what a batch script passes on to the driver."""
    p = argparse.ArgumentParser(parents=parents(), add_help=False)
    add_search_arguments(p)
    return p


def _parse_resources(args) -> dict[str, float]:
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    # gpu None: decided once Ray is up (driver.resolve_gpus), from the GPUs the cluster has.
    res = {"cpu": float(args.cpus_per_trial),
           "gpu": None if args.gpus_per_trial is None else float(args.gpus_per_trial)}
    for item in args.trial_resource:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value <= 0 or name.strip().lower() in ("cpu", "gpu"):
            raise ConfigError(f"--trial-resource {item!r}: expected NAME=AMOUNT with AMOUNT > 0 "
                              f"(use --cpus-per-trial/--gpus-per-trial for CPU and GPU)")
        res[name.strip()] = value
    return res


def _nproc(args) -> int:
    n = args.nproc_per_trial
    if n is None:
        g = args.gpus_per_trial or 0
        if g > 1 and not float(g).is_integer():
            raise ConfigError(f"--gpus-per-trial {g}: more than one GPU per trial must be a whole number")
        n = max(1, int(g))
    if n < 1:
        raise ConfigError(f"--nproc-per-trial must be >= 1, got {n}")
    return n


def plan_sweep(args) -> tuple[Any, Any, dict[str, Any]]:
    """Check everything and decide the plan, before Ray or any trial starts.

    Returns (SweepPlan, base Config, the sweep spec saved as DIR/sweep.json).
    """
    from medattn.config import load_config
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, create_method
    from sweeps import driver, reuse
    from sweeps.space import build_space
    from sweeps.trial import TrialJob

    cfg = load_config(args.config, args.overrides)
    ds = PreparedDataset.open(args.data)

    def method_check(c):
        create_method(c, DataSpec.from_dataset(ds, c))

    method_check(cfg)
    space = build_space(args.space, cfg, method_check=method_check)
    num_samples = driver.check_search(space, args.search, args.num_samples)
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    prefix = [] if args.no_reuse else reuse.shared_prefix(cfg, space)
    stages = [s for s in cfg.stage_names() if s not in prefix]
    max_t = sum(cfg.stages[s].epochs for s in stages)
    grace = args.grace_period if args.grace_period is not None else min(5, max_t)
    if args.scheduler == "asha":
        if not 1 <= grace <= max_t:
            raise ConfigError(f"--grace-period {grace}: must be between 1 and the {max_t} epochs a trial trains "
                              f"({', '.join(stages)})")
        if args.reduction_factor <= 1:
            raise ConfigError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    resources = _parse_resources(args)
    nproc = _nproc(args)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    out = Path(args.out).resolve()
    data = str(Path(args.data).resolve())
    base = str(reuse.base_dir(out, cfg, prefix, data)) if prefix else None
    job = TrialJob(out=str(out), data=data, base_config=cfg.to_dict(), space=space, prefix=prefix,
                   stages=stages, base=base, nproc=nproc, cpus=resources["cpu"])
    plan = driver.SweepPlan(out=out, job=job, num_samples=num_samples, search=args.search,
                            scheduler=args.scheduler, max_t=max_t, grace_period=grace,
                            reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent or 0,
                            max_failures=args.max_failures, seed=args.seed, resources=resources,
                            address=args.address, verbose=0 if args.quiet else 1)
    spec = {"version": SPEC_VERSION, "config": cfg.to_dict(), "data": data, "space": list(args.space),
            "num_samples": num_samples, "search": args.search, "scheduler": args.scheduler,
            "grace_period": grace if args.scheduler == "asha" else None,
            "reduction_factor": args.reduction_factor if args.scheduler == "asha" else None,
            "seed": args.seed, "reuse": not args.no_reuse, "metric": "mean_auroc"}
    return plan, cfg, spec


def check_spec(out: Path, spec: dict[str, Any]) -> bool:
    """Write DIR/sweep.json, or check that an existing one describes the same sweep.

    Returns True when the directory already held this sweep (a resume).
    """
    from medattn.fileio import write_text as atomic_write_text

    path = out / "sweep.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); use a new --out") from None
        new = json.loads(json.dumps(spec, default=str))
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            raise ConfigError(f"{out} holds a different sweep ({', '.join(diff)} differ); rerun the same command "
                              f"to resume it, or use a new --out")
        return True
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(spec, indent=2, default=str))
    return False
