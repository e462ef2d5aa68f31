"""`dicomflow ls`, `get` and `verify`: the stored instances of a running dicomflow."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.cli.reading import Reader, open_reader
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.errors import (
    ConfigError,
    ContractViolation,
    DigestMismatch,
    EnvelopeError,
    ObjectMissing,
    StoreError,
)
from dicomflow.shared.settings import ReaderSettings
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.index import Malformed, Record, State
from dicomflow.shared.storage.layout import Layout, object_key
from dicomflow.shared.storage.retrieval import fetch_unindexed


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ls = sub.add_parser(
        "ls",
        help="list stored instances",
        description="List the instances in the index, one per line.",
        epilog="A malformed index record is named on stderr, not listed, and the exit code is 1.",
    )
    add_settings_options(ls)
    ls.add_argument("--json", action="store_true", help="one JSON record per line")
    ls.set_defaults(func=lambda a: asyncio.run(_ls(a)))

    get = sub.add_parser(
        "get",
        help="fetch, verify and decrypt one stored instance",
        description=(
            "Fetch the object of SOP_INSTANCE_UID, verify its GCM tag and SHA-256, and "
            "write the DICOM file. Nothing is written unless every check passes."
        ),
    )
    add_settings_options(get)
    get.add_argument("sop_instance_uid", metavar="SOP_INSTANCE_UID")
    get.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="where to write the DICOM file (refuses to overwrite)",
    )
    get.set_defaults(func=lambda a: asyncio.run(_get(a)))

    verify = sub.add_parser(
        "verify",
        help="check that every stored object decrypts and matches the index",
        description=(
            "Decrypt every stored object (tag verified) and compare its SHA-256 with the "
            "index. Prints one line per failure or malformed index record and a summary; "
            "exits 1 if anything fails."
        ),
    )
    add_settings_options(verify)
    verify.set_defaults(func=lambda a: asyncio.run(_verify(a)))


async def _ls(args: argparse.Namespace) -> int:
    settings = settings_from(args, ReaderSettings)
    async with open_reader(settings, decrypt=False) as reader:
        count = malformed = 0
        async for record in reader.index.entries():
            if isinstance(record, Malformed):
                malformed += 1
                print(f"malformed index record {record.key}: {record.problem}", file=sys.stderr)
                continue
            if args.json:
                print(record.to_json().decode())
            else:
                print(
                    f"{record.sop_instance_uid}  {record.state.value:7}  {record.size:>11}  "
                    f"key {record.key_id}  {record.object_key}"
                )
            count += 1
    if not args.json:
        print(f"{count} instance(s)", file=sys.stderr)
    if malformed:
        print(f"{malformed} malformed index record(s), not listed", file=sys.stderr)
        return 1
    return 0


async def _get(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.exists():
        raise ConfigError(f"{out} exists; choose another output file")
    if not out.parent.is_dir():
        raise ConfigError(f"folder {out.parent} does not exist")
    settings = settings_from(args, ReaderSettings)
    if settings.storage.lookup == "layout":
        await _get_by_layout(settings, args.sop_instance_uid, out)
        return 0
    async with open_reader(settings) as reader:
        record = await reader.record(args.sop_instance_uid)
        await reader.fetch(record, out)
    return 0


async def _get_by_layout(settings: ReaderSettings, sop_instance_uid: str, out: Path) -> None:
    """`get` without the index (storage.lookup = "layout", a hybrid edge): the object's
    name follows from the SOP Instance UID under the flat and legacy layouts."""
    layout = settings.storage.layout
    if layout not in (Layout.FLAT, Layout.LEGACY):
        raise ConfigError(
            f"storage.lookup = layout needs the flat or legacy layout (not {layout}): "
            "only their object names follow from the SOP Instance UID alone"
        )
    try:
        key = object_key(
            layout,
            settings.storage.root_path,
            sop_instance_uid=sop_instance_uid,
            # Neither layout uses them; any valid UID passes their check.
            study_uid=sop_instance_uid,
            series_uid=sop_instance_uid,
            encrypted=True,
        )
    except ContractViolation:
        raise ConfigError("SOP_INSTANCE_UID is not a DICOM UID") from None
    try:
        await fetch_unindexed(
            objectstore.build_store(settings.storage),
            load_keyring(settings.encryption),
            object_key=key,
            sop_instance_uid=sop_instance_uid,
            out=out,
        )
    except ObjectMissing:
        raise StoreError(f"no stored instance with SOP Instance UID {sop_instance_uid}") from None


async def _verify(args: argparse.Namespace) -> int:
    settings = settings_from(args, ReaderSettings)
    ok = failed = pending = malformed = 0
    async with open_reader(settings) as reader:
        with tempfile.TemporaryDirectory(prefix="dicomflow-verify-") as tmp:
            async for record in reader.index.entries():
                if isinstance(record, Malformed):
                    malformed += 1
                    print(f"MALFORMED {record.key}: {record.problem}")
                    continue
                if record.state is not State.STORED:
                    pending += 1
                    continue
                problem = await _check(reader, record, Path(tmp) / "instance.dcm")
                if problem:
                    failed += 1
                    print(f"FAIL {record.sop_instance_uid}: {problem}")
                else:
                    ok += 1
    summary = {"verified": ok, "failed": failed, "pending": pending, "malformed": malformed}
    print(json.dumps(summary))
    return 1 if failed or malformed else 0


async def _check(reader: Reader, record: Record, out: Path) -> str:
    try:
        await reader.fetch(record, out)
    except (EnvelopeError, StoreError, ObjectMissing, DigestMismatch) as exc:
        return str(exc)
    out.unlink()
    return ""
