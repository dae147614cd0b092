"""Benchmarks. Each prints a table and writes a JSON record (machine, versions, command).

  medattn bench prepare   preparing shards vs decoding the original PNGs, and reading shards
  medattn bench loader    DALI (GPU/CPU operators) vs the PyTorch DataLoader fallback
  medattn bench train     trainer images/s per stage vs a bare PyTorch loop on the same model
  medattn bench scale     every phase (inspect ... predict) at N films: time and peak memory against the count

Results go to bench-out/ by default; docs/benchmarks.md keeps the history.
"""
from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "prepare": "hpc.benchmarks.prepare",
    "loader": "hpc.benchmarks.loader",
    "train": "hpc.benchmarks.train",
    "scale": "hpc.benchmarks.scale",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, mod in BENCHES.items():
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
                            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.add_argument("--json-out", default="bench-out", help="directory (or .json file) for the JSON record")
        sp.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_module.run(args) or 0)
