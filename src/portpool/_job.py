"""Job control for ``run`` started in the background of a terminal (``run ... &``).

Part of the supervisor layer. There the command runs in a process group of its own
(the terminal's Ctrl-C must not reach it twice), so the shell's job is ``run``'s group
alone. ``JobWatch`` keeps the two one job, as ``sudo`` does for its command:

- the command stopped by job control (a read of the terminal from the background:
  SIGTTIN; Ctrl-Z: SIGTSTP) stops ``run`` by the same signal, so the shell says
  "Stopped" and takes the terminal back (the job ran on: ``fg`` then hung);
- ``run``'s group made the terminal's foreground (``fg``) hands the terminal on to
  the command's group and continues it; continued in the background (``bg``), the
  command is continued too;
- when the command exits, the terminal goes back to ``run``'s group if the command's
  group still has it, for the shell to take back when ``run`` exits.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING

from portpool._platform import move_terminal_foreground, process_group, signal_group, stopped_by

if TYPE_CHECKING:
    import subprocess

__all__ = ["JOB_POLL_S", "JobWatch"]

# How soon a stop or an `fg` is noticed: a person's keystroke, not a busy loop.
JOB_POLL_S = 0.1
_SIGCONT: int | None = getattr(signal, "SIGCONT", None)  # none on Windows


class JobWatch:
    """Watch the command ``proc`` (our child, the leader of its own process group) on
    a thread, from ``start()`` until ``close()``. Does nothing where the OS has no job
    control (Windows)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="portpool-job", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing.wait(JOB_POLL_S):
            self.step()

    def step(self) -> None:
        """Follow one change of the command's or of our job's state, if any."""
        ours = process_group(os.getpid())
        if ours is None:
            return  # no process groups (Windows)
        stop = stopped_by(self.pid)
        if move_terminal_foreground(ours, self.pid):
            # `fg` of our job, the command's group in the background (and maybe stopped
            # by a read of the terminal meanwhile): the terminal is for it.
            self._resume()
        elif stop is not None and not self._closing.is_set():
            move_terminal_foreground(self.pid, ours)
            # Stopped as the command was: the shell sees its job stop, and continues us
            # (fg, bg, kill -CONT) as it would have continued the command.
            os.kill(os.getpid(), stop)
            move_terminal_foreground(ours, self.pid)  # fg: hand it on; bg: not ours
            self._resume()

    def _resume(self) -> None:
        # Not reaped: the group id is still the command's.
        if _SIGCONT is not None and self.proc.poll() is None:
            signal_group(self.pid, _SIGCONT)

    def close(self) -> None:
        """Stop watching; give the terminal back to our group if the command's has it.
        Call once the command has exited or is being stopped."""
        self._closing.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        ours = process_group(os.getpid())
        if ours is not None:
            move_terminal_foreground(self.pid, ours)
