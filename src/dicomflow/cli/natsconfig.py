"""`dicomflow nats-config`: nats-server configuration and per-service NATS credentials.

Writes, under ``--out DIR``:

- ``nats-server.conf``: JetStream, one NKey user per service with least-privilege
  permissions (``shared/nats/natsauth.py``), and with ``--tls`` a TLS block;
- ``creds/<user>.nk``: each user's NKey seed (0600): the only secret of a user;
- with ``--tls``: ``tls/ca.pem`` (+ ``ca-key.pem``), ``tls/server.pem`` for ``--hosts``;
  with ``--mtls`` also ``tls/<user>.pem``/``<user>-key.pem`` and ``verify: true``;
- ``k8s/``: a Secret manifest per user (seed, and the CA/client certificate with TLS)
  and ``nats-auth-values.yaml``, the Helm values fragment of the users (public keys
  only, not secret).

`up` uses the same code for its data directory, reusing the seeds it finds there.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import nkeys

from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import natsauth, natscerts
from dicomflow.shared.nats.natsconn import public_key

SEED_SUFFIX = ".nk"


@dataclass(frozen=True)
class Bundle:
    """Where a generated configuration lives."""

    root: Path

    @property
    def server_config(self) -> Path:
        return self.root / "nats-server.conf"

    @property
    def creds(self) -> Path:
        return self.root / "creds"

    def seed(self, user: str) -> Path:
        return self.creds / f"{user}{SEED_SUFFIX}"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def ca(self) -> Path:
        return self.tls / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.tls / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.tls / f"{name}-key.pem"

    @property
    def k8s(self) -> Path:
        return self.root / "k8s"


def new_seed() -> str:
    """A fresh user NKey seed (``SU...``) from the operating system's randomness."""
    return str(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode())


def write_bundle(
    bundle: Bundle,
    *,
    tls: bool = False,
    mtls: bool = False,
    hosts: list[str] | None = None,
    max_payload: int | None = None,
    sync_interval: str | None = None,
    reuse: bool = False,
    force: bool = False,
) -> dict[str, str]:
    """Write the bundle; return ``{user: public key}``.

    ``reuse`` keeps existing seeds and certificates (``up`` on its data dir); otherwise
    existing credentials are refused unless ``force``. ``sync_interval``: JetStream's
    (``natsauth.server_config``).
    """
    tls = tls or mtls
    existing = [p for p in (*map(bundle.seed, natsauth.USERS), bundle.ca) if p.exists()]
    if existing and not (reuse or force):
        raise ConfigError(
            f"{bundle.root} already holds credentials ({existing[0].name} ...): "
            "pass --force to replace them (every service then needs its new seed)"
        )
    for folder in (bundle.root, bundle.creds):
        folder.mkdir(parents=True, exist_ok=True)
    bundle.creds.chmod(0o700)
    keys: dict[str, str] = {}
    for user in natsauth.USERS:
        path = bundle.seed(user)
        if reuse and path.exists():
            keys[user] = public_key(path.read_text())
            continue
        seed = new_seed()
        natscerts.write_private(path, (seed + "\n").encode())
        keys[user] = public_key(seed)
    server_tls = (
        _write_tls(bundle, hosts or ["localhost", "127.0.0.1"], mtls, reuse) if tls else None
    )
    bundle.server_config.write_text(
        natsauth.server_config(
            keys, max_payload=max_payload, tls=server_tls, sync_interval=sync_interval
        )
    )
    _write_k8s(bundle, keys, tls=tls, mtls=mtls)
    return keys


def _write_tls(bundle: Bundle, hosts: list[str], mtls: bool, reuse: bool) -> natsauth.ServerTls:
    bundle.tls.mkdir(parents=True, exist_ok=True)
    bundle.tls.chmod(0o700)
    if reuse and bundle.ca.exists() and bundle.key("ca").exists():
        ca = natscerts.load(bundle.ca, bundle.key("ca"))
    else:
        ca = natscerts.new_ca()
        ca.write(bundle.ca, bundle.key("ca"))
    if not (reuse and bundle.cert("server").exists()):
        natscerts.issue(ca, hosts[0], hosts=hosts).write(
            bundle.cert("server"), bundle.key("server")
        )
    if mtls:
        for user in natsauth.USERS:
            if not (reuse and bundle.cert(user).exists()):
                natscerts.issue(ca, user).write(bundle.cert(user), bundle.key(user))
    return natsauth.ServerTls(
        cert_file=str(bundle.cert("server").resolve()),
        key_file=str(bundle.key("server").resolve()),
        ca_file=str(bundle.ca.resolve()),
        verify_clients=mtls,
    )


def _write_k8s(bundle: Bundle, keys: dict[str, str], *, tls: bool, mtls: bool) -> None:
    """Secrets ``dicomflow-nats-<user>`` (mounted by each Deployment) and Helm values."""
    bundle.k8s.mkdir(parents=True, exist_ok=True)
    bundle.k8s.chmod(0o700)
    docs = []
    for user in natsauth.USERS:
        files = {"seed": bundle.seed(user).read_bytes()}
        if tls:
            files["ca.crt"] = bundle.ca.read_bytes()
        if mtls:
            files["tls.crt"] = bundle.cert(user).read_bytes()
            files["tls.key"] = bundle.key(user).read_bytes()
        data = {k: base64.b64encode(v).decode() for k, v in files.items()}
        docs.append(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": f"dicomflow-nats-{user}", "namespace": "dicomflow"},
                    "type": "Opaque",
                    "data": data,
                },
                indent=2,
            )
        )
    natscerts.write_private(bundle.k8s / "nats-credentials.yaml", "\n---\n".join(docs).encode())
    users = []
    for user in natsauth.USERS:
        perms = natsauth.permissions(user, keys[user])
        publish: dict[str, list[str]] = {"allow": list(dict.fromkeys(perms.publish))}
        if perms.publish_deny:
            publish["deny"] = list(perms.publish_deny)
        users.append(
            {
                "nkey": keys[user],
                "permissions": {"publish": publish, "subscribe": {"allow": list(perms.subscribe)}},
            }
        )
    config: dict[str, object] = {"merge": {"authorization": {"users": users}}}
    if mtls:
        config["nats"] = {"tls": {"merge": {"verify": True}}}
    values = {"config": config}
    (bundle.k8s / "nats-auth-values.yaml").write_text(
        "# Helm values fragment (public keys and permissions only; nothing secret):\n"
        "#   helm upgrade --install nats nats/nats -n nats "
        "-f deploy/k8s/nats/values.yaml -f nats-auth-values.yaml\n" + json.dumps(values, indent=2)
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "nats-config",
        help="generate nats-server config and one least-privilege NATS user per service",
        description=(
            "Write a nats-server config (JetStream, one NKey user per service: "
            f"{', '.join(natsauth.SERVICE_USERS)}, and {natsauth.ADMIN} for operator "
            "commands and topology setup, each allowed only the subjects it needs) and "
            "each user's seed (0600) under DIR/creds. With --tls also a private CA and a "
            "server certificate for --hosts under DIR/tls; with --mtls client "
            "certificates, and the server requires them. DIR/k8s gets a Secret per user "
            "and a Helm values fragment for deploy/k8s. Point each service at its seed "
            "with nats.nkey_seed_file and set nats.manage_topology = false; run "
            "`dicomflow topology` with the admin seed to create the streams."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        metavar="HOST",
        help="names and addresses clients use for the server (the server certificate's "
        "subject alternative names; default: localhost 127.0.0.1)",
    )
    parser.add_argument("--tls", action="store_true", help="generate a CA and server certificate")
    parser.add_argument(
        "--mtls", action="store_true", help="also client certificates; the server verifies them"
    )
    parser.add_argument(
        "--max-payload", type=int, default=None, metavar="BYTES", help="max_payload of the server"
    )
    parser.add_argument("--force", action="store_true", help="replace existing credentials in DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bundle = Bundle(args.out)
    keys = write_bundle(
        bundle,
        tls=args.tls,
        mtls=args.mtls,
        hosts=args.hosts,
        max_payload=args.max_payload,
        force=args.force,
    )
    print(f"wrote {bundle.server_config}", file=sys.stderr)
    for user in natsauth.USERS:
        print(f"  {user:13} {keys[user]}  seed: {bundle.seed(user)}", file=sys.stderr)
    print(f"Kubernetes Secrets and Helm values: {bundle.k8s}", file=sys.stderr)
    return 0
