"""Pools and leases: try each port of a pool in order; lock it, then bind and listen.

The bound, listening socket is the reservation (rule 5): it is handed to the service,
so nothing can slip in between the check and the use. A port that is locked by
nobody but cannot be bound belongs to a foreign program: skip it, never fight it.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from portpool._platform import (
    exclusive_bind_options,
    is_alive,
    listeners,
    owners_of_inode,
    process_name,
    socket_inode,
)
from portpool.errors import (
    AlreadyHeldHere,
    LayoutError,
    LockHeld,
    PoolExhausted,
    PortPoolError,
    Refusal,
    ResourceLimit,
    StateDirError,
)
from portpool.lock import PortLock, PortRecord, PortStatus, out_of_descriptors
from portpool.statedir import StateDir

DEFAULT_BACKLOG = 128


@dataclass
class Lease:
    """A port acquired from a pool: its kernel lock, its listening socket, its record.

    Release it (or leave its ``with`` block) to close the socket, erase the record and
    unlock. ``socket`` is None once handed off with ``close_socket``. ``refusals`` says
    why the ports before this one in the pool were skipped.
    """

    port: int
    host: str
    socket: socket.socket | None
    lock: PortLock
    service: str = ""
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def record(self) -> PortRecord | None:
        return self.lock.record

    @property
    def socket_inode(self) -> int | None:
        return None if self.socket is None else socket_inode(self.socket)

    def fileno(self) -> int:
        if self.socket is None:
            raise PortPoolError(f"port {self.port}: the lease's socket was already closed")
        return self.socket.fileno()

    def close_socket(self) -> None:
        """Close our listening socket but keep the lock (another portpool user can't take
        the port; a foreign program could, which the shield reports)."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def heartbeat(self) -> None:
        self.lock.heartbeat()

    def release(self) -> None:
        """Close the socket, erase the record, unlock. Safe to call twice."""
        self.close_socket()
        self.lock.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease(service={self.service!r}, host={self.host!r}, port={self.port})"


@functools.lru_cache(maxsize=64)
def _family(host: str) -> tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]:
    """The address family and bind address of ``host`` (cached: parsing is per call cost)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        return family, (str(addr[0]), 0)
    if ip.version == 6:
        return socket.AF_INET6, (host, 0, 0, 0)
    return socket.AF_INET, (host, 0)


def bind_listen(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A socket bound to ``host:port`` and listening, exclusively. Raises OSError."""
    family, addr = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        exclusive_bind_options(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr[0], port, *addr[2:]))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def describe_foreign(port: int) -> str:
    """Name whoever listens on ``port``, as far as the OS tells."""
    found = listeners(port)
    if not found:
        return "used by a foreign process (unknown)"
    parts = []
    for listener in found:
        pids = [listener.pid] if listener.pid is not None else []
        if not pids and listener.inode:
            pids = owners_of_inode(listener.inode)
        if pids:
            names = ", ".join(f"pid {p} ({process_name(p) or '?'})" for p in pids)
            parts.append(f"{names} on {listener.address}")
        else:
            parts.append(f"unknown process on {listener.address}")
    return "used by a foreign process: " + "; ".join(parts)


def _bind_refusal(port: int, host: str, err: OSError) -> Refusal:
    if err.errno == errno.EADDRINUSE:
        return Refusal(port, "in use", describe_foreign(port))
    if err.errno in (errno.EACCES, errno.EPERM):
        return Refusal(port, "permission denied", f"binding {host}:{port}: {err.strerror}")
    if err.errno == errno.EADDRNOTAVAIL:
        return Refusal(port, "unavailable", f"{host} is not an address of this host")
    return Refusal(port, "error", f"binding {host}:{port}: {err.strerror or err}")


def _holder_detail(holder: object) -> str:
    if isinstance(holder, PortStatus) and not holder.is_free:
        return holder.describe()
    # Free by the time we looked: its holder released it between our try and our look.
    return "another process (released just now)"


def check_port(port: int, where: str = "pool") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise LayoutError(where, "port", f"{port!r} is not a port number in 1..65535")
    return port


# Waits (ms) before trying a port again whose holder looks like it is only passing.
_BUSY_WAITS_MS = (1, 2, 4, 8, 16, 32, 32)


def _only_passing(holder: object) -> bool:
    """Whether a busy port's holder is likely there only for a moment: the lock was
    free when we looked, or its record names no live process. ``gc`` holds a dead
    holder's lock while it removes the files, and pushed 4-11% of simultaneous starts
    off a free first port; a live recorded holder is refused at once."""
    if not isinstance(holder, PortStatus):
        return False
    if holder.is_free or holder.record is None:
        return True
    return not is_alive(holder.record.identity)


def _lock_port(state: StateDir, port: int) -> PortLock | Refusal:
    """The port's lock, or why not. A port held only for a moment (a cleaner, a holder
    leaving) is tried again a few times rather than skipped while really free."""
    for wait_ms in (*_BUSY_WAITS_MS, None):
        try:
            return PortLock.acquire(state, port)
        except LockHeld as e:
            if wait_ms is None or not _only_passing(e.holder):
                return Refusal(port, "held", _holder_detail(e.holder))
            time.sleep(wait_ms / 1000)
        except AlreadyHeldHere:
            return Refusal(port, "held", "by this process already")
        except ResourceLimit:
            raise  # out of descriptors: no other port of the pool would do better
        except PortPoolError as e:
            return Refusal(port, "error", str(e))
    raise AssertionError("unreachable")  # the loop always returns


def acquire(
    state: StateDir,
    pool: Sequence[int],
    *,
    host: str = "127.0.0.1",
    app: str = "",
    instance: int = 0,
    service: str = "",
    backlog: int = DEFAULT_BACKLOG,
) -> Lease:
    """Acquire the first port of ``pool`` that is neither locked nor bound by anyone.

    Returns a Lease holding the lock and the listening socket, its record written.
    Raises PoolExhausted with a Refusal per port when every port is refused, LayoutError
    for a value that is not a port, StateDirError if the record cannot be written.
    """
    for port in pool:
        check_port(port)
    refusals: list[Refusal] = []
    for port in pool:
        taken = _lock_port(state, port)
        if isinstance(taken, Refusal):
            refusals.append(taken)
            continue
        lock = taken
        try:
            sock = bind_listen(host, port, backlog)
        except OSError as e:
            lock.release()
            limit = out_of_descriptors(e)
            if limit is not None:
                raise limit from e
            refusals.append(_bind_refusal(port, host, e))
            continue
        except BaseException:
            lock.release()
            raise
        try:
            lock.write_record(app=app, instance=instance, service=service, host=host)
        except OSError as e:
            sock.close()
            lock.release()
            where = f"{state.path}/ports/{port}.json"
            raise StateDirError(where, f"cannot write metadata: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            lock.release()
            raise
        return Lease(port, host, sock, lock, service, refusals)
    raise PoolExhausted(pool, refusals, service or None)
