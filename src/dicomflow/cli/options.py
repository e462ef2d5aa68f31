"""Options shared by commands that act on a running dicomflow: where its settings are."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from dicomflow.embedded.layout import DataDir
from dicomflow.shared.settings import ServiceSettings, load_settings

S = TypeVar("S", bound=ServiceSettings)


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: $DICOMFLOW_CONFIG); DICOMFLOW_* variables override it",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="work on the embedded instance that `dicomflow up --data-dir DIR` runs",
    )


def settings_from(args: argparse.Namespace, cls: type[S], **overrides: Any) -> S:
    config: Path | None = args.config
    if args.data_dir is not None:
        config = DataDir(args.data_dir).existing_config()
    return load_settings(cls, config, **overrides)
