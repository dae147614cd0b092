"""What a run is on the command line, spelled once for everyone who launches one.

``medattn train`` and the launchers above it (``submit`` and ``sbatch`` in jobs/, ``sweep`` in
sweeps/) take the same run arguments from :func:`run_arguments_parser` (a parent parser, as
dinov2's launchers take their trainer's), and write them back into jobs, scripts and trials with
:func:`argv_of`, the one function that turns parsed arguments into a command line.

This module imports neither torch nor any other heavy package: ``medattn submit --help`` and
``medattn sweep --help`` build their parsers from it and must answer at once.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def run_arguments_parser(*, stages: bool = True, title: str = "the run",
                         out_help: str = "run directory; rerunning on it resumes",
                         overrides_help: str = "config overrides") -> argparse.ArgumentParser:
    """The parent parser of a run: ``--config``, ``--data``, ``--out``, ``--stages`` and the
    ``key=value`` overrides.

    Args:
        stages: include ``--stages`` (a sweep trains whatever stages its trials need: no ``--stages``).
        title: the help section the arguments are listed under.
        out_help, overrides_help: what ``--out`` and the overrides are for this command.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group(title)
    g.add_argument("--config", required=True, help="shipped config name (medattn configs) or a YAML path")
    g.add_argument("--data", required=True,
                   help="prepared directory (medattn prepare --out); on a cluster, on the shared filesystem")
    g.add_argument("--out", required=True, help=out_help)
    if stages:
        g.add_argument("--stages", default=None,
                       help="comma-separated stages to run (default: every stage not done yet; the stages before "
                            "them must be done)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    return p


def config_ref(config: str | os.PathLike) -> str:
    """How a job started elsewhere names the config: a shipped name as given (every node has the
    package), a YAML file by its absolute path (the job's working directory is not ours).
    The same rule as ``load_config``: a shipped name wins over a file of the same name."""
    from medattn.config import CONFIG_DIR, resolve_config_path
    from medattn.errors import ConfigError

    s = str(config)
    try:
        path = resolve_config_path(s)
    except ConfigError:
        return s  # loading the config reports it, naming what is wrong
    return s if path == CONFIG_DIR / f"{s}.yaml" else str(path.absolute())


def argv_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The command line that ``parser`` parses back into ``args`` (for the arguments ``parser``
    declares; others in ``args``, such as cluster flags, are left out).

    Options come first, in the parser's order, then the positionals: every value that is set is
    written, defaults included, so a job means the same even if a later version changes a
    default. Internal flags (help suppressed: what a batch script adds itself) are left out.
    """
    opts: list[str] = []
    tail: list[str] = []
    # argparse keeps a parser's actions (parents' included) in ``_actions``; there is no public view.
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or not hasattr(args, a.dest):  # --help is never in args
            continue
        value: Any = getattr(args, a.dest)
        if not a.option_strings:  # positional: nargs "*" / "+" lists, or one value
            tail += [str(v) for v in value] if isinstance(value, list) else ([] if value is None else [str(value)])
            continue
        flag = a.option_strings[-1]  # the long spelling (declared last by convention here)
        if a.nargs == 0:  # store_true / store_false
            if value is not None and value != a.default:
                opts.append(flag)
        elif isinstance(value, list):  # a repeatable option (action="append")
            for v in value:
                opts += [flag, str(v)]
        elif value is not None:
            opts += [flag, str(value)]
    return opts + tail


def command_line(config: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                 stages: list[str] | None = None, overrides: list[str] | None = None) -> list[str]:
    """The ``medattn train`` arguments of a run, as launchers write them into jobs and trials."""
    args = argparse.Namespace(config=str(config), data=str(data), out=str(out),
                              stages=",".join(stages) if stages else None, overrides=list(overrides or []))
    return argv_of(run_arguments_parser(), args)


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of parsed run arguments with the config, data and run directory named as a job on
    another node (another working directory) must see them."""
    out = argparse.Namespace(**vars(args))
    out.config = config_ref(args.config)
    out.data = str(Path(args.data).expanduser().resolve())
    out.out = str(Path(args.out).expanduser().resolve())
    return out
