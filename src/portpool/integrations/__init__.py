"""Serving a portpool socket: receiving passed sockets, and helpers for Python servers.

Every helper takes a ``Lease`` (it serves ``lease.socket``) or a ``socket.socket``
(for instance one from ``listen_socket()``) and serves that socket: bound and listening
already, never bound again, so the port cannot change hands between the check and the
use. A lease keeps its socket, and so the port, until it is released (the server gets
a duplicate handle of the same kernel socket); a bare socket is handed over. A
duplicate shares the socket's blocking mode: once an asyncio-based server (asyncio,
uvicorn, aiohttp) has served a lease, its socket stays non-blocking at the OS level;
call ``lease.socket.settimeout(None)`` before a blocking ``accept()`` or before handing
``lease.fileno()`` to a program that expects a blocking socket.

One naming rule: ``serve_X`` blocks (it serves until SIGINT/SIGTERM, then returns, like
``asyncio.run``); ``serve_X_async`` is a coroutine for your own event loop (like
``uvicorn.Server.serve``).

| server | blocking | a coroutine, in your event loop |
| --- | --- | --- |
| asyncio streams / protocols | | ``serve_streams_async``, ``serve_protocol_async`` |
| uvicorn (any ASGI app) | ``serve_asgi`` | ``serve_asgi_async`` |
| aiohttp | ``serve_aiohttp`` | ``serve_aiohttp_async`` |
| ``http.server`` | ``serve_http`` | (``make_http_server`` builds one) |

Each server library is imported only inside its helper, so ``import portpool`` stays
light and none of them is a dependency of portpool.
"""

from __future__ import annotations

from portpool.integrations.aiohttp_server import serve_aiohttp, serve_aiohttp_async
from portpool.integrations.asgi import serve_asgi, serve_asgi_async
from portpool.integrations.asyncio_server import serve_protocol_async, serve_streams_async
from portpool.integrations.fds import LISTEN_FDS_START, listen_fds, listen_socket
from portpool.integrations.http_server import make_http_server, serve_http

__all__ = [
    "LISTEN_FDS_START",
    "listen_fds",
    "listen_socket",
    "make_http_server",
    "serve_aiohttp",
    "serve_aiohttp_async",
    "serve_asgi",
    "serve_asgi_async",
    "serve_http",
    "serve_protocol_async",
    "serve_streams_async",
]
