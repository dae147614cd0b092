"""Training methods (one per paper) behind one contract (medattn.methods.base.Method).

The registry: ``METHODS`` names the built-in methods (``name -> "module:Class"``, imported on
first use, so a method's extra dependencies load only when it is used); :func:`register_method`
adds one from anywhere else (a plugin, a test's toy method). :mod:`medattn.config` reads the
methods from here to build a config's sections; nothing below it imports this package's methods.
"""
from __future__ import annotations

import difflib
import importlib

from medattn.config_schema import Config
from medattn.errors import ConfigError
from medattn.methods.base import DataSpec, Method, StageStep  # noqa: F401

# name -> "module:Class"; imported lazily so a method's extra dependencies load only when used.
METHODS: dict[str, str] = {
    "agcnn": "medattn.methods.agcnn:AGCNNMethod",
    "classifier": "medattn.methods.classifier:ClassifierMethod",
    "dualattendmed": "medattn.methods.dualattendmed:DualAttendMedMethod",
    "gradcam_loss": "medattn.methods.gradcam_loss:GradCAMLossMethod",
    "lungseg": "medattn.methods.lungseg:LungSegMethod",
    "vgg_lka": "medattn.methods.vgg_lka:VGGLKAMethod",
}
# Methods registered at run time as classes (register_method with a class).
_REGISTERED: dict[str, type[Method]] = {}


def register_method(cls: type[Method] | None = None, *, target: str | None = None, name: str | None = None):
    """Register a method that is not built in: ``@register_method`` on a :class:`Method` subclass
    (registered under its ``name``), or ``register_method(target="pkg.mod:Class", name="x")``,
    imported on first use. A string target is what other processes (DDP ranks, a resumed run)
    can import again; a class is registered in this process only (the module that defines it
    must be imported before the config is loaded). Names are unique.
    """
    def add(c: type[Method]) -> type[Method]:
        if not (isinstance(c, type) and issubclass(c, Method)) or not c.name:
            raise TypeError(f"{c!r}: a method is a Method subclass with a name")
        _claim(c.name)
        _REGISTERED[c.name] = c
        return c

    if target is not None:
        if not name or ":" not in target:
            raise TypeError("register_method(target='pkg.module:Class', name='x')")
        _claim(name)
        METHODS[name] = target
        return None
    return add(cls) if cls is not None else add


def _claim(name: str) -> None:
    if name in METHODS or name in _REGISTERED:
        raise ValueError(f"method {name!r} is already registered")


def method_names() -> list[str]:
    """Every registered method name (built-in ones first, in ``METHODS`` order)."""
    return [*METHODS, *_REGISTERED]


def method_class(name: str) -> type[Method]:
    """The Method class registered as ``name`` (imported on first use)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = METHODS.get(name)
    if target is None:
        hint = difflib.get_close_matches(name, method_names(), n=1)
        raise ConfigError(f"config key 'method': unknown method {name!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; available: {', '.join(method_names())}")
    mod, cls = target.split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            raise ConfigError(f"method {name!r} is not available in this installation") from None
        raise
    return getattr(module, cls)


def create_method(cfg: Config, spec: DataSpec) -> Method:
    return method_class(cfg.method)(cfg, spec)


def build(cfg: Config, spec: DataSpec):
    """(method, model): the one way from a config and a data spec to a model, for training,
    evaluation, inference and benchmarks alike (weights: random or ``model.weights``)."""
    method = create_method(cfg, spec)
    return method, method.build_model()
