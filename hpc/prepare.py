"""``medattn prepare`` as a command: :mod:`medattn.data.prepare` (the science of the prepared
format) plus the one thing it cannot know, where a trained lungseg *run* keeps its best
checkpoint (``--lung-model RUN``; hpc.run owns run directories)."""
from __future__ import annotations

import argparse
from pathlib import Path

from medattn.data import prepare as _prepare

__doc__ = _prepare.__doc__  # the command's --help text

add_arguments = _prepare.add_arguments


def run(args: argparse.Namespace) -> int:
    if args.lung_model and Path(args.lung_model).is_dir():
        from hpc.run import Run

        args.lung_model = str(Run(args.lung_model).require().best_checkpoint_of_last_stage())
    return _prepare.run(args)
