"""Work reuse: trials that differ only in later stages share one trained prefix.

A trial's stages run in order and each starts from the previous stage's best checkpoint, so if
no swept parameter can change stages 1..k, those stages are the same for every trial. They are
trained once, in a *base* run ``DIR/base/<hash>``, and each trial's run directory is seeded with
the base's checkpoints of those stages (hard links when possible), their epoch records and a
state that marks them done, plus the trial's own resolved config (:meth:`hpc.run.Run.seed_from`).
The trainer then skips the done stages and initialises the next one from the seeded weights.

Which stage a swept key first affects is the method's knowledge (``Method.key_effect``):

==============================  ==========================================================
``stages.<s>.*``                stage s (and so every later stage)
``stages.*.*``                  the first stage
``agcnn.*``                     AG-CNN's first stage after ``global`` (the global stage
                                never looks at the attention settings); except
                                ``agcnn.local_backbone``: the first stage, because the
                                model built in the global stage holds the local branch
``focal.*``                     the first stage whose loss is (or may be swept to) focal
anything else                   the first stage (model, data, seed, runtime: no sharing)
==============================  ==========================================================

The base's directory name is a hash of everything that can change the shared stages (the
"prefix-relevant" config): the config without cosmetic runtime keys, with only the prefix
stages, without the method's keys the prefix does not read, plus the prepared data's path.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hpc.run import Run
from medattn.config import Config
from medattn.methods import method_class
from sweeps.space import SearchSpace, focal_stages

# Runtime keys that change logging only, never the numbers a stage produces.
_COSMETIC_RUNTIME = ("log_every", "progress", "tensorboard", "dist_timeout_s", "ckpt_every_steps")


def first_affected_stage(cfg: Config, key: str, space: SearchSpace | None = None) -> int:
    """Index (in ``cfg.stage_names()``) of the first stage whose training ``key`` can change
    (the method decides: :meth:`medattn.methods.base.Method.key_effect`)."""
    names = cfg.stage_names()
    stages, _ = method_class(cfg.method).key_effect(cfg, key, focal_stages(cfg, space))
    return names.index(stages[0]) if stages else len(names)


def shared_prefix(cfg: Config, space: SearchSpace) -> list[str]:
    """The leading stages that no swept parameter can change (possibly none)."""
    names = cfg.stage_names()
    first = min([first_affected_stage(cfg, k, space) for k in space.keys()] + [len(names)])
    # Never share the whole run: a trial must train something.
    return names[:min(first, len(names) - 1)]


def prefix_relevant(cfg: Config, prefix: list[str], data: str | os.PathLike) -> dict[str, Any]:
    """What determines the prefix stages' weights (hashed into the base run's name): the config
    without cosmetic runtime keys, only the prefix stages, and of the method's sections only
    the keys that can change a prefix stage."""
    method = method_class(cfg.method)
    d = cfg.to_dict()
    d.pop("name", None)
    d["runtime"] = {k: v for k, v in d["runtime"].items() if k not in _COSMETIC_RUNTIME}
    d["stages"] = {s: d["stages"][s] for s in prefix}  # dict order = stage order
    for section in cfg.sections:
        kept = {k: v for k, v in d[section].items()
                if set(method.key_effect(cfg, f"{section}.{k}")[0]) & set(prefix)}
        if kept:
            d[section] = kept
        else:
            d.pop(section)
    d["_data"] = str(Path(data).resolve())
    return d


def base_hash(cfg: Config, prefix: list[str], data: str | os.PathLike) -> str:
    blob = json.dumps(prefix_relevant(cfg, prefix, data), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_dir(sweep_dir: str | os.PathLike, cfg: Config, prefix: list[str], data: str | os.PathLike) -> Path:
    return Path(sweep_dir) / "base" / base_hash(cfg, prefix, data)


def seed_trial(base: str | os.PathLike, run_dir: str | os.PathLike, prefix: list[str], cfg: Config) -> bool:
    """Prepare a trial's run directory from the base run (:meth:`hpc.run.Run.seed_from`); returns
    False if it was seeded already."""
    return Run(run_dir).seed_from(Run(base), prefix, cfg)
