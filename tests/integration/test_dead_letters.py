"""Dead letters on a real nats-server: replay goes only where the stage and the contract
say, the encryptor leaves no plaintext in the DLQ, the DLQ is bounded, `dlq purge` asks
first; and the listings survive a malformed index record and a closed stdout."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.deadletters import (
    DLQ_HEADERS,
    H_DLQ_BODY,
    H_DLQ_REASON,
    H_DLQ_STAGE,
    H_DLQ_STATUS,
    H_DLQ_SUBJECT,
)
from dicomflow.shared.crypto.envelope import OVERHEAD, key_id_of
from dicomflow.shared.crypto.keyring import generate_master_key_file
from dicomflow.shared.nats import natsconn, topology
from dicomflow.shared.settings import NatsSettings
from dicomflow.shared.storage.index import Index, Record, State
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from dicomflow.cli import topology as topology_cmd
from dicomflow.cli.natsconfig import Bundle, write_bundle
from dicomflow.embedded.layout import to_toml
from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series, with_pixel_bytes
from support.pipeline import Pipeline
from support.servers import wait_for
from support.storagescp import Scp

pytestmark = pytest.mark.integration

UID = "1.2.826.0.1.3680043.10.1"
SHA = "ab" * 32


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomflow", *args, "--config", str(config)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=120,
        check=False,
    )


def _config(path: Path, nats_table: dict[str, Any]) -> Path:
    """A CLI config: NATS, local storage, and a master key (for `verify`)."""
    key = path.parent / "master-1.key"
    if not key.exists():
        generate_master_key_file(key)
    tables = {
        "nats": nats_table,
        "storage": {"local_path": path.parent},
        "encryption": {"master_key": {"id": 1, "path": key}},
    }
    path.write_text(to_toml(tables))
    return path


def _small(url: str, **bounds: int) -> NatsSettings:
    """Small stream bounds: nats-server reserves each stream's max_bytes on disk."""
    sizes = {"ingest_max_bytes": 2**24, "blob_max_bytes": 2**24, "dlq_max_bytes": 2**24}
    return NatsSettings(servers=[url], **{**sizes, **bounds})


def _record(uid: str = UID) -> Record:
    return Record(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2.3.1",
        series_uid="1.2.3.2",
        modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="CT01",
        called_ae="DICOMFLOW",
        object_key=f"{uid}.dcm.enc",
        size=1000,
        sealed_size=1000 + OVERHEAD,
        sha256=SHA,
        key_id=1,
        state=State.STORED,
    )


def _event_headers() -> dict[str, str]:
    """A dicom.stored event as the store writer publishes it (valid contract)."""
    r = _record()
    instance = messages.Instance(
        sop_class_uid=r.sop_class_uid,
        sop_instance_uid=r.sop_instance_uid,
        study_uid=r.study_uid,
        series_uid=r.series_uid,
        calling_ae=r.calling_ae,
        called_ae=r.called_ae,
        transfer_syntax=r.transfer_syntax,
        size=r.size,
        sha256=r.sha256,
        modality=r.modality,
        key_id=r.key_id,
        sealed_size=r.sealed_size,
    )
    return {**instance.headers(), messages.H_OBJECT_KEY: r.object_key}


async def _dlq(url: str, seed: Path | None = None) -> list[tuple[int, dict[str, str], bytes]]:
    nc = await _connect(url, seed)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.DLQ_STREAM)
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(subjects.DLQ_STREAM, seq)
                except nats.js.errors.NotFoundError:
                    continue
                out.append((seq, dict(msg.headers or {}), msg.data or b""))
        return out
    finally:
        await nc.close()


async def _connect(url: str, seed: Path | None) -> Client:
    if seed is None:
        return await nats.connect(url)
    return await natsconn.connect_once(
        NatsSettings(servers=[url], nkey_seed_file=seed, manage_topology=False), "test"
    )


# -- 2: replay publishes only where the stage and the contract say ------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[NatsServer, Bundle]]:
    """A nats-server running the generated config, topology set up by the admin user."""
    bundle = Bundle(tmp_path / "nats-config")
    write_bundle(bundle, max_payload=1024 * 1024)
    with NatsServer(tmp_path / "js", config_file=bundle.server_config) as server:
        settings = _small(server.url).model_copy(
            update={"nkey_seed_file": bundle.seed("admin"), "manage_topology": False}
        )
        asyncio.run(topology_cmd.setup(settings))
        yield server, bundle


def test_a_planted_letter_is_refused_and_the_index_stays_intact(
    tmp_path: Path, secured: tuple[NatsServer, Bundle]
) -> None:
    """The review's attack: with the scu-gateway's credential, letters naming the index
    as their subject are planted; `dlq replay` (admin) must not write the index."""
    server, bundle = secured
    admin = _config(
        tmp_path / "admin.toml",
        {"servers": [server.url], "nkey_seed_file": bundle.seed("admin"), "manage_topology": False},
    )
    kv_subject = f"$KV.{subjects.INDEX_BUCKET}.1.2.3.999"

    async def plant() -> None:
        nc = await _connect(server.url, bundle.seed("admin"))
        try:
            await (await Index.open(nc.jetstream())).create(UID, _record())
        finally:
            await nc.close()
        nc = await _connect(server.url, bundle.seed("scu-gateway"))
        try:
            js = nc.jetstream()
            dlq = subjects.dlq_subject("scu-router")  # a subject the scu-gateway may write
            # A bare letter, as in the review, and one that passes the event contract.
            await js.publish(dlq, b'{"not": "a record"}', headers={H_DLQ_SUBJECT: kv_subject})
            await js.publish(dlq, b"", headers={**_event_headers(), H_DLQ_SUBJECT: kv_subject})
        finally:
            await nc.close()

    asyncio.run(plant())
    replay = _cli(admin, "dlq", "replay")
    assert replay.returncode == 1, replay.stderr
    assert "refused: dead letter 1 (scu-router):" in replay.stderr
    assert "replayed 2 onto dicom.stored.DICOMFLOW.CT01" in replay.stderr
    assert kv_subject not in replay.stderr

    listed = _cli(admin, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["sop_instance_uid"] for line in listed.stdout.splitlines()] == [UID]
    assert [seq for seq, _, _ in asyncio.run(_dlq(server.url, bundle.seed("admin")))] == [1]

    async def index_keys() -> list[str]:
        nc = await _connect(server.url, bundle.seed("admin"))
        try:
            return await (await Index.open(nc.jetstream())).keys()
        finally:
            await nc.close()

    assert asyncio.run(index_keys()) == [UID]


# -- 3: no plaintext rests in the DLQ -----------------------------------------------------

SEALED_BOUND = 1_500_000
FILLER = "dicomflow.sealed.FILLER.FILLER"


async def _fill_sealed(url: str) -> None:
    """SEALED (no store writer running) filled to within a few bytes of its bound: every
    publish of the encryptor is then refused, as in a long store-writer outage."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.publish(FILLER, b"f" * 900_000)
        used = (await js.stream_info(subjects.SEALED_STREAM)).state.bytes
        size = SEALED_BOUND - used - 40
        while True:
            try:
                await js.publish(FILLER, b"f" * size)
            except nats.js.errors.APIError:
                size -= 10
            else:
                return
    finally:
        await nc.close()


async def _unfill_sealed(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream(subjects.SEALED_STREAM, subject=FILLER)
    finally:
        await nc.close()


async def _blob_names(url: str, bucket: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        store = await nc.jetstream().object_store(bucket)
        try:
            return [i.name or "" for i in await store.list(ignore_deletes=True)]
        except nats.js.errors.NotFoundError:
            return []
    finally:
        await nc.close()


def test_a_dead_lettered_ingest_instance_rests_sealed_and_replays_to_storage(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    small = ct_series(tmp_path / "small", 1)
    big = ct_series(tmp_path / "big", 1, rows=1024, columns=1024)  # 2 MiB: a blob body
    objects = tmp_path / "objects"
    objects.mkdir()
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": objects},
        extra={
            "nats": {"ingest_max_bytes": SEALED_BOUND},
            "consumer": {"max_deliver": 2, "outage_grace": 0.2},
        },
    )
    pipeline.start("encryptor", "scp-gateway")  # no store writer: SEALED keeps everything
    try:
        asyncio.run(_fill_sealed(nats_server.url))
        sent = pipeline.send(small + big)
        assert sent.statuses() == ["Success"] * 2, sent.output

        def two_letters() -> list[tuple[int, dict[str, str], bytes]] | None:
            got = asyncio.run(_dlq(nats_server.url))
            return got if len(got) == 2 else None

        letters = wait_for("two dead letters", two_letters, timeout=60)
        plain = {f.sop_instance_uid: f.path.read_bytes() for f in small + big}
        digests = {}
        for _, headers, data in letters:
            assert headers[H_DLQ_STAGE] == "encryptor"
            assert headers[H_DLQ_BODY] == "sealed", headers[H_DLQ_REASON]
            assert "body sealed under master key 1" in headers[H_DLQ_REASON]
            instance = messages.parse(headers, sealed=True, signed=True)
            if instance.body is messages.BodyKind.INLINE:
                assert key_id_of(data[:OVERHEAD]) == 1  # an A1 envelope
                assert len(data) == instance.size + OVERHEAD
                assert plain[instance.sop_instance_uid][-4096:] not in data
                assert hashlib.sha256(data).hexdigest() == instance.sealed_sha256
            else:
                assert data == b""
                assert instance.blob.startswith(f"{messages.SEALED_BLOB_PREFIX}.")
            digests[instance.sop_instance_uid] = instance.sha256
        kinds = {messages.parse(h, sealed=True, signed=True).body for _, h, _ in letters}
        assert kinds == {"inline", "blob"}
        assert asyncio.run(_blob_names(nats_server.url, subjects.INGEST_BLOB_BUCKET)) == []

        asyncio.run(_unfill_sealed(nats_server.url))
        pipeline.start("store-writer")
        replay = pipeline.cli("dlq", "replay")
        assert replay.returncode == 0, replay.stderr
        assert replay.stderr.count("onto dicomflow.sealed.DICOMFLOW.STORESCU") == 2
        assert set(pipeline.wait_stored(2)) == set(plain)
        for uid, sha256 in digests.items():  # the bytes the gateway received, decrypted
            out = tmp_path / f"{uid}.dcm"
            got = pipeline.cli("get", uid, "-o", str(out))
            assert got.returncode == 0, got.stderr
            assert hashlib.sha256(out.read_bytes()).hexdigest() == sha256
            assert out.read_bytes()[-4096:] == plain[uid][-4096:]  # the pixel data
        assert pipeline.dead_letters() == []
    finally:
        pipeline.stop()


def test_a_letter_without_its_body_is_refused_by_replay(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """An ingest message whose blob is gone is dead-lettered headers only, and replay
    says there is nothing to replay instead of publishing it."""
    header_only = {**_event_headers(), messages.H_BODY: "blob"}
    del header_only[messages.H_OBJECT_KEY], header_only[messages.H_KEY_ID]
    del header_only[messages.H_SEALED_SIZE]
    header_only[messages.H_BLOB] = f"ingest.{messages.reference(UID, SHA)}.{'A' * 22}"
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path},
        extra={"consumer": {"max_deliver": 2, "outage_grace": 0.2}},
    )
    pipeline.start("encryptor")
    try:

        async def publish() -> None:
            nc = await nats.connect(nats_server.url)
            try:
                await nc.jetstream().publish(
                    subjects.ingest_subject("DICOMFLOW", "CT01"), b"", headers=header_only
                )
            finally:
                await nc.close()

        asyncio.run(publish())
        (letter,) = wait_for("a dead letter", lambda: pipeline.dead_letters() or None)
        assert letter[H_DLQ_BODY] == "dropped"
        assert "body not kept: its plaintext blob is missing" in letter[H_DLQ_REASON]
        assert messages.H_BLOB not in letter
        replay = pipeline.cli("dlq", "replay")
        assert replay.returncode == 1
        assert "refused: dead letter 1 (encryptor): its body was not kept" in replay.stderr
        assert len(pipeline.dead_letters()) == 1
    finally:
        pipeline.stop()


def test_a_replayed_delivery_carries_no_dead_letter_header(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """A destination refuses the C-STORE (0xC000): the delivery is dead-lettered with
    its status; `dlq replay` republishes it without any Dicomflow-Dlq-* header (the
    status included), as an ordinary delivery request."""
    peer = Scp(0, status=0xC000)
    scu = {
        "destinations": {
            "PACS": {"ae_title": "PEER", "host": "127.0.0.1", "port": peer.port},
        },
        "rules": [{"destinations": ["PACS"]}],
    }
    pipeline = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": tmp_path}, scu=scu
    ).start()
    try:
        sent = pipeline.send([with_pixel_bytes(tmp_path / "sc.dcm", 1000)])
        assert sent.statuses() == ["Success"], sent.output
        (letter,) = wait_for("a refused delivery", lambda: pipeline.dead_letters() or None)
        assert letter[H_DLQ_STAGE] == "deliver-PACS"
        assert letter[H_DLQ_STATUS] == "0xC000", letter
        pipeline.stages["scu-gateway"].stop()  # the replayed request stays on DELIVERY

        replay = pipeline.cli("dlq", "replay")
        assert replay.returncode == 0, replay.stderr
        assert "onto dicomflow.deliver.PACS" in replay.stderr
        assert pipeline.dead_letters() == []
        headers = asyncio.run(_last_delivery(nats_server.url))
        assert headers[messages.H_MSG_ID].startswith("replay:1:")
        assert [h for h in headers if h.lower().startswith("dicomflow-dlq-")] == [], headers
        assert not set(headers) & set(DLQ_HEADERS)
    finally:
        pipeline.stop()
        peer.close()


async def _last_delivery(url: str) -> dict[str, str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.DELIVERY_STREAM)
        msg = await js.get_msg(subjects.DELIVERY_STREAM, info.state.last_seq)
        return dict(msg.headers or {})
    finally:
        await nc.close()


# -- 3: bounds and purge -------------------------------------------------------------------


async def test_an_existing_dlq_stream_gets_the_bounds(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        # As an earlier dicomflow made it: no age, no size bound, discard old.
        await js.add_stream(
            StreamConfig(
                name=subjects.DLQ_STREAM,
                subjects=[f"{subjects.DLQ_PREFIX}.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
            )
        )
        await js.publish(subjects.dlq_subject("store-writer"), b"x" * 1000)
        await topology.ensure(js, _small(nats_server.url, dlq_max_bytes=4096), migrate=True)
        config = (await js.stream_info(subjects.DLQ_STREAM)).config
        assert config.max_age == 30 * 24 * 3600.0
        assert config.max_bytes == 4096
        assert config.discard == DiscardPolicy.NEW
        # Full: a new letter is refused (the stage keeps its message), the old one stays.
        with pytest.raises(nats.js.errors.APIError):
            await js.publish(subjects.dlq_subject("store-writer"), b"y" * 4000)
        assert (await js.stream_info(subjects.DLQ_STREAM)).state.messages == 1
    finally:
        await nc.close()


def test_purge_asks_first_and_removes_what_it_says(tmp_path: Path, nats_server: NatsServer) -> None:
    config = _config(tmp_path / "c.toml", {"servers": [nats_server.url]})

    async def letters(count: int) -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await topology.ensure(js, _small(nats_server.url))
            for i in range(count):
                await js.publish(subjects.dlq_subject("store-writer"), f"{i}".encode())
        finally:
            await nc.close()

    asyncio.run(letters(3))
    refused = _cli(config, "dlq", "purge", "1")  # no terminal, no --yes
    assert refused.returncode == 2
    assert "no terminal to ask on; add --yes" in refused.stderr
    assert _cli(config, "dlq", "purge", "7", "--yes").returncode == 2  # no such letter
    assert len(asyncio.run(_dlq(nats_server.url))) == 3

    # At a terminal: anything but "yes" keeps them; "yes" removes the one named.
    for answer, code, left in ((b"no\n", 1, 3), (b"yes\n", 0, 2)):
        leader, follower = pty.openpty()
        try:
            os.write(leader, answer)
            asked = subprocess.run(
                [sys.executable, "-m", "dicomflow", "dlq", "purge", "1", "--config", str(config)],
                stdin=follower,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(follower)
            os.close(leader)
        assert asked.returncode == code, asked.stderr
        assert "Remove 1 dead letter(s) from DICOMFLOW_DLQ for good? Type yes:" in asked.stderr
        assert len(asyncio.run(_dlq(nats_server.url))) == left

    purged = _cli(config, "dlq", "purge", "--all", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 2 dead letter(s)" in purged.stderr
    assert asyncio.run(_dlq(nats_server.url)) == []


# -- 13a, 13b and malformed index records -------------------------------------------------


async def _seed_index(url: str, malformed: dict[str, bytes]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await topology.ensure(js, _small(url))
        kv = await js.key_value(subjects.INDEX_BUCKET)
        await kv.put(UID, _record().to_json())
        for key, raw in malformed.items():
            await kv.put(key, raw)
    finally:
        await nc.close()


def test_ls_and_verify_survive_malformed_records(tmp_path: Path, nats_server: NatsServer) -> None:
    bad = {
        "1.2.3.999": b'{"not": "a record"}',
        "1.2.3.998": b"{",
        "1.2.3.997": _record("1.2.3.997").to_json().replace(b'"size": 1000', b'"size": "big"'),
    }
    asyncio.run(_seed_index(nats_server.url, bad))
    config = _config(tmp_path / "c.toml", {"servers": [nats_server.url]})
    listed = _cli(config, "ls", "--json")
    assert listed.returncode == 1
    assert [json.loads(line)["sop_instance_uid"] for line in listed.stdout.splitlines()] == [UID]
    for key in bad:
        assert f"malformed index record {key}: index record is malformed" in listed.stderr
    assert "3 malformed index record(s), not listed" in listed.stderr
    assert "Traceback" not in listed.stderr

    verified = _cli(config, "verify")
    assert verified.returncode == 1
    summary = json.loads(verified.stdout.splitlines()[-1])
    assert summary["malformed"] == 3
    assert summary["failed"] == 1  # the good record's object is not in storage
    assert "Traceback" not in verified.stderr


@pytest.mark.parametrize("command", [("ls", "--json"), ("dlq", "ls", "--json"), ("ls",)])
def test_a_listing_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, nats_server: NatsServer, command: tuple[str, ...]
) -> None:
    """`dicomflow ls --json | head -c 1`: the reader is gone before anything is written
    (its end of the pipe closed at once), so every write fails with EPIPE."""
    asyncio.run(_seed_index(nats_server.url, {}))
    config = _config(tmp_path / "c.toml", {"servers": [nats_server.url]})
    with subprocess.Popen(
        [sys.executable, "-m", "dicomflow", *command, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, stderr  # 128 + SIGPIPE, as the shell reports
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_dlq_ls_json_is_an_array_empty_or_not(tmp_path: Path, nats_server: NatsServer) -> None:
    asyncio.run(_seed_index(nats_server.url, {}))
    config = _config(tmp_path / "c.toml", {"servers": [nats_server.url]})
    empty = _cli(config, "dlq", "ls", "--json")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout) == []

    async def letter() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish(
                subjects.dlq_subject("scu-router"),
                b"",
                headers={**_event_headers(), H_DLQ_REASON: "why"},
            )
        finally:
            await nc.close()

    asyncio.run(letter())
    one = _cli(config, "dlq", "ls", "--json")
    (row,) = json.loads(one.stdout)
    assert row["seq"] == 1 and row["stage"] == "scu-router" and row["reason"] == "why"
