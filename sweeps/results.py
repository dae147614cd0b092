"""Sweep results: ``DIR/results.csv``, ``DIR/best.yaml`` and ``DIR/plots/auroc_vs_<param>.png``.

Built from the trials' run directories (each trial's ledger + the epoch records), which are
the ground truth on the shared filesystem, and from Tune's results for trials that failed
before writing anything. One row per trial:

  trial_id, <each swept parameter>, best_auroc (best validation mean AUROC of the last stage the
  trial reached), best_auroc_<stage> for each trained stage, last_stage, epochs (epochs trained
  by the trial, shared stages excluded), state (completed | stopped (early, by ASHA) | error |
  interrupted | running | pending),
  node_id, node_ip, hostname, run_dir, error.

The best trial is the completed trial with the highest best_auroc (trials stopped early by
ASHA report an earlier stage); best.yaml is written once a trial has completed.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from hpc.run import Run
from sweeps.trial import asha_stopped, metric_of


def trial_row(run_dir: Path, param_names: list[str], stages: list[str],
              stopped: set[str] | None = None) -> dict[str, Any]:
    """One results row from a trial's run directory (``stopped``: trial ids ASHA stopped)."""
    ledger = Run(run_dir).sweep_trial()
    row: dict[str, Any] = {"trial_id": ledger.get("trial_id", run_dir.name)}
    params = ledger.get("params", {})
    for n in param_names:
        row[n] = params.get(n)
    recs = [r for r in Run(run_dir).records() if r.get("stage") in stages]
    best: dict[str, float] = {}
    last_stage = None
    for r in recs:
        v = metric_of(r)
        last_stage = r["stage"]
        if not math.isnan(v):
            best[r["stage"]] = max(best.get(r["stage"], -math.inf), v)
    row["best_auroc"] = best.get(last_stage, math.nan) if last_stage else math.nan
    for s in stages:
        row[f"best_auroc_{s}"] = best.get(s, math.nan)
    row["last_stage"] = last_stage or ""
    row["epochs"] = sum(1 for r in recs if r.get("epoch", 0) > 0)  # epoch 0: the starting weights' validation
    # The run directory and ASHA's list are the truth; the ledger's status may lag behind a
    # driver that was killed between the trainer's exit and the ledger update.
    if Run(run_dir).stages_done(stages):
        row["state"] = "completed"
    elif row["trial_id"] in (stopped or set()):
        row["state"] = "stopped"
    else:
        row["state"] = ledger.get("status", "pending")
    for k in ("node_id", "node_ip", "hostname"):
        row[k] = ledger.get(k, "")
    row["run_dir"] = str(run_dir)
    row["error"] = ""
    return row


def collect(out: Path, space, stages: list[str], result_grid=None) -> "Any":
    """The results table (a pandas DataFrame), sorted best first."""
    import pandas as pd

    names = space.names
    rows: dict[str, dict[str, Any]] = {}
    trials = out / "trials"
    stopped = asha_stopped(out)
    if trials.is_dir():
        for d in sorted(trials.iterdir()):
            if d.is_dir() and Run(d).sweep_trial_path.is_file():
                rows[d.name] = trial_row(d, names, stages, stopped)
    if result_grid is not None:
        for res in result_grid:
            tid = Path(res.path).name if res.path else None
            if not tid:
                continue
            if tid not in rows:  # never got as far as its run directory
                rows[tid] = {"trial_id": tid, **{n: (res.config or {}).get(n) for n in names},
                             "best_auroc": math.nan, **{f"best_auroc_{s}": math.nan for s in stages},
                             "last_stage": "", "epochs": 0, "state": "pending", "node_id": "", "node_ip": "",
                             "hostname": "", "run_dir": str(trials / tid), "error": ""}
            if res.error is not None:
                rows[tid]["state"] = "error"
                rows[tid]["error"] = str(res.error).strip().splitlines()[-1][:300] if str(res.error).strip() else \
                    type(res.error).__name__
    cols = ["trial_id", *names, "best_auroc", *[f"best_auroc_{s}" for s in stages], "last_stage", "epochs",
            "state", "node_id", "node_ip", "hostname", "run_dir", "error"]
    df = pd.DataFrame(list(rows.values()), columns=cols)
    if df.empty:
        return df
    df["_done"] = (df["state"] == "completed").astype(int)
    df = df.sort_values(["_done", "best_auroc", "epochs"], ascending=[False, False, False], na_position="last")
    return df.drop(columns="_done").reset_index(drop=True)


def best_row(df) -> dict[str, Any] | None:
    """The completed trial with the highest best_auroc (None when no trial completed)."""
    done = df[(df["state"] == "completed") & df["best_auroc"].notna()] if len(df) else df
    if done.empty:
        return None
    return done.iloc[0].to_dict()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_all(out: Path, space, stages: list[str], data: str, result_grid=None, log=print) -> dict[str, Any]:
    """Write results.csv, best.yaml and the plots; returns a summary dict."""
    from medattn.fileio import atomic_path, write_text as atomic_write_text

    df = collect(out, space, stages, result_grid)
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    summary: dict[str, Any] = {"trials": len(df), "states": df["state"].value_counts().to_dict() if len(df) else {}}
    best = best_row(df)
    if best is not None:
        run_dir = Path(best["run_dir"])
        params = ", ".join(f"{n}={best[n]}" for n in space.names)
        header = (f"# medattn sweep {out}: best trial {best['trial_id']} ({params}), validation mean AUROC "
                  f"{best['best_auroc']:.4f} ({best['last_stage']}, {best['state']})\n"
                  f"# train it: medattn train --config {out / 'best.yaml'} --data {data} --out RUN\n")
        atomic_write_text(out / "best.yaml", header + Run(run_dir).config_text())
        summary["best"] = best
    else:
        log("no trial has completed yet: no best.yaml")
    plots = []
    done = df[(df["state"] == "completed") & df["best_auroc"].notna()] if len(df) else df
    shown, what = (done, "completed trials") if len(done) else (df[df["best_auroc"].notna()] if len(df) else df,
                                                                 "trials, none completed")
    if len(shown):
        from medattn.figures import plot_metric_vs_param

        (out / "plots").mkdir(exist_ok=True)
        hidden = len(df) - len(shown)
        for n in space.names:
            others = [m for m in space.names if m != n]
            hue = others[0] if len(others) == 1 else None
            path = out / "plots" / f"auroc_vs_{_safe(n)}.png"
            title = f"val mean AUROC vs {n}: {len(shown)} {what}" + (
                f" ({hidden} stopped/failed not shown)" if hidden and len(done) else "")
            try:
                log_x = True if space.get(n).func == "loguniform" else None
                plot_metric_vs_param(shown, n, "best_auroc", hue=hue, path=path, title=title, log_x=log_x)
                plots.append(str(path))
            except ValueError as e:  # e.g. nothing plottable
                log(f"plot for {n} skipped: {e}")
    summary["plots"] = plots
    return summary
