"""Shared `--config` / `--set` handling for every entry point."""

from __future__ import annotations

import argparse

from musetalk.config import DEFAULT_CONFIG, AppConfig, load_config


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
