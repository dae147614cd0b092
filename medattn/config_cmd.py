"""List the shipped configs, or print one fully resolved (with overrides applied).

Examples:
  medattn configs
  medattn configs demo stages.*.epochs=1
"""
from __future__ import annotations

import argparse

from medattn.config import list_configs, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a shipped config name or a YAML path to print resolved")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied before printing")


def run(args: argparse.Namespace) -> int:
    if not args.config:
        configs = list_configs()
        width = max(map(len, configs)) if configs else 0
        for name, desc in configs.items():
            print(f"{name:<{width}}  {desc}")
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0
