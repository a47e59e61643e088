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

A released port lock keeps its two files open, unlocked, for the next acquire of the
same port in this process (at most 32 ports): reacquiring then costs a lock and one
stat instead of two opens, two stats and two closes. A forked child closes them, since
a flock belongs to the open file shared with the parent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import stat
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from portpool._platform import (
    DirHandle,
    LockTable,
    ProcessIdentity,
    current_identity,
    locked_inodes,
    open_files_limit,
    read_at,
    try_lock,
    unlock,
    write_at,
)
from portpool.errors import (
    AlreadyHeldHere,
    LockError,
    LockHeld,
    ResourceLimit,
    StateDirError,
)
from portpool.statedir import StateDir

RECORD_SIZE = 1024
_OPEN_RETRIES = 16
_READ_RETRIES = 3
_IDLE_MAX = 32

_Key = tuple[int, int, str]  # (directory device, directory inode, entry name)

# Locks this process holds: a second acquire of the same lock in one process is a caller
# bug, reported as such instead of failing as if someone else held it.
_held: dict[_Key, HeldLock] = {}
_held_mutex = threading.Lock()
# Bumped in every forked child, so "am I the process that took this lock?" costs no
# getpid() syscall on the hot path.
_fork_generation = 0
_pid = os.getpid()  # kept current by the at-fork hook below


@dataclass
class _IdleFiles:
    """The open (unlocked) files of a port lock this process released, kept for reuse.

    Reopening the lock and record files costs four syscalls per acquire; checking that
    the paths still name these inodes costs two. Reuse is always re-verified: a file
    replaced or unlinked meanwhile is simply closed and opened afresh.
    """

    lock_fd: int
    lock_id: tuple[int, int]
    meta_fd: int
    meta_id: tuple[int, int]

    def close(self) -> None:
        for fd in (self.lock_fd, self.meta_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


_idle: dict[_Key, _IdleFiles] = {}  # insertion-ordered: the oldest is evicted first


def _after_fork_in_child() -> None:
    # The child shares the parent's open file descriptions, and a flock belongs to the
    # description: unlocking there would free the parent's lock, and locking an idle
    # copy would "take" a lock the parent may take too. Close every copy in the child.
    # The mutex may have been held by another parent thread at fork time: replace it.
    global _held_mutex, _fork_generation, _pid
    _held_mutex = threading.Lock()
    _fork_generation += 1
    _pid = os.getpid()
    for held in list(_held.values()):
        held._disown()
    _held.clear()
    for files in _idle.values():
        files.close()
    _idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def close_idle_files() -> None:
    """Close the files kept open for reuse by released port locks (they hold no lock)."""
    with _held_mutex:
        idle = list(_idle.values())
        _idle.clear()
    for files in idle:
        files.close()


def out_of_descriptors(error: OSError) -> ResourceLimit | None:
    """A ResourceLimit for an EMFILE/ENFILE ``error``, else None.

    Out of descriptors once read as "no free port in pool ... (remove what is there)",
    exit 3: it is a resource limit (exit 1), and nothing on disk is at fault.
    """
    if error.errno == errno.EMFILE:
        return ResourceLimit(
            "open files",
            open_files_limit(),
            None,
            "raise the limit (ulimit -n) or start fewer services",
        )
    if error.errno == errno.ENFILE:
        return ResourceLimit(
            "open files of the whole system", None, None, "close programs or raise fs.file-max"
        )
    return None


class HeldLock:
    """A kernel lock on ``<dir>/<name>`` that this process holds. Use ``acquire``."""

    def __init__(
        self, directory: DirHandle, name: str, fd: int, file_id: tuple[int, int], key: _Key
    ) -> None:
        self.directory = directory
        self.name = name
        self.fd = fd
        self.dev, self.ino = file_id
        self.owner_pid = _pid
        self._generation = _fork_generation
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
        return cls._acquire(directory, name, (*directory.identity, name), None)

    @classmethod
    def _acquire(
        cls,
        directory: DirHandle,
        name: str,
        key: _Key,
        reuse: tuple[int, tuple[int, int]] | None,
    ) -> HeldLock:
        """``acquire``, first trying ``reuse``: an fd of ours (closed here if not kept)."""
        with _held_mutex:
            if key in _held:
                if reuse is not None:
                    os.close(reuse[0])
                raise AlreadyHeldHere(os.path.join(directory.path, name))
        if reuse is not None:
            fd, file_id = reuse
            held = cls._lock_checked(directory, name, key, fd, file_id)
            if held is not None:
                return held
        for _ in range(_OPEN_RETRIES):
            try:
                fd = directory.open_file(name, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                limit = out_of_descriptors(e)
                if limit is not None:
                    raise limit from e
                raise StateDirError(
                    os.path.join(directory.path, name),
                    f"cannot open lock file: {e.strerror or e} (remove what is there)",
                ) from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StateDirError(
                        os.path.join(directory.path, name),
                        "lock path is not a regular file (remove what is there)",
                    )
            except BaseException:
                os.close(fd)
                raise
            held = cls._lock_checked(directory, name, key, fd, (st.st_dev, st.st_ino))
            if held is not None:
                return held
        path = os.path.join(directory.path, name)
        raise LockError(f"{path} kept being replaced while locking; giving up")

    @classmethod
    def _lock_checked(
        cls, directory: DirHandle, name: str, key: _Key, fd: int, file_id: tuple[int, int]
    ) -> HeldLock | None:
        """Lock ``fd`` (the file ``file_id``) and check the path still names it.

        Takes ownership of ``fd``: returns the HeldLock, or closes it and returns None
        when the path names another file now (retry), or raises LockHeld.
        """
        try:
            if not try_lock(fd):
                raise LockHeld(os.path.join(directory.path, name))
            # Rule 2: a holder may have unlinked or replaced the file between our open
            # and our lock; a lock on an orphaned inode is worthless. The same inode at
            # the path also means it is still linked.
            now = directory.stat_entry(name)
        except BaseException:
            os.close(fd)
            raise
        if now is None or (now.st_dev, now.st_ino) != file_id:
            os.close(fd)  # frees the lock we took on the orphan
            return None
        held = cls(directory, name, fd, file_id, key)
        with _held_mutex:
            _held[key] = held
        return held

    def problem(self, check_kernel: bool = True, *, locked: LockTable | None = None) -> str | None:
        """None while the lock is still ours on the same file, else what went wrong.

        ``check_kernel`` also asks the kernel that the lock is still held (Linux);
        ``locked`` is a ``locked_inodes()`` snapshot to use instead of reading it again.
        """
        if self.fd < 0:
            return f"lock file {self.name} was released"
        now = self.directory.stat_entry(self.name)
        if now is None:
            return f"lock file {self.name} was deleted by another process"
        if (now.st_dev, now.st_ino) != (self.dev, self.ino):
            return f"lock file {self.name} was replaced by another file"
        if check_kernel and locked is None:
            locked = locked_inodes()
        if (
            check_kernel
            and locked is not None
            and not _listed(self.directory, self.name, now, locked)
        ):
            return f"lock file {self.name} is no longer locked by the kernel"
        return None

    @property
    def is_owner_process(self) -> bool:
        """True in the process that took the lock, False in a forked child."""
        return self._generation == _fork_generation

    def _disown(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _forget(self) -> None:
        with _held_mutex:
            if _held.get(self._key) is self:
                del _held[self._key]

    def _unlock_keep_open(self) -> int:
        """Unlock, but hand back the still-open fd for reuse (owner process only)."""
        self._forget()
        fd, self.fd = self.fd, -1
        unlock(fd)
        return fd

    def release(self) -> None:
        """Unlock and close. In a forked child this only closes the child's copy."""
        self._forget()
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


def _listed(directory: DirHandle, name: str, st: os.stat_result, locked: LockTable) -> bool:
    """Whether the kernel's table lists a lock on the file ``st`` (``<dir>/<name>``).

    Device and inode both: the inode alone matched other filesystems' locks. When the
    table only lists the inode under another device (btrfs subvolumes and overlay mounts
    list the filesystem's device, not ``st_dev``), the file itself is asked.
    """
    listed = locked.holds(st.st_dev, st.st_ino)
    if listed is not None:
        return listed
    return _probe(directory, name)


def is_held(directory: DirHandle, name: str, locked: LockTable | None) -> bool:
    """Whether ``<dir>/<name>`` is locked right now, without disturbing its holder.

    ``locked`` is a ``locked_inodes()`` snapshot; None means probe (an OS that does not
    list locks). Unknown is never "free".
    """
    st = directory.stat_entry(name)
    if st is None:
        return False
    if locked is not None:
        return _listed(directory, name, st, locked)
    return _probe(directory, name)


def _probe(directory: DirHandle, name: str) -> bool:
    """Whether ``<dir>/<name>`` is locked, asked by trying a lock of our own (released at
    once). Only where the kernel's table cannot tell: a racer may fail meanwhile."""
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
        """Who holds the port, in plain words, also for a lease taken with ``acquire()``
        outside an instance (it read "instance 0 of  (pid 12, service )")."""
        service = f", service {self.service}" if self.service else ""
        if self.instance > 0 and self.app:
            return f"instance {self.instance} of {self.app} (pid {self.pid}{service})"
        app = f" of app {self.app}" if self.app else ""
        return f"pid {self.pid}{app}, outside any instance{service}"


_INT_FIELDS = ("port", "pid", "instance")
_STR_FIELDS = ("start_token", "boot_id", "app", "service", "host")
_FLOAT_FIELDS = ("acquired_at", "heartbeat_at")
_MAX_STR = 256


_quote = json.encoder.encode_basestring_ascii  # what json.dumps(ensure_ascii=True) uses


_prefixes: dict[tuple[object, ...], str] = {}


def _record_prefix(r: PortRecord) -> str:
    """The JSON of every field but the two times (the same for all heartbeats: cached)."""
    key = (r.port, r.pid, r.start_token, r.boot_id, r.app, r.instance, r.service, r.host)
    found = _prefixes.get(key)
    if found is None:
        for name in _STR_FIELDS:
            if len(getattr(r, name)) > _MAX_STR:
                # decode_record refuses it: never write a record we cannot read back
                raise LockError(f"port {r.port}: record field {name!r} is over {_MAX_STR} chars")
        if len(_prefixes) >= 256:
            _prefixes.clear()
        found = _prefixes[key] = (
            f'{{"v":1,"port":{int(r.port)!r},"pid":{int(r.pid)!r},'
            f'"start_token":{_quote(r.start_token)},"boot_id":{_quote(r.boot_id)},'
            f'"app":{_quote(r.app)},"instance":{int(r.instance)!r},'
            f'"service":{_quote(r.service)},"host":{_quote(r.host)},'
        )
    return found


def encode_record(record: PortRecord) -> bytes:
    """The fixed-size bytes of ``record``: JSON line, CRC line, space padding.

    The JSON is exactly ``json.dumps(record.to_dict(), separators=(",", ":"))``, formatted
    by hand because acquire is on the hot path (json.dumps alone was ~10 us of it).
    Raises LockError if the record does not fit its fixed size.
    """
    r = record
    prefix = _record_prefix(r)  # cached, so the checks below run once per lease
    text = (
        f'{prefix}"acquired_at":{float(r.acquired_at)!r},"heartbeat_at":{float(r.heartbeat_at)!r}}}'
    ).encode("ascii")
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
        if not isinstance(v, str) or len(v) > _MAX_STR:
            raise ValueError(f"record field {name!r} is not a string")
        values[name] = v
    for name in _FLOAT_FIELDS:
        v = raw.get(name)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(f"record field {name!r} is not a number")
        try:
            number = float(v)  # an int too large for a float raises OverflowError
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"record field {name!r} is not a finite number")
        values[name] = number
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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("record is not a regular file")
        return _read_record_fd(fd)
    finally:
        os.close(fd)


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


def inspect_port(state: StateDir, port: int, locked: LockTable | None = None) -> PortStatus:
    """Who holds ``port`` in this state dir. Never "free" while its lock is held.

    ``locked`` is a ``locked_inodes()`` snapshot, to share one kernel read among many ports.
    """
    directory = state.find("ports")  # read-only: a state dir never used has no ports
    if directory is None:
        return PortStatus(port, "free")
    if locked is None:
        locked = locked_inodes()
    if not is_held(directory, f"{port}.lock", locked):
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
    _meta_id: tuple[int, int] = field(default=(0, 0), repr=False)
    _written: bytes | None = field(default=None, repr=False)  # our record, byte for byte

    @classmethod
    def acquire(cls, state: StateDir, port: int) -> PortLock:
        """Lock ``port`` in ``state`` without waiting.

        Raises LockHeld (``holder`` is the PortStatus seen), AlreadyHeldHere, StateDirError.
        """
        directory = state.ports()
        name = f"{port}.lock"
        key = (*directory.identity, name)
        with _held_mutex:
            idle = _idle.pop(key, None)
        try:
            lock = HeldLock._acquire(
                directory, name, key, None if idle is None else (idle.lock_fd, idle.lock_id)
            )
        except LockHeld as e:
            if idle is not None:
                os.close(idle.meta_fd)
            raise LockHeld(e.path, inspect_port(state, port)) from None
        except BaseException:
            if idle is not None:
                os.close(idle.meta_fd)
            raise
        try:
            if idle is not None and lock.fd == idle.lock_fd:
                # The kept lock file is still the one at the path, so nobody removed this
                # port's files meanwhile (gc unlinks the record with the lock file, while
                # holding it): the kept record file is still ours too.
                meta_fd, meta_id = idle.meta_fd, idle.meta_id
            elif idle is not None:
                meta_fd, meta_id = _reuse_meta(directory, f"{port}.json", idle)
            else:
                meta_fd, meta_id = _open_meta(directory, f"{port}.json")
        except BaseException:
            lock.release()
            raise
        return cls(port, lock, meta_fd, _meta_id=meta_id)

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
        """Refresh ``heartbeat_at`` in place (one pwrite). Raises LockError once released."""
        if self.record is None:
            return
        now = time.time() if now is None else now
        self._write(dataclasses.replace(self.record, heartbeat_at=now))

    def _write(self, record: PortRecord) -> None:
        data = encode_record(record)
        with self._mutex:
            if self.meta_fd < 0:
                raise LockError(f"port {self.port}: lock already released")
            write_at(self.meta_fd, data, 0)
            self.record = record
            self._written = data

    def problem(self, *, locked: LockTable | None = None) -> str | None:
        """None while the lock and the metadata at the path are still ours, else why not.

        ``locked`` is a ``locked_inodes()`` snapshot, to share one kernel read among ports.
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
        return None

    def release(self) -> None:
        """Erase our record, unlock, close. Safe to call twice.

        In a forked child this only closes the child's copies: the lock and the record
        stay the parent's. When the lock file is no longer ours (replaced or unlinked by
        someone else) the record is left alone: it may be the new holder's.
        """
        with self._mutex:
            fd, self.meta_fd = self.meta_fd, -1
        if fd < 0:
            self.lock.release()
            return
        lock = self.lock
        erased = False
        if lock.is_owner_process and lock.problem(check_kernel=False) is None:
            # Erase before unlocking, so nobody ever reads our record as theirs; but only
            # our own bytes: a record another process wrote is evidence, not ours to wipe.
            with contextlib.suppress(OSError):
                if self._written is None or read_at(fd, RECORD_SIZE, 0) == self._written:
                    erased = write_at(fd, _BLANK, 0) == RECORD_SIZE
        if not erased:
            os.close(fd)
            lock.release()
            return
        try:
            lock_fd = lock._unlock_keep_open()
        except OSError:
            os.close(fd)
            lock.release()
            return
        _keep_idle(lock._key, _IdleFiles(lock_fd, (lock.dev, lock.ino), fd, self._meta_id))


_BLANK = b" " * RECORD_SIZE


def _keep_idle(key: _Key, files: _IdleFiles) -> None:
    """Keep a released lock's files open for the next acquire of the same port."""
    evicted: list[_IdleFiles] = []
    with _held_mutex:
        old = _idle.pop(key, None)
        if old is not None:
            evicted.append(old)
        _idle[key] = files
        while len(_idle) > _IDLE_MAX:
            evicted.append(_idle.pop(next(iter(_idle))))
    for f in evicted:
        f.close()


def _reuse_meta(directory: DirHandle, name: str, idle: _IdleFiles) -> tuple[int, tuple[int, int]]:
    """The kept record file if the path still names it (one stat), else a fresh open."""
    st = directory.stat_entry(name)
    if (
        st is not None
        and (st.st_dev, st.st_ino) == idle.meta_id
        and stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
    ):
        if st.st_size != RECORD_SIZE:
            os.ftruncate(idle.meta_fd, RECORD_SIZE)
        return idle.meta_fd, idle.meta_id
    os.close(idle.meta_fd)
    return _open_meta(directory, name)


def _open_meta(directory: DirHandle, name: str) -> tuple[int, tuple[int, int]]:
    """Open our record file for writing; we hold the port's lock, so the path is ours.

    Returns the fd and the file's (device, inode).
    """
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
                raise StateDirError(path, f"metadata path unusable: {e.strerror}") from e
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            # Junk, or a hard link to some other file: unlink our name, never write there.
            os.close(fd)
            directory.unlink(name)
            continue
        if st.st_size != RECORD_SIZE:
            os.ftruncate(fd, RECORD_SIZE)  # only after junk or first use: not the hot path
        return fd, (st.st_dev, st.st_ino)
    path = os.path.join(directory.path, name)
    raise StateDirError(path, "metadata path keeps being replaced")
