"""``medattn sweep --slurm``: the whole sweep as one SLURM allocation running a Ray cluster.

The batch script (templates/sweep.sbatch, written to DIR/slurm/sweep.sbatch) starts Ray on
every node of the allocation (templates/ray-node.sh via srun: the head on the first node, a
worker on each other), runs the Tune driver on the first node against it, and stops Ray at the
end. The experiment lives in DIR, on the shared filesystem, so submitting the same command
again resumes it (the driver finds DIR/tune and restores it); the job also requeues itself on
its time limit or on preemption (USR2 trap) and resumes the same way.

Everything is checked before submitting: the search space and config (exactly as a local
sweep: bad input fails here, before any job or trial starts), the cluster request and the
batch-script header (through ``jobs.cluster``, shared with ``medattn submit`` and ``sbatch``),
shared paths, and that no job of this sweep is still queued or running.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from hpc.launch_args import absolute_paths, argv_of
from jobs import cluster as c  # sweeps sit above jobs: a sweep's allocation is a SLURM job like any other
from medattn.version import __version__
from medattn.errors import ConfigError, MedattnError
from sweeps.plan import check_spec, plan_sweep, sweep_parser

TEMPLATES = Path(__file__).with_name("templates")
COMMENT = "medattn-sweep:"  # squeue comment that marks this sweep's jobs


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """``--slurm`` plus the SLURM flags of ``medattn submit`` (jobs.cluster)."""
    g = p.add_argument_group("SLURM (submit the sweep as one allocation that runs a Ray cluster)")
    g.add_argument("--slurm", action="store_true", help="submit to SLURM instead of running here")
    c.add_cluster_arguments(p)


def _sweep_args(args: argparse.Namespace) -> list[str]:
    """The sweep command line without --slurm and the cluster flags, with absolute paths (the
    driver runs on a compute node, from another working directory)."""
    return argv_of(sweep_parser(), absolute_paths(args))


def render(args: argparse.Namespace, spec, partition, out: Path, num_samples: int) -> tuple[str, str]:
    """(sweep.sbatch, ray-node.sh) texts for a checked request."""
    from sweeps.launch import PACKAGE_ROOT

    log_dir = _layout(out).slurm_dir
    python = spec.python or sys.executable
    header = c.sbatch_header(spec, partition, job_name=spec.job_name or f"medattn-sweep-{out.name}",
                             cpus_per_task=spec.cpus_per_task, output=f"{log_dir}/sweep-%j.out",
                             comment=f"{COMMENT}{out}")
    what = (f"{num_samples} trial(s) of {args.config} on {spec.nodes} node(s)"
            + (f" x {spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else " (CPU)"))
    node_script = log_dir / "ray-node.sh"
    values = {
        "version": f"medattn {__version__}", "what": what, "script_name": str(log_dir / "sweep.sbatch"),
        "log_dir": str(log_dir), "out": str(out), "out_q": shlex.quote(str(out)), "python": shlex.quote(python),
        "root_q": shlex.quote(str(PACKAGE_ROOT)), "signal_delay": str(spec.signal_delay),
        "sbatch_lines": header, "setup_lines": c.setup_lines(spec),
        "node_script_q": shlex.quote(str(node_script)), "gpus_per_node": str(spec.gpus_per_node or 0),
        "sweep_args": " ".join(shlex.quote(a) for a in _sweep_args(args)),
        "max_requeues": str(spec.max_timeouts), "cpus_per_task": str(spec.cpus_per_task),
    }
    return (c.render_template(TEMPLATES / "sweep.sbatch", values),
            c.render_template(TEMPLATES / "ray-node.sh", values))


def _layout(out: Path):
    """A sweep directory keeps its SLURM files (slurm/, the submission log) in a run directory's layout,
    whose one owner is hpc.run.Run (imported here: it loads torch, which --help must not)."""
    from hpc.run import Run

    return Run(out)


def _active_jobs(out: Path) -> list[str]:
    """Jobs of this sweep that SLURM still has queued or running."""
    r = c.slurm_cmd(["squeue", "-h", "-o", "%i|%T|%k"], check=False)
    jobs = []
    for line in r.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[2] == f"{COMMENT}{out}":
            jobs.append(f"{parts[0]} ({parts[1]})")
    return jobs


def submit(args: argparse.Namespace) -> int:
    """Check everything, write DIR/slurm/sweep.sbatch and submit it; prints the job id."""
    plan, _cfg, sweep_spec = plan_sweep(args)  # space, config and data errors: before any job exists
    if getattr(args, "tasks_per_node", None) not in (None, 1):
        raise ConfigError("--tasks-per-node: a sweep runs one Ray node per SLURM node; use --nproc-per-trial "
                          "for DDP inside a trial")
    spec = c.resolve_spec(args)
    spec.tasks_per_node = 1  # one task per node hosts Ray; --cpus-per-task is all Ray may use there
    out = c.check_shared_path(args.out, "--out", spec.allow_local_dirs, must_exist=False)
    c.check_shared_path(args.data, "--data", spec.allow_local_dirs, must_exist=True)
    if args.address:
        raise ConfigError("--address and --slurm: the job starts its own Ray cluster; leave --address out")
    if args.gpus_per_trial is not None and args.gpus_per_trial > spec.gpus_per_node:
        raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial:g} but the job asks for "
                          f"{spec.gpus_per_node} GPU(s) per node (--gpus-per-node)")
    with c.clean_slurm_env():
        partition = c.check_against_cluster(spec)  # also fills in the default --cpus-per-task
        if args.cpus_per_trial > spec.cpus_per_task:
            raise ConfigError(f"--cpus-per-trial {args.cpus_per_trial:g} but Ray gets {spec.cpus_per_task} CPU(s) "
                              f"per node (--cpus-per-task): no trial could start")
        active = _active_jobs(out)
        if active:
            raise MedattnError(f"{out}: sweep job(s) {', '.join(active)} still queued or running; wait for them or "
                               f"scancel them, then submit again to resume")
        resumed = check_spec(out, sweep_spec)
        script, node_script = render(args, spec, partition, out, plan.num_samples)
        log_dir = _layout(out).slurm_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        c.test_only(script, log_dir)
        (log_dir / "ray-node.sh").write_text(node_script)
        path = log_dir / "sweep.sbatch"
        path.write_text(script)
        r = c.slurm_cmd(["sbatch", "--parsable", str(path)])
    job_id = r.stdout.strip().split(";")[0]
    _layout(out).append_submission({"job_id": job_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resume": resumed})
    print(f"medattn sweep: submitted job {job_id} ({'resumes' if resumed else 'starts'} the sweep in {out}); "
          f"log: {log_dir / f'sweep-{job_id}.out'}")
    print(f"medattn sweep: follow it with: squeue -j {job_id}; tail -f {log_dir / f'sweep-{job_id}.out'}")
    return 0
