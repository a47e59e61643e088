"""Serving an aiohttp application on a lease's socket (or a passed one).

Inside your event loop::

    from portpool.integrations import serve_aiohttp_async

    runner = await serve_aiohttp_async(app, lease)  # accepting now
    ...
    await runner.cleanup()  # stop serving; the lease keeps the port

Or blocking, with aiohttp's own SIGINT/SIGTERM handling (returns after a graceful stop)::

    serve_aiohttp(app, listen_socket("web"), print=None)

aiohttp serves the socket through a ``SockSite``; it never binds an address itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from portpool.integrations._socket import SocketOrLease, reject_binding_options, serving_socket

if TYPE_CHECKING:
    from aiohttp import web


async def serve_aiohttp_async(
    app: web.Application,
    sock_or_lease: SocketOrLease,
    *,
    shutdown_timeout: float = 60.0,
    **runner_kwargs: Any,
) -> web.AppRunner:
    """Start serving ``app`` on the socket and return its runner, already accepting.

    Stop with ``await runner.cleanup()``, which closes the server's handle (a lease keeps
    the port until released; a bare socket is closed). ``runner_kwargs`` go to
    ``aiohttp.web.AppRunner``; ``shutdown_timeout`` (seconds) bounds the wait for
    in-flight requests on cleanup. Raises PortPoolError when the lease's socket was
    already closed or the socket is not a listening stream socket, TypeError for
    anything but a Lease or a socket.socket.
    """
    from aiohttp import web

    sock = serving_socket(sock_or_lease)
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, shutdown_timeout=shutdown_timeout).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def serve_aiohttp(
    app: web.Application, sock_or_lease: SocketOrLease, **run_app_kwargs: Any
) -> None:
    """Serve ``app`` on the socket until SIGINT/SIGTERM, then stop gracefully and return.

    Signals are only handled from the main thread; elsewhere it serves until the
    process ends, as ``serve_http`` and ``serve_asgi`` do. ``run_app_kwargs`` go to
    ``aiohttp.web.run_app`` (``print``, ``access_log``, ``shutdown_timeout``, ...);
    ``host``, ``port``, ``path``, ``sock`` and ``reuse_*`` raise TypeError, since the
    socket decides the address. Raises what ``serve_aiohttp_async`` raises for the socket.
    """
    import threading

    from aiohttp import web

    reject_binding_options(run_app_kwargs, "serve_aiohttp")
    if threading.current_thread() is not threading.main_thread():
        # run_app sets signal handlers, which only the main thread may: it failed at once.
        run_app_kwargs.setdefault("handle_signals", False)
    web.run_app(app, sock=serving_socket(sock_or_lease), **run_app_kwargs)
