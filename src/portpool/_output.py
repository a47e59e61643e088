"""Copying a service's output to ``up``'s console, line by line under its name, and
giving each line (and a line not ended yet) to its readiness probe.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import IO

__all__ = ["STOPPING_SAY_WAIT_S", "pump_lines", "write_line"]

_PARTIAL_MAX = 4096  # bytes of an unended line given to ``on_partial``
_PENDING_MAX = 1 << 20  # bytes kept of an unended line (see pump_lines)
# How long a line said while stopping waits for a console a reader blocks (a full pipe,
# Ctrl-S): the stop must go on, and the line is lost instead.
STOPPING_SAY_WAIT_S = 0.5


def pump_lines(
    name: str,
    width: int,
    stream: IO[bytes],
    out: IO[str],
    lock: threading.Lock,
    *,
    on_line: Callable[[str], None] | None = None,
    on_broken: Callable[[], None] | None = None,
    on_partial: Callable[[str], None] | None = None,
) -> None:
    """Copy ``stream`` to ``out`` line by line, each prefixed with ``name |``; each line
    is also given to ``on_line`` (a readiness probe waiting for a line, "log:").
    ``on_partial`` gets the start of a line the service wrote without ending it yet, each
    time more of it arrives (a prompt, a progress line: a terminal shows it at once;
    read by whole lines, a "log:" probe waited forever for its newline); it is printed
    once it ends, or at the end of the output. Of such a line past 1 MiB, what a
    terminal shows no more (its redraws before the last carriage return) is dropped,
    and a single part that long is printed in pieces. ``on_broken`` is called when ``out``'s
    reader went away (``up | head``); the stream is still drained, so the service never
    blocks on a full pipe."""
    prefix = f"{name:<{width}} | "

    def emit(raw: bytes) -> None:
        line = raw.decode(errors="replace")
        # Given to on_line under the output lock, right before it is written: a "log:"
        # readiness it gives is said ("ready on port") after the line, never before it
        # (a CI run); and without the lock once it is held by a blocked write (Ctrl-S).
        seen = None if on_line is None else functools.partial(on_line, line)
        write_line(out, lock, prefix + line, on_broken, before=seen)

    read = getattr(stream, "read1", stream.read)  # what is there now, not a full buffer
    pending = bytearray()  # the line not ended yet
    shown_from = 0  # where its part after the last carriage return begins
    while chunk := read(65536):
        begin = 0
        while (end := chunk.find(b"\n", begin)) >= 0:
            pending += chunk[begin:end]
            emit(bytes(pending))
            pending.clear()
            shown_from, begin = 0, end + 1
        rest = chunk[begin:]
        cr = rest.rfind(b"\r")
        if cr >= 0:
            shown_from = len(pending) + cr + 1
        pending += rest
        # What a terminal shows of it: the part after its last carriage return (a
        # progress bar redraws one line for minutes: all of it, matched again on every
        # piece, cost time quadratic in its length). A longer part waits for its end.
        shown = len(pending) - shown_from
        if on_partial is not None and 0 < shown <= _PARTIAL_MAX:
            on_partial(pending[shown_from:].decode(errors="replace"))
        if len(pending) > _PENDING_MAX:
            # Kept whole until its end, a progress line that never ends grew up's memory
            # without limit (1.7 GB for 300 MB of redraws). A terminal shows only its
            # part after the last carriage return: the rest goes; a part that is itself
            # that long is printed in pieces.
            del pending[:shown_from]
            shown_from = 0
            if len(pending) > _PENDING_MAX:
                emit(bytes(pending))
                pending.clear()
    if pending:
        emit(bytes(pending))
    stream.close()


BLOCKED_S = 0.05  # the output lock held longer: a write blocks (a full pipe, Ctrl-S)


def write_line(
    out: IO[str],
    lock: threading.Lock,
    line: str,
    on_broken: Callable[[], None] | None,
    wait_s: float | None = None,
    *,
    before: Callable[[], None] | None = None,
) -> None:
    """Write ``line`` and a newline to ``out`` under ``lock``, and flush. A reader that
    went away calls ``on_broken``; any other error loses the line (a full disk, a
    closed stream), never the caller. ``wait_s``: how long to wait for ``lock`` (None:
    as long as it takes); the line is lost when it is not had by then. ``before`` is
    called under the lock before the write, or without it when the lock is held longer
    than ``BLOCKED_S`` (what it raises, the caller gets). Raises nothing else."""
    locked = before is not None and lock.acquire(timeout=BLOCKED_S)
    if before is not None and not locked:
        before()  # a write blocks the console (Ctrl-S): what waits for the line must not
        before = None
    if not locked and not lock.acquire(timeout=-1 if wait_s is None else wait_s):
        return  # held by a write that blocks (a full pipe, a terminal stopped by Ctrl-S)
    broken = False
    try:
        if before is not None:
            before()
        try:
            out.write(line + "\n")
            out.flush()
        except BrokenPipeError:
            broken = True
        except (OSError, ValueError):
            pass
    finally:
        lock.release()  # before on_broken, which may say something too
    if broken and on_broken is not None:
        on_broken()
