"""Reading and creating key files: master keys, signing keys, NKey seeds and TLS keys
share these rules.

Errors name the file and what is wrong with it, never its content. A secret file is
refused when users other than its owner may open it: its mode is read with ``fstat`` on
the descriptor the key is then read from (no window between check and read; symlinks,
as in Kubernetes Secret volumes, are followed to the file itself). The one exception,
PostgreSQL's rule for its TLS key: a file owned by root may be readable by its group
(0440, 0640), which is how Kubernetes mounts a Secret volume for a pod with an
``fsGroup`` (the pod's own group) and how an administrator shares a root-owned key with
a service's group.

A new key file is created with O_EXCL, owner-only when it is secret, and synced before
it counts as written: overwriting a key file can make every object sealed under it
unreadable, so not even a race may do it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from dicomflow.shared.errors import ConfigError, KeyFileError

OWNER_ONLY = 0o600  # the mode the refusal asks for; 0400 is as good


def read_key_file(path: Path, what: str, make_one: str, *, secret: bool = True) -> bytes:
    """The bytes of ``path``; ``what`` names it in errors ("master key file", ...).

    A ``secret`` file (all but public keys) open to other users is refused
    (``refuse_shared``).
    """
    try:
        with path.open("rb") as f:
            if secret:
                refuse_shared(os.fstat(f.fileno()), path, what)
            return f.read()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{what} {path} does not exist; {make_one}") from exc
    except IsADirectoryError as exc:
        raise KeyFileError(f"{what} {path} is a directory; point to the key file itself") from exc
    except OSError as exc:
        raise KeyFileError(
            f"{what} {path} cannot be read: {exc.strerror or exc}; check that it exists and "
            "that this user may read it"
        ) from exc


def check_secret_file(path: Path, what: str) -> None:
    """Refuse a secret that another library opens by its path (a TLS key: OpenSSL) when it
    cannot be opened or is open to other users."""
    try:
        with path.open("rb") as f:
            refuse_shared(os.fstat(f.fileno()), path, what)
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc


def refuse_shared(st: os.stat_result, path: Path, what: str) -> None:
    """Raise KeyFileError unless only the file's owner may open it (mode 0600 or 0400),
    or it is owned by root and only readable by its group besides (0440, 0640)."""
    mode = stat.S_IMODE(st.st_mode)
    shared = mode & 0o077
    if not shared or (st.st_uid == 0 and shared == stat.S_IRGRP):
        return
    whom = " and ".join(
        name for bits, name in ((0o070, "its group"), (0o007, "other users")) if shared & bits
    )
    raise KeyFileError(
        f"{what} {path} is open to {whom} (mode {mode:04o}); a secret must be readable by "
        f"its owner only: run `chmod {OWNER_ONLY:o} {path}` (in Kubernetes: defaultMode: "
        "0400 on the Secret volume)"
    )


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
