"""The conversational service: WebSocket on its pooled socket, health over plain HTTP.

Each text message gets one reply, a JSON object naming who answered::

    {"reply": "instance 1 conversational heard: hello", "message": "hello",
     "app": "qwen-valencia", "instance": 1, "service": "conversational", "port": 7000,
     "pid": 4242}

``GET /health`` on the same port answers without upgrading the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import socket
from typing import TYPE_CHECKING, Any

from portpool.services._runtime import ServiceContext

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request, Response


def reply_to(ctx: ServiceContext, message: str) -> dict[str, Any]:
    """The reply to one text message."""
    return {
        "reply": f"instance {ctx.instance} {ctx.service} heard: {message}",
        "message": message,
        "app": ctx.app,
        "instance": ctx.instance,
        "service": ctx.service,
        "port": ctx.port,
        "pid": ctx.pid,
    }


async def serve(ctx: ServiceContext, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve WebSocket conversations and ``GET /health`` on ``sock`` until ``stop`` is set."""
    from websockets.asyncio.server import serve as serve_websockets
    from websockets.exceptions import ConnectionClosed

    async def converse(connection: ServerConnection) -> None:
        # A client's close with an error code (1011) or a dropped connection is the
        # client's business: it was logged as "connection handler failed" with a traceback.
        with contextlib.suppress(ConnectionClosed):
            async for message in connection:
                if isinstance(message, str):
                    reply = reply_to(ctx, message)
                else:
                    reply = {"error": "send text messages", **ctx.health()}
                await connection.send(json.dumps(reply))

    def health_without_upgrade(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != "/health":
            return None  # go on with the WebSocket handshake
        response = connection.respond(http.HTTPStatus.OK, json.dumps(ctx.health()) + "\n")
        del response.headers["Content-Type"]  # Headers is a multidict: replace, not add
        response.headers["Content-Type"] = "application/json"
        return response

    async with serve_websockets(
        converse, sock=sock, process_request=health_without_upgrade, close_timeout=1
    ):
        await stop.wait()
