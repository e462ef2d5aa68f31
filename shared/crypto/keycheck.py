"""Key check values: a master key file that is not the key its id stands for stops the
stage instead of being used silently.

Any 32 bytes make a valid master key, so a wrong file under a configured id (a key
from another site, a regenerated file) would seal objects that the stages holding the
right key cannot open, and nobody would notice until a read failed. The first stage to
start with a key id records that key's check value (``MasterKey.check_value``: an HMAC
of a fixed label, which reveals nothing usable about the key) in the ``dicomflow-keys``
bucket; from then on every stage holding a key under that id must hold the same key.
The bucket keeps one value per key id and the server refuses a second write of it
(``topology.keys_config``), so a recorded value is never replaced through NATS.
"""

from __future__ import annotations

import logging

from dicomflow.shared.contracts import subjects
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats.errormap import nats_errors
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


class KeyMismatch(ConfigError):
    """A master key file holds another key than the one recorded for its id."""


async def check(js: JetStreamContext, keyring: KeyRing, *, record: bool = True) -> None:
    """Compare every key of ``keyring`` with the check value recorded for its id;
    raise KeyMismatch naming the first key that differs. ``record``: record the value
    of a key id seen for the first time (the stages); without it (the operator's
    commands) an unrecorded id is only not checked."""
    try:
        kv = await js.key_value(subjects.KEYS_BUCKET)
    except BucketNotFoundError:
        if not record:
            return
        raise ConfigError(
            f"the {subjects.KEYS_BUCKET} bucket is missing: run `dicomflow topology` "
            "(or `dicomflow up`) with this version first"
        ) from None
    with nats_errors("could not check the master keys"):
        for key in keyring.keys:
            await _check_key(kv, key, record)


async def _check_key(kv: KeyValue, key: MasterKey, record: bool) -> None:
    value = key.check_value()
    recorded = await _recorded(kv, key.key_id)
    if recorded is None and record:
        try:
            await kv.create(str(key.key_id), value.encode())
        except KeyWrongLastSequenceError:  # another stage recorded it first
            recorded = await _recorded(kv, key.key_id)
        else:
            log.info("recorded the check value of master key %d", key.key_id)
            return
    if recorded is not None and recorded != value:
        raise KeyMismatch(
            f"master key file {key.source or '(not from a file)'} is not master key "
            f"{key.key_id}: its key check value differs from the one recorded for id "
            f"{key.key_id} when that key was first used. Objects sealed with it could not "
            "be opened with the real key. Configure the right file for this id, or a new "
            "key under a new id (`dicomflow keys new PATH`)"
        )


async def _recorded(kv: KeyValue, key_id: int) -> str | None:
    try:
        entry = await kv.get(str(key_id))
    except KeyNotFoundError:
        return None
    return entry.value.decode(errors="replace") if entry.value is not None else None
