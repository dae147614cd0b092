"""DualAttendMed (seed 000): WS-DAN + counterfactual attention (CAL) with channel attention, on
the shared runtime. docs/methods/dualattendmed.md has the method, both variants and every defect
of the published code; methods.md section 000 has the facts.

One training step (``training_loss``), for a batch x of B images:

1. raw pass: p, p_aux = p - p_cf, X (B x M*C), A (B x M x h x w);
2. per image, two maps drawn with weights ~ sqrt(sum A_k) (with replacement); the first crops
   (box of A >= theta * max A, padded, resized to the input), the second drops (A < theta * max A);
3. augmented pass on the 2B crops and drops: p_aug, p_aux_aug;
4. feature centres c (K x M*C, outside the model, checkpointed through ``extra_state``): the
   loss uses c_hat = normalize(c) before this batch's update; then the update;
5. loss (``variant``):
   published: lambda_cls (L_raw + 2 L_aug + 3 L_aux)/6 + lambda_att MSE(A, mean_m A)
              + lambda_div relu(0.1 - ||A_i * A_j||^2) + lambda_center clamp(aux centre loss)
   corrected: lambda_cls (L_raw/3 + L_aux + 2/3 L_aug) + lambda_center sum||X - c_hat_y||^2 / n
              + lambda_div relu(cos(A_i, A_j) - 0.1) [+ lambda_att MSE, 0 by default]
   L is cross-entropy (single-label) or BCE over the labels (multi-label); L_aux is over the 3B
   raw + augmented images.

Multi-label targets: every (image, positive class) pair plays the role of CAL's (image, class)
sample: a centre moves towards the images positive for its class, and the centre loss averages
over the positive pairs. Images without a positive label contribute to neither.

Across processes the centre update uses the whole global batch (one all-reduce of the per-class
sums), so every rank keeps the same centres, as one process with the global batch would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medattn import losses
from medattn.attention import crop_and_resize, scale_maps
from medattn.attention_wsdan import (alignment_loss_published, crop_boxes, diversity_loss_corrected,
                                     diversity_loss_published, drop_masks, sample_maps)
from medattn.boxes import view_to_source as map_boxes
from medattn.errors import ConfigError
from medattn.methods.base import Method

# Per-variant defaults of the config keys left null (methods.md section 000).
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # DualAttendMed's train_distributed.py: fixed theta 0.5 for crop and drop; README lambda 0.5
    # for the "alignment" term; 0.01 x the aux centre loss; Conv2d attention (bias, no BN/ReLU);
    # centres randn x 0.01.
    "published": {"crop_theta": (0.5, 0.5), "drop_theta": (0.5, 0.5), "lambda_att": 0.5, "lambda_center": 0.01,
                  "attention": "conv", "centre_init": "randn"},
    # CAL fgvc/: theta U(0.4, 0.6) / U(0.2, 0.5), BasicConv2d attention, centres from zero,
    # centre loss weight 1; the "alignment" MSE (which collapses the maps) is off.
    "corrected": {"crop_theta": (0.4, 0.6), "drop_theta": (0.2, 0.5), "lambda_att": 0.0, "lambda_center": 1.0,
                  "attention": "bn_relu", "centre_init": "zeros"},
}
AUX_INNER_MARGIN = 0.1  # Auxiliary_Loss_v2 inner_margin
AUX_MARGIN = 1.0  # Auxiliary_Loss_v2(margin=1); the published torch.Tensor(1) is uninitialised memory
AUX_ALPHA = 0.05


@dataclass(frozen=True)
class Settings:
    """The method's options with the variant's defaults filled in."""

    variant: str
    task: str
    crop_theta: tuple[float, float]
    drop_theta: tuple[float, float]
    lambda_att: float
    lambda_center: float
    attention: str
    centre_init: str


@dataclass
class DualAttendMedConfig:
    """DualAttendMed / WS-DAN + CAL (seed 000), methods.md section 000; docs/methods/dualattendmed.md.

    ``null`` values take the variant's default (published | corrected)."""

    variant: str = "corrected"  # published | corrected
    task: str = "auto"  # auto (the dataset's) | multilabel (sigmoid/BCE) | singlelabel (softmax/CE)
    num_maps: int = 32
    reduction: int = 16
    # DualAttendMed's channel attention on the backbone features (its addition: CAL and WS-DAN have
    # none; dualattendmed_cal sets it false)
    channel_attention: bool = True
    layer4_stride: int = 1
    feature_scale: float = 100.0
    crop_theta: tuple[float, float] | None = None  # null: published (0.5, 0.5), corrected (0.4, 0.6)
    crop_padding: float = 0.1
    drop_theta: tuple[float, float] | None = None  # null: published (0.5, 0.5), corrected (0.2, 0.5)
    beta: float = 0.05  # feature-centre update rate
    lambda_cls: float = 1.0
    lambda_att: float | None = None  # "alignment" MSE; null: published 0.5, corrected 0
    lambda_div: float = 0.1
    lambda_center: float | None = None  # null: published 0.01 (aux centre loss), corrected 1 (CAL centre loss)
    div_margin: float = 0.1
    eval_crop_theta: float = 0.5  # DualAttendMed 0.5 / pad 0.1; CAL 0.1 / 0.05
    eval_crop_padding: float = 0.1
    eval_flip: bool = True
    loc_theta: float | None = None  # localisation box: mean map >= loc_theta * max; null = eval_crop_theta
    loc_padding: float = 0.0  # padding of the reported localisation box (the eval crop uses eval_crop_padding)


def resolve_settings(dam, dataset_task: str) -> Settings:
    """``cfg.dualattendmed`` + the dataset's task -> :class:`Settings` (null = variant default)."""
    d = VARIANT_DEFAULTS[dam.variant]
    task = dataset_task if dam.task == "auto" else dam.task
    return Settings(
        variant=dam.variant, task=task,
        crop_theta=tuple(dam.crop_theta) if dam.crop_theta is not None else d["crop_theta"],
        drop_theta=tuple(dam.drop_theta) if dam.drop_theta is not None else d["drop_theta"],
        lambda_att=d["lambda_att"] if dam.lambda_att is None else float(dam.lambda_att),
        lambda_center=d["lambda_center"] if dam.lambda_center is None else float(dam.lambda_center),
        attention=d["attention"], centre_init=d["centre_init"])


# --------------------------------------------------------------------------------------------
# Feature centres
# --------------------------------------------------------------------------------------------
def class_sums(features: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the features of the positive images and their counts.

    Args:
        features: (B, D) X.
        positives: (B, K) 0/1 (one-hot for single-label).

    Returns:
        S (K, D) = positives^T X, n (K,) = positives summed over the batch.
    """
    p = positives.to(features.dtype)
    return p.t() @ features, p.sum(dim=0)


def update_centres(centres: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float,
                   variant: str) -> torch.Tensor:
    """The feature-centre update of one (global) batch; returns the new centres.

    With c_hat = normalize(c) and, for each class k present (n_k > 0):

    * ``corrected`` (CAL, per sample): c_k <- c_k + beta (mean_{i: y_i = k} X_i - c_hat_k). CAL
      writes ``c[y] += beta (X - c_hat[y])`` with advanced indexing, where repeated classes keep
      only one sample's update; the class mean is the order-independent form of the same rule.
    * ``published`` (DualAttendMed, batch mean): c_k <- c_hat_k + beta mean_{(i, j) pos} (X_i - c_hat_j),
      one mean over the whole batch across classes, added to every class present.

    Classes absent from the batch keep their centre (published: also unnormalised).
    """
    c_hat = F.normalize(centres, dim=-1)
    present = counts > 0
    if variant == "corrected":
        mean = sums / counts.clamp_min(1).unsqueeze(1)
        new = centres + beta * (mean - c_hat)
    else:
        total = counts.sum().clamp_min(1)
        delta = (sums.sum(dim=0) - (counts.unsqueeze(1) * c_hat).sum(dim=0)) / total
        new = c_hat + beta * delta.unsqueeze(0)
    return torch.where(present.unsqueeze(1), new, centres)


def combine_cls(variant: str, l_raw: torch.Tensor, l_aug: torch.Tensor, l_aux: torch.Tensor) -> torch.Tensor:
    """The classification loss from its three terms (raw B, augmented 2B, aux 3B images).

    corrected / cal: CAL's L_raw/3 + L_aux + 2/3 L_aug (CAL train_distributed.py L237-240);
    published: DualAttendMed's (L_raw + 2 L_aug + 3 L_aux) / 6.
    """
    if variant == "published":
        return (l_raw + 2.0 * l_aug + 3.0 * l_aux) / 6.0
    return l_raw / 3.0 + l_aux + l_aug * (2.0 / 3.0)


def _sq_distances(features: torch.Tensor, c_hat: torch.Tensor) -> torch.Tensor:
    """(B, D), (K, D) -> (B, K) squared distances ||X_i - c_hat_k||^2 (no (B, K, D) tensor)."""
    x = features.float()
    return (x.square().sum(1, keepdim=True) - 2 * x @ c_hat.t() + c_hat.square().sum(1).unsqueeze(0)).clamp_min(0)


def centre_loss(features: torch.Tensor, c_hat: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CAL's CenterLoss sum_i ||X_i - c_hat_{y_i}||^2 / B, over the positive (image, class) pairs:
    sum over pairs / number of pairs (= / B for single-label)."""
    p = positives.float()
    return (p * _sq_distances(features, c_hat)).sum() / p.sum().clamp_min(1)


def aux_centre_loss_published(features: torch.Tensor, c_hat: torch.Tensor, positives: torch.Tensor,
                              num_maps: int, epoch: int) -> torch.Tensor:
    """DualAttendMed's ``Auxiliary_Loss_v2`` with its clamps, vectorised.

    intra = clamp(mean_pairs relu(||X - c_hat_y|| - 0.1), max 10);
    inter = clamp(sum_{j<k} relu(1 - mean_pairs ||c_hat_y[j] - c_hat_y[k]||) / M / 0.05, max 100), where
    c_hat_y[j] is the j-th of the M parts of the centre; the centres are detached, so it has no
    gradient; total clamped at 10 (epoch < 5) or 5. (The margin is the evident 1: the published
    ``torch.Tensor(1)`` is one uninitialised float.)
    """
    p = positives.float()
    npos = p.sum().clamp_min(1)
    dist = torch.sqrt(_sq_distances(features, c_hat) + 1e-12)
    intra = ((p * F.relu(dist - AUX_INNER_MARGIN)).sum() / npos).clamp(max=10.0)
    k, d = c_hat.shape
    parts = c_hat.detach().float().view(k, num_maps, d // num_maps)
    pd = torch.cdist(parts, parts)  # (K, M, M) distances between the parts of each class centre
    mean_pd = (p.sum(0).view(-1, 1, 1) * pd).sum(0) / npos  # mean over the positive pairs
    if num_maps > 1:
        iu = torch.triu_indices(num_maps, num_maps, offset=1, device=pd.device)
        inter = F.relu(AUX_MARGIN - mean_pd[iu[0], iu[1]]).sum() / num_maps / AUX_ALPHA
    else:
        inter = mean_pd.sum() * 0.0
    inter = inter.clamp(max=100.0)
    return (intra + inter).clamp(max=10.0 if epoch < 5 else 5.0)


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    # Centres must stay identical on every rank: sum this batch's statistics over all of them.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------
class DualAttendMedMethod(Method):
    name = "dualattendmed"
    sections = {"dualattendmed": DualAttendMedConfig}
    choices = {"dualattendmed.variant": ("published", "corrected"),
               "dualattendmed.task": ("auto", "multilabel", "singlelabel")}
    sweep_aliases = {"tau": ("attention threshold tau",
                             "the fixed crop threshold theta (dualattendmed.crop_theta=[tau, tau] and "
                             "dualattendmed.eval_crop_theta=tau)")}

    @classmethod
    def alias_settings(cls, alias, value):
        if alias == "tau":  # one fixed theta, in training and evaluation
            return [("dualattendmed.crop_theta", [value, value]), ("dualattendmed.eval_crop_theta", value)]
        return super().alias_settings(alias, value)

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.settings = resolve_settings(cfg.dualattendmed, spec.task)
        self.centres: torch.Tensor | None = None  # (K, M*C) float32, created by build_model

    # ------------------------------------------------------------------ config
    def validate(self) -> None:
        super().validate()
        d = self.cfg.dualattendmed
        for name, st in self.cfg.stages.items():
            if st.loss not in ("bce", "ce"):
                raise ConfigError(f"config key 'stages.{name}.loss': DualAttendMed's loss follows the task "
                                  f"(ce single-label, bce multi-label), not {st.loss!r}")
        if d.task == "singlelabel" and self.spec.task != "singlelabel":
            raise ConfigError(f"config key 'dualattendmed.task': singlelabel needs a single-label dataset; "
                              f"this one is {self.spec.task} (an image can have several labels)")
        for key in ("crop_theta", "drop_theta"):
            v = getattr(d, key)
            if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
                raise ConfigError(f"config key 'dualattendmed.{key}': need 0 <= lo <= hi <= 1, got {list(v)}")
        for key in ("eval_crop_theta", "loc_theta"):
            v = getattr(d, key)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"config key 'dualattendmed.{key}' must be in [0, 1], got {v}")
        for key in ("crop_padding", "eval_crop_padding", "loc_padding"):
            if not 0.0 <= getattr(d, key) < 1.0:
                raise ConfigError(f"config key 'dualattendmed.{key}' must be in [0, 1), got {getattr(d, key)}")
        if not 0.0 <= d.beta <= 1.0:
            raise ConfigError(f"config key 'dualattendmed.beta' must be in [0, 1], got {d.beta}")
        if d.num_maps < 1:
            raise ConfigError(f"config key 'dualattendmed.num_maps' must be >= 1, got {d.num_maps}")
        if d.feature_scale <= 0:
            raise ConfigError(f"config key 'dualattendmed.feature_scale' must be > 0, got {d.feature_scale}")

    @property
    def task(self) -> str:
        return self.settings.task

    def to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.softmax(-1) if self.task == "singlelabel" else logits.sigmoid()

    # ------------------------------------------------------------------ model and state
    def build_model(self) -> nn.Module:
        from medattn.models.wsdan import build_wsdan

        d = self.cfg.dualattendmed
        model = build_wsdan(self.cfg.model, num_classes=self.num_classes, in_chans=self.spec.channels,
                            num_maps=d.num_maps, reduction=d.reduction, attention=self.settings.attention,
                            layer4_stride=d.layer4_stride, feature_scale=d.feature_scale,
                            channel_attention=d.channel_attention)
        self.centres = self.initial_centres(model.feature_dim)
        return model

    def initial_centres(self, dim: int) -> torch.Tensor:
        """published: randn x 0.01 (from ``seed``, so every rank starts alike); corrected: zeros."""
        # On the CPU explicitly (not in a caller's device context); moved on first use.
        if self.settings.centre_init == "zeros":
            return torch.zeros(self.num_classes, dim, device="cpu")
        g = torch.Generator(device="cpu").manual_seed(int(self.cfg.seed))
        return torch.randn(self.num_classes, dim, generator=g, device="cpu") * 0.01

    def extra_state(self) -> dict[str, Any]:
        return {} if self.centres is None else {"feature_centres": self.centres.detach().cpu().clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        c = state.get("feature_centres")
        if c is None:
            return
        if self.centres is not None and tuple(c.shape) != tuple(self.centres.shape):
            raise ConfigError(f"checkpoint feature centres have shape {tuple(c.shape)}, this model needs "
                              f"{tuple(self.centres.shape)} (num_classes x num_maps*channels)")
        dev = self.centres.device if self.centres is not None else c.device
        self.centres = c.detach().float().to(dev).clone()

    def _centres_on(self, device: torch.device, dim: int) -> torch.Tensor:
        if self.centres is None:
            self.centres = self.initial_centres(dim)
        if self.centres.device != device:
            self.centres = self.centres.to(device)
        return self.centres

    # ------------------------------------------------------------------ losses
    def positives(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) 0/1: the image's class (single-label) or its positive labels (multi-label)."""
        if self.task == "singlelabel":
            return F.one_hot(batch["target"].long(), self.num_classes).float()
        return (batch["labels"] > 0.5).float()

    def cls_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], repeats: int = 1) -> torch.Tensor:
        """CE on the class index (single-label) or BCE on the labels (multi-label), for ``logits``
        of ``repeats`` stacked copies of the batch."""
        if self.task == "singlelabel":
            return losses.cross_entropy(logits, batch["target"].long().repeat(repeats))
        return losses.bce(logits, batch["labels"].repeat(repeats, 1))

    def augment(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images and their (B, M, h, w) maps -> the 2B attention crops and drops."""
        d = self.cfg.dualattendmed
        s = self.settings
        size = tuple(x.shape[-2:])
        with torch.no_grad():
            picked = sample_maps(maps, 2)
            boxes, _ = crop_boxes(picked[:, 0], s.crop_theta, d.crop_padding, size)
            crops = crop_and_resize(x.detach().float(), boxes, size).to(x.dtype)
            drops = x.detach() * drop_masks(picked[:, 1], s.drop_theta, size).to(x.dtype)
            aug = torch.cat([crops, drops], dim=0)
        if x.is_cuda and x.is_contiguous(memory_format=torch.channels_last):
            aug = aug.contiguous(memory_format=torch.channels_last)
        return aug

    def training_loss(self, model, batch, stage, epoch):
        d = self.cfg.dualattendmed
        s = self.settings
        x = batch["image"]
        raw = model.forward_all(x)
        aug = model.forward_all(self.augment(x, raw.maps))

        l_raw = self.cls_loss(raw.logits, batch)
        l_aug = self.cls_loss(aug.logits, batch, 2)
        l_aux = self.cls_loss(torch.cat([raw.aux_logits, aug.aux_logits], dim=0), batch, 3)
        l_cls = combine_cls(s.variant, l_raw, l_aug, l_aux)

        pos = self.positives(batch)
        feats = raw.features
        with torch.no_grad():
            centres = self._centres_on(feats.device, feats.shape[1])
            c_hat = F.normalize(centres, dim=-1)  # the loss sees the centres before this batch's update
            sums, counts = class_sums(feats.detach().float(), pos)
            packed = _all_reduce_(torch.cat([sums, counts.unsqueeze(1)], dim=1))
            self.centres = update_centres(centres, packed[:, :-1], packed[:, -1], d.beta, s.variant)

        if s.variant == "published":
            l_att = alignment_loss_published(raw.maps)
            l_div = diversity_loss_published(raw.maps, d.div_margin)
            l_center = aux_centre_loss_published(feats, c_hat, pos, d.num_maps, epoch)
        else:
            l_att = alignment_loss_published(raw.maps) if s.lambda_att else raw.maps.sum() * 0.0
            l_div = diversity_loss_corrected(raw.maps, d.div_margin)
            l_center = centre_loss(feats, c_hat, pos)
        loss = d.lambda_cls * l_cls + s.lambda_att * l_att + d.lambda_div * l_div + s.lambda_center * l_center
        logs = {"loss": loss.detach(), "cls": l_cls.detach(), "raw": l_raw.detach(), "aug": l_aug.detach(),
                "aux": l_aux.detach(), "att": l_att.detach(), "div": l_div.detach(), "center": l_center.detach()}
        return loss, logs

    # ------------------------------------------------------------------ inference
    def branches(self, stage: str) -> list[str]:
        # raw: p on the image alone; aux: p - p_cf, raw+crop averaged; main: the paper's
        # prediction, p averaged over raw and attention crop (and the flipped image).
        return ["raw", "aux", "main"]

    def _views(self, model, x: torch.Tensor):
        """Raw + eval attention crop of one view: (logits, aux logits, mean map, raw logits)."""
        d = self.cfg.dualattendmed
        size = tuple(x.shape[-2:])
        raw = model.forward_all(x)
        mean_map = raw.maps.float().mean(dim=1)
        boxes, _ = crop_boxes(mean_map, d.eval_crop_theta, d.eval_crop_padding, size)
        crop = model.forward_all(crop_and_resize(x.float(), boxes, size).to(x.dtype))
        return ((raw.logits.float() + crop.logits.float()) / 2, (raw.aux_logits.float() + crop.aux_logits.float()) / 2,
                mean_map, raw.logits.float())

    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        d = self.cfg.dualattendmed
        x = batch["image"]
        main, aux, mean_map, raw = self._views(model, x)
        if d.eval_flip:
            main_f, aux_f, _, _ = self._views(model, x.flip(-1))
            main, aux = (main + main_f) / 2, (aux + aux_f) / 2
        size = tuple(x.shape[-2:])
        loc_theta = d.eval_crop_theta if d.loc_theta is None else d.loc_theta
        view_boxes, _ = crop_boxes(mean_map, loc_theta, d.loc_padding, size)
        # Display map: min-max scaled (the published variant's maps can be negative everywhere).
        heat = scale_maps(F.interpolate(mean_map.unsqueeze(1), size=size, mode="bilinear",
                                        align_corners=True).squeeze(1), "minmax")
        vb = batch.get("view_box")
        if vb is None:
            vb = torch.tensor([0.0, 0.0, 1.0, 1.0], device=x.device).expand(x.shape[0], 4)
        return {"probs": {"raw": self.to_probs(raw), "aux": self.to_probs(aux), "main": self.to_probs(main)},
                "boxes": map_boxes(view_boxes, vb.to(view_boxes)), "view_boxes": view_boxes, "heatmap": heat}
