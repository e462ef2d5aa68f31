"""How a ``dicomflow`` process starts (no core dumps) and ends (Python's own shutdown,
without finalizing).

A core dump of a dicomflow process would hold its master keys, the data keys of the
objects in flight and their plaintext. ``forbid_core_dumps`` sets the core file size
limit to 0, soft and hard (children inherit it; an unprivileged process cannot raise it
again), and on Linux also makes the process non-dumpable (``PR_SET_DUMPABLE`` 0): no
core even where the limit is ignored (a ``core_pattern`` pipe to a crash collector such
as systemd-coredump or apport), and no ``ptrace`` or ``/proc/<pid>/mem`` reading by
other processes of the same user. Its ``/proc/<pid>`` files then belong to root; the
world-readable ones (``stat``, ``status``, ``limits``) can still be read by anyone.

obstore runs its I/O on a tokio runtime whose worker threads outlive every request and
touch Python objects as their tasks wind down. Python 3.11 ends a thread that asks for
the GIL once finalization has begun with ``pthread_exit``, which a Rust thread cannot
unwind: the process aborts (SIGABRT, exit -6) after its work was done and its output
written. Measured on this machine: 10 of 200 runs of a script that reads 123 ranges
with ``obstore.get_range_async`` and returns.

``exit_process`` does everything Python's shutdown does that a program can observe
(wait for non-daemon threads, run ``atexit`` callbacks: logging, tracing exporters,
``weakref.finalize``; flush stdout and stderr) and then ends the process with
``os._exit``, so no finalization, and no abort, can follow. Those steps are CPython
internals (``threading._shutdown``, ``atexit._run_exitfuncs``): on a minor version they
were not verified on (``FENCE``) the process ends through Python's own shutdown instead,
with a warning.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import resource
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from dicomflow.shared import patches

FENCE = patches.PROCESS_EXIT  # the version gate of this module's patch
PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """No core file of this process (or its children), ever; Linux: not dumpable either."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(errno)}")


def install() -> bool:
    """Decide, at start, whether ``exit_process`` ends the process itself (True)."""
    return FENCE.install()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` once threads, ``atexit`` and the streams are done."""
    if not FENCE.active:
        sys.exit(code)  # Python's own shutdown, finalization included
    try:
        for step in (_private(threading, "_shutdown"), _private(atexit, "_run_exitfuncs")):
            if step is not None:
                step()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    finally:
        os._exit(code)


def _private(module: object, name: str) -> Callable[[], object] | None:
    # CPython's own shutdown steps (3.11 to 3.13), used on FENCE's minor versions only.
    step = getattr(module, name, None)
    return step if callable(step) else None
