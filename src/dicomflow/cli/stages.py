"""`dicomflow scp-gateway | encryptor | store-writer | scu-gateway`: one stage each, as a
Deployment runs it."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.encryptor import service as encryptor
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.scp_gateway import service as scp_gateway
from dicomflow.scp_gateway.settings import ScpGatewaySettings
from dicomflow.scu_gateway import service as scu_gateway
from dicomflow.scu_gateway.settings import ScuGatewaySettings
from dicomflow.shared.settings import ServiceSettings
from dicomflow.shared.stage import runner
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.store_writer import service as store_writer
from dicomflow.store_writer.settings import StoreWriterSettings

Serve = Callable[[Any, asyncio.Event, Telemetry], Awaitable[None]]

STAGES: dict[str, tuple[type[ServiceSettings], Serve, str]] = {
    "scp-gateway": (
        ScpGatewaySettings,
        scp_gateway.serve,
        "DICOM receiver: C-ECHO and C-STORE into the INGEST stream.",
    ),
    "encryptor": (
        EncryptorSettings,
        encryptor.serve,
        "Seals INGEST messages in A1 envelopes and publishes them to SEALED.",
    ),
    "store-writer": (
        StoreWriterSettings,
        store_writer.serve,
        "Writes SEALED envelopes to object storage, indexes them, emits dicom.stored.",
    ),
    "scu-gateway": (
        ScuGatewaySettings,
        scu_gateway.serve,
        "DICOM sender: routes dicom.stored events by rules and delivers instances to "
        "the configured destinations with C-STORE (decrypted, verified, retried).",
    ),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, (_, _, summary) in STAGES.items():
        parser = sub.add_parser(
            name,
            help=summary,
            description=summary
            + (
                " Settings come from DICOMFLOW_* environment variables and the config file; "
                "see docs/configuration.md. SIGTERM drains in-flight work and exits 0."
            ),
        )
        add_settings_options(parser)
        parser.set_defaults(func=_run, stage=name)


def _run(args: argparse.Namespace) -> int:
    settings_cls, serve, _ = STAGES[args.stage]
    settings = settings_from(args, settings_cls)
    return runner.run(
        args.stage, lambda stop, telemetry: serve(settings, stop, telemetry), settings
    )
