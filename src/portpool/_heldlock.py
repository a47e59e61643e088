"""A kernel lock on one file of the state dir that this process holds, and the process's
registry of such locks (a second acquire in one process is a caller bug).

``HeldLock`` takes a non-blocking exclusive kernel lock on ``<dir>/<name>``, which is
the truth about ownership (a dead holder frees it at once), and checks that the path
still names the locked file. A forked child shares the parent's open file descriptions,
and a flock belongs to the description: the at-fork hook closes the child's copies so
the child can neither free nor share the parent's locks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import weakref
from collections.abc import Callable

from portpool._layout_load import file_kind
from portpool._platform import (
    DirHandle,
    LockTable,
    OpenFiles,
    flock_held,
    locked_inodes,
    try_lock,
    unlock,
)
from portpool._text import printable
from portpool.errors import AlreadyHeldHere, LockError, LockHeld, StateDirError
from portpool.statedir import out_of_descriptors, special_entry

_OPEN_RETRIES = 16

_Key = tuple[int, int, str]  # (directory device, directory inode, entry name)

# Locks this process holds: a second acquire of the same lock in one process is a caller
# bug, reported as such instead of failing as if someone else held it.
_held: dict[_Key, HeldLock] = {}
_held_mutex = threading.Lock()


class ForkSafeRLock:
    """A reentrant mutex that a forked child gets fresh: a parent thread may have held
    it at fork time (a heartbeat writing its record), and the child's ``release()``
    then waited for it forever. Use as ``with mutex:``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        _fork_safe.add(self)

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


_fork_safe: weakref.WeakSet[ForkSafeRLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's open file descriptions, and a flock belongs to the
    # description: unlocking there would free the parent's lock. Close every copy in the
    # child. The mutex may have been held by another parent thread at fork time: replace it.
    global _held_mutex
    _held_mutex = threading.Lock()
    for mutex in list(_fork_safe):
        mutex._lock = threading.RLock()
    for held in list(_held.values()):
        held._disown()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_lock_file(directory: DirHandle, name: str) -> int:
    """A descriptor of ``<dir>/<name>``, created if missing. A lock file that is not
    readable and writable by us (chmod 400, 200) is opened as it allows: flock needs
    neither, and it was refused as "cannot open lock file ... (remove what is there)"
    while an instance held it; removing it then stopped that instance."""
    try:
        return directory.open_file(name, os.O_RDWR | os.O_CREAT)
    except PermissionError as e:
        if e.errno != errno.EACCES:
            raise  # EPERM: an immutable file, which gc cannot remove either
        for flags in (os.O_RDONLY, os.O_WRONLY):
            with contextlib.suppress(OSError):
                return directory.open_file(name, flags)
        raise


def _listed_as_locked(directory: DirHandle, name: str) -> bool:
    """Whether ``<dir>/<name>`` is locked, as ``is_held`` tells it (False where it
    cannot be told): also where the lock table names the file by another device."""
    try:
        return is_held(directory, name, locked_inodes())
    except OSError:
        return False


class HeldLock:
    """A kernel lock on ``<dir>/<name>`` that this process holds. Use ``acquire``."""

    def __init__(
        self, directory: DirHandle, name: str, fd: int, file_id: tuple[int, int], key: _Key
    ) -> None:
        self.directory = directory
        self.name = name
        self.fd = fd
        self.dev, self.ino = file_id
        self.owner_pid = os.getpid()
        self._key = key
        # Taking the fd for release is one step: two threads releasing at once closed
        # it twice (EBADF, or another thread's file that reused the number).
        self._fd_mutex = ForkSafeRLock()
        # What this lock guards, kept alive while it is held (the table of held locks
        # keeps this one): a Lease dropped without release lost its socket to the
        # garbage collector and kept its lock, a port locked with nothing listening.
        self.guards: object = None

    @property
    def path(self) -> str:
        return os.path.join(self.directory.path, self.name)

    @classmethod
    def acquire(cls, directory: DirHandle, name: str) -> HeldLock:
        """Lock ``<dir>/<name>`` without waiting.

        Raises LockHeld if another lock holder has it, AlreadyHeldHere if this process
        does, StateDirError if the path is unusable (a symlink, a directory, ...).
        """
        key = (*directory.identity, name)
        with _held_mutex:
            if key in _held:
                raise AlreadyHeldHere(os.path.join(directory.path, name))
        for _ in range(_OPEN_RETRIES):
            try:
                fd = _open_lock_file(directory, name)
            except OSError as e:
                limit = out_of_descriptors(e)
                if limit is not None:
                    raise limit from e
                if isinstance(e, PermissionError) and _listed_as_locked(directory, name):
                    # Unopenable (chmod 000) but held: an instance's, not one to remove.
                    raise LockHeld(os.path.join(directory.path, name)) from e
                if _directory_refuses(directory, name, e):
                    # Not this file's fault, so "remove what is there" was wrong advice.
                    raise StateDirError(
                        directory.path,
                        f"cannot create or open files in it: {e.strerror or e} (make it "
                        "writable by you, or set PORTPOOL_HOME to a directory that is)",
                    ) from e
                kind = _special_kind(directory, name)
                raise StateDirError(
                    os.path.join(directory.path, name),
                    not_a_lock_file(kind)
                    if kind is not None
                    else f"cannot open lock file: {e.strerror or e} (remove what is there)",
                ) from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StateDirError(
                        os.path.join(directory.path, name), not_a_lock_file(file_kind(st.st_mode))
                    )
            except BaseException:
                os.close(fd)
                raise
            held = cls._lock_checked(directory, name, key, fd, (st.st_dev, st.st_ino))
            if held is not None:
                return held
        path = os.path.join(directory.path, name)
        raise LockError(f"{printable(path)} kept being replaced while locking; giving up")

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
        kind = lock_file_problem(now)
        if kind is not None:
            # Free, yet another name of the same file: whoever locks it by that name
            # would hold this one too (a held one is refused above like any other).
            os.close(fd)
            raise StateDirError(os.path.join(directory.path, name), not_a_lock_file(kind))
        held = cls(directory, name, fd, file_id, key)
        with _held_mutex:
            _held[key] = held
        return held

    def problem(
        self,
        check_kernel: bool = True,
        *,
        locked: Callable[[], LockTable | None] = locked_inodes,
    ) -> str | None:
        """None while the lock is still ours on the same file, else what went wrong.

        ``check_kernel`` also asks the kernel that the lock is still held: of our own
        fd where the OS says (``flock_held``), else in the table ``locked()`` gives (a
        shared ``locked_inodes()`` snapshot, read only when needed). Raises OSError if
        the lock file cannot be examined.
        """
        if self.fd < 0:
            return f"lock file {self.name} was released"
        now = self.directory.stat_entry(self.name)
        if now is None:
            return f"lock file {self.name} was deleted by another process"
        if (now.st_dev, now.st_ino) != (self.dev, self.ino):
            return f"lock file {self.name} was replaced by another file"
        if not check_kernel:
            return None
        held = flock_held(self.fd, self.dev, self.ino)
        if held is None:
            table = locked()
            held = table is None or _listed(self.directory, self.name, now, table)
        return None if held else f"lock file {self.name} is no longer locked by the kernel"

    @property
    def is_owner_process(self) -> bool:
        """True in the process that took the lock, False in a forked child."""
        return self.owner_pid == os.getpid()

    def _disown(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _forget(self) -> None:
        with _held_mutex:
            if _held.get(self._key) is self:
                del _held[self._key]

    def release(self) -> None:
        """Unlock and close. In a forked child this only closes the child's copy. Safe to
        call twice and from several threads at once. Raises nothing."""
        self._forget()
        self.guards = None
        with self._fd_mutex:
            fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if self.is_owner_process:
            with contextlib.suppress(OSError):  # closing below frees it anyway
                unlock(fd)
        os.close(fd)

    def remove_and_release(self) -> None:
        """Unlink the lock file while still holding it (rule 2), then release. Raises
        nothing: when the path cannot be examined the file is left and the lock released
        (an OSError here once left the lock held)."""
        try:
            ours = self.is_owner_process and self.problem(check_kernel=False) is None
        except OSError:
            ours = False
        if ours:
            with contextlib.suppress(OSError):
                self.directory.unlink(self.name)
        self.release()


def lock_file_problem(st: os.stat_result) -> str | None:
    """What the file ``st`` is ("a symbolic link", "a file with 2 hard links") when it
    cannot be a lock file portpool made, else None (a regular file of one name).

    A hard link made one lock two slots' (or two ports'): taking one showed the other
    as held by nobody ("instance 2 is starting (no record yet)") to every command.
    """
    if not stat.S_ISREG(st.st_mode):
        return file_kind(st.st_mode)
    if st.st_nlink > 1:
        return f"a file with {st.st_nlink} hard links"
    return None


def lock_path_kind(directory: DirHandle, name: str) -> str | None:
    """``lock_file_problem`` of ``<dir>/<name>`` (never followed), None if it is absent.
    Raises OSError if it cannot be examined."""
    st = directory.stat_entry(name)
    return None if st is None else lock_file_problem(st)


def _special_kind(directory: DirHandle, name: str) -> str | None:
    """``special_entry`` ("a symbolic link", which an open reported as "Too many levels
    of symbolic links"), None if it cannot be examined either."""
    with contextlib.suppress(OSError):
        return special_entry(directory, name)
    return None


def not_a_lock_file(kind: str) -> str:
    """Why a lock path holding ``kind`` ("a directory", "a symbolic link", ...) cannot be
    used: the problem of the ``StateDirError`` ``HeldLock.acquire`` raises."""
    follow = "" if kind.startswith("a file") else "; never followed"
    return f"is {kind}, not a lock file portpool made{follow} (remove it)"


def unusable_lock_path(path: str, kind: str) -> str:
    """``not_a_lock_file`` of ``path`` as acquire's error reads, for the commands that
    only look (doctor, status, stop): they worded it their own way ("1.lock is ...")."""
    return str(StateDirError(path, not_a_lock_file(kind)))


def lock_path_problem(directory: DirHandle, name: str) -> str | None:
    """``unusable_lock_path`` of ``<dir>/<name>`` (never followed) if it is not a lock
    file portpool made, else None. Raises OSError if it cannot be examined."""
    kind = lock_path_kind(directory, name)
    return None if kind is None else unusable_lock_path(os.path.join(directory.path, name), kind)


def _directory_refuses(directory: DirHandle, name: str, error: OSError) -> bool:
    """Whether opening ``<dir>/<name>`` failed because of the directory itself: a
    read-only file system, or no right to create the file there."""
    if error.errno == errno.EROFS:
        return True
    if error.errno not in (errno.EACCES, errno.EPERM):
        return False
    try:
        return directory.stat_entry(name) is None
    except OSError:
        return True  # not even searchable


def _listed(directory: DirHandle, name: str, st: os.stat_result, locked: LockTable) -> bool:
    """Whether the kernel's table lists a lock on the file ``st`` (``<dir>/<name>``).

    Device and inode both: the inode alone matched other filesystems' locks. When the
    table only lists the inode under another device (btrfs subvolumes and overlay mounts
    list the filesystem's device, not ``st_dev``), or may have missed it (locks kept
    changing while it was read), the file itself is asked.
    """
    listed = locked.holds(st.st_dev, st.st_ino)
    if listed is not None:
        return listed
    return _probe(directory, name)


def is_held(
    directory: DirHandle,
    name: str,
    locked: LockTable | Callable[[], LockTable | None] | None,
    *,
    holder: int | None = None,
    open_files: OpenFiles | None = None,
) -> bool:
    """Whether ``<dir>/<name>`` is locked right now, without disturbing its holder.

    ``holder``: the pid its record names, once that very process is known to run (pid,
    start token, boot id); where the OS confirms that process holds the lock
    (``open_files``, shared among the calls of one command), the kernel's whole table
    is not read (a read of it waits for an RCU grace period). ``locked`` is a
    ``locked_inodes()`` snapshot, or a function giving one (called only when needed);
    None means probe (an OS that does not list locks). Unknown is never "free". Raises
    OSError if the entry cannot be examined.
    """
    st = directory.stat_entry(name)
    if st is None:
        return False
    if holder is not None and _holds(directory, name, st, holder, open_files):
        return True
    if callable(locked):
        locked = locked()
    if locked is not None:
        return _listed(directory, name, st, locked)
    return _probe(directory, name)


def holds_lock(
    directory: DirHandle, name: str, pid: int, open_files: OpenFiles | None = None
) -> bool:
    """Whether the OS says process ``pid`` holds the flock of ``<dir>/<name>`` (False
    where it cannot tell, or there is no such file). Raises OSError if the entry cannot
    be examined."""
    st = directory.stat_entry(name)
    return st is not None and _holds(directory, name, st, pid, open_files)


def _holds(
    directory: DirHandle, name: str, st: os.stat_result, pid: int, open_files: OpenFiles | None
) -> bool:
    path = os.path.realpath(os.path.join(directory.path, name))
    return (open_files or OpenFiles()).holds_flock(pid, path, st.st_dev, st.st_ino)


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
