"""Leases handed to their service by number, and what may stop that service's own bind.

A service that gets only its port number (``socket = "port"``, or ``run`` without
``--fds``) binds the port itself, maybe without SO_REUSEADDR; ``run`` and ``up`` then
name who blocks such a bind (a connection or a TIME_WAIT on the port).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from portpool._addresses import occupies
from portpool._occupants import plain_bind_note, with_owners
from portpool._platform import socket_inode, tcp_sockets
from portpool.layout import Layout

if TYPE_CHECKING:
    from portpool.pool import Lease


def handed_over(layout: Layout, leases: Iterable[Lease], *, up: bool = True) -> list[Lease]:
    """The leases whose service gets only the number and binds the port itself: their
    socket was closed (``run`` without ``--fds``) or, for ``up``, their service has
    ``socket = "port"`` (``up`` closes it when it starts the service). For ``run``
    (``up=False``) the layout's ``socket`` does not count: ``--fds`` passes every socket
    (a `socket = "port"` service's too, which then binds nothing), else none."""
    if not up:
        return [lease for lease in leases if lease.socket is None]
    port_mode = {s.name for s in layout.services if s.socket == "port"}
    return [lease for lease in leases if lease.socket is None or lease.service in port_mode]


def plain_bind_notes(leases: Iterable[Lease]) -> list[str]:
    """One line per lease whose port a server that does not set SO_REUSEADDR cannot bind
    yet, naming who blocks it (``doctor``'s note): for leases handed to their service by
    number only (``socket = "port"``, ``run`` without ``--fds``), whose own bind then
    fails. Call before the service starts. A lease none of whose sockets is open any
    more (``run``'s) is judged as doctor judges a free port, by the kernel's probe
    binds; else by the socket table, our own sockets (served and held) not counted.

    Such a port is kept, not skipped: the block lasts at most a TIME_WAIT (60 s) or one
    outgoing connection, a server that sets SO_REUSEADDR (most do) binds it anyway, and
    skipping would move the service off its predictable port for a passing state.
    """
    out = []
    for lease in leases:
        who = f"service {lease.service!r} " if lease.service else ""
        out += [f"{who}port {lease.port}: {note}" for note in _plain_bind_notes(lease)]
    return out


def _plain_bind_notes(lease: Lease) -> list[str]:
    if lease.socket is None and not lease.held:
        # Nothing of ours on the port: the probe tells what the table cannot (a [::1]
        # connection whose socket was bound to [::] keeps a plain bind off 0.0.0.0; one
        # bound to [::1] does not, and the table shows both alike).
        from portpool.diagnosis import diagnose_port, probe_bind

        if probe_bind(lease.host, lease.port, reuse=False) is None:
            return []  # the service's own bind works: nothing to name, no table read
        try:
            found = diagnose_port(lease.port, lease.host)
        except OSError:  # the name no longer resolves: the service's bind will say
            return []
        return found.notes() if found.bindable else []
    mine = {socket_inode(s) for s in (lease.socket, *lease.held) if s is not None}
    blocking = [
        s
        for s in tcp_sockets(lease.port)
        if s.state != "listen" and s.inode not in mine and occupies(s, lease.host)
    ]
    return [plain_bind_note(with_owners(blocking))] if blocking else []
