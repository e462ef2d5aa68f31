"""`dicomflow keys new` creates a master key file; `keys status` (in ``rotation``) counts
the objects each key protects."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomflow.cli import rotation
from dicomflow.shared.keyring import generate_master_key_file


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys", help="manage master keys", description="Create and inspect master keys (KEKs)."
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    new = keys_sub.add_parser(
        "new",
        help="create a new random master key file",
        description=(
            "Write 32 random bytes, base64-encoded on one line, to PATH with mode 0600 "
            "(the same format as `openssl rand -base64 32`). Refuses to overwrite. "
            "Configure it as [encryption.master_key] with an id of your choice; keep the "
            "previous key as [[encryption.previous_keys]] so old objects stay readable."
        ),
    )
    new.add_argument("path", type=Path, metavar="PATH", help="file to create")
    new.set_defaults(func=_new)
    rotation.register_status(keys_sub)


def _new(args: argparse.Namespace) -> int:
    generate_master_key_file(args.path)
    print(f"wrote a new master key to {args.path} (mode 0600); keep it secret", file=sys.stderr)
    return 0
