"""Shared `--config` / `--set` handling for every entry point."""

from __future__ import annotations

import argparse

from musetalk.config import DEFAULT_CONFIG, AppConfig, load_config
from musetalk.errors import InputError, MuseTalkError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add --config and repeatable --set KEY=VALUE to a parser."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set blend.blend_mode=poisson (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """Load the config named by parsed --config/--set arguments."""
    return load_config(args.config, args.overrides)


def exit_code(exc: MuseTalkError) -> int:
    """The exit code of an entry point that failed with `exc`: 2 for bad input, 1 for anything else."""
    return 2 if isinstance(exc, InputError) else 1
