"""Write the report of a run: RUN/report/index.html (self-contained, opens offline) and
RUN/report/report.md (same content, figures in RUN/report/figures/).

  medattn report --run runs/r50                 the test split, 12 heat-map overlays
  medattn report --run runs/r50 --eval          evaluate first when RUN/eval is missing or stale

The report shows per-class AUROC per branch with bootstrap intervals beside the published
numbers (with the split and data caveats), ROC and training curves, localisation against the
NIH boxes beside Wang et al.'s Table 4, heat-map overlays with AG-CNN's local crops,
throughput, the resolved config and provenance. A partly finished run gets a partial report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medattn.errors import MedattnError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by medattn train")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the evaluated split to report (default test)")
    p.add_argument("--samples", type=int, default=12, help="test images with heat-map overlays (0 = none)")
    p.add_argument("--data", default=None, help="prepared directory (default: the one the run was trained on)")
    p.add_argument("--out", default=None, help="output directory (default RUN/report, RUN/report_<split> for "
                                               "other splits)")
    p.add_argument("--eval-dir", default=None,
                   help="the evaluation to report (default RUN/eval, RUN/eval_<split>; as given to eval --out-dir)")
    p.add_argument("--eval", action="store_true",
                   help="run `medattn eval` first when the split's metrics.json is missing or older than the "
                        "last finished stage")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for --eval (default 1000)")
    p.add_argument("--device", default="cpu", help="torch device for the overlays (default cpu)")


def needs_eval(run_dir: Path, split: str, eval_dir: str | None = None) -> str | None:
    """Why the split needs evaluating (missing / out of date), or None when it is current."""
    from hpc.run import Run

    run = Run(run_dir)
    mpath = run.evaluation(split, eval_dir).metrics_path
    if not mpath.is_file():
        return f"{mpath} is missing"
    try:
        stage = json.loads(mpath.read_text()).get("stage")
        done = run.done_stages(run.config().stage_names())
    except (OSError, ValueError, MedattnError):
        return None
    if done and stage != done[-1]:
        return f"{mpath} evaluated stage {stage!r}, stage {done[-1]!r} has finished since"
    return None


def run(args: argparse.Namespace) -> int:
    from hpc.report.build import build_report
    from hpc.run import Run

    run_dir = Path(args.run)
    if args.samples < 0:
        raise MedattnError(f"--samples must be >= 0, got {args.samples}")
    if args.eval and Run(run_dir).exists():
        why = needs_eval(run_dir, args.split, args.eval_dir)
        if why:
            from hpc.evaluate import evaluate

            print(f"evaluating first: {why}")
            evaluate(str(run_dir), split=args.split, data=args.data, bootstrap=args.bootstrap,
                     out_dir=args.eval_dir)
    res = build_report(run_dir, split=args.split, samples=args.samples, out=args.out, data=args.data,
                       eval_dir=args.eval_dir, device=args.device)
    print(f"wrote {res.markdown} ({len(res.figures)} figures in {res.markdown.parent / 'figures'})")
    print(f"report: {res.html.resolve()}")
    return 0
