"""Who listens on a TCP port, read from the kernel.

``listeners`` is the listening subset of ``_sockdiag.tcp_sockets`` (sock_diag on Linux,
~0.1 ms, so the shield can ask every second; the socket tables as the fallback; psutil
elsewhere), with ``IPV6_V6ONLY`` where the kernel says it. Mapping an inode to a pid
scans ``/proc/*/fd`` and is done only to name a foreign holder.
"""

from __future__ import annotations

import os
import socket
import sys

from portpool._dataclass import dataclass
from portpool._platform._sockdiag import _proc_net, owners_of_inodes, tcp_sockets


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: its local address, and what is known of its owner.

    ``v6only`` says whether an IPv6 socket takes IPv6 traffic only (None: the OS did
    not say, or an IPv4 socket).
    """

    address: str
    port: int
    inode: int | None = None
    pid: int | None = None
    v6only: bool | None = None


def listeners(port: int | None = None) -> list[Listener]:
    """Every socket listening on TCP ``port`` (or on any port when None)."""
    return [
        Listener(s.address, s.port, s.inode, s.pid, s.v6only)
        for s in tcp_sockets(port, listening_only=True)
    ]


def _proc_net_listeners(port: int | None) -> list[Listener]:
    """Listeners read from the socket tables (the fallback; kept for the benchmark)."""
    return [Listener(s.address, s.port, s.inode) for s in _proc_net(port) if s.state == "listen"]


def socket_inode(sock: socket.socket) -> int | None:
    """The inode that names ``sock`` in the kernel's tables, where the OS has one."""
    if sys.platform != "linux":
        return None
    try:
        return os.fstat(sock.fileno()).st_ino
    except OSError:
        return None


def is_listening(sock: socket.socket) -> bool | None:
    """Whether ``sock`` is in listen state (``SO_ACCEPTCONN``); None where the OS does not
    say (Windows' Python, older macOS). A holder of a passed listening socket that shuts
    it down stops it listening for every holder. Raises OSError (a closed socket)."""
    accepting = getattr(socket, "SO_ACCEPTCONN", None)
    if accepting is None:
        return None
    return bool(sock.getsockopt(socket.SOL_SOCKET, accepting))


def owners_of_inode(inode: int) -> list[int]:
    """Pids of the processes that have socket ``inode`` open (Linux; scans /proc)."""
    return owners_of_inodes([inode]).get(inode, [])
