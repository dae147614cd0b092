"""Train a model: the method's stages in order, with DDP, exact resume and signal checkpoints.

  medattn train --config agcnn_resnet50 --data /data/prep --out runs/r50
  torchrun --nproc-per-node 8 -m medattn train --config agcnn_resnet50 --data /data/prep --out runs/r50
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m medattn train --config agcnn_resnet50 --data /data/prep --out /shared/runs/r50

Running the same command on the same --out resumes where the run stopped (mid-epoch if it
was stopped by a signal or had step checkpoints). SIGTERM and SIGUSR2 make every rank finish its
step, save a checkpoint and exit with status 3, so a scheduler can requeue the job; Ctrl-C
(SIGINT) does the same and exits with 130. Nothing is written to --out before every input has
been checked.
Overrides are `key=value` (see `medattn configs NAME`), e.g. `stages.*.epochs=2 agcnn.tau=0.6`.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpc import distributed, faults
from hpc.checkpoint import TrainState, load as load_ckpt, weights_payload
from hpc.inference import autocast_ctx, run_inference
from hpc.launch_args import run_arguments_parser
from hpc.loader import EvalLoader, TrainLoader, TrainPlan, resolve_kind
from hpc.run import Run, fit_init_weights, init_mismatch, init_source
from hpc.runlog import RunLogger, format_duration, log, setup_logging
from hpc.schedule import LRSchedule, build_optimizer
from hpc.stop import EXIT_CHECKPOINTED, EXIT_INTERRUPTED, STOP  # noqa: F401  (STOP: installed by the CLI first)
from medattn.config import Config, load_config
from medattn.methods.base import StageStep
from medattn.errors import ConfigError
from medattn.metrics import classification_metrics, extras_means



# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parents() -> list[argparse.ArgumentParser]:
    return [run_arguments_parser()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-resume", action="store_true",
                   help="fail instead of resuming when --out already holds a run")
    p.add_argument("--init-from", metavar="RUN", default=None,
                   help="start the first stage from another run's weights (fine-tuning): shorthand for "
                        "stages.<first stage>.init_from=RUN (its best checkpoint of that stage, else of its last "
                        "finished stage; a head for another number of classes is skipped with a warning)")


def check_batches(cfg: Config, stages: list[str], world_size: int, where: str = "") -> None:
    """Every stage's global batch splits evenly over the processes (raise ConfigError naming it)."""
    for s in stages:
        bs = cfg.stages[s].batch_size
        if bs % world_size:
            raise ConfigError(f"stages.{s}.batch_size {bs} is not divisible by the {world_size} processes"
                              f"{where}; the global batch is split evenly over them")


def run(args: argparse.Namespace) -> int:
    return train(args.config, args.data, args.out, args.overrides,
                 stages=args.stages.split(",") if args.stages else None, resume=not args.no_resume,
                 init_from=getattr(args, "init_from", None))


def main(argv: list[str] | None = None) -> int:
    """In-process entry point (tests, scripts): ``medattn train ARGV``, returning its exit status."""
    from medattn.command import run_command

    STOP.install()
    return run_command("train", sys.modules[__name__], list(sys.argv[1:] if argv is None else argv))


# ---------------------------------------------------------------------------------------------
# run setup
# ---------------------------------------------------------------------------------------------
def _git_info() -> dict[str, Any]:
    here = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"sha": sha or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("medattn", "torch", "torchvision", "numpy", "nvidia-dali-cuda130", "nvidia-dali-cuda120",
                "submitit", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    out["cuda"] = torch.version.cuda
    return out


def _check_run_dir(run: Run, cfg: Config, resume: bool, world: distributed.World) -> None:
    """Refuse an --out that holds another run (read-only: nothing is written before every check
    of the inputs has passed). A resumed run must use the same config (runtime keys may differ:
    they do not change the science)."""
    problem = None
    if world.is_primary and run.exists():
        if not resume:
            problem = f"{run.root} already holds a run (--no-resume given)"
        else:
            try:
                run.check_config(cfg)
            except ConfigError as e:
                problem = str(e)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def _init_run_dir(run: Run, cfg: Config, world: distributed.World) -> None:
    """Save the config (first launch) and clear what an earlier launch's kill left half-written."""
    if world.is_primary:
        if not run.exists():
            run.save_config(cfg)
        for p in run.remove_stale_temporaries():
            log.info(f"removed {p} (a write interrupted by an earlier kill)")
    distributed.barrier()


def _write_provenance(run: Run, cfg: Config, data: str, world: distributed.World,
                      device: torch.device, split: dict[str, Any] | None = None) -> None:
    hosts = distributed.all_gather_object(socket.gethostname())
    if not world.is_primary:
        return
    rec = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [sys.executable] + sys.argv,
        "git": _git_info(),
        "versions": _versions(),
        "hosts": hosts,
        "world_size": world.world_size,
        "launcher": world.launcher,
        "device": distributed.device_info(),
        "seed": cfg.seed,
        "runtime_flags": distributed.runtime_flags(cfg, device),
        "data": str(Path(data).resolve()),
        "split": split,  # name, seed and hash of the assignment (also in every checkpoint's spec)
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    run.append_provenance(rec)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    cfg: Config
    run: Run
    ds: Any
    spec: Any
    method: Any
    model: torch.nn.Module
    world: distributed.World
    device: torch.device
    logger: RunLogger
    precision: str


def train(config: str, data: str, out: str, overrides: list[str] | None = None, *,
          stages: list[str] | None = None, resume: bool = True, init_from: str | None = None) -> int:
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, create_method

    cfg = load_config(config, overrides)
    if init_from:  # --init-from RUN: the first stage's init_from, saved with the config like any key
        overrides = [*(overrides or []), f"stages.{cfg.stage_names()[0]}.init_from={init_from}"]
        cfg = load_config(config, overrides)
    STOP.install()
    world, device = distributed.init(device=cfg.runtime.device, timeout_s=cfg.runtime.dist_timeout_s)
    setup_logging(world.is_primary)
    if distributed.any_true(STOP.requested, device):
        # Stopped while starting (the CLI installs the handler before importing torch): no step
        # was taken and nothing was written, so there is nothing to checkpoint; exit as a
        # checkpointed stop so that schedulers requeue and sweeps resume the same way.
        log.info(f"stopped by signal {STOP.signum} before training started; rerun the same command to resume")
        distributed.shutdown()
        return STOP.exit_status()
    logger = None
    run = None
    try:
        run = Run(out)
        # ---- every check of the inputs, before anything is written to --out: a failed start
        # (wrong --data, unknown backbone, missing weights file, a batch larger than the split)
        # leaves --out as it was, so the corrected command runs.
        ds = PreparedDataset.open(data)
        spec = DataSpec.from_dataset(ds, cfg)
        method = create_method(cfg, spec)
        all_stages = cfg.stage_names()
        todo = all_stages if stages is None else stages
        unknown = [s for s in todo if s not in all_stages]
        if unknown:
            raise ConfigError(f"--stages: {unknown[0]!r} is not a stage of this config ({', '.join(all_stages)})")
        resolve_kind(cfg.data.loader)
        _check_run_dir(run, cfg, resume, world)
        # Raised stages.<stage>.epochs continue the run (Run.reopen_plan): those stages count as
        # not done from here on, but nothing is written before every check has passed.
        continued, restarted = run.reopen_plan(cfg, all_stages)
        to_run = _stages_to_run(run, all_stages, todo, reopened=set(continued + restarted))
        plans = {s: _train_plan(cfg, ds, method, world, s, all_stages.index(s)) for s in to_run}
        if cfg.runtime.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        distributed.seed_everything(cfg.seed, world.rank)  # before the model draws its initial weights
        model = method.build_model()
        _check_init_from(run, cfg, model, to_run)
        # ---- from here on the run directory is written
        if world.is_primary and run.exists() and run.raised_epochs(cfg):
            run.reopen(cfg, all_stages)
        _init_run_dir(run, cfg, world)
        _write_provenance(run, cfg, data, world, device, ds.split_record())
        distributed.log_device(log)
        logger = RunLogger(run, world.is_primary, cfg.runtime.progress, cfg.runtime.tensorboard,
                           cfg.runtime.log_every)
        model = distributed.apply_runtime_flags(model.to(device), cfg, device)
        model, bn_messages = apply_sync_bn(model, cfg, world, device, to_run)
        for level, text in bn_messages:
            getattr(logger, level)(text)
        ctx = Ctx(cfg, run, ds, spec, method, model, world, device, logger, distributed.precision(cfg, device))
        logger.set_plan({s: (cfg.stages[s].epochs, plans[s].steps_per_epoch) for s in to_run})
        for warning in data_warnings(cfg, ds, spec, method, to_run):
            logger.warning(warning)
        if continued:
            logger.info(f"continuing: stage {continued[0]} from epoch {run_epochs(run, continued[0])} to "
                        f"{cfg.stages[continued[0]].epochs} (stages.{continued[0]}.epochs raised)"
                        + (f"; stages after it are trained again from their start: {', '.join(restarted)}"
                           if restarted else ""))
        logger.info(f"run {run.root} | method {cfg.method} | {world.world_size} process(es) on {device.type} | "
                    f"data {data} ({len(ds)} images, split {ds.split_name or '?'}) | "
                    + _stages_text(all_stages, to_run, run.done_stages(all_stages)))
        for stage in todo:
            if stage not in to_run and run.stage_done(stage):
                logger.info(f"[{stage}] already done (best {run.state()['stages'][stage].get('best_metric')})")
        took: dict[str, float] = {}  # seconds of each stage trained by this launch
        for i, stage in enumerate(to_run):
            t_stage = time.time()
            status = train_stage(ctx, stage, all_stages[:all_stages.index(stage)], plans[stage])
            took[stage] = time.time() - t_stage
            if status != 0:
                return status
            if i + 1 < len(to_run) and _stop_agreed(device):  # the stage is done and saved
                logger.info(f"stopped by signal {STOP.signum} ({STOP.name}) after stage {stage}; rerun the same "
                            f"command to continue with {to_run[i + 1]}")
                return STOP.exit_status()
        logger.hparams(cfg.to_dict(), final_metrics(run, all_stages))
        left = [s for s in all_stages if s not in run.done_stages(all_stages)]
        logger.info(f"done: {run.root} | trained "
                    + (", ".join(f"{s} {format_duration(t)}" for s, t in took.items()) or "nothing (all done)")
                    + (f" | not trained yet: {', '.join(left)} (rerun without --stages to train them)" if left else ""))
        return 0
    finally:
        if run is not None:
            run.wait_for_writes()  # nothing written in the background is lost at exit
        if logger is not None:
            logger.close()
        distributed.shutdown()


def apply_sync_bn(model: torch.nn.Module, cfg: Config, world: distributed.World, device: torch.device,
                  stages: list[str]) -> tuple[torch.nn.Module, list[tuple[str, str]]]:
    """The model with SyncBatchNorm where ``runtime.sync_bn`` and the run call for it
    (:func:`hpc.distributed.sync_bn_plan`), and the lines to log. The converted modules keep the
    parameter and buffer names of BatchNorm, so checkpoints load into a plain model (eval,
    predict, export build one)."""
    per_gpu = {s: cfg.stages[s].batch_size // max(1, world.world_size) for s in stages}
    convert, msgs = distributed.sync_bn_plan(cfg.runtime.sync_bn, world.world_size, device.type,
                                             distributed.has_batch_norm(model), per_gpu)
    if convert:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, msgs


def _check_init_from(run: Run, cfg: Config, model: torch.nn.Module, to_run: list[str]) -> None:
    """Every ``stages.<stage>.init_from`` that will be used (the stage does not resume) names a
    checkpoint that fits the model: checked before anything is written to --out."""
    for s in to_run:
        if cfg.stages[s].init_from and not run.checkpoint(s, "last").is_file():
            path, _ = init_source(cfg.stages[s].init_from, s)
            src = load_ckpt(path, "cpu")
            fit_init_weights(model, src["model"], path, init_mismatch(src, cfg))


def run_epochs(run: Run, stage: str) -> int:
    """Epochs ``stage`` has trained so far (its epoch records)."""
    return max((r.get("epoch", 0) for r in run.records() if r.get("stage") == stage), default=0)


def final_metrics(run: Run, order: list[str]) -> dict[str, float]:
    """A finished run's numbers for TensorBoard's hparams: each stage's best selection metric
    (``final/<stage>/best``) and the validation means of its last epoch record (``final/<key>``)."""
    out: dict[str, float] = {}
    stages = run.state()["stages"]
    for s in order:
        best = stages.get(s, {}).get("best_metric")
        if isinstance(best, (int, float)) and math.isfinite(best):
            out[f"final/{s}/best"] = float(best)
    recs = run.records()
    for s in order:
        last = [r for r in recs if r.get("stage") == s]
        for k, v in (last[-1] if last else {}).items():
            if k.startswith("val/") and ("mean_auroc" in k or k.endswith("/accuracy")) and isinstance(v, (int, float)):
                out[f"final/{k}"] = float(v)
    return out


def data_warnings(cfg: Config, ds, spec, method, stages: list[str]) -> list[str]:
    """What the data make of the config, said once at the start (training goes on):

    * images upsampled: ``data.resize`` above the prepared size (the loaders enlarge the
      prepared pixels, which adds no detail; prepare at a larger ``--size`` instead);
    * a validation split too small for per-class AUROC: evaluated labels without a positive (or
      without a negative) in it have no AUROC, and the mean is over the others."""
    out = []
    size = int(ds.image_size)
    if cfg.data.resize > size or cfg.data.image_size > size:
        out.append(f"data.resize={cfg.data.resize}, data.image_size={cfg.data.image_size}: above the prepared size "
                   f"{size} of {getattr(ds, 'root', 'the prepared directory')}: every image is upsampled (blurred, "
                   f"no detail added); prepare the data at --size {max(cfg.data.resize, cfg.data.image_size)} or more, "
                   f"or lower data.resize")
    split = cfg.data.val_split
    try:
        idx = ds.indices(split)
    except Exception:  # noqa: BLE001 (a missing split is the loaders' error to give, with its own message)
        return out
    for stage in stages[:1] or []:
        idx = method.stage_indices(ds, stage, split, idx)
    if cfg.data.max_samples:
        idx = idx[: cfg.data.max_samples]
    names = list(spec.label_names)
    if spec.task == "singlelabel":
        targets = ds.targets()[idx]
        pos = {n: int((targets == j).sum()) for j, n in enumerate(names)}
        neg = {n: len(idx) - pos[n] for n in names}
    else:
        y = ds.labels_matrix()[idx] > 0
        pos = {n: int(y[:, j].sum()) for j, n in enumerate(names)}
        neg = {n: int((~y[:, j]).sum()) for j, n in enumerate(names)}
    no_pos = [n for n in spec.eval_labels if pos.get(n, 0) == 0]
    no_neg = [n for n in spec.eval_labels if neg.get(n, 0) == 0 and n not in no_pos]
    if no_pos or no_neg:
        parts = []
        if no_pos:
            parts.append(f"no positives for {', '.join(no_pos)}")
        if no_neg:
            parts.append(f"no negatives for {', '.join(no_neg)}")
        out.append(f"the validation split {split!r} ({len(idx)} images) is too small for per-class AUROC: "
                   f"{'; '.join(parts)}. Their AUROC is undefined (null) and the mean is over the other "
                   f"{len(spec.eval_labels) - len(no_pos) - len(no_neg)} of {len(spec.eval_labels)} labels, so "
                   "model selection rests on them; use a larger validation split")
    return out


def _stages_text(all_stages: list[str], to_run: list[str], done: list[str]) -> str:
    """``stages global, local, fusion``, or what this launch trains when it is not all of them:
    ``stages global (of global, local, fusion; done: ...)``."""
    if to_run == all_stages:
        return f"stages {', '.join(all_stages)}"
    rest = [f"done: {', '.join(done)}"] if done else []
    return f"stages {', '.join(to_run) or 'none'} (of {', '.join(all_stages)}" + "".join(f"; {r}" for r in rest) + ")"


def _stages_to_run(run: Run, all_stages: list[str], todo: list[str], reopened: set[str] = frozenset()) -> list[str]:
    """The stages of ``todo`` that are not done (or are ``reopened``: continued or restarted), in
    order; an unfinished earlier stage is an error."""
    to_run = []
    for i, stage in enumerate(all_stages):
        if run.stage_done(stage) and stage not in reopened:
            continue
        if stage in todo:
            to_run.append(stage)
        elif any(s in todo for s in all_stages[i + 1:]):
            raise ConfigError(f"stage {stage!r} must finish before {', '.join(todo)} can run")
    return to_run


def _train_plan(cfg: Config, ds, method, world: distributed.World, stage: str, index: int) -> TrainPlan:
    """Which samples each rank trains on in each epoch of ``stage`` (checks batch vs. split)."""
    check_batches(cfg, [stage], world.world_size)
    train_idx = method.stage_indices(ds, stage, cfg.data.train_split, ds.indices(cfg.data.train_split))
    if cfg.data.max_samples:
        train_idx = train_idx[: cfg.data.max_samples]
    try:
        return TrainPlan(train_idx, cfg.stages[stage].batch_size, world.world_size, cfg.seed + 1000 * index)
    except ValueError as e:
        raise ConfigError(f"stage {stage!r}: {e}") from None


def _eval_loader(ctx: Ctx, stage: str, split: str) -> EvalLoader:
    st = ctx.cfg.stages[stage]
    per_rank = max(1, (st.eval_batch_size or st.batch_size) // ctx.world.world_size)
    idx = ctx.method.stage_indices(ctx.ds, stage, split, ctx.ds.indices(split))
    if ctx.cfg.data.max_samples:
        idx = idx[: ctx.cfg.data.max_samples]
    return EvalLoader(ctx.ds, ctx.cfg.data, idx, per_rank, ctx.world.rank, ctx.world.world_size, ctx.device,
                      seed=ctx.cfg.seed, hires=ctx.method.needs_hires(stage))


def _share_buffers(model: torch.nn.Module, world: distributed.World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before validation.

    Without SyncBatchNorm (CPU, or runtime.sync_bn=false) each rank's running statistics
    follow its own batches, but checkpoints keep rank 0's. Validating every shard with rank
    0's makes the logged metrics those of the saved weights (what `medattn eval` sees) and
    leaves them unchanged when a run resumes, possibly on other hosts. Training is unaffected:
    it normalises with batch statistics.
    """
    if world.distributed:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, 0)


def _metric_value(metrics: dict[str, Any], key: str) -> float:
    v = metrics.get(key)
    return float("nan") if v is None else float(v)


def optimizer_step(step_module, batch, optimizer, scaler, params, grad_clip: float, device: torch.device,
                   precision: str, channels_last: bool):
    """One training step: forward through the (DDP-wrapped) StageStep, backward, update.

    Shared with ``medattn bench train`` so the benchmark measures exactly the trainer's step.
    """
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    with autocast_ctx(device, precision):
        loss, logs = step_module(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, logs


def train_stage(ctx: Ctx, stage: str, previous: list[str], plan: TrainPlan) -> int:
    """Train one stage to its end (0), or until a stop signal (the stop's exit status)."""
    cfg, run, world, device, method, model, logger = (ctx.cfg, ctx.run, ctx.world, ctx.device, ctx.method,
                                                      ctx.model, ctx.logger)
    st = cfg.stages[stage]
    params = method.prepare_stage(model, stage)
    if not params:
        raise ConfigError(f"stage {stage!r} has nothing to train")
    optimizer = build_optimizer(params, st)
    ts = TrainState(stage, model, optimizer, LRSchedule(st, plan.steps_per_epoch),
                    torch.amp.GradScaler("cuda", enabled=ctx.precision == "fp16"), method)

    # ---- where this stage starts: its own last checkpoint (the one before it when it cannot be
    # read), else the previous stage's best. Loaded straight onto the training device (no host
    # round trip for the weights).
    resume, last_path, unreadable = run.resume_state(stage, device)
    for _, problem in unreadable:
        logger.warning(f"[{stage}] {problem}")
    distributed.barrier()  # every rank has read before rank 0 moves an unreadable file aside
    if unreadable and world.is_primary:
        run.set_aside_unreadable(stage, [p for p, _ in unreadable])
        if resume is None:  # the stage starts again: nothing of its earlier launch may be kept
            run.checkpoint(stage, "best").unlink(missing_ok=True)
    resumed = resume is not None
    if resumed:
        restored_rng = ts.load_state_dict(resume, rank=world.rank, world_size=world.world_size)
        del resume  # the checkpoint's tensors, on the training device: not kept for the whole stage
        logger.info(f"[{stage}] resuming at epoch {ts.epoch + 1} step {ts.step} (global step {ts.global_step}) "
                    f"from {last_path}" + ("" if restored_rng else
                                           " (random streams reseeded: the number of processes changed)"))
    else:
        if st.init_from:  # another run's weights (fine-tuning): checked before anything was written
            path, what = init_source(st.init_from, stage)
            src = load_ckpt(path, device)
            skipped = fit_init_weights(model, src["model"], path, init_mismatch(src, cfg))
            model.load_state_dict({k: v for k, v in src["model"].items() if k not in skipped}, strict=False)
            if skipped:
                logger.warning(f"[{stage}] init_from: not loaded (a head for another number of classes; these "
                               f"start from their initialisation): {', '.join(skipped)}")
            else:
                method.load_extra_state(src.get("method", {}))
            logger.info(f"[{stage}] initialised from {what}")
        elif previous:
            init = str(run.checkpoint(previous[-1], "best"))
            src = load_ckpt(init, device)
            model.load_state_dict(src["model"])
            method.load_extra_state(src.get("method", {}))
            logger.info(f"[{stage}] initialised from {init}")
        method.init_stage(model, stage)
    logger.drop_epochs_from(stage, ts.epoch)

    step_module = StageStep(method, model, stage)
    step_module = distributed.wrap_step(step_module, world, device, cfg.runtime.compile, cfg.runtime.compile_mode)
    loader = TrainLoader(ctx.ds, cfg.data, plan, world.rank, device, cfg.seed + 7 * len(previous),
                         hires=method.needs_hires(stage))
    val_loader = _eval_loader(ctx, stage, cfg.data.val_split)
    if not resumed and method.select_initial(stage):
        _select_initial(ctx, stage, ts, val_loader)
    try:
        status = _run_epochs(ctx, stage, ts, step_module, loader, val_loader, params, plan)
    finally:
        loader.close()
        val_loader.close()
    if status != 0:
        return status
    sel_key = _select_key(ctx, stage)
    if world.is_primary:
        run.wait_for_writes()  # the stage is done only once its checkpoints are on disk
        if not run.has_checkpoint(stage, "best"):  # no validation metric: keep the final weights
            run.save_checkpoint(stage, "best", weights_payload(stage, model, method, epoch=ts.epoch, metric=None,
                                                               metric_name=sel_key, config=cfg.to_dict()))
        run.mark_stage(stage, done=True, best_metric=ts.best, best_epoch=ts.best_epoch + 1, metric=sel_key,
                       epochs=ts.epoch, global_step=ts.global_step)
    distributed.barrier()
    # The next stage starts from this stage's best weights.
    best_state = run.load_checkpoint(stage, "best", device)
    model.load_state_dict(best_state["model"])
    method.load_extra_state(best_state.get("method", {}))
    return 0


def _select_initial(ctx: Ctx, stage: str, ts: TrainState, val_loader: EvalLoader) -> None:
    """Validate the stage's starting weights and make them the first best candidate (epoch 0), so
    the stage ends no worse on validation than where it started (``Method.select_initial``)."""
    sel_key = _select_key(ctx, stage)
    t0 = time.time()
    ctx.logger.global_step_hint = ts.global_step
    val_metrics = _validate(ctx, stage, val_loader)
    metric = _metric_value(val_metrics, sel_key)
    # The starting weights' validation is a record of its own (epoch 0, before any training step),
    # so the curves and the report show what the stage had to beat. A relaunch after a kill
    # validates again: its earlier epoch-0 record is replaced, not repeated.
    ctx.logger.drop_epochs_from(stage, -1)
    ctx.logger.epoch_record({"stage": stage, "epoch": 0, "global_step": ts.global_step, "initial": True,
                             "val/time_s": time.time() - t0, **val_metrics, "select/metric": sel_key,
                             "select/best": None if math.isnan(metric) else metric, "select/best_epoch": 0,
                             "world_size": ctx.world.world_size}, ts.global_step)
    if math.isnan(metric):
        return
    ts.best, ts.best_epoch = metric, -1  # reported as epoch 0
    if ctx.world.is_primary:
        ctx.run.save_checkpoint(stage, "best", weights_payload(stage, ctx.model, ctx.method, epoch=0, metric=metric,
                                                               metric_name=sel_key, config=ctx.cfg.to_dict()))
    ctx.logger.info(f"[{stage}] starting weights: {sel_key} {metric:.4f} (epoch 0, the first best candidate)")


def _select_key(ctx: Ctx, stage: str) -> str:
    """The metric that selects the stage's best checkpoint, with the branch it trains filled in."""
    return _branch_key(ctx, stage, ctx.cfg.stages[stage].select_metric)


def _branch_key(ctx: Ctx, stage: str, key: str) -> str:
    """``val/<name>`` -> ``val/<the branch this stage trains>/<name>``; other keys unchanged."""
    branch = ctx.method.select_branch(stage)
    return key.replace("val/", f"val/{branch}/", 1) if key.startswith("val/") and key.count("/") == 1 else key


def _stop_agreed(device: torch.device) -> bool:
    """Every rank asks at the same moments, so all stop at the same step boundary."""
    return distributed.any_true(STOP.requested, device)


def _stopped(ctx: Ctx, stage: str, where: str) -> int:
    ctx.logger.end_epoch(f"stopped by signal {STOP.signum} {where}; checkpoint saved")
    ctx.logger.info(f"[{stage}] checkpoint {ctx.run.checkpoint(stage)}; rerun the same command to resume")
    return STOP.exit_status()


@dataclass
class _EpochSums:
    """What an epoch has accumulated so far (kept across a mid-epoch resume, so the epoch's record
    covers all its steps). ``sums`` stay on the device during the epoch."""

    sums: dict[str, Any]
    n_steps: int = 0
    images: int = 0
    time_before: float = 0.0  # training seconds before this launch (a resumed epoch)
    t0: float = 0.0  # when this launch started the epoch

    def state(self, world: distributed.World, device: torch.device) -> dict[str, Any]:
        """Plain data for the checkpoint: the sums averaged over ranks."""
        keys = sorted(self.sums)
        vals = distributed.all_reduce_sum([float(self.sums[k]) for k in keys], device)
        return {"sums": {k: v / world.world_size for k, v in zip(keys, vals)}, "n_steps": self.n_steps,
                "images": self.images, "time": self.time_before + time.time() - self.t0}

    @classmethod
    def resumed(cls, state: dict[str, Any] | None, device: torch.device) -> "_EpochSums":
        if not state:
            return cls({}, t0=time.time())
        return cls({k: torch.tensor(v, device=device) for k, v in state["sums"].items()}, state["n_steps"],
                   state["images"], state["time"], time.time())


def _run_epochs(ctx: Ctx, stage: str, ts: TrainState, step_module, loader: TrainLoader, val_loader: EvalLoader,
                params, plan: TrainPlan) -> int:
    """The stage's epochs from where ``ts`` is: train, validate, record, checkpoint. Returns 0, or
    the exit status of a stop (after its checkpoint)."""
    cfg, run, world, device, method, model, logger = (ctx.cfg, ctx.run, ctx.world, ctx.device, ctx.method,
                                                      ctx.model, ctx.logger)
    st = cfg.stages[stage]
    sel_key = _select_key(ctx, stage)
    acc = _EpochSums.resumed(ts.partial_epoch, device)

    background = cfg.runtime.async_checkpoints

    def save_last(wait: bool = False) -> None:
        """The resume checkpoint, by rank 0; ``wait``: on disk before returning (a stop, a mid-epoch
        checkpoint), else, at an epoch's end, written in the background when asked."""
        rng = distributed.all_gather_object(distributed.rng_state())
        part = acc.state(world, device) if ts.step > 0 else None  # mid-epoch: its sums so far
        if world.is_primary:
            run.save_checkpoint(stage, "last", ts.state_dict(rng=rng, world_size=world.world_size,
                                                             config=cfg.to_dict(), partial_epoch=part),
                                background=background and not wait)
        distributed.barrier()

    while ts.epoch < st.epochs:
        epoch = ts.epoch
        stopped = _train_epoch(ctx, stage, ts, step_module, loader, params, plan, acc, save_last)
        if stopped:
            return stopped
        train_time = time.time() - acc.t0 + acc.time_before
        sums = {k: float(v) for k, v in acc.sums.items()}
        # Per-rank sums -> means over all ranks (each rank saw its slice of every global batch).
        if world.distributed and sums:
            keys = sorted(sums)
            vals = distributed.all_reduce_sum([sums[k] for k in keys], device)
            sums = {k: v / world.world_size for k, v in zip(keys, vals)}
        t1 = time.time()
        val_metrics: dict[str, Any] = {}
        if (epoch + 1) % cfg.runtime.val_every == 0 or epoch + 1 == st.epochs:
            logger.global_step_hint = ts.global_step
            val_metrics = _validate(ctx, stage, val_loader)
        metric = _metric_value(val_metrics, sel_key) if val_metrics else None
        mon_key = _branch_key(ctx, stage, st.scheduler.monitor) if st.scheduler.monitor else sel_key
        ts.scheduler.end_epoch(_metric_value(val_metrics, mon_key) if val_metrics else None)
        improved = False
        if metric is not None and not math.isnan(metric):
            improved = ts.best is None or (metric > ts.best if st.select_mode == "max" else metric < ts.best)
            if improved:
                ts.best, ts.best_epoch, ts.bad_epochs = metric, epoch, 0
            else:
                ts.bad_epochs += 1
        ts.epoch += 1
        ts.step = 0
        record = {"stage": stage, "epoch": ts.epoch, "global_step": ts.global_step, "lr": ts.scheduler.lr(epoch),
                  **{f"train/{k}": v / max(1, acc.n_steps) for k, v in sums.items()},
                  "train/images_per_s": acc.images / max(1e-9, train_time), "train/time_s": train_time,
                  "val/time_s": time.time() - t1, **val_metrics, "select/metric": sel_key,
                  "select/best": ts.best, "select/best_epoch": ts.best_epoch + 1, "world_size": world.world_size}
        logger.epoch_record(record, ts.global_step)
        if improved and world.is_primary:
            run.save_checkpoint(stage, "best", weights_payload(stage, model, method, epoch=ts.epoch, metric=ts.best,
                                                               metric_name=sel_key, config=cfg.to_dict()),
                                background=background)
        save_last()
        acc = _EpochSums.resumed(None, device)
        summary = f"loss {record.get('train/loss', float('nan')):.4f} | {record['train/images_per_s']:.1f} img/s"
        if metric is not None:
            summary += f" | {sel_key} {metric:.4f} (best {ts.best:.4f} @ {ts.best_epoch + 1})"
        logger.end_epoch(summary)
        # A stop that came during validation: the epoch is saved, so stop here rather than
        # train part of the next one first. (After the stage's last epoch the stage is
        # finished instead, which takes no time: see train().)
        if ts.epoch < st.epochs and _stop_agreed(device):
            if world.is_primary:
                run.wait_for_writes()  # the epoch's checkpoints were written in the background
            distributed.barrier()
            return _stopped(ctx, stage, f"after epoch {ts.epoch}")
        if st.early_stop_patience and ts.bad_epochs >= st.early_stop_patience:
            logger.info(f"[{stage}] early stop: no improvement for {ts.bad_epochs} epochs")
            break
    return 0


@dataclass
class Stepper:
    """One stage's training step as the trainer runs it, and as ``medattn bench train`` measures it:
    the learning rate of the step, forward through the (DDP-wrapped) StageStep, backward, update,
    and the step's logged values added to running sums on the device. Nothing here waits for the
    device: the sums are read only every ``runtime.log_every`` steps (:func:`read_sums`)."""

    step_module: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    params: list
    grad_clip: float
    device: torch.device
    precision: str
    channels_last: bool

    def __call__(self, batch: dict[str, torch.Tensor], epoch: int, step: int, sums: dict[str, Any]) -> float:
        lr = self.scheduler.apply(self.optimizer, epoch, step)
        _, logs = optimizer_step(self.step_module, batch, self.optimizer, self.scaler, self.params,
                                 self.grad_clip, self.device, self.precision, self.channels_last)
        for k, v in logs.items():
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        return lr


def read_sums(sums: dict[str, Any], n_steps: int, where: str) -> dict[str, float]:
    """The running means, read from the device (the one host sync of a logging interval); a
    non-finite value stops the run with the step it appeared by."""
    scalars = {k: float(v) / max(1, n_steps) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in scalars.values()):
        raise RuntimeError(f"{where}: non-finite loss: {scalars}")
    return scalars


def make_stepper(ctx: Ctx, stage: str, ts: TrainState, step_module, params) -> Stepper:
    st = ctx.cfg.stages[stage]
    return Stepper(step_module, ts.optimizer, ts.scheduler, ts.scaler, params, st.grad_clip, ctx.device,
                   ctx.precision, ctx.device.type == "cuda" and ctx.cfg.runtime.channels_last)


def _train_epoch(ctx: Ctx, stage: str, ts: TrainState, step_module, loader: TrainLoader, params, plan: TrainPlan,
                 acc: _EpochSums, save_last) -> int:
    """Train the rest of epoch ``ts.epoch`` from step ``ts.step``; 0, or a stop's exit status.

    The host reads from the device once every ``runtime.log_every`` steps (and at the epoch's
    last step): the logged means, the non-finite check and the agreement on a stop signal all
    happen then, so every other step only queues work."""
    cfg, world, device, method, model, logger = (ctx.cfg, ctx.world, ctx.device, ctx.method, ctx.model,
                                                 ctx.logger)
    st = cfg.stages[stage]
    stepper = make_stepper(ctx, stage, ts, step_module, params)
    every = max(1, cfg.runtime.log_every)
    epoch = ts.epoch
    method.start_epoch_hook(model, stage, epoch)
    method.set_train_mode(model, stage)
    (step_module.module if hasattr(step_module, "module") else step_module).epoch = epoch
    logger.start_epoch(stage, epoch, st.epochs, plan.steps_per_epoch, ts.step)
    acc.t0 = time.time()
    for batch in loader.epoch(epoch, ts.step):
        lr = stepper(batch, epoch, ts.step, acc.sums)
        ts.step += 1
        ts.global_step += 1
        acc.n_steps += 1
        acc.images += batch["image"].shape[0] * world.world_size
        step = ts.step
        read_now = step % every == 0 or step == plan.steps_per_epoch
        if read_now:
            scalars = read_sums(acc.sums, acc.n_steps, f"[{stage}] epoch {epoch + 1} step {step}")
            scalars["lr"] = lr
            logger.step(step, scalars, acc.images)
            if step % every == 0:
                logger.step_scalars(stage, scalars, ts.global_step)
        else:
            logger.step(step, None, acc.images)
        faults.after_step(stage, ts.global_step)
        faults.point("step")
        # Every rank asks at the same steps, so all stop at the same step boundary.
        stop = read_now and _stop_agreed(device)
        if stop or (cfg.runtime.ckpt_every_steps and ts.global_step % cfg.runtime.ckpt_every_steps == 0
                    and step < plan.steps_per_epoch):
            # Mid-epoch checkpoints (runtime.ckpt_every_steps) are the protection against a hard
            # kill, and a stop's checkpoint must exist before the exit: both on disk before going on.
            save_last(wait=True)
        if stop:
            return _stopped(ctx, stage, f"at step {step}")
    return 0


def _validate(ctx: Ctx, stage: str, val_loader: EvalLoader) -> dict[str, Any]:
    """Validation metrics of the model as it is (the same on every rank)."""
    cfg, world, device, method, model = ctx.cfg, ctx.world, ctx.device, ctx.method, ctx.model
    channels_last = device.type == "cuda" and cfg.runtime.channels_last
    sel_branch = method.select_branch(stage)
    val_metrics: dict[str, Any] = {}
    _share_buffers(model, world)
    preds = run_inference(method, model, val_loader, stage, device, ctx.precision, channels_last)
    if world.is_primary:
        cls = classification_metrics(preds, ctx.ds.labels_matrix(), ctx.spec, ctx.ds.targets())
        for branch, entry in cls.items():
            val_metrics[f"val/{branch}/mean_auroc"] = entry["mean"]
            if "accuracy" in entry:
                val_metrics[f"val/{branch}/accuracy"] = entry["accuracy"]
            if "loss" in entry:
                val_metrics[f"val/{branch}/loss"] = entry["loss"]
            for name in ctx.spec.eval_labels:
                val_metrics[f"val/{branch}/auroc/{name}"] = entry[name]
        # Per-image quantities a method reports besides probabilities (lung Dice,
        # Grad-CAM region ratio), averaged over the images that have them.
        for name, value in extras_means(preds).items():
            val_metrics[f"val/{sel_branch}/{name}"] = value
        if ctx.logger.tensorboard:
            _tensorboard_validation(ctx, stage, preds, sel_branch)
    return distributed.broadcast_object(val_metrics)


TB_HEATMAP_IMAGES = 4  # heat-map overlays per validation in TensorBoard (a few: cheap, rank 0 only)


def _tensorboard_validation(ctx: Ctx, stage: str, preds, branch: str) -> None:
    """Rank 0: the validation's PR curves per evaluated label (the selecting branch) and a few
    heat-map overlays, through the inference floor (hpc.inference.predict_images). A failure
    here is a warning: TensorBoard extras never stop a run."""
    step = ctx.logger.global_step_hint
    if getattr(ctx.logger, "tb_validation_failed", False):
        return
    try:
        labels = ctx.ds.labels_matrix()[preds.index]
        probs = preds.probs.get(branch)
        if probs is not None and ctx.spec.task != "singlelabel":
            cols = ctx.spec.eval_indices
            ctx.logger.val_pr_curves(stage, branch, list(ctx.spec.eval_labels), labels[:, cols], probs[:, cols], step)
        elif probs is not None:  # single-label: one-vs-rest per class
            import numpy as np

            t = ctx.ds.targets()[preds.index]
            cols = ctx.spec.eval_indices
            onehot = np.stack([t == j for j in cols], axis=1)
            ctx.logger.val_pr_curves(stage, branch, list(ctx.spec.eval_labels), onehot, probs[:, cols], step)
        _tensorboard_heatmaps(ctx, stage, preds.index[:TB_HEATMAP_IMAGES], step)
    except Exception as e:  # noqa: BLE001
        ctx.logger.tb_validation_failed = True  # said once, not at every validation
        ctx.logger.warning(f"[{stage}] TensorBoard validation images/curves skipped for this run: "
                           f"{type(e).__name__}: {e}")


def _tensorboard_heatmaps(ctx: Ctx, stage: str, indices, step: int) -> None:
    from hpc.inference import LoadedModel, predict_images

    if len(indices) == 0:
        return
    model = ctx.model
    was_training = model.training
    model.eval()
    try:
        lm = LoadedModel.in_training(ctx.method, model, ctx.cfg, ctx.spec, stage, ctx.device)
        preds = predict_images(lm, ctx.ds.read_batch(list(indices)))
    finally:
        model.train(was_training)
    if not preds or preds[0].heatmap is None:
        return  # the method gives no attention map
    names = ctx.ds.manifest["image"].to_numpy()
    ctx.logger.val_heatmaps(stage, [p.view for p in preds], [p.heatmap for p in preds], step,
                            captions=[str(names[i]) for i in indices])
