"""Run a trained model on image files: PNG/JPEG (8/16-bit, gray, RGB, RGBA) and DICOM.

  medattn predict --run runs/r50 scans/ --out preds.csv
  medattn predict --run runs/r50 a.png b.dcm list.txt --heatmaps overlays/ --device cpu
  medattn predict --run runs/r50 films.csv --stage global --checkpoint last --batch 64

INPUT: image files, folders (searched recursively for *.png, *.jpg, *.jpeg, *.dcm, *.dicom and
files with the DICOM preamble) or lists (.txt: one path a line; .csv: a `path` or `image`
column), paths relative to the list. Only the run directory is needed: the checkpoint carries
the labels and the preprocessing, not the prepared data it was trained on.

Each image goes the way a training image went: decoded and resized to the run's prepared size
as `medattn prepare` does (medattn.data.imagefiles: DICOM Modality LUT, VOI LUT or window,
MONOCHROME1 inverted), then the loaders' evaluation view (medattn.views: window, resize to the
input size, normalisation), then the method's own prediction (every branch of AG-CNN, with the
attention crop). Output: a CSV, one row per image, `path` then one probability column per label
(the stage's selected branch, e.g. AG-CNN's fusion), and `<branch>/<label>` columns for every
branch when the method has several. Probabilities are computed in float32.

Exit status: 0 all images predicted; 1 some files could not be read, or were named but are
missing (dangling links, missing list rows): each is named on stderr, the others are predicted and
written; 2 bad arguments (no run, no such input), nothing written. Files read with a quality note
(almost no contrast, tiny, stretched; medattn.data.imagefiles.ImageWarning) get one warning line.

Python: `import medattn; p = medattn.load("runs/r50"); p.predict(["a.png"])` (docs/predict.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medattn.errors import DataError, MedattnError, MissingDependencyError

SYNTHETIC_WARNING = ("this run was trained on synthetic images ({source}); its probabilities say nothing "
                     "about real chest films")


def resolve_device(device: str | None) -> str:
    """``None``/``auto``: CUDA when there is a GPU, else the CPU."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MedattnError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
    return str(device)


def load(run: str | os.PathLike, stage: str | None = None, checkpoint: str = "best",
         device: str | None = None, cls: type | None = None, stacklevel: int = 2) -> "Predictor":
    """A run's model, ready for new images (:func:`hpc.inference.load_model`: no prepared data needed).

    Args:
        run: the run directory.
        stage: whose model (default: the last finished stage, e.g. AG-CNN's fusion).
        checkpoint: ``best`` (the stage's selected epoch) or ``last``.
        device: ``cpu``, ``cuda``, ``cuda:1``; None or ``auto``: the GPU when there is one.
        cls: the :class:`Predictor` subclass to return (:class:`medattn.api.Model` adds ``export``).
        stacklevel: where the synthetic-data warning points (for callers that wrap this).

    Warns (UserWarning) when the run was trained on synthetic images.
    """
    from hpc.inference import load_model

    dev = resolve_device(device)
    lm = load_model(run, stage, checkpoint, dev, overrides=["runtime.device=cpu"] if dev == "cpu" else None)
    p = (cls or Predictor)(lm)
    if p.synthetic:
        warnings.warn(SYNTHETIC_WARNING.format(source=p.spec.source or "synthetic"), UserWarning,
                      stacklevel=stacklevel)
    return p


class Predictor:
    """A trained model and everything needed to feed it (from :func:`load`).

    Attributes:
        loaded: the :class:`hpc.inference.LoadedModel` (run, config, method, checkpoint).
        model: the torch module (eval mode, on ``device``).
        labels: the label names, in the order of the model's outputs.
        branches: the method's prediction branches at this stage (``["main"]`` for most methods,
            ``["global", "local", "fusion"]`` for a full AG-CNN run); ``branch`` is the one whose
            probabilities are the plain label columns.
        input_size: the network input side; ``prepared_size``: the side images are first resized to.
        synthetic: True when the training images were synthetic (None: not recorded).
        info: the checkpoint's inference record (method, backbone, preprocessing, medattn version).
    """

    def __init__(self, loaded):
        from medattn.views import ViewSpec

        self.loaded = loaded
        self.run = loaded.run
        self.spec = loaded.spec
        self.method = loaded.method
        self.model = loaded.model
        self.cfg = loaded.cfg
        self.stage = loaded.stage
        self.device = loaded.device
        self.checkpoint = loaded.checkpoint
        self.labels: list[str] = list(self.spec.label_names)
        if self.spec.task not in ("multilabel", "singlelabel"):
            raise MedattnError(f"{loaded.run.root}: a {self.spec.task} run ({self.method.name}) predicts no class "
                               "probabilities; `medattn predict` takes classification runs")
        self.branches: list[str] = list(self.method.branches(self.stage))
        self.branch: str = self.method.select_branch(self.stage)
        self.view = ViewSpec.from_config(self.cfg.data, self.spec.prepared_size, self.spec.channels, train=False)
        self.input_size: int = self.view.crop
        self.prepared_size: int = self.spec.prepared_size
        self.channels: int = self.spec.channels
        self.synthetic: bool | None = self.spec.synthetic
        self.info: dict[str, Any] = dict(loaded.info or {})

    def __repr__(self) -> str:
        return (f"Predictor({str(self.run.root)!r}, method={self.method.name}, backbone={self.cfg.model.backbone}, "
                f"stage={self.stage}, labels={len(self.labels)}, input={self.input_size}, device={self.device})")

    def describe(self) -> str:
        """One line: what was loaded and how images are fed to it."""
        v = self.view
        return (f"{self.run.root}: {self.method.name} / {self.cfg.model.backbone}, stage {self.stage} "
                f"({self.checkpoint.name}), {len(self.labels)} labels, {self.spec.task}; images -> {self.channels}-channel "
                f"{self.prepared_size} px (LANCZOS) -> {v.mode} view {v.crop} px, normalised with mean "
                f"{[round(m, 4) for m in v.mean]} std {[round(s, 4) for s in v.std]}; device {self.device}"
                + (f"; note: {self.loaded.note}" if self.loaded.note else ""))

    # ------------------------------------------------------------------ pixels
    def read(self, image) -> np.ndarray:
        """A file path or an in-memory image -> (S, S, C) uint8 at the prepared size, exactly as
        ``medattn prepare`` would have stored it (:func:`hpc.inference.read_pixels`).

        Raises:
            ImageFileError (a DataError): an unreadable file, named.
            ValueError: an array of another shape or dtype.
        """
        from hpc.inference import read_pixels

        return read_pixels(image, self.prepared_size, self.channels)

    def transform(self, image):
        """A file path, an in-memory image (see :meth:`read`) or a prepared (S, S, C) uint8 array ->
        the normalised (C, H, W) float32 network input, as the loaders' evaluation view makes it."""
        from medattn.views import render_views, sample_views

        px = self.read(image)
        return render_views(px[None].copy(), sample_views(self.view, 1, None), self.view)[0]

    # ------------------------------------------------------------------ predictions
    def iter_predictions(self, inputs, batch_size: int = 16, errors: str = "raise"
                         ) -> Iterator[tuple[str, Any, str | None]]:
        """(name, :class:`hpc.inference.ImagePrediction` or None, error or None) per input image,
        in order, ``batch_size`` images per forward pass; images are read one batch at a time.

        ``errors``: ``raise`` (the first unreadable file raises its ImageFileError) or ``skip``
        (it is yielded with the reason and no prediction)."""
        from hpc.inference import predict_images

        if errors not in ("raise", "skip"):
            raise ValueError(f"errors={errors!r}: use 'raise' or 'skip'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        pending: list[tuple[str, np.ndarray]] = []

        def flush():
            preds = predict_images(self.loaded, np.stack([px for _, px in pending]), batch_size=batch_size)
            out = [(name, pr, None) for (name, _), pr in zip(pending, preds)]
            pending.clear()
            return out

        for name, src in _items(inputs):
            try:
                if isinstance(src, DataError):  # named by the input listing (_items)
                    raise src
                px = self.read(src)
            except (DataError, MissingDependencyError) as e:
                if errors == "raise":
                    raise
                yield name, None, str(e)
                continue
            pending.append((name, px))
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()

    def predict(self, inputs, heatmaps: bool = False, batch_size: int = 16, errors: str = "raise",
                calibrated: bool = False, operating_point: str | None = None):
        """Probabilities for images.

        Args:
            inputs: a path (file, folder or .txt/.csv list, see
                :func:`medattn.data.imagefiles.expand_inputs`), an image array ((H, W), (H, W, 1|3|4)
                uint8 or (H, W) uint16; a 4-D array is a batch), or a list of any of these.
            heatmaps: also return the attention: columns ``heatmap`` ((h, w) float in [0, 1] over
                the network input, or None for methods without one) and ``box`` (normalised
                [x0, y0, x1, y1] in the image, AG-CNN's attention box, or None).
            batch_size: images per forward pass.
            errors: ``raise`` or ``skip`` an unreadable file; skipped files are listed in
                ``df.attrs["errors"]`` as (path, reason).
            calibrated: apply the temperatures ``medattn eval`` fitted on the validation split
                (stored in the run; :mod:`hpc.calibrated`).
            operating_point: also return binary calls ``call/<label>`` at the thresholds chosen on
                the validation split (``youden``, ``sens90``, ``sens95``).

        Returns:
            pandas DataFrame, one row per image: ``path`` (absolute path, or ``<array i>``), one
            column per label (the probabilities of ``self.branch``), and ``<branch>/<label>``
            columns for each branch when there are several.
        """
        import pandas as pd

        rows, failed = [], []
        for name, pred, err in self.iter_predictions(inputs, batch_size, errors):
            if pred is None:
                failed.append((name, err))
                continue
            rows.append(self.row(name, pred, heatmaps))
        df = pd.DataFrame(rows, columns=self.columns(heatmaps))
        df.attrs["errors"] = failed
        if calibrated or operating_point:
            from hpc.calibrated import apply_to_frame

            df = apply_to_frame(self, df, calibrated, operating_point)
        return df

    def columns(self, heatmaps: bool = False) -> list[str]:
        cols = ["path", *self.labels]
        if len(self.branches) > 1:
            cols += [f"{b}/{lab}" for b in self.branches for lab in self.labels]
        return cols + (["heatmap", "box"] if heatmaps else [])

    def row(self, name: str, pred, heatmaps: bool = False) -> list[Any]:
        out: list[Any] = [name, *(float(v) for v in pred.probs[self.branch])]
        if len(self.branches) > 1:
            for b in self.branches:
                out += [float(v) for v in pred.probs[b]]
        if heatmaps:
            out += [pred.heatmap, None if pred.box is None else np.asarray(pred.box, np.float64)]
        return out


def _items(inputs) -> Iterator[tuple[str, Any]]:
    """(name, path or array) for each image named by ``inputs`` (see :meth:`Predictor.predict`)."""
    from medattn.data.imagefiles import ImageFileError, expand_inputs

    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "shape"):
        inputs = [inputs]
    k = 0
    for item in inputs:
        if isinstance(item, (str, os.PathLike)):
            found = expand_inputs([item])
            for f, why in found.problems:  # a dangling link, a missing list row: unreadable, named
                yield str(f), ImageFileError(f, why)
            for f in found.files:
                yield str(f), f
            continue
        arr = item.detach().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
        for a in (arr if arr.ndim == 4 else [arr]):
            yield f"<array {k}>", a
            k += 1


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run directory (only it is needed, not the prepared data)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (PNG, JPEG, DICOM), folders (recursive) or .txt/.csv lists of them")
    p.add_argument("--out", default="preds.csv", help="the CSV to write (default: %(default)s)")
    p.add_argument("--heatmaps", metavar="DIR", default=None,
                   help="also write one attention overlay PNG per image into DIR (methods with attention)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU when there is one (default: %(default)s)")
    p.add_argument("--stage", default=None,
                   help="whose model (default: the last finished stage, e.g. AG-CNN's fusion)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="the stage's best-validation weights or its latest (default: %(default)s)")
    p.add_argument("--calibrated", action="store_true",
                   help="apply the temperatures `medattn eval` fitted on the validation split (docs/evaluation.md)")
    p.add_argument("--operating-point", default=None, choices=("youden", "sens90", "sens95"),
                   help="also write binary calls (call/<label>) at the thresholds chosen on the validation split")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from medattn.data.imagefiles import ImageWarning, expand_inputs
    from medattn.fileio import write_text as atomic_write_text
    from medattn.progress import Progress

    if args.batch < 1:
        raise MedattnError(f"--batch must be at least 1, got {args.batch}")
    # An input that does not exist or an empty folder: exit 2, nothing written. Dangling links and
    # missing list rows are named below, the rest predicted, and the exit status is 1.
    inputs = expand_inputs(args.inputs)
    files = inputs.files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said below, in the command's words
        p = load(args.run, args.stage, args.checkpoint, args.device)
    print(f"medattn predict: {p.describe()}", file=sys.stderr)
    if args.calibrated or args.operating_point:  # no stored calibration: exit 2 before any work
        from hpc.calibrated import record_for

        record_for(p, args.calibrated, args.operating_point)
    if p.synthetic:
        print("medattn predict: WARNING: " + SYNTHETIC_WARNING.format(source=p.spec.source or "synthetic"),
              file=sys.stderr)
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    if heat_dir is not None:
        heat_dir.mkdir(parents=True, exist_ok=True)
    rows, failed, stems, no_heat = [], [], set(), False
    bar = Progress(len(files) + len(inputs.problems), "medattn predict", unit="img")
    for path, why in inputs.problems:
        failed.append(str(path))
        bar.update(1)
        bar.line(f"error: {path}: {why}")

    def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
        """An ImageWarning as the command's one line (through the bar); any other warning as
        Python shows it."""
        if issubclass(category, ImageWarning):
            bar.line(f"warning: {message}")
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        # One line per file (its quality notes and what PIL/pydicom said while reading it).
        warnings.simplefilter("always", ImageWarning)
        warnings.showwarning = warning_line
        for name, pred, err in p.iter_predictions(files, args.batch, errors="skip"):
            bar.update(1)
            if pred is None:
                failed.append(name)
                bar.line(f"error: {err}")
                continue
            rows.append(p.row(name, pred))
            if heat_dir is not None:
                if pred.heatmap is None:
                    no_heat = True
                else:
                    _overlay(p, name, pred, heat_dir, stems)
    bar.close()
    if no_heat:
        print(f"medattn predict: note: method {p.method.name} gives no attention map; no overlays written",
              file=sys.stderr)
    if not rows:
        print(f"medattn predict: error: none of the {len(failed)} image(s) could be read; nothing written",
              file=sys.stderr)
        return 1
    out = Path(args.out)
    df = pd.DataFrame(rows, columns=p.columns())
    if args.calibrated or args.operating_point:
        from hpc.calibrated import apply_to_frame

        df = apply_to_frame(p, df, args.calibrated, args.operating_point)
    atomic_write_text(out, df.to_csv(index=False, float_format="%.7g"))
    print(f"medattn predict: wrote {out} ({len(rows)} image(s)"
          + (f"; {len(failed)} unreadable, named above" if failed else "") + ")", file=sys.stderr)
    return 1 if failed else 0


def _overlay(p: Predictor, name: str, pred, heat_dir: Path, stems: set[str]) -> Path:
    from hpc import overlays

    stem = Path(name).stem if not name.startswith("<") else name.strip("<>").replace(" ", "_")
    base, k = stem, 2
    while stem in stems:  # same file name in two folders
        stem, k = f"{base}-{k}", k + 1
    stems.add(stem)
    top = overlays.top_classes(pred, p.labels, list(p.spec.eval_labels))
    title = f"{Path(name).name}: {overlays.prob_text(pred, p.labels, top, p.branch)}"
    with warnings.catch_warnings(record=True) as said:  # matplotlib's: folded into one line
        warnings.simplefilter("always")
        out = overlays.draw(pred, heat_dir / f"{stem}.png", title, np.zeros((0, 4)), [])
    if said:
        from medattn.data.imagefiles import ImageWarning

        notes = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in said))
        warnings.warn(f"{name}: overlay {out.name}: {notes}", ImageWarning, stacklevel=2)
    return out
