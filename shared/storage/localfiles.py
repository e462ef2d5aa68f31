"""The local backend's files: making an object durable, and linking a spool file into
place as an object.

obstore's ``LocalStore`` writes an object to a staging file and links it into place
without fsync; a power cut after that can lose the file although JetStream, which
fsyncs, has recorded it as stored. ``fsync_path`` syncs the file and the folders whose
entries lead to it. ``link_file`` turns the store writer's spool file of a large body
(a file in ``spool_dir``, on the same file system) into the object without copying its
bytes again: the file is fsynced and linked at the object's path, create-only or
replacing what is there.
"""

from __future__ import annotations

import enum
import errno
import os
import uuid
from pathlib import Path
from typing import IO

# Errors that mean "this file cannot be linked there" (another file system, a file with
# no inode to link, a file system without hard links), not that the disk failed.
_NOT_LINKABLE = {errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK}


class Linked(enum.Enum):
    LINKED = "linked"
    EXISTS = "exists"  # create-only, and an object is at the path already
    NOT_LINKABLE = "not-linkable"  # write it the ordinary way


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


OBJECT_MODE = 0o666 & ~_umask()  # what obstore's own files get


def link_file(body: IO[bytes], root: Path, key: str, size: int, *, create: bool) -> Linked:
    """Make the open file ``body`` (``size`` bytes) the object ``root/key``. Raises OSError
    when the disk fails; the caller makes the object's folders durable after."""
    try:
        fd = body.fileno()
    except (AttributeError, OSError):  # in memory (io.UnsupportedOperation is an OSError)
        return Linked.NOT_LINKABLE
    source = _source(body, fd)
    if source is None or os.fstat(fd).st_size != size:
        return Linked.NOT_LINKABLE
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    os.fsync(fd)
    target = path if create else path.with_name(f"{path.name}#{uuid.uuid4().hex}")
    try:
        os.link(source, target, follow_symlinks=True)
    except FileExistsError:
        if create:
            return Linked.EXISTS
        raise
    except OSError as exc:
        if exc.errno in _NOT_LINKABLE:
            return Linked.NOT_LINKABLE
        raise
    target.chmod(OBJECT_MODE)
    if not create:
        target.replace(path)
    return Linked.LINKED


def _source(body: IO[bytes], fd: int) -> str | None:
    """The path to link from: the file's own name while it still names this file (a
    named spool file), else its /proc link (an ``O_TMPFILE``, where the kernel allows)."""
    name = getattr(body, "name", None)
    if isinstance(name, str) and Path(name).is_absolute():
        try:
            if Path(name).stat().st_ino == os.fstat(fd).st_ino:
                return name
        except OSError:
            return None
        return None
    return f"/proc/self/fd/{fd}"


_DURABLE_FOLDERS: dict[Path, int] = {}  # folder -> inode, known synced into its parent
_DURABLE_FOLDERS_MAX = 65536


def fsync_path(root: Path, key: str) -> None:
    """fsync ``root/key`` and its folder, then each folder's parent up to ``root`` until
    a folder this process has synced into its parent before (same path, same inode)."""
    path = root / key
    _fsync(path, os.O_RDONLY)
    folder = path.parent
    _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)
    while folder != root and root in folder.parents:
        inode = folder.stat().st_ino
        if _DURABLE_FOLDERS.get(folder) == inode:
            return  # its entry in its parent is on disk already
        _fsync(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
        if len(_DURABLE_FOLDERS) >= _DURABLE_FOLDERS_MAX:
            _DURABLE_FOLDERS.clear()
        _DURABLE_FOLDERS[folder] = inode
        folder = folder.parent


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
