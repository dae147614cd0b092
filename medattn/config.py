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

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from medattn import config_schema
from medattn.config_schema import (_COMMON, Config, DataConfig, ModelConfig, OptimizerConfig,  # noqa: F401
                                   RuntimeConfig, SchedulerConfig, StageConfig, _apply_mapping, _coerce,
                                   check_choices, get_key, set_key)
from medattn.errors import ConfigError

# The config's types live in medattn.config_schema (below the methods); this module is where users,
# hpc, jobs and sweeps import them from.
__all__ = ["CONFIG_DIR", "Config", "DataConfig", "ModelConfig", "OptimizerConfig", "RuntimeConfig", "SchedulerConfig",
           "StageConfig", "check_choices", "get_key", "list_configs", "load_config", "load_saved_config",
           "method_sections", "parse_override", "resolve_config_path", "save_config", "set_key", "validate"]

CONFIG_DIR = Path(__file__).with_name("configs")


def method_sections(method: str) -> dict[str, type]:
    """The config sections method ``method`` owns, by name (its ``Method.sections``)."""
    from medattn.methods import method_class  # lazily: importing a config must not load torch

    return dict(method_class(method).sections)


def _section_owners(section: str) -> list[str]:
    """Methods that own a section of this name (for error messages)."""
    from medattn.methods import method_class, method_names

    return [m for m in method_names() if section in method_class(m).sections]


config_schema.set_section_owners(_section_owners)


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
    from medattn.models.factory import check_backbone

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
