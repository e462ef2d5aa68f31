"""Child processes of `up`: they end with it, and stop with SIGTERM, a grace, then SIGKILL.

A child runs in a session of its own (a Ctrl-C in the terminal reaches `up` only, which
stops the stages in order), so nothing ends it when `up` is killed outright (SIGKILL, the
OOM killer): it would keep the data folder and its ports, and the next `up` would
crash-loop. On Linux ``die_with_parent`` asks the kernel to SIGKILL the child when the
thread that forked it ends (``PR_SET_PDEATHSIG``): start children from the main thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    # Loaded once, before any fork: the child only calls it.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


_PRCTL = _load_prctl()
_warned = False


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die (SIGKILL) when this process ends.

    None where the kernel has no such request (not Linux): a warning is logged once and
    children may then outlive a killed `up`.
    """
    global _warned
    if _PRCTL is None:
        if not _warned:
            _warned = True
            log.warning(
                "children cannot be tied to this process on %s: if it is killed, stop its "
                "nats-server and stages by hand",
                sys.platform,
            )
        return None
    prctl = _PRCTL
    parent = os.getpid()

    def preexec() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was in place
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def terminate(proc: subprocess.Popen[Any] | None, timeout: float) -> bool:
    """Stop ``proc`` if it still runs; True if it had to be killed."""
    return terminate_all([proc], timeout)[0]


def terminate_all(procs: Sequence[subprocess.Popen[Any] | None], timeout: float) -> list[bool]:
    """SIGTERM to each of ``procs`` still running, then up to ``timeout`` seconds for all
    of them; SIGKILL whoever is left. For each: whether it had to be killed."""
    running = [proc is not None and proc.poll() is None for proc in procs]
    for proc, runs in zip(procs, running, strict=True):
        if proc is not None and runs:
            proc.terminate()
    deadline = time.monotonic() + timeout
    killed: list[bool] = []
    for proc, runs in zip(procs, running, strict=True):
        if proc is None or not runs:
            killed.append(False)
            continue
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed.append(True)
        else:
            killed.append(False)
    return killed
