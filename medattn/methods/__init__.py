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


def list_methods() -> list[str]:
    return list(METHODS)


def create_method(cfg: Config, spec: DataSpec) -> Method:
    target = METHODS.get(cfg.method)
    if target is None:
        hint = difflib.get_close_matches(cfg.method, list(METHODS), n=1)
        raise ConfigError(f"config key 'method': unknown method {cfg.method!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; available: {', '.join(METHODS)}")
    mod, cls = target.split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            raise ConfigError(f"method {cfg.method!r} is not available in this installation") from None
        raise
    return getattr(module, cls)(cfg, spec)
