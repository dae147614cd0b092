"""Segmentation-driven Grad-CAM attention loss (seed 002; methods.md section 002).

Per sample i with a target region R_i (from its class and its lung box):

    r_i = |{p in R_i : CAM_i(p) > thresh}| / |R_i|
    L_i = lam * CE_i + (1 - lam) * (1 - r_i)          (1 - r_i := 0 when the class has no region)

and the batch loss is the mean over i. lam is fixed (``gradcam_loss.lam``; lam = 1 is the CE
baseline) or adaptive, lam_e = max(0.2, 1 - 0.023 e) for the 0-based epoch e.

Variants (``gradcam_loss.variant``):

* ``published``: the released code's behaviour. The map is computed in evaluation mode on the
  current weights (pytorch-grad-cam switches its model copy to eval), turned into a constant,
  and r is a hard count. The attention term therefore carries no gradient: the parameter
  gradient is exactly lam * grad(CE) (tested in tests/test_gradcam_loss.py).
* ``differentiable`` (medattn's own): the map is built with ``create_graph=True`` (a double
  backward) and r is the soft count mean_{p in R} sigmoid((CAM(p) - thresh) / T); the term moves
  the network's attention. ``gradcam_loss.cam_mode=eval`` (default) differentiates the map of
  the network in evaluation mode, the map that is scored at test time (one extra forward; two
  forward graphs are alive until the backward); ``train`` uses the training forward itself
  (cheaper, but training-mode BatchNorm couples the samples of the batch).

Grad-CAM is batched on the device (medattn.gradcam): no model copy, no per-sample loop, no
per-batch segmentation — the lung boxes were computed once by ``medattn prepare``.

The target class of the map is the label (``gradcam_loss.target=label``, the correction) or
the predicted class (``predicted``, as published). The region is always chosen by the label.
Multi-label data: each positive label that has a region contributes its own map and ratio,
averaged per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import contextlib
from typing import Any

import torch

from medattn import losses
from medattn.errors import ConfigError
from medattn.gradcam import (REGION_CODE, REGIONS, cam_from_activations, capture, find_layer, lung_box_in_view,
                             region_masks, region_ratio)
from medattn.methods.classifier import ClassifierMethod


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Evaluation mode for the block, then every module's own mode back (frozen parts stay frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class GradCAMLossConfig:
    """Segmentation-driven Grad-CAM attention loss (seed 002), methods.md section 002."""

    variant: str = "differentiable"  # published (r is a constant) | differentiable (soft r)
    lam: float = 0.5  # L = lam * CE + (1 - lam) * (1 - r)
    adaptive: bool = False  # lam_e = max(floor, 1 - rate * e)
    adaptive_floor: float = 0.2
    adaptive_rate: float = 0.023
    thresh: float = 0.3
    layer: str = ""  # "" = the backbone's default Grad-CAM layer
    target: str = "label"  # label | predicted (the published code scores the predicted class)
    soft_temperature: float = 0.05
    # class name -> region of the lung box: lower | upper | outside | lung | none
    regions: dict[str, str] = field(default_factory=lambda: {
        "Effusion": "lower", "Pneumothorax": "upper", "Subcutaneous_Emphysema": "outside"})
    eval_ratio: bool = True  # also compute r (hard) on validation/eval images: val/<branch>/r
    # The network state the map is computed in: eval (as pytorch-grad-cam, which switches the
    # model to eval mode; one extra forward) or train (the training forward itself; cheaper,
    # but BatchNorm batch statistics couple the samples and differ from test time).
    cam_mode: str = "eval"


class GradCAMLossMethod(ClassifierMethod):
    name = "gradcam_loss"
    sections = {"gradcam_loss": GradCAMLossConfig, "focal": losses.FocalConfig}
    choices = {"gradcam_loss.variant": ("published", "differentiable"),
               "gradcam_loss.target": ("label", "predicted"), "gradcam_loss.cam_mode": ("eval", "train")}
    sweep_aliases = {"lam": ("Grad-CAM attention-loss weight lam",
                             "the Grad-CAM attention-loss weight (gradcam_loss.lam; 'adaptive' = "
                             "gradcam_loss.adaptive=true)")}

    @classmethod
    def alias_settings(cls, alias, value):
        if alias == "lam":
            if isinstance(value, str) and value.lower() == "adaptive":
                return [("gradcam_loss.adaptive", True)]
            return [("gradcam_loss.lam", value), ("gradcam_loss.adaptive", False)]
        return super().alias_settings(alias, value)

    # ------------------------------------------------------------------ config
    def validate(self) -> None:
        super().validate()
        g = self.cfg.gradcam_loss
        if not 0.0 <= g.lam <= 1.0:
            raise ConfigError(f"config key 'gradcam_loss.lam' must be in [0, 1], got {g.lam}")
        if not 0.0 < g.thresh < 1.0:
            raise ConfigError(f"config key 'gradcam_loss.thresh' must be in (0, 1), got {g.thresh}")
        if g.soft_temperature <= 0:
            raise ConfigError(f"config key 'gradcam_loss.soft_temperature' must be > 0, got {g.soft_temperature}")
        if not 0.0 <= g.adaptive_floor <= 1.0 or g.adaptive_rate < 0:
            raise ConfigError("config keys 'gradcam_loss.adaptive_floor' (in [0, 1]) and "
                              "'gradcam_loss.adaptive_rate' (>= 0) are out of range")
        bad = {k: v for k, v in g.regions.items() if v not in REGIONS}
        if bad:
            k = next(iter(bad))
            raise ConfigError(f"config key 'gradcam_loss.regions.{k}': {bad[k]!r} is not one of {', '.join(REGIONS)}")
        if self.spec.task != "singlelabel" and g.target == "predicted":
            raise ConfigError("gradcam_loss.target=predicted needs a single-label task (one predicted class per "
                              "image); on multi-label data each positive label's own map is scored (target=label)")
        if self.num_classes != self.spec.num_classes:
            raise ConfigError(f"model.num_classes={self.cfg.model.num_classes}: gradcam_loss predicts all "
                              f"{self.spec.num_classes} classes of the dataset (leave it at 0)")
        if self.cfg.data.rotate_deg > 0:
            raise ConfigError("gradcam_loss: data.rotate_deg must be 0 (the lung box is moved with the crop and "
                              "flip of the view, not rotated)")
        self.codes = torch.tensor([REGION_CODE[g.regions.get(n, "none")] for n in self.spec.label_names])
        # The classes with a region, decided once here (a Python list: reading it per step from a
        # tensor would make the host wait for the device).
        self.region_classes = [k for k, c in enumerate(self.codes.tolist()) if c > 0]
        if not bool((self.codes > 0).any()) and (g.lam < 1.0 or g.adaptive):
            names = ", ".join(self.spec.label_names)
            raise ConfigError(f"gradcam_loss.regions: none of the dataset's classes ({names}) "
                              "has a region, so the attention term would always be 0; map a class to "
                              "lower|upper|outside|lung (e.g. gradcam_loss.regions.Effusion=lower) or set lam=1")
        self.current_lam = self.lam(0)

    def loss_kind(self, stage: str) -> str:
        """Cross-entropy for single-label tasks (the published loss); on multi-label data BCE, or
        focal with ``stages.<stage>.loss: focal`` (a ``ce`` of the single-label configs means BCE)."""
        if self.spec.task == "singlelabel":
            return "ce"
        return "focal" if self.cfg.stages[stage].loss == "focal" else "bce"

    def loss_fn(self, logits, batch, stage):
        """The classification term (:meth:`loss_kind`)."""
        return self.loss(stage)(logits, labels=batch["labels"], target=batch["target"])

    def lam(self, epoch: int) -> float:
        """lam for a 0-based epoch: fixed, or max(floor, 1 - rate * epoch) when adaptive."""
        g = self.cfg.gradcam_loss
        return max(g.adaptive_floor, 1.0 - g.adaptive_rate * epoch) if g.adaptive else g.lam

    def start_epoch_hook(self, model, stage, epoch) -> None:
        self.current_lam = self.lam(epoch)

    # ------------------------------------------------------------------ regions
    def _pairs(self, batch: dict[str, torch.Tensor], logits: torch.Tensor | None, for_loss: bool
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(region codes (B,), map target class (B,))]: one pair for single-label data, one per
        class with a region for multi-label data."""
        codes = self._codes_on(batch["image"].device)
        if self.spec.task == "singlelabel":
            t = batch["target"]
            known = t >= 0
            region = torch.where(known, codes[t.clamp_min(0)], torch.zeros_like(t))
            predicted = logits.argmax(1).detach()
            # target=label scores each image's label (an image without one: its prediction; it has no
            # region, so it adds nothing); target=predicted, as published, the prediction.
            tgt = torch.where(known, t, predicted) if self.cfg.gradcam_loss.target == "label" else predicted
            return [(region, tgt)]
        labels = batch["labels"]
        pairs = []
        # Every class with a region, also one without a positive in this batch: its pair has no
        # region anywhere, adds exactly 0 to the loss and its gradient, and deciding to skip it
        # would make the host wait for the device on every step.
        for k in self.region_classes:
            region = torch.where(labels[:, k] > 0.5, codes[k], torch.zeros_like(codes[k]))
            pairs.append((region.long(), torch.full_like(region.long(), k)))
        return pairs

    def _codes_on(self, device: torch.device) -> torch.Tensor:
        """The region code of each class, on ``device`` (copied there once)."""
        cache = self.__dict__.setdefault("_codes_cache", {})
        if str(device) not in cache:
            cache[str(device)] = self.codes.to(device)
        return cache[str(device)]

    def _boxes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "lung_box" not in batch:
            raise ConfigError("gradcam_loss needs lung boxes, and the prepared data has none: prepare it with "
                              "`medattn prepare ... --masks DIR` (lung masks) or `--lung-model RUN` (a trained "
                              "lungseg model), or set gradcam_loss.lam=1 for the cross-entropy baseline")
        return lung_box_in_view(batch["lung_box"], batch.get("window"), batch.get("flip"))

    @staticmethod
    def _per_image(ratios: list[tuple[torch.Tensor, torch.Tensor]], n: int, device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of (1 - r) over each image's regions, and how many regions it has."""
        att = torch.zeros(n, device=device)
        cnt = torch.zeros(n, device=device)
        for r, has in ratios:
            att = att + has * (1.0 - r)
            cnt = cnt + has
        return att / cnt.clamp_min(1.0), cnt

    # ------------------------------------------------------------------ training
    def training_loss(self, model, batch, stage, epoch):
        g = self.cfg.gradcam_loss
        lam = self.lam(epoch)
        x = batch["image"]
        if lam >= 1.0:  # the cross-entropy baseline: no map needed
            logits = model(x)
            ce = self.loss_fn(logits, batch, stage)
            return ce, {"loss": ce.detach(), "ce": ce.detach(), "lam": torch.full((), lam, device=x.device)}
        boxes = self._boxes(batch)
        h, w = x.shape[-2:]
        layer = find_layer(model, g.layer)
        ratios: list[tuple[torch.Tensor, torch.Tensor]] = []
        if g.variant == "differentiable" and g.cam_mode == "train":
            with capture(layer) as store:  # one forward: the map of the training pass itself
                logits = model(x)
            ratios = self._ratios(batch, boxes, logits, store["A"], differentiable=True)
        else:
            # The training forward first: it updates the BatchNorm running statistics in place,
            # which the evaluation-mode graph below must not see change before its backward.
            logits = model(x)
            # The map of the network in evaluation mode (as pytorch-grad-cam computes it), on the
            # current weights; constant (published) or differentiable through the weights.
            with _eval_mode(model), torch.enable_grad():
                with capture(layer) as store:
                    logits_e = model(x)
                ratios = self._ratios(batch, boxes, logits_e, store["A"], differentiable=g.variant == "differentiable")
        ce = self.loss_fn(logits, batch, stage)
        att_i, _ = self._per_image(ratios, x.shape[0], x.device)
        att = att_i.mean()
        if g.variant != "differentiable":
            att = att.detach()  # as released: a number, not part of the graph
        loss = lam * ce + (1.0 - lam) * att
        # torch.full, not torch.tensor: a fill kernel with the value as its argument, not a copy
        # from host memory
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "att": att.detach(),
                      "lam": torch.full((), lam, device=x.device)}

    def _ratios(self, batch, boxes, logits, acts, differentiable: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(r (B,), has-region (B,))] per map target: the soft ratio through a differentiable
        map, or the published hard ratio of a constant map."""
        g = self.cfg.gradcam_loss
        h, w = batch["image"].shape[-2:]
        out = []
        for codes, tgt in self._pairs(batch, logits, for_loss=True):
            score = logits.gather(1, tgt.view(-1, 1)).squeeze(1)
            cam = cam_from_activations(acts, score, create_graph=differentiable, size=(h, w))
            region = region_masks(boxes, codes, h, w)
            r = region_ratio(cam, region, g.thresh, g.soft_temperature if differentiable else None)
            out.append((r, ((codes > 0) & (region.flatten(1).sum(1) > 0)).float()))
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        """Probabilities, the Grad-CAM heat map of the scored class, and (with lung boxes) the
        hard region ratio r per image (NaN for images whose class has no region)."""
        g = self.cfg.gradcam_loss
        x = batch["image"]
        h, w = x.shape[-2:]
        layer = find_layer(model, g.layer)
        with torch.enable_grad():
            with capture(layer) as store:
                logits = model(x)
            pairs = self._pairs(batch, logits, for_loss=False)
            # Heat map: the first pair's class (single-label: label or prediction; multi-label:
            # the most probable class).
            if self.spec.task == "singlelabel":
                heat_tgt = pairs[0][1]
            else:
                heat_tgt = logits.argmax(1)
            maps = {}
            want_r = g.eval_ratio and "lung_box" in batch and bool((self.codes > 0).any())
            targets = [heat_tgt] + ([t for _, t in pairs] if want_r else [])
            for i, t in enumerate(targets):
                key = tuple(t.tolist())
                if key not in maps:
                    score = logits.gather(1, t.view(-1, 1)).squeeze(1)
                    maps[key] = cam_from_activations(store["A"], score, create_graph=False, size=(h, w),
                                                     retain_graph=i < len(targets) - 1)
        out: dict[str, Any] = {"probs": {"main": self.to_probs(logits.detach())},
                               "heatmap": maps[tuple(heat_tgt.tolist())]}
        if want_r:
            boxes = lung_box_in_view(batch["lung_box"], batch.get("window"), batch.get("flip"))
            ratios, masses = [], []
            for codes, t in pairs:
                region = region_masks(boxes, codes, h, w)
                cam = maps[tuple(t.tolist())]
                has = ((codes > 0) & (region.flatten(1).sum(1) > 0)).float()
                ratios.append((region_ratio(cam, region, g.thresh, None), has))
                # How much of the map lies in the region: a flat, everywhere-high map also has
                # r = 1, so r alone does not tell attention inside from attention everywhere.
                mass = (cam * region).flatten(1).sum(1) / cam.flatten(1).sum(1).clamp_min(1e-12)
                masses.append((mass, has))
            att, cnt = self._per_image(ratios, x.shape[0], x.device)
            out_mass, _ = self._per_image(masses, x.shape[0], x.device)
            nan = torch.full_like(att, float("nan"))
            out["extras"] = {"r": torch.where(cnt > 0, 1.0 - att, nan),
                             "cam_in_region": torch.where(cnt > 0, 1.0 - out_mass, nan)}
        return out
