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
import json
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
from hpc.checkpoint import (RunDir, TrainState, atomic_torch_save, atomic_write_text, load as load_ckpt,
                            weights_payload)
from hpc.evaluation import autocast_ctx, classification_metrics, extras_means, run_inference
from hpc.loader import EvalLoader, TrainLoader, TrainPlan, resolve_kind
from hpc.runlog import RunLogger, log, setup_logging
from hpc.schedule import LRSchedule, build_optimizer
from hpc.stop import EXIT_CHECKPOINTED, EXIT_INTERRUPTED, STOP  # noqa: F401  (STOP: installed by the CLI first)
from medattn.config import Config, load_config, load_saved_config, save_config
from medattn.methods.base import StageStep
from medattn.errors import ConfigError



# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="shipped config name (medattn configs) or a YAML path")
    p.add_argument("--data", required=True, help="prepared directory (medattn prepare --out)")
    p.add_argument("--out", required=True, help="run directory; rerunning on it resumes")
    p.add_argument("--stages", default=None,
                   help="comma-separated subset of stages to run now (earlier stages must be done); "
                        "used by SLURM stage chains")
    p.add_argument("--no-resume", action="store_true",
                   help="fail instead of resuming when --out already holds a run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    return train(args.config, args.data, args.out, args.overrides,
                 stages=args.stages.split(",") if args.stages else None, resume=not args.no_resume)


def main(argv: list[str] | None = None) -> int:
    """In-process entry point (tests): ``medattn train ARGV``, returning its exit status."""
    from medattn.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


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


def _check_run_dir(run: RunDir, cfg: Config, resume: bool, world: distributed.World) -> None:
    """Refuse an --out that holds another run (read-only: nothing is written before every check
    of the inputs has passed). A resumed run must use the same config (runtime keys may differ:
    they do not change the science)."""
    saved = run.root / "config.yaml"
    problem = None
    if world.is_primary and saved.is_file():
        if not resume:
            problem = f"{run.root} already holds a run (--no-resume given)"
        else:
            old = load_saved_config(saved).to_dict()
            new = cfg.to_dict()
            diff = [k for k in sorted(set(old) | set(new)) if k != "runtime" and old.get(k) != new.get(k)]
            if diff:
                problem = (f"{run.root} holds a run with a different config (sections differ: "
                           f"{', '.join(diff)}); resume with the same config and overrides, or use a new --out")
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def _init_run_dir(run: RunDir, cfg: Config, world: distributed.World) -> None:
    """Create RUN/config.yaml (first launch) and clear what an earlier launch's kill left half-written."""
    if world.is_primary:
        run.root.mkdir(parents=True, exist_ok=True)
        if not (run.root / "config.yaml").is_file():
            save_config(cfg, run.root / "config.yaml")
        for p in run.remove_stale_temporaries():
            log.info(f"removed {p} (a write interrupted by an earlier kill)")
    distributed.barrier()


def _write_provenance(run: RunDir, cfg: Config, data: str, world: distributed.World) -> None:
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
        "data": str(Path(data).resolve()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    path = run.root / "provenance.json"
    hist = []
    if path.is_file():
        try:
            hist = json.loads(path.read_text())
            hist = hist if isinstance(hist, list) else [hist]
        except json.JSONDecodeError:
            hist = []
    atomic_write_text(path, json.dumps(hist + [rec], indent=2))


def _precision(cfg: Config, device: torch.device) -> str:
    p = cfg.runtime.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    cfg: Config
    run: RunDir
    ds: Any
    spec: Any
    method: Any
    model: torch.nn.Module
    world: distributed.World
    device: torch.device
    logger: RunLogger
    precision: str


def train(config: str, data: str, out: str, overrides: list[str] | None = None, *,
          stages: list[str] | None = None, resume: bool = True) -> int:
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, create_method

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
    try:
        run = RunDir(out)
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
        to_run = _stages_to_run(run, all_stages, todo)
        plans = {s: _train_plan(cfg, ds, method, world, s, all_stages.index(s)) for s in to_run}
        if cfg.runtime.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        distributed.seed_everything(cfg.seed, world.rank)  # before the model draws its initial weights
        model = method.build_model()
        # ---- from here on the run directory is written
        _init_run_dir(run, cfg, world)
        _write_provenance(run, cfg, data, world)
        distributed.log_device(log)
        logger = RunLogger(run.root, world.is_primary, cfg.runtime.progress, cfg.runtime.tensorboard,
                           cfg.runtime.log_every)
        model = model.to(device)
        if device.type == "cuda" and cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.runtime.sync_bn and world.distributed:
            if device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # PyTorch's SyncBatchNorm is CUDA-only
                logger.info("runtime.sync_bn ignored on CPU (PyTorch supports SyncBatchNorm on CUDA only)")
        ctx = Ctx(cfg, run, ds, spec, method, model, world, device, logger, _precision(cfg, device))
        logger.info(f"run {run.root} | method {cfg.method} | {world.world_size} process(es) on {device.type} | "
                    f"data {data} ({len(ds)} images, split {ds.split_name or '?'}) | stages {', '.join(all_stages)}")
        for stage in todo:
            if stage not in to_run and run.stage_done(stage):
                logger.info(f"[{stage}] already done (best {run.state()['stages'][stage].get('best_metric')})")
        for i, stage in enumerate(to_run):
            status = train_stage(ctx, stage, all_stages[:all_stages.index(stage)], plans[stage])
            if status != 0:
                return status
            if i + 1 < len(to_run) and _stop_agreed(device):  # the stage is done and saved
                logger.info(f"stopped by signal {STOP.signum} ({STOP.name}) after stage {stage}; rerun the same "
                            f"command to continue with {to_run[i + 1]}")
                return STOP.exit_status()
        logger.info(f"done: {run.root}")
        return 0
    finally:
        if logger is not None:
            logger.close()
        distributed.shutdown()


def _stages_to_run(run: RunDir, all_stages: list[str], todo: list[str]) -> list[str]:
    """The stages of ``todo`` that are not done, in order; an unfinished earlier stage is an error."""
    to_run = []
    for i, stage in enumerate(all_stages):
        if run.stage_done(stage):
            continue
        if stage in todo:
            to_run.append(stage)
        elif any(s in todo for s in all_stages[i + 1:]):
            raise ConfigError(f"stage {stage!r} must finish before {', '.join(todo)} can run")
    return to_run


def _train_plan(cfg: Config, ds, method, world: distributed.World, stage: str, index: int) -> TrainPlan:
    """Which samples each rank trains on in each epoch of ``stage`` (checks batch vs. split)."""
    st = cfg.stages[stage]
    train_idx = method.stage_indices(ds, stage, cfg.data.train_split, ds.indices(cfg.data.train_split))
    if cfg.data.max_samples:
        train_idx = train_idx[: cfg.data.max_samples]
    try:
        return TrainPlan(train_idx, _loader_batch(st, world), world.world_size, cfg.seed + 1000 * index)
    except ValueError as e:
        raise ConfigError(f"stage {stage!r}: {e}") from None


def _loader_batch(stage_cfg, world: distributed.World) -> int:
    if stage_cfg.batch_size % world.world_size:
        raise ConfigError(f"batch_size {stage_cfg.batch_size} is not divisible by the {world.world_size} processes")
    return stage_cfg.batch_size


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

    # ---- where this stage starts: its own last checkpoint, else the previous stage's best.
    # Loaded straight onto the training device (no host round trip for the weights).
    last_path = run.ckpt(stage, "last")
    if last_path.is_file():
        restored_rng = ts.load_state_dict(load_ckpt(last_path, device), rank=world.rank,
                                          world_size=world.world_size)
        logger.info(f"[{stage}] resuming at epoch {ts.epoch + 1} step {ts.step} (global step {ts.global_step}) "
                    f"from {last_path}" + ("" if restored_rng else
                                           " (random streams reseeded: the number of processes changed)"))
    else:
        init = st.init_from or (str(run.ckpt(previous[-1], "best")) if previous else "")
        if init:
            src = load_ckpt(init, device)
            model.load_state_dict(src["model"])
            method.load_extra_state(src.get("method", {}))
            logger.info(f"[{stage}] initialised from {init}")
    logger.drop_epochs_from(stage, ts.epoch)

    step_module = StageStep(method, model, stage)
    step_module = distributed.wrap_step(step_module, world, device, cfg.runtime.compile)
    loader = TrainLoader(ctx.ds, cfg.data, plan, world.rank, device, cfg.seed + 7 * len(previous),
                         hires=method.needs_hires(stage))
    val_loader = _eval_loader(ctx, stage, cfg.data.val_split)
    try:
        status = _run_epochs(ctx, stage, ts, step_module, loader, val_loader, params, plan)
    finally:
        loader.close()
        val_loader.close()
    if status != 0:
        return status
    sel_key = _select_key(ctx, stage)
    if world.is_primary:
        if not run.ckpt(stage, "best").is_file():  # no validation metric: keep the final weights
            atomic_torch_save(weights_payload(stage, model, method, epoch=ts.epoch, metric=None,
                                              metric_name=sel_key, config=cfg.to_dict()), run.ckpt(stage, "best"))
        run.mark_stage(stage, done=True, best_metric=ts.best, best_epoch=ts.best_epoch + 1, metric=sel_key,
                       epochs=ts.epoch, global_step=ts.global_step)
    distributed.barrier()
    # The next stage starts from this stage's best weights.
    best_state = load_ckpt(run.ckpt(stage, "best"), device)
    model.load_state_dict(best_state["model"])
    method.load_extra_state(best_state.get("method", {}))
    return 0


def _select_key(ctx: Ctx, stage: str) -> str:
    """The metric that selects ``best.pt``, with the branch the stage trains filled in."""
    sel = ctx.cfg.stages[stage].select_metric
    branch = ctx.method.select_branch(stage)
    return sel.replace("val/", f"val/{branch}/", 1) if sel.startswith("val/") and sel.count("/") == 1 else sel


def _stop_agreed(device: torch.device) -> bool:
    """Every rank asks at the same moments, so all stop at the same step boundary."""
    return distributed.any_true(STOP.requested, device)


def _stopped(ctx: Ctx, stage: str, where: str) -> int:
    ctx.logger.end_epoch(f"stopped by signal {STOP.signum} {where}; checkpoint saved")
    ctx.logger.info(f"[{stage}] checkpoint {ctx.run.ckpt(stage, 'last')}; rerun the same command to resume")
    return STOP.exit_status()


def _run_epochs(ctx: Ctx, stage: str, ts: TrainState, step_module, loader: TrainLoader, val_loader: EvalLoader,
                params, plan: TrainPlan) -> int:
    cfg, run, world, device, method, model, logger = (ctx.cfg, ctx.run, ctx.world, ctx.device, ctx.method,
                                                      ctx.model, ctx.logger)
    st = cfg.stages[stage]
    optimizer, sched, scaler = ts.optimizer, ts.scheduler, ts.scaler
    sel_branch = method.select_branch(stage)
    sel_key = _select_key(ctx, stage)
    last_path = run.ckpt(stage, "last")

    # Running sums of the epoch in progress, so a mid-epoch resume logs the whole epoch's means.
    partial: dict[str, Any] = {"sums": {}, "n_steps": 0, "images": 0, "time": 0.0}
    resumed_partial = ts.partial_epoch

    def save_last() -> None:
        rng = distributed.all_gather_object(distributed.rng_state())
        part = None
        if ts.step > 0:  # mid-epoch: keep what this epoch has accumulated (means over ranks)
            keys = sorted(partial["sums"])
            vals = distributed.all_reduce_sum([float(partial["sums"][k]) for k in keys], device)
            part = {"sums": {k: v / world.world_size for k, v in zip(keys, vals)}, "n_steps": partial["n_steps"],
                    "images": partial["images"], "time": partial["time"] + time.time() - partial["t0"]}
        if world.is_primary:
            atomic_torch_save(ts.state_dict(rng=rng, world_size=world.world_size, config=cfg.to_dict(),
                                            partial_epoch=part), last_path)
        distributed.barrier()

    channels_last = device.type == "cuda" and cfg.runtime.channels_last
    # Steps between host syncs (stop-signal agreement, non-finite check, log scalars).
    check_every = max(1, min(10, cfg.runtime.log_every))
    while ts.epoch < st.epochs:
        epoch = ts.epoch
        method.start_epoch_hook(model, stage, epoch)
        method.set_train_mode(model, stage)
        if hasattr(step_module, "module"):
            step_module.module.epoch = epoch
        else:
            step_module.epoch = epoch
        logger.start_epoch(stage, epoch, st.epochs, plan.steps_per_epoch, ts.step)
        t0 = time.time()
        sums: dict[str, Any] = {}
        n_steps, images, time_before = 0, 0, 0.0
        if resumed_partial:
            sums = {k: torch.tensor(v, device=device) for k, v in resumed_partial["sums"].items()}
            n_steps, images, time_before = (resumed_partial["n_steps"], resumed_partial["images"],
                                            resumed_partial["time"])
            resumed_partial = None
        partial.update(sums=sums, n_steps=n_steps, images=images, time=time_before, t0=t0)
        for batch in loader.epoch(epoch, ts.step):
            lr = sched.apply(optimizer, epoch, ts.step)
            loss, logs = optimizer_step(step_module, batch, optimizer, scaler, params, st.grad_clip, device,
                                        ctx.precision, channels_last)
            ts.step += 1
            ts.global_step += 1
            n_steps += 1
            images += batch["image"].shape[0] * world.world_size
            # Accumulate on the device: a float() here would wait for the GPU every step.
            for k, v in logs.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
            partial.update(sums=sums, n_steps=n_steps, images=images)
            step = ts.step
            sync_now = step % check_every == 0 or step == plan.steps_per_epoch
            if sync_now or logger.wants_scalars(step):
                scalars = {k: float(v) / n_steps for k, v in sums.items()}
                if not all(math.isfinite(v) for v in scalars.values()):
                    raise RuntimeError(f"[{stage}] non-finite loss by epoch {epoch + 1} step {step}: {scalars}")
                scalars["lr"] = lr
                logger.step(step, scalars, images)
                if step % cfg.runtime.log_every == 0:
                    logger.step_scalars(stage, scalars, ts.global_step)
            else:
                logger.step(step, None, images)
            faults.after_step(stage, ts.global_step)
            faults.point("step")
            stop = sync_now and _stop_agreed(device)
            if stop or (cfg.runtime.ckpt_every_steps and ts.global_step % cfg.runtime.ckpt_every_steps == 0
                        and step < plan.steps_per_epoch):
                save_last()
            if stop:
                return _stopped(ctx, stage, f"at step {step}")
        train_time = time.time() - t0 + time_before
        sums = {k: float(v) for k, v in sums.items()}
        # Per-rank sums -> means over all ranks (each rank saw its slice of every global batch).
        if world.distributed and sums:
            keys = sorted(sums)
            vals = distributed.all_reduce_sum([sums[k] for k in keys], device)
            sums = {k: v / world.world_size for k, v in zip(keys, vals)}
        # ---- validation
        t1 = time.time()
        val_metrics: dict[str, Any] = {}
        if (epoch + 1) % cfg.runtime.eval_every == 0 or epoch + 1 == st.epochs:
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
            val_metrics = distributed.broadcast_object(val_metrics)
        metric = _metric_value(val_metrics, sel_key) if val_metrics else None
        sched.end_epoch(metric)
        improved = False
        if metric is not None and not math.isnan(metric):
            improved = ts.best is None or (metric > ts.best if st.select_mode == "max" else metric < ts.best)
            if improved:
                ts.best, ts.best_epoch, ts.bad_epochs = metric, epoch, 0
            else:
                ts.bad_epochs += 1
        ts.epoch += 1
        ts.step = 0
        record = {"stage": stage, "epoch": ts.epoch, "global_step": ts.global_step, "lr": sched.lr(epoch),
                  **{f"train/{k}": v / max(1, n_steps) for k, v in sums.items()},
                  "train/images_per_s": images / max(1e-9, train_time), "train/time_s": train_time,
                  "val/time_s": time.time() - t1, **val_metrics, "select/metric": sel_key,
                  "select/best": ts.best, "select/best_epoch": ts.best_epoch + 1, "world_size": world.world_size}
        logger.epoch_record(record, ts.global_step)
        if improved and world.is_primary:
            atomic_torch_save(weights_payload(stage, model, method, epoch=ts.epoch, metric=ts.best,
                                              metric_name=sel_key, config=cfg.to_dict()), run.ckpt(stage, "best"))
        save_last()
        summary = f"loss {record.get('train/loss', float('nan')):.4f} | {record['train/images_per_s']:.1f} img/s"
        if metric is not None:
            summary += f" | {sel_key} {metric:.4f} (best {ts.best:.4f} @ {ts.best_epoch + 1})"
        logger.end_epoch(summary)
        # A stop that came during validation: the epoch is saved, so stop here rather than
        # train part of the next one first. (After the stage's last epoch the stage is
        # finished instead, which takes no time: see train().)
        if ts.epoch < st.epochs and _stop_agreed(device):
            return _stopped(ctx, stage, f"after epoch {ts.epoch}")
        if st.early_stop_patience and ts.bad_epochs >= st.early_stop_patience:
            logger.info(f"[{stage}] early stop: no improvement for {ts.bad_epochs} epochs")
            break
    return 0
