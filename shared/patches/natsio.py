"""How dicomflow's NATS client moves bytes: two fixes to nats-py 2.16's defaults.

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

``install`` replaces nats-py's module-level functions and constant, which the client
looks up at each publish and connection; it is idempotent and ``natsconn`` calls it
before every connection. On a nats-py it was not verified on (``FENCE``) it changes
nothing, with a warning.
"""

from __future__ import annotations

from dicomflow.shared import patches
from nats.aio import client
from nats.protocol import command

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


def install() -> bool:
    """Make nats-py frame publishes with one copy of the payload and read 1 MiB at once
    (True), if this nats-py is one it was verified on."""
    return FENCE.install(_apply)


def _apply() -> None:
    command.pub_cmd = pub_cmd
    command.hpub_cmd = hpub_cmd
    client.DEFAULT_BUFFER_SIZE = READ_BUFFER
