"""Serving ``http.server`` handlers on a lease's socket (or a passed one).

::

    from http.server import BaseHTTPRequestHandler
    from portpool.integrations import listen_socket, make_http_server, serve_http

    server = make_http_server(lease, MyHandler)   # a ThreadingHTTPServer on lease.socket
    server.serve_forever()                        # stop with server.shutdown() elsewhere

    serve_http(listen_socket("web"), MyHandler)   # blocks; returns on SIGINT/SIGTERM

The server is built with ``bind_and_activate=False`` and given the listening socket:
no second bind, no ``SO_REUSEADDR``, and the port cannot change hands in between.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, TypeVar, overload

from portpool.integrations._socket import SocketOrLease, serving_socket

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
    from types import FrameType

    ServerT = TypeVar("ServerT", bound=HTTPServer)


@overload
def make_http_server(
    sock_or_lease: SocketOrLease, handler_class: type[BaseHTTPRequestHandler]
) -> ThreadingHTTPServer: ...


@overload
def make_http_server(
    sock_or_lease: SocketOrLease,
    handler_class: type[BaseHTTPRequestHandler],
    server_class: type[ServerT],
) -> ServerT: ...


def make_http_server(
    sock_or_lease: SocketOrLease,
    handler_class: type[BaseHTTPRequestHandler],
    server_class: type[HTTPServer] | None = None,
) -> HTTPServer:
    """An ``http.server`` server (``ThreadingHTTPServer`` unless ``server_class``) on the
    socket, ready for ``serve_forever()``.

    Nothing is bound; ``server.server_address`` is the socket's address and
    ``server.server_close()`` closes the server's handle (a lease keeps the port until
    released; a bare socket is closed). Raises PortPoolError when the lease's socket was
    already closed (``close_socket()``, ``release()``) or the socket is closed or not a
    listening stream socket; TypeError for anything but a Lease or a socket.socket.
    """
    from http.server import ThreadingHTTPServer

    sock = serving_socket(sock_or_lease)
    cls = server_class or ThreadingHTTPServer
    address = sock.getsockname()
    server = cls(address, handler_class, bind_and_activate=False)
    server.socket.close()  # the unbound socket socketserver made for itself
    server.socket = sock
    server.address_family = sock.family
    server.server_address = address
    # What HTTPServer.server_bind would set, without its reverse-DNS lookup.
    host = address[0] if isinstance(address, tuple) else str(address)
    server.server_name = host
    server.server_port = address[1] if isinstance(address, tuple) else 0
    return server


class _Stop(BaseException):
    """Raised by the signal handler to leave serve_forever, as KeyboardInterrupt would."""


def serve_http(
    sock_or_lease: SocketOrLease,
    handler_class: type[BaseHTTPRequestHandler],
    server_class: type[HTTPServer] | None = None,
) -> None:
    """Serve ``handler_class`` on the socket until SIGINT or SIGTERM, then close and return.

    Signals are only handled from the main thread; elsewhere it serves until the
    process ends. The server's handle is closed on return. Raises what
    ``make_http_server`` raises.
    """
    server = make_http_server(sock_or_lease, handler_class, server_class or _default_class())
    if threading.current_thread() is not threading.main_thread():
        with server:
            server.serve_forever()
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()


def _default_class() -> type[HTTPServer]:
    from http.server import ThreadingHTTPServer

    return ThreadingHTTPServer
