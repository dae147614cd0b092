"""Write a run as a plain sbatch script (no submitit needed on the cluster): srun starts one task
per node, each runs torchrun with one worker per GPU (c10d rendezvous on the first node); all
stages run in order in one job, which requeues itself on preemption or time-out
(#SBATCH --requeue, --signal=B:USR2@S: the script traps USR2, has the trainer checkpoint,
then runs scontrol requeue) and resumes where it stopped.

  medattn sbatch --config agcnn_resnet50 --data /shared/prep --out /shared/runs/r50 \\
      --nodes 2 --gpus-per-node 8 --cpus-per-task 8 --partition gpu --time 720 --output r50.sbatch
  sbatch r50.sbatch

Takes the same cluster flags and --profile as `medattn submit`, and checks them the same way
when SLURM is reachable from here. Creates RUN/slurm (the job log folder) so the script can
be submitted as is. Without --output the script is printed. See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from jobs import cluster
from jobs import submit as _submit
from jobs.submit import make_plan, train_args
from medattn.version import __version__

parents = _submit.parents  # the trainer's run arguments (hpc.launch_args), as submit takes them

TEMPLATE = Path(__file__).with_name("templates") / "torchrun.sbatch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    cluster.add_cluster_arguments(p)
    p.add_argument("--output", metavar="FILE", help="write the script here (default: print it)")


def render(plan, stages_arg: str | None, script_name: str) -> str:
    """The sbatch script text for a checked plan (see :func:`jobs.submit.make_plan`)."""
    s = plan.spec
    nproc = s.tasks
    cpt = s.cpus_per_task or 1
    # the node's one task hosts torchrun and all its workers
    header = cluster.sbatch_header(s, plan.partition, job_name=s.job_name or f"medattn-{plan.out.name}",
                                   cpus_per_task=nproc * cpt, output=str(_run(plan).sbatch_log()))
    targs = train_args(plan, stages_arg.split(",") if stages_arg else None)
    stages = plan.stages or []
    what = (f"{plan.config} on {s.nodes} node(s) x {nproc} process(es)"
            + (f" x {s.gpus_per_node} GPU(s)" if s.gpus_per_node else " (CPU, gloo)")
            + (f"; stages {', '.join(stages)}" if stages else "; all stages done"))
    return cluster.render_template(TEMPLATE, {
        "version": f"medattn {__version__}", "what": what, "script_name": script_name,
        "log": str(_run(plan).sbatch_log("<job id>")), "out": str(plan.out), "out_q": shlex.quote(str(plan.out)),
        "nproc": str(nproc), "signal_delay": str(s.signal_delay), "sbatch_lines": header,
        "setup_lines": cluster.setup_lines(s), "max_requeues": str(s.max_timeouts), "omp_threads": str(cpt),
        "node_cpus": str(nproc * cpt), "python": s.python or shlex.quote(sys.executable),
        "train_args": " ".join(shlex.quote(a) for a in targs),
        # the resume checkpoint's file name, from the run directory's owner
        "last_ckpt": _run(plan).checkpoint("stage", "last").name,
    })


def _run(plan):
    """The run directory's owner, which names its files (the job log, the resume checkpoint)."""
    from hpc.run import Run  # imports torch: not at `medattn sbatch --help`

    return Run(plan.out)


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args, need_cluster=False)
    name = args.output or "<this script>"
    text = render(plan, args.stages, name)
    plan.log_dir.mkdir(parents=True, exist_ok=True)  # #SBATCH --output needs it at submit time
    if not plan.stages:
        print(f"medattn: note: every selected stage of {plan.out} is done; the job would only check that",
              file=sys.stderr)
    if not args.output:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    from medattn.fileio import write_text

    write_text(out, text, mode=0o755)
    print(f"wrote {out}\nsubmit with: sbatch {out}\nlogs: {_run(plan).sbatch_log('<job id>')}   run dir: {plan.out}")
    return 0
