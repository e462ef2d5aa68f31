"""`dicomflow encrypt` and `dicomflow decrypt`: one A1 object to or from a local file.

Both write through a temporary file in the output's directory and rename it into place
only on success, so a failed run never leaves a partial or unverified OUTPUT behind.
Errors propagate as dicomflow's typed errors; ``main`` turns them into one line on
stderr and the exit code.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from dicomflow.shared.crypto import envelope
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey, load_master_key, parse_key_spec
from dicomflow.shared.errors import ConfigError, DicomflowError

_KEY_HELP_TAIL = (
    "ID is the numeric master-key id (uint32) written into each object; PATH is a file "
    "holding the 32-byte key as one line of base64 (`openssl rand -base64 32`)."
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enc = subparsers.add_parser(
        "encrypt",
        help="encrypt a file into an A1 object",
        description=(
            "Encrypt INPUT into OUTPUT in the A1 format of the Orthanc object-storage "
            "plugins (AES-256-GCM under a fresh data key, wrapped with the master key). "
            "OUTPUT appears only when encryption completed; it is created with mode 0600."
        ),
    )
    enc.add_argument(
        "--master-key",
        required=True,
        metavar="ID=PATH",
        help=f"the master key to encrypt with. {_KEY_HELP_TAIL}",
    )
    enc.add_argument("input", metavar="INPUT", type=Path, help="the file to encrypt")
    enc.add_argument("output", metavar="OUTPUT", type=Path, help="where to write the A1 object")
    enc.set_defaults(func=_encrypt)

    dec = subparsers.add_parser(
        "decrypt",
        help="decrypt an A1 object into a file",
        description=(
            "Decrypt the A1 object INPUT into OUTPUT. The object's key id picks the "
            "master key among --master-key and --previous-key. OUTPUT appears only after "
            "the whole object has passed its integrity check; it is created with mode "
            "0600. Fails if the object is truncated, has an unsupported version, names "
            "an unknown master key id, or fails the integrity check."
        ),
    )
    dec.add_argument(
        "--master-key",
        required=True,
        metavar="ID=PATH",
        help=f"the current master key. {_KEY_HELP_TAIL}",
    )
    dec.add_argument(
        "--previous-key",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="an older master key still accepted for reading (after a key rotation); "
        "repeat for several",
    )
    dec.add_argument("input", metavar="INPUT", type=Path, help="the A1 object to decrypt")
    dec.add_argument(
        "output", metavar="OUTPUT", type=Path, help="where to write the decrypted file"
    )
    dec.set_defaults(func=_decrypt)


def _encrypt(args: argparse.Namespace) -> int:
    key = _load_key(args.master_key)
    output = _check_output(args.output)
    with _open_input(args.input) as src:
        fd, tmp_name = _make_temp(output)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dst:
                envelope.seal_stream(key, src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            tmp.replace(output)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DicomflowError(
                f"cannot encrypt {args.input} to {output}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    ring = KeyRing(_load_key(args.master_key), [_load_key(spec) for spec in args.previous_key])
    output = _check_output(args.output)
    with _open_input(args.input) as src:
        size = os.fstat(src.fileno()).st_size
        try:
            envelope.open_to_path(ring, src, size, output)
        except OSError as exc:
            raise DicomflowError(
                f"cannot decrypt {args.input} to {output}: {exc.strerror or exc}"
            ) from exc
    return 0


def _load_key(spec: str) -> MasterKey:
    key_id, path = parse_key_spec(spec)
    return load_master_key(key_id, path)


def _open_input(path: Path) -> BinaryIO:
    if not path.exists():
        raise ConfigError(f"input file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"input {path} is not a regular file")
    try:
        return path.open("rb")
    except OSError as exc:
        raise ConfigError(f"cannot read input file {path}: {exc.strerror or exc}") from exc


def _check_output(path: Path) -> Path:
    if path.is_dir():
        raise ConfigError(f"output {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"the directory of output {path} does not exist")
    return path


def _make_temp(output: Path) -> tuple[int, str]:
    """A 0o600 temp file beside OUTPUT, so the final rename is atomic."""
    try:
        return tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    except OSError as exc:
        raise ConfigError(
            f"cannot create a file in {output.parent}: {exc.strerror or exc}"
        ) from exc
