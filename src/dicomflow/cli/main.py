"""Entry point of the `dicomflow` command.

Each command module exposes ``register(subparsers)``, which adds its subcommands and
sets ``func`` (``Callable[[argparse.Namespace], int]``) on each. ``main`` maps
dicomflow's typed errors to one line on stderr and an exit code, in one place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dicomflow.cli import (
    crypt,
    dlq,
    importer,
    instances,
    keys,
    natsconfig,
    rotation,
    send,
    stages,
    topology,
    up,
)
from dicomflow.shared.errors import ConfigError, DicomflowError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomflow",
        description=(
            "Carry DICOM images from modalities into client-side encrypted object "
            "storage over NATS JetStream, and read them back."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        up,
        stages,
        keys,
        instances,
        send,
        dlq,
        crypt,
        rotation,
        importer,
        natsconfig,
        topology,
    ):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"dicomflow: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DicomflowError as exc:
        print(f"dicomflow: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
