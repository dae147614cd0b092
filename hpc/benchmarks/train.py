"""Training throughput per stage: the trainer's real step (loader -> StageStep/DDP -> backward ->
optimizer, hpc.train.Stepper), the same step on a resident batch (no loader), a bare PyTorch loop
on the same model and data, and the loader alone. With ``--nproc 1,2`` it also runs the trainer
under torchrun with 2 processes and reports DDP scaling efficiency = throughput(N) / (N x
throughput(1)). ``--per-gpu-batch B`` measures what one GPU of an N-GPU run sees (the config's
global batch split N ways: B images per step on one process); ``--gpus N`` does that stage by stage
(each stage's config batch / N: for the paper's AG-CNN over 8 GPUs, global 16, local and fusion 8).

The model is set up as the trainer sets it (hpc.distributed.apply_runtime_flags: cudnn.benchmark,
channels_last on CUDA; bf16 autocast; ``runtime.compile`` / ``runtime.compile_mode``), and each
row reports those flags. On CUDA each row's peak memory is measured from a reset at its start.

``--count-syncs`` also counts, over steady-state steps, the aten ops each step dispatches and
those that would make the host wait for a GPU (hpc/syncs.py; works on a CPU): ``ops_per_step``,
``sync_ops_per_step``, ``host_tensors_per_step`` (tensors built from Python data, each a blocking
copy on a GPU) and, separately, ``sync_ops_per_log``: the one read of the running means that the
trainer does every ``runtime.log_every`` steps.

  medattn bench train --config demo --fake-data 2048
  medattn bench train --config demo --fake-data 512 --count-syncs --json-out bench-out
  medattn bench train --config agcnn_resnet50 --data /data/prep --device cuda      # one command on a GPU node
  medattn bench train --config agcnn_resnet50 --data /data/prep --device cuda --gpus 8    # one GPU of 8
  medattn bench train --config demo --fake-data 2048 --nproc 1,2 --stages global   # DDP scaling (gloo on CPU)

Images/s count images entering the trained stage (the batch of the process measured, times the
processes), after warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc.benchmarks.common import print_table, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="config name or YAML (model, stages, batch sizes)")
    p.add_argument("--data", help="prepared directory (or --fake-data)")
    p.add_argument("--fake-data", type=int, default=0, metavar="N", help="write N fake images to a temp dir")
    p.add_argument("--fake-size", type=int, default=256, help="prepared size of the fake images")
    p.add_argument("--stages", default=None, help="comma list (default: all stages of the config)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cudnn autotune, compile)")
    p.add_argument("--batch", type=int, default=0, help="global batch for every stage (default: the config's)")
    p.add_argument("--per-gpu-batch", type=int, default=0, metavar="B",
                   help="one process at B images per step: what one GPU of an N-GPU run sees when the global "
                        "batch is N x B (e.g. the paper's 128 over 8 GPUs: 16)")
    p.add_argument("--gpus", type=int, default=0, metavar="N",
                   help="one process at each stage's config batch / N: what one GPU of an N-GPU run sees")
    p.add_argument("--count-syncs", action="store_true",
                   help="count the aten ops and the host-syncing ops of steady-state steps (works on CPU)")
    p.add_argument("--sync-steps", type=int, default=3, help="steps counted by --count-syncs (default 3)")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: also run the counted steps under torch.cuda.set_sync_debug_mode('error'), which "
                        "raises at any synchronising CUDA call torch makes")
    p.add_argument("--modes", default="trainer,step,bare,loader,eval",
                   help="comma list: trainer (end to end), step (resident batch), bare (plain loop), loader, "
                        "eval (validation forward)")
    p.add_argument("--project", default="78146,8378",
                   help="TRAIN,VAL image counts to project the config's full schedule onto (default: the "
                        "official split of ChestX-ray14 with a 10%% patient validation part); '' = off")
    p.add_argument("--nproc", default="1", help="comma list of process counts, e.g. 1,2 (torchrun, gloo on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides of a bench run: the user's, then the batch options."""
    from medattn.config import load_config
    from medattn.errors import ConfigError

    ov = list(args.overrides)
    if args.batch or args.per_gpu_batch:
        ov.append(f"stages.*.batch_size={args.per_gpu_batch or args.batch}")
    elif getattr(args, "gpus", 0):
        for name, st in load_config(args.config, ov).stages.items():
            if st.batch_size % args.gpus:
                raise ConfigError(f"--gpus {args.gpus}: stages.{name}.batch_size {st.batch_size} does not split "
                                  f"evenly over {args.gpus} GPUs")
            ov.append(f"stages.{name}.batch_size={st.batch_size // args.gpus}")
    return [*ov, f"runtime.device={args.device}"]


def _setup(args: argparse.Namespace, data: str) -> dict[str, Any]:
    from hpc import distributed
    from hpc.distributed import apply_runtime_flags
    from medattn.config import load_config
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, build

    cfg = load_config(args.config, _overrides(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    world, device = distributed.init(device=cfg.runtime.device)
    distributed.seed_everything(cfg.seed, world.rank)
    ds = PreparedDataset.open(data)
    spec = DataSpec.from_dataset(ds, cfg)
    method, model = build(cfg, spec)
    model = apply_runtime_flags(model.to(device), cfg, device)  # as the trainer does, not a copy of it
    return {"cfg": cfg, "world": world, "device": device, "ds": ds, "spec": spec, "method": method, "model": model}


def _loader(env: dict[str, Any], stage: str, steps: int):
    from hpc.loader import TrainLoader, TrainPlan

    cfg, world, ds = env["cfg"], env["world"], env["ds"]
    gb = cfg.stages[stage].batch_size
    idx = ds.indices(cfg.data.train_split)
    reps = max(1, -(-(steps * gb) // len(idx)))
    plan = TrainPlan(np.tile(idx, reps), gb, world.world_size, seed=0)
    return TrainLoader(ds, cfg.data, plan, world.rank, env["device"], cfg.seed,
                       hires=env["method"].needs_hires(stage)), gb


def measure_stage(env: dict[str, Any], stage: str, modes: list[str], steps: int, warmup: int,
                  count: int = 0, sync_debug: bool = False) -> list[dict]:
    from hpc import distributed
    from hpc.schedule import LRSchedule, build_optimizer
    from hpc.syncs import count_syncs
    from hpc.distributed import runtime_flags
    from hpc.train import Stepper, read_sums
    from medattn import losses
    from medattn.methods.base import StageStep

    cfg, world, device, method, model = env["cfg"], env["world"], env["device"], env["method"], env["model"]
    flags = runtime_flags(cfg, device)
    precision, channels_last = flags["precision"], flags["channels_last"]
    params = method.prepare_stage(model, stage)
    method.set_train_mode(model, stage)
    step_module: torch.nn.Module = StageStep(method, model, stage)
    step_module = distributed.wrap_step(step_module, world, device, cfg.runtime.compile, cfg.runtime.compile_mode)
    optimizer = build_optimizer(params, cfg.stages[stage])
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    st = cfg.stages[stage]
    # The trainer's own step (hpc.train.Stepper: learning rate, forward, backward, update, the
    # logged values summed on the device), not a copy of it.
    stepper = Stepper(step_module, optimizer, LRSchedule(st, 1000), scaler, params, st.grad_clip, device,
                      precision, channels_last)
    sums: dict[str, Any] = {}
    rows = []

    def timed(fn, n) -> float:
        if device.type == "cuda":  # each row's own peak, not the largest of the rows before it
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            fn()
        _sync(device)
        distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        distributed.barrier()
        return time.perf_counter() - t0

    loader, gb = _loader(env, stage, steps + 2 * warmup + count + 2)
    it = iter(loader.epoch(0))
    first = next(it)
    resident = {k: v.clone() for k, v in first.items()}

    def row(mode: str, dt: float, n: int, note: str = "") -> dict:
        r = {"stage": stage, "mode": mode, "images_per_s": n * gb / dt, "ms_per_step": 1000 * dt / n,
             "global_batch": gb, "processes": world.world_size, "device": device.type, "loader": loader.kind,
             **flags, "cudnn_benchmark_set": torch.backends.cudnn.benchmark, "note": note}
        if device.type == "cuda":  # peak since timed() reset it: warm-up and timed steps of this row
            r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return r

    def counted(r: dict, fn) -> dict:
        """Add the op and sync counts of ``count`` calls of ``fn`` (already warm) to row ``r``, and
        on CUDA, with ``sync_debug``, whether torch's sync checker objected."""
        if count <= 0:
            return r
        with count_syncs(cpu_is_device=device.type != "cuda") as c:
            for _ in range(count):
                fn()
        r.update(ops_per_step=c.ops / count, sync_ops_per_step=c.syncs / count,
                 host_tensors_per_step=c.host_tensors / count, sync_ops=dict(c.sync_ops))
        if sync_debug and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(count):
                    fn()
                r["cuda_sync_debug"] = "ok"
            except RuntimeError as e:
                r["cuda_sync_debug"] = f"error: {str(e).splitlines()[0][:200]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return r

    step_no = [0]

    def trainer_step():
        stepper(next(it), 0, step_no[0] % 1000, sums)
        step_no[0] += 1

    def resident_step():
        stepper(dict(resident), 0, step_no[0] % 1000, sums)
        step_no[0] += 1

    if "trainer" in modes:
        r = counted(row("trainer", timed(trainer_step, steps), steps, "loader + StageStep + optimizer (end to end)"),
                    trainer_step)
        if count > 0:
            # The periodic read (every runtime.log_every steps): the trainer's one host sync.
            with count_syncs(cpu_is_device=device.type != "cuda") as c:
                read_sums(sums, max(1, step_no[0]), "bench")
            r.update(sync_ops_per_log=c.syncs)
        rows.append(r)
    if "step" in modes:
        rows.append(counted(row("step", timed(resident_step, steps), steps, "resident batch, no loader"),
                            resident_step))
    if "bare" in modes and world.world_size == 1 and hasattr(model, "global_branch") == (stage == "global"):
        # A plain PyTorch loop on the same module and batch: no method, no StageStep, no schedule.
        net = model.global_branch if hasattr(model, "global_branch") else model
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        x = resident["image"].contiguous(memory_format=torch.channels_last) if channels_last else resident["image"]
        y = resident["labels"]

        def h():
            from hpc.inference import autocast_ctx

            with autocast_ctx(device, precision):
                out = net(x)
            loss = losses.bce(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows.append(counted(row("bare", timed(h, steps), steps, "plain forward/backward/SGD on the same model"), h))
    if "eval" in modes:
        from hpc.inference import autocast_ctx

        model.eval()

        def ev():
            with torch.no_grad(), autocast_ctx(device, precision):
                method.predict(model, dict(resident), stage)
        rows.append(row("eval", timed(ev, steps), steps, "validation forward (method.predict)"))
        method.set_train_mode(model, stage)
    if "loader" in modes:
        loader2, _ = _loader(env, stage, steps + warmup + 2)
        it2 = iter(loader2.epoch(0))
        rows.append(row("loader", timed(lambda: next(it2), steps), steps, f"{loader2.kind} loader alone"))
    return rows


def _worker(args: argparse.Namespace, data: str) -> list[dict]:
    from hpc import distributed

    env = _setup(args, data)
    stages = args.stages.split(",") if args.stages else env["cfg"].stage_names()
    modes = [m.strip() for m in args.modes.split(",")]
    rows = []
    try:
        for stage in stages:
            rows += measure_stage(env, stage, modes, args.steps, args.warmup,
                                  args.sync_steps if args.count_syncs else 0, args.sync_debug)
    finally:
        distributed.shutdown()
    return rows


def run(args: argparse.Namespace) -> int:
    from medattn.errors import MedattnError

    if args.worker:  # inside torchrun
        data = args.data
        rows = _worker(args, data)
        if int(os.environ.get("RANK", "0")) == 0 and args.worker_out:
            Path(args.worker_out).write_text(json.dumps(rows))
        return 0
    if not args.data and not args.fake_data:
        raise MedattnError("give --data PREP or --fake-data N")
    tmp = None
    data = args.data
    if args.fake_data:
        from medattn.data.fake import write_fake_prepared

        tmp = tempfile.TemporaryDirectory(prefix="medattn-bench-")
        # Every disease and a lung box per image, so every method's config can run on it.
        data = str(write_fake_prepared(Path(tmp.name) / "prep", n=args.fake_data, size=args.fake_size,
                                       splits=(0.9, 0.05, 0.05), shard_size=4096, classes=14, lung_boxes=True))
    rows: list[dict] = []
    nprocs = [int(n) for n in args.nproc.split(",")]
    for n in nprocs:
        if n == 1:
            rows += _worker(args, data)
            continue
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "medattn", "bench", "train", "--worker", "--worker-out", str(out), "--data", data,
               "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--modes", ",".join(m for m in args.modes.split(",") if m != "bare"), "--device", args.device,
               "--json-out", str(out.with_suffix(".unused"))]
        if args.stages:
            cmd += ["--stages", args.stages]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        if args.per_gpu_batch:
            cmd += ["--per-gpu-batch", str(args.per_gpu_batch)]
        if args.gpus:
            cmd += ["--gpus", str(args.gpus)]
        if args.count_syncs:
            cmd += ["--count-syncs", "--sync-steps", str(args.sync_steps)]
        if args.sync_debug:
            cmd += ["--sync-debug"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += list(args.overrides)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise MedattnError(f"torchrun with {n} processes failed:\n{r.stderr[-3000:]}")
        rows += json.loads(out.read_text())
        out.unlink(missing_ok=True)
    # DDP scaling efficiency against the 1-process trainer figure of the same stage.
    base = {r["stage"]: r["images_per_s"] for r in rows if r["mode"] == "trainer" and r["processes"] == 1}
    for r in rows:
        if r["mode"] == "trainer" and r["processes"] > 1 and r["stage"] in base:
            r["scaling_efficiency"] = r["images_per_s"] / (r["processes"] * base[r["stage"]])
    cols = ["stage", "mode", "processes", "images_per_s", "ms_per_step", "global_batch", "device", "loader",
            "precision", "channels_last", "cudnn_benchmark", "compile_mode", "scaling_efficiency"]
    if args.count_syncs:
        cols += ["ops_per_step", "sync_ops_per_step", "host_tensors_per_step", "sync_ops_per_log"]
    if any("peak_memory_gib" in r for r in rows):
        cols += ["peak_memory_gib"]
    if args.sync_debug:
        cols += ["cuda_sync_debug"]
    print_table(rows, cols + ["note"])
    projection = project_schedule(rows, args) if args.project else None
    path = write_result("train", rows, args.json_out, extra={"config": args.config, "data": data,
                                                               "projection": projection})
    if path:
        print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def project_schedule(rows: list[dict], args: argparse.Namespace) -> dict | None:
    """Wall time of the config's whole schedule from measured per-stage throughput:
    sum over stages of epochs x (train images / trainer img/s + val images / eval img/s)."""
    from medattn.config import load_config

    n_train, n_val = (int(x) for x in args.project.split(","))
    cfg = load_config(args.config, list(args.overrides))
    out = {"train_images": n_train, "val_images": n_val, "stages": {}}
    for procs in sorted({r["processes"] for r in rows}):
        total = 0.0
        for stage, st in cfg.stages.items():
            tr = [r for r in rows if r["stage"] == stage and r["mode"] == "trainer" and r["processes"] == procs]
            ev = [r for r in rows if r["stage"] == stage and r["mode"] == "eval" and r["processes"] == procs]
            if not tr:
                continue
            t = st.epochs * n_train / tr[0]["images_per_s"]
            if ev:
                t += st.epochs * n_val / ev[0]["images_per_s"]
            out["stages"].setdefault(stage, {})[procs] = t
            total += t
        out[f"total_s_{procs}proc"] = total
        print(f"projected schedule ({', '.join(f'{s}:{c.epochs}' for s, c in cfg.stages.items())} epochs, "
              f"{n_train:,} train + {n_val:,} val images) with {procs} process(es): {total / 60:.1f} min")
    return out
