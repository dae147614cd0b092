"""The sweep driver: connect to Ray, train the shared base, run (or resume) the Tune experiment.

The experiment lives in ``DIR/tune`` (Tune's ``storage_path`` is DIR, on the shared
filesystem). Running the same command again finds it (``Tuner.can_restore``) and resumes it
with ``Tuner.restore``: finished trials are kept as they are, unfinished ones run their trainer
again on the same run directory (which resumes from its last checkpoint), errored ones are
resumed too. Tune does not save the scheduler, so the ASHA rungs are saved next to the
experiment after every decision (:class:`PersistentASHA`) and loaded on resume.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.run import Run
from medattn.errors import ConfigError, MedattnError, MissingDependencyError

EXPERIMENT = "tune"


def import_ray():
    try:
        import ray
        from ray import tune  # noqa: F401
    except ModuleNotFoundError as e:
        raise MissingDependencyError("ray[tune]", "ray", "medattn sweep") from e
    return ray


@dataclass
class SweepPlan:
    """What the CLI decided; the driver only executes it."""

    out: Path
    job: Any  # sweeps.trial.TrialJob
    num_samples: int
    search: str  # optuna | random | grid
    scheduler: str  # asha | none
    max_t: int
    grace_period: int
    reduction_factor: float
    max_concurrent: int
    max_failures: int
    seed: int
    resources: dict[str, float] = field(default_factory=dict)  # cpu, gpu, custom
    address: str | None = None
    verbose: int = 1


def _trial_dirname(trial) -> str:  # module level: pickled with the tuner
    return trial.trial_id


# --------------------------------------------------------------------------------------------
def connect(address: str | None, log, wait_nodes: int = 0, timeout_s: float = 300.0) -> Any:
    """``ray.init`` with the package root on the workers' PYTHONPATH (they unpickle sweeps.*).

    Args:
        address: ``auto``, ``HOST:PORT`` or None (start a local Ray).
        wait_nodes: wait until this many nodes are alive (a SLURM allocation joining).
    """
    from sweeps.launch import PACKAGE_ROOT

    ray = import_ray()
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")] if p)}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise MedattnError(f"--address {address}: cannot connect to a Ray cluster: {e}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    deadline = time.time() + timeout_s
    while len(nodes) < wait_nodes:
        if time.time() > deadline:
            ray.shutdown()
            raise MedattnError(f"only {len(nodes)} of {wait_nodes} Ray nodes joined within {timeout_s:.0f} s")
        time.sleep(1)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    log(f"ray: {len(nodes)} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    return ray


def resolve_gpus(plan: SweepPlan, ray, log) -> None:
    """Without --gpus-per-trial: one GPU per trainer process when the cluster has GPUs, else 0.

    Ray hides the GPUs from a task that asked for none (CUDA_VISIBLE_DEVICES=""), so a default
    of 0 would train every trial on CPUs next to idle GPUs.
    """
    if plan.resources.get("gpu") is not None:
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    plan.resources["gpu"] = float(plan.job.nproc) if have > 0 else 0.0
    log(f"each trial gets {plan.resources['gpu']:g} GPU(s) (the cluster has {have:g}; --gpus-per-trial to change)")


def _remote_options(res: dict[str, float]) -> dict[str, Any]:
    custom = {k: v for k, v in res.items() if k not in ("cpu", "gpu")}
    opts: dict[str, Any] = {"num_cpus": res.get("cpu", 1), "num_gpus": res.get("gpu", 0)}
    if custom:
        opts["resources"] = custom
    return opts


def _train_base_task(base: str, data: str, prefix: list[str], nproc: int, cpus: float) -> dict[str, Any]:
    """Ray task: train the shared prefix stages in ``base`` (resumes an interrupted base run)."""
    import ray

    from sweeps import launch

    cmd = launch.train_command(Run(base).config_path, data, base, nproc=nproc, stages=prefix)
    t0 = time.time()
    proc = launch.start(cmd, Run(base).train_log_path, launch.trainer_env(cpus, nproc))
    try:
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            launch.stop(proc)
    return {"rc": rc, "seconds": time.time() - t0, "node_id": ray.get_runtime_context().get_node_id()}


def ensure_base(plan: SweepPlan, cfg, log) -> None:
    """Train the shared prefix once (as a Ray task with a trial's resources), unless done."""
    from sweeps import launch

    job = plan.job
    base = Path(job.base)
    if Run(base).stages_done(job.prefix):
        log(f"base: stages {', '.join(job.prefix)} already trained in {base}")
        return
    base.mkdir(parents=True, exist_ok=True)
    if not Run(base).exists():
        Run(base).save_config(cfg)
    ray = import_ray()
    log(f"base: training the shared stage(s) {', '.join(job.prefix)} once in {base} (log: {Run(base).train_log_path})")
    task = ray.remote(_train_base_task).options(**_remote_options(plan.resources), max_retries=0)
    out = ray.get(task.remote(str(base), job.data, job.prefix, job.nproc, plan.resources.get("cpu", 1)))
    if out["rc"] != 0 or not Run(base).stages_done(job.prefix):
        raise MedattnError(f"training the shared stage(s) {', '.join(job.prefix)} failed (exit {out['rc']}); "
                           f"see {Run(base).train_log_path}:\n{launch.log_tail(Run(base).train_log_path)}")
    log(f"base: done in {out['seconds']:.1f} s")


def _search_alg(plan: SweepPlan):
    if plan.search == "optuna":
        try:
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch
        except ModuleNotFoundError as e:  # optuna missing
            raise MissingDependencyError("optuna", "ray", "--search optuna") from e
        alg = OptunaSearch(metric="mean_auroc", mode="max", seed=plan.seed)
        # TPE learns from finished trials: without a limit, Tune asks for as many as fit the cluster
        return ConcurrencyLimiter(alg, max_concurrent=plan.max_concurrent) if plan.max_concurrent else alg
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=plan.seed, max_concurrent=plan.max_concurrent)


def param_space(plan: SweepPlan) -> dict[str, Any]:
    space = plan.job.space
    return {p.name: p.tune_domain(grid_search=plan.search == "grid") for p in space.params}


def run_tune(plan: SweepPlan, log):
    """Create or resume the experiment and run it to the end; returns the ResultGrid."""
    # Save the experiment state often (default: every >= 10 s), so a driver killed right after
    # a trial finished does not restart that trial on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    import_ray()
    from ray import tune

    from sweeps.trial import make_trainable

    # Resumed trials report their earlier epochs again; Optuna already has them.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")

    trainable = tune.with_resources(make_trainable(plan.job), dict(plan.resources))
    exp = plan.out / EXPERIMENT
    space = param_space(plan)
    if tune.Tuner.can_restore(str(exp)):
        log(f"resuming the experiment in {exp} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space)
    else:
        scheduler = None
        if plan.scheduler == "asha":
            from sweeps.asha import PersistentASHA

            scheduler = PersistentASHA(str(plan.out / "asha_state.pkl"), time_attr="training_iteration",
                                       max_t=plan.max_t, grace_period=plan.grace_period,
                                       reduction_factor=plan.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="mean_auroc", mode="max", num_samples=plan.num_samples, search_alg=_search_alg(plan),
                scheduler=scheduler, max_concurrent_trials=plan.max_concurrent or None, reuse_actors=False,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=str(plan.out), verbose=plan.verbose,
                failure_config=tune.FailureConfig(max_failures=plan.max_failures)),
        )
    return tuner.fit()


def check_search(space, search: str, num_samples: int | None) -> int:
    """Search-algorithm rules (before anything starts); returns num_samples."""
    if search == "grid":
        cont = [p.name for p in space.params if not p.discrete]
        if cont:
            raise ConfigError(f"--space {cont[0]}: --search grid needs choice(...) or grid(...) values, "
                              f"not {space.get(cont[0]).func}(...)")
        return num_samples or 1
    if search == "optuna":
        g = [p.name for p in space.params if p.func == "grid"]
        if g:
            raise ConfigError(f"--space {g[0]}: grid(...) works with --search grid or random; with optuna "
                              f"use choice(...)")
    return num_samples or 8
