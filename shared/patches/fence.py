"""A version gate around one patch of a dependency's internals.

A ``Fence`` names the patch, the library it reaches into and the versions it was
verified on. ``install(apply)`` runs ``apply`` only when the installed version is one of
those; on any other it leaves the library as shipped and logs one WARNING naming the
version and what is lost. Either way the answer is recorded for the process, and every
service's metrics report it (``dicomflow_fastpath_active{patch}``, 1 or 0: see
``states``). Code that uses a patch per association or per request asks ``active``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PYNETDICOM = "pynetdicom"
NATS_PY = "nats-py"
CPYTHON = "CPython"


def _pynetdicom() -> str:
    import pynetdicom

    return str(pynetdicom.__version__)


def _nats_py() -> str:
    from nats.aio import client

    return str(client.__version__)


def _cpython() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"  # the minor version


VERSIONS: dict[str, Callable[[], str]] = {
    PYNETDICOM: _pynetdicom,
    NATS_PY: _nats_py,
    CPYTHON: _cpython,
}

_lock = threading.Lock()
_decided: dict[str, tuple[str, bool]] = {}  # patch -> (version seen, active)


class Fence:
    def __init__(self, patch: str, library: str, verified: tuple[str, ...], off: str) -> None:
        if library not in VERSIONS:
            raise ValueError(f"no version reader for {library}")
        self.patch = patch
        self.library = library
        self.verified = verified
        self.off = off  # what dicomflow does without the patch

    def version(self) -> str:
        return VERSIONS[self.library]()

    def admit(self) -> bool:
        """Whether the installed library is a verified version; recorded for the
        process, and a WARNING the first time a version is refused."""
        version = self.version()
        ok = version in self.verified
        with _lock:
            changed = _decided.get(self.patch) != (version, ok)
            _decided[self.patch] = (version, ok)
        if changed and not ok:
            log.warning(
                "%s %s is not %s, the version%s the %s patch was verified on: it stays off, so %s",
                self.library,
                version,
                " or ".join(self.verified),
                "s" if len(self.verified) > 1 else "",
                self.patch,
                self.off,
            )
        return ok

    def install(self, apply: Callable[[], object] | None = None) -> bool:
        """``apply()`` the patch if ``admit`` lets it; True when it is on. Without
        ``apply`` (a patch made per association or request, by code that asks
        ``active``), only the decision, made at start."""
        if not self.admit():
            return False
        if apply is not None:
            apply()
        return True

    @property
    def active(self) -> bool:
        """The recorded answer (decided now if there is none yet)."""
        decided = _decided.get(self.patch)
        return self.admit() if decided is None else decided[1]


def states() -> dict[str, bool]:
    """Every patch this process has decided on, and whether it is active."""
    with _lock:
        return {patch: active for patch, (_, active) in _decided.items()}
