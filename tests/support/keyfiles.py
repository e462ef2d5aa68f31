"""Key files written by tests as an operator must write them: owner-only (0600).

dicomflow refuses a master key, signing key, NKey seed or TLS key that other users may
read (``dicomflow.shared.crypto.keyfiles``); a file written with the default umask is 0644.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path``, readable and writable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(data.encode() if isinstance(data, str) else data)
    return path


def owner_only(*paths: Path) -> None:
    """chmod 600 files written by a library that uses the umask (trustme, ...)."""
    for path in paths:
        path.chmod(0o600)
