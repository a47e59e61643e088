"""What every helper serves: the listening socket of a lease, or a socket as given.

A lease keeps its socket, and so the port, until it is released: the server gets a
duplicate handle of that same kernel socket (no new bind) and closes only its handle
when it stops. So a graceful stop never leaves the port unreserved while the lease is
held, and a running shield keeps seeing our socket listen. A bare socket is handed
over as it is: the server owns it and closes it when it stops.
"""

from __future__ import annotations

import socket
from typing import TypeAlias

from portpool.errors import PortPoolError
from portpool.pool import Lease

SocketOrLease: TypeAlias = socket.socket | Lease

# Keyword arguments that would make a server bind an address of its own: the socket
# we hand over is the reservation (DESIGN rule 5), so a second bind is always a bug.
BINDING_OPTIONS = frozenset(
    {"host", "port", "path", "uds", "fd", "sock", "reuse_port", "reuse_address"}
)


def serving_socket(sock_or_lease: SocketOrLease) -> socket.socket:
    """The listening stream socket to serve: a duplicate of ``lease.socket``, or the socket.

    Nothing is ever bound: a lease's socket is duplicated (same kernel socket, a new
    non-inheritable handle the server may close), a bare socket is returned as it is. Raises
    PortPoolError when the lease's socket was already closed or the socket is not a
    listening stream socket, and TypeError for anything else.
    """
    if isinstance(sock_or_lease, Lease):
        sock = sock_or_lease.socket
        if sock is None:
            raise PortPoolError(
                f"port {sock_or_lease.port}: the lease's socket was already closed "
                "(close_socket() hands the port off); serve from a lease that still has it"
            )
    elif isinstance(sock_or_lease, socket.socket):
        sock = sock_or_lease
    else:
        raise TypeError(
            f"expected a portpool Lease or a socket.socket, got {type(sock_or_lease).__name__}"
        )
    if sock.fileno() == -1:
        raise PortPoolError(f"{sock!r} is closed; nothing to serve")
    if sock.type != socket.SOCK_STREAM:
        raise PortPoolError(f"{sock!r} is not a stream socket; only TCP/stream can be served")
    accepting = getattr(socket, "SO_ACCEPTCONN", None)
    if accepting is not None and not sock.getsockopt(socket.SOL_SOCKET, accepting):
        raise PortPoolError(
            f"{sock!r} is not listening; pass a lease's socket or one received by "
            "listen_fds(), which are bound and listening already"
        )
    return sock.dup() if isinstance(sock_or_lease, Lease) else sock


def reject_binding_options(options: dict[str, object], helper: str) -> None:
    """Raise TypeError when ``options`` would make the server bind an address itself."""
    given = sorted(BINDING_OPTIONS & options.keys())
    if given:
        raise TypeError(
            f"{helper}() serves the socket it is given; drop {', '.join(given)} "
            "(the lease or the passed socket already decides the address)"
        )
