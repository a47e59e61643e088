"""POSIX primitives: flock, directories opened by fd, never following symlinks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource  # here, not where used: that is when no descriptor is left to load it
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

from portpool._platform._locks import LockTable

assert sys.platform != "win32"

# O_NONBLOCK: a FIFO planted at one of our paths must not hang an open (regular files
# ignore it). O_CLOEXEC: programs we exec never inherit our lock or record fds.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def read_at(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset)


def write_at(fd: int, data: bytes, offset: int) -> int:
    return os.pwrite(fd, data, offset)


def user_id() -> int:
    return os.getuid()


def open_files_limit() -> int | None:
    """This process's soft limit on open file descriptors (``ulimit -n``), if any."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class DirHandle:
    """A directory held open by fd; every file operation is relative to it.

    Relative operations mean a directory swapped for a symlink after we opened it
    cannot redirect us elsewhere, and O_NOFOLLOW refuses symlinks planted at entries.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._identity: tuple[int, int] | None = None

    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode) of the directory; fixed for as long as the fd is open."""
        if self._identity is None:
            st = os.fstat(self.fd)
            self._identity = (st.st_dev, st.st_ino)
        return self._identity

    @classmethod
    def open_path(cls, path: str) -> DirHandle:
        """Open ``path`` as a directory; ELOOP/ENOTDIR if it is a symlink or not a dir."""
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW), path)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    def subdir(self, name: str, create: bool = True) -> DirHandle:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=self.fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=self.fd)
        return DirHandle(fd, os.path.join(self.path, name))

    def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open entry ``name``; a symlink there fails (ELOOP) instead of being followed."""
        return os.open(name, flags | _NOFOLLOW, mode, dir_fd=self.fd)

    def stat_entry(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def close(self) -> None:
        # Forgotten first: a close interrupted (Ctrl-C) and called again must never
        # close the number twice, by then maybe another file's.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if someone else holds it."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_entry(line: str) -> tuple[tuple[int, int], int] | None:
    """((device, inode), pid) of a flock in the kernel's lock listing format, else None:
    "1: FLOCK  ADVISORY  WRITE 2035 fe:00:2148717 0 EOF" ("->" marks a waiter). The
    device is hex major:minor (minor may exceed two digits on tmpfs)."""
    fields = line.split()
    if len(fields) < 6 or fields[1] != "FLOCK":
        return None
    parts = fields[5].split(":")
    if len(parts) != 3 or not fields[4].isascii() or not fields[4].isdigit():
        return None
    try:
        device = os.makedev(int(parts[0], 16), int(parts[1], 16))
        return (device, int(parts[2])), int(fields[4])
    except (ValueError, OverflowError):
        return None


# /proc/locks is served a page per read(), each page resuming the kernel's list by
# position: a lock released meanwhile ahead of that position shifted the rest back, and
# a lock held throughout went missing from the listing (1 read in 8 under lock churn,
# 1 in 6,000 beside the chaos harness; ``python -m benchmarks.torn_lock_reads``).
# Hence the overlap checked below.
_PAGE_READ = 1 << 20  # more than a page: the kernel returns one page per call anyway
_OVERLAP_RECORDS = 4
# Beside the chaos harness 1 read in 40 needed another, rarely more than 40 in a row.
_CONSISTENT_READ_S = 0.25


def _record_start(data: bytes, records: int) -> int:
    """Where the last ``records`` records of the listing ``data`` begin; a record is a
    lock's line and the lines of its waiters ("N: -> FLOCK ...")."""
    pos = len(data)
    while records and pos > 0:
        start = data.rfind(b"\n", 0, pos - 1) + 1
        if data[start:pos].split(None, 2)[1:2] != [b"->"]:
            records -= 1
        pos = start
    return pos


def _consistent_listing(fd: int, deadline: float) -> bytes | None:
    """The kernel's whole lock listing from the open ``/proc/locks`` ``fd``, or None when
    the list changed ahead of a page boundary while it was read (read it again), or when
    ``deadline`` (``time.monotonic()``) passed before the end: each page costs a walk from
    the start of the kernel's list, so a table of 5,000 locks took 150 ms (15 ms read
    plainly) and the cost grows with the square of its pages.

    Each page after the first is read from where the last few records read so far
    begin: reading at any offset but the one the last read ended at makes the kernel
    count its way there from the start of its list in one go, and those records come
    back the same (numbered by position) only if nothing ahead of them changed. Then
    every lock listed after them is in this page or a later one. (Only if each of those
    records had been replaced, at the same position, by another lock of the same
    process on the same file could a change go unseen.)
    """
    data = os.pread(fd, _PAGE_READ, 0)
    while data:
        start = _record_start(data, _OVERLAP_RECORDS)
        page = os.pread(fd, _PAGE_READ, start)
        if not page.startswith(data[start:]):
            return None
        if len(page) == len(data) - start:
            return data
        if time.monotonic() > deadline:
            return None
        data += page[len(data) - start :]
    return data


def _proc_locks() -> tuple[list[tuple[tuple[int, int], int]], bool]:
    """The flocks ``/proc/locks`` lists, and whether they are all that were held: False
    when no consistent read could be had within ``_CONSISTENT_READ_S`` (locks kept
    changing, or a table of many thousands of locks), and these come from one plain
    read.

    A consistent listing is read twice and the two are joined: the overlap check cannot
    see every change (``_consistent_listing``), and a listing that missed a lock held
    throughout said "free" of a held port (1 read in 300 under the test suite's churn,
    whose processes take the same locks in the same order again and again). A lock
    both listings miss is far rarer; one released between them reads held, never a
    held one free. The second read costs little: the first paid the RCU grace period.
    Raises OSError."""
    fd = os.open("/proc/locks", os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + _CONSISTENT_READ_S
        data = _consistent_listing(fd, deadline)
        while data is None and time.monotonic() < deadline:
            data = _consistent_listing(fd, deadline)
        complete = data is not None
        if data is None:
            os.lseek(fd, 0, os.SEEK_SET)
            data = b"".join(iter(lambda: os.read(fd, _PAGE_READ), b""))
        else:
            again = _consistent_listing(fd, time.monotonic() + _CONSISTENT_READ_S)
            data += b"\n" + (again or b"")
    finally:
        os.close(fd)
    lines = data.decode("ascii", errors="replace").splitlines()
    return [entry for entry in map(_lock_entry, lines) if entry is not None], complete


def _fdinfo_flocks(path: str) -> set[tuple[int, int]] | None:
    """(device, inode) of each flock the open file at ``path`` (an fdinfo file) holds;
    None if it cannot be read. Only granted locks are listed there, never waiters."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = set()
    for line in lines:
        if line.startswith("lock:"):
            entry = _lock_entry(line[len("lock:") :])
            if entry is not None:
                found.add(entry[0])
    return found


# Whether this kernel lists flock locks in /proc/<pid>/fdinfo (Linux 4.1+): learnt the
# first time a lock we hold shows there. Until then a missing line proves nothing.
_fdinfo_lists_locks = False


def flock_held(fd: int, device: int, inode: int) -> bool | None:
    """Whether ``fd`` holds the flock lock of the file (``device``, ``inode``) now, from
    this process's own ``/proc/self/fdinfo`` (Linux); None where that cannot tell
    (another OS, an older kernel, an fd we cannot read). The lock line names its file:
    an fd closed and reused for another locked file does not count.

    Why not ``locked_inodes()``: reading /proc/locks takes the kernel's file-lock rwsem
    for writing, which waits for an RCU grace period (10-30 ms of wall time per process
    on the machines measured) and holds up every flock() on the host meanwhile; this
    reads one small file and waits for nothing.
    """
    global _fdinfo_lists_locks
    if sys.platform != "linux":
        return None
    locks = _fdinfo_flocks(f"/proc/self/fdinfo/{fd}")
    if locks is None:
        return None
    if (device, inode) in locks:
        _fdinfo_lists_locks = True
        return True
    # Listed under another device (btrfs subvolumes, overlay mounts): cannot tell.
    if not _fdinfo_lists_locks or any(ino == inode for _, ino in locks):
        return None
    return False


# More open files than this in one process: not worth scanning, read the lock table.
_MAX_SCANNED_FDS = 4096


class OpenFiles:
    """Which files other processes have open, each process's fd table read once (the
    links in ``/proc/<pid>/fd``, Linux, our own user's processes), to ask whether one
    of them holds a file's flock (``holds_flock``) without reading the kernel's whole
    lock table. One per command: a process's table is not read again. The links are
    read, never followed: a process's file on a hung network mount cannot hang us."""

    def __init__(self) -> None:
        self._fds: dict[int, dict[str, list[str]]] = {}

    def _table(self, pid: int) -> dict[str, list[str]]:
        table = self._fds.get(pid)
        if table is None:
            table = {}
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                names = []  # gone, or another user's: nothing to confirm
            if len(names) > _MAX_SCANNED_FDS:
                names = []  # one read of the lock table is cheaper than this many links
            for name in names:
                try:
                    table.setdefault(os.readlink(f"/proc/{pid}/fd/{name}"), []).append(name)
                except OSError:
                    continue  # closed meanwhile
            self._fds[pid] = table
        return table

    def holds_flock(self, pid: int, path: str, device: int, inode: int) -> bool:
        """True when process ``pid`` holds the flock of the file at ``path`` (absolute,
        symlinks resolved), (``device``, ``inode``), as the lock line of one of its fds
        names it; False when that cannot be confirmed (not held, not readable, too many
        files, another OS): the caller then asks ``locked_inodes()``. Waits for no RCU
        grace period."""
        if sys.platform != "linux" or type(pid) is not int or pid <= 0:
            return False
        for name in self._table(pid).get(path, []):
            # The lock line names its file: an fd reused since the scan cannot mislead.
            if (device, inode) in (_fdinfo_flocks(f"/proc/{pid}/fdinfo/{name}") or ()):
                return True
        return False

    def holds_removed_flock(self, pid: int, path: str) -> bool:
        """True when process ``pid`` holds a flock of a file that was at ``path``
        (absolute, symlinks resolved) and was removed or replaced since: the kernel
        names such an fd's file ``<path> (deleted)``. False when that cannot be
        confirmed (not held, not readable, another OS)."""
        if sys.platform != "linux" or type(pid) is not int or pid <= 0:
            return False
        names = self._table(pid).get(f"{path} (deleted)", [])
        return any(_fdinfo_flocks(f"/proc/{pid}/fdinfo/{name}") for name in names)


def locked_inodes() -> LockTable | None:
    """(device, inode) -> pid for every flock held now, or None where the kernel won't tell.

    The pid is the process that took the lock (a forked child sharing it is not shown).
    Read-only: unlike probing with a lock of our own, it never makes a racer fail. A lock
    held throughout the read is listed (a table missing one said "free" of a held port,
    see ``_consistent_listing``), unless the table says it is not ``complete``.
    """
    if sys.platform != "linux":
        return None
    try:
        entries, complete = _proc_locks()
    except OSError:
        return None
    return LockTable(entries, complete=complete)


def exclusive_bind_options(sock: socket.socket) -> None:
    """Options for an owning socket. Never SO_REUSEPORT: it would let others share it.

    On Linux SO_REUSEADDR only lets us rebind over TIME_WAIT leftovers; it never lets a
    second socket listen on the same address. On BSD/macOS it would let a specific
    address bind over a wildcard listener, so it is left off there.
    """
    if sys.platform == "linux":
        import socket  # here, not at the top: the read-only commands never bind

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def in_terminal_foreground() -> bool:
    """True if we run in the foreground process group of our controlling terminal: a
    Ctrl-C there reaches our children directly, so forwarding it would deliver it twice.

    Asked of the terminal itself, not of fds 0-2: with all three redirected (``run --
    deploy.sh < /dev/null > log 2>&1``), the command was put in a group of its own, and
    stopped (SIGTTIN) for good when it read a password from /dev/tty."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False  # no controlling terminal (ENXIO), or it hung up
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def move_terminal_foreground(from_pgid: int, to_pgid: int) -> bool:
    """Make ``to_pgid`` the foreground process group of our controlling terminal if
    ``from_pgid`` is it now, as a shell hands the terminal to a job and takes it back;
    False if it was not (or there is no terminal). SIGTTOU is blocked for the call: a
    process not in the foreground group may then set it, as a shell does, instead of
    being stopped."""
    import signal

    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
    try:
        if os.tcgetpgrp(fd) != from_pgid:
            return False
        os.tcsetpgrp(fd, to_pgid)
        return True
    except OSError:
        return False  # hung up (EIO), or the group is gone (EPERM)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(fd)


def is_session_leader() -> bool:
    """Whether we lead our session (``ssh -t host portpool run``, ``tmux new '...'``): a
    terminal's hangup then reaches us alone, not our process group."""
    return os.getsid(0) == os.getpid()


def controlling_terminal_alive() -> bool:
    """Whether we have a controlling terminal that has not hung up (closed window,
    dropped ssh). Compare with the answer at start: after a hangup, opening it fails.

    A shell that gets a terminal's hangup passes SIGHUP on to its jobs as an ordinary
    signal from its own pid, so the sender cannot tell it from ``kill -HUP``; the
    terminal can.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False  # ENXIO: none (any more); EIO: hung up
    try:
        # Asked by an ioctl, not a read: a read from a background process group (`up &`,
        # or a job put in the background with Ctrl-Z, bg) stopped the whole group with
        # SIGTTIN. A hung-up terminal answers every ioctl with EIO.
        os.tcgetpgrp(fd)
    except OSError as e:
        return e.errno != errno.EIO  # EIO: the terminal hung up
    finally:
        os.close(fd)
    return True
