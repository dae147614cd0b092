"""Evaluate a trained run on a split: per-class AUROC for every branch (with bootstrap 95%
intervals), localisation of the attention box against the NIH boxes (IoU, IoBB, T(IoBB)
accuracy as in Wang et al. 2017), and per-image predictions.

  medattn eval --run runs/r50 --split test
  torchrun --nproc-per-node 8 -m medattn eval --run runs/r50 --split test

Writes RUN/eval/metrics.json and RUN/eval/preds.csv (for --split test; other splits go to
RUN/eval_<split>/). preds.csv has one row per image and branch: the image id, the branch, one
probability column per label (p_<label>) and the ground truth (y_<label>). Two-class single-label
runs also get seed 002's table (AUC, Youden threshold, sensitivity, specificity) under "binary";
methods with per-image scores (lung Dice/IoU, the Grad-CAM region ratio r) get their means under
"per_image" and one row per image in per_image.csv.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpc import distributed
from hpc.inference import load_model
from hpc.run import EvalDir, Run, stage_selections
from medattn.fileio import atomic_path, write_text as atomic_write_text
from hpc.inference import run_inference
from medattn.progress import Progress
from medattn.errors import DataError, MedattnError
from medattn.metrics import binary_metrics, classification_metrics, extras_means, localization_metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by medattn train")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate")
    p.add_argument("--data", default=None, help="prepared directory (default: the one the run was trained on)")
    p.add_argument("--stage", default=None, help="evaluate the model as of this stage (default: the last done)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of the stage")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0 = off)")
    p.add_argument("--out-dir", default=None, help="where to write (default RUN/eval or RUN/eval_<split>)")
    p.add_argument("--allow-split-mismatch", action="store_true",
                   help="evaluate on a prepared directory whose split assignment differs from the one the checkpoint "
                        "was trained on (refused by default: its test images may have been trained on); both splits "
                        "are recorded in metrics.json")
    p.add_argument("--calibration", action=argparse.BooleanOptionalAction, default=True,
                   help="fit temperatures and operating-point thresholds on the val split and store them in the run "
                        "(default on; docs/evaluation.md)")
    from hpc.external_eval import add_external_arguments

    add_external_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="runtime overrides only (e.g. runtime.device=cpu data.loader=torch)")


def run(args: argparse.Namespace) -> int:
    if args.dataset:  # an external dataset (hpc/external_eval.py)
        from hpc.external_eval import run_external

        return run_external(args)
    return evaluate(args.run, split=args.split, data=args.data, stage=args.stage, checkpoint=args.checkpoint,
                    bootstrap=args.bootstrap, out_dir=args.out_dir, overrides=args.overrides,
                    allow_split_mismatch=args.allow_split_mismatch, calibration=args.calibration)


def main(argv: list[str] | None = None) -> int:
    """In-process entry point (tests, scripts): ``medattn eval ARGV``, returning its exit status."""
    from medattn.command import run_command

    return run_command("eval", sys.modules[__name__], list(sys.argv[1:] if argv is None else argv))


def evaluate(run_dir: str, split: str = "test", data: str | None = None, stage: str | None = None,
             checkpoint: str = "best", bootstrap: int = 1000, out_dir: str | None = None,
             overrides: list[str] | None = None, allow_split_mismatch: bool = False,
             calibration: bool = True) -> int:
    from medattn.data.prepared import PreparedDataset
    from hpc.loader import EvalLoader

    run = Run(run_dir).require()
    bad = [o for o in overrides or [] if not o.split("=", 1)[0].startswith(("runtime.", "data.loader",
                                                                            "data.num_workers"))]
    if bad:
        raise MedattnError(f"eval accepts only runtime/loader overrides, got {bad[0]!r}")
    cfg = run.config(overrides)
    if stage is None and not run.done_stages(cfg.stage_names()):
        raise DataError(run.state_path, "no stage of this run has finished; nothing to evaluate")
    stage, ckpt, _ = run.pick_checkpoint(stage, checkpoint, cfg.stage_names())

    world, device = distributed.init(device=cfg.runtime.device, timeout_s=cfg.runtime.dist_timeout_s)
    try:
        data = data or run.data_path()
        if data is None:
            raise DataError(run.provenance_path, "cannot tell which prepared data the run used; pass --data")
        ds = PreparedDataset.open(data)
        lr = load_model(run, stage, checkpoint, device, data=data, overrides=overrides)
        method, model, spec = lr.method, lr.model, lr.spec
        split_rec = check_split(lr.trained_split, ds.split_record(), data, lr.checkpoint, allow_split_mismatch)
        scfg = cfg.stages[stage]
        per_rank = max(1, (scfg.eval_batch_size or scfg.batch_size) // world.world_size)
        loader = EvalLoader(ds, cfg.data, ds.indices(split), per_rank, world.rank, world.world_size, device,
                            seed=cfg.seed, hires=method.needs_hires(stage))
        precision = distributed.precision(cfg, device)
        t0 = time.time()
        try:
            with Progress(len(loader), "medattn eval", desc=f"{split} ({stage})", unit="batch",
                          enabled=world.is_primary) as bar:
                preds = run_inference(method, model, loader, stage, device, precision,
                                      channels_last=cfg.runtime.channels_last, progress=bar)
        finally:
            loader.close()
        elapsed = time.time() - t0
        from hpc import clinical_eval  # calibration, operating points, subgroups (issue 24)

        val_preds = None
        t1 = time.time()
        if calibration and spec.task in ("multilabel", "singlelabel"):  # segmentation: nothing to calibrate
            val_preds = preds if split == "val" else clinical_eval.validation_predictions(
                ds, cfg, method, model, stage, device, world, precision)
        val_elapsed = time.time() - t1
        if world.is_primary:
            t2 = time.time()
            out = run.evaluation(split, out_dir)
            result = summarize(preds, ds, spec, cfg, split, stage, str(ckpt), bootstrap)
            # What each stage started from and which epoch it kept (AG-CNN: the fusion head).
            result["stages"] = stage_selections(run, cfg.stage_names(), method, stage, checkpoint)
            result["split_provenance"] = split_rec
            result["time_s"] = elapsed
            result["images_per_s"] = len(preds.index) / max(elapsed, 1e-9)
            extra, record = clinical_eval.beyond_auroc(preds, val_preds, ds, spec, method.select_branch(stage),
                                                       n_boot=bootstrap, seed=cfg.seed)
            result.update(extra)
            if record is not None:
                clinical_eval.save_calibration(run, record, stage, ckpt, data)
            # Where the time went: the model's forward passes, and everything else (intervals,
            # calibration, subgroups, the files), which must not grow faster than the split.
            result["timing_s"] = {"forward": elapsed, "forward_val": val_elapsed, "metrics": time.time() - t2}
            write_outputs(out, result, preds, ds, spec)
            print_summary(result, out)
        distributed.barrier()
        return 0
    finally:
        distributed.shutdown()


def check_split(trained: dict | None, evaluated: dict[str, Any], data: str, ckpt, allow: bool) -> dict[str, Any]:
    """The split record for metrics.json: the evaluated directory's split (name, seed, hash), the
    one the checkpoint was trained on, and whether they are the same assignment. A different
    assignment is refused by name (its test images may be training images of this model) unless
    ``allow`` (``--allow-split-mismatch``)."""
    out = {**evaluated, "trained_on": trained,
           "same_as_training": None if not trained else trained.get("hash") == evaluated["hash"]}
    if trained and trained.get("hash") != evaluated["hash"] and not allow:
        def name(r):
            return f"'{r.get('name')}' (seed {r.get('seed')}, hash {r.get('hash')})"
        raise DataError(Path(data), f"split {name(evaluated)} differs from the split {name(trained)} that "
                                    f"{ckpt} was trained on: its test images may be training images of this model. "
                                    "Evaluate on the prepared directory the run trained on, or pass "
                                    "--allow-split-mismatch to evaluate anyway (both splits are recorded)")
    return out


def summarize(preds, ds, spec, cfg, split: str, stage: str, ckpt: str, bootstrap: int) -> dict[str, Any]:
    from medattn import metrics as M

    labels = ds.labels_matrix()
    result: dict[str, Any] = {
        "split": split, "split_kind": ds.split_name, "n_images": int(len(preds.index)), "stage": stage,
        "checkpoint": ckpt, "method": cfg.method, "backbone": cfg.model.backbone, "task": spec.task,
        "eval_labels": list(spec.eval_labels), "label_names": list(spec.label_names),
        "auroc": classification_metrics(preds, labels, spec, ds.targets()),
    }
    result["mean_over"] = mean_coverage(result["auroc"], labels[preds.index], spec)
    if bootstrap > 0:
        y = labels[preds.index]
        # Patient-clustered: a patient's images are resampled together (medattn/metrics/bootstrap.py).
        groups = ds.manifest["patient"].astype(str).to_numpy()[preds.index]
        cis, too_few = {}, {}
        ci = None
        for branch, p in preds.probs.items():
            ci = M.bootstrap_auroc_ci(p, y, list(spec.label_names), list(spec.eval_labels), n_boot=bootstrap,
                                      seed=cfg.seed, groups=groups)
            entry = {k: [float(v[0]), float(v[1])] for k, v in ci.per_class.items()}
            entry["mean"] = [float(ci.mean[0]), float(ci.mean[1])]
            cis[branch] = entry
            too_few[branch] = list(ci.too_few)
        result["auroc_ci"] = cis
        result["bootstrap"] = bootstrap
        if ci is not None:
            result["bootstrap_method"] = ci.method
            result["bootstrap_units"] = ci.n_units
            result["bootstrap_min_positives"] = ci.min_positives
            result["bootstrap_positive_patients"] = ci.positives
            result["auroc_ci_too_few"] = too_few
    loc = localization_metrics(preds, ds)
    if loc is not None:
        result["localization"] = loc
    binary = binary_metrics(preds, spec, ds.targets())
    if binary is not None:
        result["binary"] = binary
    if preds.extras:
        result["per_image"] = {
            name: {"mean": mean, "n": int(np.isfinite(np.asarray(preds.extras[name], np.float64)).sum())}
            for name, mean in extras_means(preds).items()}
    return result


def mean_coverage(auroc: dict[str, Any], y: np.ndarray, spec) -> dict[str, Any]:
    """Which evaluated classes the mean AUROC averages, and why the others are left out ("no
    positives in this split"): ``{"n", "of", "classes", "excluded": {class: reason}, "text"}``."""
    names = list(spec.label_names)
    evaluated = list(spec.eval_labels)
    defined = [c for c in evaluated if auroc and all(_finite(auroc[b].get(c)) for b in auroc)]
    excluded = {}
    for c in evaluated:
        if c in defined:
            continue
        j = names.index(c)
        col = y[:, j] > 0 if spec.task != "singlelabel" and y.ndim == 2 else None
        if col is not None and not col.any():
            excluded[c] = "no positives in this split"
        elif col is not None and col.all():
            excluded[c] = "no negatives in this split"
        else:
            excluded[c] = "no AUROC"
    text = (f"{len(defined)} of {len(evaluated)}"
            + (": " + "; ".join(f"{c} has {r}" for c, r in excluded.items()) if excluded else ""))
    return {"n": len(defined), "of": len(evaluated), "classes": defined, "excluded": excluded, "text": text}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def write_outputs(out: EvalDir, result: dict[str, Any], preds, ds, spec) -> None:
    import pandas as pd

    out.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.metrics_path, json.dumps(result, indent=2, default=_json_default))
    labels = ds.labels_matrix()[preds.index]
    images = ds.manifest["image"].to_numpy()[preds.index]
    if preds.extras:
        edf = pd.DataFrame({"image": images, **{k: np.asarray(v) for k, v in preds.extras.items()}})
        with atomic_path(out.per_image_path) as tmp:  # streamed: a whole split's rows
            edf.to_csv(tmp, index=False, float_format="%.6g")
    frames = []
    for branch, p in preds.probs.items():
        df = pd.DataFrame({"image": images, "branch": branch})
        for j, name in enumerate(spec.label_names):
            df[f"p_{name}"] = p[:, j]
        for j, name in enumerate(spec.label_names):
            df[f"y_{name}"] = labels[:, j].astype(np.int8)
        frames.append(df)
    if frames:  # a segmentation run has per-image scores but no class probabilities
        with atomic_path(out.preds_path) as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False, float_format="%.6g")
    if preds.boxes is not None:
        bdf = pd.DataFrame({"image": images, "x0": preds.boxes[:, 0], "y0": preds.boxes[:, 1],
                            "x1": preds.boxes[:, 2], "y1": preds.boxes[:, 3]})
        with atomic_path(out.boxes_path) as tmp:
            bdf.to_csv(tmp, index=False, float_format="%.5f")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def auroc_table(result: dict[str, Any]) -> str:
    """The per-class AUROC table (Markdown) for every branch."""
    branches = list(result["auroc"])
    lines = ["| label | " + " | ".join(branches) + " |", "|---|" + "---|" * len(branches)]
    for name in result["eval_labels"]:
        lines.append(f"| {name} | " + " | ".join(_fmt(result["auroc"][b].get(name)) for b in branches) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(result['auroc'][b]['mean'])}**" for b in branches) + " |")
    # Single-label runs: accuracy and the one-vs-rest macro AUROC over every class.
    for key, title in (("macro_auroc", "macro AUROC (OvR)"), ("accuracy", "accuracy")):
        if branches and all(key in result["auroc"][b] for b in branches):
            lines.append(f"| {title} | " + " | ".join(_fmt(result["auroc"][b][key]) for b in branches) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def print_summary(result: dict[str, Any], out: EvalDir) -> None:
    if result["auroc"]:
        print(f"\nAUROC on the {result['split']} split ({result['n_images']} images, split '{result['split_kind']}', "
              f"stage {result['stage']}):\n")
        print(auroc_table(result))
        if (result.get("mean_over") or {}).get("excluded"):
            print(f"\nmean over {result['mean_over']['text']}")
        if result.get("bootstrap_method"):
            few = sorted({c for v in (result.get("auroc_ci_too_few") or {}).values() for c in v})
            print(f"\n95% intervals: {result['bootstrap_method']}, {result['bootstrap']} resamples of "
                  f"{result['bootstrap_units']} patients"
                  + (f"; too few positive patients (< {result['bootstrap_min_positives']}) for an interval: "
                     f"{', '.join(few)}" if few else ""))
    binary = result.get("binary")
    if binary:
        for branch, rep in binary.items():
            if branch == "positive_class":
                continue
            y = rep.get("at_youden") or {}
            print(f"\n{branch}: {binary['positive_class']} vs rest: AUC {_fmt(rep['auroc'])}, Youden threshold "
                  f"{_fmt(y.get('threshold'))}: sensitivity {_fmt(y.get('sensitivity'))}, specificity "
                  f"{_fmt(y.get('specificity'))}, accuracy {_fmt(y.get('accuracy'))}")
    for name, e in (result.get("per_image") or {}).items():
        print(f"\nmean {name} over {e['n']} images of the {result['split']} split: {_fmt(e['mean'])}")
    loc = result.get("localization")
    if loc:
        acc = loc["overall"]["acc_iobb"]
        print(f"\nlocalisation ({loc['n_boxes']} boxes on {loc['n_images']} images): mean IoU "
              f"{loc['overall']['iou_mean']:.3f}, mean IoBB {loc['overall']['iobb_mean']:.3f}, "
              + ", ".join(f"T(IoBB)>{t}: {acc[t]:.3f}" for t in ("0.1", "0.25", "0.5") if t in acc))
    from hpc.clinical_eval import summary_lines

    for line in summary_lines(result):
        print(f"\n{line}")
    written = out.written()
    print(f"\nwrote {', '.join(map(str, written))}")
