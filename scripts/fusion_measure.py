"""Measure AG-CNN's fusion stage under several settings from one trained global + local prefix.

Trains (or reuses) RUNS/base with the global and local stages, then for each variant seeds
RUNS/<name> with that prefix (hpc.run.Run.seed_from, as sweeps do), trains the fusion stage only,
evaluates the test split and prints test mean AUROC per branch. docs/methods/agcnn.md records
what it measured.

  python scripts/fusion_measure.py --data demo-out/prep --runs /tmp/fusion --config demo \\
      --variant random:agcnn.fusion_init=random --variant branches:agcnn.fusion_init=branches

Extra overrides after ``--`` apply to every run (the base included).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--config", default="demo")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,key=value")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod
    from hpc.run import Run
    from medattn.config import load_config

    runs = Path(a.runs)
    base = runs / "base"
    rc = train_mod.main(["--config", a.config, "--data", a.data, "--out", str(base), "--stages", "global,local",
                         *a.overrides])
    if rc:
        return rc
    results = {}
    for spec in a.variant:
        name, _, kv = spec.partition(":")
        extra = [x for x in kv.split(",") if x]
        over = [*a.overrides, *extra]
        out = runs / name
        Run(out).seed_from(Run(base), ["global", "local"], load_config(a.config, over))
        rc = train_mod.main(["--config", a.config, "--data", a.data, "--out", str(out), *over])
        if rc:
            return rc
        rc = evaluate_mod.main(["--run", str(out), "--split", "test", "--bootstrap", "0"])
        if rc:
            return rc
        m = json.loads((Run(out).eval_dir("test") / "metrics.json").read_text())
        results[name] = {b: round(v["mean"], 4) for b, v in m["auroc"].items()}
    print(json.dumps(results, indent=1))
    (runs / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
