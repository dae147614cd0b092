"""What a method whose stages may train with focal loss owns, in one mix-in.

A method mixes it in before :class:`~medattn.methods.base.Method` and lists the section:

    class XNetMethod(FocalLoss, Method):
        sections = {"xnet": XNetConfig, "focal": losses.FocalConfig}

and gets the ``focal`` section handed to the loss factory, the sweep alias ``gamma``, and the
answer to which stages a ``focal.*`` key changes (those from the first stage with focal loss on).
The contract (methods/base.py) knows no loss section by name.
"""
from __future__ import annotations

from typing import Any

from medattn.config_schema import Config


class FocalLoss:
    """Mix-in for a method with ``"focal": losses.FocalConfig`` in its ``sections``."""

    @classmethod
    def all_sweep_aliases(cls) -> dict[str, tuple[str, str]]:
        out = super().all_sweep_aliases()  # type: ignore[misc]
        out["gamma"] = ("focal-loss gamma", "focal.gamma (needs a stage with loss: focal)")
        return out

    @classmethod
    def alias_settings(cls, alias: str, value: Any) -> list[tuple[str, Any]]:
        if alias == "gamma":
            return [("focal.gamma", value)]
        return super().alias_settings(alias, value)  # type: ignore[misc]

    @classmethod
    def key_effect(cls, cfg: Config, key: str, loss_stages: list[str] | None = None) -> tuple[list[str], str]:
        """A ``focal.*`` key changes the stages from the first one with focal loss on
        (``loss_stages``: those a sweep uses or may sweep to focal; default: the config's)."""
        if key.split(".")[0] != "focal":
            return super().key_effect(cfg, key, loss_stages)  # type: ignore[misc]
        names = cfg.stage_names()
        fs = loss_stages if loss_stages is not None else [s for s, st in cfg.stages.items() if st.loss == "focal"]
        if not fs:
            return [], (f"no stage of this config uses focal loss, so {key} has no effect (set "
                        "stages.<name>.loss=focal, e.g. stages.local.loss=focal)")
        return names[names.index(fs[0]):], ""

    def loss_settings(self) -> Any:
        """The focal section, for the loss factory (alpha, gamma, per-class alpha)."""
        return self.cfg.focal  # type: ignore[attr-defined]
