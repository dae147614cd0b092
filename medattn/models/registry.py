"""The backbone registry: ``@register_model(name)`` on a builder puts it here. A leaf: it imports no
builder, so any module (the built-in backbones, a test's toy model) registers into it;
:mod:`medattn.models.factory` builds (``create_model``), checks names and loads weights.

A builder takes keyword arguments ``num_classes, in_chans, pool, drop_rate`` plus its own
options (``layer4_stride`` for ResNets) and returns a :class:`ClassifierModel` with random
weights (:mod:`medattn.models.factory` has the example).
"""
from __future__ import annotations

from collections.abc import Callable

from medattn.models.base import ClassifierModel

Builder = Callable[..., ClassifierModel]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn`` as the builder of model ``name`` (names are unique).

    The builder takes keyword-only ``num_classes, in_chans, pool, drop_rate`` and declares any
    options of its own explicitly (no ``**kwargs``), so :func:`create_model` can check them.
    """

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def registered() -> dict[str, Builder]:
    """The builders registered so far, by name (the built-in ones once
    :mod:`medattn.models.factory` is imported)."""
    return dict(_REGISTRY)
