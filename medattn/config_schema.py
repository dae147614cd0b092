"""The config's types and their tree: the common sections, :class:`Config`, dotted keys, type
checks. No method and no file here: the methods (which build on these types) sit above this
module, and :mod:`medattn.config` above them loads a config for a method (its sections, YAML,
overrides, validation). Import the public names from :mod:`medattn.config`; the science modules
below the methods (``views``, ``methods.base``) import them from here.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from medattn.errors import ConfigError


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    # none | step (x gamma every step_epochs) | exp (x gamma^((epoch + i/steps) / step_epochs), set per
    # iteration: CAL's schedule) | multistep (x gamma at milestones)
    # | plateau (on the stage's select metric) | cosine | onecycle
    name: str = "step"
    step_epochs: int = 20
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    patience: int = 10
    min_lr: float = 0.0
    warmup_epochs: int = 0
    pct_start: float = 0.3  # onecycle
    div_factor: float = 25.0  # onecycle
    # plateau: the validation metric it watches ("" = the stage's select_metric, e.g. "val/loss": the
    # trained branch's validation loss) and whether lower or higher is better ("" = select_mode).
    monitor: str = ""
    monitor_mode: str = ""  # "" | min | max


@dataclass
class StageConfig:
    epochs: int = 50
    # Global batch: split evenly over the ranks, so a run means the same on 1 or 64 GPUs.
    batch_size: int = 128
    eval_batch_size: int = 0  # 0 = batch_size
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: str = "bce"  # bce | focal | ce | method-specific
    # Model selection: the checkpoint with the best value feeds the next stage and eval.
    select_metric: str = "val/mean_auroc"
    select_mode: str = "max"  # max | min
    early_stop_patience: int = 0  # epochs without improvement; 0 = never stop early
    grad_clip: float = 0.0
    # "" = the previous stage's best checkpoint (or nothing for the first stage); or a path.
    init_from: str = ""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    # imagenet = torchvision's ImageNet file from TORCH_HOME (never downloaded at run time);
    # none = random init; or a path to a .pth file.
    weights: str = "imagenet"
    num_classes: int = 0  # 0 = from the prepared dataset (15 for NIH: 14 diseases + No Finding)
    pool: str = "max"  # max | avg (AG-CNN uses global max pooling)
    drop_rate: float = 0.0


@dataclass
class DataConfig:
    image_size: int = 224  # network input
    resize: int = 256  # resize before the crop (random in training, centre in evaluation)
    train_crop: str = "random"  # random | random_resized | center | none
    random_resized_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    rotate_deg: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    normalize: str = "imagenet"  # imagenet | half | mean (ImageNet mean subtracted, std 1) | none
    loader: str = "auto"  # auto (DALI if installed) | dali | torch
    num_workers: int = 2  # DALI CPU threads / DataLoader workers per rank
    prefetch: int = 2
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_samples: int = 0  # > 0: use only the first N samples of each split (debugging)


@dataclass
class RuntimeConfig:
    # Keys that were renamed: old name -> new name (saved configs and overrides keep working).
    RENAMED: ClassVar[dict[str, str]] = {"eval_every": "val_every"}

    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True  # CUDA only, in training and evaluation alike
    # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest (CUDA only;
    # runtime.deterministic turns it off).
    cudnn_benchmark: bool = True
    compile: bool = False  # torch.compile the training step
    # default | reduce-overhead (CUDA graphs: for small per-GPU batches, where launching ~300-1,000
    # kernels per step costs more than running them) | max-autotune
    compile_mode: str = "default"
    # Batch norm over the global batch: auto = SyncBatchNorm in every multi-process CUDA run of a
    # model with batch norm (so a config means the same on 1 or 64 GPUs), off on one process;
    # true = the same (kept for saved configs); false = each GPU normalises over its own slice
    # (a warning names the per-GPU batch below 16). PyTorch's SyncBatchNorm is CUDA-only: on CPU
    # (gloo) each process normalises over its own slice whatever this says (hpc/distributed.py).
    sync_bn: bool | str = "auto"
    # Steps between reads of the running means from the device: the log line, the non-finite
    # check and the agreement on a stop signal (the training step itself never waits).
    log_every: int = 20
    progress: str = "auto"  # auto | bar | log | none
    ckpt_every_steps: int = 0  # extra mid-epoch checkpoints; 0 = epoch ends (and signals) only
    val_every: int = 1  # epochs between validations (the last epoch of a stage always validates)
    # Write epoch-end checkpoints from a background thread (a copy of the state on the host) while
    # training goes on; a stop still waits for its checkpoint.
    async_checkpoints: bool = True
    tensorboard: bool = True
    deterministic: bool = False
    dist_timeout_s: int = 1800


@dataclass
class Config:
    """A whole run: the common sections, and the sections of the method in use (``sections``),
    which that method owns (``Method.sections``: e.g. AG-CNN's ``agcnn`` and ``focal``). A config
    holds, saves and accepts only its own method's sections: ``cfg.agcnn`` exists when
    ``cfg.method == "agcnn"``."""

    name: str = ""
    method: str = "agcnn"  # a registered method: medattn.methods.method_names()
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Ordered: the method trains its stages in this order.
    stages: dict[str, StageConfig] = field(default_factory=dict)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # The method's own sections, by name (built from its Method.sections by load_config).
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: the method's sections read like fields.
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        if name.startswith("__") or sections is None:
            raise AttributeError(name)
        raise AttributeError(f"the config of method {self.__dict__.get('method')!r} has no section {name!r} "
                             f"(its sections: {', '.join(sections) or 'none'})")

    def stage_names(self) -> list[str]:
        return list(self.stages)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        out.update({k: _to_plain(v) for k, v in self.sections.items()})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


_COMMON = ("name", "method", "seed", "model", "data", "stages", "runtime")


# Which methods own a section of a given name, for the message on a section that the config's
# method does not use ("it belongs to agcnn"). Only medattn.config, above the methods, can know
# that; it installs the lookup when imported (every Config with method sections comes from it).
_section_owners: Callable[[str], list[str]] = lambda section: []


def set_section_owners(lookup: Callable[[str], list[str]]) -> None:
    """Install the section -> owning methods lookup (:mod:`medattn.config` does, on import)."""
    global _section_owners
    _section_owners = lookup


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set one dotted key (``stages.*.epochs`` fans out over all stages), with type checks."""
    parts = dotted.split(".")
    _set_path(cfg, parts, value, prefix="")


def get_key(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    walked = []
    for part in dotted.split("."):
        walked.append(part)
        if isinstance(obj, Config) and part not in _COMMON:
            if part not in obj.sections:
                raise ConfigError(_unknown_config_key(obj, ".".join(walked), part))
            obj = obj.sections[part]
        elif isinstance(obj, dict):
            if part not in obj:
                raise ConfigError(f"unknown config key {'.'.join(walked)!r}")
            obj = obj[part]
        elif dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise ConfigError(_unknown_key_message(".".join(walked), part, names))
            obj = getattr(obj, part)
        else:
            raise ConfigError(f"config key {'.'.join(walked)!r}: {'.'.join(walked[:-1])} is not a section")
    return obj


def _unknown_config_key(cfg: Config, full: str, head: str) -> str:
    """The message for a top-level key that is neither a common section nor one of the method's."""
    owners = _section_owners(head)
    if owners:
        return (f"config section {head!r} is not used by method {cfg.method!r} (it belongs to "
                f"{', '.join(owners)}; {cfg.method} has {', '.join(cfg.sections) or 'no sections of its own'})")
    return _unknown_key_message(full, head, [*_COMMON, *cfg.sections])


def _set_path(obj: Any, parts: list[str], value: Any, prefix: str) -> None:
    head, rest = parts[0], parts[1:]
    full = f"{prefix}.{head}" if prefix else head
    if isinstance(obj, Config) and head not in _COMMON:
        if head not in obj.sections:
            raise ConfigError(_unknown_config_key(obj, full, head))
        if not rest:
            raise ConfigError(f"config key {full!r} is a section: set its keys ({full}.<key>=value)")
        _set_path(obj.sections[head], rest, value, full)
        return
    if isinstance(obj, dict):
        keys = list(obj) if head == "*" else [head]
        if head != "*" and head not in obj:
            raise ConfigError(f"unknown config key {full!r}: no such entry"
                              + (f" (have: {', '.join(obj)})" if obj else ""))
        for k in keys:
            if rest:
                _set_path(obj[k], rest, value, f"{prefix}.{k}" if prefix else k)
            else:
                obj[k] = value
        return
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"config key {full!r}: {prefix!r} is a value, not a section")
    head = getattr(type(obj), "RENAMED", {}).get(head, head)
    full = f"{prefix}.{head}" if prefix else head
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if head not in fields:
        raise ConfigError(_unknown_key_message(full, head, list(fields)))
    hints = typing.get_type_hints(type(obj))
    ftype = hints[head]
    if rest:
        child = getattr(obj, head)
        if dataclasses.is_dataclass(child) or isinstance(child, dict):
            if isinstance(child, dict) and rest[0] not in child and rest[0] != "*":
                # New dict entry (e.g. a stage that only the override names).
                vtype = typing.get_args(ftype)[1]
                child[rest[0]] = _default_for(vtype)
            _set_path(child, rest, value, full)
            return
        raise ConfigError(f"config key {'.'.join([full] + rest)!r}: {full!r} is a value, not a section")
    setattr(obj, head, _coerce(value, ftype, full))


def _default_for(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return tp()
    return None


def _unknown_key_message(full: str, head: str, valid: list[str]) -> str:
    hint = difflib.get_close_matches(head, valid, n=1)
    msg = f"unknown config key {full!r}"
    if hint:
        msg += f" (did you mean {full.rsplit('.', 1)[0] + '.' if '.' in full else ''}{hint[0]}?)"
    return msg + f"; valid keys here: {', '.join(valid)}"


def _apply_mapping(obj: Any, mapping: dict, where: str, prefix: str = "") -> Any:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {type(mapping).__name__}")
    for k, v in mapping.items():
        k = getattr(type(obj), "RENAMED", {}).get(k, k)
        full = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(obj, Config) and k not in _COMMON:
            if k not in obj.sections:
                raise ConfigError(f"{where}: " + _unknown_config_key(obj, full, str(k)))
            _apply_mapping(obj.sections[k], v if v is not None else {}, where, full)
            continue
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if k not in fields:
            raise ConfigError(f"{where}: " + _unknown_key_message(full, str(k), list(fields)))
        ftype = typing.get_type_hints(type(obj))[k]
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            _apply_mapping(cur, v, where, full)
        elif _is_dict_of_dataclass(ftype) and isinstance(v, dict):
            vtype = typing.get_args(ftype)[1]
            new = {}
            for name, sub in v.items():
                # Merge onto an existing entry (inherit) or a fresh default.
                base = cur.get(name) if isinstance(cur, dict) and name in cur else vtype()
                if sub is None:
                    sub = {}
                new[name] = _apply_mapping(base, sub, where, f"{full}.{name}")
            setattr(obj, k, new)
        else:
            setattr(obj, k, _coerce(v, ftype, f"{where}: {full}" if where else full))
    return obj


def _is_dict_of_dataclass(tp: Any) -> bool:
    return typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1])


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: {value!r} fits none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r}: expected null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _apply_mapping(tp(), value, "", key)
        raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], key) for v in value)
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {tp}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Config):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def check_choices(cfg: Config, choices: dict[str, tuple]) -> None:
    """Each dotted key of ``choices`` holds one of its allowed values."""
    for key, allowed in choices.items():
        v = get_key(cfg, key)
        if v not in allowed:
            raise ConfigError(f"config key {key!r}: {v!r} is not one of {', '.join(map(str, allowed))}")
