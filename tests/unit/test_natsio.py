"""Our publish framing is byte for byte nats-py's own, and it is what the client uses;
our receive path hands the client exactly what nats-py's parser hands it."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import nats
import pytest
from dicomflow.shared.patches import natsio
from nats.aio import client as client_module
from nats.errors import ProtocolError
from nats.js.api import StreamConfig
from nats.protocol import command, parser

from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer

ORIGINAL = importlib.reload(command)  # nats-py's own functions, even if installed before


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 4099])
@pytest.mark.parametrize("reply", ["", "_INBOX.abc.def"])
def test_frames_are_identical_to_nats_py(payload: bytes, reply: str) -> None:
    hdr = bytearray(b"NATS/1.0\r\nNats-Msg-Id: 1.2.3:ab\r\nDicomflow-Size: 9\r\n\r\n")
    assert natsio.pub_cmd("dicom.ingest.A.B", reply, payload) == ORIGINAL.pub_cmd(
        "dicom.ingest.A.B", reply, payload
    )
    assert natsio.hpub_cmd("dicom.ingest.A.B", reply, hdr, payload) == ORIGINAL.hpub_cmd(
        "dicom.ingest.A.B", reply, hdr, payload
    )


def test_install_replaces_what_the_client_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from nats.aio import client

    monkeypatch.setattr(client, "DEFAULT_BUFFER_SIZE", 32768)
    monkeypatch.setattr(command, "pub_cmd", ORIGINAL.pub_cmd)
    monkeypatch.setattr(command, "hpub_cmd", ORIGINAL.hpub_cmd)
    monkeypatch.setattr(parser.Parser, "reset", natsio._UPSTREAM_RESET)
    natsio.install()
    natsio.install()  # idempotent

    assert client.prot_command.hpub_cmd is natsio.hpub_cmd
    assert client.prot_command.pub_cmd is natsio.pub_cmd
    assert client.DEFAULT_BUFFER_SIZE == natsio.READ_BUFFER
    assert type(client.Client()._ps.buf) is natsio.ParseBuffer


def test_off_on_another_nats_py_the_parser_keeps_its_bytearray(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parser.Parser, "reset", natsio._UPSTREAM_RESET)
    monkeypatch.setattr(client_module, "__version__", "2.17.0")
    try:
        assert natsio.install() is False
        assert parser.Parser.reset is natsio._UPSTREAM_RESET
        assert type(parser.Parser(Recorder()).buf) is bytearray
    finally:
        monkeypatch.undo()
        natsio.FENCE.admit()  # decided again on the real version


# -- the receive path: the parser's buffer ------------------------------------------------
HDR = b"NATS/1.0\r\nNats-Msg-Id: 1.2.3:ab\r\n" + b"Dicomflow-Sig: " + b"s" * 1400 + b"\r\n\r\n"
STATUS_HDR = b"NATS/1.0 404 No Messages\r\n\r\n"


def _msg(subject: bytes, sid: int, reply: bytes, payload: bytes) -> bytes:
    reply_part = b" " + reply if reply else b""
    return b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, reply_part, len(payload), payload)


def _hmsg(subject: bytes, sid: int, reply: bytes, hdr: bytes, payload: bytes) -> bytes:
    reply_part = b" " + reply if reply else b""
    line = b"HMSG %s %d%s %d %d\r\n" % (subject, sid, reply_part, len(hdr), len(hdr) + len(payload))
    return line + hdr + payload + b"\r\n"


def protocol(payload: bytes) -> bytes:
    """What a server sends: every operation the parser handles, MSG and HMSG with and
    without reply, empty payloads, a header-only message (a JetStream status)."""
    reply = b"$JS.ACK.INGEST.encryptor.1.7.7.1700000000000000000.0"
    return b"".join(
        (
            b'INFO {"server_id":"x","max_payload":1048576,"headers":true}\r\n',
            b"+OK\r\n",
            _msg(b"a.b", 1, b"", payload),
            b"PING\r\n",
            _hmsg(b"dicom.ingest.A.B", 2, reply, HDR, payload),
            _msg(b"a.b", 1, b"_INBOX.x", b""),
            _hmsg(b"_INBOX.y.z", 3, b"", STATUS_HDR, b""),
            b"PONG\r\n",
            b"-ERR 'Permissions Violation for Subscription to \"x\"'\r\n",
            _hmsg(b"c", 4, b"", HDR, b"\r\n" + payload[:7]),  # CRLF inside a payload
            _msg(b"c", 4, b"r", payload[::-1]),
        )
    )


class Recorder:
    """What the parser hands its client: each call with the types of its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, payload: bytes, hdr: bytes | None
    ) -> None:
        kinds = tuple(type(x).__name__ for x in (subject, reply, payload, hdr))
        self.calls.append(("msg", sid, subject, reply, payload, hdr, kinds))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


async def received(pieces: list[bytes], *, patched: bool) -> list[tuple[object, ...]]:
    """Feed ``pieces`` to a nats-py parser, ours (the patch installed) or as shipped."""
    recorder = Recorder()
    ps = parser.Parser(recorder)
    if patched:
        assert isinstance(ps.buf, natsio.ParseBuffer)
    else:
        ps.buf = bytearray()
    for piece in pieces:
        await ps.parse(piece)
    recorder.calls.append(("left", bytes(ps.buf), ps.state, ps.needed, ps.header_needed))
    return recorder.calls


@pytest.fixture
def installed() -> None:
    assert natsio.install()


async def test_a_stream_cut_at_every_byte_is_parsed_as_nats_py_parses_it(installed: None) -> None:
    stream = protocol(bytes(range(256)))
    whole = await received([stream], patched=False)
    assert [c[0] for c in whole].count("msg") == 6
    for cut in range(len(stream) + 1):
        pieces = [stream[:cut], stream[cut:]]
        assert await received(pieces, patched=True) == whole, cut
        assert await received(pieces, patched=False) == whole, cut


async def test_a_stream_cut_at_random_bytes_is_parsed_as_nats_py_parses_it(
    installed: None,
) -> None:
    rng = random.Random(17)  # noqa: S311 (reproducible cuts)
    stream = protocol(rng.randbytes(700_000)) * 3
    whole = await received([stream], patched=False)
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 60)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert await received(pieces, patched=True) == whole, cuts
    # a partial message is left in the buffer the same way
    assert await received([stream[:-5]], patched=True) == await received(
        [stream[:-5]], patched=False
    )


async def test_unknown_protocol_is_refused_as_nats_py_refuses_it(installed: None) -> None:
    for patched in (False, True):
        with pytest.raises(ProtocolError):
            await received([b"+OK\r\nBOGUS x\r\n"], patched=patched)


async def test_installed_a_clients_payloads_are_sliced_once(
    installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's parser has our buffer: a payload is one copy out of it, not a
    bytearray slice then a copy of that."""
    ps = parser.Parser(Recorder())
    assert isinstance(ps.buf, natsio.ParseBuffer)
    ps.buf.extend(b"0123456789")
    taken = ps.buf[2:5]
    assert type(taken) is bytes
    assert bytes(taken) is taken  # what the parser's bytes() makes of it: no copy
    del ps.buf[:3]  # the view it was taken through is released
    assert ps.buf == b"3456789"
    assert ps.buf[0] == ord("3")
    ps.reset()
    assert isinstance(ps.buf, natsio.ParseBuffer)


async def test_a_multi_mib_jetstream_message_with_headers_arrives_intact(
    tmp_path: Path, installed: None
) -> None:
    body = random.Random(5).randbytes(5 * 1024 * 1024 + 3)  # noqa: S311
    headers = {"Dicomflow-Sig": "s" * 1500, "Dicomflow-Size": str(len(body))}
    with NatsServer(tmp_path / "nats", max_payload=EMBEDDED_MAX_PAYLOAD) as server:
        nc = await nats.connect(server.url)
        try:
            assert isinstance(nc._ps.buf, natsio.ParseBuffer)
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="BIG", subjects=["big.>"]))
            for i, data in enumerate((body, b"", body[::-1])):
                await js.publish(f"big.{i}", data, headers={**headers, "Nats-Msg-Id": str(i)})
            sub = await js.pull_subscribe("big.>", durable="reader")
            msgs = await sub.fetch(3, timeout=10)
            while len(msgs) < 3:
                msgs += await sub.fetch(3 - len(msgs), timeout=10)
        finally:
            await nc.close()
    assert [m.data for m in msgs] == [body, b"", body[::-1]]
    for i, m in enumerate(msgs):
        assert m.headers == {**headers, "Nats-Msg-Id": str(i)}
        assert type(m.data) is bytes
