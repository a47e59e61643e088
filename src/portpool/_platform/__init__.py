"""OS primitives, and the only place that knows which OS portpool runs on.

Everything above this package calls these names and never ``sys.platform``:

- ``DirHandle``: a directory opened without following symlinks, and file operations
  relative to it (``openat``-style on POSIX).
- ``try_lock`` / ``unlock``: a non-blocking exclusive lock on an open file
  (flock on POSIX, LockFileEx on Windows). A holder that dies frees it at once.
- ``locked_inodes``: a ``LockTable`` of the (device, inode) pairs that hold a lock right
  now, read from the kernel where it tells (Linux ``/proc/locks``), else ``None``.
  ``flock_held`` (one of our own fds) and ``OpenFiles.holds_flock`` (a given process)
  say whether a lock is held from fdinfo (Linux), which waits for no RCU grace period
  as reading /proc/locks does.
- ``ProcessIdentity``, ``current_identity``, ``identity_of``, ``is_alive``: pid + start
  token + boot id, so a reused pid never looks like the process that died.
- ``listeners``, ``socket_inode``, ``owners_of_inode``: who listens on a TCP port;
  ``is_listening``: whether a socket is in listen state.
- ``tcp_sockets``, ``TcpSocket``, ``owners_of_inodes``: every TCP socket on a port, in
  every state, with ``IPV6_V6ONLY`` where the kernel says it (sock_diag).
- ``default_state_dir``, ``posix_modes``: the per-user state dir, and whether POSIX
  modes (rather than ACLs) keep it private.
- ``open_files_limit``: the soft limit on open file descriptors, where there is one.
- ``exclusive_bind_options``: socket options that make a listening socket exclusive.
- ``become_subreaper``, ``is_subreaper``, ``signal_group``, ``process_group``, ``reap_adopted``,
  ``has_children``, ``SignalInbox``: what ``run``/``up`` need to stop whole process
  trees and to read signals with their sender (``_process``); ``stopped_by`` and
  ``move_terminal_foreground``: job control of ``run ... &`` in a terminal.
- ``signal_verified``, ``detached_options``: signal a process only once it is pinned and
  checked (pidfd), and start one outside our session (``_control``, for ``stop`` and
  ``up --detach``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from portpool._platform._identity import (
    ProcessIdentity,
    ancestors,
    boot_id,
    current_identity,
    descends_from,
    environment_of,
    identity_of,
    is_alive,
    namespace_pids,
    ours_since,
    process_name,
    process_tree,
)
from portpool._platform._locks import LockTable
from portpool._platform._paths import default_state_dir, posix_modes
from portpool._platform._sysctl import ephemeral_port_range

if TYPE_CHECKING:
    from portpool._platform._acceptq import accept_queue_length, connection_accepted
    from portpool._platform._control import (
        detached_options,
        server_stop_signals,
        signal_verified,
    )
    from portpool._platform._net import (
        Listener,
        is_listening,
        listeners,
        owners_of_inode,
        socket_inode,
    )
    from portpool._platform._process import (
        GroupWitness,
        ReceivedSignal,
        SignalInbox,
        become_subreaper,
        enlarge_pipe,
        has_children,
        ignored_by_default,
        is_subreaper,
        open_fds,
        parent_death_setter,
        passed_signals,
        process_group,
        reap_adopted,
        resume_stopped,
        signal_group,
        stop_signals,
        stopped_by,
    )
    from portpool._platform._sockdiag import (
        SocketOwners,
        TcpSocket,
        owners_of_inodes,
        tcp_sockets,
    )

if sys.platform == "win32":
    from portpool._platform.windows import (
        DirHandle,
        OpenFiles,
        controlling_terminal_alive,
        exclusive_bind_options,
        flock_held,
        in_terminal_foreground,
        is_session_leader,
        locked_inodes,
        move_terminal_foreground,
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
        OpenFiles,
        controlling_terminal_alive,
        exclusive_bind_options,
        flock_held,
        in_terminal_foreground,
        is_session_leader,
        locked_inodes,
        move_terminal_foreground,
        open_files_limit,
        read_at,
        try_lock,
        unlock,
        user_id,
        write_at,
    )

# Loaded on first use: importing socket costs ~7 ms (subprocess more), and the read-only
# commands (status, gc, layout) never touch a socket or start a process.
_LAZY = {
    **dict.fromkeys(
        ("Listener", "is_listening", "listeners", "owners_of_inode", "socket_inode"), "_net"
    ),
    **dict.fromkeys(("SocketOwners", "TcpSocket", "owners_of_inodes", "tcp_sockets"), "_sockdiag"),
    **dict.fromkeys(("detached_options", "server_stop_signals", "signal_verified"), "_control"),
    **dict.fromkeys(("accept_queue_length", "connection_accepted"), "_acceptq"),
    **dict.fromkeys(
        (
            "GroupWitness",
            "ReceivedSignal",
            "SignalInbox",
            "become_subreaper",
            "enlarge_pipe",
            "has_children",
            "ignored_by_default",
            "is_subreaper",
            "open_fds",
            "parent_death_setter",
            "passed_signals",
            "process_group",
            "reap_adopted",
            "resume_stopped",
            "signal_group",
            "stop_signals",
            "stopped_by",
        ),
        "_process",
    ),
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(f"portpool._platform.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DirHandle",
    "GroupWitness",
    "Listener",
    "LockTable",
    "OpenFiles",
    "ProcessIdentity",
    "ReceivedSignal",
    "SignalInbox",
    "SocketOwners",
    "TcpSocket",
    "accept_queue_length",
    "ancestors",
    "become_subreaper",
    "boot_id",
    "connection_accepted",
    "controlling_terminal_alive",
    "current_identity",
    "default_state_dir",
    "descends_from",
    "detached_options",
    "enlarge_pipe",
    "environment_of",
    "ephemeral_port_range",
    "exclusive_bind_options",
    "flock_held",
    "has_children",
    "identity_of",
    "ignored_by_default",
    "in_terminal_foreground",
    "is_alive",
    "is_listening",
    "is_session_leader",
    "is_subreaper",
    "listeners",
    "locked_inodes",
    "move_terminal_foreground",
    "namespace_pids",
    "open_fds",
    "open_files_limit",
    "ours_since",
    "owners_of_inode",
    "owners_of_inodes",
    "parent_death_setter",
    "passed_signals",
    "posix_modes",
    "process_group",
    "process_name",
    "process_tree",
    "read_at",
    "reap_adopted",
    "resume_stopped",
    "server_stop_signals",
    "signal_group",
    "signal_verified",
    "socket_inode",
    "stop_signals",
    "stopped_by",
    "tcp_sockets",
    "try_lock",
    "unlock",
    "user_id",
    "write_at",
]
