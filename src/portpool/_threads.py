"""Joining a thread whose ``start()`` may have been cut short.

Usable from every layer, like ``layout`` and ``errors``: it imports nothing of portpool.
A Ctrl-C while ``Thread.start()`` waits for the new thread raises KeyboardInterrupt
there, though the thread runs a moment later; ``join()`` then raised RuntimeError
("cannot join thread before it is started") inside ``release()``, which stopped it
before the slot was freed.
"""

from __future__ import annotations

import threading
import time

__all__ = ["join_thread"]

# How long a thread whose start() was interrupted gets to begin running.
_START_WAIT_S = 1.0


def join_thread(thread: threading.Thread | None, timeout: float | None = None) -> None:
    """Wait up to ``timeout`` seconds (None: for ever) for ``thread`` to end. Nothing for
    None, the calling thread itself, or a thread never started. Raises nothing."""
    if thread is None or thread is threading.current_thread():
        return
    deadline = time.monotonic() + _START_WAIT_S
    while True:
        try:
            thread.join(timeout)
            return
        except RuntimeError:  # not started yet: its start() may have been interrupted
            if time.monotonic() >= deadline:
                return  # never started: nothing to wait for
            time.sleep(0.01)
