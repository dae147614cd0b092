"""The method contract: what the runtime (hpc) needs from a training method.

A method owns the science of one paper: which modules exist, which stages train which of them,
the loss, and what a prediction is (one probability table per branch, plus an attention box
when the method has one). The runtime owns processes, devices, data movement and files; it
calls only the methods below, so every method gets DDP, DALI, checkpoints, resume, SLURM and
sweeps for free.

Batches are dicts of tensors on the device:
  image    (B, C, H, W) float, normalised network input
  labels   (B, L) float multi-hot (one-hot for single-label tasks)
  target   (B,) int64 class index (single-label tasks; -1 otherwise)
  index    (B,) int64 sample index in the prepared manifest
  valid    (B,) bool (False on evaluation padding)
  view_box (B, 4) normalised [x0, y0, x1, y1] of the input view inside the prepared image
  hires    (B, C, S, S) uint8 prepared image, flipped like the view (when the method asks)
  lung_box (B, 4) normalised [x, y, w, h], NaN when unknown (when the dataset has them)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medattn import losses
from medattn.config_schema import Config, check_choices
from medattn.errors import ConfigError
from medattn.published import PublishedResults


@dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about the prepared dataset."""

    label_names: tuple[str, ...]
    eval_labels: tuple[str, ...]
    task: str  # multilabel | singlelabel
    channels: int
    prepared_size: int
    mean: tuple[float, ...] = (0.449,)
    std: tuple[float, ...] = (0.226,)
    root: str = ""  # the prepared directory (methods that read extra stores, e.g. lung masks)
    # Generated training images (medattn synth, test blobs): None = unknown (an older checkpoint).
    synthetic: bool | None = None
    source: str = ""  # dataset.json's source kind (nih, imagefolder, csv, ...)
    # The split trained on: (name, seed, hash of the assignment) (PreparedDataset.split_record), kept
    # in every checkpoint so released weights never lose it; () = unknown (an older checkpoint).
    split: tuple = ()

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def eval_indices(self) -> list[int]:
        return [self.label_names.index(n) for n in self.eval_labels]

    @classmethod
    def from_dataset(cls, ds, cfg: Config) -> "DataSpec":
        from medattn.views import ViewSpec  # the normalisation the loaders apply

        v = ViewSpec.from_config(cfg.data, ds.image_size, ds.channels, train=False)
        info = getattr(ds, "info", None) or {}
        rec = ds.split_record() if hasattr(ds, "split_record") else None
        return cls(tuple(ds.label_names), tuple(ds.eval_labels), ds.task, ds.channels, ds.image_size,
                   tuple(v.mean), tuple(v.std), str(getattr(ds, "root", "")), getattr(ds, "synthetic", None),
                   str((info.get("source") or {}).get("kind", "")),
                   (rec["name"], rec["seed"], rec["hash"]) if rec else ())

    @property
    def split_record(self) -> dict[str, Any] | None:
        """``{"name", "seed", "hash"}`` of the split trained on, None when not recorded."""
        return dict(zip(("name", "seed", "hash"), self.split)) if self.split else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, kept in every checkpoint: what a model needs to be used without the prepared
        directory it was trained on (labels, task, channels, preprocessing)."""
        return {"label_names": list(self.label_names), "eval_labels": list(self.eval_labels), "task": self.task,
                "channels": self.channels, "prepared_size": self.prepared_size, "mean": list(self.mean),
                "std": list(self.std), "synthetic": self.synthetic, "source": self.source,
                "split": self.split_record}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        return cls(tuple(d["label_names"]), tuple(d["eval_labels"]), d["task"], int(d["channels"]),
                   int(d["prepared_size"]), tuple(d["mean"]), tuple(d["std"]), synthetic=d.get("synthetic"),
                   source=str(d.get("source") or ""),
                   split=tuple((d.get("split") or {}).get(k) for k in ("name", "seed", "hash")) if d.get("split") else ())


class Method:
    """Base class. Subclasses set ``name`` and ``stage_order`` and implement the hooks.

    Besides the training hooks, a method owns its part of the configuration (class level, so
    configs and sweeps can ask without a dataset):

    * ``sections``: its config sections, name -> dataclass (a config carries only these);
    * ``choices``: allowed values of its keys, checked with every config (:meth:`check_config`);
    * :meth:`key_effect`: which stages a key can change (sweeps share the stages before them);
    * ``sweep_aliases`` / :meth:`alias_settings`: short names for ``medattn sweep --space``;
    * :meth:`loss`: each stage's classification loss, from the one loss factory.
    """

    name: ClassVar[str] = ""
    # Allowed stage names in training order; empty = any names, in config order.
    stage_order: ClassVar[tuple[str, ...]] = ()
    sections: ClassVar[dict[str, type]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    # alias -> (what it is, as a noun phrase; what it sets, for --help)
    sweep_aliases: ClassVar[dict[str, tuple[str, str]]] = {}
    # What the method's paper reported on ChestX-ray14 (the report sets it beside a run; empty: nothing).
    published: ClassVar[PublishedResults] = PublishedResults()
    # Branch name -> what it is, in words, for reports and figures (a branch not listed is its name).
    branch_labels: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: Config, spec: DataSpec):
        self.cfg = cfg
        self.spec = spec
        self.validate()

    # ------------------------------------------------------------------ the configuration it owns
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Check the method's own keys (called by every config load); raise ConfigError."""
        check_choices(cfg, cls.choices)

    @classmethod
    def all_sweep_aliases(cls) -> dict[str, tuple[str, str]]:
        """Every short sweep name: the method's own and those of its mix-ins (e.g. FocalLoss's gamma)."""
        return dict(cls.sweep_aliases)

    @classmethod
    def alias_settings(cls, alias: str, value: Any) -> list[tuple[str, Any]]:
        """The config settings a sweep alias stands for, for one sampled value."""
        raise KeyError(alias)

    @classmethod
    def key_effect(cls, cfg: Config, key: str, loss_stages: list[str] | None = None) -> tuple[list[str], str]:
        """(stages whose training ``key`` can change, in order; why none, when none).

        A later stage starts from an earlier one's weights, so a key that changes a stage changes
        every stage after it. ``loss_stages``: for a key of a loss's section, the stages that use
        (or a sweep may switch to) that loss; the method that owns the section reads it
        (:class:`medattn.methods.focal.FocalLoss`).
        """
        names = cfg.stage_names()
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) >= 3:
            return (names if parts[1] == "*" else names[names.index(parts[1]):]), ""
        return names, ""

    # ------------------------------------------------------------------ config
    def validate(self) -> None:
        names = self.cfg.stage_names()
        if self.stage_order:
            unknown = [s for s in names if s not in self.stage_order]
            if unknown:
                raise ConfigError(f"method {self.name!r} has no stage {unknown[0]!r} "
                                  f"(its stages are {', '.join(self.stage_order)})")
            order = [s for s in self.stage_order if s in names]
            if order != names:
                raise ConfigError(f"stages of method {self.name!r} must be in the order {', '.join(order)}")

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes or self.spec.num_classes

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def trainable_modules(self, model: nn.Module, stage: str) -> list[nn.Module]:
        """Modules trained in ``stage`` (default: the whole model)."""
        return [model]

    def prepare_stage(self, model: nn.Module, stage: str) -> list[nn.Parameter]:
        """Freeze everything except this stage's modules; return the trainable parameters."""
        train = self.trainable_modules(model, stage)
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        for m in train:
            for p in m.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def init_stage(self, model: nn.Module, stage: str) -> None:
        """Called once when ``stage`` starts fresh (not on resume), after the previous stage's best
        weights are loaded: set up what this stage trains from them (default: nothing)."""

    def select_initial(self, stage: str) -> bool:
        """Whether ``stage``'s starting weights (after :meth:`init_stage`) are a candidate for its
        best checkpoint, validated before the first epoch (default: no)."""
        return False

    def stage_start(self, stage: str) -> dict[str, Any]:
        """What ``stage`` starts from, for the record (eval's metrics.json, the report): ``start``,
        the starting weights in words (e.g. "global head"); ``chosen_by``, the config keys that
        chose them ({"agcnn.fusion_init": "global"}); ``same_as_branch``, a branch whose model
        the starting weights are (its column then equals this stage's when they are kept); and
        the method's own keys. Default: nothing to say."""
        return {}

    # How the report and ``viz`` describe this method's attention overlay panels (the method
    # knows what its heat map and crop are; the report does not).
    heatmap_description: str = "the method's attention heat map, scaled to [0, 1]"
    crop_description: str | None = None  # the last panel, for methods that crop (None: no such panel)

    def set_train_mode(self, model: nn.Module, stage: str) -> None:
        """Frozen parts run in eval mode (their BatchNorm statistics must not drift)."""
        model.eval()
        for m in self.trainable_modules(model, stage):
            m.train()

    # ------------------------------------------------------------------ steps
    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], stage: str,
                      epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor], stage: str) -> dict[str, Any]:
        """{"probs": {branch: (B, L)}, optional "boxes": (B, 4) normalised [x0,y0,x1,y1] in the
        prepared image, optional "heatmap": (B, h, w) in [0, 1] over the input view}."""
        raise NotImplementedError

    def branches(self, stage: str) -> list[str]:
        """Branches evaluated once ``stage`` is trained."""
        return ["main"]

    @classmethod
    def branch_label(cls, branch: str) -> str:
        """A branch in words (``branch_labels``), for display."""
        return cls.branch_labels.get(branch, branch)

    def select_branch(self, stage: str) -> str:
        """The branch whose validation metric selects this stage's best checkpoint."""
        return self.branches(stage)[-1]

    def needs_hires(self, stage: str) -> bool:
        return False

    def stage_indices(self, ds, stage: str, split: str, indices):
        """The samples of ``split`` that ``stage`` trains or validates on (default: all of them).

        A method may train a stage on a subset of the prepared split (seed 004's stage 1 uses
        abnormal images only); the patient split itself is never changed here.
        """
        return indices

    def start_epoch_hook(self, model: nn.Module, stage: str, epoch: int) -> None:
        """Called on every rank before each training epoch (e.g. adaptive loss weights)."""

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (e.g. feature centres kept outside the model)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ losses
    def loss_kind(self, stage: str) -> str:
        """The classification loss of ``stage`` (``stages.<stage>.loss``)."""
        return self.cfg.stages[stage].loss

    def loss_settings(self) -> Any:
        """The config section the loss factory reads for its options (None: none; a method with
        focal loss hands its ``focal`` section, :class:`medattn.methods.focal.FocalLoss`)."""
        return None

    def loss(self, stage: str) -> "losses.ClassificationLoss":
        """The stage's classification loss, made once by the loss factory."""
        cache = self.__dict__.setdefault("_losses", {})
        if stage not in cache:
            cache[stage] = losses.ClassificationLoss(self.loss_kind(stage), self.loss_settings())
        return cache[stage]

    # ------------------------------------------------------------------ helpers
    def to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.softmax(-1) if self.spec.task == "singlelabel" else logits.sigmoid()

    def normalize_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (as in ``hires``) -> the loaders' normalisation (:func:`medattn.views.normalize`)."""
        from medattn.views import normalize

        mean, std = self._stats(x.device, x.shape[1])
        return normalize(x, mean, std)

    def _stats(self, device: torch.device, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation's mean and std as (1, C, 1, 1) tensors on ``device``, made once per
        device (a tensor built from Python numbers is a blocking host-to-device copy on a GPU)."""
        cache = self.__dict__.setdefault("_stats_cache", {})
        key = (str(device), channels)
        if key not in cache:
            def t(v):
                return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).expand(1, channels, 1, 1).to(device)
            cache[key] = (t(self.spec.mean), t(self.spec.std))
        return cache[key]


class StageStep(nn.Module):
    """Wraps (method, model, stage) so that DDP sees one forward() per training step.

    DDP synchronises gradients only for computations that go through its forward, so a method's
    multi-branch step (frozen global branch -> crop -> local branch) must run inside it.
    """

    def __init__(self, method: Method, model: nn.Module, stage: str):
        super().__init__()
        self.method = method
        self.model = model
        self.stage = stage
        self.epoch = 0

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.method.training_loss(self.model, batch, self.stage, self.epoch)
