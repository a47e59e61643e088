"""Kernel locks on files in the state dir, and one port's lock with its metadata.

``HeldLock`` is the generic part: a non-blocking exclusive kernel lock on
``<dir>/<name>.lock``, which is the truth about ownership (a dead holder frees it at
once). ``PortLock`` adds the port's metadata record ``<port>.json``, which is for people:
who holds the port, since when, last heartbeat.

Metadata is a fixed-size record written in place with one ``pwrite`` (no truncate, no
rename: each of those costs ~200 us on ext4 and acquire is on the hot path). A reader
that races a write can see a torn record, so the record ends with a CRC32 of its text:
a torn or damaged record reads as "unreadable", and unreadable never means "free" —
whether a port is held is decided by the kernel lock alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from portpool._platform import (
    DirHandle,
    ProcessIdentity,
    current_identity,
    locked_inodes,
    read_at,
    try_lock,
    unlock,
    write_at,
)
from portpool.errors import AlreadyHeldHere, LockError, LockHeld, StateDirError
from portpool.statedir import StateDir

RECORD_SIZE = 1024
_OPEN_RETRIES = 16
_READ_RETRIES = 3

# Locks this process holds, keyed by (directory inode, name): a second acquire of the
# same lock in one process is a caller bug, reported instead of silently failing.
_held: dict[tuple[int, int, str], HeldLock] = {}
_held_mutex = threading.Lock()


def _after_fork_in_child() -> None:
    # The child shares the parent's open file descriptions: unlocking there would free
    # the parent's locks. Close the child's copies (the lock stays with the parent).
    for held in list(_held.values()):
        held._disown()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class HeldLock:
    """A kernel lock on ``<dir>/<name>`` that this process holds. Use ``acquire``."""

    def __init__(
        self,
        directory: DirHandle,
        name: str,
        fd: int,
        st: os.stat_result,
        key: tuple[int, int, str],
    ) -> None:
        self.directory = directory
        self.name = name
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.owner_pid = os.getpid()
        self._key = key

    @property
    def path(self) -> str:
        return os.path.join(self.directory.path, self.name)

    @classmethod
    def acquire(cls, directory: DirHandle, name: str) -> HeldLock:
        """Lock ``<dir>/<name>`` without waiting.

        Raises LockHeld if another lock holder has it, AlreadyHeldHere if this process
        does, StateDirError if the path is unusable (a symlink, a directory, ...).
        """
        dst = directory.stat()
        key = (dst.st_dev, dst.st_ino, name)
        path = os.path.join(directory.path, name)
        with _held_mutex:
            if key in _held:
                raise AlreadyHeldHere(path)
        for _ in range(_OPEN_RETRIES):
            try:
                fd = directory.open_file(name, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise StateDirError(path, f"cannot open lock file: {e.strerror or e}") from e
            try:
                if not try_lock(fd):
                    raise LockHeld(path)
                # Rule 2: someone holding the lock may have unlinked or replaced the file
                # between our open and our lock; a lock on an orphaned inode is worthless.
                st = os.fstat(fd)
                now = directory.stat_entry(name)
            except BaseException:
                os.close(fd)
                raise
            if (
                now is not None
                and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                and (st.st_nlink >= 1)
            ):
                held = cls(directory, name, fd, st, key)
                with _held_mutex:
                    _held[key] = held
                return held
            os.close(fd)
        raise LockError(f"{path} kept being replaced while locking; giving up")

    def problem(self, check_kernel: bool = True) -> str | None:
        """None while the lock is still ours on the same file, else what went wrong.

        ``check_kernel`` also asks the kernel that the lock is still held (Linux).
        """
        if self.fd < 0:
            return f"lock file {self.name} was released"
        now = self.directory.stat_entry(self.name)
        if now is None:
            return f"lock file {self.name} was deleted by another process"
        if (now.st_dev, now.st_ino) != (self.dev, self.ino):
            return f"lock file {self.name} was replaced by another file"
        try:
            if os.fstat(self.fd).st_nlink < 1:
                return f"lock file {self.name} was unlinked"
        except OSError as e:
            return f"lock file {self.name} can no longer be checked: {e.strerror}"
        locked = locked_inodes() if check_kernel else None
        if locked is not None and self.ino not in locked:
            return f"lock file {self.name} is no longer locked by the kernel"
        return None

    @property
    def is_owner_process(self) -> bool:
        return self.owner_pid == os.getpid()

    def _disown(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        """Unlock and close. In a forked child this only closes the child's copy."""
        with _held_mutex:
            if _held.get(self._key) is self:
                del _held[self._key]
        if self.fd < 0:
            return
        if self.is_owner_process:
            with contextlib.suppress(OSError):  # closing below frees it anyway
                unlock(self.fd)
        os.close(self.fd)
        self.fd = -1

    def remove_and_release(self) -> None:
        """Unlink the lock file while still holding it (rule 2), then release."""
        if self.is_owner_process and self.problem(check_kernel=False) is None:
            with contextlib.suppress(OSError):
                self.directory.unlink(self.name)
        self.release()


def _is_held(directory: DirHandle, name: str, locked: dict[int, int] | None) -> bool:
    """Whether ``<dir>/<name>`` is locked right now, without disturbing its holder."""
    st = directory.stat_entry(name)
    if st is None:
        return False
    if locked is not None:
        return st.st_ino in locked
    # No kernel listing on this OS: probe with a lock of our own, released at once.
    try:
        fd = directory.open_file(name, os.O_RDONLY)
    except OSError:
        return True  # cannot tell: unknown is never "free"
    try:
        if try_lock(fd):
            unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------- port records


@dataclass(frozen=True)
class PortRecord:
    """Who holds a port, as its metadata says."""

    port: int
    pid: int
    start_token: str
    boot_id: str
    app: str
    instance: int
    service: str
    host: str
    acquired_at: float
    heartbeat_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "port": self.port,
            "pid": self.pid,
            "start_token": self.start_token,
            "boot_id": self.boot_id,
            "app": self.app,
            "instance": self.instance,
            "service": self.service,
            "host": self.host,
            "acquired_at": self.acquired_at,
            "heartbeat_at": self.heartbeat_at,
        }

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_token, self.boot_id)

    def describe(self) -> str:
        return f"instance {self.instance} of {self.app} (pid {self.pid}, service {self.service})"


_INT_FIELDS = ("port", "pid", "instance")
_STR_FIELDS = ("start_token", "boot_id", "app", "service", "host")
_FLOAT_FIELDS = ("acquired_at", "heartbeat_at")


def encode_record(record: PortRecord) -> bytes:
    """The fixed-size bytes of ``record``: JSON line, CRC line, space padding."""
    text = json.dumps(record.to_dict(), separators=(",", ":"), ensure_ascii=True).encode()
    body = text + b"\n#%08x\n" % zlib.crc32(text)
    if len(body) > RECORD_SIZE:
        raise LockError(f"port {record.port}: metadata record too large ({len(body)} bytes)")
    return body.ljust(RECORD_SIZE, b" ")


def decode_record(data: bytes) -> PortRecord | None:
    """Parse a record. None for a blank (released) record.

    Raises ValueError for anything torn, damaged or hostile; never anything else.
    """
    if len(data) > RECORD_SIZE:
        raise ValueError("record larger than its fixed size")
    stripped = data.rstrip(b" \n\0")
    if not stripped:
        return None
    text, sep, crc_hex = stripped.rpartition(b"\n#")
    if not sep or len(crc_hex) != 8:
        raise ValueError("record has no checksum line")
    try:
        crc = int(crc_hex, 16)
    except ValueError:
        raise ValueError("record checksum is not hex") from None
    if zlib.crc32(text) != crc:
        raise ValueError("record checksum mismatch (torn or damaged)")
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("record is not JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != 1:
        raise ValueError("record is not a version-1 object")
    values: dict[str, Any] = {}
    for name in _INT_FIELDS:
        v = raw.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**31:
            raise ValueError(f"record field {name!r} is not a valid integer")
        values[name] = v
    for name in _STR_FIELDS:
        v = raw.get(name)
        if not isinstance(v, str) or len(v) > 256:
            raise ValueError(f"record field {name!r} is not a string")
        values[name] = v
    for name in _FLOAT_FIELDS:
        v = raw.get(name)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"record field {name!r} is not a number")
        values[name] = float(v)
    return PortRecord(**values)


def _read_record_fd(fd: int) -> PortRecord | None:
    """Read a record, retrying a torn read a few times. Raises ValueError if unreadable."""
    error = ValueError("record could not be read")
    for _ in range(_READ_RETRIES):
        try:
            data = read_at(fd, RECORD_SIZE + 1, 0)
        except InterruptedError:
            continue
        except OSError as e:
            raise ValueError(f"record read failed: {e.strerror}") from e
        try:
            return decode_record(data)
        except ValueError as e:
            error = e
    raise error


def read_port_record(directory: DirHandle, port: int) -> PortRecord | None:
    """The record of ``port`` (None if blank or absent). Raises ValueError if unreadable."""
    try:
        fd = directory.open_file(f"{port}.json", os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"record cannot be opened: {e.strerror or e}") from e
    try:
        if not _is_regular(fd):
            raise ValueError("record is not a regular file")
        return _read_record_fd(fd)
    finally:
        os.close(fd)


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


PortState = Literal["free", "held", "held-unreadable"]


@dataclass(frozen=True)
class PortStatus:
    """What the state dir says about one port."""

    port: int
    state: PortState
    record: PortRecord | None = None
    problem: str | None = None  # why the record is unreadable

    @property
    def is_free(self) -> bool:
        return self.state == "free"

    def describe(self) -> str:
        if self.state == "free":
            return "free"
        if self.record is not None:
            return f"held by {self.record.describe()}"
        return f"held, metadata unreadable ({self.problem or 'not written yet'})"


def inspect_port(state: StateDir, port: int, locked: dict[int, int] | None = None) -> PortStatus:
    """Who holds ``port`` in this state dir. Never "free" while its lock is held.

    ``locked`` is a ``locked_inodes()`` snapshot, to share one kernel read among many ports.
    """
    directory = state.ports()
    if locked is None:
        locked = locked_inodes()
    if not _is_held(directory, f"{port}.lock", locked):
        return PortStatus(port, "free")
    try:
        record = read_port_record(directory, port)
    except ValueError as e:
        return PortStatus(port, "held-unreadable", None, str(e))
    if record is None or record.port != port:
        problem = None if record is None else f"record names port {record.port}"
        return PortStatus(port, "held-unreadable", None, problem)
    return PortStatus(port, "held", record)


@dataclass
class PortLock:
    """The kernel lock of one port plus its metadata record, held by this process."""

    port: int
    lock: HeldLock
    meta_fd: int
    record: PortRecord | None = None
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def acquire(cls, state: StateDir, port: int) -> PortLock:
        """Lock ``port`` in ``state`` without waiting.

        Raises LockHeld (``holder`` is the PortStatus seen), AlreadyHeldHere, StateDirError.
        """
        directory = state.ports()
        try:
            lock = HeldLock.acquire(directory, f"{port}.lock")
        except LockHeld as e:
            raise LockHeld(e.path, inspect_port(state, port)) from None
        try:
            meta_fd = _open_meta(directory, f"{port}.json")
        except BaseException:
            lock.release()
            raise
        return cls(port, lock, meta_fd)

    def write_record(
        self, *, app: str, instance: int, service: str, host: str, now: float | None = None
    ) -> PortRecord:
        """Write who holds the port (done once bound: metadata never claims a port early)."""
        me = current_identity()
        now = time.time() if now is None else now
        record = PortRecord(
            self.port, me.pid, me.start_token, me.boot_id, app, instance, service, host, now, now
        )
        self._write(record)
        return record

    def heartbeat(self, now: float | None = None) -> None:
        """Refresh ``heartbeat_at`` in place (one pwrite)."""
        if self.record is None:
            return
        now = time.time() if now is None else now
        fields = self.record.to_dict()
        fields.pop("v")
        fields["heartbeat_at"] = now
        self._write(PortRecord(**fields))

    def _write(self, record: PortRecord) -> None:
        data = encode_record(record)
        with self._mutex:
            if self.meta_fd < 0:
                raise LockError(f"port {self.port}: lock already released")
            write_at(self.meta_fd, data, 0)
            self.record = record

    def problem(self) -> str | None:
        """None while the lock and the metadata at the path are still ours, else why not."""
        lock_problem = self.lock.problem()
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
        return None

    def release(self) -> None:
        """Erase our record, unlock, close. In a forked child: only close our copies."""
        with self._mutex:
            fd, self.meta_fd = self.meta_fd, -1
        if fd >= 0:
            try:
                if self.lock.is_owner_process and self.lock.problem(check_kernel=False) is None:
                    # Erase before unlocking, so nobody ever reads our record as theirs.
                    write_at(fd, b" " * RECORD_SIZE, 0)
            except OSError:
                pass
            os.close(fd)
        self.lock.release()


def _open_meta(directory: DirHandle, name: str) -> int:
    """Open our metadata file for writing; we hold the port's lock, so the path is ours."""
    for _ in range(2):
        try:
            fd = directory.open_file(name, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            # A symlink or other junk planted at our path: remove it (we hold the lock).
            try:
                directory.unlink(name)
            except OSError:
                path = os.path.join(directory.path, name)
                raise StateDirError(path, f"metadata path unusable: {e.strerror}") from e
            continue
        st = os.fstat(fd)
        if not _is_regular(fd) or st.st_nlink != 1:
            os.close(fd)
            directory.unlink(name)
            continue
        if st.st_size != RECORD_SIZE:
            os.ftruncate(fd, RECORD_SIZE)  # only after junk or first use: not the hot path
        return fd
    path = os.path.join(directory.path, name)
    raise StateDirError(path, "metadata path keeps being replaced")
