"""Work reuse: trials that differ only in later stages share one trained prefix.

A trial's stages run in order and each starts from the previous stage's best checkpoint, so if
no swept parameter can change stages 1..k, those stages are the same for every trial. They are
trained once, in a *base* run ``DIR/base/<hash>``, and each trial's run directory is seeded with
the base's ``ckpt/<stage>/{best,last}.pt`` (hard links when possible), its metrics.jsonl records
and a state.json that marks those stages done, plus the trial's own resolved config.yaml. The
trainer then skips the done stages and initialises the next one from the seeded best.pt.

Which stage a swept key first affects (stage order from the config):

==============================  ==========================================================
``stages.<s>.*``                stage s (and so every later stage)
``stages.*.*``                  the first stage
``agcnn.*``                     AG-CNN's first stage after ``global`` (the global stage
                                never looks at the attention settings); except
                                ``agcnn.local_backbone``: the first stage, because the
                                model built in the global stage holds the local branch
``focal.*``                     the first stage whose loss is (or may be swept to) focal
anything else                   the first stage (model, data, seed, runtime, method
                                sections of other methods: no sharing)
==============================  ==========================================================

The base's directory name is a hash of everything that can change the shared stages (the
"prefix-relevant" config): the config without cosmetic runtime keys, with only the prefix
stages, without method sections the prefix does not read, plus the prepared data's path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from medattn.config import Config, save_config
from sweeps.space import SearchSpace, focal_stages

# Runtime keys that change logging only, never the numbers a stage produces.
_COSMETIC_RUNTIME = ("log_every", "progress", "tensorboard", "dist_timeout_s", "ckpt_every_steps")


def first_affected_stage(cfg: Config, key: str, space: SearchSpace | None = None) -> int:
    """Index (in ``cfg.stage_names()``) of the first stage whose training ``key`` can change."""
    names = cfg.stage_names()
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        return 0 if parts[1] == "*" else names.index(parts[1])
    if parts[0] == "agcnn" and cfg.method == "agcnn" and key != "agcnn.local_backbone":
        later = [i for i, s in enumerate(names) if s != "global"]
        return later[0] if later else len(names)
    if parts[0] == "focal":
        fs = focal_stages(cfg, space)
        return names.index(fs[0]) if fs else len(names)
    return 0


def shared_prefix(cfg: Config, space: SearchSpace) -> list[str]:
    """The leading stages that no swept parameter can change (possibly none)."""
    names = cfg.stage_names()
    first = min([first_affected_stage(cfg, k, space) for k in space.keys()] + [len(names)])
    # Never share the whole run: a trial must train something.
    return names[:min(first, len(names) - 1)]


def prefix_relevant(cfg: Config, prefix: list[str], data: str | os.PathLike) -> dict[str, Any]:
    """What determines the prefix stages' weights (hashed into the base run's name)."""
    d = cfg.to_dict()
    d.pop("name", None)
    d["runtime"] = {k: v for k, v in d["runtime"].items() if k not in _COSMETIC_RUNTIME}
    d["stages"] = {s: d["stages"][s] for s in prefix}  # dict order = stage order
    if cfg.method == "agcnn":
        d["agcnn"] = {"local_backbone": d["agcnn"]["local_backbone"]}
    for section, methods in (("agcnn", ("agcnn",)), ("dualattendmed", ("dualattendmed",)),
                             ("gradcam_loss", ("gradcam_loss",)), ("lka", ("vgg_lka",))):
        if cfg.method not in methods:
            d.pop(section, None)
    if not any(cfg.stages[s].loss == "focal" for s in prefix):
        d.pop("focal", None)
    d["_data"] = str(Path(data).resolve())
    return d


def base_hash(cfg: Config, prefix: list[str], data: str | os.PathLike) -> str:
    blob = json.dumps(prefix_relevant(cfg, prefix, data), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_dir(sweep_dir: str | os.PathLike, cfg: Config, prefix: list[str], data: str | os.PathLike) -> Path:
    return Path(sweep_dir) / "base" / base_hash(cfg, prefix, data)


def stages_done(run_dir: str | os.PathLike, stages: list[str]) -> bool:
    p = Path(run_dir) / "state.json"
    if not p.is_file():
        return False
    try:
        st = json.loads(p.read_text()).get("stages", {})
    except (OSError, json.JSONDecodeError):
        return False
    return all(st.get(s, {}).get("done") for s in stages)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.seed{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)  # checkpoints are replaced by rename, never written in place
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def seed_trial(base: str | os.PathLike, run_dir: str | os.PathLike, prefix: list[str], cfg: Config) -> bool:
    """Prepare a trial's run directory from the base run; returns False if it was seeded already.

    config.yaml is written last, so an interrupted seeding is simply redone.
    """
    base, run_dir = Path(base), Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for s in prefix:
        for kind in ("best", "last"):
            src = base / "ckpt" / s / f"{kind}.pt"
            if src.is_file():
                _link_or_copy(src, run_dir / "ckpt" / s / f"{kind}.pt")
    base_state = json.loads((base / "state.json").read_text())["stages"]
    state = {"stages": {s: dict(base_state[s], shared_from=str(base)) for s in prefix}}
    (run_dir / "state.json").write_text(json.dumps(state, indent=2))
    recs = []
    if (base / "metrics.jsonl").is_file():
        for line in (base / "metrics.jsonl").read_text().splitlines():
            try:
                if json.loads(line).get("stage") in prefix:
                    recs.append(line)
            except json.JSONDecodeError:
                continue
    (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in recs))
    if (base / "provenance.json").is_file():
        shutil.copy2(base / "provenance.json", run_dir / "provenance.json")
    save_config(cfg, run_dir / "config.yaml")
    return True
