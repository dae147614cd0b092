"""Ray Tune sweep of tau (attention threshold), lambda (attention-loss weight) and focal gamma.

  medattn sweep --config agcnn_resnet50 --data /data/prep --out /shared/sweeps/tau \\
      --space 'tau=uniform(0.5,0.9)' --space 'gamma=choice(0,1,2,3)' --num-samples 32 \\
      --gpus-per-trial 1 --address auto stages.local.loss=focal stages.fusion.loss=focal
  medattn sweep ... --slurm --nodes 4 --gpus-per-node 8 --time 12:00:00   (one allocation, Ray on all nodes)

Each trial is one `medattn train` run in DIR/trials/<trial_id>; stages no swept parameter can
change (AG-CNN's global stage when sweeping tau) are trained once in DIR/base/<hash> and shared.
Trials report the validation mean AUROC of the stage they train every epoch; ASHA stops weak
ones early. Running the same command again resumes the sweep. Results: DIR/results.csv,
DIR/best.yaml (ready for `medattn train --config`), DIR/plots/. See docs/sweeps.md.

Space grammar: uniform(a,b) loguniform(a,b) quniform(a,b,q) randint(a,b) choice(v,...) grid(v,...);
names: tau, lam (value `adaptive` = gradcam_loss.adaptive=true), gamma, or any dotted config key.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from medattn.errors import ConfigError

SPEC_VERSION = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="shipped config name or a YAML path (the base of every trial)")
    p.add_argument("--data", required=True, help="prepared directory (medattn prepare --out)")
    p.add_argument("--out", required=True, help="sweep directory on a shared filesystem; rerunning resumes")
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
    from sweeps import slurm as _slurm

    _slurm.add_cluster_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")


def _log(msg: str) -> None:
    print(f"medattn sweep: {msg}", flush=True)


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


def _print_table(df, names: list[str]) -> None:
    if df.empty:
        return
    cols = ["trial_id", *names, "best_auroc", "last_stage", "epochs", "state", "node_ip"]
    short = df[cols].copy()
    short["node"] = df["node_id"].astype(str).str[:8]
    with __import__("pandas").option_context("display.width", 160, "display.max_columns", 20):
        print(short.drop(columns="node_ip").to_string(index=False,
                                                     float_format=lambda v: "nan" if math.isnan(v) else f"{v:.4f}"))


def run(args: argparse.Namespace) -> int:
    if args.slurm:
        from sweeps import slurm

        return slurm.submit(args)
    t0 = time.time()
    plan, cfg, spec = plan_sweep(args)  # every input error surfaces here, before Ray starts
    check_spec(plan.out, spec)
    resumed = (plan.out / "tune" / "tuner.pkl").is_file()
    from sweeps import driver, results

    _log(f"{'resuming' if resumed else 'starting'} sweep in {plan.out}: {len(plan.job.space.params)} parameter(s) "
         f"({', '.join(plan.job.space.names)}), {plan.num_samples} sample(s), search {plan.search}, "
         f"scheduler {plan.scheduler}; trials train {', '.join(plan.job.stages)} ({plan.max_t} epochs)"
         + (f"; shared: {', '.join(plan.job.prefix)}" if plan.job.prefix else ""))
    ray = driver.connect(plan.address, _log, wait_nodes=args.wait_nodes)
    try:
        driver.resolve_gpus(plan, ray, _log)
        if plan.job.prefix:
            driver.ensure_base(plan, cfg, _log)
        grid = driver.run_tune(plan, _log)
        summary = results.write_all(plan.out, plan.job.space, plan.job.stages, plan.job.data, grid, _log)
    finally:
        ray.shutdown()
    from sweeps.results import collect

    df = collect(plan.out, plan.job.space, plan.job.stages, None)
    _print_table(df, plan.job.space.names)
    states = summary["states"]
    _log(f"{summary['trials']} trial(s): " + ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
         + f" in {time.time() - t0:.0f} s")
    _log(f"results: {plan.out / 'results.csv'}")
    if "best" in summary:
        b = summary["best"]
        _log(f"best: {b['trial_id']} " + " ".join(f"{n}={b[n]}" for n in plan.job.space.names)
             + f" mean AUROC {b['best_auroc']:.4f} -> {plan.out / 'best.yaml'}")
    if states.get("error"):
        print(f"medattn sweep: {states['error']} trial(s) failed; see results.csv and their train.log",
              file=sys.stderr)
        return 1
    return 0


