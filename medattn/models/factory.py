"""Building models by name: :func:`create_model`, :func:`check_backbone`, :func:`list_models`.

The names are the registry's (:mod:`medattn.models.registry`: the built-in backbones below, and
whatever else registers) and any timm model name (:mod:`medattn.models.timm_backbones`). The
built-in backbones register when this module imports them; a new backbone module is one more
import here.

Example:
    >>> import torch
    >>> from medattn.models import create_model
    >>> m = create_model("resnet18", num_classes=15, in_chans=1, weights="none")
    >>> m(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 15])
"""
from __future__ import annotations

import difflib
import functools
import inspect
from pathlib import Path

from medattn.errors import ConfigError
from medattn.models import backbones, lka  # noqa: F401  (the built-in backbones register on import)
from medattn.models.base import ClassifierModel
from medattn.models.registry import registered
from medattn.models.timm_backbones import build_timm, is_timm_model, load_timm_weights, timm_arch
from medattn.models.weights import load_weights


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(registered())


def is_model(name: str) -> bool:
    """A registered name, or a timm model name when timm is installed (``timm/NAME`` included)."""
    return name in registered() or is_timm_model(name)


def check_backbone(name: str, key: str = "model.backbone") -> None:
    """Raise the error :func:`create_model` gives for an unknown name, without building anything
    (every config load checks its backbone names this way, so ``medattn configs`` refuses what
    ``train`` refuses)."""
    builtin = registered()
    if name in builtin:
        return
    try:
        import timm  # noqa: PLC0415 (optional)
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(timm_arch(name)):
        return
    hint = difflib.get_close_matches(timm_arch(name), list(builtin) + (timm.list_models() if timm else []), n=1)
    raise ConfigError(f"{key}={name!r} is not a known model" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                      + f"; built-in: {', '.join(sorted(builtin))}"
                      + ("; or any timm model name (timm.list_models())" if timm else
                         "; timm models need the timm package, not installed here: pip install 'medattn[timm]'"))


def create_model(name: str, *, num_classes: int, in_chans: int = 1, weights: str | Path = "none",
                 pool: str = "max", drop_rate: float = 0.0, **kw) -> ClassifierModel:
    """Build a registered model and load its weights.

    Args:
        name: a registered name (:func:`list_models`), e.g. ``resnet50``, or any timm model name
            (``convnext_tiny``, ``pvt_v2_b2``, ``timm/resnet50``; :mod:`medattn.models.timm_backbones`).
        num_classes: head outputs (0 = no head: forward returns the pooled features).
        in_chans: 1 for the one-channel X-ray, 3 for RGB.
        weights: ``none`` (random init), ``imagenet`` / ``imagenet_v2`` (torchvision's ImageNet
            file from the local cache, see :mod:`medattn.models.weights`), or a path to a
            state dict / medattn checkpoint.
        pool: ``max`` (AG-CNN's Pool5) or ``avg`` global pooling.
        drop_rate: dropout before the Linear head.
        **kw: builder options, e.g. ``layer4_stride=1`` for the ResNets.

    Raises:
        ConfigError: unknown name or option, or weights that cannot be found or loaded.
    """
    check_backbone(name)
    builtin = registered()
    if name in builtin:
        builder = builtin[name]
    else:  # a timm model (medattn.models.timm_backbones)
        builder = functools.partial(build_timm, name)
    # Builders declare their options explicitly, so a misspelt or foreign option is named here
    # instead of surfacing as a TypeError from deep inside torchvision.
    params = inspect.signature(builder).parameters
    bad = [k for k in kw if k not in params]
    if bad:
        own = [k for k in params if k not in ("num_classes", "in_chans", "pool", "drop_rate")]
        raise ConfigError(f"model {name!r} has no option {bad[0]!r}"
                          + (f" (its options: {', '.join(own)})" if own else " (it takes no options)"))
    if in_chans < 1:
        raise ConfigError(f"in_chans={in_chans} must be >= 1")
    model = builder(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate, **kw)
    model.arch = name
    w = str(weights)
    if w != "none" and name not in builtin:
        load_timm_weights(model, w)
    elif w != "none":
        load_weights(model, w)
    return model

