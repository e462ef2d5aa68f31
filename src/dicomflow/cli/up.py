"""`dicomflow up`: the embedded default, everything on one machine in one command."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from dicomflow.cli import topology
from dicomflow.cli.natsconfig import Bundle, write_bundle
from dicomflow.embedded.datalock import DataDirLock
from dicomflow.embedded.layout import DataDir, to_toml
from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer
from dicomflow.embedded.supervisor import StageProcess, stage_env
from dicomflow.scp_gateway.settings import ScpSettings
from dicomflow.scu_gateway.settings import ScuSettings
from dicomflow.shared.crypto.keyring import generate_master_key_file
from dicomflow.shared.crypto.sealsign import PRIVATE_NAME, PUBLIC_NAME, generate_signing_key_pair
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import NatsSettings, problems

STAGE_ORDER = ("store-writer", "encryptor", "scp-gateway")  # started downstream first
SCU_STAGE = "scu-gateway"  # runs with --forward, started before the others
METRICS_OFFSETS = {name: i for i, name in enumerate((*STAGE_ORDER, SCU_STAGE))}
METRICS_PORT_ENV = "DICOMFLOW_TELEMETRY__METRICS_PORT"
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


class StopFlag:
    """Set from a signal handler, polled by the main loop.

    Not a ``threading.Event``: its ``set`` takes a lock that ``wait`` holds, so a signal
    arriving while the main thread waits on it deadlocks (seen with a second SIGTERM).
    Setting a plain attribute is safe at any point.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (in short steps); True once the flag is set."""
        deadline = time.monotonic() + seconds
        while not self._set and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._set


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
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        metavar="PORT",
        help="first of the loopback ports serving each stage's /metrics, /livez and /readyz "
        "(one per stage, in the order store-writer, encryptor, scp-gateway, scu-gateway; 0: free "
        f"ports, logged by each stage; default: {DEFAULT_METRICS_PORT})",
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


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    if not 0 <= args.metrics_port < 65536 - len(METRICS_OFFSETS):
        raise ConfigError(f"--metrics-port {args.metrics_port} is not a TCP port (0-65531)")
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
    if not data.dev_key.exists():
        generate_master_key_file(data.dev_key)
        print(WARNING.format(path=data.dev_key), file=sys.stderr)
    else:
        print(f"dicomflow: using the development master key {data.dev_key}", file=sys.stderr)
    if not (data.signing / PRIVATE_NAME).exists():
        data.signing.mkdir(mode=0o700, exist_ok=True)
        generate_signing_key_pair(data.signing)  # refuses if only half a pair is there

    stop = StopFlag()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

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
    nats = NatsServer(data.nats_store, config_file=bundle.server_config, owned=True).start()
    stages: list[StageProcess] = []
    try:
        config = _config(data, nats.url, args, allowed, bundle)
        if scu is not None:
            config["scu"] = scu
        data.config.write_text(to_toml(config))
        asyncio.run(topology.setup(NatsSettings.model_validate(config["nats"])))
        env = stage_env(data.config)
        stages = [
            StageProcess(
                name,
                data.config,
                data.logs,
                {
                    **env,
                    **stage_credentials(bundle, name, tls=args.nats_tls),
                    METRICS_PORT_ENV: str(_metrics_port(args, name)),
                },
                owned=True,
            )
            for name in ((SCU_STAGE,) if scu is not None else ()) + STAGE_ORDER
        ]
        for stage in stages:
            stage.start()
        if _wait_for_port(args.host, args.port, stop, stages):
            _banner(args, allowed, data, nats.url)
        while not stop.wait(0.5):
            for stage in stages:
                stage.supervise()
        print("dicomflow: stopping (in-flight work finishes first)...", file=sys.stderr)
    finally:
        for stage in reversed(stages):
            stage.stop()
        nats.stop()
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
            # received datasets stay in the data folder (the gateway makes it 0700)
            "spool_dir": data.spool,
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


def _metrics_port(args: argparse.Namespace, stage: str) -> int:
    return 0 if args.metrics_port == 0 else int(args.metrics_port) + METRICS_OFFSETS[stage]


def _wait_for_port(host: str, port: int, stop: StopFlag, stages: list[StageProcess]) -> bool:
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection((probe, port), timeout=0.5):
                return True
        except OSError:
            for stage in stages:
                stage.supervise()
            stop.wait(0.2)
    return False


def _metrics_urls(args: argparse.Namespace) -> str:
    if args.metrics_port == 0:
        return "free loopback ports, logged in each stage's log"
    stages = (*STAGE_ORDER, SCU_STAGE) if args.forward else STAGE_ORDER
    return ", ".join(
        f"{name} http://127.0.0.1:{_metrics_port(args, name)}/metrics" for name in stages
    )


def _forwards(args: argparse.Namespace) -> str:
    if not args.forward:
        return ""
    return "\n  Forwarded to:      " + ", ".join(args.forward) + " (every stored instance)"


def _banner(args: argparse.Namespace, allowed: list[str], data: DataDir, nats_url: str) -> None:
    print(
        f"""
dicomflow is up.
  Send DICOM to:     AE title {args.ae_title}, port {args.port} (listening on {args.host})
  Calling AEs:       {", ".join(allowed)}  (others are rejected; add with --allow-ae)
  For example:       storescu -aet {allowed[0]} -aec {args.ae_title} localhost {args.port} FILE.dcm
  Encrypted objects: {data.objects}{_forwards(args)}
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
