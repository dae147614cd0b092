"""Export a trained model for deployment: TorchScript or ONNX, preprocessing included.

  medattn export --run runs/r50 --format onnx --out r50.onnx
  medattn export --run runs/r50 --format torchscript --out r50.pt --stage global

The exported model takes images as `medattn prepare` stores them: (B, C, S, S) at the run's
prepared size S (C = the run's channels) on the 0..255 scale, e.g. a film resized
to S x S with LANCZOS (`medattn.load(RUN).read(path)` gives exactly that array for any PNG, JPEG
or DICOM file). Inside: the loaders' evaluation view (window, antialiased resize to the input
size), the normalisation, and the method's prediction for the stage (AG-CNN: global branch,
attention map, largest connected region, crop from the S x S image or the view, local branch,
fusion; every step has fixed shapes and no data-dependent control flow, so it traces exactly).
Output: (B, L) probabilities of the stage's selected branch (sigmoid for multi-label runs,
softmax for single-label ones), the same numbers as `medattn predict` (tested to 1e-4); with
``--calibrated``, those of `medattn predict --calibrated` (the run's temperatures built in).

Input type: a TorchScript file takes uint8 or float32. An ONNX graph has one input type, chosen
with ``--input-dtype`` (default float32, which holds every 0..255 value exactly, so a uint8 array
passes as ``x.astype(np.float32)``; ``uint8`` for a quarter of the input bytes).

Loading a TorchScript file: AG-CNN and DualAttendMed crop with torchvision's RoIAlign, a
torchvision operator that ``torch.jit.load`` finds only once torchvision is imported (a pure-torch
crop would change the numbers). The sidecar lists it (``load_requires``), the command says it,
and docs/predict.md shows the two lines.

ONNX needs the onnx and onnxscript packages (dev extras); check an ONNX file with onnxruntime.
The file is written atomically, with a JSON sidecar (FILE.json) that records the labels, the
input it expects and what loading it needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
import torch
from torch import nn

from medattn.errors import MedattnError, MissingDependencyError

FORMATS = ("torchscript", "onnx")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


class ExportedModel(nn.Module):
    """(B, C, S, S) uint8/float images on the 0..255 scale -> (B, L) probabilities of ``branch``.

    The pixel steps are those of :func:`medattn.views.render_views` for the evaluation view (a
    fixed window, bilinear antialiased resize, :func:`medattn.views.normalize`), and the rest is the
    method's own :meth:`predict` (the same code ``medattn predict`` runs), so the two agree.
    """

    def __init__(self, method, model: nn.Module, stage: str, view, branch: str, temperature=None,
                 task: str = "multilabel"):
        super().__init__()
        from medattn.boxes import pixel_window
        from medattn.views import sample_views, view_boxes

        self.method, self.model, self.stage, self.branch = method, model, stage, branch
        self.size, self.crop, c = view.src_size, view.crop, len(view.mean)
        views = sample_views(view, 1, None)
        self.window = tuple(int(v) for v in pixel_window(views["window"][0], self.size, self.size))
        # mean and std on the 0..1 scale, as medattn.views.normalize takes them (the one normalisation)
        self.register_buffer("mean", torch.tensor(view.mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(view.std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("view_box", torch.from_numpy(view_boxes(views["window"], views["flip"])).float(),
                             persistent=False)
        # Calibrated probabilities (the run's temperatures, fitted on validation by `medattn eval`):
        # the same map as medattn.metrics.apply_temperature. None: the raw probabilities.
        self.singlelabel = task == "singlelabel"
        self.register_buffer("temperature", None if temperature is None else
                             torch.as_tensor(temperature, dtype=torch.float32).view(1, -1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        from medattn.views import normalize

        x = images.float()
        left, top, right, bottom = self.window
        v = F.interpolate(x[:, :, top:bottom, left:right], size=(self.crop, self.crop), mode="bilinear",
                          align_corners=False, antialias=True)
        v = normalize(v, self.mean, self.std)
        # ``hires``: the prepared image, as the loaders hand it to methods that crop from it.
        batch = {"image": v, "hires": x, "view_box": self.view_box.expand(x.shape[0], 4)}
        p = self.method.predict(self.model, batch, self.stage)["probs"][self.branch]
        if self.temperature is None:
            return p
        from medattn.metrics.calibration import EPS

        if self.singlelabel:
            return torch.softmax(torch.log(p.clamp(EPS, 1.0)) / self.temperature[:, :1], dim=-1)
        p = p.clamp(EPS, 1 - EPS)
        return torch.sigmoid((torch.log(p) - torch.log1p(-p)) / self.temperature)


def exported_module(predictor, calibrated: bool = False) -> ExportedModel:
    """The :class:`ExportedModel` of a :class:`hpc.predict.Predictor`, on the CPU, in float32;
    ``calibrated``: with the run's temperatures for the exported branch (hpc/calibrated.py)."""
    from hpc.inference import load_model

    temperature = None
    if calibrated:
        from hpc.calibrated import record_for
        from medattn.metrics import Temperature

        rec = record_for(predictor, True, None)
        temperature = Temperature.from_dict(rec["temperatures"][predictor.branch]).vector(list(predictor.labels))

    lr = predictor.loaded
    # A fresh CPU copy, not the predictor's own: the file must load anywhere, and tracing
    # (torch.export's fake tensors) must not leave anything in the method's caches that the
    # predictor would then use.
    lr = load_model(lr.run, lr.stage, lr.checkpoint.stem, "cpu", overrides=["runtime.device=cpu"])
    model = lr.model.to(memory_format=torch.contiguous_format).float().eval().requires_grad_(False)
    return ExportedModel(lr.method, model, lr.stage, predictor.view, predictor.branch, temperature,
                         predictor.spec.task).eval()


def export_predictor(predictor, out: str | os.PathLike, fmt: str = "onnx", batch: int = 2,
                     optimize: bool = True, calibrated: bool = False, input_dtype: str = "float32") -> Path:
    """Write ``predictor``'s model to ``out`` in ``fmt`` (``torchscript`` or ``onnx``), plus
    ``out.json`` describing its input and outputs. ``batch``: the batch of the example input (the
    batch dimension stays dynamic). ``optimize``: run the ONNX graph optimiser (constant folding;
    about half the export time, and onnxruntime optimises on load anyway). ``input_dtype``: the
    ONNX input type (``float32`` or ``uint8``; TorchScript takes both)."""
    from medattn.fileio import atomic_path, write_text as atomic_write_text

    if fmt not in FORMATS:
        raise MedattnError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise MedattnError(f"--input-dtype {input_dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
    out = Path(out)
    module = exported_module(predictor, calibrated)  # refuses (naming the file) before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    s, c = predictor.prepared_size, predictor.channels
    example = torch.randint(0, 256, (batch, c, s, s), generator=torch.Generator().manual_seed(0),
                            dtype=torch.uint8)
    if fmt == "onnx":
        example = example.to(INPUT_DTYPES[input_dtype])
    requires: list[str] = []
    with atomic_path(out) as tmp:
        with torch.no_grad():
            if fmt == "torchscript":
                import warnings

                with warnings.catch_warnings():
                    # sizes read while tracing are constants: right here, every shape but the
                    # batch is fixed by the run (tests check other batch sizes)
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    traced = torch.jit.trace(module, (example,), check_trace=False)
                requires = custom_op_packages(traced)
                traced.save(str(tmp))
            else:
                _onnx(module, example, tmp, optimize)
    dtype = "uint8 or float32" if fmt == "torchscript" else input_dtype
    meta = {"format": fmt, "input": {"name": "images", "shape": ["B", c, s, s], "dtype": dtype,
                                     "scale": "0..255", "resize_to": s, "resize_filter": "LANCZOS"},
            "output": {"name": "probs", "shape": ["B", len(predictor.labels)], "branch": predictor.branch,
                       "function": "softmax" if predictor.spec.task == "singlelabel" else "sigmoid",
                       "calibrated": calibrated and {"temperatures": [float(t) for t in module.temperature.view(-1)],
                                                     "fitted_on": "the validation split (medattn eval)"}},
            "labels": predictor.labels, "eval_labels": list(predictor.spec.eval_labels),
            "run": str(predictor.run.root), "stage": predictor.stage, "checkpoint": str(predictor.checkpoint),
            "synthetic": predictor.synthetic, "inference": predictor.info,
            # packages to import before torch.jit.load (their operators are in the graph)
            "load_requires": requires}
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(meta, indent=2))
    return out


def custom_op_packages(traced) -> list[str]:
    """The packages whose operators a TorchScript graph calls (``torchvision::roi_align`` ->
    torchvision): ``torch.jit.load`` resolves them only when the package was imported."""
    graph = str(traced.inlined_graph)
    return sorted(ns for ns in ("torchvision",) if f"{ns}::" in graph)


def load_hint(requires: list[str]) -> str:
    """How to load a TorchScript file whose graph needs ``requires``."""
    if not requires:
        return "load it with torch.jit.load(FILE)"
    return (f"load it after `import {', '.join(requires)}` (its operators are in the graph): "
            f"import torch, {', '.join(requires)}; torch.jit.load(FILE)")


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, optimize: bool = True) -> None:
    for dep in ("onnx", "onnxscript"):
        try:
            __import__(dep)
        except ImportError:
            raise MissingDependencyError(dep, "onnx", "needed for --format onnx") from None
    import warnings

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=["probs"],
                                 dynamic_shapes={"images": {0: batch}}, verbose=False, report=False,
                                 optimize=optimize)
    prog.save(str(path))


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="torchscript (torch.jit) or onnx")
    p.add_argument("--out", required=True, help="the file to write (FILE.json describes its input and outputs)")
    p.add_argument("--stage", default=None, help="whose model (default: the last finished stage)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="(default: %(default)s)")
    p.add_argument("--calibrated", action="store_true",
                   help="output calibrated probabilities: the run's temperatures, fitted on validation by "
                        "`medattn eval` (docs/evaluation.md), built into the model")
    p.add_argument("--input-dtype", default="float32", choices=tuple(INPUT_DTYPES),
                   help="onnx: the input type of the graph (TorchScript takes both); float32 holds every 0..255 "
                        "value exactly (default: %(default)s)")
    p.add_argument("--no-optimize", action="store_true",
                   help="onnx: skip the graph optimiser (faster export; onnxruntime optimises on load anyway)")


def run(args: argparse.Namespace) -> int:
    import warnings

    from hpc.predict import SYNTHETIC_WARNING, load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        p = load(args.run, args.stage, args.checkpoint, "cpu")
    if p.synthetic:
        print("medattn export: WARNING: " + SYNTHETIC_WARNING.format(source=p.spec.source or "synthetic"),
              file=sys.stderr)
    print(f"medattn export: {p.describe()}", file=sys.stderr)
    from medattn.progress import Heartbeat

    with Heartbeat("medattn export", f"tracing and writing {args.format}"):
        out = export_predictor(p, args.out, args.format, optimize=not args.no_optimize, calibrated=args.calibrated,
                               input_dtype=args.input_dtype)
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    print(f"medattn export: wrote {out} ({args.format}; input (B, {p.channels}, {p.prepared_size}, "
          f"{p.prepared_size}) {meta['input']['dtype']} 0..255; output (B, {len(p.labels)}) {p.branch} "
          f"{'calibrated ' if args.calibrated else ''}probabilities)", file=sys.stderr)
    if args.format == "torchscript":
        print(f"medattn export: {load_hint(meta['load_requires'])}", file=sys.stderr)
    return 0
