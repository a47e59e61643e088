"""The four MCP services (mcp-universal, ollama-mcp, groq-api, sandra-ia): one server,
named by the service it runs as.

Streamable HTTP at ``/mcp`` (official MCP SDK), ``GET /health`` beside it. Tools:

- ``ping``: answers ``pong from <service> (instance <n>)``;
- ``instance_info``: app, instance number, this service's name, port and pid, and the
  port of every service of the instance.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, TypedDict

from portpool.services._runtime import ServiceContext, serve_asgi

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response


class InstanceInfo(TypedDict):
    """What ``instance_info`` returns (as structured content, and as JSON text)."""

    app: str
    instance: int
    service: str
    port: int
    pid: int
    ports: dict[str, int]


def instance_info(ctx: ServiceContext) -> InstanceInfo:
    """The answer of the ``instance_info`` tool for this service."""
    return {
        "app": ctx.app,
        "instance": ctx.instance,
        "service": ctx.service,
        "port": ctx.port,
        "pid": ctx.pid,
        "ports": dict(sorted(ctx.ports.items())),
    }


def build_app(ctx: ServiceContext) -> Starlette:
    """The ASGI app of this MCP service: ``/mcp`` and ``/health``."""
    from mcp.server.mcpserver import MCPServer
    from starlette.responses import JSONResponse

    server: MCPServer[object] = MCPServer(
        ctx.service,
        instructions=(
            f"Reference MCP service {ctx.service!r} of {ctx.app} instance {ctx.instance}. "
            "Call instance_info for the ports of every service of this instance."
        ),
        log_level="WARNING",
    )

    def ping() -> str:
        """Answer pong, naming the service and instance that answered."""
        return f"pong from {ctx.service} (instance {ctx.instance})"

    def info() -> InstanceInfo:
        """App, instance number, this service's name, port and pid, and every service's port."""
        return instance_info(ctx)

    server.add_tool(ping, name="ping")
    server.add_tool(info, name="instance_info")

    async def health(_request: Request) -> Response:
        return JSONResponse(ctx.health())

    server.custom_route("/health", methods=["GET"])(health)
    return server.streamable_http_app(host=ctx.host)


async def serve(ctx: ServiceContext, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve this MCP service on ``sock`` until ``stop`` is set."""
    await serve_asgi(build_app(ctx), sock, stop)
