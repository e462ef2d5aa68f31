"""`dicomflow edge --join BUNDLE`: one hospital's edge of the hybrid topology.

Runs a leaf nats-server (JetStream domain = the site's name; client port on loopback;
one TLS leafnode remote to the cloud and no leafnodes listener, so nothing connects
into the site), the scp-gateway and the encryptor, with the site's master key kept in
the edge's data folder. Plaintext stays in the leaf's LOCAL account; only sealed
messages and blobs, in its EDGE account, are sourced by the cloud. While the link is
down the edge keeps accepting (store and forward, within ``nats.ingest_max_bytes``).

With ``--forward NAME=AET@HOST:PORT`` it also runs the scu-gateway, delivering to that
local PACS what the cloud queues for destination NAME at this site (`dicomflow send --to
NAME` or a routing rule in the cloud, with ``site`` = this site): the requests come down
the same outbound link (the site's DELIVERY sources the cloud's ``downlink-<site>``), the
objects are read from storage directly and decrypted here.

`get` at the edge (``--data-dir`` of the edge) decrypts with the site's master key and
reads storage directly (``--objects``), finding an object by the name the flat layout
computes from the SOP Instance UID: the index is in the cloud.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import cast

from dicomflow.cli.natsconfig import Bundle, new_seed
from dicomflow.cli.up import (
    DEFAULT_CALLING_AE,
    WARNING,
    forwarding,
    receiver_arguments,
    stage_credentials,
)
from dicomflow.embedded.layout import to_toml
from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer
from dicomflow.embedded.sites import EdgeDir, SiteBundle
from dicomflow.embedded.supervisor import Supervisor
from dicomflow.scp_gateway.settings import ScpSettings
from dicomflow.shared.crypto.keyring import generate_master_key_file
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import hybridconfig, hybridtopology, natscerts, natsconn
from dicomflow.shared.nats.natsauth import ADMIN, ServerTls
from dicomflow.shared.nats.zones import Zone
from dicomflow.shared.settings import NatsSettings

STAGE_ORDER = ("encryptor", "scp-gateway")  # downstream first
SCU_STAGE = "scu-gateway"  # with --forward, started first
SEALED_SEED_ENV = "DICOMFLOW_NATS_SEALED__NKEY_SEED_FILE"  # its EDGE identity


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "edge",
        help="run a hospital's edge of the hybrid topology: leaf nats-server, gateway, encryptor",
        description=(
            "Run a leaf nats-server connecting out to the cloud over TLS (it listens on "
            "loopback only), the scp-gateway and the encryptor. The first run needs "
            "--join BUNDLE, the site bundle of `dicomflow cloud add-site`, which is installed "
            "into DIR/keys/site. Creates a development master key under DIR/keys if none is "
            "there. Ctrl-C or SIGTERM stops everything cleanly."
        ),
    )
    parser.add_argument(
        "--join", type=Path, metavar="BUNDLE", help="site bundle from `dicomflow cloud add-site`"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("dicomflow-edge"),
        metavar="DIR",
        help="state folder (default: ./dicomflow-edge)",
    )
    receiver_arguments(parser)
    parser.add_argument(
        "--objects",
        type=Path,
        metavar="DIR",
        help="where `get` at this site reads the stored objects (on one machine: the "
        "cloud's DIR/objects)",
    )
    parser.add_argument(
        "--forward",
        action="append",
        metavar="NAME=AET@HOST:PORT",
        default=[],
        help="also run the scu-gateway, delivering to this PACS at the site what the cloud "
        "queues for destination NAME at this site (`send --to NAME`, routing rules in the "
        "cloud); needs --objects; repeat for more",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9290,
        metavar="PORT",
        help="first of the loopback ports for the encryptor's, scp-gateway's (and "
        "scu-gateway's) /metrics (0: free ports)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    allowed = args.allow_ae or [DEFAULT_CALLING_AE]
    ScpSettings(ae_title=args.ae_title, allowed_calling_aes=allowed)  # validates AE titles
    data = EdgeDir(args.data_dir.resolve())
    for folder in (data.root, data.keys, data.logs):
        folder.mkdir(parents=True, exist_ok=True)
    data.keys.chmod(0o700)
    site, cloud_urls = _join(data, args.join)
    scu = _forwarding(args, site)
    if not data.dev_key.exists():
        generate_master_key_file(data.dev_key)
        print(WARNING.format(path=data.dev_key), file=sys.stderr)
    bundle = Bundle(data.nats_security)
    local, edge = _users(bundle)
    installed = data.site
    natscerts.write_private(
        bundle.server_config,
        hybridconfig.edge_config(
            site,
            local,
            edge,
            cloud_urls=cloud_urls,
            leaf_seed=installed.seed.read_text().strip(),
            tls=ServerTls(
                cert_file=str(installed.cert),
                key_file=str(installed.key),
                ca_file=str(installed.ca),
                verify_clients=False,
            ),
            max_payload=EMBEDDED_MAX_PAYLOAD,
        ).encode(),
    )

    with Supervisor(
        data.config,
        data.logs,
        metrics_base=args.metrics_port,
        metrics_order=(*STAGE_ORDER, SCU_STAGE),
        revive="leaf",
    ) as supervisor:
        nats = supervisor.start_nats(NatsServer(data.nats_store, config_file=bundle.server_config))
        config = _config(data, nats.url, args, allowed, bundle)
        if scu is not None:
            config["scu"] = scu
        data.config.write_text(to_toml(config))
        asyncio.run(_topology(nats.url, bundle, site))
        sealed = {SEALED_SEED_ENV: str(bundle.seed(hybridconfig.SEALED_SCU))}
        for name in (SCU_STAGE, *STAGE_ORDER) if scu is not None else STAGE_ORDER:
            supervisor.add(
                name,
                {
                    **stage_credentials(bundle, name, tls=False),
                    **(sealed if name == SCU_STAGE else {}),
                },
            )
        supervisor.start()
        if supervisor.wait_for_port(args.host, args.port):
            print(
                f"\ndicomflow edge {site} is up.\n"
                f"  Send DICOM to:     AE title {args.ae_title}, port {args.port} "
                f"(listening on {args.host}); calling AEs {', '.join(allowed)}\n"
                f"  Cloud:             {', '.join(cloud_urls)} (outbound TLS leafnode link)\n"
                f"  NATS (JetStream):  {nats.url}, domain {site}, state in {data.nats_store}\n"
                f"  Master key:        {data.dev_key}\n"
                f"{_forwards(args, site)}"
                f"  Logs:              {data.logs}\n"
                f"  Read back:         dicomflow get --data-dir {data.root} "
                "SOP_INSTANCE_UID -o FILE.dcm\n"
                "Press Ctrl-C to stop.",
                file=sys.stderr,
                flush=True,
            )
        supervisor.run()
        print("dicomflow: stopping (in-flight work finishes first)...", file=sys.stderr)
    print("dicomflow: stopped.", file=sys.stderr)
    return 0


def _forwarding(args: argparse.Namespace, site: str) -> dict[str, object] | None:
    """The [scu] table of ``--forward``: destinations at this site, no rule (the cloud
    routes); None without any."""
    table = forwarding(args.forward, args.ae_title)
    if table is None:
        return None
    if args.objects is None:
        raise ConfigError(
            "--forward needs --objects DIR: the scu-gateway reads the stored objects there"
        )
    for spec in args.forward:
        if "=" not in spec:
            raise ConfigError(
                f"--forward {spec!r}: name the destination (NAME=AET@HOST:PORT), the name "
                "the cloud queues for (`send --to NAME`)"
            )
    made = cast(dict[str, dict[str, object]], table["destinations"])
    destinations = {name: {**dest, "site": site} for name, dest in made.items()}
    return {"ae_title": table["ae_title"], "destinations": destinations}


def _forwards(args: argparse.Namespace, site: str) -> str:
    if not args.forward:
        return ""
    return (
        f"  Delivers to:       {', '.join(args.forward)} (what the cloud queues for these "
        f"names at site {site})\n"
    )


def _join(data: EdgeDir, join: Path | None) -> tuple[str, list[str]]:
    """Install the site bundle on the first run; afterwards it must name the same site."""
    installed = data.site
    if join is not None:
        site, urls = SiteBundle(join).read()
        if installed.manifest.exists():
            current, _ = installed.read()
            if current != site:
                raise ConfigError(
                    f"{data.root} is the edge of site {current}; --join {join} is for site "
                    f"{site}: use another --data-dir"
                )
        if join.resolve() != installed.root.resolve():
            SiteBundle(join).copy_to(installed.root)
        return site, urls
    if not installed.manifest.exists():
        raise ConfigError(
            f"{data.root} has joined no site yet: pass --join BUNDLE (made by "
            "`dicomflow cloud add-site NAME --out BUNDLE`)"
        )
    return installed.read()


def _users(bundle: Bundle) -> tuple[dict[str, str], dict[str, str]]:
    """Seeds of the LOCAL and EDGE users (made once); their public keys."""
    for folder in (bundle.root, bundle.creds):
        folder.mkdir(parents=True, exist_ok=True)
    bundle.creds.chmod(0o700)
    keys: dict[str, str] = {}
    for user in (*hybridconfig.LOCAL_USERS, *hybridconfig.EDGE_USERS):
        path = bundle.seed(user)
        if not path.exists():
            natscerts.write_private(path, (new_seed() + "\n").encode())
        keys[user] = natsconn.public_key(path.read_text())
    local = {u: keys[u] for u in hybridconfig.LOCAL_USERS}
    edge = {u: keys[u] for u in hybridconfig.EDGE_USERS}
    return local, edge


async def _topology(url: str, bundle: Bundle, site: str) -> None:
    local = NatsSettings(servers=[url], nkey_seed_file=bundle.seed(ADMIN))
    nc = await natsconn.connect_once(local, "topology")
    try:
        await hybridtopology.ensure_edge_local(nc.jetstream(), local)
    finally:
        await nc.close()
    sealed = NatsSettings(servers=[url], nkey_seed_file=bundle.seed(hybridconfig.EDGE_ADMIN))
    nc = await natsconn.connect_once(sealed, "topology")
    try:
        await hybridtopology.ensure_edge_sealed(nc.jetstream(), sealed, site)
    finally:
        await nc.close()


def _config(
    data: EdgeDir, url: str, args: argparse.Namespace, allowed: list[str], bundle: Bundle
) -> dict[str, dict[str, object]]:
    installed = data.site
    config: dict[str, dict[str, object]] = {
        # The LOCAL admin's connection (`dlq` at the site); each stage overrides the seed.
        "nats": {"servers": [url], "nkey_seed_file": bundle.seed(ADMIN), "zone": Zone.EDGE_LOCAL},
        # Read by the encryptor only: its identity in the EDGE account.
        "nats_sealed": {
            "servers": [url],
            "nkey_seed_file": bundle.seed(hybridconfig.SEALED_ENCRYPTOR),
            "zone": Zone.EDGE_SEALED,
            "manage_topology": False,
        },
        "scp": {
            "ae_title": args.ae_title,
            "host": args.host,
            "port": args.port,
            "allowed_calling_aes": allowed,
        },
        "encryption": {
            "master_key": {"id": 1, "path": data.dev_key},
            "signing_key": installed.signing_key,
        },
        "telemetry": {"metrics_host": "127.0.0.1"},
    }
    if args.objects is not None:
        config["storage"] = {
            "backend": "local",
            "local_path": args.objects.resolve(),
            "layout": "flat",
            "lookup": "layout",
        }
    return config
