"""The hybrid edge on one machine: `dicomflow cloud` and `dicomflow edge --join`, as an
operator starts them, with a cuttable TCP proxy on the leafnode link between them."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import psutil
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.nats import hybridtopology, natsconn
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.retrieval import fetch_verified
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy
from pydicom import dcmread

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series, dataset_bytes, made, with_pixel_bytes
from support.hybrid import Hybrid, cli, messages, nats_server_pid, stop, stored
from support.linkproxy import LinkProxy
from support.orthanc import Orthanc
from support.servers import free_port, wait_for

pytestmark = pytest.mark.integration

SITE = "site-a"
MARKER = "Marker^Plaintext7QZ"  # put into every dataset: must never rest in the cloud
SEALED_BLOBS = subjects.blob_stream(subjects.SEALED_BLOB_BUCKET)
PACS = "PACS_A"  # the site's PACS, as the cloud names it
ROUTED_STUDY = "1.2.826.0.1.3680043.10.1066.42"  # the cloud's routing rule matches it
BLOB_SIZE = 9 * 1024 * 1024  # above the inline limit of an 8 MiB max_payload


def _marked(path: Path) -> Made:
    ds = dcmread(path)
    ds.PatientName = MARKER
    ds.save_as(path, enforce_file_format=True)
    return made(path)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """The site's PACS: a real Orthanc the edge's scu-gateway delivers to."""
    with Orthanc(tmp_path_factory.mktemp("pacs"), ae_title="SITE_PACS") as server:
        yield server


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Iterator[Hybrid]:
    root = tmp_path_factory.mktemp("hybrid")
    leafnode_port = free_port()
    routing = root / "routing.toml"
    # The cloud's router: instances of ROUTED_STUDY go to the site's PACS.
    routing.write_text(
        f'[scu.destinations.{PACS}]\nae_title = "SITE_PACS"\nsite = "{SITE}"\n\n'
        f'[[scu.rules]]\ndestinations = ["{PACS}"]\nstudy_uid = "{ROUTED_STUDY}"\n'
    )
    with LinkProxy(leafnode_port) as proxy:
        setup = Hybrid(
            root,
            proxy,
            leafnode_port,
            free_port(),
            site=SITE,
            forward=[f"{PACS}=SITE_PACS@127.0.0.1:{pacs.dicom_port}"],
            routing=routing,
        )
        setup.add_site()
        try:
            setup.start_cloud()
            setup.start_edge()
            yield setup
        finally:
            for proc in (setup.edge_proc, setup.cloud_proc):
                if proc is not None:
                    stop(proc)


def test_storescu_to_the_edge_stored_in_the_cloud_and_read_back_at_the_edge(
    hybrid: Hybrid, tmp_path: Path
) -> None:
    files = [_marked(f.path) for f in ct_series(tmp_path / "in", 3)]
    assert hybrid.send(files).count("Received Store Response (Success)") == 3
    wait_for("all stored", lambda: len(asyncio.run(stored(hybrid))) == 3, 90)
    for f in files:
        out = tmp_path / f"{f.sop_instance_uid}.dcm"
        got = cli("get", "--data-dir", str(hybrid.edge), f.sop_instance_uid, "-o", str(out))
        assert got.returncode == 0, got.stderr
        assert dataset_bytes(out) == dataset_bytes(f.path)
    unknown = cli("get", "--data-dir", str(hybrid.edge), "1.2.3.4", "-o", str(tmp_path / "x"))
    assert unknown.returncode == 1 and "no stored instance" in unknown.stderr
    # The cloud runs no stage holding a master key, and has no key file.
    assert not list(hybrid.cloud.rglob("master-*.key"))


def test_no_plaintext_reaches_the_cloud(hybrid: Hybrid, tmp_path: Path) -> None:
    inline = [_marked(f.path) for f in ct_series(tmp_path / "in", 2)]
    blob = _marked(with_pixel_bytes(tmp_path / "blob.dcm", BLOB_SIZE, seed=3).path)
    before = len(hybrid.sent)

    async def watch_and_probe() -> tuple[list[str], list[str], dict[str, str]]:
        nc = await natsconn.connect_once(hybrid.settings("cloud").nats, "test")
        seen: list[str] = []
        try:

            async def record(msg: Msg) -> None:
                seen.append(msg.subject)

            sub = await nc.subscribe(">", cb=record)
            await asyncio.to_thread(hybrid.send, [*inline, blob])
            await asyncio.to_thread(
                wait_for, "stored", lambda: len(asyncio.run(stored(hybrid))) == before + 3, 90
            )
            await sub.unsubscribe()
            names = [s.config.name for s in await nc.jetstream().streams_info()]
            answers = {}
            for api in (
                "STREAM.MSG.GET.DICOMFLOW_INGEST",
                "STREAM.NAMES",
                "STREAM.INFO.DICOMFLOW_INGEST",
            ):
                try:
                    reply = await nc.request(f"$JS.{SITE}.API.{api}", b'{"seq": 1}', timeout=2)
                    answers[api] = reply.data.decode(errors="replace")
                except (NoRespondersError, NatsTimeoutError) as exc:
                    answers[api] = type(exc).__name__
            return seen, names, answers
        finally:
            await nc.close()

    seen, names, answers = asyncio.run(watch_and_probe())
    assert seen, "the cloud subscriber saw no traffic at all"
    assert any(s.startswith("dicomflow-uplink.") for s in seen)
    assert not [s for s in seen if s.startswith(subjects.INGEST_PREFIX)]
    assert subjects.INGEST_STREAM not in names
    assert subjects.blob_stream(subjects.INGEST_BLOB_BUCKET) not in names
    # The cloud's admin reaches nothing of the site's JetStream but the uplink resets.
    assert all(a in ("NoRespondersError", "TimeoutError") for a in answers.values()), answers
    # The marker is in what was sent (the search works) and nowhere in the cloud's data.
    assert MARKER.encode() in blob.path.read_bytes()
    found = [
        p for p in hybrid.cloud.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()
    ]
    assert not found


def test_store_and_forward_through_a_cut_link(hybrid: Hybrid, tmp_path: Path) -> None:
    stored_before = len(asyncio.run(stored(hybrid)))
    inline = ct_series(tmp_path / "in", 200)
    blobs = [with_pixel_bytes(tmp_path / f"b{i}.dcm", BLOB_SIZE, seed=10 + i) for i in range(3)]
    files = [*inline, *blobs]
    hybrid.proxy.cut()
    try:
        assert hybrid.send(files).count("Received Store Response (Success)") == len(files)
        # Sealed and waiting at the edge; nothing more in the cloud.
        wait_for(
            "sealed at the edge",
            lambda: (
                asyncio.run(messages(hybrid, "edge-sealed", subjects.SEALED_STREAM)) == len(files)
            ),
            120,
        )
        assert asyncio.run(messages(hybrid, "edge", subjects.INGEST_STREAM)) == 0
        time.sleep(12)  # past the sources' 10 s stall detection
        assert len(asyncio.run(stored(hybrid))) == stored_before
    finally:
        hybrid.proxy.restore()
    start = time.monotonic()
    wait_for(
        "caught up",
        lambda: len(asyncio.run(stored(hybrid))) == stored_before + len(files),
        180,
    )
    caught_up = time.monotonic() - start
    records = asyncio.run(stored(hybrid))

    async def decrypt_all() -> None:
        settings = hybrid.settings("edge")
        keyring = load_keyring(settings.encryption)
        store = objectstore.build_store(settings.storage)
        for f in files:
            key, sha256 = records[f.sop_instance_uid]
            out = tmp_path / "out" / f"{f.sop_instance_uid}.dcm"
            out.parent.mkdir(exist_ok=True)
            await fetch_verified(store, keyring, object_key=key, sha256=sha256, out=out)
            assert dataset_bytes(out) == dataset_bytes(f.path)

    asyncio.run(decrypt_all())

    # Exactly once: every message that ever reached the cloud's SEALED is one instance.
    async def cloud_sealed_total() -> int:
        nc = await natsconn.connect_once(hybrid.settings("cloud").nats, "test")
        try:
            return int((await nc.jetstream().stream_info(subjects.SEALED_STREAM)).state.last_seq)
        finally:
            await nc.close()

    assert asyncio.run(cloud_sealed_total()) == len(hybrid.sent)
    assert len(list((hybrid.cloud / "objects").rglob("*.enc"))) == len(hybrid.sent)
    for stream in (subjects.SEALED_STREAM, SEALED_BLOBS):
        wait_for(
            f"the edge's {stream} empty",
            lambda s=stream: asyncio.run(messages(hybrid, "edge-sealed", s)) == 0,  # type: ignore[misc]
            60,
        )
    assert "dead-lettering" not in (hybrid.cloud / "logs" / "store-writer.log").read_text()
    print(f"catch-up of {len(files)} instances after the cut: {caught_up:.1f} s")


def test_egress_only_the_edge_listens_on_loopback_and_the_cloud_never_calls_it(
    hybrid: Hybrid,
) -> None:
    assert hybrid.edge_proc is not None and hybrid.cloud_proc is not None
    hub_conf = (hybrid.cloud / "keys" / "nats" / "nats-server.conf").read_text()
    assert not re.search(r"^\s*(remotes|routes|cluster|gateway|hub)\s*[:{]", hub_conf, re.M)
    assert re.search(r"^\s*listen\s*:", hub_conf.split("leafnodes {", 1)[1], re.M)
    edge_conf = (hybrid.edge / "keys" / "nats" / "nats-server.conf").read_text()
    leafnodes = edge_conf.split("leafnodes {", 1)[1].split("accounts {", 1)[0]
    assert re.search(r"^\s*remotes\s*:", leafnodes, re.M)
    assert not re.search(r"^\s*(listen|port)\s*:", leafnodes, re.M)
    assert not re.search(r"^\s*(routes|cluster|gateway)\s*[:{]", edge_conf, re.M)
    # A Success at the edge, and the cloud's acknowledgement of a sealed message, survive
    # a power cut: both servers fsync before acknowledging.
    for conf in (hub_conf, edge_conf):
        assert re.search(r"^jetstream \{.*sync_interval: always", conf, re.M), conf[:400]
    leaf = psutil.Process(nats_server_pid(hybrid.edge_proc))
    listening = [c.laddr for c in leaf.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    url = hybrid.settings("edge").nats.servers[0]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", int(url.rsplit(":", 1)[1]))]
    outbound = [c.raddr.port for c in leaf.net_connections("tcp") if c.raddr]
    assert hybrid.proxy.port in outbound, "the leaf has no connection out to the cloud"
    assert hybrid.leafnode_port not in outbound  # only through the URL of its bundle

    hub = psutil.Process(nats_server_pid(hybrid.cloud_proc))
    hybrid.stop_edge()
    accepted = hybrid.proxy.accepted
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        attempts = [c for c in hub.net_connections("tcp") if c.status == psutil.CONN_SYN_SENT]
        assert not attempts, attempts
        time.sleep(0.2)
    assert hybrid.proxy.accepted == accepted  # nobody dialled the (gone) site
    hybrid.start_edge()
    wait_for("the link back", lambda: hybrid.proxy.accepted > accepted, 30)


async def test_janitor_keeps_whatever_a_consumer_has_not_acknowledged(
    nats_server: NatsServer,
) -> None:
    """The janitor purges below the lowest ack floor of all consumers only: with one
    consumer ahead (15 acked) and one behind (5 acked), the 15 messages the second still
    needs stay. (The leftover state itself, messages below every consumer's ack floor
    left by interest retention, could not be made on purpose: a restart of nats-server
    re-checks interest and clears it.)"""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            name=subjects.SEALED_STREAM,
            subjects=["dicomflow.sealed.>"],
            retention=RetentionPolicy.INTEREST,
        )
        for durable in ("ahead", "behind"):
            await js.add_consumer(
                subjects.SEALED_STREAM,
                ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT),
            )
        for i in range(20):
            await js.publish(f"dicomflow.sealed.A.{i}", b"sealed")
        for durable, count in (("ahead", 15), ("behind", 5)):
            sub = await js.pull_subscribe_bind(durable, subjects.SEALED_STREAM)
            for msg in await sub.fetch(count, timeout=5):
                await msg.ack_sync()
            await sub.unsubscribe()
        assert await hybridtopology.clear_uplinked(js, (subjects.SEALED_STREAM,)) == 0
        state = (await js.stream_info(subjects.SEALED_STREAM)).state
        assert (state.messages, state.first_seq) == (15, 6)
    finally:
        await nc.close()


def _study(files: list[Made], study_uid: str) -> list[Made]:
    for f in files:
        ds = dcmread(f.path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(f.path, enforce_file_format=True)
    return [made(f.path) for f in files]


async def _downlink(hybrid: Hybrid) -> tuple[int, int]:
    """The edge's DELIVERY: how many requests ever reached it, and how many times its
    scu-gateway was handed one again (0: each request went to the PACS once)."""
    settings = hybrid.edge_sealed().nats_sealed
    assert settings is not None
    nc = await natsconn.connect_once(settings, "test")
    try:
        js = nc.jetstream()
        info = await js.consumer_info(subjects.DELIVERY_STREAM, subjects.deliver_durable(PACS))
        last = (await js.stream_info(subjects.DELIVERY_STREAM)).state.last_seq
        return int(last), int(info.num_redelivered or 0)
    finally:
        await nc.close()


def test_a_send_in_the_cloud_while_the_site_is_cut_off_reaches_its_pacs_once(
    hybrid: Hybrid, pacs: Orthanc, tmp_path: Path
) -> None:
    files = ct_series(tmp_path / "in", 3)
    before = len(asyncio.run(stored(hybrid)))
    assert hybrid.send(files).count("Received Store Response (Success)") == 3
    wait_for("stored", lambda: len(asyncio.run(stored(hybrid))) == before + 3, 90)
    reached_edge, _ = asyncio.run(_downlink(hybrid))
    cloud = hybrid.cloud / "dicomflow.toml"
    hybrid.proxy.cut()
    try:
        queued = cli("send", "--config", str(cloud), "--to", PACS, "--series", files[0].series_uid)
        assert queued.returncode == 0, queued.stderr
        assert "queued 3 instance(s)" in queued.stderr
        # It waits in the cloud, for this site only.
        assert asyncio.run(messages(hybrid, "cloud", subjects.DELIVERY_STREAM)) == 3
        time.sleep(3)
        assert not set(pacs.instances()) & {f.sop_instance_uid for f in files}
    finally:
        hybrid.proxy.restore()
    wait_for(
        "delivered at the site",
        lambda: {f.sop_instance_uid for f in files} <= set(pacs.instances()),
        90,
    )
    arrived = pacs.instances()
    for f in files:
        assert pacs.dataset_bytes(arrived[f.sop_instance_uid]) == dataset_bytes(f.path)
    wait_for(
        "the cloud's DELIVERY empty",
        lambda: asyncio.run(messages(hybrid, "cloud", subjects.DELIVERY_STREAM)) == 0,
        30,
    )
    wait_for(
        "the edge's DELIVERY empty",
        lambda: asyncio.run(messages(hybrid, "edge-sealed", subjects.DELIVERY_STREAM)) == 0,
        30,
    )
    # Exactly once: three requests came down, none was handed to the scu-gateway twice.
    assert asyncio.run(_downlink(hybrid)) == (reached_edge + 3, 0)


def test_a_routing_rule_in_the_cloud_delivers_at_the_site(
    hybrid: Hybrid, pacs: Orthanc, tmp_path: Path
) -> None:
    routed = _study(ct_series(tmp_path / "routed", 2), ROUTED_STUDY)
    other = ct_series(tmp_path / "other", 1)
    assert hybrid.send([*routed, *other]).count("Received Store Response (Success)") == 3
    wait_for(
        "routed to the site's PACS",
        lambda: {f.sop_instance_uid for f in routed} <= set(pacs.instances()),
        90,
    )
    wait_for(
        "the cloud's DELIVERY empty",
        lambda: asyncio.run(messages(hybrid, "cloud", subjects.DELIVERY_STREAM)) == 0,
        30,
    )
    assert other[0].sop_instance_uid not in pacs.instances()
    # The cloud's router holds no key either.
    assert "scu-gateway ready" in (hybrid.cloud / "logs" / "scu-gateway.log").read_text()
    assert not list(hybrid.cloud.rglob("master-*.key"))


def test_topology_command_makes_the_clouds_part_for_its_sites(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`dicomflow topology` with nats.zone = cloud (the Kubernetes Job of the cloud
    overlay): the sourcing and downlink durable of each --site, and no plaintext stream."""
    env = {
        **os.environ,
        "DICOMFLOW_NATS__SERVERS": f'["{nats_server.url}"]',
        "DICOMFLOW_NATS__ZONE": "cloud",
    }

    def topology(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomflow", "topology", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )

    missing = topology()
    assert missing.returncode != 0 and "--site" in missing.stderr
    made = topology("--site", "site-a", "--site", "site-b")
    assert made.returncode == 0, made.stderr

    async def look() -> tuple[list[str], list[str], str | None]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            names = [s.config.name or "" for s in await js.streams_info()]
            sealed = await js.stream_info(subjects.SEALED_STREAM)
            sources = [s.external.api for s in sealed.config.sources or [] if s.external]
            down = await js.consumer_info(subjects.DELIVERY_STREAM, "downlink-site-b")
            return names, sources, down.config.filter_subject
        finally:
            await nc.close()

    names, sources, down = asyncio.run(look())
    assert subjects.INGEST_STREAM not in names
    assert sorted(sources) == ["$JS.site-a.API", "$JS.site-b.API"]
    assert down == "dicomflow.deliver.site-b.>"
