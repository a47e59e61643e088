"""Serving a lease's socket (or a passed one) with plain asyncio.

::

    import asyncio, portpool
    from portpool.integrations import serve_streams_async

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    async def main(lease: portpool.Lease) -> None:
        server = await serve_streams_async(lease, echo)  # accepting now
        async with server:
            await server.serve_forever()

``serve_protocol_async(lease, factory)`` does the same for a Protocol factory. The
server serves the lease's own listening socket, never binding: closing the server closes
only its handle, and the port stays reserved until the lease is released. A bare
socket (e.g. from ``listen_socket()``) is taken over and closed with the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from portpool.integrations._socket import SocketOrLease, reject_binding_options, serving_socket

if TYPE_CHECKING:
    import asyncio

ClientConnected = Callable[["asyncio.StreamReader", "asyncio.StreamWriter"], Awaitable[None] | None]


async def serve_streams_async(
    sock_or_lease: SocketOrLease, client_connected_cb: ClientConnected, **start_server_kwargs: Any
) -> asyncio.Server:
    """Serve streams on the socket: ``asyncio.start_server(client_connected_cb, sock=...)``.

    Returns the server, already accepting. ``start_server_kwargs`` go to
    ``asyncio.start_server`` (``limit``, ``ssl``, ``backlog``, ...); options that would
    bind another address (``host``, ``port``, ``sock``, ``reuse_port``...) raise TypeError,
    as does anything but a Lease or a socket.socket. Raises PortPoolError when the lease's
    socket was already closed or the socket is not a listening stream socket.
    """
    import asyncio

    reject_binding_options(start_server_kwargs, "serve_streams_async")
    sock = serving_socket(sock_or_lease)
    return await asyncio.start_server(client_connected_cb, sock=sock, **start_server_kwargs)


async def serve_protocol_async(
    sock_or_lease: SocketOrLease,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    **create_server_kwargs: Any,
) -> asyncio.Server:
    """Serve a protocol on the socket: ``loop.create_server(protocol_factory, sock=...)``.

    Returns the server, already accepting. ``create_server_kwargs`` go to
    ``loop.create_server``; options that would bind another address raise TypeError.
    Same socket errors as ``serve_streams_async``.
    """
    import asyncio

    reject_binding_options(create_server_kwargs, "serve_protocol_async")
    sock = serving_socket(sock_or_lease)
    loop = asyncio.get_running_loop()
    return await loop.create_server(protocol_factory, sock=sock, **create_server_kwargs)
