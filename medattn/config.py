"""Typed configuration: dataclass defaults -> YAML file (with ``inherit:``) -> ``key=value`` overrides.

One ``Config`` describes a whole run: the method, the model, the data pipeline, the training
stages (AG-CNN has three, G -> L -> F), the runtime and each method's own section. Shipped
configs live in ``medattn/configs/*.yaml``; ``medattn configs`` lists them.

Rules (checked here so every entry point behaves the same):
* unknown keys are errors that name the full dotted key and suggest the closest valid one;
* values are type-checked and converted (``"1e-3"`` -> float, ``3`` -> ``3.0``);
* ``stages.*.epochs=2`` applies to every stage;
* each method owns its sections (``Method.sections``); a config carries only those of its method;
* the resolved config is saved in the run directory and can be loaded back.

Example:
    >>> cfg = load_config("demo", ["stages.*.epochs=1", "agcnn.tau=0.6"])
    >>> cfg.agcnn.tau
    0.6
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from medattn.errors import ConfigError

CONFIG_DIR = Path(__file__).with_name("configs")


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
    method: str = "agcnn"  # agcnn | dualattendmed | gradcam_loss | vgg_lka | classifier | lungseg
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


def method_sections(method: str) -> dict[str, type]:
    """The config sections method ``method`` owns, by name (its ``Method.sections``)."""
    from medattn.methods import method_class  # lazily: the methods import this module

    return dict(method_class(method).sections)


def _section_owners(section: str) -> list[str]:
    """Methods that own a section of this name (for error messages)."""
    from medattn.methods import METHODS, method_class

    return [m for m in METHODS if section in method_class(m).sections]


def _new_sections(method: str) -> dict[str, Any]:
    return {name: cls() for name, cls in method_sections(method).items()}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def list_configs() -> dict[str, str]:
    """Shipped config names -> their one-line description (the file's first comment line)."""
    out = {}
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.stat().st_size else ""
        out[p.stem] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped config name (``demo``) or a path to a YAML file."""
    s = str(name_or_path)
    p = Path(s)
    if p.suffix in (".yaml", ".yml") or os.sep in s:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    shipped = CONFIG_DIR / f"{s}.yaml"
    if shipped.is_file():
        return shipped
    if p.is_file():
        return p
    names = list(list_configs())
    hint = difflib.get_close_matches(s, names, n=1)
    raise ConfigError(f"unknown config {s!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                      + f"; shipped configs: {', '.join(names)}")


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving ``inherit: other`` (a shipped name or a relative path)."""
    if path in seen:
        raise ConfigError(f"{path}: inherit cycle through {', '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    ppath = Path(parent)
    if not ppath.is_absolute() and (path.parent / ppath).is_file():
        ppath = path.parent / ppath
    else:
        ppath = resolve_config_path(parent)
    base = _read_yaml_chain(ppath, seen + (path,))
    return _deep_merge(base, data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(name_or_path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                *, data: dict | None = None) -> Config:
    """Build a Config from defaults, a shipped name or YAML path, and ``key=value`` overrides.

    Args:
        name_or_path: ``"demo"``, ``"agcnn_resnet50"``, or a path to a YAML file; None = defaults.
        overrides: ``["stages.global.epochs=2", "agcnn.tau=0.6"]``; values are parsed as YAML.
        data: an already-parsed mapping applied before the overrides (used when resuming a run
            from its saved config).
    """
    cfg = Config()
    mappings: list[tuple[dict, str]] = []
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        mappings.append((_read_yaml_chain(path), str(path)))
        cfg.name = path.stem
    if data is not None:
        mappings.append((data, "config mapping"))
    parsed = [parse_override(ov) for ov in overrides or []]
    # The method decides which sections exist, so find it first: the last word on it wins.
    for mapping, where in mappings:
        if not isinstance(mapping, dict):
            raise ConfigError(f"{where}: a config must be a mapping at the top level")
        if "method" in mapping:
            cfg.method = _coerce(mapping["method"], str, f"{where}: method")
    for key, value in parsed:
        if key == "method":
            cfg.method = _coerce(value, str, "method")
    cfg.sections = _new_sections(cfg.method)
    if data is not None:
        # Configs saved before methods owned their sections carry every method's section, at its
        # defaults: the other methods' ones are dropped, so old runs load and resume.
        mappings[-1] = ({k: v for k, v in data.items()
                         if k in _COMMON or k in cfg.sections or not _section_owners(k)}, "config mapping")
    for mapping, where in mappings:
        cfg = _apply_mapping(cfg, mapping, where)
    for key, value in parsed:
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1e-3"`` -> ``("a.b", 0.001)``; the value is parsed as YAML (so lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. stages.global.epochs=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


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


# --------------------------------------------------------------------------------------------
# Validation of values (choices); the method checks its own stage names.
# --------------------------------------------------------------------------------------------
_CHOICES = {
    "runtime.device": ("auto", "cpu", "cuda"),
    "runtime.precision": ("auto", "bf16", "fp16", "fp32"),
    "runtime.progress": ("auto", "bar", "log", "none"),
    "data.train_crop": ("random", "random_resized", "center", "none"),
    "data.normalize": ("imagenet", "half", "mean", "none"),
    "data.loader": ("auto", "dali", "torch"),
    "model.pool": ("max", "avg"),
    "runtime.compile_mode": ("default", "reduce-overhead", "max-autotune"),
}
_STAGE_CHOICES = {
    "optimizer.name": ("sgd", "adam", "adamw"),
    "scheduler.name": ("none", "step", "exp", "multistep", "plateau", "cosine", "onecycle"),
    "select_mode": ("max", "min"),
    "scheduler.monitor_mode": ("", "min", "max"),
}


def check_choices(cfg: Config, choices: dict[str, tuple]) -> None:
    """Each dotted key of ``choices`` holds one of its allowed values."""
    for key, allowed in choices.items():
        v = get_key(cfg, key)
        if v not in allowed:
            raise ConfigError(f"config key {key!r}: {v!r} is not one of {', '.join(map(str, allowed))}")


def validate(cfg: Config) -> None:
    """The common sections here; the method's sections by the method (``Method.check_config``)."""
    from medattn.methods import method_class

    check_choices(cfg, _CHOICES)
    if cfg.runtime.sync_bn not in (True, False, "auto"):
        raise ConfigError(f"config key 'runtime.sync_bn': {cfg.runtime.sync_bn!r} is not one of auto, true, false")
    if not cfg.stages:
        raise ConfigError("the config defines no stages (add a 'stages:' mapping)")
    for name, st in cfg.stages.items():
        for key, choices in _STAGE_CHOICES.items():
            v = get_key(st, key)  # type: ignore[arg-type]
            if v not in choices:
                raise ConfigError(f"config key 'stages.{name}.{key}': {v!r} is not one of {', '.join(choices)}")
        if st.epochs < 1:
            raise ConfigError(f"config key 'stages.{name}.epochs' must be >= 1, got {st.epochs}")
        if st.batch_size < 1:
            raise ConfigError(f"config key 'stages.{name}.batch_size' must be >= 1, got {st.batch_size}")
    if cfg.data.image_size < 16 or cfg.data.resize < cfg.data.image_size:
        raise ConfigError(f"config keys data.image_size/data.resize: need 16 <= image_size <= resize, "
                          f"got {cfg.data.image_size}/{cfg.data.resize}")
    # The backbone name is checked here, without building the model, so that every entry point
    # that loads a config (train, configs, submit, sweep) refuses an unknown one the same way.
    from medattn.models.registry import check_backbone

    check_backbone(cfg.model.backbone)
    method_class(cfg.method).check_config(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (medattn.fileio: file and folder fsync'd)."""
    from medattn.fileio import write_text

    write_text(path, cfg.to_yaml())


def load_saved_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Load a run's saved, resolved config (no inherit chain), then apply overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the saved config: {e}") from None
    return load_config(None, overrides, data=data)
