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
from typing import TYPE_CHECKING

from portpool._platform import (
    move_terminal_foreground,
    process_group,
    signal_group,
    stopped_by,
)

if TYPE_CHECKING:
    import subprocess

__all__ = ["JOB_POLL_S", "JobWatch"]

# How soon a stop or an `fg` is noticed: a person's keystroke, not a busy loop.
JOB_POLL_S = 0.1
_SIGCONT: int | None = getattr(signal, "SIGCONT", None)  # none on Windows


class JobWatch:
    """Keep the command ``proc`` (our child, the leader of its own process group) and
    our job one: ``step()`` is called every ``JOB_POLL_S`` on the signal relay's thread
    while no signal comes (``SignalScope.relay``'s ``idle``), until ``close()``. Does
    nothing where the OS has no job control (Windows)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._closed = False
        self._continued = False  # we stopped as the command did, and were continued

    def step(self) -> None:
        """Follow one change of the command's or of our job's state, if any."""
        ours = process_group(os.getpid())
        if ours is None or self._closed:
            return  # no process groups (Windows), or the command is done
        if self._continued:
            # Only now, after the relay passed on what came with our SIGCONT (`kill %1`:
            # SIGTERM, then SIGCONT; a hangup): resumed first, the command read the
            # terminal and stopped again before it saw its signal.
            self._continued = False
            move_terminal_foreground(ours, self.pid)  # fg: hand it on; bg: not ours
            self._resume()
            return
        stop = stopped_by(self.pid)
        if move_terminal_foreground(ours, self.pid):
            # `fg` of our job, the command's group in the background (and maybe stopped
            # by a read of the terminal meanwhile): the terminal is for it.
            self._resume()
        elif stop is not None:
            move_terminal_foreground(self.pid, ours)
            # Stopped as the command was: the shell sees its job stop, and continues us
            # (fg, bg, kill -CONT) as it would have continued the command.
            os.kill(os.getpid(), stop)
            self._continued = True

    def _resume(self) -> None:
        # Not reaped: the group id is still the command's.
        if _SIGCONT is not None and self.proc.poll() is None:
            signal_group(self.pid, _SIGCONT)

    def close(self) -> None:
        """Stop following; give the terminal back to our group if the command's has it.
        Call once the command has exited or is being stopped."""
        self._closed = True
        ours = process_group(os.getpid())
        if ours is not None:
            move_terminal_foreground(self.pid, ours)
