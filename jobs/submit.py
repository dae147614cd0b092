"""Submit a run to SLURM with submitit: one job per stage, chained with afterok dependencies.
Every job runs one process per GPU (srun tasks, torch.distributed from the SLURM environment),
requeues itself on preemption or time-out and resumes exactly where it stopped.

  medattn submit --config agcnn_resnet50 --data /shared/prep --out /shared/runs/r50 \\
      --nodes 2 --gpus-per-node 8 --cpus-per-task 8 --partition gpu --time 720
  medattn submit --profile mycluster.yaml --config demo --data /shared/prep --out /shared/runs/demo --dry-run
  medattn submit --profile mycluster.yaml ... --stages local,fusion --wait   stages subset; block until done

Settings come from --profile (a YAML file, or a name in jobs/profiles) and flags, flags win.
Wrong settings (unknown partition, GPUs on a partition without them, too many nodes or
minutes, a run dir under /tmp) fail here, before anything is queued. Resubmitting an
unfinished run skips the stages that are done. Logs: RUN/slurm/<job>_<task>_log.{out,err}.
See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc.launch_args import command_line, config_ref, run_arguments_parser
from jobs import cluster
from jobs.cluster import ClusterError, ClusterSpec
from medattn.errors import ConfigError, DataError, MissingDependencyError

SRUN_ARGS = ["--kill-on-bad-exit=1"]  # one rank dies -> the step ends now, not at the NCCL timeout


def parents() -> list[argparse.ArgumentParser]:
    """The trainer's run arguments (hpc.launch_args), so a job is the same run as ``medattn train``."""
    return [run_arguments_parser()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    cluster.add_cluster_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="block until the chain ends; exit 1 and show the log tail if a job failed")
    p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)  # --wait interval (tests)


# ---------------------------------------------------------------------------------------------
# plan: everything checked before anything is queued
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    spec: ClusterSpec
    config: str
    overrides: list[str]
    out: Path
    data: Path
    stages: list[str]  # to submit, in order
    done: list[str]  # already done (skipped)
    partition: Any  # cluster.Partition or None (no SLURM client here)

    @property
    def log_dir(self) -> Path:
        from hpc.run import Run

        return Run(self.out).slurm_dir

    @property
    def job_name(self) -> str:
        return self.spec.job_name or f"medattn-{self.out.name}"


def make_plan(args: argparse.Namespace, *, need_cluster: bool) -> Plan:
    """Resolve and check everything; raises a MedattnError naming what is wrong.

    Args:
        args: parsed ``submit``/``sbatch`` arguments.
        need_cluster: query SLURM (partition, GPUs, limits); if False, only when its clients exist.
    """
    from hpc.run import Run
    from hpc.train import check_batches
    from medattn.config import load_config

    spec = cluster.resolve_spec(args)
    cfg = load_config(args.config, args.overrides)
    out = cluster.check_shared_path(args.out, "--out", spec.allow_local_dirs, must_exist=False)
    data = cluster.check_shared_path(args.data, "--data", spec.allow_local_dirs, must_exist=True)
    from medattn.data.prepared import Prepared

    if not Prepared(data).has_manifest():
        raise DataError(data, "not a prepared directory (no manifest.parquet; run medattn prepare)")
    run = Run(out)
    run.check_config(cfg, what="resubmit")
    all_stages = cfg.stage_names()
    wanted = all_stages if not getattr(args, "stages", None) else [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in wanted:
        if s not in all_stages:
            raise ConfigError(f"--stages: {s!r} is not a stage of this config ({', '.join(all_stages)})")
    # Raised stages.<stage>.epochs continue a run: the stages the trainer will reopen
    # (Run.reopen_plan: the lengthened one, and every trained stage after it) are not done.
    continued, restarted = run.reopen_plan(cfg, all_stages) if run.exists() else ([], [])
    done = [s for s in run.done_stages(all_stages) if s not in continued + restarted]
    todo = [s for s in all_stages if s in wanted and s not in done]
    if todo:
        missing = [s for s in all_stages[:all_stages.index(todo[0])] if s not in done and s not in todo]
        if missing:
            raise ConfigError(f"stage {todo[0]!r} needs {', '.join(missing)} first (done: {', '.join(done) or 'none'}); "
                              f"add them to --stages")
        gaps = [s for s in all_stages[all_stages.index(todo[0]):all_stages.index(todo[-1])] if s not in todo]
        if gaps:
            raise ConfigError(f"--stages skips {', '.join(gaps)}, which later stages start from")
    part = None
    parts = None
    if need_cluster or cluster.have_slurm():
        try:
            # a dry run or a script should not hang on an unreachable controller
            parts = cluster.partitions(timeout=60 if need_cluster else 15)
        except ClusterError as e:
            if need_cluster:
                raise
            print(f"medattn: note: cannot query SLURM ({e}); partition, GPUs and limits not checked",
                  file=sys.stderr)
    else:
        print("medattn: note: no SLURM client here; partition, GPUs and limits not checked", file=sys.stderr)
    if parts is not None:
        part = cluster.check_against_cluster(spec, parts)
    elif spec.cpus_per_task is None:
        spec.cpus_per_task, how = cluster.default_cpus_per_task(spec, None)
        print(f"medattn: note: --cpus-per-task {spec.cpus_per_task} ({how}); pass --cpus-per-task to choose",
              file=sys.stderr)
    check_batches(cfg, todo, spec.world_size, f" ({spec.nodes} node(s) x {spec.tasks} task(s))")
    return Plan(spec, config_ref(args.config), list(args.overrides), out, data, todo, done, part)


def train_args(plan: Plan, stages: list[str] | None) -> list[str]:
    """The ``medattn train`` arguments equivalent to a job (for logs and the sbatch recipe)."""
    return command_line(plan.config, plan.data, plan.out, stages, plan.overrides)


def sbatch_params(plan: Plan, stage: str, dependency: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for the job of one stage (mem in GB, as submitit takes it)."""
    s = plan.spec
    setup = ["# medattn: environment of the job", "export PYTHONUNBUFFERED=1"]
    setup += [f"export {k}={shlex.quote(v)}" for k, v in s.env.items()]
    setup += list(s.setup)
    extra: dict[str, Any] = {"requeue": True, "kill-on-invalid-dep": "yes", "comment": f"medattn:{plan.out}"}
    extra.update(s.sbatch)
    params: dict[str, Any] = {
        "job_name": f"{plan.job_name}-{stage}", "nodes": s.nodes, "ntasks_per_node": s.tasks,
        "time": cluster.default_time(s, plan.partition), "signal_delay_s": s.signal_delay, "setup": setup,
        # Since Slurm 22.05 srun does not inherit the allocation's --cpus-per-task: without it every
        # rank and its loader threads would share one core.
        "srun_args": [*SRUN_ARGS, f"--cpus-per-task={s.cpus_per_task}"], "additional_parameters": extra,
        "wckey": None,
    }
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task", "mem"):
        v = getattr(s, key)
        if v is not None:
            params[key] = v
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if dependency:
        params["dependency"] = dependency
    return params


def render_script(plan: Plan, params: dict[str, Any]) -> str:
    """The sbatch script submitit writes for these parameters (same function, same text)."""
    from submitit.slurm import slurm as sl

    p = dict(params)
    if "mem" in p:
        p["mem"] = sl._convert_mem(p["mem"])
    python = plan.spec.python or shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(plan.log_dir))])
    return sl._make_sbatch_string(command=command, folder=str(plan.log_dir), **p)


def _runner(plan: Plan, stage: str):
    from jobs.runner import StageRunner

    hide = plan.spec.gpus_per_node == 0 and not any(k in plan.spec.sbatch for k in ("gres", "gpus", "gpus-per-node"))
    return StageRunner(plan.config, str(plan.data), str(plan.out), plan.overrides, [stage], hide_gpus=hide)


# ---------------------------------------------------------------------------------------------
# submit / wait
# ---------------------------------------------------------------------------------------------
def _queued_for(out: Path) -> list[tuple[str, str]]:
    """Jobs of this run still queued or running (by the comment every medattn job carries)."""
    r = cluster.slurm_cmd(["squeue", "-h", "-o", "%i|%T|%k"], check=False)
    hits = []
    for line in r.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[2] == f"medattn:{out}" and parts[1] not in cluster.TERMINAL_STATES:
            hits.append((parts[0], parts[1]))
    return hits


def submit_chain(plan: Plan) -> list[tuple[str, str]]:
    """Submit one job per stage, each ``afterok`` the previous; returns ``[(stage, job_id)]``.

    If any submission fails, the jobs already submitted are cancelled, so nothing is left queued.
    """
    try:
        import submitit
    except ImportError:
        raise MissingDependencyError("submitit", "slurm", "medattn submit") from None
    busy = _queued_for(plan.out)
    if busy:
        raise ClusterError(f"{plan.out} already has jobs queued or running: "
                           + ", ".join(f"{j} ({st})" for j, st in busy) + "; wait for them or scancel them")
    fault_at = int(os.environ.get("MEDATTN_SUBMIT_FAULT_AT", "0") or 0)  # tests: fail the N-th submission
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    chain: list[tuple[str, str]] = []
    with cluster.clean_slurm_env():
        # the first job's script goes through `sbatch --test-only`: account, QOS, features
        cluster.test_only(render_script(plan, sbatch_params(plan, plan.stages[0], None)), plan.log_dir)
        ex = submitit.SlurmExecutor(folder=plan.log_dir, max_num_timeout=plan.spec.max_timeouts,
                                    python=plan.spec.python)
        stage = plan.stages[0]
        try:
            for i, stage in enumerate(plan.stages):
                dep = f"afterok:{chain[-1][1]}" if chain else None
                ex.update_parameters(**sbatch_params(plan, stage, dep))
                if fault_at == i + 1:
                    raise RuntimeError("MEDATTN_SUBMIT_FAULT_AT: simulated submission failure")
                job = ex.submit(_runner(plan, stage))
                chain.append((stage, str(job.job_id)))
        except Exception as e:
            ids = [j for _, j in chain]
            cluster.cancel(ids)
            msg = str(e).strip().splitlines()
            raise ClusterError(f"submitting stage {stage!r} failed: {msg[-1] if msg else type(e).__name__}"
                               + (f"; cancelled what was already submitted: {', '.join('job ' + j for j in ids)}" if ids else "")) from None
    record = {"submitted": _dt.datetime.now().isoformat(timespec="seconds"),
              "jobs": [{"stage": s, "job_id": j} for s, j in chain],
              "cluster": {k: v for k, v in vars(plan.spec).items() if v not in (None, [], {})}}
    from hpc.run import Run

    Run(plan.out).append_submission(record)
    return chain


def _result_state(log_dir: Path, job_id: str) -> str | None:
    """COMPLETED/FAILED from submitit's result file of task 0, for jobs SLURM has forgotten."""
    path = log_dir / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        import pickle

        with open(path, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:
        return None
    return "COMPLETED" if outcome == "success" else "FAILED"


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def wait_chain(chain: list[tuple[str, str]], log_dir: Path, poll: float = 10.0, out=sys.stdout) -> int:
    """Follow the jobs until all have ended; 0 if all completed, else 1 (with the failed log's tail)."""
    ids = [j for _, j in chain]
    last: dict[str, str] = {}
    unknown: dict[str, int] = {}
    final: dict[str, str] = {}
    while True:
        states = cluster.job_states([j for j in ids if j not in final])
        for stage, jid in chain:
            if jid in final:
                continue
            info = states.get(jid)
            st = info["state"] if info else _result_state(log_dir, jid)
            if st is None:
                unknown[jid] = unknown.get(jid, 0) + 1
                st = "UNKNOWN"
                if unknown[jid] >= 3:  # SLURM forgot it and it left no result: it did not succeed
                    final[jid] = st
            reason = info.get("reason", "") if info else ""
            if st == "PENDING" and reason == "DependencyNeverSatisfied":
                cluster.cancel([jid])
                st = final[jid] = "CANCELLED"
            if st in cluster.TERMINAL_STATES:
                final[jid] = st
            shown = st + (f" ({reason})" if reason and reason not in ("None", "(null)") and st == "PENDING" else "")
            if last.get(jid) != shown:
                print(f"{time.strftime('%H:%M:%S')} {stage} (job {jid}): {shown}", file=out, flush=True)
                last[jid] = shown
        if len(final) == len(ids):
            break
        time.sleep(poll)
    bad = [(s, j) for s, j in chain if final[j] != "COMPLETED"]
    if not bad:
        print(f"all {len(chain)} job(s) completed", file=out)
        return 0
    # the first failure is the interesting one; the rest were cancelled by its dependency
    stage, jid = bad[0]
    print(f"\nstage {stage} (job {jid}) ended {final[jid]}", file=out)
    for name, n in ((f"{jid}_0_log.err", 40), (f"{jid}_0_log.out", 20)):
        text = _tail(log_dir / name, n)
        if text:
            print(f"---- last lines of {log_dir / name}\n{text}", file=out)
    for s, j in bad[1:]:
        print(f"stage {s} (job {j}): {final[j]}", file=out)
    return 1


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args, need_cluster=not args.dry_run)
    if not plan.stages:
        print(f"nothing to submit: stages {', '.join(plan.done)} of {plan.out} are done")
        return 0
    if args.dry_run:
        prev = None
        for stage in plan.stages:
            dep = f"afterok:<job id of {prev}>" if prev else None
            print(f"# ---- stage {stage}: sbatch script (submitit runs StageRunner: "
                  f"medattn train {' '.join(shlex.quote(a) for a in train_args(plan, [stage]))})")
            print(render_script(plan, sbatch_params(plan, stage, dep)))
            prev = stage
        if plan.done:
            print(f"# stages already done (skipped): {', '.join(plan.done)}")
        return 0
    chain = submit_chain(plan)
    s = plan.spec
    print(f"submitted {len(chain)} job(s) to partition {s.partition}: {s.nodes} node(s) x {s.tasks} task(s), "
          f"{s.gpus_per_node} GPU(s) per node, {cluster.default_time(s, plan.partition)} min per job")
    prev = None
    for stage, jid in chain:
        print(f"  {stage:<10} job {jid}" + (f"  (after {prev})" if prev else ""))
        prev = jid
    if plan.done:
        print(f"  done already: {', '.join(plan.done)}")
    print(f"log folder: {plan.log_dir}  ({chain[0][1]}_0_log.out = rank 0 of the first job)")
    print(f"run dir:    {plan.out}")
    if not args.wait:
        print(f"follow with: squeue -j {','.join(j for _, j in chain)}   or   medattn submit ... --wait")
        return 0
    return wait_chain(chain, plan.log_dir, args.poll)
