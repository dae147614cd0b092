"""A prepared directory written directly in the docs/data-format.md layout, without images or
`medattn prepare`: class-specific bright blobs on noise (learnable, with exact boxes).

Used by the runtime tests and by benchmarks on machines that have no dataset (e.g. a GPU node
measuring trainer throughput): ``medattn bench train --fake-data 8192``. It is deliberately a
different generator from ``medattn synth`` (no chest anatomy), so the runtime is also exercised
on data the project did not design.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medattn.data._images import encode
from medattn.data._shards import ShardWriter, record_columns, write_manifest
from medattn.data.prepared import Prepared
from medattn.data.labels import DISEASES, NIH_LABELS


def blob_square(k: int, size: int, classes: int = 4) -> tuple[int, int, int]:
    """(y0, x0, side) of disease k's bright square in a ``size`` px image (also drawn by the
    external-dataset fixtures, :mod:`medattn.data.external_synth`, so a model trained on these
    images finds the same labels there)."""
    cell = size // 4
    if classes <= 4:
        y0 = size // 4 + (k // 2) * (size // 3) - cell // 4
        x0 = size // 6 + (k % 2) * (size // 2)
    else:  # a 4 x 4 grid of cells
        y0 = (k // 4) * cell + cell // 4
        x0 = (k % 4) * cell + cell // 4
    return y0, x0, cell // 2 + 2


def write_fake_prepared(root: Path, n: int = 96, size: int = 64, seed: int = 0, classes: int = 4,
                  splits=(0.6, 0.2, 0.2), shard_size: int = 40, channels: int = 1,
                  lung_boxes: bool = False) -> Path:
    """Images with class-specific bright blobs (class k: a square in a fixed region k).

    Labels: multi-hot over the 15 NIH labels; only the first ``classes`` diseases occur (up to
    14: up to 4 the blobs sit in a 2 x 2 layout, beyond that in a 4 x 4 grid). ``lung_boxes``
    stores one lung box per image (the central 70 %), for methods that need them.

    Written in bounded memory, a few dozen images at a time (uint8 noise drawn in float32 per
    chunk): 16,384 images of 512 px take ~4 GB on disk and ~100 MB of RAM. Labels and boxes come
    from one generator seeded by ``seed``, the noise of image i from one seeded by (seed, i), so the
    data do not depend on how the work is chunked.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((n, len(NIH_LABELS)), np.uint8)
    boxes = []
    squares: list[list[tuple[int, int, int]]] = []  # per image: (y0, x0, side) of each blob
    if not 1 <= classes <= len(DISEASES):
        raise ValueError(f"classes must be in 1..{len(DISEASES)}, got {classes}")
    for i in range(n):
        pos = rng.random(classes) < 0.35
        b, sq = [], []
        for k in np.flatnonzero(pos):
            labels[i, k] = 1
            y0, x0, s = blob_square(k, size, classes)
            sq.append((y0, x0, s))
            b.append({"label": DISEASES[k], "x": x0 / size, "y": y0 / size, "w": s / size, "h": s / size})
        if not pos.any():
            labels[i, -1] = 1
        boxes.append(b)
        squares.append(sq)

    def image(i: int) -> np.ndarray:
        noise = np.random.default_rng([seed, i]).standard_normal((size, size, channels), dtype=np.float32)
        img = (noise * 12 + 60).clip(0, 255).astype(np.uint8)
        for y0, x0, s in squares[i]:
            img[y0:y0 + s, x0:x0 + s, :] = 220
        return img

    patients = np.arange(n) // 2
    up = np.unique(patients)
    order = rng.permutation(len(up))
    cut1, cut2 = int(len(up) * splits[0]), int(len(up) * (splits[0] + splits[1]))
    psplit = {}
    for j, p in enumerate(up[order]):
        psplit[p] = "train" if j < cut1 else ("val" if j < cut2 else "test")
    # Written through the prepared format's one writer (medattn.data._shards), like `medattn prepare`.
    shards, records, shard_of = [], [], []
    for k, s0 in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - s0)
        writer = ShardWriter(root, k, count, "raw", (size, size, channels))
        records += [writer.add(encode(image(i), "raw"), 1024, 1024, "", None) for i in range(s0, s0 + count)]
        shard_of += [k] * count
        shards.append(writer.finish())
    where = record_columns(records, shard_of)
    if lung_boxes:
        where["lung_box"] = [[0.15, 0.15, 0.7, 0.7]] * n
    else:
        del where["lung_box"]  # no lung boxes: the column is absent (PreparedDataset.lung_boxes() is None)
    split_col = [psplit[p] for p in patients]
    # Sex and age per patient and view per image (ChestX-ray14's Data_Entry has them), drawn from
    # their own generator so the labels and pixels of a seed stay what they were.
    demo = np.random.default_rng([seed, 7])
    p_sex = demo.choice(np.array(["F", "M"]), size=len(up))
    p_age = demo.integers(18, 90, size=len(up)).astype(np.float64)
    views = demo.choice(np.array(["PA", "AP"]), size=n, p=[0.6, 0.4])
    write_manifest(root, {
        "index": np.arange(n, dtype=np.int64),
        "image": [f"{p + 1:08d}_{i % 2:03d}.png" for i, p in enumerate(patients)],
        "patient": [str(p + 1) for p in patients],
        "split": split_col,
        "labels": [row.tolist() for row in labels],
        "target": np.full(n, -1, np.int64),
        "finding_labels": ["|".join(NIH_LABELS[j] for j in np.flatnonzero(r)) for r in labels],
        "age": p_age[patients], "sex": p_sex[patients].tolist(), "view": views.tolist(),
        "boxes": boxes,
        **where,
    })
    info = {
        "format_version": 1, "source": {"kind": "test-blobs"}, "task": "multilabel",
        "label_names": list(NIH_LABELS), "eval_labels": list(DISEASES[:classes]),
        "split": "random", "split_seed": seed,
        "counts": pd.Series(split_col).value_counts().to_dict(), "image_size": size, "channels": channels,
        "pixel_format": "raw", "shards": shards, "skipped_missing": 0,
        "conversions": {}, "has_lung_boxes": lung_boxes,
    }
    Prepared(root).write_info(info)
    return root


# ---------------------------------------------------------------------------------------------
# Chest-like images with lung masks (seed 002's tasks, lung segmentation)
# ---------------------------------------------------------------------------------------------
CHEST_FINDINGS = ("No Finding", "Effusion", "Pneumothorax")


def draw_chest(rng: np.random.Generator, size: int, finding: str = "No Finding", marker: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """One chest-like gray image and its lung mask.

    Two dark elliptical lungs (jittered in place and size) in a brighter body on noise. Effusion
    fills the bottom of one lung with bright fluid (the lower half of the lung box);
    pneumothorax darkens the top of one lung behind a bright pleural line (the upper half).
    ``marker`` adds a bright square in the top-left corner, outside the lungs: a shortcut a
    classifier can use instead of the lesion (a "hospital tag" confounder).

    Returns:
        (S, S) uint8 image and (S, S) bool lung mask.
    """
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
    img = 150 + 30 * (yy - 0.5) + rng.normal(0, 8, (s, s))
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.5) ** 2 <= 1
    img[~body] = 40 + rng.normal(0, 5, (~body).sum())
    mask = np.zeros((s, s), bool)
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.16, 0.2)
        cy = rng.uniform(0.46, 0.52)
        rx, ry = rng.uniform(0.11, 0.14), rng.uniform(0.24, 0.3)
        lung = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        mask |= lung
        lungs.append((lung, cy, ry))
    img[mask] = 70 + rng.normal(0, 8, mask.sum())
    if finding != "No Finding":
        lung, cy, ry = lungs[int(rng.integers(0, 2))]
        if finding == "Effusion":
            level = cy + ry * rng.uniform(0.35, 0.55)  # fluid below this row
            fl = lung & (yy >= level)
            img[fl] = rng.uniform(105, 150) + rng.normal(0, 8, fl.sum())
        elif finding == "Pneumothorax":
            level = cy - ry * rng.uniform(0.4, 0.55)
            pt = lung & (yy <= level)
            img[pt] = 15 + rng.normal(0, 4, pt.sum())
            edge = lung & (np.abs(yy - level) <= 1.5 / s)
            img[edge] = 210
        else:
            raise ValueError(f"draw_chest: unknown finding {finding!r} (have {CHEST_FINDINGS})")
    if marker:
        m = max(3, s // 8)
        img[2:2 + m, 2:2 + m] = 245
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_fake_chest_folder(root: Path, *, classes: tuple[str, ...] = ("No Finding", "Effusion"),
                            counts: dict[str, int] | None = None, size: int = 64, seed: int = 0,
                            marker: float = 0.0, folder_names: dict[str, str] | None = None) -> Path:
    """Write chest-like PNGs in seed 002's class-folder layout plus their lung masks.

    ``root/images/{train,val,test}/<folder>/<id>.png`` (one image per patient, NIH-style ids
    ``PPPPPPPP_000.png``) and ``root/masks/<id>.png`` (255 = lung). ``medattn prepare --layout
    imagefolder --root ROOT/images --masks ROOT/masks`` reads it.

    Args:
        classes: findings (:data:`CHEST_FINDINGS`), in class order.
        counts: images per class and split (default train 24, val 8, test 8).
        size: image side in pixels.
        seed: generator seed.
        marker: probability that an image of a *disease* class carries the corner marker.
        folder_names: class -> folder name (default: the seed's ``0NoFinding``, ``1Effusion``, ...).
    """
    from PIL import Image

    counts = counts or {"train": 24, "val": 8, "test": 8}
    folder_names = folder_names or {c: f"{i}{c.replace(' ', '')}" for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    patient = 0
    for split in ("train", "val", "test"):
        for c in classes:
            d = root / "images" / split / folder_names[c]
            d.mkdir(parents=True, exist_ok=True)
            for _ in range(counts[split]):
                patient += 1
                name = f"{patient:08d}_000.png"
                img, mask = draw_chest(rng, size, c, marker=c != "No Finding" and rng.random() < marker)
                Image.fromarray(img).save(d / name)
                Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name)
    return root
