"""`dicomflow topology`: create or update the JetStream streams and buckets.

With least-privilege NATS users the services only verify the topology at start; this
command, run with the admin credentials (``nats.nkey_seed_file`` of the admin user),
creates it. `dicomflow up` and the Kubernetes Job ``dicomflow-topology`` run it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.shared import natsconn, topology
from dicomflow.shared.settings import NatsSettings, ServiceSettings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "topology",
        help="create or update the JetStream streams and buckets (as the admin user)",
        description=(
            "Create or update every stream, the index key-value bucket and the blob "
            "buckets, whatever nats.manage_topology says. Needs a NATS user allowed to "
            "manage streams: the admin user of `dicomflow nats-config`."
        ),
    )
    add_settings_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args, ServiceSettings)
    asyncio.run(setup(settings.nats))
    print("topology is in place: " + ", ".join(topology.all_stream_names()), file=sys.stderr)
    return 0


async def setup(nats: NatsSettings) -> None:
    managing = nats.model_copy(update={"manage_topology": True})
    nc = await natsconn.connect_once(managing, "topology")
    try:
        await topology.ensure(nc.jetstream(), managing, migrate=True)
    finally:
        await nc.close()
