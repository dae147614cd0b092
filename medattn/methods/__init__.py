"""Training methods (one per paper) behind one contract (medattn.methods.base.Method)."""
from __future__ import annotations

import difflib
import importlib

from medattn.config import Config
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


def method_class(name: str) -> type[Method]:
    """The Method class registered as ``name`` (imported on first use)."""
    target = METHODS.get(name)
    if target is None:
        hint = difflib.get_close_matches(name, list(METHODS), n=1)
        raise ConfigError(f"config key 'method': unknown method {name!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; available: {', '.join(METHODS)}")
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
