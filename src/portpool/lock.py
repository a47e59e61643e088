"""One port's lock held by this process: ``PortLock``, its kernel lock plus its record.

The kernel lock (``portpool._heldlock``) is the truth about ownership; the record
``<port>.json`` (``portpool._record``) is for people: who holds the port, since when,
last heartbeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from portpool._dataclass import dataclass, field
from portpool._heldlock import ForkSafeRLock, HeldLock
from portpool._layout_load import file_kind
from portpool._platform import (
    DirHandle,
    LockTable,
    current_identity,
    locked_inodes,
    read_at,
    write_at,
)
from portpool._record import (
    BLANK_RECORD,
    RECORD_SIZE,
    PortRecord,
    encode_record,
    read_port_record,
    read_record_fd,
)
from portpool.errors import LockError, LockHeld, StateDirError
from portpool.statedir import StateDir, out_of_descriptors

if TYPE_CHECKING:
    from portpool._portstatus import SharedLockTable

__all__ = ["PortLock"]


def _refuse_a_removed_lock(directory: DirHandle, port: int, meta_fd: int) -> None:
    """Raise LockHeld if the record names a live holder of this port whose lock file
    was removed or replaced under it: our new file's lock says nothing of it, and a
    start took the port and wrote over the holder's record."""
    try:
        record = read_record_fd(meta_fd)
    except ValueError:
        return
    from portpool._portstatus import removed_lock_status  # only for a record

    status = removed_lock_status(directory, port, record)
    if status is not None:
        raise LockHeld(os.path.join(directory.path, f"{port}.lock"), status)


@dataclass
class PortLock:
    """The kernel lock of one port plus its metadata record, held by this process."""

    port: int
    lock: HeldLock
    meta_fd: int
    record: PortRecord | None = None
    state: StateDir | None = field(default=None, repr=False)  # kept open while held
    _mutex: ForkSafeRLock = field(default_factory=ForkSafeRLock, repr=False)
    _written: bytes | None = field(default=None, repr=False)  # our record, byte for byte

    @classmethod
    def acquire(cls, state: StateDir, port: int, table: SharedLockTable | None = None) -> PortLock:
        """Lock ``port`` in ``state`` without waiting. ``table``: the kernel's lock table
        shared among the ports of one pool, to name a holder by (None: read one).

        Raises LockHeld (``holder`` is the PortStatus seen), AlreadyHeldHere, StateDirError.
        """
        directory = state.ports()
        try:
            lock = HeldLock.acquire(directory, f"{port}.lock")
        except LockHeld as e:
            from portpool._portstatus import refused_port_status  # who holds it: only now

            raise LockHeld(e.path, refused_port_status(state, port, table)) from None
        try:
            meta_fd = _open_meta(directory, f"{port}.json")
        except BaseException:
            lock.release()
            raise
        try:
            _refuse_a_removed_lock(directory, port, meta_fd)
        except BaseException:
            os.close(meta_fd)
            lock.release()
            raise
        state.keep_open()
        return cls(port, lock, meta_fd, state=state)

    def write_record(
        self, *, app: str, instance: int, service: str, host: str, now: float | None = None
    ) -> PortRecord:
        """Write who holds the port (done once bound: metadata never claims a port early).

        Raises LockError once released, OSError if the write fails.
        """
        me = current_identity()
        now = time.time() if now is None else now
        record = PortRecord(
            self.port, me.pid, me.start_token, me.boot_id, app, instance, service, host, now, now
        )
        self._write(record)
        return record

    def heartbeat(self, now: float | None = None) -> None:
        """Refresh ``heartbeat_at`` in place (one pwrite), only over our own record.

        Raises LockError once released, or when the file no longer holds the record we
        wrote (it is left as found: the shield reports it; a heartbeat that wrote over it
        hid a takeover from the shield), OSError if the read or write fails. Does nothing
        in a forked child: the record is the parent's (a child's heartbeat refreshed it).
        """
        if self.record is None or not self.lock.is_owner_process:
            return
        now = time.time() if now is None else now
        self._write(dataclasses.replace(self.record, heartbeat_at=now), over_ours=True)

    def _write(self, record: PortRecord, *, over_ours: bool = False) -> None:
        data = encode_record(record)
        with self._mutex:
            if self.meta_fd < 0:
                raise LockError(f"port {self.port}: lock already released")
            mine = self._written
            if over_ours and mine is not None and read_at(self.meta_fd, RECORD_SIZE, 0) != mine:
                raise LockError(
                    f"port {self.port}: metadata ports/{self.port}.json is no longer the "
                    "record this process wrote; left as found"
                )
            write_at(self.meta_fd, data, 0)
            self.record = record
            self._written = data

    def problem(self, *, locked: Callable[[], LockTable | None] = locked_inodes) -> str | None:
        """None while the lock and the metadata at the path are still ours, else why not.

        ``locked`` gives a ``locked_inodes()`` snapshot where the kernel must be asked
        through its lock table (see ``HeldLock.problem``), to share one read among
        ports. Raises OSError if the lock file cannot be examined.
        """
        lock_problem = self.lock.problem(locked=locked)
        if lock_problem is not None:
            return lock_problem
        if self.record is None:
            return None
        try:
            seen = read_port_record(self.lock.directory, self.port)
        except ValueError as e:
            return f"metadata ports/{self.port}.json became unreadable: {e}"
        if seen is None:
            return f"metadata ports/{self.port}.json was erased by another process"
        if (seen.pid, seen.start_token) != (self.record.pid, self.record.start_token):
            return (
                f"metadata ports/{self.port}.json was rewritten by another process "
                f"(it now names pid {seen.pid})"
            )
        if (seen.port, seen.acquired_at) != (self.record.port, self.record.acquired_at):
            # Our pid, but not this lease's record (a copy of another port's file).
            return (
                f"metadata ports/{self.port}.json was replaced by another record "
                f"(it now names port {seen.port}, acquired at {seen.acquired_at})"
            )
        return None

    def release(self) -> None:
        """Erase our record, unlock, close. Safe to call twice.

        In a forked child this only closes the child's copies: the lock and the record
        stay the parent's. When the lock file is no longer ours (replaced or unlinked by
        someone else) the record is left alone: it may be the new holder's. Safe from
        several threads at once: a second caller waits until the record is erased and
        the lock released (it once unlocked first, leaving our record to the next holder).
        """
        with self._mutex:
            fd, self.meta_fd = self.meta_fd, -1
            if fd < 0:
                self.lock.release()
                return
            lock = self.lock
            if lock.is_owner_process and _still_ours(lock):
                # Erase before unlocking, so nobody ever reads our record as theirs; but
                # only our own bytes: a record another process wrote is evidence.
                with contextlib.suppress(OSError):
                    if self._written is None or read_at(fd, RECORD_SIZE, 0) == self._written:
                        write_at(fd, BLANK_RECORD, 0)
            os.close(fd)
            lock.release()
            if self.state is not None:
                self.state.let_close()


def _still_ours(lock: HeldLock) -> bool:
    """Whether the path still names our locked file; False when that cannot be told
    (a directory made unsearchable): its OSError once escaped release() and left the
    lock held, so the port could not be taken again by this process."""
    try:
        return lock.problem(check_kernel=False) is None
    except OSError:
        return False


def record_path_problem(directory: DirHandle, name: str) -> str | None:
    """Why a port's record cannot be written at ``<dir>/<name>`` (``<port>.json``): a
    directory sits there, which ``acquire`` cannot remove (a symlink or other file it
    replaces), so it refuses the port. None otherwise, also when the path is absent.
    ``doctor`` asks it too: it called such a port free while ``run`` refused it.
    Read-only. Raises OSError if the entry cannot be examined."""
    st = directory.stat_entry(name)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return None
    return f"metadata path is {file_kind(st.st_mode)}, not a record portpool wrote (remove it)"


def _open_meta(directory: DirHandle, name: str) -> int:
    """Open our record file for writing; we hold the port's lock, so the path is ours."""
    for _ in range(2):
        try:
            fd = directory.open_file(name, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            limit = out_of_descriptors(e)
            if limit is not None:
                raise limit from e  # nothing at the path is at fault: leave it
            # A symlink or other junk planted at our path: remove it (we hold the lock).
            try:
                directory.unlink(name)
            except OSError:
                path = os.path.join(directory.path, name)
                why = f"metadata path unusable: {e.strerror}"
                with contextlib.suppress(OSError):
                    why = record_path_problem(directory, name) or why
                raise StateDirError(path, why) from e
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            # Junk, or a hard link to some other file: unlink our name, never write there.
            os.close(fd)
            directory.unlink(name)
            continue
        if st.st_size > RECORD_SIZE:
            # Only ever shrink: our first write grows a new file, and there a file system
            # that refuses to grow it (quota, file size limit) is reported as the state
            # dir's fault; growing it here leaked the OSError out of acquire().
            os.ftruncate(fd, RECORD_SIZE)
        return fd
    path = os.path.join(directory.path, name)
    raise StateDirError(path, "metadata path keeps being replaced")
