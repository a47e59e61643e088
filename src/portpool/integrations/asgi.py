"""Serving an ASGI app (Starlette, FastAPI, ...) with uvicorn on a lease's socket.

::

    import portpool
    from portpool.integrations import serve_asgi

    with portpool.acquire(state, [9000, 9001, 9002], service="api-server") as lease:
        serve_asgi(app, lease, log_level="warning")   # blocks until SIGINT/SIGTERM

In a child started by ``portpool run --fds`` use ``serve_asgi(app, listen_socket())``.
``await serve_asgi_async(app, lease)`` runs inside your own event loop and stops
gracefully when its task is cancelled. Keyword arguments go to ``uvicorn.Config``;
uvicorn never binds an address itself (``host``/``port``/``uds``/``fd`` are refused).
On SIGINT or SIGTERM uvicorn stops accepting, finishes in-flight requests and runs the
lifespan shutdown; then the helper *returns* instead of dying by the signal, so the
lease is released by your ``with`` block and the process exits normally.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from portpool._platform import server_stop_signals
from portpool.integrations._socket import SocketOrLease, reject_binding_options, serving_socket

if TYPE_CHECKING:
    import socket

    import uvicorn

_STOP_SIGNALS = server_stop_signals()


def _server(app: Any, uvicorn_config: dict[str, Any], helper: str) -> uvicorn.Server:
    import uvicorn

    reject_binding_options(uvicorn_config, helper)
    for option in ("reload", "workers"):
        if uvicorn_config.get(option):
            raise TypeError(f"{helper}() runs one server in this process; drop {option}=")
    return uvicorn.Server(uvicorn.Config(app, **uvicorn_config))


@contextlib.contextmanager
def _return_on_stop_signals(server: uvicorn.Server) -> Iterator[None]:
    """Make a stop signal end the server, and never the process.

    uvicorn captures SIGINT/SIGTERM while it serves and afterwards re-raises the
    signal into the handler that was there before; that handler is ours, so the
    signal lands here instead of killing the process before the lease is released.
    A signal that arrives before uvicorn has captured it stops the server too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; uvicorn skips them too
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sockets(sock_or_lease: SocketOrLease) -> list[socket.socket]:
    return [serving_socket(sock_or_lease)]


def serve_asgi(app: Any, sock_or_lease: SocketOrLease, **uvicorn_config: Any) -> None:
    """Serve ``app`` (an ASGI app or a "module:attr" string) with uvicorn until stopped.

    Blocks until SIGINT or SIGTERM, then shuts down gracefully and returns. The socket
    is never re-bound; uvicorn closes its handle on shutdown, and a lease keeps the port until
    released. Raises TypeError for config options that would bind another address (or
    ``reload``/``workers``) and for anything but a Lease or a socket.socket;
    PortPoolError when the lease's socket was already closed or the socket is not a
    listening stream socket.
    """
    server = _server(app, uvicorn_config, "serve_asgi")
    sockets = _sockets(sock_or_lease)
    with _return_on_stop_signals(server):
        server.run(sockets=sockets)


async def serve_asgi_async(app: Any, sock_or_lease: SocketOrLease, **uvicorn_config: Any) -> None:
    """Serve ``app`` with uvicorn in the running event loop until stopped.

    Returns after SIGINT or SIGTERM (in the main thread) and a graceful shutdown. When
    the awaiting task is cancelled, the server shuts down gracefully first, then the
    cancellation propagates. Same socket rules and errors as ``serve_asgi``.
    """
    import asyncio

    server = _server(app, uvicorn_config, "serve_asgi_async")
    sockets = _sockets(sock_or_lease)
    with _return_on_stop_signals(server):
        serving = asyncio.ensure_future(server.serve(sockets=sockets))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            # Finish in-flight requests and the lifespan shutdown before giving way.
            server.should_exit = True
            await serving
            raise
