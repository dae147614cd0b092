"""A prepared directory written directly in the docs/data-format.md layout, without images or
`medattn prepare`: class-specific bright blobs on noise (learnable, with exact boxes).

Used by the runtime tests and by benchmarks on machines that have no dataset (e.g. a GPU node
measuring trainer throughput): ``medattn bench train --fake-data 8192``. It is deliberately a
different generator from ``medattn synth`` (no chest anatomy), so the runtime is also exercised
on data the project did not design.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from medattn.data.labels import DISEASES, NIH_LABELS


def write_fake_prepared(root: Path, n: int = 96, size: int = 64, seed: int = 0, classes: int = 4,
                  splits=(0.6, 0.2, 0.2), shard_size: int = 40, channels: int = 1) -> Path:
    """Images with class-specific bright blobs (class k: a square in a fixed region k).

    Labels: multi-hot over the 15 NIH labels; only the first ``classes`` diseases occur.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    labels = np.zeros((n, len(NIH_LABELS)), np.uint8)
    imgs = (rng.normal(60, 12, (n, size, size, channels))).clip(0, 255).astype(np.uint8)
    boxes = []
    cell = size // 4
    for i in range(n):
        pos = rng.random(classes) < 0.35
        b = []
        for k in np.flatnonzero(pos):
            labels[i, k] = 1
            r, c = divmod(k, 4)
            y0 = (r * 2 + 1) * cell // 2 if classes <= 4 else (k // 4) * cell
            x0 = (k % 4) * cell + cell // 4
            y0 = size // 4 + (k // 2) * (size // 3) - cell // 4
            x0 = size // 6 + (k % 2) * (size // 2)
            s = cell // 2 + 2
            imgs[i, y0:y0 + s, x0:x0 + s, :] = 220
            b.append({"label": DISEASES[k], "x": x0 / size, "y": y0 / size, "w": s / size, "h": s / size})
        if not pos.any():
            labels[i, -1] = 1
        boxes.append(b)
    patients = np.arange(n) // 2
    up = np.unique(patients)
    order = rng.permutation(len(up))
    cut1, cut2 = int(len(up) * splits[0]), int(len(up) * (splits[0] + splits[1]))
    psplit = {}
    for j, p in enumerate(up[order]):
        psplit[p] = "train" if j < cut1 else ("val" if j < cut2 else "test")
    shards, shard_col, slot_col, off_col = [], [], [], []
    nbytes = size * size * channels
    for s0 in range(0, n, shard_size):
        k = len(shards)
        arr = imgs[s0:s0 + shard_size]
        path = root / "shards" / f"pixels-{k:05d}.npy"
        np.save(path, arr)
        header = path.stat().st_size - arr.nbytes
        shards.append({"path": f"shards/pixels-{k:05d}.npy", "count": len(arr)})
        for j in range(len(arr)):
            shard_col.append(k)
            slot_col.append(j)
            off_col.append(header + j * nbytes)
    df = pd.DataFrame({
        "index": np.arange(n, dtype=np.int64),
        "image": [f"{p + 1:08d}_{i % 2:03d}.png" for i, p in enumerate(patients)],
        "patient": [str(p + 1) for p in patients],
        "split": [psplit[p] for p in patients],
        "labels": [row.tolist() for row in labels],
        "target": np.full(n, -1, np.int64),
        "finding_labels": ["|".join(NIH_LABELS[j] for j in np.flatnonzero(r)) for r in labels],
        "boxes": boxes,
        "shard": np.array(shard_col, np.int32),
        "slot": np.array(slot_col, np.int64),
        "offset": np.array(off_col, np.int64),
        "nbytes": np.full(n, nbytes, np.int64),
        "orig_width": np.full(n, 1024, np.int32),
        "orig_height": np.full(n, 1024, np.int32),
        "conversion": [""] * n,
    })
    df.to_parquet(root / "manifest.parquet", index=False)
    info = {
        "format_version": 1, "source": {"kind": "test-blobs"}, "task": "multilabel",
        "label_names": list(NIH_LABELS), "eval_labels": list(DISEASES[:classes]),
        "split": "random", "split_seed": seed,
        "counts": df["split"].value_counts().to_dict(), "image_size": size, "channels": channels,
        "pixel_format": "raw", "shards": shards, "skipped_missing": 0,
        "conversions": {}, "has_lung_boxes": False,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=1))
    return root
