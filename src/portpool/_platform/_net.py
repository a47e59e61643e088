"""Who listens on a TCP port, read from the kernel.

On Linux the kernel's sock_diag netlink interface dumps every listening socket with its
inode in ~0.1 ms, so the shield can ask every second; the socket tables
(``/proc/net/tcp``, ``/proc/net/tcp6``) are the fallback. Mapping an inode to a pid
scans ``/proc/*/fd`` and is done only to name a foreign holder. Elsewhere psutil is the
only portable way.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass

_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: its local address, and what is known of its owner."""

    address: str
    port: int
    inode: int | None = None
    pid: int | None = None


def _decode_v4(hex_addr: str) -> str:
    return str(ipaddress.IPv4Address(bytes.fromhex(hex_addr)[::-1]))


def _decode_v6(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # The kernel prints the address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


# Linux sock_diag (netlink): the kernel dumps only listening sockets, ~0.1 ms. Reading
# /proc/net/tcp walks the whole connection hash instead, and costs ~5 ms per table on a
# host with a large hash: 50 times the shield's budget.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_TCPF_LISTEN = 1 << 10
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_DIAG_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, sport, dport, src, dst, if, cookie,
# expires, rqueue, wqueue, uid, inode.
_DIAG_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_DIAG_TIMEOUT_S = 1.0


_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_AF_NETLINK: int | None = getattr(socket, "AF_NETLINK", None)


def _diag_listeners(family: socket.AddressFamily) -> list[Listener]:
    """Listening TCP sockets of ``family`` from the kernel's sock_diag. Raises OSError."""
    if _AF_NETLINK is None:
        raise OSError("no netlink sockets here")
    nl = socket.socket(_AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    try:
        nl.settimeout(_DIAG_TIMEOUT_S)  # bounds the loop below: a silent kernel raises
        request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN)
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
        )
        nl.sendto(header + request, (0, 0))
        width = 4 if family == socket.AF_INET else 16
        found: list[Listener] = []
        while True:
            data = nl.recv(1 << 16)
            if not data:
                raise OSError("sock_diag: empty answer")
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
                if length < _NLMSG_HEADER.size:
                    raise OSError("sock_diag: malformed answer")
                body = offset + _NLMSG_HEADER.size
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, body)
                    raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
                if length >= _NLMSG_HEADER.size + _DIAG_MESSAGE.size:
                    fields = _DIAG_MESSAGE.unpack_from(data, body)
                    raw = fields[6][:width]
                    if raw[:12] == _V4_MAPPED_PREFIX:
                        address = socket.inet_ntop(socket.AF_INET, raw[12:])
                    else:
                        address = socket.inet_ntop(family, raw)
                    found.append(Listener(address, int.from_bytes(fields[4], "big"), fields[14]))
                offset += (length + 3) & ~3
    finally:
        nl.close()


def _linux_listeners(port: int | None) -> list[Listener]:
    try:
        found = _diag_listeners(socket.AF_INET) + _diag_listeners(socket.AF_INET6)
    except (OSError, struct.error):
        return _proc_net_listeners(port)  # no sock_diag (old kernel, sandbox)
    return found if port is None else [x for x in found if x.port == port]


def _proc_net_listeners(port: int | None) -> list[Listener]:
    found: list[Listener] = []
    for table, decode in (("/proc/net/tcp", _decode_v4), ("/proc/net/tcp6", _decode_v6)):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                        continue
                    addr_hex, _, port_hex = fields[1].partition(":")
                    local_port = int(port_hex, 16)
                    if port is not None and local_port != port:
                        continue
                    found.append(Listener(decode(addr_hex), local_port, int(fields[9])))
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return found


def _psutil_listeners(port: int | None) -> list[Listener]:
    import psutil

    found: list[Listener] = []
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return found
    for c in conns:
        if c.status != psutil.CONN_LISTEN or not c.laddr:
            continue
        if port is not None and c.laddr.port != port:
            continue
        found.append(Listener(c.laddr.ip, c.laddr.port, None, c.pid))
    return found


def listeners(port: int | None = None) -> list[Listener]:
    """Every socket listening on TCP ``port`` (or on any port when None)."""
    if sys.platform == "linux":
        return _linux_listeners(port)
    return _psutil_listeners(port)


def socket_inode(sock: socket.socket) -> int | None:
    """The inode that names ``sock`` in the kernel's tables, where the OS has one."""
    if sys.platform != "linux":
        return None
    try:
        return os.fstat(sock.fileno()).st_ino
    except OSError:
        return None


def owners_of_inode(inode: int) -> list[int]:
    """Pids of the processes that have socket ``inode`` open (Linux; scans /proc)."""
    if sys.platform != "linux":
        return []
    target = f"socket:[{inode}]"
    pids: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fd_dir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return pids
