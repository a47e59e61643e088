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
- ``become_subreaper``, ``signal_group``, ``process_group``, ``reap_adopted``,
  ``SignalInbox``: what ``run``/``up`` need to stop whole process trees and to read
  signals with their sender (``_process``).
"""

from __future__ import annotations

import sys

from portpool._platform._acceptq import accept_queue_length, connection_accepted
from portpool._platform._identity import (
    ProcessIdentity,
    boot_id,
    current_identity,
    identity_of,
    is_alive,
    process_name,
)
from portpool._platform._net import (
    Listener,
    ephemeral_port_range,
    listeners,
    owners_of_inode,
    socket_inode,
)
from portpool._platform._process import (
    ReceivedSignal,
    SignalInbox,
    become_subreaper,
    enlarge_pipe,
    process_group,
    reap_adopted,
    signal_group,
    stop_signals,
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

__all__ = [
    "DirHandle",
    "Listener",
    "ProcessIdentity",
    "ReceivedSignal",
    "SignalInbox",
    "accept_queue_length",
    "become_subreaper",
    "boot_id",
    "connection_accepted",
    "current_identity",
    "enlarge_pipe",
    "ephemeral_port_range",
    "exclusive_bind_options",
    "identity_of",
    "in_terminal_foreground",
    "is_alive",
    "listeners",
    "locked_inodes",
    "owners_of_inode",
    "process_group",
    "process_name",
    "read_at",
    "reap_adopted",
    "signal_group",
    "socket_inode",
    "stop_signals",
    "try_lock",
    "unlock",
    "user_id",
    "write_at",
]
