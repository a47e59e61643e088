"""Every TCP socket on a port, in every state, read from the kernel.

On Linux the kernel's sock_diag netlink interface dumps sockets with their state, local
and remote address, inode and uid, plus ``INET_DIAG_SKV6ONLY`` for IPv6 sockets that
listen or are only bound: whether a ``[::]`` socket also takes IPv4 is the kernel's
word, never a guess. The socket tables (``/proc/net/tcp*``) are the fallback (they do
not say ``IPV6_V6ONLY``, nor show sockets that are only bound). Elsewhere psutil is the
only portable way, and it names the pid itself.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator

from portpool._dataclass import dataclass

# Linux's TCP states (include/net/tcp_states.h), by number.
_STATES = {
    1: "established",
    2: "syn-sent",
    3: "syn-recv",
    4: "fin-wait-1",
    5: "fin-wait-2",
    6: "time-wait",
    7: "bound",  # TCP_CLOSE: in a dump, a socket that is only bound (6.5+ kernels)
    8: "close-wait",
    9: "last-ack",
    10: "listen",
    11: "closing",
    12: "new-syn-recv",
    13: "bound",  # TCP_BOUND_INACTIVE, the state number the request asks for
}
_ALL_STATES = 0xFFFFFFFF
_INET_DIAG_SKV6ONLY = 11

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then an inet_diag_sockid whose
# source port (network order; 0 = any) the kernel matches while it walks its tables.
_DIAG_REQUEST = struct.Struct("=BBBBI")
_DIAG_SOCKID = struct.Struct("!H46x")
# inet_diag_msg: family, state, timer, retrans, sport, dport, src, dst, if, cookie,
# expires, rqueue, wqueue, uid, inode.
_DIAG_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_RTATTR = struct.Struct("=HH")
_DIAG_TIMEOUT_S = 1.0
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_AF_NETLINK: int | None = getattr(socket, "AF_NETLINK", None)


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket as the kernel lists it.

    ``family`` is 4 or 6 (a v4-mapped IPv6 address is shown as IPv4, family 4);
    ``state`` is a name such as ``"listen"``, ``"established"``, ``"time-wait"``,
    ``"bound"``; ``v6only`` is known for IPv6 sockets that listen or are bound, where
    the kernel says it (sock_diag), else None; ``remote`` is ``"addr:port"`` once
    connected; ``pid`` only where the OS names it directly (psutil).
    """

    family: int
    address: str
    port: int
    state: str
    inode: int | None = None
    uid: int | None = None
    v6only: bool | None = None
    remote: str | None = None
    pid: int | None = None


def _address(family: int, raw: bytes) -> tuple[int, str]:
    if family == socket.AF_INET:
        return 4, socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _V4_MAPPED_PREFIX:
        return 4, socket.inet_ntop(socket.AF_INET, raw[12:16])
    return 6, socket.inet_ntop(socket.AF_INET6, raw[:16])


def _v6only(data: bytes, start: int, end: int) -> bool | None:
    """The INET_DIAG_SKV6ONLY attribute among the rtattrs in ``data[start:end]``."""
    while start + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, start)
        if length < _RTATTR.size:
            return None
        if kind == _INET_DIAG_SKV6ONLY and length >= _RTATTR.size + 1:
            return bool(data[start + _RTATTR.size])
        start += (length + 3) & ~3
    return None


def diag_messages(request: bytes) -> list[tuple[bytes, int, int]]:
    """Send one sock_diag dump ``request`` (an inet_diag_req_v2, with any filter) and
    return each answer message as (data, start of its body, its end). Raises OSError
    where there is no sock_diag (not Linux, an old kernel, a sandbox)."""
    if _AF_NETLINK is None:
        raise OSError("no netlink sockets here")
    nl = socket.socket(_AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    try:
        nl.settimeout(_DIAG_TIMEOUT_S)  # bounds the loop below: a silent kernel raises
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
        )
        nl.sendto(header + request, (0, 0))
        found: list[tuple[bytes, int, int]] = []
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
                    found.append((data, body, offset + length))
                offset += (length + 3) & ~3
    finally:
        nl.close()


def diag_dump(
    family: socket.AddressFamily, states: int = _ALL_STATES, port: int = 0
) -> list[TcpSocket]:
    """TCP sockets of ``family`` in ``states`` (a TCPF_* mask) on local ``port`` (0:
    any), from the kernel's sock_diag. Raises OSError where there is none (not Linux,
    an old kernel, a sandbox). The kernel skips other ports itself: a whole-host dump
    to find one port cost ~50 ms on a host with 5,000 sockets, instead of ~1 ms."""
    request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, states)
    request += _DIAG_SOCKID.pack(port)
    return [_parse_message(family, data, body, end) for data, body, end in diag_messages(request)]


def _parse_message(family: int, data: bytes, body: int, end: int) -> TcpSocket:
    fields = _DIAG_MESSAGE.unpack_from(data, body)
    fam, address = _address(family, fields[6])
    state = _STATES.get(fields[1], f"state-{fields[1]}")
    remote = None
    if state not in ("listen", "bound"):
        rfam, raddr = _address(family, fields[7])
        rport = int.from_bytes(fields[5], "big")
        remote = f"[{raddr}]:{rport}" if rfam == 6 else f"{raddr}:{rport}"
    v6only = None
    if family == socket.AF_INET6 and fam == 6:
        v6only = _v6only(data, body + _DIAG_MESSAGE.size, end)
    inode = fields[14] or None  # TIME_WAIT sockets have no inode
    uid = fields[13] if state != "time-wait" else None
    return TcpSocket(
        fam, address, int.from_bytes(fields[4], "big"), state, inode, uid, v6only, remote
    )


def _decode_v4(hex_addr: str) -> str:
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_addr)[::-1])


def _decode_v6(hex_addr: str) -> tuple[int, str]:
    raw = bytes.fromhex(hex_addr)
    # The kernel prints the address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return _address(socket.AF_INET6, words)


def proc_net_rows(table: str) -> Iterator[list[str]]:
    """The fields of each socket line of ``table`` (/proc/net/tcp or tcp6): ``sl``,
    ``local_address``, ``rem_address``, ``st``, ..., ``inode`` at index 9. Raises
    OSError (FileNotFoundError: no such table, e.g. no IPv6 in this kernel)."""
    with open(table, encoding="ascii") as f:
        next(f, None)  # the header
        for line in f:
            fields = line.split()
            if len(fields) >= 10:
                yield fields


def _proc_net(port: int | None) -> list[TcpSocket]:
    found: list[TcpSocket] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for fields in proc_net_rows(table):
                addr_hex, _, port_hex = fields[1].partition(":")
                local_port = int(port_hex, 16)
                if port is not None and local_port != port:
                    continue
                if table.endswith("6"):
                    fam, address = _decode_v6(addr_hex)
                else:
                    fam, address = 4, _decode_v4(addr_hex)
                state = _STATES.get(int(fields[3], 16), fields[3])
                found.append(TcpSocket(fam, address, local_port, state, int(fields[9]) or None))
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return found


def _psutil_sockets(port: int | None) -> list[TcpSocket]:
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    found: list[TcpSocket] = []
    for c in conns:
        if not c.laddr or (port is not None and c.laddr.port != port):
            continue
        family = 6 if c.family == socket.AF_INET6 and ":" in c.laddr.ip else 4
        remote = None
        if c.raddr:  # written as the Linux reader writes it, an IPv6 address in brackets
            ip = c.raddr.ip
            remote = f"[{ip}]:{c.raddr.port}" if ":" in ip else f"{ip}:{c.raddr.port}"
        state = str(c.status).lower().replace("_", "-")
        found.append(
            TcpSocket(family, c.laddr.ip, c.laddr.port, state, None, None, None, remote, c.pid)
        )
    return found


def tcp_sockets(port: int | None = None, *, listening_only: bool = False) -> list[TcpSocket]:
    """Every TCP socket whose local port is ``port`` (any port when None), in every
    state, or only those listening. Never raises: where the OS tells nothing, it is []."""
    if sys.platform == "linux":
        states = 1 << 10 if listening_only else _ALL_STATES
        try:
            wanted = port or 0
            found = diag_dump(socket.AF_INET, states, wanted) + diag_dump(
                socket.AF_INET6, states, wanted
            )
        except (OSError, struct.error):
            found = _proc_net(port)  # no sock_diag (old kernel, sandbox)
    else:
        found = _psutil_sockets(port)
    return [
        s
        for s in found
        if (port is None or s.port == port) and (not listening_only or s.state == "listen")
    ]


def owners_of_inodes(inodes: Iterable[int]) -> dict[int, list[int]]:
    """inode -> pids of the processes that have that socket open (Linux; one /proc scan
    for all of them). Sockets of processes we may not inspect are simply missing."""
    return SocketOwners()(inodes)


class SocketOwners:
    """``owners_of_inodes`` for the diagnoses of many ports (one ``acquire`` of a pool,
    one ``doctor``): every process's sockets scanned once, and once more when a socket
    is not found (opened since), never again. Scanned per refused port, a 2,000-port
    pool a foreign program held took 10 s to refuse (7 M readlink calls)."""

    def __init__(self) -> None:
        self._owners: dict[int, list[int]] | None = None
        self._rescanned = False

    def __call__(self, inodes: Iterable[int]) -> dict[int, list[int]]:
        """inode -> pids, as ``owners_of_inodes``. Raises nothing."""
        wanted = set(inodes)
        if sys.platform != "linux" or not wanted:
            return {}
        if self._owners is None or (not self._rescanned and not wanted <= self._owners.keys()):
            self._rescanned = self._owners is not None
            self._owners = {}
            for inode, pid in _socket_descriptors():
                if pid not in self._owners.setdefault(inode, []):
                    self._owners[inode].append(pid)
        return {i: self._owners[i] for i in wanted if i in self._owners}


def _socket_descriptors() -> Iterator[tuple[int, int]]:
    """(socket inode, pid) for every socket descriptor of every process we may inspect
    (Linux's /proc). Raises nothing."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fd_dir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        pid = int(entry.name)
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                yield int(target[8:-1]), pid
