"""Windows primitives: LockFileEx, SO_EXCLUSIVEADDRUSE, path-based file access.

Type-checked with ``mypy --platform win32``; its tests skip elsewhere. Never
``os.kill(pid, 0)`` here: on Windows it terminates the process.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from portpool._platform._locks import LockTable

if sys.platform == "win32":
    import ctypes
    import msvcrt
    from ctypes import wintypes

    _LOCKFILE_FAIL_IMMEDIATELY = 0x1
    _LOCKFILE_EXCLUSIVE_LOCK = 0x2
    _ERROR_LOCK_VIOLATION = 33

    class _Overlapped(ctypes.Structure):
        _fields_ = [
            ("Internal", ctypes.c_void_p),
            ("InternalHigh", ctypes.c_void_p),
            ("Offset", wintypes.DWORD),
            ("OffsetHigh", wintypes.DWORD),
            ("hEvent", wintypes.HANDLE),
        ]

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _LockFileEx = _kernel32.LockFileEx
    _UnlockFileEx = _kernel32.UnlockFileEx

    _seek_mutex = threading.Lock()

    def read_at(fd: int, size: int, offset: int) -> bytes:
        with _seek_mutex:  # no pread on Windows: seek+read under a lock
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    def write_at(fd: int, data: bytes, offset: int) -> int:
        with _seek_mutex:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.write(fd, data)

    def user_id() -> int:
        return 0  # the state dir lives under the user's own %LOCALAPPDATA%

    class DirHandle:
        """A directory by path; entries are checked not to be reparse points (symlinks)."""

        def __init__(self, fd: int, path: str) -> None:
            self.fd = fd
            self.path = path

        @classmethod
        def open_path(cls, path: str) -> DirHandle:
            if os.path.islink(path):
                raise OSError(40, "is a symbolic link", path)
            if not os.path.isdir(path):
                raise NotADirectoryError(20, "not a directory", path)
            return cls(-1, path)

        @property
        def identity(self) -> tuple[int, int]:
            """(volume serial, file index) of the directory, read on each call: by path."""
            st = self.stat()
            return (st.st_dev, st.st_ino)

        def stat(self) -> os.stat_result:
            return os.stat(self.path, follow_symlinks=False)

        def chmod(self, mode: int) -> None:
            os.chmod(self.path, mode)

        def subdir(self, name: str, create: bool = True) -> DirHandle:
            full = os.path.join(self.path, name)
            if create:
                os.makedirs(full, 0o700, exist_ok=True)
            return DirHandle.open_path(full)

        def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
            full = os.path.join(self.path, name)
            if os.path.islink(full):
                raise OSError(40, "is a symbolic link", full)
            return os.open(full, flags | os.O_BINARY | os.O_NOINHERIT, mode)

        def stat_entry(self, name: str) -> os.stat_result | None:
            try:
                return os.stat(os.path.join(self.path, name), follow_symlinks=False)
            except FileNotFoundError:
                return None

        def unlink(self, name: str) -> None:
            os.unlink(os.path.join(self.path, name))

        def rename(self, src: str, dst: str) -> None:
            os.replace(os.path.join(self.path, src), os.path.join(self.path, dst))

        def listdir(self) -> list[str]:
            return os.listdir(self.path)

        def close(self) -> None:
            self.fd = -1

    def try_lock(fd: int) -> bool:
        handle = msvcrt.get_osfhandle(fd)
        overlapped = _Overlapped()
        ok = _LockFileEx(
            wintypes.HANDLE(handle),
            wintypes.DWORD(_LOCKFILE_EXCLUSIVE_LOCK | _LOCKFILE_FAIL_IMMEDIATELY),
            wintypes.DWORD(0),
            wintypes.DWORD(1),
            wintypes.DWORD(0),
            ctypes.byref(overlapped),
        )
        if ok:
            return True
        err = ctypes.get_last_error()
        if err == _ERROR_LOCK_VIOLATION:
            return False
        raise ctypes.WinError(err)

    def unlock(fd: int) -> None:
        handle = msvcrt.get_osfhandle(fd)
        overlapped = _Overlapped()
        if not _UnlockFileEx(
            wintypes.HANDLE(handle),
            wintypes.DWORD(0),
            wintypes.DWORD(1),
            wintypes.DWORD(0),
            ctypes.byref(overlapped),
        ):
            raise ctypes.WinError(ctypes.get_last_error())

    def open_files_limit() -> int | None:
        return None  # the C runtime's limit is not a user setting there

    def locked_inodes() -> LockTable | None:
        return None  # Windows does not list file locks; callers probe instead

    def flock_held(fd: int, device: int, inode: int) -> bool | None:
        return None  # no per-handle lock listing: callers ask locked_inodes or probe

    class OpenFiles:
        """Another process's open handles are not listed here: nothing is confirmed
        and callers probe."""

        def holds_flock(self, pid: int, path: str, device: int, inode: int) -> bool:
            return False

        def holds_removed_flock(self, pid: int, path: str) -> bool:
            return False  # a held file cannot be removed here

    def exclusive_bind_options(sock: socket.socket) -> None:
        # SO_EXCLUSIVEADDRUSE, never SO_REUSEADDR: on Windows the latter lets anyone steal.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)

    def in_terminal_foreground() -> bool:
        return False  # a console's Ctrl-C is not forwarded by portpool on Windows

    def move_terminal_foreground(from_pgid: int, to_pgid: int) -> bool:
        return False  # no process groups nor job control on Windows

    def is_session_leader() -> bool:
        return False  # no sessions nor SIGHUP on Windows

    def controlling_terminal_alive() -> bool:
        return False  # no SIGHUP on Windows: nothing to tell apart
