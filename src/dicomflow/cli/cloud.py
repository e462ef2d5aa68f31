"""`dicomflow cloud`: the hub of the hybrid edge, and `dicomflow cloud add-site NAME`.

`cloud` runs the hub nats-server (JetStream domain ``cloud``, a TLS leafnode listener
verifying the sites' client certificates, no route, gateway or remote) and the
store-writer, storing under ``DIR/objects``. It holds no master key and no plaintext.

With ``--routing FILE`` (a TOML file with an ``[scu]`` table: destinations at sites,
``site = NAME`` and no host, and routing rules) it also runs the scu-gateway as the
router: stored instances the rules match are queued for those destinations, and the
cloud's ``downlink-<site>`` durable carries them to the site's scu-gateway. `dicomflow
send --config DIR/dicomflow.toml --to NAME` queues for them too, with or without it.

`cloud add-site NAME --out BUNDLE` registers a site (its leaf user's public NKey, its
encryptor's public signing key) and writes the site bundle the operator carries to the
hospital (``embedded.sites.SiteBundle``). A running `cloud` notices a new site within
seconds and takes it into use: the hub re-reads its config (SIGHUP), the site's sourcing
and downlink durable are made, the store-writer restarts trusting its signing key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import tomllib
from pathlib import Path

from nats.errors import Error as NatsError
from pydantic import ValidationError

from dicomflow.cli.natsconfig import Bundle, new_seed
from dicomflow.cli.up import stage_credentials
from dicomflow.embedded.layout import to_toml
from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer
from dicomflow.embedded.sites import CloudDir, SiteBundle
from dicomflow.embedded.supervisor import Supervisor
from dicomflow.scu_gateway.settings import ScuSettings
from dicomflow.shared.crypto.sealsign import PUBLIC_NAME, generate_signing_key_pair
from dicomflow.shared.errors import BrokerUnavailable, ConfigError
from dicomflow.shared.nats import hybridconfig, hybridtopology, natscerts, natsconn, zones
from dicomflow.shared.nats.natsauth import ADMIN, ServerTls
from dicomflow.shared.settings import NatsSettings, problems

STAGE = "store-writer"
ROUTER_STAGE = "scu-gateway"  # with --routing: the router, holding no key
SITES_INTERVAL = 2.0  # seconds between looks for sites added while the cloud runs
DEFAULT_LEAFNODE_PORT = 7422
SERVER_CERT = "leafnode"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "cloud",
        help="run the cloud of the hybrid edge: hub nats-server and store-writer",
        description=(
            "Run the hub nats-server of the hybrid topology (JetStream domain cloud; sites "
            "connect to its TLS leafnode listener, it connects to none) and the store-writer, "
            "storing encrypted objects under DIR/objects. Sites are added with "
            "`dicomflow cloud add-site NAME --out BUNDLE`, also while it runs."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("dicomflow-cloud"),
        metavar="DIR",
        help="state folder (default: ./dicomflow-cloud)",
    )
    parser.add_argument(
        "--leafnode-host",
        default="0.0.0.0",  # noqa: S104 (sites connect from outside)
        help="address of the leafnode listener (default: all interfaces)",
    )
    parser.add_argument(
        "--leafnode-port",
        type=int,
        default=DEFAULT_LEAFNODE_PORT,
        help=f"port of the leafnode listener (default: {DEFAULT_LEAFNODE_PORT})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9190,
        metavar="PORT",
        help="loopback port of the store-writer's /metrics, /livez, /readyz (0: a free one)",
    )
    parser.add_argument(
        "--routing",
        type=Path,
        metavar="FILE",
        help="TOML file with an [scu] table: destinations at sites ([scu.destinations.NAME] "
        "ae_title, site = SITE; no host) and [[scu.rules]]; runs the scu-gateway as router",
    )
    parser.set_defaults(func=run)
    actions = parser.add_subparsers(dest="cloud_action", metavar="ACTION")
    add = actions.add_parser(
        "add-site",
        help="register a site and write its bundle (credentials to carry to the site)",
        description=(
            "Register site NAME (its JetStream domain) and write its bundle to --out: the "
            "leaf's NKey seed, its client certificate signed by the cloud's CA, the cloud's "
            "CA certificate and leafnode URL, and the site encryptor's signing key pair "
            "(the cloud keeps only the public key). Secret files are 0600: carry the folder "
            "to the site and delete the copy."
        ),
    )
    add.add_argument("name", metavar="NAME", help="site name: 2-32 of a-z 0-9 -")
    add.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="output folder")
    add.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the cloud's state folder (default: ./dicomflow-cloud)",
    )
    add.add_argument(
        "--cloud-url",
        action="append",
        metavar="URL",
        help=f"leafnode URL the site connects to, repeat for more "
        f"(default: tls://127.0.0.1:{DEFAULT_LEAFNODE_PORT})",
    )
    add.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        metavar="HOST",
        help="names and addresses in the cloud's leafnode certificate, when it is first made "
        "(default: localhost 127.0.0.1)",
    )
    add.set_defaults(func=add_site)


def add_site(args: argparse.Namespace) -> int:
    site = zones.check_site(args.name)
    cloud = CloudDir(args.data_dir.resolve())
    urls = args.cloud_url or [f"tls://127.0.0.1:{DEFAULT_LEAFNODE_PORT}"]
    for url in urls:
        if not url.startswith("tls://"):
            raise ConfigError(f"--cloud-url {url}: the leafnode link is TLS only (tls://HOST:PORT)")
    registration = cloud.sites / f"{site}.json"
    if registration.exists():
        raise ConfigError(f"site {site} is already registered ({registration})")
    out = SiteBundle(args.out)
    if out.root.exists() and any(out.root.iterdir()):
        raise ConfigError(f"{out.root} exists and is not empty; choose a new folder")
    ca = _credentials(cloud, args.hosts)
    out.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.root.chmod(0o700)
    seed = new_seed()
    natscerts.write_private(out.seed, (seed + "\n").encode())
    natscerts.issue(ca, f"dicomflow site {site}").write(out.cert, out.key)
    out.ca.write_bytes(cloud.nats.ca.read_bytes())
    generate_signing_key_pair(out.root)
    out.write_manifest(site, urls)
    cloud.trusted.mkdir(parents=True, exist_ok=True)
    (cloud.trusted / f"{site}.pub.pem").write_bytes(out.signing_public.read_bytes())
    cloud.sites.mkdir(parents=True, exist_ok=True)
    registration.write_text(
        json.dumps({"leaf_public_key": natsconn.public_key(seed), "cloud_urls": urls}) + "\n"
    )
    print(
        f"site {site} registered; its bundle is {out.root} (secret: carry it to the site, "
        f"then delete this copy). Start it there with:\n"
        f"  dicomflow edge --join {out.root}\n"
        "A running `dicomflow cloud` takes the site into use within seconds.",
        file=sys.stderr,
    )
    return 0


def _credentials(cloud: CloudDir, hosts: list[str]) -> natscerts.Issued:
    """The cloud's CA, leafnode certificate and users' seeds: made once, then reused."""
    bundle = cloud.nats
    for folder in (cloud.root, cloud.keys, bundle.root, bundle.creds, bundle.tls):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (cloud.keys, bundle.creds, bundle.tls):
        folder.chmod(0o700)
    if bundle.ca.exists() and bundle.key("ca").exists():
        ca = natscerts.load(bundle.ca, bundle.key("ca"))
    else:
        ca = natscerts.new_ca("dicomflow cloud CA")
        ca.write(bundle.ca, bundle.key("ca"))
    if not bundle.cert(SERVER_CERT).exists():
        natscerts.issue(ca, hosts[0], hosts=hosts).write(
            bundle.cert(SERVER_CERT), bundle.key(SERVER_CERT)
        )
    for user in hybridconfig.CLOUD_USERS:
        if not bundle.seed(user).exists():
            natscerts.write_private(bundle.seed(user), (new_seed() + "\n").encode())
    return ca


def run(args: argparse.Namespace) -> int:
    if not 0 < args.leafnode_port < 65536:
        raise ConfigError(f"--leafnode-port {args.leafnode_port} is not a TCP port (1-65535)")
    cloud = CloudDir(args.data_dir.resolve())
    sites = cloud.registered()
    if not sites:
        raise ConfigError(
            f"no site is registered in {cloud.root}: add one first with "
            f"`dicomflow cloud add-site NAME --out BUNDLE --data-dir {cloud.root}`"
        )
    _credentials(cloud, ["localhost", "127.0.0.1"])
    scu = _routing(args.routing, sites) if args.routing is not None else None
    for folder in (cloud.objects, cloud.logs):
        folder.mkdir(parents=True, exist_ok=True)
    bundle = cloud.nats
    _server_config(cloud, args, sites)

    with Supervisor(
        cloud.config,
        cloud.logs,
        metrics_base=args.metrics_port,
        metrics_order=(STAGE, ROUTER_STAGE),
        revive="hub",
    ) as supervisor:
        nats = supervisor.start_nats(
            NatsServer(
                cloud.nats_store,
                config_file=bundle.server_config,
                log_file=cloud.logs / "nats-server.log",
            )
        )
        admin = NatsSettings(servers=[nats.url], nkey_seed_file=bundle.seed(ADMIN))
        asyncio.run(_topology(admin, sites))
        config = _config(cloud, nats.url, bundle)
        if scu is not None:
            config["scu"] = scu
        cloud.config.write_text(to_toml(config))
        for name in (STAGE, ROUTER_STAGE) if scu is not None else (STAGE,):
            supervisor.add(name, stage_credentials(bundle, name, tls=False))
        supervisor.start()
        print(
            f"\ndicomflow cloud is up.\n"
            f"  Leafnode listener: {args.leafnode_host}:{args.leafnode_port} (TLS, client "
            f"certificates of the cloud's CA)\n"
            f"  Sites:             {', '.join(sorted(sites))}\n"
            f"  Encrypted objects: {cloud.objects}\n"
            f"  NATS (JetStream):  {nats.url}, domain cloud, state in {cloud.nats_store}\n"
            f"  Logs:              {cloud.logs}\n"
            f"  Listing:           dicomflow ls --config {cloud.config}\n"
            "Press Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        next_look = time.monotonic() + SITES_INTERVAL

        def look_for_sites() -> None:
            nonlocal next_look, sites
            if time.monotonic() < next_look:
                return
            next_look = time.monotonic() + SITES_INTERVAL
            try:
                added = cloud.registered()
            except ValueError:  # a registration being written: next time
                return
            if added != sites:
                sites = added
                _take_into_use(cloud, args, sites, nats, admin, supervisor, scu)

        supervisor.run(every=look_for_sites)
        print("dicomflow: stopping...", file=sys.stderr)
    print("dicomflow: stopped.", file=sys.stderr)
    return 0


def _server_config(cloud: CloudDir, args: argparse.Namespace, sites: dict[str, str]) -> None:
    bundle = cloud.nats
    keys = {u: natsconn.public_key(bundle.seed(u).read_text()) for u in hybridconfig.CLOUD_USERS}
    bundle.server_config.write_text(
        hybridconfig.hub_config(
            keys,
            sites,
            leafnode_host=args.leafnode_host,
            leafnode_port=args.leafnode_port,
            tls=ServerTls(
                cert_file=str(bundle.cert(SERVER_CERT)),
                key_file=str(bundle.key(SERVER_CERT)),
                ca_file=str(bundle.ca),
                verify_clients=True,
            ),
            max_payload=EMBEDDED_MAX_PAYLOAD,
        )
    )


def _take_into_use(
    cloud: CloudDir,
    args: argparse.Namespace,
    sites: dict[str, str],
    nats: NatsServer,
    admin: NatsSettings,
    supervisor: Supervisor,
    scu: dict[str, object] | None,
) -> None:
    """A site was added while the cloud runs (`cloud add-site`): the hub re-reads its
    config (SIGHUP: the new leaf user; the links of the other sites stay up), the site's
    sourcing and downlink durable are made, and the stages restart with the new site's
    public signing key among the trusted ones."""
    _server_config(cloud, args, sites)
    nats.reload()
    _topology_after_reload(admin, sites)
    config = _config(cloud, nats.url, cloud.nats)
    if scu is not None:
        config["scu"] = scu
    cloud.config.write_text(to_toml(config))
    supervisor.restart()
    print(
        f"dicomflow cloud: sites now {', '.join(sorted(sites))} (config reloaded)",
        file=sys.stderr,
        flush=True,
    )


def _routing(path: Path, sites: dict[str, str]) -> dict[str, object]:
    """The [scu] table of ``--routing``: every destination at a registered site, none
    delivered here (the cloud holds no master key)."""
    try:
        table = tomllib.loads(path.read_text()).get("scu")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--routing {path}: cannot read it ({exc})") from exc
    if not isinstance(table, dict):
        raise ConfigError(f"--routing {path}: no [scu] table")
    try:
        scu = ScuSettings.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(f"--routing {path}: {problems(exc)}") from exc
    if not scu.destinations:
        raise ConfigError(f"--routing {path}: no [scu.destinations.NAME]")
    for name, dest in scu.destinations.items():
        if dest.delivered_here:
            raise ConfigError(
                f"--routing {path}: destination {name} must be at a site (site = NAME, no "
                "host or port): the cloud holds no master key, the site's scu-gateway delivers"
            )
        if dest.site not in sites:
            print(
                f"dicomflow cloud: destination {name} is at site {dest.site}, which is not "
                "registered yet: its deliveries wait in the cloud until it is added",
                file=sys.stderr,
            )
    return table


RELOAD_WAIT = 60.0  # seconds JetStream may take to answer again after a config reload


def _topology_after_reload(
    admin: NatsSettings, sites: dict[str, str], wait: float = RELOAD_WAIT
) -> None:
    """``_topology``, tried again while JetStream does not answer yet: right after the
    hub re-reads its config its API can answer "no responders" for a moment, which once
    ended the whole cloud process in the middle of `cloud add-site`."""
    deadline = time.monotonic() + wait
    while True:
        try:
            asyncio.run(_topology(admin, sites))
        except (NatsError, BrokerUnavailable) as exc:
            if time.monotonic() > deadline:
                raise
            print(
                f"dicomflow cloud: JetStream not answering after the reload ({exc!r}); "
                "trying again",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(1.0)
        else:
            return


async def _topology(admin: NatsSettings, sites: dict[str, str]) -> None:
    nc = await natsconn.connect_once(admin, "topology")
    try:
        await hybridtopology.ensure_cloud(nc.jetstream(), admin, sites)
    finally:
        await nc.close()


def _config(cloud: CloudDir, url: str, bundle: Bundle) -> dict[str, dict[str, object]]:
    trusted = sorted(cloud.trusted.glob(f"*.{PUBLIC_NAME.split('.', 1)[1]}"))
    return {
        "nats": {
            "servers": [url],
            "nkey_seed_file": bundle.seed(ADMIN),
            "zone": zones.Zone.CLOUD.value,
        },
        "storage": {"backend": "local", "local_path": cloud.objects, "layout": "flat"},
        "encryption": {"trusted_signing_keys": trusted},
        "telemetry": {"metrics_host": "127.0.0.1"},
    }
