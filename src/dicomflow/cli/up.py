"""`dicomflow up`: the embedded default, everything on one machine in one command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from dicomflow.cli import topology
from dicomflow.cli.natsconfig import Bundle, write_bundle
from dicomflow.embedded.datalock import DataDirLock
from dicomflow.embedded.layout import DataDir, to_toml
from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer
from dicomflow.embedded.supervisor import Supervisor, metrics_port
from dicomflow.scp_gateway.settings import ScpSettings
from dicomflow.scu_gateway.settings import ScuSettings
from dicomflow.shared.crypto.keyring import generate_master_key_file
from dicomflow.shared.crypto.sealsign import PRIVATE_NAME, PUBLIC_NAME, generate_signing_key_pair
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import NatsSettings, problems

STAGE_ORDER = ("store-writer", "encryptor", "scp-gateway")  # started downstream first
SCU_STAGE = "scu-gateway"  # runs with --forward, started before the others
METRICS_ORDER = (*STAGE_ORDER, SCU_STAGE)  # the stages' metrics ports from --metrics-port
# --replicas runs this many processes of each of these (the scu-gateway stays one): the
# consumer stages share their durable consumer, the gateways the DICOM port.
REPLICATED = frozenset(STAGE_ORDER)
MAX_REPLICAS = 16
SEED_ENV = "DICOMFLOW_NATS__NKEY_SEED_FILE"
MANAGE_TOPOLOGY_ENV = "DICOMFLOW_NATS__MANAGE_TOPOLOGY"
CERT_ENV = "DICOMFLOW_NATS__TLS__CERT_FILE"
KEY_ENV = "DICOMFLOW_NATS__TLS__KEY_FILE"
DEFAULT_CALLING_AE = "STORESCU"  # DCMTK storescu's default calling AE title
# First of the stages' loopback metrics ports: above DICOM's 11112, clear of Prometheus
# (9090-9093), its exporters (9100-9999), Grafana (3000), memcached (11211) and Linux's
# ephemeral ports (32768-60999).
DEFAULT_METRICS_PORT = 11190
# JetStream fsyncs before it acknowledges: a Success survives a power cut of the machine.
NATS_SYNC_INTERVAL = "always"

WARNING = """
************************************************************************************
*  WARNING: dicomflow generated a DEVELOPMENT master key at
*    {path}
*  Objects are encrypted with it. Whoever holds this file can read them; lose it and
*  they are unreadable. For real data, create a key with `dicomflow keys new PATH`,
*  keep it in a secret store, and configure [encryption.master_key].
************************************************************************************
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "up",
        help="run the embedded default: nats-server and every stage, storing to a folder",
        description=(
            "Start a local nats-server with JetStream (state under DIR/nats), set up the "
            "topology, run the scp-gateway, encryptor and store-writer stages, and store "
            "encrypted objects under DIR/objects; with --forward, the scu-gateway too, sending "
            "every stored instance on to DICOM peers. Creates a development master key and a "
            "signing key pair (the encryptor signs what it seals, the store-writer checks) "
            "under DIR/keys if none is configured. Ctrl-C or SIGTERM stops everything cleanly; "
            "running `up` again on the same DIR resumes where it stopped; a second `up` on a DIR "
            "that one is running on refuses to start. If `up` is killed, its nats-server and "
            "stages end with it (Linux). A stage that exits on a configuration error stops "
            "`up` with that error; one that crashes is restarted with backoff."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("dicomflow-data"),
        metavar="DIR",
        help="state folder (default: ./dicomflow-data)",
    )
    receiver_arguments(parser)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        metavar="PORT",
        help="first of the loopback ports serving each stage's /metrics, /livez and /readyz "
        "(one per stage, in the order store-writer, encryptor, scp-gateway, scu-gateway, then "
        "the same four again for each further replica; 0: free ports, logged by each stage; "
        f"default: {DEFAULT_METRICS_PORT})",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="processes of each stage but the scu-gateway: the encryptors and store-writers "
        "share their work, the scp-gateways share the DICOM port (each its own log, "
        f"DIR/logs/STAGE-2.log..., and metrics port; 1-{MAX_REPLICAS}, default: 1)",
    )
    parser.add_argument(
        "--forward",
        action="append",
        metavar="[NAME=]AET@HOST:PORT",
        default=[],
        help="also run the scu-gateway and send every stored instance, decrypted and "
        "verified, to this DICOM peer (it must accept the called AE title as calling AE); "
        "repeat for more. NAME (default: AET) names it for `dicomflow send --to` and "
        "`dicomflow dlq`",
    )
    parser.add_argument(
        "--nats-tls",
        action="store_true",
        help="mutual TLS to the embedded nats-server as well (certificates under DIR/keys/nats/"
        "tls). Off by default: the server listens on 127.0.0.1 only, and every stage already "
        "authenticates with its own least-privilege NKey user",
    )
    parser.set_defaults(func=run)


def receiver_arguments(parser: argparse.ArgumentParser) -> None:
    """The DICOM receiver's options, alike in `up` and `edge`."""
    parser.add_argument(
        "--port", type=int, default=11112, help="DICOM port to listen on (default: 11112)"
    )
    parser.add_argument(
        "--host",
        default="0.0.0.0",  # noqa: S104 (a DICOM receiver)
        help="address to listen on (default: all interfaces)",
    )
    parser.add_argument(
        "--ae-title",
        default="DICOMFLOW",
        help="called AE title of the receiver (default: DICOMFLOW)",
    )
    parser.add_argument(
        "--allow-ae",
        action="append",
        metavar="CALLING_AET",
        dest="allow_ae",
        help=f"calling AE title allowed to send; repeat for more (default: {DEFAULT_CALLING_AE})",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    if not 1 <= args.replicas <= MAX_REPLICAS:
        raise ConfigError(f"--replicas {args.replicas}: run 1 to {MAX_REPLICAS} of each stage")
    last = 65536 - len(METRICS_ORDER) * args.replicas
    if not 0 <= args.metrics_port < last:
        raise ConfigError(
            f"--metrics-port {args.metrics_port} is not a TCP port that leaves room for every "
            f"stage's (0-{last - 1})"
        )
    allowed = args.allow_ae or [DEFAULT_CALLING_AE]
    ScpSettings(ae_title=args.ae_title, allowed_calling_aes=allowed)  # validates AE titles
    scu = forwarding(args.forward, args.ae_title)
    data = DataDir(args.data_dir.resolve())
    data.root.mkdir(parents=True, exist_ok=True)
    with DataDirLock(data.lock, data.root):  # before anything in DIR is touched
        return _run(args, data, allowed, scu)


def _run(
    args: argparse.Namespace, data: DataDir, allowed: list[str], scu: dict[str, object] | None
) -> int:
    for folder in (data.objects, data.keys, data.logs):
        folder.mkdir(parents=True, exist_ok=True)
    data.keys.chmod(0o700)
    # Made here, private, rather than by the first of several gateways to start.
    data.spool.mkdir(mode=0o700, exist_ok=True)
    if not data.dev_key.exists():
        generate_master_key_file(data.dev_key)
        print(WARNING.format(path=data.dev_key), file=sys.stderr)
    else:
        print(f"dicomflow: using the development master key {data.dev_key}", file=sys.stderr)
    if not (data.signing / PRIVATE_NAME).exists():
        data.signing.mkdir(mode=0o700, exist_ok=True)
        generate_signing_key_pair(data.signing)  # refuses if only half a pair is there

    bundle = Bundle(data.nats_security)
    write_bundle(
        bundle,
        tls=args.nats_tls,
        mtls=args.nats_tls,
        hosts=["127.0.0.1", "localhost"],
        max_payload=EMBEDDED_MAX_PAYLOAD,
        sync_interval=NATS_SYNC_INTERVAL,
        reuse=True,
    )
    # Every child is started from this (the main) thread and ends with this process.
    with Supervisor(
        data.config,
        data.logs,
        metrics_base=args.metrics_port,
        metrics_order=METRICS_ORDER,
        owned=True,
    ) as supervisor:
        nats = supervisor.start_nats(
            NatsServer(data.nats_store, config_file=bundle.server_config, owned=True)
        )
        config = _config(data, nats.url, args, allowed, bundle)
        if scu is not None:
            config["scu"] = scu
        data.config.write_text(to_toml(config))
        asyncio.run(topology.setup(NatsSettings.model_validate(config["nats"])))
        for name in ((SCU_STAGE,) if scu is not None else ()) + STAGE_ORDER:
            supervisor.add(
                name,
                stage_credentials(bundle, name, tls=args.nats_tls),
                replicas=args.replicas if name in REPLICATED else 1,
            )
        supervisor.start()
        if supervisor.wait_for_port(args.host, args.port):
            _banner(args, allowed, data, nats.url)
        supervisor.run()
        print("dicomflow: stopping (in-flight work finishes first)...", file=sys.stderr)
    print("dicomflow: stopped.", file=sys.stderr)
    return 0


def _nats_config(bundle: Bundle, nats_url: str, tls: bool) -> dict[str, object]:
    """The admin's connection (for `ls`, `get`, `dlq`...); stages override the identity."""
    nats: dict[str, object] = {"servers": [nats_url], "nkey_seed_file": bundle.seed("admin")}
    if tls:
        nats["tls"] = {
            "enabled": True,
            "ca_file": bundle.ca,
            "cert_file": bundle.cert("admin"),
            "key_file": bundle.key("admin"),
        }
    return nats


def stage_credentials(bundle: Bundle, stage: str, *, tls: bool) -> dict[str, str]:
    """Each stage connects as its own least-privilege user, which may not manage streams."""
    env = {SEED_ENV: str(bundle.seed(stage)), MANAGE_TOPOLOGY_ENV: "false"}
    if tls:
        env.update({CERT_ENV: str(bundle.cert(stage)), KEY_ENV: str(bundle.key(stage))})
    return env


def _config(
    data: DataDir, nats_url: str, args: argparse.Namespace, allowed: list[str], bundle: Bundle
) -> dict[str, dict[str, object]]:
    return {
        "nats": _nats_config(bundle, nats_url, args.nats_tls),
        "scp": {
            "ae_title": args.ae_title,
            "host": args.host,
            "port": args.port,
            "allowed_calling_aes": allowed,
            # received datasets stay in the data folder (0700), each gateway in a folder of
            # its own inside it
            "spool_dir": data.spool,
            # with --replicas, every gateway process listens on the one DICOM port
            **({"reuse_port": True} if args.replicas > 1 else {}),
        },
        "storage": {"backend": "local", "local_path": data.objects, "layout": "flat"},
        "encryption": {
            "master_key": {"id": 1, "path": data.dev_key},
            "signing_key": data.signing / PRIVATE_NAME,
            "trusted_signing_keys": [data.signing / PUBLIC_NAME],
        },
        "telemetry": {"metrics_host": "127.0.0.1"},
    }


def forwarding(specs: list[str], calling_ae: str) -> dict[str, object] | None:
    """The [scu] table for ``--forward`` arguments: one destination each, and one rule
    sending every stored instance to all of them; None without any."""
    if not specs:
        return None
    destinations: dict[str, dict[str, object]] = {}
    for spec in specs:
        name, _, peer = spec.rpartition("=")
        aet, at, address = peer.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and aet and host and port.isdigit()):
            raise ConfigError(
                f"--forward {spec!r}: expected [NAME=]AET@HOST:PORT, e.g. PACS=PACS@10.0.0.7:104"
            )
        name = name or aet
        if name in destinations:
            raise ConfigError(f"--forward {spec!r}: {name} is named twice")
        destinations[name] = {"ae_title": aet, "host": host, "port": int(port)}
    table: dict[str, object] = {
        "ae_title": calling_ae,
        "destinations": destinations,
        "rules": [{"destinations": list(destinations)}],
    }
    try:
        ScuSettings.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(f"--forward: {problems(exc)}") from exc
    return table


def _metrics_urls(args: argparse.Namespace) -> str:
    if args.metrics_port == 0:
        return "free loopback ports, logged in each stage's log"
    stages = (*STAGE_ORDER, SCU_STAGE) if args.forward else STAGE_ORDER
    return ", ".join(
        f"{name if replica == 0 else f'{name}-{replica + 1}'} http://127.0.0.1:"
        f"{metrics_port(args.metrics_port, METRICS_ORDER, name, replica)}/metrics"
        for replica in range(args.replicas)
        for name in stages
        if replica == 0 or name in REPLICATED
    )


def _forwards(args: argparse.Namespace) -> str:
    if not args.forward:
        return ""
    return "\n  Forwarded to:      " + ", ".join(args.forward) + " (every stored instance)"


def _replicas(args: argparse.Namespace) -> str:
    if args.replicas == 1:
        return ""
    return (
        f"\n  Replicas:          {args.replicas} processes each of "
        f"{', '.join(STAGE_ORDER)} (the gateways share port {args.port})"
    )


def _banner(args: argparse.Namespace, allowed: list[str], data: DataDir, nats_url: str) -> None:
    print(
        f"""
dicomflow is up.
  Send DICOM to:     AE title {args.ae_title}, port {args.port} (listening on {args.host})
  Calling AEs:       {", ".join(allowed)}  (others are rejected; add with --allow-ae)
  For example:       storescu -aet {allowed[0]} -aec {args.ae_title} localhost {args.port} FILE.dcm
  Encrypted objects: {data.objects}{_forwards(args)}{_replicas(args)}
  NATS (JetStream):  {nats_url}, state in {data.nats_store}
  NATS users:        one NKey user per stage, admin for the commands below; seeds and
                     the generated nats-server.conf in {data.nats_security}
  Logs:              {data.logs}
  Metrics, probes:   {_metrics_urls(args)}
  Read back:         dicomflow ls --data-dir {data.root}
                     dicomflow get --data-dir {data.root} SOP_INSTANCE_UID -o FILE.dcm
Press Ctrl-C to stop.
""",
        flush=True,
    )
