"""A listening socket's accept queue, read from the kernel: its length, and whether one
connection has left it.

For a socket that was bound and put in listen state before its service started, the
kernel completes handshakes on its own, so a successful connect proves nothing about
the service; a connection leaving the accept queue proves the service called accept().
On Linux, sock_diag reports a listener's queue length as ``idiag_rqueue``; the socket
table ``/proc/net/tcp`` (its ``rx_queue`` column) is the fallback. Elsewhere: None.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

from portpool._platform._sockdiag import (
    _AF_NETLINK,
    _DIAG_MESSAGE,
    _DIAG_TIMEOUT_S,
    _NETLINK_SOCK_DIAG,
    _NLMSG_ERROR,
    _NLMSG_HEADER,
    _SOCK_DIAG_BY_FAMILY,
    diag_messages,
    proc_net_rows,
)

__all__ = ["accept_queue_length", "connection_accepted"]

# inet_diag_req_v2 with the source port set: the kernel then dumps only that port's
# listeners instead of every one on the host.
_PORT_REQUEST = struct.Struct("=BBBBI")
_PORT_FILTER = struct.Struct("!H46x")
_STATE_FIELD = 1
_RQUEUE_FIELD = 11
_INODE_FIELD = 14
_TCPF_LISTEN = 1 << 10  # the state mask bit of TCP_LISTEN
# What a connection in the accept queue can be in: ESTABLISHED, SYN_RECV, CLOSE_WAIT (the
# client closed), NEW_SYN_RECV. A server side in any other state was accepted and closed.
_QUEUED_STATES = frozenset({1, 3, 8, 12})


def _diag_rqueue(family: int, port: int, inode: int) -> int | None:
    """``idiag_rqueue`` of listener ``inode`` on ``port``, or None if it is not listed.
    Raises OSError when sock_diag is not available."""
    request = _PORT_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN)
    request += _PORT_FILTER.pack(port)
    found: int | None = None
    for data, body, _ in diag_messages(request):
        fields = _DIAG_MESSAGE.unpack_from(data, body)
        if fields[_INODE_FIELD] == inode:
            found = int(fields[_RQUEUE_FIELD])
    return found


def _proc_rqueue(family: int, inode: int) -> int | None:
    """The ``rx_queue`` column of listener ``inode`` in /proc/net/tcp(6), or None."""
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    try:
        with open(table, encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 10 and fields[9] == str(inode):
                    return int(fields[4].partition(":")[2], 16)
    except (OSError, ValueError):
        return None
    return None


def accept_queue_length(sock: socket.socket) -> int | None:
    """Connections in listening ``sock``'s accept queue (handshake done, not yet
    accepted), or None where the OS does not say (not Linux, or ``sock`` not listening).
    """
    if sys.platform != "linux":
        return None
    try:
        inode = os.fstat(sock.fileno()).st_ino
        port = sock.getsockname()[1]
    except OSError:
        return None
    try:
        return _diag_rqueue(sock.family, port, inode)
    except (OSError, struct.error):
        return _proc_rqueue(sock.family, inode)  # no sock_diag (old kernel, sandbox)


# inet_diag_sockid for one connection (ports and addresses in network order), and the
# "no cookie" value that makes the kernel look the socket up by its addresses.
_EXACT_ID = struct.Struct("!HH16s16s")
_NO_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)
_NLM_F_REQUEST = 0x1
_ENOENT = 2


def _packed(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address).ljust(16, b"\0")


def _diag_connection(
    family: int, local: tuple[str, int], remote: tuple[str, int]
) -> tuple[int, int] | None:
    """(TCP state, inode) of the TCP socket ``local`` <- ``remote``; None when there is
    none. Raises OSError when sock_diag cannot answer."""
    if _AF_NETLINK is None:
        raise OSError("no netlink sockets here")
    nl = socket.socket(_AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    try:
        nl.settimeout(_DIAG_TIMEOUT_S)
        sockid = _EXACT_ID.pack(
            local[1], remote[1], _packed(family, local[0]), _packed(family, remote[0])
        )
        request = _PORT_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
        request += sockid + struct.pack("=I", 0) + _NO_COOKIE
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
        )
        nl.sendto(header + request, (0, 0))
        data = nl.recv(1 << 16)
        length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, 0)
        body = _NLMSG_HEADER.size
        if kind == _NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, body)
            if -error == _ENOENT:
                return None
            raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
        if length < _NLMSG_HEADER.size + _DIAG_MESSAGE.size:
            raise OSError("sock_diag: malformed answer")
        fields = _DIAG_MESSAGE.unpack_from(data, body)
        return int(fields[_STATE_FIELD]), int(fields[_INODE_FIELD])
    finally:
        nl.close()


def _raw_v4(hex_addr: str) -> bytes:
    return bytes.fromhex(hex_addr)[::-1]  # printed as one host-order 32-bit word


def _raw_v6(hex_addr: str) -> bytes:
    raw = bytes.fromhex(hex_addr)  # printed as four host-order 32-bit words
    return b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))


def _proc_connection(
    family: int, local: tuple[str, int], remote: tuple[str, int]
) -> tuple[int, int] | None:
    """The same from /proc/net/tcp(6): the state and inode columns of the matching line."""
    table, decode = (
        ("/proc/net/tcp6", _raw_v6) if family == socket.AF_INET6 else ("/proc/net/tcp", _raw_v4)
    )
    want_local = (socket.inet_pton(family, local[0]), local[1])
    want_remote = (socket.inet_pton(family, remote[0]), remote[1])
    for fields in proc_net_rows(table):
        found = []
        for column in (fields[1], fields[2]):
            addr_hex, _, port_hex = column.partition(":")
            found.append((decode(addr_hex), int(port_hex, 16)))
        if found == [want_local, want_remote]:
            return int(fields[3], 16), int(fields[9])
    return None


def connection_accepted(
    family: int, local: tuple[str, int], remote: tuple[str, int]
) -> bool | None:
    """Whether the server side (``local``) of our connection from ``remote`` has left
    its listener's accept queue: a queued connection has no file yet (inode 0) and is
    established, or half closed by us; an accepted one has a file; one accepted and
    closed is gone, or lingers without a file in a closing state (TIME_WAIT when the
    service closed first: a fast service was taken for one that never accepted, until
    the probe's timeout). None where the OS does not say (not Linux)."""
    if sys.platform != "linux":
        return None
    try:
        try:
            found = _diag_connection(family, local, remote)
        except (OSError, struct.error):
            found = _proc_connection(family, local, remote)  # no sock_diag (old kernel, sandbox)
    except (OSError, ValueError):
        return None
    if found is None:
        return True
    state, inode = found
    return inode != 0 or state not in _QUEUED_STATES
