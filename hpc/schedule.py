"""Learning-rate schedules as plain functions of (epoch, step), so a resumed run computes the
same rate from the checkpointed counters and nothing drifts (a classic resume bug).

``plateau`` is the only stateful one; its state is saved in the checkpoint.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from medattn.config import StageConfig


class LRSchedule:
    def __init__(self, stage: StageConfig, steps_per_epoch: int):
        self.cfg = stage.scheduler
        self.base_lr = stage.optimizer.lr
        self.epochs = stage.epochs
        self.steps = max(1, steps_per_epoch)
        # plateau state
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0
        self.mode = stage.scheduler.monitor_mode or stage.select_mode

    def lr(self, epoch: int, step: int = 0) -> float:
        c = self.cfg
        t = epoch + step / self.steps  # fractional epoch
        if c.warmup_epochs > 0 and t < c.warmup_epochs:
            warm = (t + 1.0 / self.steps) / c.warmup_epochs
        else:
            warm = 1.0
        if c.name == "none":
            f = 1.0
        elif c.name == "step":
            f = c.gamma ** (epoch // max(1, c.step_epochs))
        elif c.name == "exp":
            # CAL (fgvc/train_distributed.py adjust_learning): gamma^((epoch + i/len) / step_epochs),
            # set at every iteration i of the epoch; not WS-DAN's StepLR, which holds it for step_epochs
            f = c.gamma ** (t / max(1, c.step_epochs))
        elif c.name == "multistep":
            f = c.gamma ** sum(epoch >= m for m in c.milestones)
        elif c.name == "cosine":
            span = max(1e-9, self.epochs - c.warmup_epochs)
            prog = min(1.0, max(0.0, (t - c.warmup_epochs) / span))
            min_f = c.min_lr / self.base_lr if self.base_lr else 0.0
            f = min_f + (1 - min_f) * 0.5 * (1 + math.cos(math.pi * prog))
        elif c.name == "onecycle":
            # fastai/torch OneCycle with cosine annealing: up from base/div to base, then down.
            total = self.epochs * self.steps
            it = epoch * self.steps + step
            up = max(1, int(c.pct_start * total))
            start, final = 1.0 / c.div_factor, 1.0 / (c.div_factor * 1e4)
            if it < up:
                f = start + (1 - start) * 0.5 * (1 - math.cos(math.pi * it / up))
            else:
                p = min(1.0, (it - up) / max(1, total - up))
                f = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))
            warm = 1.0
        elif c.name == "plateau":
            f = self.plateau_scale
        else:
            raise ValueError(c.name)
        return max(self.base_lr * f * warm, c.min_lr if c.name in ("plateau", "cosine") else 0.0)

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int = 0) -> float:
        lr = self.lr(epoch, step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def end_epoch(self, metric: float | None) -> None:
        """ReduceLROnPlateau on the watched metric (``scheduler.monitor``, default the selection metric)."""
        if self.cfg.name != "plateau" or metric is None or math.isnan(metric):
            return
        better = self.best is None or (metric > self.best if self.mode == "max" else metric < self.best)
        if better:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.patience:
                self.plateau_scale *= self.cfg.gamma
                self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.plateau_scale = d.get("plateau_scale", 1.0)
        self.best = d.get("best")
        self.bad_epochs = d.get("bad_epochs", 0)


def build_optimizer(params, stage: StageConfig, fused: bool = True) -> torch.optim.Optimizer:
    """The stage's optimizer. ``fused``: PyTorch's fused kernels (CUDA and CPU): one kernel for all
    parameters instead of a few per parameter, and no per-step ``.item()`` of the step counters that
    the per-parameter Adam makes (hundreds of host reads per step at ResNet-50's 161 tensors).
    Falls back to the default implementation where fused kernels do not apply."""
    o = stage.optimizer
    params = [p for p in params if p.requires_grad]
    if o.name == "sgd":
        cls, kw = torch.optim.SGD, dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                        nesterov=o.nesterov and o.momentum > 0)
    elif o.name == "adam":
        cls, kw = torch.optim.Adam, dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ValueError(o.name)
    if fused:
        try:
            return cls(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # a device or dtype without fused kernels
            pass
    return cls(params, **kw)
