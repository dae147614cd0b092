"""Run one command module (``add_arguments(parser)`` + ``run(args) -> int``) with the CLI's
parsing and error handling: the ``medattn`` command and the in-process ``main(argv)`` entry
points of the commands (``hpc.train.main``, ``hpc.evaluate.main``, used by tests and scripts)
go through this one path, so they parse and fail the same way."""
from __future__ import annotations

import argparse
import sys
from types import ModuleType

from medattn.errors import MedattnError


def command_parser(name: str, module: ModuleType, help_: str = "") -> argparse.ArgumentParser:
    """The command's parser: the arguments it shares with others (``module.parents()``, e.g. the
    run's arguments that ``train``, ``submit`` and ``sbatch`` all take) plus its own."""
    desc = (module.__doc__ or help_).strip()
    parents = module.parents() if hasattr(module, "parents") else []
    p = argparse.ArgumentParser(prog=f"medattn {name}", description=desc, parents=parents,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p


def run_command(name: str, module: ModuleType, argv: list[str], help_: str = "") -> int:
    """Parse ``argv`` for ``module`` and run it. Returns the exit status: the command's, 2 for bad
    input (the error is printed without a traceback), 130 for an interrupt."""
    try:
        p = command_parser(name, module, help_)
        # intermixed: `key=value` overrides may come before or after options (not possible for
        # commands with sub-commands, e.g. `bench`, which parse normally)
        try:
            args = p.parse_intermixed_args(argv)
        except TypeError:
            args = p.parse_args(argv)
        return int(module.run(args) or 0)
    except MedattnError as e:
        print(f"medattn {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"medattn {name}: interrupted", file=sys.stderr)
        return 130
