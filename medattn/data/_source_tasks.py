"""Seed 002's task subsets of ChestX-ray14 (``medattn prepare --task ...``), as its
``data/data_prepare.py`` builds them, made patient-disjoint and reproducible:

* only **single-label** images: ``Finding Labels`` is exactly one of the task's diseases or
  ``No Finding``;
* disease images are split 60/20/20 (train/val/test, by image count) over a seeded permutation
  of their **patients** (the published code splits in CSV order and then swaps a few images by
  hand to remove patient overlaps);
* for the three-class task, each split's Effusion images are sampled down to its Pneumothorax
  count (as published);
* ``No Finding`` images come from patients who have no image with any of the task's diseases,
  split 60/20/20 by patient, and are sampled 1:1 to the disease count of each split (per class
  count for the three-class task);
* classes in the published folder order: 0 = No Finding, 1 = Effusion (or Pneumothorax),
  2 = Pneumothorax.

Every choice is a NumPy generator seeded with ``--split-seed`` over sorted ids, so the subset is
the same on every machine and Python run (the published ``random.sample`` over ``set``s depends
on PYTHONHASHSEED). The subset is drawn from the full metadata; images missing from disk are an
error, or with ``--allow-missing`` are left out after the draw (so a partial download keeps the
selection of the complete one).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medattn.data._sources import NIH_SIZE, SPLITS, SourceTable, normalised_boxes, order_records, resolve_mask_dir
from medattn.errors import DataError

TASKS: dict[str, tuple[str, ...]] = {
    "nf_effusion": ("No Finding", "Effusion"),
    "nf_pneumothorax": ("No Finding", "Pneumothorax"),
    "nf_effusion_pneumothorax": ("No Finding", "Effusion", "Pneumothorax"),
}
FRACTIONS = (0.6, 0.2, 0.2)


def _split_patients(patients: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> dict[Any, str]:
    """Seeded patient permutation, cut where the cumulative weight (images) passes 60 % and 80 %."""
    order = rng.permutation(len(patients))
    cum = np.cumsum(weights[order]) / max(1, weights.sum())
    cuts = np.cumsum(FRACTIONS)[:2]
    # A patient goes to the part in which its first image falls.
    start = cum - weights[order] / max(1, weights.sum())
    part = np.searchsorted(cuts, start, side="right")
    return {patients[order[i]]: SPLITS[min(int(part[i]), 2)] for i in range(len(order))}


def _sample(rng: np.random.Generator, items: list[str], n: int) -> list[str]:
    if n >= len(items):
        return list(items)
    pick = rng.choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(pick)]


def select_task(entries: pd.DataFrame, task: str, seed: int = 0) -> pd.Series:
    """The images of ``task`` and their split (image id -> train|val|test), from NIH metadata.

    Args:
        entries: ``load_nih(root).entries`` (image, patient, labels, ...).
        task: a key of :data:`TASKS`.
        seed: the split/sampling seed.
    """
    if task not in TASKS:
        from medattn.errors import ConfigError

        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    classes = TASKS[task]
    diseases = classes[1:]
    rng = np.random.default_rng(seed)
    e = entries.sort_values("image", kind="stable")
    labels = e["labels"].tolist()
    single = np.array([len(v) == 1 and v[0] in classes for v in labels])
    first = np.array([v[0] if len(v) else "" for v in labels])
    any_disease = np.array([any(d in v for d in diseases) for v in labels])
    images = e["image"].to_numpy().astype(str)
    patients = e["patient"].to_numpy()

    # --- disease images: one patient split over all the task's diseases (a patient with an
    # Effusion-only and a Pneumothorax-only image must not end up in two parts)
    dis = single & np.isin(first, diseases)
    d_pat, d_cnt = np.unique(patients[dis], return_counts=True)
    p_split = _split_patients(d_pat, d_cnt, rng)
    chosen: dict[str, str] = {}
    per_split: dict[str, dict[str, list[str]]] = {s: {d: [] for d in diseases} for s in SPLITS}
    for im, pt, lab in zip(images[dis], patients[dis], first[dis]):
        per_split[p_split[pt]][lab].append(im)
    counts: dict[str, int] = {}
    for s in SPLITS:
        if len(diseases) == 2:  # published: Effusion sampled to the Pneumothorax count
            eff, ptx = per_split[s][diseases[0]], per_split[s][diseases[1]]
            per_split[s][diseases[0]] = _sample(rng, eff, len(ptx))
        for d in diseases:
            for im in per_split[s][d]:
                chosen[im] = s
        counts[s] = max(len(per_split[s][d]) for d in diseases)

    # --- No Finding images from patients without any of the task's diseases
    sick = set(patients[any_disease].tolist())
    nf = single & (first == "No Finding") & ~np.isin(patients, list(sick))
    n_pat, n_cnt = np.unique(patients[nf], return_counts=True)
    order = rng.permutation(len(n_pat))
    cuts = np.floor(np.cumsum(FRACTIONS)[:2] * len(n_pat)).astype(int)
    nf_split = {n_pat[i]: SPLITS[int(np.searchsorted(cuts, k, side="right"))] for k, i in enumerate(order)}
    nf_by: dict[str, list[str]] = {s: [] for s in SPLITS}
    for im, pt in zip(images[nf], patients[nf]):
        nf_by[nf_split[pt]].append(im)
    for s in SPLITS:
        pick = _sample(rng, nf_by[s], counts[s])
        if len(pick) < counts[s]:
            print(f"medattn prepare: warning: task {task}: only {len(pick)} No Finding images for the "
                  f"{counts[s]} disease images of split {s}", file=sys.stderr)
        for im in pick:
            chosen[im] = s
    return pd.Series(chosen, dtype="string").sort_index()


def task_table(root: str | Path, task: str, *, split_seed: int = 0, allow_missing: bool = False,
               masks: str | Path | None = None) -> SourceTable:
    """The source table of a seed-002 task subset of an NIH root (module docstring).

    Args:
        root: the NIH root (metadata + images).
        task: ``nf_effusion``, ``nf_pneumothorax`` or ``nf_effusion_pneumothorax``.
        split_seed: seed of the patient split and of the sampling.
        allow_missing: leave out selected images whose file is missing (counted) instead of failing.
        masks: a lung-mask directory (``<image id>`` files); default ``root/masks`` if present.
    """
    from medattn.data.nih import find_images, load_nih

    root = Path(root)
    meta = load_nih(root)
    entries = meta.entries.reset_index(drop=True)
    split = select_task(entries, task, split_seed)
    classes = list(TASKS[task])
    files = find_images(root)
    meta_file = Path(getattr(meta, "entries_path", "") or "Data_Entry_2017.csv").name
    sel = entries[entries["image"].isin(split.index)].copy()
    present = sel["image"].map(lambda i: i in files).to_numpy(dtype=bool)
    if (~present).any() and not allow_missing:
        r = sel[~present].iloc[0]
        raise DataError(root, f"{int((~present).sum())} of the {len(sel)} images of task {task} are missing, e.g. "
                              f"{r['image']} ({meta_file} row {r['source_row']}); pass --allow-missing to prepare "
                              "the images that are present")
    skipped = int((~present).sum())
    sel = sel[present]
    mask_dir = resolve_mask_dir(root, masks)
    boxes = normalised_boxes(meta)
    target = [classes.index(v[0]) for v in sel["labels"]]
    onehot = [np.eye(len(classes), dtype=np.uint8)[t] for t in target]

    def _opt(v: Any) -> str | None:
        return None if v is None or (isinstance(v, float) and np.isnan(v)) or pd.isna(v) else str(v)

    mask_paths = []
    for img in sel["image"]:
        mp = mask_dir / img if mask_dir is not None else None
        mask_paths.append(str(mp) if mp is not None and mp.is_file() else None)
    records = pd.DataFrame({
        "image": sel["image"].astype(str).tolist(),
        "path": [str(files[i]) for i in sel["image"]],
        "patient": [str(int(p)) for p in sel["patient"]],
        "split": [str(split[i]) for i in sel["image"]],
        "labels": onehot,
        "target": target,
        "finding_labels": [classes[t] for t in target],
        "age": sel["age"].astype("float64").to_numpy(),
        "sex": [_opt(v) for v in sel["sex"]],
        "view": [_opt(v) for v in sel["view"]],
        "boxes": [boxes.get(i, []) for i in sel["image"]],
        "mask_path": mask_paths,
        "ref": [f"{meta_file} row {int(r)}" for r in sel["source_row"]],
    })
    records = order_records(records)
    return SourceTable(
        records=records,
        label_names=classes,
        eval_labels=[classes[1]] if len(classes) == 2 else classes,
        task="singlelabel",
        channels=1,
        expected_size=NIH_SIZE,
        source={"kind": "nih", "root": str(root.resolve()), "metadata": meta_file,
                "variant": getattr(meta, "variant", None), "task": task},
        split="task",
        split_seed=split_seed,
        skipped_missing=skipped,
        has_masks=mask_dir is not None,
        settings={"task": task, "masks": None if mask_dir is None else str(mask_dir.resolve())},
    )
