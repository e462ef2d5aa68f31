"""nats-server configs of the hybrid topology: the cloud's hub and each site's leaf.

Egress only: the edge's leaf server has one TLS leafnode *remote* to the cloud and no
leafnodes listener; the cloud's hub has a TLS leafnode *listener* (client certificates
verified against the cloud's CA) and no routes, gateways or remotes, so it never opens
a connection toward a site.

Accounts. The hub holds one account for the hospitals' data (``HOSP``; ``SYS`` is never
bridged) with the cloud's service users and one leaf user per site. The leaf holds
``LOCAL`` (plaintext: INGEST, plaintext blobs, DLQ; never bound to the remote) and
``EDGE`` (sealed only; the remote binds it), so nothing the link carries, nor anyone
on the hub side, can even name a plaintext stream: the edge's own config enforces it.

The leaf user of a site may do exactly what sourcing through its uplink durables, and
the site's sourcing through its downlink durable, need (``leaf_permissions``);
permissions are written from the leaf's point of view: publish = leaf to hub,
subscribe = hub to leaf. Both servers enable
``js_api_reply_v2`` so that API replies carry the domain and are never shared between
sites, and fsync JetStream before every acknowledgement (``sync_interval: always``, as
`dicomflow up` runs it): the edge answers Success on the leaf's acknowledgement, and the
edge drops a sealed message on the cloud's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import natsauth, zones
from dicomflow.shared.nats.natsauth import Permissions, ServerTls
from dicomflow.shared.nats.natsconn import inbox_prefix

API = "$JS.API"
HUB_ACCOUNT = "HOSP"
LOCAL_ACCOUNT = "LOCAL"
EDGE_ACCOUNT = "EDGE"
CLOUD_USERS = ("store-writer", "scu-gateway", natsauth.ADMIN)  # in HOSP
LOCAL_USERS = ("scp-gateway", "encryptor", "scu-gateway", natsauth.ADMIN)  # the edge's LOCAL
SEALED_ENCRYPTOR = "encryptor-sealed"  # the encryptor's second identity, in EDGE
SEALED_SCU = "scu-gateway-sealed"  # the scu-gateway's second identity, in EDGE (DELIVERY)
EDGE_ADMIN = "edge-admin"
EDGE_USERS = (SEALED_ENCRYPTOR, SEALED_SCU, EDGE_ADMIN)
RECONNECT_SECONDS = 2


def leaf_permissions(site: str) -> Permissions:
    """The hub's leaf user of ``site``: the uplink of its two sealed streams and the
    downlink of its delivery requests, nothing else.

    Uplink (the cloud sources the site). Hub to leaf: ``CONSUMER.RESET`` of the two uplink
    durables (no ``CONSUMER.CREATE``: a create request carries a deliver subject the
    server does not check) and their flow-control replies. Leaf to hub: the durables'
    deliver subjects and the replies to those resets.

    Downlink (the site sources the cloud's ``downlink-<site>``, filtered to
    ``dicomflow.deliver.<site>.>``). Leaf to hub: ``CONSUMER.RESET`` of that durable and
    its flow-control replies (which remove the requests from the cloud's work queue).
    Hub to leaf: the reset's reply and the durable's deliver subject.

    Exact subjects, so the site's credential reaches no other API, stream, subject or
    site.
    """
    durable = zones.uplink_durable(site)
    publish = [f"{zones.UPLINK_PREFIX}.{site}.>"]
    subscribe = []
    for stream in zones.UPLINKED:
        publish.append(f"$JSC.R.{site}.*.{stream}.{durable}.*")
        subscribe += [
            f"{zones.site_api(site)}.CONSUMER.RESET.{stream}.{durable}",
            f"$JS.FC.{stream}.{durable}.>",
        ]
    down, delivery = zones.downlink_durable(site), subjects.DELIVERY_STREAM
    publish += [
        f"{zones.site_api(zones.CLOUD_DOMAIN)}.CONSUMER.RESET.{delivery}.{down}",
        f"$JS.FC.{delivery}.{down}.>",
    ]
    subscribe += [
        f"$JSC.R.{zones.CLOUD_DOMAIN}.*.{delivery}.{down}.*",
        f"{zones.DOWNLINK_PREFIX}.{site}.>",
    ]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def sealed_encryptor_permissions(public_key: str) -> Permissions:
    """The encryptor's identity in the edge's EDGE account: publish SEALED, write sealed
    blobs (purging its own failed puts), and clear what the uplink already delivered
    (``hybridtopology.clear_uplinked``: consumer lists, purges below their ack floors)."""
    sealed_blobs = subjects.blob_stream(subjects.SEALED_BLOB_BUCKET)
    publish = (
        f"{API}.STREAM.NAMES",  # the topology check at start
        *(f"{API}.STREAM.INFO.{s}" for s in zones.UPLINKED),
        f"{subjects.SEALED_PREFIX}.>",
        f"$O.{subjects.SEALED_BLOB_BUCKET}.>",
        f"{API}.STREAM.MSG.GET.{sealed_blobs}",
        *(f"{API}.STREAM.PURGE.{s}" for s in zones.UPLINKED),
        *(f"{API}.CONSUMER.LIST.{s}" for s in zones.UPLINKED),
    )
    return Permissions(publish=publish, subscribe=(f"{inbox_prefix(public_key)}.>",))


def sealed_scu_permissions(public_key: str) -> Permissions:
    """The scu-gateway's identity in the edge's EDGE account: drain the site's DELIVERY
    (the delivery durables it makes, fetches and acks; purges below their ack floor, as
    every work-queue consumer does), and the topology check at start."""
    delivery = subjects.DELIVERY_STREAM
    publish = (
        f"{API}.STREAM.NAMES",
        *(f"{API}.STREAM.INFO.{s}" for s in (subjects.SEALED_STREAM, delivery)),
        f"{API}.CONSUMER.DURABLE.CREATE.{delivery}.*",
        f"{API}.CONSUMER.INFO.{delivery}.*",
        f"{API}.CONSUMER.MSG.NEXT.{delivery}.*",
        f"$JS.ACK.{delivery}.*.>",
        f"{API}.STREAM.PURGE.{delivery}",
    )
    return Permissions(publish=publish, subscribe=(f"{inbox_prefix(public_key)}.>",))


def hub_config(
    users: Mapping[str, str],
    sites: Mapping[str, str],
    *,
    leafnode_host: str,
    leafnode_port: int,
    tls: ServerTls,
    max_payload: int,
) -> str:
    """The cloud's nats-server config. ``users``: public NKeys of ``CLOUD_USERS``;
    ``sites``: ``{site: public NKey of its leaf user}``; ``tls``: the leafnode listener's
    certificate and the CA its clients' certificates must chain to."""
    entries = [_user(f"{u}", users[u], natsauth.permissions(u, users[u])) for u in CLOUD_USERS]
    for site, key in sorted(sites.items()):
        entries.append(
            _user(f"leaf of site {site}", key, leaf_permissions(site), leafnode_only=True)
        )
    return "".join(
        (
            "# Generated by `dicomflow cloud`: the hub of the hybrid topology.\n",
            "server_name: dicomflow-cloud\n",
            f"max_payload: {max_payload}\n",
            f"jetstream {{ domain: {zones.CLOUD_DOMAIN}, sync_interval: always }}\n",
            "feature_flags { js_api_reply_v2: true }\n",
            "leafnodes {\n",
            f"  listen: {json.dumps(f'{leafnode_host}:{leafnode_port}')}\n",
            "  no_advertise: true\n",
            _indent(_tls(tls, verify=True), 2),
            "}\n",
            _accounts({HUB_ACCOUNT: entries}),
        )
    )


def edge_config(
    site: str,
    local_users: Mapping[str, str],
    edge_users: Mapping[str, str],
    *,
    cloud_urls: list[str],
    leaf_seed: str,
    tls: ServerTls,
    max_payload: int,
) -> str:
    """A site's leaf nats-server config (secret: it holds the leaf's NKey seed).
    ``tls``: the leaf's client certificate and the CA the cloud's certificate chains to."""
    local = [_user(u, local_users[u], natsauth.permissions(u, local_users[u])) for u in LOCAL_USERS]
    edge = [
        _user(
            SEALED_ENCRYPTOR,
            edge_users[SEALED_ENCRYPTOR],
            sealed_encryptor_permissions(edge_users[SEALED_ENCRYPTOR]),
        ),
        _user(SEALED_SCU, edge_users[SEALED_SCU], sealed_scu_permissions(edge_users[SEALED_SCU])),
        _user(EDGE_ADMIN, edge_users[EDGE_ADMIN], natsauth.permissions(natsauth.ADMIN, "")),
    ]
    remote = "\n".join(
        (
            "{",
            f"  urls: {json.dumps(cloud_urls)}",
            f"  account: {EDGE_ACCOUNT}",
            f"  nkey: {json.dumps(leaf_seed)}",
            "  ignore_discovered_servers: true",  # only the URLs the cloud's bundle names
            "  compression: off",  # ciphertext does not compress
            _indent(_tls(tls, verify=False), 2).rstrip("\n"),
            "}",
        )
    )
    return "".join(
        (
            f"# Generated by `dicomflow edge`: the leaf of site {site} (no leafnodes listener).\n",
            f"server_name: {json.dumps(f'dicomflow-edge-{site}')}\n",
            f"max_payload: {max_payload}\n",
            f"jetstream {{ domain: {json.dumps(site)}, sync_interval: always }}\n",
            "feature_flags { js_api_reply_v2: true }\n",
            "leafnodes {\n",
            f"  reconnect: {RECONNECT_SECONDS}\n",
            "  remotes: [\n",
            _indent(remote, 4),
            "  ]\n",
            "}\n",
            _accounts({LOCAL_ACCOUNT: local, EDGE_ACCOUNT: edge}),
        )
    )


def _user(label: str, key: str, perms: Permissions, *, leafnode_only: bool = False) -> str:
    publish: dict[str, list[str]] = {"allow": list(dict.fromkeys(perms.publish))}
    if perms.publish_deny:
        publish["deny"] = list(perms.publish_deny)
    rendered = {"publish": publish, "subscribe": {"allow": list(dict.fromkeys(perms.subscribe))}}
    only = ', allowed_connection_types: ["LEAFNODE"]' if leafnode_only else ""
    return f"# {label}\n{{nkey: {json.dumps(key)}{only}, permissions: {json.dumps(rendered)}}}"


def _accounts(accounts: Mapping[str, list[str]]) -> str:
    lines = ["accounts {", "  SYS: {}"]
    for name, users in accounts.items():
        lines += [f"  {name}: {{", "    jetstream: enabled", "    users: ["]
        lines += [_indent(u, 6).rstrip("\n") for u in users]
        lines += ["    ]", "  }"]
    lines += ["}", "system_account: SYS"]
    return "\n".join(lines) + "\n"


def _tls(tls: ServerTls, *, verify: bool) -> str:
    lines = [
        "tls {",
        f"  cert_file: {json.dumps(tls.cert_file)}",
        f"  key_file: {json.dumps(tls.key_file)}",
        f"  ca_file: {json.dumps(tls.ca_file)}",
    ]
    if verify:
        lines.append("  verify: true")
    lines += ["  handshake_first: true", "  timeout: 5", "}"]
    return "\n".join(lines) + "\n"


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "".join(pad + line + "\n" for line in text.splitlines())
