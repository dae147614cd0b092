"""Heat-map overlays for chosen images: image | attention heat map | overlay with the attention
box and ground-truth boxes | the crop AG-CNN's local branch sees. One PNG per image.

  medattn viz --run runs/r50 --images 00000013_005.png,00000032_001.png
  medattn viz --run runs/r50 --images ids.txt --classes Effusion,Mass
  medattn viz --run runs/r50 --images /data/nih/images/0000*.png --out figs/

--images takes image ids of the run's prepared manifest, text files with one id (or path) per
line, or image files (PNG/JPEG; decoded, converted to gray and resized like `medattn prepare`
does). Ground truth for an image file comes from the prepared manifest when its name is there,
else from the NIH metadata shipped with medattn (labels and BBox_List_2017 boxes).
--classes prints those classes' probabilities on each figure and draws only their boxes.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medattn.boxes import records_xyxy
from medattn.errors import DataError, MedattnError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
NIH_ID = re.compile(r"^\d{8}_\d{3}\.png$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by medattn train")
    p.add_argument("--images", required=True, nargs="+", metavar="FILE_OR_IDS",
                   help="comma-separated image ids of the prepared manifest, text files with one id or path per "
                        "line, or image files (PNG/JPEG)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="annotate these classes' probabilities and draw only their boxes (comma-separated or "
                        "several arguments)")
    p.add_argument("--out", default=None, help="output directory (default RUN/viz)")
    p.add_argument("--data", default=None, help="prepared directory (default: the one the run was trained on)")
    p.add_argument("--stage", default=None, help="use the model as of this stage (default: the last finished)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of the stage")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNGs")


@dataclass
class Target:
    """One image to draw: a manifest sample or an image file."""

    name: str
    index: int | None = None
    path: Path | None = None
    pixels: np.ndarray | None = None
    truth: list[str] = field(default_factory=list)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    truth_source: str = ""


def _tokens(items: list[str]) -> list[tuple[str, Path | None, int | None]]:
    """(token, list file it came from, line) for every id/path in ``items``."""
    out: list[tuple[str, Path | None, int | None]] = []
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
            try:
                lines = p.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(p, f"cannot read the list of images: {e}") from None
            for k, line in enumerate(lines, start=1):
                tok = line.strip()
                if tok and not tok.startswith("#"):
                    out.append((tok, p, k))
            continue
        out += [(t.strip(), None, None) for t in item.split(",") if t.strip()]
    if not out:
        raise MedattnError("--images names no image")
    return out


def resolve_targets(items: list[str], ds: Any) -> list[Target]:
    """Turn --images arguments into targets; every unknown id or unreadable file is an error
    naming it (and the list file and line it came from)."""
    ids = {str(v): i for i, v in enumerate(ds.manifest["image"].to_numpy())}
    from medattn.data.prepared import Prepared

    manifest = Prepared(ds.root).manifest_path
    targets: list[Target] = []
    for tok, src, line in _tokens(items):
        key = tok if tok in ids else (tok + ".png" if tok + ".png" in ids else None)
        path = Path(tok)
        if key is not None and "/" not in tok:
            targets.append(Target(key, index=ids[key]))
        elif path.is_file():
            targets.append(Target(path.name, path=path))
        else:
            raise DataError(src, f"{tok!r} is neither an image id of {manifest} nor an existing image file",
                            row=line)
    return targets


def resolve_classes(classes: list[str] | None, label_names: list[str]) -> list[str] | None:
    """Canonical class names for --classes (case, space and underscore insensitive)."""
    if not classes:
        return None
    norm = {re.sub(r"[\s_]+", "", n).lower(): n for n in label_names}
    out = []
    for item in classes:
        for c in (t.strip() for t in item.split(",")):
            if not c:
                continue
            name = norm.get(re.sub(r"[\s_]+", "", c).lower())
            if name is None and c.lower() == "infiltrate":
                name = norm.get("infiltration")
            if name is None:
                raise MedattnError(f"--classes: unknown class {c!r}; this run's classes are {', '.join(label_names)}")
            if name not in out:
                out.append(name)
    return out


_NIH_CACHE: dict[str, Any] = {}


def _nih_truth(names: list[str]) -> tuple[dict[str, list[str]], dict[str, list[dict[str, Any]]]]:
    """Labels and normalised boxes from the NIH metadata shipped with medattn, for NIH ids."""
    wanted = [n for n in names if NIH_ID.match(n)]
    if not wanted:
        return {}, {}
    from medattn.data import nih

    if "entries" not in _NIH_CACHE:
        d = nih.bundled_nih_dir()
        _NIH_CACHE["entries"] = nih.read_data_entry(d / "Data_Entry_2017_v2020.csv.gz")[0].set_index("image")
        _NIH_CACHE["boxes"] = nih.read_bbox_list(d / "BBox_List_2017.csv.gz")
    ent, bx = _NIH_CACHE["entries"], _NIH_CACHE["boxes"]
    labels = {n: list(ent.at[n, "labels"]) for n in wanted if n in ent.index}
    boxes: dict[str, list[dict[str, Any]]] = {}
    s = float(nih.IMAGE_SIZE)  # boxes are in the pixel space of the 1024 x 1024 PNG
    for r in bx[bx["image"].isin(wanted)].itertuples():
        boxes.setdefault(r.image, []).append({"label": r.label, "x": r.x / s, "y": r.y / s, "w": r.w / s,
                                              "h": r.h / s})
    return labels, boxes


def visualize(run: str | Path, images: list[str], classes: list[str] | None = None, out: str | Path | None = None,
              data: str | None = None, stage: str | None = None, checkpoint: str = "best", device: str = "cpu",
              dpi: int = 110, log=print) -> list[Path]:
    """Write one overlay PNG per image; returns the paths. All inputs are checked (and image files
    decoded) before the first figure is written.

    Args:
        run: the run directory. images: --images arguments (ids, list files, image files).
        classes: --classes arguments. out: output directory (default RUN/viz).
        data: prepared directory (default: the run's). stage, checkpoint: which model.
        device: torch device. dpi: PNG resolution. log: where progress lines go.
    """
    from hpc import overlays as O
    from hpc.inference import load_model, predict_images, read_pixels
    from hpc.report.collect import data_dir_of
    from medattn.data.prepared import PreparedDataset
    from hpc.run import Run

    r = Run(run).require()
    run = r.root
    data_dir = data_dir_of(r, data)
    if data_dir is None:
        raise DataError(r.provenance_path, "cannot tell which prepared data the run used; pass --data")
    lm = load_model(run, stage, checkpoint, device, data=data_dir,
                    overrides=["runtime.device=cpu"] if str(device) == "cpu" else None)
    ds = PreparedDataset.open(data_dir)
    names = list(lm.spec.label_names)
    chosen = resolve_classes(classes, names)
    targets = resolve_targets(images, ds)
    manifest_ids = {str(v): i for i, v in enumerate(ds.manifest["image"].to_numpy())}
    labels = ds.labels_matrix()
    files = [t for t in targets if t.path is not None]
    nih_labels, nih_boxes = _nih_truth([t.name for t in files if t.name not in manifest_ids])
    for t in targets:
        if t.path is not None:
            t.pixels = read_pixels(t.path, ds.image_size, ds.channels)
            if t.name in manifest_ids:  # a file of the run's own dataset: its manifest truth
                t.index = manifest_ids[t.name]
            elif t.name in nih_labels:
                t.truth = [c for c in nih_labels[t.name] if c != "No Finding"] or ["No Finding"]
                t.boxes = nih_boxes.get(t.name, [])
                t.truth_source = "NIH metadata"
        if t.index is not None:
            t.truth = [names[j] for j in np.flatnonzero(labels[t.index] > 0)]
            t.boxes = ds.boxes(t.index)
            t.truth_source = "manifest"
            if t.pixels is None:
                t.pixels = ds.read(t.index)
    preds = predict_images(lm, np.stack([t.pixels for t in targets]))
    if preds and preds[0].heatmap is None:
        raise MedattnError(f"method {lm.cfg.method!r} gives no attention heat map to draw")
    out_dir = Path(out) if out else r.viz_dir
    written: list[Path] = []
    used: set[str] = set()
    eval_labels = list(lm.spec.eval_labels)
    for t, pred in zip(targets, preds):
        stem = Path(t.name).stem
        fname, k = f"{stem}.png", 2
        while fname in used:
            fname, k = f"{stem}_{k}.png", k + 1
        used.add(fname)
        gt, gl = records_xyxy(t.boxes, chosen)
        show = chosen or O.top_classes(pred, names, eval_labels)
        if chosen:
            probs = "; ".join(f"{c}: " + " / ".join(f"{b} {pred.probs[b][names.index(c)]:.2f}" for b in pred.probs)
                              for c in show)
        else:
            probs = f"p({list(pred.probs)[-1]}): " + O.prob_text(pred, names, show)
        truth = f"truth ({t.truth_source}): {', '.join(t.truth) or 'none'}" if t.truth_source else "truth unknown"
        title = f"{t.name} — {truth}\n{probs}"
        path = O.draw(pred, out_dir / fname, title, gt, gl, dpi=dpi)
        iobb = O.image_iobb(pred, gt)
        extra = ("; IoBB " + ", ".join(f"{lab} {v:.2f}" for lab, v in zip(gl, iobb))) if len(iobb) else ""
        log(f"{path}: {probs}{extra}")
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    paths = visualize(args.run, args.images, args.classes, args.out, args.data, args.stage, args.checkpoint,
                      args.device, args.dpi)
    print(f"wrote {len(paths)} overlay(s) to {paths[0].parent if paths else args.out}")
    return 0
