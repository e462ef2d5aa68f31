"""Reading and creating key files: master keys and signing keys share these rules.

Errors name the file and what is wrong with it, never its content. A new key file is
created with O_EXCL, owner-only when it is secret, and synced before it counts as
written: overwriting a key file can make every object sealed under it unreadable, so
not even a race may do it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dicomflow.shared.errors import ConfigError, KeyFileError


def read_key_file(path: Path, what: str, make_one: str) -> bytes:
    """The bytes of ``path``; ``what`` names it in errors ("master key file", ...)."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{what} {path} does not exist; {make_one}") from exc
    except IsADirectoryError as exc:
        raise KeyFileError(f"{what} {path} is a directory; point to the key file itself") from exc
    except OSError as exc:
        raise KeyFileError(
            f"{what} {path} cannot be read: {exc.strerror or exc}; check that it exists and "
            "that this user may read it"
        ) from exc


def write_new_key_file(path: Path, data: bytes, mode: int, what: str, why: str = "") -> None:
    """Create ``path`` holding ``data`` with ``mode``; refuse if anything is there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise ConfigError(f"refusing to overwrite existing file {path}{why}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask can only narrow the mode; be explicit
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
