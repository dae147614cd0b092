"""Any timm model as a medattn backbone, behind the :class:`ClassifierModel` contract.

``model.backbone`` may name any model timm knows (``pvt_v2_b2``, ``convnext_tiny``,
``efficientnet_b0``, ``vit_small_patch16_224``, ...; a pretrained tag may follow the name, as in
``convnext_tiny.fb_in22k_ft_in1k``). Names medattn registers itself (``resnet50``, ``vgg16_bn``,
...) stay torchvision's; ``timm/NAME`` asks for timm's model of that name instead
(``timm/resnet50``). timm is an optional dependency: ``pip install 'medattn[timm]'``.

What medattn takes from timm is the trunk only (``num_classes=0, global_pool=""``); the head is
medattn's (global max/avg pool -> dropout -> Linear), so every method sees the same contract:

* ``forward_features`` returns a spatial map (B, C, h, w) for every model. Convolutional and
  hierarchical transformer trunks (ConvNeXt, EfficientNet, PVT-v2) give one already (NHWC
  trunks such as Swin are transposed). Plain ViTs give tokens (B, N, C): the prefix tokens
  (class, registers) are dropped and the patch tokens are laid out on their grid (H/16 x W/16
  for a patch-16 ViT), so AG-CNN's heat map, Grad-CAM and attention crops work unchanged; the
  class token is not used by the head. ViTs are built with ``dynamic_img_size`` so that any
  ``data.image_size`` divisible by the patch size works (position embeddings are interpolated on
  the fly, the state dict keeps timm's shapes).
* ``gradcam_layer`` is an identity module on that map (``feature_map``): the activation Grad-CAM
  needs, whatever the trunk's internals are.
* the 1-channel stem: timm's own ``in_chans`` handling. A pretrained 3-channel stem is summed
  over RGB when ``in_chans=1``, as for the torchvision backbones (medattn.models.weights).

Weights never come from the network: ``model.weights=imagenet`` is timm's default pretrained
tag for the name (or the tag in the name), read from a local file (:func:`find_timm_weights`);
a path loads a timm/Hugging Face state dict (``.safetensors``, ``.pth``, ``.bin``) or a medattn
checkpoint of the same backbone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medattn.errors import ConfigError
from medattn.models.base import ClassifierModel
from medattn.models.weightfiles import load_into, load_state_dict_file, search_dirs

TIMM_PREFIX = "timm/"
EXTRA_HINT = "pip install 'medattn[timm]' (or pip install timm)"


def timm_module(name: str = ""):
    """``import timm``, or a ConfigError naming the extra that provides it."""
    try:
        import timm  # noqa: PLC0415 (optional dependency)
    except ImportError:
        what = f"model.backbone={name!r} is not a built-in backbone; " if name else ""
        raise ConfigError(f"{what}timm backbones need the timm package, which is not installed: "
                          f"{EXTRA_HINT}") from None
    return timm


def timm_arch(name: str) -> str:
    """The timm model name of a ``model.backbone`` value (``timm/`` prefix removed)."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name


def is_timm_model(name: str) -> bool:
    """Whether timm (when installed) knows ``name`` (with or without ``timm/`` and a tag)."""
    try:
        import timm  # noqa: PLC0415
    except ImportError:
        return False
    return bool(timm.is_model(timm_arch(name)))


def _create_trunk(arch: str, in_chans: int, drop_path_rate: float,
                  state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    timm = timm_module(arch)
    kw: dict[str, Any] = dict(in_chans=in_chans, num_classes=0, global_pool="")
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    if state_dict is not None:
        # timm's own loader with the file's tensors passed in (never its download path): it drops
        # the ImageNet classifier, sums a 3-channel stem for in_chans=1 and applies the model's
        # checkpoint filter (e.g. ViT position embeddings).
        kw.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict})
    try:
        # ViTs: any input size divisible by the patch size (other models have no such option and
        # refuse the keyword before building anything).
        return _drop_unused(timm.create_model(arch, dynamic_img_size=True, **kw), in_chans)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise ConfigError(f"timm model {arch!r}: {e}") from None
    return _drop_unused(timm.create_model(arch, **kw), in_chans)


def _drop_unused(trunk: nn.Module, in_chans: int) -> nn.Module:
    """Replace the trunk's head-side modules that ``forward_features`` never runs by identities.

    timm keeps parts of its head outside ``forward_features`` even with ``num_classes=0``
    (ConvNeXt's and MaxViT's norm after pooling, MobileNetV3's 1x1 conv on the pooled vector).
    medattn's head replaces them, and parameters that get no gradient would make DDP fail
    (it expects a gradient for every trainable parameter) and the optimizer decay them for
    nothing. Found once, by running forward_features on one image of the model's default size
    and noting which modules ran (the same modules run at every input size)."""
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.add(id(mod))) for m in trunk.modules()]
    size = tuple((getattr(trunk, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-2:]
    was_training = trunk.training
    try:
        trunk.eval()
        with torch.no_grad():
            trunk.forward_features(torch.zeros(1, in_chans, *size))
    finally:
        for h in hooks:
            h.remove()
        trunk.train(was_training)
    # Only the head's side of the trunk: its top-level modules and the children of ``head``. Deeper
    # modules can hold parameters that are read without being called (MaxViT's relative position
    # tables: ``rel_pos.get_bias()``), so they are never touched.
    def unused(m: nn.Module) -> bool:
        return not any(id(x) in ran for x in m.modules()) and any(True for _ in m.parameters())

    for parent in (trunk, getattr(trunk, "head", None)):
        if not isinstance(parent, nn.Module) or parent is None:
            continue
        for child_name, child in list(parent.named_children()):
            if unused(child):
                setattr(parent, child_name, nn.Identity())
    return trunk


class TimmBackbone(ClassifierModel):
    """A timm trunk (``trunk``) with the medattn head; see the module docstring.

    Args:
        name: the timm model name (``timm/`` prefix allowed, pretrained tag allowed).
        drop_path_rate: timm's stochastic depth (models that have it).
    """

    def __init__(self, name: str, *, num_classes: int, in_chans: int = 1, pool: str = "max",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        arch = timm_arch(name)
        trunk = _create_trunk(arch, in_chans, drop_path_rate, None)
        super().__init__(num_features=int(trunk.num_features), num_classes=num_classes, in_chans=in_chans,
                         pool=pool, drop_rate=drop_rate)
        self.timm_name = arch
        self.drop_path_rate = drop_path_rate
        self.trunk = trunk
        self.feature_map = nn.Identity()  # the Grad-CAM target: the spatial map, for every trunk
        self._configure()

    def _configure(self) -> None:
        t = self.trunk
        info = getattr(t, "feature_info", None) or []
        self.feature_stride = int(info[-1]["reduction"]) if info else 32
        self.num_prefix_tokens = int(getattr(t, "num_prefix_tokens", 0) or 0)
        # Swin and friends return channels-last maps; the enum's value or the plain string
        fmt = getattr(t, "output_fmt", "NCHW")
        self.channels_last_output = str(getattr(fmt, "value", fmt)).upper() == "NHWC"

    def load_trunk_state(self, state_dict: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
        """Rebuild the trunk from a timm/ImageNet state dict (adapted by timm's loader)."""
        try:
            trunk = _create_trunk(self.timm_name, self.in_chans, self.drop_path_rate, state_dict)
        except (RuntimeError, KeyError, ValueError) as e:
            # torch's message: a header line, then the missing / unexpected / mismatched keys
            text = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(f"model.weights={str(source)!r} does not fit timm model {self.timm_name} "
                              f"(in_chans={self.in_chans}): {text[:600]}") from None
        ref = next(self.trunk.parameters())
        self.trunk = trunk.to(device=ref.device, dtype=ref.dtype)
        self._configure()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk.forward_features(x)
        if f.ndim == 3:  # tokens (B, N, C): patch tokens on their grid
            b, n, c = f.shape
            h, w = x.shape[-2] // self.feature_stride, x.shape[-1] // self.feature_stride
            tokens = f[:, self.num_prefix_tokens:]
            if tokens.shape[1] != h * w:
                raise ConfigError(f"timm model {self.timm_name}: {tokens.shape[1]} patch tokens do not form the "
                                  f"{h}x{w} grid of a {x.shape[-2]}x{x.shape[-1]} input at stride "
                                  f"{self.feature_stride}; use a data.image_size divisible by {self.feature_stride}")
            f = tokens.transpose(1, 2).reshape(b, c, h, w)
        elif f.ndim == 4 and self.channels_last_output:
            f = f.permute(0, 3, 1, 2)
        elif f.ndim != 4:
            raise ConfigError(f"timm model {self.timm_name}: forward_features gives a {f.ndim}-d tensor, "
                              "not a feature map or tokens; it cannot be a medattn backbone")
        return self.feature_map(f)

    def gradcam_layer(self) -> nn.Module:
        return self.feature_map


def build_timm(name: str, *, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
               drop_path_rate: float = 0.0) -> TimmBackbone:
    """Registry builder for timm names (the registry calls it for names it does not register)."""
    timm = timm_module(name)
    if not timm.is_model(timm_arch(name)):
        import difflib  # noqa: PLC0415

        arch = timm_arch(name)
        hint = difflib.get_close_matches(arch, timm.list_models(), n=1)
        raise ConfigError(f"model.backbone={name!r} is neither a built-in backbone nor a timm model"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + "; `python -c \"import timm; print(timm.list_models('convnext*'))\"` lists timm's")
    return TimmBackbone(name, num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate)


# --------------------------------------------------------------------------------------------
# Weights (local files only)
# --------------------------------------------------------------------------------------------
def pretrained_info(name: str) -> tuple[str, str, str, str]:
    """(arch, tag, Hugging Face hub id, legacy URL) of timm's default (or named) pretrained weights."""
    timm = timm_module(name)
    arch = timm_arch(name)
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as e:
        raise ConfigError(f"model.backbone={name!r}: {e}") from None
    if cfg is None:
        raise ConfigError(f"model.weights=imagenet: timm has no pretrained weights for {arch!r}; "
                          "use model.weights=none or a path")
    base = arch.split(".", 1)[0]
    return base, cfg.tag or "", cfg.hf_hub_id or "", cfg.url or ""


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache (where timm.create_model(..., pretrained=True) stores files)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def weights_filename(name: str) -> str:
    """The file name medattn looks for (and ``medattn weights fetch`` writes): ``ARCH.TAG.safetensors``."""
    base, tag, _, _ = pretrained_info(name)
    return f"{base}.{tag}.safetensors" if tag else f"{base}.safetensors"


def candidate_paths(name: str) -> list[Path]:
    """Where :func:`find_timm_weights` looks, in order."""
    base, tag, hub_id, url = pretrained_info(name)
    names = [weights_filename(name)]
    if url and url.rsplit(".", 1)[-1] in ("pth", "bin", "safetensors"):
        names.append(url.rsplit("/", 1)[-1])  # timm's legacy download name (torch hub checkpoints)
    out = [d / n for d in search_dirs() for n in names]
    if hub_id:
        snaps = hf_hub_cache() / f"models--{hub_id.replace('/', '--')}" / "snapshots"
        found = sorted(snaps.glob("*/model.safetensors")) + sorted(snaps.glob("*/pytorch_model.bin"))
        out += found or [snaps / "<revision>" / "model.safetensors"]
    return out


def find_timm_weights(name: str) -> Path:
    """The local pretrained file for timm model ``name``; never downloads.

    Raises:
        ConfigError: no file; the message names the expected path and how to get it.
    """
    paths = candidate_paths(name)
    for p in paths:
        if p.is_file():
            return p
    base, tag, hub_id, _ = pretrained_info(name)
    also = "".join(f"\n  also looked in: {p}" for p in paths[1:])
    raise ConfigError(
        f"model.weights=imagenet: pretrained weights for timm model {base}"
        f"{'.' + tag if tag else ''} not found.\n  expected: {paths[0]}{also}\n"
        f"medattn never downloads at run time (compute nodes are offline). On a machine with internet run\n"
        f"  medattn weights fetch {base}{'.' + tag if tag else ''} [--to DIR]\n"
        f"and make that folder visible here as $MEDATTN_WEIGHTS_DIR or $TORCH_HOME/hub/checkpoints "
        f"(or copy the Hugging Face cache of {hub_id or base}); or set model.weights=none or a path")


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (safetensors) or a torch file (read with weights_only)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        return load_state_dict_file(path)
    if not path.is_file():
        raise ConfigError(f"model.weights={str(path)!r}: file not found")
    try:
        from safetensors.torch import load_file  # noqa: PLC0415
    except ImportError:
        raise ConfigError(f"model.weights={str(path)!r}: reading .safetensors needs the safetensors package: "
                          f"{EXTRA_HINT}") from None
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ConfigError(f"model.weights={str(path)!r}: unreadable ({e}); a truncated download? "
                          "delete it and fetch it again") from None


def load_timm_weights(model: TimmBackbone, weights: str) -> None:
    """``imagenet`` (the local file of timm's pretrained tag) or a path into a :class:`TimmBackbone`."""
    if weights == "imagenet_v2":
        raise ConfigError(f"model.weights=imagenet_v2 is torchvision's; for timm model {model.timm_name} put the "
                          "pretrained tag in the name (e.g. model.backbone=convnext_tiny.fb_in22k_ft_in1k) "
                          "with model.weights=imagenet")
    path = find_timm_weights(model.timm_name) if weights == "imagenet" else Path(weights).expanduser()
    sd = read_weights_file(path)
    if any(k.startswith("trunk.") for k in sd):  # a medattn checkpoint of this backbone: exact fit
        load_into(model, sd, path, allow_new_modules=False)
    else:  # a timm / Hugging Face file: timm adapts it (classifier dropped, stem summed)
        model.load_trunk_state(sd, path)
