"""`dicomflow topology`: create or update the JetStream streams and buckets.

With least-privilege NATS users the services only verify the topology at start; this
command, run with the admin credentials (``nats.nkey_seed_file`` of the admin user),
creates it. `dicomflow up` and the Kubernetes Job ``dicomflow-topology`` run it.

In the hybrid edge the part made follows ``nats.zone``: ``cloud`` (with ``--site`` for
every site: their sourcing and downlink durables), ``edge-local``, or ``edge-sealed``
(with ``--site`` naming the site), as `dicomflow cloud` and `dicomflow edge` make them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import hybridtopology, natsconn, topology, zones
from dicomflow.shared.nats.zones import Zone
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
    parser.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME",
        help="hybrid edge: a site the cloud sources (nats.zone = cloud; repeat for each), "
        "or the site of this edge (nats.zone = edge-sealed)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args, ServiceSettings)
    sites = [zones.check_site(s) for s in args.site]
    zone = settings.nats.zone
    if zone is Zone.SINGLE:
        if sites:
            raise ConfigError("--site is for the hybrid edge (nats.zone cloud or edge-sealed)")
        asyncio.run(setup(settings.nats))
        names: Sequence[str] = topology.all_stream_names()
    else:
        if (zone is Zone.CLOUD and not sites) or (zone is Zone.EDGE_SEALED and len(sites) != 1):
            raise ConfigError(
                f"nats.zone = {zone.value}: name "
                + ("every site with --site" if zone is Zone.CLOUD else "this edge's site: --site")
            )
        asyncio.run(setup_hybrid(settings.nats, sites))
        names = zones.streams(zone)
    print("topology is in place: " + ", ".join(names), file=sys.stderr)
    return 0


async def setup_hybrid(nats: NatsSettings, sites: list[str]) -> None:
    nc = await natsconn.connect_once(nats, "topology")
    try:
        js = nc.jetstream()
        if nats.zone is Zone.CLOUD:
            await hybridtopology.ensure_cloud(js, nats, sites)
        elif nats.zone is Zone.EDGE_LOCAL:
            await hybridtopology.ensure_edge_local(js, nats)
        else:
            await hybridtopology.ensure_edge_sealed(js, nats, sites[0])
    finally:
        await nc.close()


async def setup(nats: NatsSettings) -> None:
    managing = nats.model_copy(update={"manage_topology": True})
    nc = await natsconn.connect_once(managing, "topology")
    try:
        await topology.ensure(nc.jetstream(), managing, migrate=True)
    finally:
        await nc.close()
