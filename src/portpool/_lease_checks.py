"""What one shield check asks of one lease: is its lock, its socket, its port still ours.

Per lease:

1. lock: our fd still holds the kernel lock and the path still names that file, and the
   record at the path still names our pid and start token (``PortLock.problem``);
2. port: our socket is still open, bound to our address and listening (put back in
   listen state when a process holding it shut it down), and no other
   process listens on that port where it can receive traffic meant for the lease: on
   any address the lease covers (both loopbacks for ``localhost``), by the one rule of
   ``_addresses.meets`` (so another user's ``[::]`` socket with ``IPV6_V6ONLY`` never
   trips a lease on 127.0.0.1: that was a denial of service against every user).

A listener is ours when its socket is the lease's, or its processes are this one, our
supervised children or their descendants; one the OS does not name is never a trip.
Foreign owners are named in ``_occupants``'s words, as ``doctor`` names them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING

from portpool._addresses import IPAddress, Scope, covered_scopes, meets, parse_address
from portpool._dataclass import dataclass, field
from portpool._platform import (
    TcpSocket,
    is_subreaper,
    ours_since,
    owners_of_inode,
    process_name,
    socket_inode,
)
from portpool._snapshot import Snapshot

if TYPE_CHECKING:
    from portpool.pool import Lease


@dataclass
class Watch:
    """One lease and what the shield has learned about it."""

    lease: Lease
    address: IPAddress | None
    # Every address the lease covers; None: unknown (a name that stopped resolving),
    # so every listener on the port counts.
    scopes: frozenset[Scope] | None = None
    base_inodes: set[int] = field(default_factory=set)  # our socket's, passed to children
    resolved_inodes: set[int] = field(default_factory=set)  # found in own processes


def watch(lease: Lease) -> Watch:
    """What is known of ``lease`` when the shield starts: its addresses, its socket."""
    try:
        scopes: frozenset[Scope] | None = covered_scopes(lease.host)
    except OSError:
        scopes = None
    found = Watch(lease, _expected_address(lease), scopes)
    inode = lease.socket_inode if lease.socket is not None else None
    if inode is not None:
        found.base_inodes.add(inode)
    return found


def _expected_address(lease: Lease) -> IPAddress | None:
    """The address our socket is bound to, as far as it can be known now."""
    sock = lease.socket
    if sock is not None and sock.fileno() != -1:
        with contextlib.suppress(OSError, ValueError):
            return parse_address(str(sock.getsockname()[0]))
    try:
        return parse_address(lease.host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(lease.host, None, type=socket.SOCK_STREAM)
        return parse_address(str(infos[0][4][0]))
    except (OSError, ValueError, IndexError):
        return None


def lease_problems(watched: Watch, snapshot: Snapshot) -> list[str]:
    """Every problem one check finds with a lease, in words; empty when it is ours.
    Learns the inodes of our children's sockets as it meets them. Raises OSError."""
    lock_problem = watched.lease.lock.problem(locked=snapshot.locked)
    problems = [] if lock_problem is None else [lock_problem]
    problems.extend(_port_problems(watched, snapshot))
    return problems


def _port_problems(watched: Watch, snapshot: Snapshot) -> list[str]:
    lease = watched.lease
    port = lease.port
    problems: list[str] = []
    sock = lease.socket  # None: handed to a child by number, so nothing to hold
    ours = set(watched.base_inodes)
    socket_closed = sock is not None and sock.fileno() == -1
    if sock is not None and not socket_closed:
        problem = _socket_problem(watched, sock)
        if problem is not None:
            problems.append(problem)
        inode = socket_inode(sock)
        if inode is not None:
            ours.add(inode)
    ours |= watched.resolved_inodes
    seen_inodes: set[int] = set()
    ours_listening = False
    for listener in snapshot.listeners_on(port):
        if listener.inode is not None:
            seen_inodes.add(listener.inode)
        if watched.scopes is not None and not meets(listener, watched.scopes):
            continue
        foreign = _foreign_owner(listener, ours, watched, snapshot)
        if foreign is None:
            ours_listening = True
            continue
        also = "also " if sock is not None and not socket_closed else ""
        problems.append(f"port {port} is now {also}listened on by {foreign}")
    # Forget inodes of our children's sockets that are gone (a restart re-binds).
    watched.resolved_inodes &= seen_inodes
    if socket_closed and not ours_listening:
        problems.append(
            f"port {port}: our listening socket was closed, so the port is not reserved "
            "(a server closes the socket it is given as it stops: give it a duplicate, "
            "socket.dup() or portpool.integrations, or hand the port off by close_socket())"
        )
    return problems


def _socket_problem(watched: Watch, sock: socket.socket) -> str | None:
    """Whether our socket is still bound to our address and port, and listening."""
    port = watched.lease.port
    name = sock.getsockname()
    if name[1] != port:
        return f"port {port}: our socket is now bound to port {name[1]}"
    if watched.address is not None and parse_address(str(name[0])) != watched.address:
        return f"port {port}: our socket is now bound to {name[0]}, not {watched.address}"
    try:
        # Only a holder of our socket can shut it down: this process or one it started
        # (a server draining on SIGTERM, in a rolling restart or a stop), never a
        # foreign program. Listening again keeps the port ours and lets clients queue
        # for the next run; taken for a trip, it stopped the whole instance (exit 4).
        watched.lease.listen_again()
    except OSError as e:
        return f"port {port}: our socket is no longer listening ({e.strerror or e})"
    return None


def _foreign_owner(
    listener: TcpSocket, ours: set[int], watched: Watch, snapshot: Snapshot
) -> str | None:
    """None if ``listener`` is ours (or the OS will not say whose), else who has it,
    in the words of ``_occupants`` (as ``doctor`` says it)."""
    if listener.inode is not None:
        if listener.inode in ours:
            return None
        # An unknown socket: find its processes (a /proc scan, so only now). One this
        # process has open itself is ours, whoever shares it (``foreign_listeners``).
        pids = owners_of_inode(listener.inode)
        foreign = [p for p in pids if not snapshot.is_ours(p)]
        if pids and (not foreign or os.getpid() in pids):
            watched.resolved_inodes.add(listener.inode)
            return None
        return _occupant(listener, foreign, watched.lease)
    if listener.pid is not None:
        if snapshot.is_ours(listener.pid):
            return None
        return _occupant(listener, [listener.pid], watched.lease)
    return None  # the OS does not say whose: never trip on a guess


def _occupant(listener: TcpSocket, pids: list[int], lease: Lease) -> str:
    """``pid 12 (nginx) on [::]:8000 (IPv6 and IPv4)``: the diagnosis's words."""
    from portpool._occupants import Occupant  # only once something foreign is found

    found = Occupant(listener, tuple(pids), tuple(process_name(p) or "?" for p in pids))
    text = f"{found.who()} on {found.place()}"
    if _maybe_detached_service(pids, lease):
        text += (
            " (if this is your service's own detached child, keep it in the foreground"
            ' or use socket = "fd")'
        )
    return text


def _maybe_detached_service(pids: list[int], lease: Lease) -> bool:
    """Whether a foreign listener may be the service itself, daemonized: the port was
    handed over by number (a double fork re-parents the server, so it is no descendant
    of ours), and the process is our user's and started after the lease was taken."""
    sock = lease.socket
    record = lease.record
    if not pids or record is None or (sock is not None and sock.fileno() != -1):
        return False
    # A subreaper (run and up on Linux) adopts a daemonized service: it would be ours,
    # so a foreign listener is not one, and the hint misled.
    return not is_subreaper() and ours_since(pids, record.acquired_at)
