"""The ``medattn`` command.

Every subcommand lives in its own module that defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps names to modules and imports a module when its command
runs, so ``medattn --help`` stays fast and needs neither torch nor DALI, submitit or Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from medattn.version import __version__
from medattn.command import run_command
from medattn.errors import MedattnError

# name -> (module, one-line help). Order = order in --help, grouped by workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    # data
    "inspect": ("medattn.data.inspect_cmd", "check a ChestX-ray14 download (counts, missing and unreadable images)"),
    "synth": ("medattn.data.synth", "write a synthetic dataset in the exact NIH layout (with lung masks)"),
    "prepare": ("hpc.prepare", "decode, resize and shard images once for fast loading"),
    # training
    "configs": ("medattn.config_cmd", "list the shipped configs, or print one resolved"),
    "train": ("hpc.train", "train a model (also under torchrun -m medattn train)"),
    "eval": ("hpc.evaluate", "evaluate a run: per-class AUROC, localisation, preds.csv"),
    "report": ("hpc.report.cli", "write the HTML/Markdown report of a run"),
    "viz": ("hpc.report.viz", "heat-map overlays for chosen images"),
    # using a trained model
    "predict": ("hpc.predict", "run a trained model on PNG/JPEG/DICOM files (CSV of probabilities)"),
    "export": ("hpc.export", "export a trained model to TorchScript or ONNX (normalisation included)"),
    "weights": ("medattn.models.weights", "fetch ImageNet weights for offline use, or list the cache"),
    # cluster
    "submit": ("jobs.submit", "submit a run to SLURM with submitit (stage chain, requeue)"),
    "sbatch": ("jobs.sbatch", "write the same run as a plain sbatch script"),
    "sweep": ("sweeps.cli", "Ray Tune sweep of tau, lambda and focal gamma"),
    "bench": ("hpc.bench", "benchmarks: prepare, loader, train (prints a table, writes JSON)"),
}

EPILOG = textwrap.dedent("""\
    typical workflow:
      medattn inspect --nih-root /data/nih --metadata-only     check the download
      medattn prepare --nih-root /data/nih --out /data/prep    decode + resize once (all cores)
      torchrun --nproc-per-node 8 -m medattn train --config agcnn_resnet50 --data /data/prep --out runs/r50
      medattn eval --run runs/r50 --split test                 AUROC table, localisation, preds.csv
      medattn predict --run runs/r50 scans/ --out preds.csv    the model on new PNG/JPEG/DICOM files
      medattn submit --config agcnn_resnet50 --data /data/prep --out /shared/runs/r50 --nodes 2 --gpus-per-node 8

    run `medattn COMMAND --help` for the options of a command.
    """)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medattn",
        description="Attention-guided chest X-ray classifiers on NIH ChestX-ray14, at cluster scale.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _command_module(name: str):
    module_name, _ = COMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # A missing optional dependency is reported by the module itself; this is a missing
        # module of ours, i.e. a command that is not built yet in this checkout.
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise MedattnError(f"`medattn {name}` is not available in this installation ({module_name} missing)") from None
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns the exit status (0 ok, 1 failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(f"medattn {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the argparse error and exits 2
        return 2
    if name == "train":
        # First thing, before torch loads: a SIGTERM/SIGUSR2 during start-up becomes an orderly
        # stop (exit 3) instead of a death by signal (hpc/stop.py).
        from hpc.stop import STOP

        STOP.install()
    try:
        module = _command_module(name)
    except MedattnError as e:
        print(f"medattn {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    return run_command(name, module, argv[1:], COMMANDS[name][1])


if __name__ == "__main__":
    sys.exit(main())
