"""Entry point of the `dicomflow` command.

Each command module exposes ``register(subparsers)``, which adds its subcommands and
sets ``func`` (``Callable[[argparse.Namespace], int]``) on each. ``main`` maps
dicomflow's typed errors to one line on stderr and an exit code, in one place.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from dicomflow.cli import (
    cloud,
    crypt,
    dlq,
    edge,
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
from dicomflow.cli.process import exit_process, forbid_core_dumps
from dicomflow.cli.process import install as install_exit
from dicomflow.shared.errors import ConfigError, DicomflowError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGPIPE = 128 + signal.SIGPIPE


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
        cloud,
        edge,
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
        sys.stdout.flush()  # a reader that went away shows here, not at exit
    except BrokenPipeError:
        return _stdout_closed()
    except ConfigError as exc:
        print(f"dicomflow: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DicomflowError as exc:
        print(f"dicomflow: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return code


def _stdout_closed() -> int:
    """The reader of stdout went away (``dicomflow ls | head``): end quietly, with the
    status a shell reports for a tool killed by SIGPIPE. What is still buffered goes to
    /dev/null, so the flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_SIGPIPE


def run() -> NoReturn:
    """The ``dicomflow`` command as a process: no core dumps (every service and every
    command that loads a key starts here), ``main``, then ``exit_process``."""
    try:
        forbid_core_dumps()
        install_exit()  # how it will end (exit_process), decided and reported at start
        code = main()
    except SystemExit as exc:  # argparse: --help, or a usage error already printed
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 (printed as Python would, then exit 1)
        traceback.print_exc()
        code = EXIT_FAILURE
    exit_process(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or EXIT_OK
    print(exc.code, file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    run()
