"""Which children of ``run``/``up`` (a child subreaper) are the instance's.

Part of the supervisor layer. As a subreaper, every orphan of the trees we started is
re-parented to us, and so is every orphan of a child we inherited through the exec
that started portpool (``sh -c 'sidecar & exec portpool up'``), which we did not start
(rule 7). ``Lineage`` tells them apart: the inherited children and what they started,
seen while their lineage shows, are never ours; once we inherited any, an orphan of
unknown lineage is ours only when its environment carries the instance's marks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from portpool._platform import has_children
from portpool._portstatus import INSTANCE_MARKS

if TYPE_CHECKING:
    import psutil

__all__ = ["Lineage", "running"]


class Lineage:
    """The children of this process that are not ours. ``adopt`` False (a program
    calling the library): nothing is asked, every method answers at once."""

    def __init__(self, adopt: bool) -> None:
        # Children this process had before we started anything: inherited through the
        # exec that started portpool. Not ours, nor what they start.
        self.inherited = _children_now() if adopt else []
        # What the inherited children started, seen so far (pid + start time): once
        # orphaned it is re-parented to us, the subreaper, and looks adopted.
        self._foreign: set[psutil.Process] = set()
        self._lock = threading.Lock()  # the shield, keepers and the stop ask
        self._marks: dict[str, str] = {}
        self.note()

    def mark(self, env: Mapping[str, str]) -> None:
        """Take the instance's marks from ``env``, that of a process we start. Marks we
        carry ourselves prove nothing: a caller that exported the instance's variables
        (``eval "$(portpool env --export)"``) gave them to its sidecar too, and run's
        stop killed what that sidecar started."""
        marks = {k: env[k] for k in INSTANCE_MARKS if k in env}  # doctor reads them too
        self._marks = {} if all(os.environ.get(k) == v for k, v in marks.items()) else marks

    @property
    def marks(self) -> dict[str, str]:
        """The marks an orphan of unknown lineage must carry to be ours (a copy; empty:
        none can be). Raises nothing."""
        return dict(self._marks)

    def note(self) -> None:
        """Remember the descendants of the inherited children, while their lineage can
        still be seen (call now and then: each tick of the supervisor's wait)."""
        if not self.inherited:
            return
        import psutil

        seen: list[psutil.Process] = []
        for inherited in self.inherited:
            with contextlib.suppress(psutil.Error):
                if inherited.is_running():
                    seen += inherited.children(recursive=True)
        with self._lock:
            # The gone ones can no longer be adopted: a busy sidecar must not grow this.
            self._foreign = {p for p in self._foreign if running(p)} | set(seen)

    def adopted(
        self, children: Sequence[psutil.Process], started: Collection[int]
    ) -> list[psutil.Process]:
        """Those of ``children`` (this process's) that are ours but not in ``started``
        (pids): orphans of our processes' trees, adopted as a subreaper. Never a child
        inherited through exec nor anything it started: the stop killed a sidecar's
        orphaned child, and the shield took a sidecar's listener on our port for ours.
        Once we inherited any, an orphan of unknown lineage is ours only when its
        environment carries the instance's marks (unreadable: not ours)."""
        self.note()
        with self._lock:
            foreign = set(self.inherited) | self._foreign
        return [
            child
            for child in children
            if child.pid not in started
            and child not in foreign
            and (not self.inherited or self._marked(child))
        ]

    def _marked(self, proc: psutil.Process) -> bool:
        import psutil

        try:
            env = proc.environ()
        except psutil.Error:
            return False  # gone, or another user's: not proven ours
        return bool(self._marks) and all(env.get(k) == v for k, v in self._marks.items())


def _children_now() -> list[psutil.Process]:
    """This process's children now (none, without loading psutil, in the usual case)."""
    if not has_children():
        return []
    import psutil

    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def running(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (not gone, not a zombie waiting to be reaped)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
