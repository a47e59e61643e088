"""The reference services of the default layout, run by ``portpool up`` with no layout file.

Each is a small, real server on the socket its lease passed to it (``LISTEN_FDS``), or on
``127.0.0.1:$PORT`` when only the number was given. Start one with
``python -m portpool.services <service-name>``:

- ``mcp-universal``, ``ollama-mcp``, ``groq-api``, ``sandra-ia``: Model Context Protocol
  servers (official SDK), Streamable HTTP at ``/mcp``, tools ``ping`` and ``instance_info``.
- ``conversational``: a WebSocket service that answers each text message, naming its
  instance and service.
- ``api-server``: an HTTP JSON API (``/api/health``, ``/api/services``, ``/api/instances``)
  and a dashboard at ``/``; on a loopback address it answers only loopback ``Host``
  names (DNS rebinding), but for its health.

Every service answers ``GET /health`` with ``{"ok", "app", "service", "instance", "port",
"pid"}``, stops cleanly on SIGTERM or SIGINT, and stops by itself when the ``portpool up``
that started it is gone. The server libraries are in the ``services`` extra and are
imported only by the service that needs them.
"""

from __future__ import annotations

# Service name -> module of this package that serves it (one MCP module for all four).
SERVICES: dict[str, str] = {
    "mcp-universal": "mcp_server",
    "ollama-mcp": "mcp_server",
    "groq-api": "mcp_server",
    "sandra-ia": "mcp_server",
    "conversational": "conversational",
    "api-server": "api_server",
}

__all__ = ["SERVICES"]
