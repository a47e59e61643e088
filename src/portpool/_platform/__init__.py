"""OS primitives, and the only place that knows which OS portpool runs on.

Everything above this package calls these names and never ``sys.platform``:

- ``DirHandle``: a directory opened without following symlinks, and file operations
  relative to it (``openat``-style on POSIX).
- ``try_lock`` / ``unlock``: a non-blocking exclusive lock on an open file
  (flock on POSIX, LockFileEx on Windows). A holder that dies frees it at once.
- ``locked_inodes``: a ``LockTable`` of the (device, inode) pairs that hold a lock right
  now, read from the kernel where it tells (Linux ``/proc/locks``), else ``None``.
- ``ProcessIdentity``, ``current_identity``, ``identity_of``, ``is_alive``: pid + start
  token + boot id, so a reused pid never looks like the process that died.
- ``listeners``, ``socket_inode``, ``owners_of_inode``: who listens on a TCP port.
- ``tcp_sockets``, ``TcpSocket``, ``owners_of_inodes``: every TCP socket on a port, in
  every state, with ``IPV6_V6ONLY`` where the kernel says it (sock_diag).
- ``default_state_dir``, ``posix_modes``: the per-user state dir, and whether POSIX
  modes (rather than ACLs) keep it private.
- ``open_files_limit``: the soft limit on open file descriptors, where there is one.
- ``exclusive_bind_options``: socket options that make a listening socket exclusive.
"""

from __future__ import annotations

import sys

from portpool._platform._identity import (
    ProcessIdentity,
    boot_id,
    current_identity,
    descends_from,
    identity_of,
    is_alive,
    process_name,
)
from portpool._platform._locks import LockTable
from portpool._platform._net import (
    Listener,
    ephemeral_port_range,
    listeners,
    owners_of_inode,
    socket_inode,
)
from portpool._platform._paths import default_state_dir, posix_modes
from portpool._platform._process import detached_options, signal_verified, stop_signals
from portpool._platform._sockdiag import TcpSocket, owners_of_inodes, tcp_sockets

if sys.platform == "win32":
    from portpool._platform.windows import (
        DirHandle,
        exclusive_bind_options,
        in_terminal_foreground,
        locked_inodes,
        open_files_limit,
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
        open_files_limit,
        read_at,
        try_lock,
        unlock,
        user_id,
        write_at,
    )

__all__ = [
    "DirHandle",
    "Listener",
    "LockTable",
    "ProcessIdentity",
    "TcpSocket",
    "boot_id",
    "current_identity",
    "default_state_dir",
    "descends_from",
    "detached_options",
    "ephemeral_port_range",
    "exclusive_bind_options",
    "identity_of",
    "in_terminal_foreground",
    "is_alive",
    "listeners",
    "locked_inodes",
    "open_files_limit",
    "owners_of_inode",
    "owners_of_inodes",
    "posix_modes",
    "process_name",
    "read_at",
    "signal_verified",
    "socket_inode",
    "stop_signals",
    "tcp_sockets",
    "try_lock",
    "unlock",
    "user_id",
    "write_at",
]
