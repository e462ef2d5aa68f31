"""`dicomflow rekey --to ID` and `dicomflow keys status`: key rotation at rest."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.cli.reading import open_reader
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.crypto.keyring import MAX_KEY_ID
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import ReaderSettings
from dicomflow.shared.storage.rotation import Rotator, Tally, key_status


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rekey = sub.add_parser(
        "rekey",
        help="re-encrypt stored objects under the current master key",
        description=(
            "Re-encrypt every stored object that is not under master key ID with the "
            "current master key, which must be ID (configure it as encryption.master_key "
            "and keep the old keys as encryption.previous_keys). Each object is decrypted "
            "and its GCM tag and SHA-256 verified, re-sealed into a private temporary file, "
            "verified again, and only then written back under the same name; the index "
            "record follows. Objects already under ID are skipped, so an interrupted run "
            "is resumed by running it again. Progress goes to stderr, one line per failure "
            "and a JSON summary to stdout; exits 1 if any object failed."
        ),
    )
    add_settings_options(rekey)
    rekey.add_argument("--to", type=int, required=True, metavar="ID", help="target key id")
    rekey.add_argument(
        "--dry-run", action="store_true", help="count what would be re-encrypted; change nothing"
    )
    rekey.set_defaults(func=lambda a: asyncio.run(_rekey(a)))


def register_status(keys_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = keys_sub.add_parser(
        "status",
        help="how many stored objects each master key protects",
        description=(
            "Read the A1 prefix (70 bytes, one ranged GET) of every stored object and count "
            "the objects per master-key id: the truth at rest, not the index's record of it. "
            "A key may be retired once it protects no object. Exits 1 if an object is "
            "missing or not an A1 object."
        ),
    )
    add_settings_options(status)
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    status.set_defaults(func=lambda a: asyncio.run(_status(a)))


async def _status(args: argparse.Namespace) -> int:
    settings = settings_from(args, ReaderSettings)
    roles: dict[int, str] = {}
    if settings.encryption.master_key is not None:
        roles[settings.encryption.master_key.id] = "current"
        roles.update({k.id: "previous" for k in settings.encryption.previous_keys})
    async with open_reader(settings, decrypt=False) as reader:
        by_key, tally = await key_status(reader.index, reader.store)
    for uid, problem in tally.failures:
        print(f"FAIL {uid}: {problem}")
    if args.json:
        print(
            json.dumps(
                {
                    "keys": {str(k): n for k, n in sorted(by_key.items())},
                    "failed": tally.counts["failed"],
                    "pending": tally.counts["pending"],
                }
            )
        )
    else:
        for key_id in sorted(set(by_key) | set(roles)):
            role = roles.get(key_id, "NOT CONFIGURED: these objects cannot be read")
            print(f"key {key_id:>10}  {by_key[key_id]:>9} object(s)  {role}")
    return 1 if tally.counts["failed"] else 0


async def _rekey(args: argparse.Namespace) -> int:
    target: int = args.to
    if not 0 <= target <= MAX_KEY_ID:
        raise ConfigError(f"--to {target}: key ids are 0 to {MAX_KEY_ID}")
    settings = settings_from(args, ReaderSettings)
    keyring = load_keyring(settings.encryption)
    if keyring.current.key_id != target:
        raise ConfigError(
            f"--to {target}, but the current master key is {keyring.current.key_id}: "
            f"configure key {target} as encryption.master_key (and keep the old keys as "
            "encryption.previous_keys) before re-encrypting"
        )
    async with open_reader(settings) as reader:
        rotator = Rotator(reader.index, reader.store, keyring, settings.storage, settings.spool_dir)
        tally = await rotator.run(dry_run=args.dry_run, progress=_progress)
    for uid, problem in tally.failures:
        print(f"FAIL {uid}: {problem}")
    print(json.dumps({**tally.summary(), "to": target, "dry_run": args.dry_run}))
    return 1 if tally.counts["failed"] else 0


def _progress(tally: Tally, done: int, total: int) -> None:
    c = tally.counts
    print(
        f"rekey {done}/{total}: re-encrypted {c['rekeyed']}, already done {c['already']}, "
        f"would re-encrypt {c['would-rekey']}, failed {c['failed']}",
        file=sys.stderr,
        flush=True,
    )
