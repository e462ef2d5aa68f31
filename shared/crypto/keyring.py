"""Master keys (KEKs) and the key ring that makes key rotation possible.

A master key only ever wraps per-object data keys (see ``envelope``). New objects use
the ring's current key; reading accepts the current key and every previous one, so an
operator rotates by adding a new current key and demoting the old one to ``previous``.

Key bytes never appear in a repr, a log line or an error message: errors name the file
and what is wrong with it, never its content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomflow.shared.crypto.keyfiles import read_key_file, write_new_key_file
from dicomflow.shared.errors import ConfigError, KeyFileError, UnknownMasterKey

KEY_LEN = 32
MAX_KEY_ID = 2**32 - 1
CHECK_LABEL = b"dicomflow key check v1"

_MAKE_ONE = "make one with `dicomflow keys new PATH` or `openssl rand -base64 32 > PATH`"


@dataclass(frozen=True)
class MasterKey:
    """A 32-byte AES-256 key-encryption key and the uint32 id written into each object."""

    key_id: int
    key: bytes = field(repr=False)
    source: Path | None = field(default=None, compare=False)  # the key file, for errors

    def __post_init__(self) -> None:
        if (
            isinstance(self.key_id, bool)
            or not isinstance(self.key_id, int)
            or not 0 <= self.key_id <= MAX_KEY_ID
        ):
            raise ConfigError(
                f"master key id must be an integer from 0 to {MAX_KEY_ID} (uint32), "
                f"got {self.key_id!r}"
            )
        if not isinstance(self.key, bytes):
            raise ConfigError(f"master key {self.key_id} must be bytes")
        if len(self.key) != KEY_LEN:
            raise ConfigError(
                f"master key {self.key_id} must be exactly {KEY_LEN} bytes, got {len(self.key)}"
            )

    def check_value(self) -> str:
        """A key check value: HMAC-SHA256 of a fixed label under the key, 8 bytes, hex.
        It tells two keys apart and reveals nothing usable about the key."""
        return hmac.new(self.key, CHECK_LABEL, hashlib.sha256).digest()[:8].hex()

    def __repr__(self) -> str:
        # Spelled out rather than trusting field(repr=False) alone: a future field or a
        # dataclass option change must not start printing key material.
        return f"MasterKey(key_id={self.key_id}, key=<{KEY_LEN} bytes hidden>)"

    __str__ = __repr__


def load_master_key(key_id: int, path: Path) -> MasterKey:
    """Read a one-line base64 key file; refuse anything but exactly 32 decoded bytes.

    Unlike the Orthanc plugins we refuse short or long keys instead of padding or
    truncating them: a wrong key file must stop the service, not weaken it silently.
    """
    raw = read_key_file(path, "master key file", _MAKE_ONE)
    text = raw.strip()
    if not text:
        raise KeyFileError(f"master key file {path} is empty; {_MAKE_ONE}")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        # No detail from exc: it may quote part of the file.
        raise KeyFileError(
            f"master key file {path} is not valid base64 (one line of 44 base64 "
            f"characters expected); {_MAKE_ONE}"
        ) from exc
    if len(key) != KEY_LEN:
        raise KeyFileError(
            f"master key file {path} decodes to {len(key)} bytes; a master key must be "
            f"exactly {KEY_LEN} bytes of base64 ({_MAKE_ONE})"
        )
    return MasterKey(key_id, key, path)


class KeyRing:
    """The current key (used to seal) plus previous keys (still accepted to open)."""

    __slots__ = ("_by_id", "_current")

    def __init__(self, current: MasterKey, previous: Sequence[MasterKey] = ()) -> None:
        by_id: dict[int, MasterKey] = {}
        for key in (current, *previous):
            if key.key_id in by_id:
                raise ConfigError(
                    f"master key id {key.key_id} is configured more than once; every key "
                    "in the ring (current and previous) needs its own id"
                )
            by_id[key.key_id] = key
        self._current = current
        self._by_id = by_id  # insertion order: current first, then previous

    @property
    def current(self) -> MasterKey:
        return self._current

    @property
    def keys(self) -> tuple[MasterKey, ...]:
        """The current key first, then the previous keys."""
        return tuple(self._by_id.values())

    @property
    def key_ids(self) -> tuple[int, ...]:
        """Ids in lookup order: the current key first, then the previous keys."""
        return tuple(self._by_id)

    def find(self, key_id: int) -> MasterKey:
        """The key with this id, or ``UnknownMasterKey`` (ids are unique, so order is moot)."""
        try:
            return self._by_id[key_id]
        except KeyError:
            raise UnknownMasterKey(key_id) from None

    def __repr__(self) -> str:
        return f"KeyRing(current={self._current.key_id}, key_ids={self.key_ids})"


def generate_master_key_file(path: Path) -> None:
    """Write a fresh random master key as base64 + newline, readable by the owner only.

    O_EXCL rather than an exists() check: overwriting a key file destroys every object
    sealed under it, so not even a race may do it.
    """
    write_new_key_file(
        path,
        base64.b64encode(secrets.token_bytes(KEY_LEN)) + b"\n",
        0o600,
        "master key file",
        ": replacing a master key makes every object sealed under it unreadable; "
        "choose another path",
    )


def parse_key_spec(spec: str) -> tuple[int, Path]:
    """Parse ``ID=PATH`` as given on the command line, e.g. ``1=/etc/dicomflow/kek.b64``."""
    key_id_text, sep, path_text = spec.partition("=")
    key_id_text = key_id_text.strip()
    if not sep or not path_text or not key_id_text.isascii() or not key_id_text.isdigit():
        raise ConfigError(
            f"master key {spec!r} must look like ID=PATH with a numeric id, "
            "e.g. 1=/etc/dicomflow/master-1.b64"
        )
    key_id = int(key_id_text)
    if key_id > MAX_KEY_ID:
        raise ConfigError(
            f"master key id {key_id} in {spec!r} is out of range: ids are 0 to {MAX_KEY_ID}"
        )
    return key_id, Path(path_text)
