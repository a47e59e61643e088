"""Signalling a verified process, and starting one detached from our terminal.

``signal_verified`` closes the gap between "this pid is the recorded process" and the
signal: on Linux a pidfd pins the process, so a pid reused in between is never hit
(the failure of every pid-file ``kill``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def signal_verified(pid: int, is_expected: Callable[[], bool], signum: int) -> bool:
    """Send ``signum`` to ``pid`` only if ``is_expected()`` holds for it; True if sent.

    ``is_expected`` is checked after the process is pinned (pidfd on Linux), so the
    signal reaches the very process it approved. Elsewhere the check runs right before
    the signal. Raises nothing for a process that is gone (returns False).
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    send = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is not None and send is not None:
        try:
            fd = pidfd_open(pid)
        except OSError:
            return False  # gone (or not ours to see)
        try:
            if not is_expected():
                return False
            try:
                send(fd, signum)
            except ProcessLookupError:
                return False
            return True
        finally:
            os.close(fd)
    if not is_expected():
        return False
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def detached_options() -> dict[str, Any]:
    """``subprocess.Popen`` options that start a child outside our session / console, so
    closing our terminal (SIGHUP) or a Ctrl-C there does not reach it."""
    if sys.platform == "win32":
        flags = 0
        for name in ("DETACHED_PROCESS", "CREATE_NEW_PROCESS_GROUP"):
            flags |= getattr(subprocess, name, 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def server_stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that ask a server to stop: SIGINT and SIGTERM, plus SIGBREAK
    (Ctrl-Break) on Windows."""
    if sys.platform == "win32":
        return (signal.SIGINT, signal.SIGTERM, signal.SIGBREAK)
    return (signal.SIGINT, signal.SIGTERM)
