"""Private spool folders, and the sweep of those a dead process left.

Both gateways keep plaintext on disk for a moment: the scp-gateway the datasets it is
receiving, the scu-gateway the verified instances it is sending. Each keeps them in a
folder of its own (mode 0700, files 0600) and removes it when it stops. A process killed with
``kill -9`` (or by the OOM killer) cannot, and its folder would keep patient data on
disk. So every folder is claimed by an exclusive ``flock`` on a lock file inside it,
held for the process's life: the kernel releases it when the process dies, however it
dies. At start-up a process removes every folder of its kind (same prefix) in the same
parent whose lock it can take; folders of live processes (other replicas sharing the parent) stay.
A folder with no lock file yet is left alone for ``UNCLAIMED_GRACE`` seconds, the
moment between its creation and its claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from dicomflow.shared.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".owner.lock"
UNCLAIMED_GRACE = 60.0  # seconds


class SpoolFolder:
    """A private folder claimed for this process's life; ``close`` removes it."""

    def __init__(self, parent: Path | None, name: str, prefix: str, owner: str) -> None:
        """``prefix`` names the folders of one process kind, ``owner`` that kind in errors."""
        where = parent or Path(tempfile.gettempdir())
        try:
            where.mkdir(parents=True, exist_ok=True)
            removed = remove_orphans(where, prefix)
            self.path = Path(tempfile.mkdtemp(dir=where, prefix=f"{prefix}{name}-"))
            self._lock = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise ConfigError(
                f"spool_dir {where} cannot hold the {owner}'s private files: "
                f"{exc.strerror or exc}; point spool_dir at a writable folder"
            ) from exc
        if removed:
            log.warning(
                "removed %d spool folder(s) in %s left by a stopped %s process "
                "(instances it was handling when it died)",
                removed,
                where,
                owner,
            )

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)


def remove_orphans(parent: Path, prefix: str) -> int:
    """Remove the folders named ``prefix*`` in ``parent`` no live process holds; how many."""
    removed = 0
    for folder in parent.glob(f"{prefix}*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - folder.stat().st_mtime > UNCLAIMED_GRACE:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            continue
        except OSError:
            continue  # not ours to judge (permissions): leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its process is alive
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed
