"""How dicomflow's NATS client moves bytes: three fixes to nats-py 2.16's defaults.

- Publish framing. nats-py frames a publish as ``line.encode() + hdr + payload + CRLF``:
  every ``+`` allocates and copies the whole payload again; for a 0.5 MiB body the two
  copies (fresh memory, page faults included) cost about 1.5 ms in a micro-benchmark
  here, one ``bytes.join`` of the four parts under 0.1 ms. In the pipeline's profiles it
  was a fifth of the gateway's time holding the GIL. ``pub_cmd``/``hpub_cmd`` below
  produce byte-identical commands (``tests/unit/test_natsio.py`` checks it).
- Read size. nats-py reads its socket 32 KiB at a time (``DEFAULT_BUFFER_SIZE``, also
  the stream reader's limit), so a 1 MiB blob chunk took 32 reads through its parser;
  1 MiB reads cut the stages' CPU on large objects (bench/large.py with a 512 MiB
  object: stored in 7.8 s instead of 9.3 s).
- Received payloads. nats-py's parser takes a message's headers and payload as
  ``bytes(self.buf[a:b])``: a bytearray slice, then a copy of it. Its buffer here is a
  ``ParseBuffer``, whose slices are already ``bytes``: one copy fewer of each payload,
  and no parser code copied (``Parser.reset``, which makes the buffer, is wrapped).
  bench/natsread.py, a subscriber of 0.5 MiB JetStream messages: 0.93x the CPU per
  message of the 1 MiB reads alone (0.76x nats-py as shipped).

``install`` replaces nats-py's module-level functions and constant, which the client
looks up at each publish and connection, and its parser's ``reset``; it is idempotent
and ``natsconn`` calls it before every connection. On a nats-py it was not verified on
(``FENCE``) it changes nothing, with a warning.
"""

from __future__ import annotations

from typing import SupportsIndex, overload

from dicomflow.shared import patches
from nats.aio import client
from nats.protocol import command, parser

FENCE = patches.NATS_IO  # the version gate of this module's patch
_CRLF = b"\r\n"
READ_BUFFER = 1024 * 1024


def pub_cmd(subject: str, reply: str, payload: bytes) -> bytes:
    line = f"PUB {subject} {reply} {len(payload)}\r\n".encode()
    return b"".join((line, payload, _CRLF))


def hpub_cmd(subject: str, reply: str, hdr: bytes | bytearray, payload: bytes) -> bytes:
    hdr_len = len(hdr)
    line = f"HPUB {subject} {reply} {hdr_len} {hdr_len + len(payload)}\r\n".encode()
    return b"".join((line, hdr, payload, _CRLF))


class ParseBuffer(bytearray):
    """nats-py's parser buffer, whose slices are ``bytes`` taken with one copy.

    ``Parser.parse`` takes a message's headers and payload as ``bytes(self.buf[a:b])``
    (nats/protocol/parser.py, the ``AWAITING_MSG_PAYLOAD`` branch): a bytearray slice,
    then a bytes copy of it. Here the slice is already the ``bytes`` (copied once out of a
    memoryview released before the caller's ``del self.buf[:n]``) and ``bytes()`` of a
    ``bytes`` is that same object: same values, same type, one copy fewer. Nothing else
    in the parser slices its buffer; indexing by position is bytearray's own.
    """

    __slots__ = ()

    # bytes, not bytearray, for a slice: what the parser makes of its slices anyway.
    @overload  # type: ignore[override]
    def __getitem__(self, key: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...
    def __getitem__(self, key: SupportsIndex | slice) -> int | bytes:
        if isinstance(key, slice):
            with memoryview(self) as view:
                return bytes(view[key])
        return super().__getitem__(key)


_UPSTREAM_RESET = parser.Parser.reset


def _reset(self: parser.Parser) -> None:
    """nats-py's ``Parser.reset`` (called by ``__init__`` and on reconnect), with a
    ``ParseBuffer`` for its buffer."""
    _UPSTREAM_RESET(self)
    self.buf = ParseBuffer()


def install() -> bool:
    """Make nats-py frame publishes with one copy of the payload, read 1 MiB at once and
    take each received payload with one copy (True), if this nats-py is one it was
    verified on. A client made before this keeps its parser's buffer until it reconnects."""
    return FENCE.install(_apply)


def _apply() -> None:
    command.pub_cmd = pub_cmd
    command.hpub_cmd = hpub_cmd
    client.DEFAULT_BUFFER_SIZE = READ_BUFFER
    parser.Parser.reset = _reset  # type: ignore[method-assign]
