"""OS primitives, and the only place that knows which OS portpool runs on.

Everything above this package calls these names and never ``sys.platform``:

- ``DirHandle``: a directory opened without following symlinks, and file operations
  relative to it (``openat``-style on POSIX).
- ``try_lock`` / ``unlock``: a non-blocking exclusive lock on an open file
  (flock on POSIX, LockFileEx on Windows). A holder that dies frees it at once.
- ``locked_inodes``: which inodes hold a lock right now, read from the kernel
  where it tells (Linux ``/proc/locks``), else ``None``.
- ``ProcessIdentity``, ``current_identity``, ``identity_of``, ``is_alive``: pid + start
  token + boot id, so a reused pid never looks like the process that died.
- ``listeners``, ``socket_inode``, ``owners_of_inode``: who listens on a TCP port.
- ``exclusive_bind_options``: socket options that make a listening socket exclusive.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from portpool._platform._identity import (
    ProcessIdentity,
    boot_id,
    current_identity,
    identity_of,
    is_alive,
    process_name,
)
from portpool._platform._sysctl import ephemeral_port_range

if TYPE_CHECKING:
    from portpool._platform._net import (
        Listener,
        listeners,
        owners_of_inode,
        socket_inode,
    )

if sys.platform == "win32":
    from portpool._platform.windows import (
        DirHandle,
        exclusive_bind_options,
        in_terminal_foreground,
        locked_inodes,
        read_at,
        try_lock,
        unlock,
        user_id,
        write_at,
    )
else:
    from portpool._platform.posix import (
        DirHandle,
        exclusive_bind_options,
        in_terminal_foreground,
        locked_inodes,
        read_at,
        try_lock,
        unlock,
        user_id,
        write_at,
    )

_NET_NAMES = frozenset(("Listener", "listeners", "owners_of_inode", "socket_inode"))


def __getattr__(name: str) -> object:
    # The network readers load on first use: importing socket costs ~7 ms, and the
    # read-only commands (status, gc, layout) never touch a socket.
    if name in _NET_NAMES:
        from portpool._platform import _net

        value = getattr(_net, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DirHandle",
    "Listener",
    "ProcessIdentity",
    "boot_id",
    "current_identity",
    "ephemeral_port_range",
    "exclusive_bind_options",
    "identity_of",
    "in_terminal_foreground",
    "is_alive",
    "listeners",
    "locked_inodes",
    "owners_of_inode",
    "process_name",
    "read_at",
    "socket_inode",
    "try_lock",
    "unlock",
    "user_id",
    "write_at",
]
