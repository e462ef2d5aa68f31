"""`dicomflow keys new` creates a master key file, `keys new-signing` a signing key pair;
`keys status` (in ``rotation``) counts the objects each key protects."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomflow.cli import rotation
from dicomflow.shared.crypto.keyring import generate_master_key_file
from dicomflow.shared.crypto.sealsign import generate_signing_key_pair
from dicomflow.shared.errors import ConfigError


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
    signing = keys_sub.add_parser(
        "new-signing",
        help="create an Ed25519 key pair signing sealed messages",
        description=(
            "Write a new Ed25519 key pair to DIR: signing.pem (private, PKCS#8 PEM, mode "
            "0600) and signing.pub.pem (public). The encryptor signs every sealed message "
            "with the private key (encryption.signing_key); store-writers store only "
            "messages signed by a key in encryption.trusted_signing_keys. To rotate, add "
            "the new public key to every store-writer first, then switch the encryptor. "
            "Refuses to overwrite."
        ),
    )
    signing.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder")
    signing.set_defaults(func=_new_signing)
    rotation.register_status(keys_sub)


def _new(args: argparse.Namespace) -> int:
    generate_master_key_file(args.path)
    print(f"wrote a new master key to {args.path} (mode 0600); keep it secret", file=sys.stderr)
    return 0


def _new_signing(args: argparse.Namespace) -> int:
    if not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is not an existing folder")
    private, public = generate_signing_key_pair(args.out)
    print(
        f"wrote {private} (mode 0600; the encryptor's encryption.signing_key, keep it secret) "
        f"and {public} (for the store-writers' encryption.trusted_signing_keys)",
        file=sys.stderr,
    )
    return 0
