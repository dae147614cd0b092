"""Fetch torchvision's ImageNet weights for offline use, or list the local cache.

Compute nodes have no internet, so medattn never downloads weights while a run starts:
model.weights=imagenet reads torchvision's standard file (the name and URL come from
torchvision's weight enums, e.g. resnet50-0676ba61.pth for ResNet50_Weights.IMAGENET1K_V1)
from the first of these folders that has it:

  1. $MEDATTN_WEIGHTS_DIR (when set)
  2. $TORCH_HOME/hub/checkpoints (TORCH_HOME defaults to ~/.cache/torch; the folder
     torchvision itself downloads to, so files fetched by torchvision are found too)

and fails with the exact path expected when none has it. Fetch once on a machine with internet
(a login node), into a folder the compute nodes see:

  medattn weights fetch resnet50 densenet121           # into the first folder above
  medattn weights fetch all --to /shared/torch-weights  # every architecture medattn knows
  medattn weights list                                  # what is cached, and where

imagenet is torchvision's IMAGENET1K_V1 file (pretrained=True in older torchvision, the
weights the AG-CNN era papers used); imagenet_v2 is the newer IMAGENET1K_V2 where one exists.
A path loads a state dict (plain, or a medattn checkpoint with a 'model' entry).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import socket
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medattn.errors import ConfigError, MedattnError
# The files on disk (search folders, reading, fitting a model) are medattn.models.weightfiles'; kept
# importable from here, where users and hpc have always found them.
from medattn.models.weightfiles import key_problems, load_into, load_state_dict_file, search_dirs  # noqa: F401

# arch -> (torchvision weights enum, key of the stem conv weight, prefix of the ImageNet classifier
# keys that medattn's head replaces). The enum is read at run time, so URLs and hashes are torchvision's.
_ARCHS: dict[str, tuple[str, str, str]] = {
    "resnet18": ("ResNet18_Weights", "conv1.weight", "fc."),
    "resnet50": ("ResNet50_Weights", "conv1.weight", "fc."),
    "resnet152": ("ResNet152_Weights", "conv1.weight", "fc."),
    "densenet121": ("DenseNet121_Weights", "features.conv0.weight", "classifier."),
    "vgg16_bn": ("VGG16_BN_Weights", "features.0.weight", "classifier."),
    # seed 002 keeps the 4096-4096 MLP (classifier.0, .3); only the last Linear is replaced
    "vgg16": ("VGG16_Weights", "features.0.weight", "classifier.6."),
}
VARIANTS = {"imagenet": "IMAGENET1K_V1", "imagenet_v2": "IMAGENET1K_V2"}

# torchvision's DenseNet files keep the pre-0.4 names "norm.1", "conv.2", ... inside dense layers;
# today's modules are "norm1", "conv2". (torchvision renames them the same way when it loads them.)
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


@dataclass(frozen=True)
class ImagenetFile:
    """One torchvision ImageNet weights file."""

    arch: str
    variant: str  # imagenet | imagenet_v2
    enum: str  # e.g. ResNet50_Weights.IMAGENET1K_V1
    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        # torchvision names files <arch>-<first 8 hex digits of the file's sha256>.pth
        return self.filename.rsplit("-", 1)[-1].split(".", 1)[0]


@dataclass(frozen=True)
class TimmFile(ImagenetFile):
    """A timm model's pretrained file on the Hugging Face hub, saved as ``ARCH.TAG.safetensors``
    (the name :func:`medattn.models.timm_backbones.find_timm_weights` looks for)."""

    saved_as: str = ""

    @property
    def filename(self) -> str:
        return self.saved_as

    @property
    def hash_prefix(self) -> str:
        return ""  # the hub's files carry no hash in their names


def timm_file(name: str) -> TimmFile:
    """The pretrained file of timm model ``name`` (default tag, or the tag in the name)."""
    from medattn.models.timm_backbones import pretrained_info, weights_filename  # noqa: PLC0415

    base, tag, hub_id, _ = pretrained_info(name)
    if not hub_id:
        raise ConfigError(f"timm model {name!r} has no Hugging Face hub file to fetch")
    return TimmFile(base, tag, hub_id, f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors",
                    saved_as=weights_filename(name))


def imagenet_file(arch: str, variant: str = "imagenet") -> ImagenetFile:
    """The torchvision ImageNet file for ``arch`` (``variant``: imagenet | imagenet_v2).

    Raises:
        ConfigError: no such architecture or variant.
    """
    import torchvision.models as tvm  # noqa: PLC0415

    if arch not in _ARCHS:
        raise ConfigError(f"no ImageNet weights are known for model {arch!r} (known: {', '.join(_ARCHS)})")
    if variant not in VARIANTS:
        raise ConfigError(f"weights variant {variant!r} is not one of {', '.join(VARIANTS)}")
    enum_name = _ARCHS[arch][0]
    enum = getattr(tvm, enum_name)
    tag = VARIANTS[variant]
    if tag not in enum.__members__:
        have = [v for v, t in VARIANTS.items() if t in enum.__members__]
        raise ConfigError(f"model.weights={variant}: torchvision has no {enum_name}.{tag} for {arch} "
                          f"(available: {', '.join(have)})")
    return ImagenetFile(arch, variant, f"{enum_name}.{tag}", enum[tag].url)


def imagenet_files(variants: tuple[str, ...] = tuple(VARIANTS)) -> list[ImagenetFile]:
    """Every ImageNet file medattn knows, for the given variants."""
    out = []
    for arch in _ARCHS:
        for v in variants:
            try:
                out.append(imagenet_file(arch, v))
            except ConfigError:
                pass  # e.g. no IMAGENET1K_V2 for densenet121
    return out


def find_imagenet(arch: str, variant: str = "imagenet") -> Path:
    """Path of the cached ImageNet file for ``arch``; never downloads.

    Raises:
        ConfigError: the file is in none of :func:`search_dirs`; the message names the expected
            path and the command that fetches it.
    """
    f = imagenet_file(arch, variant)
    dirs = search_dirs()
    for d in dirs:
        if (d / f.filename).is_file():
            return d / f.filename
    also = "".join(f"\n  also looked in: {d / f.filename}" for d in dirs[1:])
    fetch = f"medattn weights fetch {arch}" + (" --variant imagenet_v2" if variant == "imagenet_v2" else "")
    raise ConfigError(
        f"model.weights={variant}: ImageNet weights for {arch} ({f.enum}) not found.\n"
        f"  expected: {dirs[0] / f.filename}{also}\n"
        f"medattn never downloads at run time (compute nodes are offline). On a machine with internet run\n"
        f"  {fetch} [--to DIR]\n"
        f"and make that folder visible here as $MEDATTN_WEIGHTS_DIR or $TORCH_HOME/hub/checkpoints "
        f"(or copy {f.url} there); or set model.weights=none or a path")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def adapt_imagenet_state_dict(sd: dict[str, torch.Tensor], arch: str, in_chans: int) -> dict[str, torch.Tensor]:
    """torchvision ImageNet state dict -> medattn trunk state dict (no head).

    Drops the ImageNet classifier, renames DenseNet's old keys, and adapts the stem to
    ``in_chans``: for one channel the RGB kernels are **summed**. A convolution is linear in its
    input channels, so conv(W, [g, g, g]) = conv(W_R + W_G + W_B, g): the summed 1-channel stem
    gives exactly the output the ImageNet stem gives on the gray image replicated to RGB, at a third
    of the stem's input bandwidth. (Exact when the three replicated channels are identical, i.e.
    when the gray image is normalised with one mean/std rather than ImageNet's per-channel ones.)
    """
    _, stem, head = _ARCHS[arch]
    out = {}
    for k, v in sd.items():
        if k.startswith(head):
            continue
        if arch.startswith("densenet"):
            m = _DENSENET_OLD_KEY.match(k)
            if m:
                k = m.group(1) + m.group(2)
        out[k] = v
    if stem not in out:
        raise ConfigError(f"ImageNet state dict for {arch} has no stem weight {stem!r}")
    w = out[stem]
    if in_chans == 1:
        out[stem] = w.sum(dim=1, keepdim=True)
    elif in_chans != w.shape[1]:
        raise ConfigError(f"in_chans={in_chans}: ImageNet weights can initialise a 1- or 3-channel stem only")
    return out


def load_weights(model: nn.Module, weights: str, *, arch: str | None = None) -> None:
    """Load ``weights`` (``imagenet``, ``imagenet_v2`` or a path) into a :class:`ClassifierModel`.

    A path whose file name is torchvision's standard ImageNet name for the architecture (e.g. a copy
    of ``resnet50-0676ba61.pth`` kept elsewhere) is loaded like ``imagenet``; any other path must
    match the model exactly (same keys and shapes, head included).

    Raises:
        ConfigError: missing file, or keys/shapes that do not match (the message lists them).
    """
    # A model built on another's trunk (vgg16_bn_lka) names the architecture whose file it loads.
    arch = arch or getattr(model, "imagenet_arch", None) or getattr(model, "arch", "")
    in_chans = getattr(model, "in_chans", 3)
    if weights in VARIANTS:
        path = find_imagenet(arch, weights)
        sd = adapt_imagenet_state_dict(load_state_dict_file(path), arch, in_chans)
        load_into(model, sd, path, allow_new_modules=True)
        return
    path = Path(weights).expanduser()
    tv_names = {f.filename for f in imagenet_files()} if arch in _ARCHS else set()
    sd = load_state_dict_file(path)
    if path.name in tv_names:
        if not any(path.name == f.filename for f in imagenet_files() if f.arch == arch):
            raise ConfigError(f"model.weights={str(path)!r} is torchvision's file for another architecture, "
                              f"not for {arch}")
        load_into(model, adapt_imagenet_state_dict(sd, arch, in_chans), path, allow_new_modules=True)
    else:
        load_into(model, sd, path, allow_new_modules=False)


# --------------------------------------------------------------------------------------------
# Fetching (the only code in medattn that touches the network)
# --------------------------------------------------------------------------------------------
def offline() -> bool:
    """``MEDATTN_OFFLINE`` is set to a true value: nothing may touch the network."""
    return os.environ.get("MEDATTN_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(names: list[str], to: str | os.PathLike | None = None, *, variant: str = "imagenet",
          mirror: str | None = None, check_hash: bool = True, force: bool = False,
          timeout_s: float = 60.0, log=print) -> list[Path]:
    """Download torchvision ImageNet files for ``names`` (architectures, or ``all``) into ``to``.

    Args:
        names: architectures (``resnet50``) or ``all``.
        to: destination folder (default: the first of :func:`search_dirs`).
        variant: ``imagenet``, ``imagenet_v2`` or ``all``.
        mirror: a URL prefix replacing torchvision's download folder (an institutional mirror).
        check_hash: verify the sha256 prefix in torchvision's file name.
        force: download again even when the file exists.
        timeout_s: socket timeout, so a machine without internet fails fast instead of hanging.

    Returns:
        The paths of the files (downloaded or already present).

    Raises:
        MedattnError: offline mode, no network, HTTP errors or a hash mismatch; nothing partial is left.
    """
    variants = tuple(VARIANTS) if variant == "all" else (variant,)
    files: list[ImagenetFile] = []
    for name in names:
        if name != "all" and name not in _ARCHS:
            _check_timm_name(name)
            files.append(timm_file(name))  # a timm model (never a built-in name: those are torchvision's)
            continue
        archs = list(_ARCHS) if name == "all" else [name]
        for arch in archs:
            for v in variants:
                try:
                    files.append(imagenet_file(arch, v))
                except ConfigError:
                    if name != "all" and variant != "all":
                        raise
    dest = Path(to).expanduser() if to else search_dirs()[0]
    todo = [f for f in files if force or not (dest / f.filename).is_file()]
    for f in files:
        if f not in todo:
            log(f"{f.arch:<12} {f.variant:<12} present     {dest / f.filename}")
    if todo and offline():
        raise MedattnError("MEDATTN_OFFLINE is set: not downloading "
                           + ", ".join(f.filename for f in todo)
                           + ". Unset it on a machine with internet access to fetch.")
    dest.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        for f in todo:
            url = f.url if not mirror else mirror.rstrip("/") + "/" + f.filename
            target = dest / f.filename
            try:
                # Writes to a temporary file in `dest` and renames it when complete (and the hash
                # matches), so an interrupted download never leaves a truncated .pth behind.
                torch.hub.download_url_to_file(url, str(target), hash_prefix=f.hash_prefix if check_hash and f.hash_prefix else None,
                                               progress=sys.stderr.isatty())
            except urllib.error.HTTPError as e:
                raise MedattnError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, socket.gaierror) as e:
                reason = getattr(e, "reason", e)
                raise MedattnError(
                    f"cannot download {url}: {reason}.\nThis machine seems to have no internet access "
                    f"(compute nodes usually have none): run `medattn weights fetch {f.arch}"
                    f"{' --variant ' + f.variant if f.variant != 'imagenet' else ''} --to DIR` on a login node with "
                    f"internet, then point $MEDATTN_WEIGHTS_DIR at DIR (or copy {f.filename} to {target})") from None
            except OSError as e:  # not the network: the destination folder
                raise MedattnError(f"cannot write {target}: {e}") from None
            except RuntimeError as e:  # torch.hub's hash check
                raise MedattnError(f"downloaded {url} but its content is wrong ({e}); nothing was saved") from None
            log(f"{f.arch:<12} {f.variant:<12} downloaded  {target}")
    finally:
        socket.setdefaulttimeout(old_timeout)
    return [dest / f.filename for f in files]


def _check_timm_name(name: str) -> None:
    """A name that is no torchvision architecture must be a timm model (``weights fetch``)."""
    from medattn.models.timm_backbones import timm_arch, timm_module  # noqa: PLC0415 (timm is optional)

    timm = timm_module(name)
    if timm.is_model(timm_arch(name)):
        return
    hint = difflib.get_close_matches(timm_arch(name), list(_ARCHS) + timm.list_models(), n=1)
    raise ConfigError(f"weights fetch={name!r} is not a known model" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                      + f"; torchvision's: {', '.join(_ARCHS)}; or any timm model name (timm.list_models())")


# --------------------------------------------------------------------------------------------
# `medattn weights`
# --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="download torchvision ImageNet files (needs internet)")
    f.add_argument("names", nargs="+", metavar="NAME", help=f"architecture(s): {', '.join(_ARCHS)}, all, or timm model names "
                                                             "(e.g. pvt_v2_b2, convnext_tiny.fb_in1k)")
    f.add_argument("--to", metavar="DIR", help="destination folder (default: $MEDATTN_WEIGHTS_DIR, "
                                                "else $TORCH_HOME/hub/checkpoints)")
    f.add_argument("--variant", default="imagenet", choices=[*VARIANTS, "all"],
                   help="imagenet = IMAGENET1K_V1 (default), imagenet_v2 = IMAGENET1K_V2")
    f.add_argument("--mirror", metavar="URL", help="URL folder to download from instead of download.pytorch.org")
    f.add_argument("--force", action="store_true", help="download again even if the file exists")
    ls = sub.add_parser("list", help="show which ImageNet files are cached and where they are expected")
    ls.add_argument("--dir", metavar="DIR", help="look only in DIR (default: the search folders)")


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        fetch(args.names, args.to, variant=args.variant, mirror=args.mirror, force=args.force)
        return 0
    dirs = [Path(args.dir).expanduser()] if args.dir else search_dirs()
    print("search folders (first match wins):")
    for d in dirs:
        print(f"  {d}")
    print(f"\n{'model':<12} {'weights':<12} {'status':<8} path")
    for f in imagenet_files():
        found = next((d / f.filename for d in dirs if (d / f.filename).is_file()), None)
        if found:
            size = found.stat().st_size / 2**20
            print(f"{f.arch:<12} {f.variant:<12} {'cached':<8} {found} ({size:.1f} MiB)")
        else:
            print(f"{f.arch:<12} {f.variant:<12} {'missing':<8} {dirs[0] / f.filename}")
    return 0
