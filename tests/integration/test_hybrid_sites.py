"""Two sites, one cloud: each site's ingest and deliveries stay its own, and a site's
leaf credential reaches nothing else, on real servers. Site b is added while the cloud
runs (the hub reloads its config, the cloud makes b's sourcing)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import psutil
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import natsconn

from support.dicomfiles import Made, ct_series, dataset_bytes
from support.hybrid import Hybrid, cli, messages, nats_server_pid, stop, stored
from support.linkproxy import LinkProxy
from support.orthanc import Orthanc
from support.servers import free_port, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Sites:
    a: Hybrid
    b: Hybrid
    pacs_a: Orthanc
    pacs_b: Orthanc
    hub_pid: int  # the cloud's nats-server before site b was added

    @property
    def hub_log(self) -> str:
        return (self.a.cloud / "logs" / "nats-server.log").read_text()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    root = tmp_path_factory.mktemp("sites")
    leafnode_port = free_port()
    routing = root / "routing.toml"
    routing.write_text(
        '[scu.destinations.PACS_A]\nae_title = "PACS_A"\nsite = "site-a"\n\n'
        '[scu.destinations.PACS_B]\nae_title = "PACS_B"\nsite = "site-b"\n'
    )
    with (
        Orthanc(root / "pacs-a", ae_title="PACS_A") as pacs_a,
        Orthanc(root / "pacs-b", ae_title="PACS_B") as pacs_b,
        LinkProxy(leafnode_port) as proxy_a,
        LinkProxy(leafnode_port) as proxy_b,
    ):
        a = Hybrid(
            root,
            proxy_a,
            leafnode_port,
            free_port(),
            site="site-a",
            name="edge-a",
            forward=[f"PACS_A=PACS_A@127.0.0.1:{pacs_a.dicom_port}"],
            routing=routing,
        )
        b = Hybrid(
            root,
            proxy_b,
            leafnode_port,
            free_port(),
            site="site-b",
            name="edge-b",
            forward=[f"PACS_B=PACS_B@127.0.0.1:{pacs_b.dicom_port}"],
        )
        a.add_site()
        try:
            a.start_cloud()
            a.start_edge()
            assert a.cloud_proc is not None
            hub_pid = nats_server_pid(a.cloud_proc)
            b.add_site()  # while the cloud runs
            wait_for("site b taken into use", lambda: "site-a, site-b" in a.log("cloud"), 60)
            b.start_edge()
            yield Sites(a, b, pacs_a, pacs_b, hub_pid)
        finally:
            for proc in (b.edge_proc, a.edge_proc, a.cloud_proc):
                if proc is not None:
                    stop(proc)


async def _edge_delivery_total(site: Hybrid) -> int:
    settings = site.edge_sealed().nats_sealed
    assert settings is not None
    nc = await natsconn.connect_once(settings, "test")
    try:
        info = await nc.jetstream().stream_info(subjects.DELIVERY_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def _where(sites: Sites) -> str:
    """Where the instances are, for a failure's message: the edges' streams, the cloud's
    SEALED and its sources."""
    out = [f"stored {len(await stored(sites.a))}"]
    for site in (sites.a, sites.b):
        for stream in (subjects.INGEST_STREAM,):
            out.append(f"{site.site} {stream} {await messages(site, 'edge', stream)}")
        sealed = site.edge_sealed().nats_sealed
        assert sealed is not None
        nc = await natsconn.connect_once(sealed, "test")
        try:
            info = await nc.jetstream().stream_info(subjects.SEALED_STREAM)
            (up,) = await nc.jetstream().consumers_info(subjects.SEALED_STREAM)
            out.append(f"{site.site} SEALED {info.state} uplink {up.delivered} {up.ack_floor}")
        finally:
            await nc.close()
    nc = await natsconn.connect_once(sites.a.settings("cloud").nats, "test")
    try:
        info = await nc.jetstream().stream_info(subjects.SEALED_STREAM)
        out.append(f"cloud SEALED {info.state} sources {info.sources}")
    finally:
        await nc.close()
    return "; ".join(out)


def _uids(files: list[Made]) -> set[str]:
    return {f.sop_instance_uid for f in files}


def test_two_sites_ingest_at_once_and_each_gets_only_its_deliveries(
    sites: Sites, tmp_path: Path
) -> None:
    a, b = sites.a, sites.b
    assert a.cloud_proc is not None
    # Site b came in without a restart of the hub.
    assert nats_server_pid(a.cloud_proc) == sites.hub_pid
    files_a = ct_series(tmp_path / "a", 20)
    files_b = ct_series(tmp_path / "b", 20)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda s: s[0].send(s[1]), ((a, files_a), (b, files_b))))
    assert [r.count("Received Store Response (Success)") for r in answers] == [20, 20]
    try:
        wait_for("both sites stored", lambda: len(asyncio.run(stored(a))) == 40, 240)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {asyncio.run(_where(sites))}") from None

    cloud = str(a.cloud / "dicomflow.toml")
    for dest, files in (("PACS_A", files_a), ("PACS_B", files_b)):
        queued = cli("send", "--config", cloud, "--to", dest, "--series", files[0].series_uid)
        assert queued.returncode == 0, queued.stderr
    wait_for("A's at A", lambda: _uids(files_a) <= set(sites.pacs_a.instances()), 90)
    wait_for("B's at B", lambda: _uids(files_b) <= set(sites.pacs_b.instances()), 90)
    arrived = sites.pacs_b.instances()
    for f in files_b:  # sealed and delivered at site b, under b's own master key
        assert sites.pacs_b.dataset_bytes(arrived[f.sop_instance_uid]) == dataset_bytes(f.path)
    assert not _uids(files_b) & set(sites.pacs_a.instances())
    assert not _uids(files_a) & set(sites.pacs_b.instances())
    # Each site's DELIVERY received its own requests and nothing of the other's.
    assert asyncio.run(_edge_delivery_total(a)) == 20
    assert asyncio.run(_edge_delivery_total(b)) == 20
    wait_for(
        "the cloud's DELIVERY empty",
        lambda: asyncio.run(messages(a, "cloud", subjects.DELIVERY_STREAM)) == 0,
        30,
    )


def _rogue_leaf(port: int, bundle: Path, subject: str) -> bytes:
    """Connect to the hub's leafnode port as site ``bundle``'s leaf would (its client
    certificate and NKey), then send one ``LMSG`` on ``subject``; what the hub answered."""
    context = ssl.create_default_context(cafile=str(bundle / "cloud-ca.pem"))
    context.load_cert_chain(str(bundle / "leaf.pem"), str(bundle / "leaf-key.pem"))
    seed = (bundle / "leaf.nk").read_text().strip().encode()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        received = b""
        while b"\r\n" not in received:
            received += tls.recv(65536)
        info = json.loads(received.split(b"\r\n", 1)[0].removeprefix(b"INFO "))
        keys = nkeys.from_seed(bytearray(seed))
        signature = base64.urlsafe_b64encode(keys.sign(info["nonce"].encode())).rstrip(b"=")
        connect = {
            "nkey": keys.public_key.decode(),
            "sig": signature.decode(),
            "name": "rogue-leaf",
            "headers": True,
        }
        tls.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        time.sleep(0.5)
        tls.sendall(f"LMSG {subject} 2\r\n{{}}\r\nPING\r\n".encode())
        deadline = time.monotonic() + 5
        answer = b""
        try:
            while time.monotonic() < deadline:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (TimeoutError, OSError):
            pass
        return answer


def test_a_site_credential_is_refused_as_a_client_and_outside_its_permissions(
    sites: Sites,
) -> None:
    a = sites.a
    hub_url = a.settings("cloud").nats.servers[0]

    async def as_plain_client() -> str:
        nc = nats.NATS()
        try:
            await nc.connect(
                hub_url,
                nkeys_seed=str(a.bundle / "leaf.nk"),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=3,
            )
        except Exception as exc:  # noqa: BLE001 (whatever refusal the client raises)
            return repr(exc)
        finally:  # a refused connect leaves its transport open otherwise
            await nc.close()
        return "connected"

    refused = asyncio.run(as_plain_client())
    assert "Authorization Violation" in refused, refused
    wait_for("the refusal logged", lambda: "authentication error" in sites.hub_log, 10)

    delivery_before = asyncio.run(_cloud_delivery_total(a))
    purge = f"$JS.cloud.API.STREAM.PURGE.{subjects.SEALED_STREAM}"
    other_site = subjects.deliver_subject("PACS_B", "site-b")
    # The hub maps the cloud's domain prefix to its own API before it checks.
    logged = {purge: purge.replace("$JS.cloud.API", "$JS.API"), other_site: other_site}
    for subject, as_logged in logged.items():
        closed = sites.hub_log.count("Remote: rogue-leaf")
        answer = _rogue_leaf(a.leafnode_port, a.bundle, subject)
        assert b"-ERR" in answer, answer
        wait_for(
            f"the violation on {subject} logged",
            lambda s=as_logged: f'Publish Violation on "{s}"' in sites.hub_log,  # type: ignore[misc]
            10,
        )
        wait_for(
            "the rogue link closed",
            lambda c=closed: sites.hub_log.count("Remote: rogue-leaf") > c,  # type: ignore[misc]
            10,
        )
    # The request never reached the cloud's DELIVERY, and site a's real link stays up.
    assert asyncio.run(_cloud_delivery_total(a)) == delivery_before
    leaf = psutil.Process(nats_server_pid(a.edge_proc))  # type: ignore[arg-type]
    assert any(c.raddr and c.raddr.port == a.proxy.port for c in leaf.net_connections("tcp"))


async def _cloud_delivery_total(site: Hybrid) -> int:
    nc = await natsconn.connect_once(site.settings("cloud").nats, "test")
    try:
        info = await nc.jetstream().stream_info(subjects.DELIVERY_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()
