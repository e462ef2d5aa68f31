"""The scp-gateway's spool: where received datasets are written as their PDUs arrive.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes each C-STORE dataset to a file it
creates with ``NamedTemporaryFile(delete=False)`` and removes only after the C-STORE
handler ran: a transfer aborted half-way, or a request whose association ended before
it was served, left its plaintext on disk, and a dataset was only measured once it was
all there. Here:

- the files live in a private folder (0700, files 0600) that the gateway claims for its
  life (``SpoolFolder``: a lock held by the process; a gateway that starts removes the
  folders of processes that died, and what they held), under ``scp.spool_dir`` (which
  must be private to the gateway's user), else ``spool_dir``, else the system temp folder;
- every file is counted as it is written: once a dataset passes ``scp.max_dataset_bytes``
  its file is removed and the rest of the dataset is read and discarded, so the spool
  never holds more than the limit per dataset; the request is then answered 0xC211, the
  status of the check the receiver makes on a complete file;
- the files of an association are removed when it ends (released, aborted, or its
  connection closed), whatever state they are in;
- a dataset that travels inline (at most ``keep_in_memory``'s limit, the transport's
  ``inline_limit``) is kept in memory and never written to disk: it is published from
  memory anyway, so writing and reading it back bought nothing. A dataset passing that
  limit goes to its file from then on, with what came before;
- every dataset is hashed (SHA-256) as it arrives, so the receiver need not read it
  again to digest it (``Received``).

The counting and the per-association clean-up replace pynetdicom's file factory, an
internal of the version it was checked against (``FENCE``, ``VERIFIED_PYNETDICOM``); on
any other version they stay off, with a warning at start: sizes are then checked once a
dataset is complete, and leftovers are removed with the folder when the gateway stops
(after a crash: when the next one starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import stat
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dicomflow.shared import patches
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.spoolfolder import SpoolFolder
from pynetdicom import dimse_messages

log = logging.getLogger(__name__)

FENCE = patches.SCP_SPOOL  # the version gate of the factory replacement

VERIFIED_PYNETDICOM = FENCE.verified[0]
FOLDER_PREFIX = "dicomflow-scp-"
LEGACY_LEFTOVERS = "tmp*.dcm"  # what pynetdicom left directly in spool_dir before


def private_folder(path: Path) -> Path:
    """``path`` as a folder only this process's user can enter: created 0700 if missing;
    an existing one must be owned by that user and closed to group and others."""
    try:
        if not path.exists():
            path.mkdir(mode=0o700, parents=True)
            path.chmod(0o700)  # the umask can only narrow the mode; be explicit
        info = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"scp.spool_dir {path} cannot be created or read: {exc.strerror or exc}"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"scp.spool_dir {path} is not a folder")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"scp.spool_dir {path} is owned by uid {info.st_uid}, not by the gateway's user "
            f"(uid {os.geteuid()}): received datasets are plaintext; give the gateway a "
            "folder of its own"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"scp.spool_dir {path} is open to group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}): received datasets are plaintext; "
            f"chmod 700 {path}, or point scp.spool_dir at a new folder (created 0700)"
        )
    return path


@dataclass(frozen=True, slots=True)
class Received:
    """What arrived for one dataset: ``size`` bytes (those discarded past the limit
    included); ``sha256`` of them when the spool hashed them as they came (None: read
    the file to digest it); ``data`` when it was kept in memory (None: read the file)."""

    size: int
    sha256: str | None = None
    data: bytes | None = None


class SpoolFile:
    """One dataset's file, as pynetdicom's ``NamedTemporaryFile`` is used: ``write``,
    ``file.flush``, ``close`` and ``name``. Up to ``memory_limit`` bytes it is kept in
    memory and its file is not made; past it the file is written (0600). Past ``limit``
    bytes the file is removed and what follows is only counted (``received``)."""

    def __init__(
        self, folder: Path, limit: int, on_close: Any, memory_limit: int = 0, name: str = ""
    ) -> None:
        self.received = 0
        self.limit = limit
        self.calling_ae = "?"
        self._memory_limit = min(memory_limit, limit)
        self._file: IO[bytes] | None = None
        self._chunks: list[bytes] | None = None
        self._sha = hashlib.sha256()
        self._discarding = False
        if self._memory_limit > 0 and name:
            self.name = name  # its file, if it ever needs one
            self._chunks = []
        else:
            fd, self.name = tempfile.mkstemp(dir=folder, prefix="tmp", suffix=".dcm")  # 0600
            self._file = os.fdopen(fd, "wb")
        self._lock = threading.Lock()
        self._on_close = on_close

    @property
    def file(self) -> SpoolFile:
        return self

    @property
    def over_limit(self) -> bool:
        return self.received > self.limit

    def write(self, data: bytes) -> int:
        with self._lock:
            self.received += len(data)
            if self._discarding:  # over the limit, or the association ended
                return len(data)
            if self.over_limit:
                self._remove()
                log.warning(
                    "C-STORE from %s passed scp.max_dataset_bytes (%d bytes) while being "
                    "received: its spool file is removed and the rest is discarded; it "
                    "will be answered 0xC211",
                    self.calling_ae,
                    self.limit,
                )
                return len(data)
            self._sha.update(data)
            if self._chunks is not None:
                if self.received <= self._memory_limit:
                    self._chunks.append(data)
                    return len(data)
                self._file = self._spill(self._chunks)
                self._chunks = None
            return self._file.write(data) if self._file is not None else len(data)

    def _spill(self, chunks: list[bytes]) -> IO[bytes]:
        """The file, made with what came before: the dataset passed the memory limit."""
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        file = os.fdopen(fd, "wb")
        for chunk in chunks:
            file.write(chunk)
        return file

    def body(self) -> Received:
        """What arrived so far (all of it, once pynetdicom hands the request over)."""
        with self._lock:
            if self._discarding:
                return Received(self.received)
            data = None
            if self._chunks is not None:
                data = b"".join(self._chunks)
                self._chunks = [data]
            return Received(self.received, self._sha.hexdigest(), data)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Close and remove the file (pynetdicom's own ``os.unlink`` after it then fails
        quietly); the receiver has opened it already, if it reads it at all."""
        with self._lock:
            self._remove()
        self._on_close(self)

    def _remove(self) -> None:
        self._discarding = True
        self._chunks = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            Path(self.name).unlink()


class Spool:
    """The gateway's spool folder, and (once ``install``ed) pynetdicom's files in it."""

    def __init__(self, folder: SpoolFolder, max_dataset_bytes: int) -> None:
        self._folder = folder
        self.path = folder.path
        self._limit = max_dataset_bytes
        self._lock = threading.Lock()
        self._by_name: dict[str, SpoolFile] = {}
        self._by_assoc: weakref.WeakKeyDictionary[Any, set[SpoolFile]] = weakref.WeakKeyDictionary()
        self._installed = False
        self._memory_limit = 0
        self._names = itertools.count()

    @classmethod
    def open(cls, scp_spool_dir: Path | None, spool_dir: Path | None, limit: int) -> Spool:
        """Claim a private folder under ``scp_spool_dir`` (checked private) or ``spool_dir``
        (or the system temp folder), removing what dead gateways left there."""
        parent = private_folder(scp_spool_dir) if scp_spool_dir is not None else spool_dir
        if parent is not None and parent.is_dir():
            # Files an older gateway let pynetdicom write straight into this folder.
            for leftover in parent.glob(LEGACY_LEFTOVERS):
                leftover.unlink(missing_ok=True)
        folder = SpoolFolder(parent, "gateway", prefix=FOLDER_PREFIX, owner="scp-gateway")
        return cls(folder, limit)

    def install(self) -> bool:
        """Route pynetdicom's dataset files here: into this folder (always), counted and
        tracked per association (on the verified pynetdicom only). True when tracked."""
        tempfile.tempdir = str(self.path)  # where pynetdicom's own factory writes too
        if not FENCE.install():
            return False
        factory = getattr(dimse_messages, "NamedTemporaryFile", None)
        if factory is not tempfile.NamedTemporaryFile:
            log.warning(
                "pynetdicom's dataset file factory is not tempfile.NamedTemporaryFile: the "
                "spool leaves it alone, so %s",
                FENCE.off,
            )
            return False
        setattr(dimse_messages, "NamedTemporaryFile", self._create)  # noqa: B010
        self._installed = True
        return True

    def close(self) -> None:
        """Put pynetdicom's factory back and remove the folder with what it holds."""
        if self._installed:
            setattr(dimse_messages, "NamedTemporaryFile", tempfile.NamedTemporaryFile)  # noqa: B010
            self._installed = False
        self._folder.close()

    def keep_in_memory(self, limit: int) -> None:
        """Keep datasets of at most ``limit`` bytes in memory, not in files (the
        transport's ``inline_limit``: they are published from memory). 0: files only."""
        self._memory_limit = limit

    def size_of(self, path: Path) -> int:
        """Bytes received for the dataset of ``path`` (those discarded included)."""
        return self.received(path).size

    def received(self, path: Path) -> Received:
        """What arrived for the dataset of ``path``; raises FileNotFoundError when
        neither the spool nor the folder holds it (its association ended)."""
        with self._lock:
            tracked = self._by_name.get(str(path))
        if tracked is not None:
            return tracked.body()
        return Received(path.stat().st_size)

    def on_association_end(self, event: Any) -> None:
        """EVT_RELEASED, EVT_ABORTED, EVT_CONN_CLOSE: remove the association's files."""
        with self._lock:
            files = self._by_assoc.pop(event.assoc, set())
        for spool_file in files:
            spool_file.close()
        if files:
            log.info("removed %d spool file(s) of an association that ended", len(files))

    def _create(self, *args: Any, **kwargs: Any) -> SpoolFile:
        """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``,
        called from the DUL thread of the association receiving the dataset."""
        # Named, not yet made: the folder is this process's own, so a counter is unique.
        name = str(self.path / f"mem{next(self._names)}.dcm")
        spool_file = SpoolFile(self.path, self._limit, self._forget, self._memory_limit, name)
        assoc = getattr(threading.current_thread(), "assoc", None)
        with self._lock:
            self._by_name[spool_file.name] = spool_file
            if assoc is not None:
                self._by_assoc.setdefault(assoc, set()).add(spool_file)
        if assoc is not None:
            with contextlib.suppress(AttributeError):
                spool_file.calling_ae = str(assoc.requestor.ae_title).strip()
        return spool_file

    def _forget(self, spool_file: SpoolFile) -> None:
        with self._lock:
            self._by_name.pop(spool_file.name, None)
            for files in self._by_assoc.values():
                files.discard(spool_file)
