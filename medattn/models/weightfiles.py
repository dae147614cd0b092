"""Weight files on disk, for every backbone (torchvision's and timm's): where they are looked for,
how a state dict is read, and how it is loaded into a model with an error naming each key that
does not fit. The lowest module of the weights: :mod:`medattn.models.weights` (torchvision's
ImageNet files, ``medattn weights``) and :mod:`medattn.models.timm_backbones` build on it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from medattn.errors import ConfigError
from medattn.safeload import UnreadableFileError, UnsafeFileError, load_plain


def search_dirs() -> list[Path]:
    """Folders searched for ImageNet files, in order (see the module docstring)."""
    dirs = []
    if os.environ.get("MEDATTN_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["MEDATTN_WEIGHTS_DIR"]).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``: plain, or a checkpoint dict with a ``model`` (or
    ``state_dict``) entry; ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped.

    Raises:
        ConfigError: missing or unreadable file, or no state dict inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={str(path)!r}: file not found")
    try:
        # weights_only: a weights file from elsewhere must not be able to run code on loading.
        obj = load_plain(path)
    except UnsafeFileError as e:
        raise ConfigError(f"model.weights={str(path)!r}: refused: {e}") from None
    except UnreadableFileError as e:
        raise ConfigError(f"model.weights={str(path)!r}: unreadable ({e}); "
                          "a truncated download? delete it and fetch it again") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.weights={str(path)!r}: not a state dict (expected a mapping of names to "
                          "tensors, or a checkpoint with a 'model' entry)")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def key_problems(groups) -> list[str]:
    """``[(what, keys), ...]`` -> one phrase per non-empty group, naming at most 5 keys: the
    message of a state dict that does not fit a model (weight files here, ``init_from`` in hpc)."""
    parts = []
    for what, keys in groups:
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    return parts


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, *, allow_new_modules: bool) -> None:
    """Load ``sd`` into ``model``, or raise a ConfigError naming the keys that do not fit.

    ``allow_new_modules``: a file of the model's trunk (an ImageNet file) lacks the modules the
    model adds to it (the head, attention blocks); those start from their own initialisation. A
    module is new when the file has none of its tensors, so a module the file holds only in part
    is still named. (Derived from the file, so a new model declares nothing for this.)
    """
    own = model.state_dict()
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if allow_new_modules:
        in_file = {k.rpartition(".")[0] for k in sd}
        missing = [k for k in missing if k.rpartition(".")[0] in in_file]
    unexpected = [k for k in sd if k not in own]
    parts = key_problems((("shape mismatch", shapes), ("missing from the file", missing),
                          ("not in the model", unexpected)))
    if parts:
        arch = getattr(model, "arch", type(model).__name__)
        raise ConfigError(f"model.weights={str(path)!r} does not fit model {arch} "
                          f"(in_chans={getattr(model, 'in_chans', '?')}, "
                          f"num_classes={getattr(model, 'num_classes', '?')}): "
                          + "; ".join(parts))
    model.load_state_dict(sd, strict=False)
