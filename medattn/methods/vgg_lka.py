"""VGG16-BN + Large Kernel Attention, two stages: BCE, then focal loss (seed 004; methods.md 004).

Each stage trains the whole network (the published "freeze" trained everything: one parameter
group) and starts from the previous stage's best checkpoint. Both stages read the **same**
prepared patient-level split, train on its train part and select on its patient-level val part,
so no test patient is ever trained on (the published notebooks split two different patient
arrays per stage, and validated on an image-level split).

Outputs: seed 004 predicts the 14 diseases, no "No Finding". The prepared NIH data has 15
labels, so ``model.num_classes: 14`` means "one output per evaluated label" (the 14 diseases, in
the dataset's label order); the BCE/focal loss then covers those 14 columns. For evaluation the
15th column ("No Finding") is filled with the probability that none of the 14 is present,
prod_k (1 - p_k) (other labels without an output read 0); mean AUROC is over the 14 diseases
either way. ``model.num_classes: 0`` (or 15)
trains all 15 outputs instead.

Stage subsets: ``lka.abnormal_only_stages`` lists stages that train and validate on the images
with at least one disease only, as the published stage 1 did ("No Finding" rows removed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import Any

import numpy as np
import torch

from medattn import losses
from medattn.data.labels import NO_FINDING
from medattn.errors import ConfigError
from medattn.methods.classifier import ClassifierMethod


@dataclass
class LKAConfig:
    """VGG16-BN + large-kernel attention (seed 004), methods.md section 004."""

    blocks: list[int] = field(default_factory=lambda: [3, 4, 5])
    dropout: float = 0.5  # head dropout (GAP -> dropout -> Linear)
    # Stages that train and validate on abnormal images only (seed 004's stage 1 drops "No
    # Finding" rows); the patient split is the prepared one for every stage.
    abnormal_only_stages: list[str] = field(default_factory=list)


class VGGLKAMethod(ClassifierMethod):
    name = "vgg_lka"
    sections = {"lka": LKAConfig, "focal": losses.FocalConfig}

    def validate(self) -> None:
        super().validate()
        cfg, spec = self.cfg, self.spec
        if spec.task != "multilabel":
            raise ConfigError(f"method vgg_lka is multi-label (BCE/focal); the prepared data is {spec.task}")
        for name, st in cfg.stages.items():
            if st.loss not in ("bce", "focal"):
                raise ConfigError(f"config key 'stages.{name}.loss': vgg_lka trains with bce or focal, not {st.loss!r}")
        n = self.num_classes
        if n == spec.num_classes:
            self.out_idx: list[int] | None = None
        elif n == len(spec.eval_labels):
            self.out_idx = spec.eval_indices
        else:
            raise ConfigError(f"model.num_classes={n}: vgg_lka outputs either every label ({spec.num_classes}) or "
                              f"the evaluated labels only ({len(spec.eval_labels)}: {', '.join(spec.eval_labels)})")
        ca = cfg.focal.class_alpha
        if ca and len(ca) != n:
            raise ConfigError(f"config key 'focal.class_alpha' has {len(ca)} values; the model has {n} outputs")
        unknown = [s for s in cfg.lka.abnormal_only_stages if s not in cfg.stages]
        if unknown:
            raise ConfigError(f"config key 'lka.abnormal_only_stages': {unknown[0]!r} is not a stage "
                              f"({', '.join(cfg.stages)})")
        if cfg.model.drop_rate not in (0.0, cfg.lka.dropout):
            raise ConfigError(f"model.drop_rate={cfg.model.drop_rate} and lka.dropout={cfg.lka.dropout}: the "
                              "head dropout of vgg_lka is lka.dropout; leave model.drop_rate at 0")

    # ------------------------------------------------------------------ model
    def build_model(self):
        from medattn.models import create_model

        m = self.cfg.model
        kw: dict[str, Any] = {}
        if m.backbone == "vgg16_bn_lka":
            kw["blocks"] = tuple(self.cfg.lka.blocks)
        return create_model(m.backbone, num_classes=self.num_classes, in_chans=self.spec.channels,
                            weights=m.weights, pool=m.pool, drop_rate=self.cfg.lka.dropout, **kw)

    # ------------------------------------------------------------------ data
    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The label columns the outputs stand for."""
        y = batch["labels"]
        return y if self.out_idx is None else y.index_select(1, self._out_idx_on(y.device))

    def _out_idx_on(self, device: torch.device) -> torch.Tensor:
        """The output columns as an index tensor on ``device``, made once (indexing with a Python
        list copies it from host memory on every call)."""
        cache = self.__dict__.setdefault("_out_idx_cache", {})
        if str(device) not in cache:
            cache[str(device)] = torch.tensor(self.out_idx, dtype=torch.long).to(device)
        return cache[str(device)]

    def stage_indices(self, ds, stage: str, split: str, indices):
        if stage not in self.cfg.lka.abnormal_only_stages:
            return indices
        y = ds.labels_matrix()[np.asarray(indices)][:, self.spec.eval_indices]
        return np.asarray(indices)[y.max(axis=1) > 0]

    # ------------------------------------------------------------------ steps
    def loss_kind(self, stage: str) -> str:
        return self.cfg.stages[stage].loss  # multi-label only (checked in validate)

    def loss_fn(self, logits, batch, stage):
        return self.loss(stage)(logits, labels=self.targets(batch))

    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        p = torch.sigmoid(model(batch["image"]).float())
        if self.out_idx is not None:
            # Labels without an output: "No Finding" is the probability that none of the outputs
            # fires; any other (unevaluated) label reads 0.
            full = torch.zeros(p.shape[0], self.spec.num_classes, device=p.device)
            if NO_FINDING in self.spec.label_names:
                full[:, self.spec.label_names.index(NO_FINDING)] = torch.prod(1 - p, dim=1)
            full.index_copy_(1, self._out_idx_on(p.device), p)
            p = full
        return {"probs": {"main": p}}
