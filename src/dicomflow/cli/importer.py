"""`dicomflow import PATH...`: feed DICOM files into the pipeline as if they were received.

Each file is published to INGEST exactly as the scp-gateway publishes a received
instance (the Part-10 bytes, their SHA-256, the identity read from a bounded prefix),
so the encryptor and store writer treat it the same way. A file is

- *rejected* when the gateway would refuse it: the one admission of both
  (``scp_gateway.admission``) refuses a file over ``scp.max_dataset_bytes``, one that is
  not a DICOM Part-10 file or lacks a SOP Class, SOP Instance, Study or Series UID, and
  one whose message the contract refuses (e.g. a transfer syntax that is not a UID);
  with ``--verbose`` each is named on stderr with the reason;
- a *duplicate* when the index already holds its SOP Instance UID with the same
  SHA-256, or this run already published the same bytes (a copy under another name);
- *accepted* otherwise (published); *conflict* when the index holds the UID with other
  bytes: it is published and the store writer's duplicate policy decides.

A re-run after an interruption skips what the pipeline has stored; what was published
but not stored yet is published again and stored once (the message id de-duplicates
within the stream's window, the store writer's index after it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.scp_gateway.admission import CANNOT_UNDERSTAND, Arrival, Rejected, admitted
from dicomflow.scp_gateway.settings import ScpGatewaySettings
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import natsconn, topology
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.storage.index import Index

PROGRESS_EVERY = 25


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "import",
        help="feed DICOM files or folders into the pipeline as if received",
        description=(
            "Publish every DICOM Part-10 file under PATH (files, or folders searched "
            "recursively, e.g. an Orthanc storage folder or a PACS export) into the "
            "pipeline as if the scp-gateway had received it. Prints progress on stderr "
            "and a JSON summary of accepted, duplicate, conflict and rejected files on "
            "stdout. Safe to re-run after an interruption: stored instances are skipped, "
            "and nothing is stored twice."
        ),
    )
    add_settings_options(parser)
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument(
        "--calling-ae",
        default="IMPORT",
        metavar="AET",
        help="calling AE title recorded for imported instances (default IMPORT)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="name each rejected file and the reason on stderr"
    )
    parser.set_defaults(func=lambda a: asyncio.run(_import(a)))


def files_under(paths: list[Path]) -> Iterator[Path]:
    """Every regular file under ``paths``, in a stable order (so a re-run goes the same way)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise ConfigError(f"{path} is neither a file nor a folder")


def describe(path: Path, called_ae: str, calling_ae: str, max_dataset_bytes: int) -> Instance:
    """The Instance the gateway would publish for this file; raises Rejected when the
    gateway would refuse it (the same admission: size limit, identity, contract)."""
    arrival = Arrival(calling_ae=calling_ae, called_ae=called_ae)
    try:
        received = path.stat().st_size
        admission = admitted(received, lambda: path.open("rb"), arrival, max_dataset_bytes)
        with admission as (instance, _body):
            return instance
    except OSError as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"cannot be read ({type(exc).__name__})") from exc


async def _import(args: argparse.Namespace) -> int:
    settings = settings_from(args, ScpGatewaySettings)
    files = list(files_under(args.paths))
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    nc = await natsconn.connect_once(settings.nats, "import")
    try:
        js = nc.jetstream()
        await topology.ensure(js, settings.nats)
        index = await Index.open(js)
        transport = Transport(
            nc, js, publish_timeout=settings.nats.publish_timeout, spool_dir=settings.spool_dir
        )
        for done, path in enumerate(files, start=1):
            try:
                instance = await asyncio.to_thread(
                    describe,
                    path,
                    settings.scp.ae_title,
                    args.calling_ae,
                    settings.scp.max_dataset_bytes,
                )
            except Rejected as exc:
                counts["rejected"] += 1
                if args.verbose:
                    print(f"rejected {path}: {exc}", file=sys.stderr)
            else:
                counts[await _publish(transport, index, instance, path, seen)] += 1
            if done % PROGRESS_EVERY == 0 or done == len(files):
                print(f"import {done}/{len(files)}: {_line(counts)}", file=sys.stderr, flush=True)
    finally:
        await nc.drain()
    keys = ("accepted", "duplicate", "conflict", "rejected")
    print(json.dumps({k: counts[k] for k in keys}))
    return 0


async def _publish(
    transport: Transport, index: Index, instance: Instance, path: Path, seen: set[str]
) -> str:
    if instance.msg_id in seen:
        return "duplicate"
    found = await index.get(instance.sop_instance_uid)
    if found is not None and found[0].sha256 == instance.sha256:
        seen.add(instance.msg_id)
        return "duplicate"
    with path.open("rb") as body:
        await transport.publish(
            subjects.ingest_subject(instance.called_ae, instance.calling_ae),
            instance,
            body,
            instance.size,
            blob_prefix="ingest",
        )
    seen.add(instance.msg_id)
    return "accepted" if found is None else "conflict"


def _line(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {counts[k]}" for k in ("accepted", "duplicate", "conflict", "rejected"))
