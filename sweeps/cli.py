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
import math
import sys
import time

from sweeps import slurm
from sweeps.plan import add_search_arguments, check_spec, parents, plan_sweep  # noqa: F401  (parents: the CLI's)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_search_arguments(p)
    slurm.add_cluster_arguments(p)


def _log(msg: str) -> None:
    print(f"medattn sweep: {msg}", flush=True)


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
        from hpc.run import Run
        from sweeps.trial import run_dir_for

        print(f"medattn sweep: {states['error']} trial(s) failed; see results.csv and their trainer logs "
              f"({Run(run_dir_for(plan.out, '<trial_id>')).train_log_path})", file=sys.stderr)
        return 1
    return 0


