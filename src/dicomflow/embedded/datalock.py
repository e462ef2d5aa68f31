"""One `dicomflow up` per data folder: an exclusive ``flock`` held for its lifetime.

The lock file (``DIR/up.lock``) holds the owner's PID, so a second `up` names it. The
kernel releases the lock when its holder dies, however it dies, so a file left behind by
a killed `up` never blocks the next one. The file is not removed on release: removing it
would let two processes lock two different files of the same name.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from dicomflow.shared.errors import ConfigError, DicomflowError

PID_WAIT = 1.0  # seconds to let a just-started owner write its PID


class DataDirInUse(DicomflowError):
    """Another `dicomflow up` holds the data folder."""


class DataDirLock:
    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self._folder = folder
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise DataDirInUse(
                f"data folder {self._folder} is in use by dicomflow up (PID {owner}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no PID of a process that is gone
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _owner(fd: int) -> str:
    """The PID the holder wrote (it may be a moment away from writing it)."""
    deadline = time.monotonic() + PID_WAIT
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit() or time.monotonic() > deadline:
            return text if text.isdigit() else "unknown"
        time.sleep(0.05)
