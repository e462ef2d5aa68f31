"""`dicomflow send --to DEST (SOP_INSTANCE_UID | --study UID | --series UID)`.

Publishes one delivery request per stored instance onto DEST's delivery subject; the
scu_gateway that serves DEST (in this zone or another) executes it. Requests carry no
image data: the delivering side reads the object from storage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.scu_gateway.settings import ScuGatewaySettings, ScuSettings
from dicomflow.shared.contracts import deliveries
from dicomflow.shared.errors import ConfigError, StoreError
from dicomflow.shared.nats import natsconn
from dicomflow.shared.storage.index import Index, Record, State


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = sub.add_parser(
        "send",
        help="send stored instances to a destination",
        description=(
            "Queue a delivery to DEST of one stored instance, or of every stored instance of "
            "a study or series (looked up in the index). A running scu-gateway that serves "
            "DEST delivers them; a repeated send within the duplicate window is queued once."
        ),
    )
    add_settings_options(send)
    send.add_argument("--to", required=True, metavar="DEST", help="destination name")
    what = send.add_mutually_exclusive_group(required=True)
    what.add_argument("sop_instance_uid", nargs="?", metavar="SOP_INSTANCE_UID")
    what.add_argument("--study", metavar="UID", help="every stored instance of this study")
    what.add_argument("--series", metavar="UID", help="every stored instance of this series")
    send.set_defaults(func=lambda a: asyncio.run(_send(a)))


def check_destination(scu: ScuSettings, name: str) -> None:
    """DEST must be a valid name, and a configured one when this config lists any."""
    if not deliveries.DESTINATION_NAME.fullmatch(name):
        raise ConfigError(f"--to {name!r} is not a destination name (A-Z a-z 0-9 _ -, 1 to 32)")
    if scu.destinations and name not in scu.destinations:
        known = ", ".join(sorted(scu.destinations))
        raise ConfigError(f"unknown destination {name!r} (configured: {known})")


def _wanted(args: argparse.Namespace, record: Record) -> bool:
    if args.study:
        return bool(record.study_uid == args.study)
    if args.series:
        return bool(record.series_uid == args.series)
    return bool(record.sop_instance_uid == args.sop_instance_uid)


async def _send(args: argparse.Namespace) -> int:
    settings = settings_from(args, ScuGatewaySettings)
    check_destination(settings.scu, args.to)
    nc = await natsconn.connect_once(settings.nats, "cli")
    try:
        js = nc.jetstream()
        index = await Index.open(js)
        if args.sop_instance_uid:
            found = await index.get(args.sop_instance_uid)
            records = [found[0]] if found else []
        else:
            # A scan of the index: fine for thousands of instances, a secondary index
            # (study/series -> instances) is the way for millions.
            records = [r async for r in index.records() if _wanted(args, r)]
        records = [r for r in records if r.state is State.STORED]
        if not records:
            raise StoreError("no stored instance matches")
        dest = settings.scu.destinations.get(args.to)
        site = dest.site if dest is not None else None  # at a site of the hybrid edge
        for record in records:
            req = deliveries.from_record(record, args.to)
            await deliveries.publish(js, req, settings.nats.publish_timeout, site=site)
    finally:
        await nc.close()
    print(f"queued {len(records)} instance(s) for {args.to}", file=sys.stderr)
    return 0
