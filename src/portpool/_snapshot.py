"""The kernel reads of one shield check, made at most once and shared by every lease.

One check reads ``/proc/locks`` and the kernel's socket table once for all leases (and
our processes only when a socket is not obviously ours), so it stays cheap enough to run
every second. ``refresh`` forgets them before a retry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from portpool._platform import LockTable, TcpSocket, descends_from, locked_inodes, tcp_sockets


class Snapshot:
    """The kernel reads of one check, each made on first use. ``own_pids`` gives the
    supervised children's pids (None: this process has none)."""

    def __init__(self, own_pids: Callable[[], Iterable[int]] | None) -> None:
        self._own_pids = own_pids
        self.refresh()

    def refresh(self) -> None:
        """Forget every read: the next use reads the kernel again."""
        self._locked: LockTable | None = None
        self._locked_read = False
        self._listeners: dict[int, list[TcpSocket]] | None = None
        self._children: set[int] | None = None

    def locked(self) -> LockTable | None:
        """The ``locked_inodes()`` table (None where the OS does not list locks)."""
        if not self._locked_read:
            self._locked = locked_inodes()
            self._locked_read = True
        return self._locked

    def listeners_on(self, port: int) -> list[TcpSocket]:
        """The listening TCP sockets on ``port``, every address and family."""
        if self._listeners is None:
            by_port: dict[int, list[TcpSocket]] = {}
            for found in tcp_sockets(listening_only=True):
                by_port.setdefault(found.port, []).append(found)
            self._listeners = by_port
        return self._listeners.get(port, [])

    def children(self) -> set[int]:
        """Our supervised children's pids (asked only when needed)."""
        if self._children is None:
            self._children = set() if self._own_pids is None else set(self._own_pids())
        return self._children

    def is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is this process, a supervised child, or a descendant of one
        (a service's worker, the real server behind a shell wrapper)."""
        if pid == os.getpid() or pid in self.children():
            return True
        return bool(self.children()) and descends_from(pid, self.children())
