"""Process-group setup and the few collectives the runtime needs.

One place reads the launcher's environment: torchrun (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*),
SLURM srun tasks (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, e.g. submitit) or nothing (one
process). Everything else asks :func:`world` and never reads those variables itself.
"""
from __future__ import annotations

import datetime as _dt
import os
import random
import socket
import subprocess
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None
_DEVICE: torch.device | None = None
_DEVICE_INFO: dict[str, Any] = {}


def world_from_env(env: dict[str, str] | None = None) -> World:
    """Read rank information from torchrun's or SLURM's variables (torchrun wins)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                     int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        ntasks = int(env["SLURM_NTASKS"])
        local_ws = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or \
            max(1, ntasks // max(1, int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))))
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), ntasks, local_ws, "slurm")
    return World()


def _slurm_master(env: dict[str, str]) -> tuple[str, int]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname()
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        host = out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        host = nodelist.split(",")[0]
    # Same port on every task, derived from the job id (as submitit does), so reruns do not clash.
    port = int(env.get("MASTER_PORT") or 20000 + random.Random(env.get("SLURM_JOB_ID", "0")).randrange(40000))
    return host, port


def _gpu_hardware_present() -> bool:
    """Whether this machine looks like it has NVIDIA GPUs, whatever CUDA thinks of them."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): can this process use CUDA, and why (not)."""
    if torch.version.cuda is None:
        return False, f"this PyTorch build ({torch.__version__}) has no CUDA support"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False, "CUDA_VISIBLE_DEVICES is empty (no GPU was given to this process)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if not ok:
        # torch explains a failed initialisation (e.g. a driver too old for this build) in a
        # warning; that sentence is the reason a user needs to see.
        why = " ".join(str(w.message).strip() for w in caught if "CUDA" in str(w.message))
        return False, why or f"torch.cuda.is_available() is False (torch built for CUDA {torch.version.cuda})"
    n = torch.cuda.device_count()
    return True, f"{n} CUDA device(s) visible: {torch.cuda.get_device_name(0)}"


def choose_device(requested: str, local_rank: int = 0) -> tuple[torch.device, dict[str, Any]]:
    """The device of this process and a record of why (logged, and kept in provenance.json).

    ``auto`` takes CUDA when it is usable and says why when it is not, loudly when the machine
    has GPUs that CUDA cannot use (a driver too old for the wheels, a job that hid them);
    ``cuda`` refuses to start without CUDA instead of training for days on the CPU.
    """
    from medattn.errors import ConfigError

    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"runtime.device={requested!r}: expected auto, cpu or cuda")
    info: dict[str, Any] = {"requested": requested}
    if requested == "cpu":
        info.update(chosen="cpu", reason="runtime.device=cpu")
        return torch.device("cpu"), info
    usable, reason = cuda_status()
    if not usable:
        if requested == "cuda":
            raise ConfigError(f"runtime.device=cuda but CUDA cannot be used: {reason}")
        # GPUs hidden on purpose (CUDA_VISIBLE_DEVICES="", as Ray and SLURM do for CPU-only work)
        # are a choice; GPUs that CUDA fails to use are a fault to shout about.
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) == ""
        info.update(chosen="cpu", reason=f"CUDA not usable: {reason}",
                    gpu_hardware=_gpu_hardware_present() and not hidden)
        return torch.device("cpu"), info
    # Under submitit each task sees one GPU (CUDA_VISIBLE_DEVICES=<local rank>), so index 0.
    n = torch.cuda.device_count()
    dev = torch.device("cuda", local_rank if n > local_rank else 0)
    info.update(chosen=str(dev), reason=reason, name=torch.cuda.get_device_name(dev))
    return dev, info


def init(backend: str | None = None, device: str = "auto", timeout_s: int = 1800) -> tuple[World, torch.device]:
    """Initialise the process group (if more than one process) and pick this process's device.

    Args:
        backend: ``nccl``/``gloo``; default nccl on CUDA, gloo on CPU.
        device: ``auto`` (CUDA when usable), ``cpu`` or ``cuda`` (an error without CUDA); the
            choice and its reason are in :func:`device_info`.
        timeout_s: collective timeout; keep it finite so a dead rank becomes an error, not a hang.
    """
    global _WORLD, _DEVICE, _DEVICE_INFO
    w = world_from_env()
    dev, info = choose_device(device, w.local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if w.distributed and not dist.is_initialized():
        if w.launcher == "slurm":
            host, port = _slurm_master(dict(os.environ))
            os.environ.setdefault("MASTER_ADDR", host)
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ.setdefault("RANK", str(w.rank))
            os.environ.setdefault("WORLD_SIZE", str(w.world_size))
            os.environ.setdefault("LOCAL_RANK", str(w.local_rank))
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": _dt.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        info["backend"] = backend
    _WORLD, _DEVICE, _DEVICE_INFO = w, dev, info
    return w, dev


def device_info() -> dict[str, Any]:
    """How :func:`init` chose the device: requested, chosen, reason (and the GPU's name)."""
    return dict(_DEVICE_INFO)


def log_device(log) -> None:
    """One line on the device; a warning when GPUs are there but CUDA cannot use them."""
    info = _DEVICE_INFO
    if info.get("gpu_hardware"):
        log.warning(f"WARNING: this machine has NVIDIA GPUs but CUDA cannot use them ({info['reason']}); "
                    "training on the CPU. Set runtime.device=cuda to make this an error.")
    else:
        log.info(f"device {info.get('chosen')} (runtime.device={info.get('requested')}: {info.get('reason')})")


def current() -> World:
    return _WORLD or world_from_env()


def shutdown() -> None:
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a dead peer must not turn a clean exit into a hang
            pass
        dist.destroy_process_group()
    _WORLD = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (used to agree on stopping)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or _DEVICE or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or _DEVICE or "cpu")
    dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; ranks get different streams (seed + rank)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """This process's random states as plain data (ints, lists, bytes).

    Plain data, not tensors: a checkpoint is loaded with ``weights_only=True`` and onto the
    training device, which would turn a torch ByteTensor state into a CUDA (or meta) tensor
    that ``torch.set_rng_state`` refuses. Bytes stay bytes wherever they are loaded.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "torch": bytes(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(t.cpu().numpy().tobytes()) for t in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_byte_tensor(b) for b in cuda])
        else:  # a different number of visible GPUs: keep the fresh seed, say so
            warnings.warn(f"checkpoint has CUDA RNG states of {len(cuda)} device(s), this process sees "
                          f"{torch.cuda.device_count()}: CUDA random streams are not restored")


def precision(cfg, device: torch.device) -> str:
    """``runtime.precision`` as applied on ``device`` (auto: bf16 on CUDA, fp32 elsewhere)."""
    p = cfg.runtime.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def runtime_flags(cfg, device: torch.device) -> dict[str, Any]:
    """The speed settings the trainer runs with on ``device``, as applied: one definition for the
    trainer, evaluation (:func:`hpc.inference.load_model`), ``medattn bench train`` and the GPU check
    (which reports them)."""
    cuda = device.type == "cuda"
    return {"cudnn_benchmark": cuda and cfg.runtime.cudnn_benchmark and not cfg.runtime.deterministic,
            "channels_last": cuda and cfg.runtime.channels_last,
            "precision": precision(cfg, device),
            "compile_mode": cfg.runtime.compile_mode if cfg.runtime.compile else None}


def apply_runtime_flags(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """Set :func:`runtime_flags` on a model already on ``device`` (compile comes later, on the step
    module: :func:`wrap_step`)."""
    flags = runtime_flags(cfg, device)
    if device.type == "cuda":
        # Fixed input shapes: cuDNN times its algorithms once per shape and keeps the fastest.
        torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
        if flags["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
    return model


# Below this many images per GPU, per-GPU batch statistics are noisy enough to change the model
# (CAL and WS-DAN train with 4 per GPU and synchronise; AG-CNN's 1-GPU batch is 64-128).
SMALL_BN_BATCH = 16


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_bn_plan(setting: bool | str, world_size: int, device_type: str, has_bn: bool,
                 per_gpu_batches: dict[str, int]) -> tuple[bool, list[tuple[str, str]]]:
    """Whether to convert the model's batch norm to SyncBatchNorm, and what to tell the user.

    ``setting`` is ``runtime.sync_bn`` (auto | true | false); ``per_gpu_batches``: each stage's
    training images per process (its global batch / world size). Returns (convert, messages),
    a message being (``"info"`` | ``"warning"``, text). Converts only a model with batch norm, in
    a multi-process run, on CUDA (PyTorch's SyncBatchNorm synchronises CUDA tensors only)."""
    msgs: list[tuple[str, str]] = []
    if not has_bn or world_size <= 1:
        return False, msgs  # nothing to synchronise: one process sees the whole global batch
    small = {s: b for s, b in per_gpu_batches.items() if b < SMALL_BN_BATCH}
    each = ", ".join(f"{s} {b}" for s, b in per_gpu_batches.items())
    if setting is False:
        if small:
            msgs.append(("warning", "runtime.sync_bn=false: batch norm normalises over each GPU's own images, "
                                    f"{', '.join(f'{b} per GPU in stage {s}' for s, b in small.items())} "
                                    f"({world_size} processes), not over the global batch: a different model from "
                                    "the 1-GPU run of this config. runtime.sync_bn=auto synchronises it."))
        return False, msgs
    if device_type != "cuda":
        msgs.append(("info", f"runtime.sync_bn={'auto' if setting == 'auto' else 'true'}: batch norm cannot be "
                              f"synchronised on {device_type} (PyTorch's SyncBatchNorm is CUDA-only): each of the "
                              f"{world_size} processes normalises over its own images (per process: {each})"))
        return False, msgs
    msgs.append(("info", f"SyncBatchNorm: batch statistics over the global batch of all {world_size} processes "
                         f"(runtime.sync_bn={'auto' if setting == 'auto' else 'true'}; per process: {each})"))
    return True, msgs


def wrap_step(module: torch.nn.Module, world: World, device: torch.device, compile: bool = False,
              compile_mode: str = "default") -> torch.nn.Module:
    """The training step module as the trainer (and ``medattn bench train``) runs it: DDP when
    distributed, then ``torch.compile`` when asked (``compile_mode``: ``reduce-overhead`` replays
    the step as CUDA graphs, for small per-GPU batches where kernel launches dominate).

    BatchNorm buffers stay rank-local during an epoch (``broadcast_buffers=False``); the trainer
    shares them at epoch ends. torch 2.13 warns that ``broadcast_buffers`` is deprecated, but its
    replacement still syncs buffers at init, so the warning is silenced here on purpose.
    """
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                         broadcast_buffers=False)
    if compile:
        module = torch.compile(module, mode=None if compile_mode == "default" else compile_mode)
    return module
