"""The api-server service: a JSON API over this host's instances, and their dashboard.

- ``GET /api/health`` (and ``/health``): this service is up.
- ``GET /api/services``: every service of this instance with port, pool, pid and its
  health, checked now on the address this api-server serves on (the layout's host; a
  wildcard's loopback).
- ``GET /api/instances``: every instance of the app on this host, from the state dir;
  with ``?health=1`` each service of a live instance is checked there too.
- ``GET /``: the dashboard (one self-contained page that refreshes itself).

A service is healthy when its ``GET /health`` answers 200 naming that service and port,
so a foreign program on the port never counts as ours. Served on a loopback address, it
answers only requests whose ``Host`` is a loopback name (421 otherwise), as the MCP
services do: a web page could otherwise read the instances' directories and pids
through DNS rebinding (``/health`` answers any ``Host``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from portpool._addresses import endpoint
from portpool.errors import PortPoolError
from portpool.services._runtime import ServiceContext, serve_asgi

if TYPE_CHECKING:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

CHECK_HOST = "127.0.0.1"
CHECK_TIMEOUT_S = 1.0


def check_host_for(address: str) -> str:
    """Where to reach the instance's services, given the address this api-server's own
    socket is bound to (every service of a layout binds the layout's ``host``): a
    wildcard's loopback, else that address. With ``host = "::1"`` the checks went to
    127.0.0.1 and every service read as down while ``up`` said all were ready."""
    if address == "0.0.0.0":
        return CHECK_HOST
    if address == "::":
        return "::1"
    return address


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_is_loopback(header: str) -> bool:
    """Whether a ``Host`` header (``name``, ``name:port``, ``[v6]:port``) names a
    loopback address: the only names a browser uses for a server on one without DNS
    rebinding (a page of evil.example resolving itself to 127.0.0.1)."""
    host = header.strip().lower()
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    return name in LOOPBACK_NAMES or name == "localhost." or is_loopback_address(name)


def is_loopback_address(address: str) -> bool:
    """Whether ``address`` is an IP literal of a loopback (all of 127.0.0.0/8, ``::1``):
    a server on 127.0.0.2 was left open to DNS rebinding, as only three names counted."""
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# What any Host may ask: says no more than that this service runs (for health checkers).
OPEN_PATHS = frozenset({"/health", "/api/health"})


def loopback_only(app: Any) -> Any:
    """``app`` (ASGI) answering 421 to HTTP and WebSocket requests whose ``Host`` is not
    a loopback name (``host_is_loopback``), but for ``OPEN_PATHS``; lifespan events pass
    through."""
    from starlette.responses import PlainTextResponse

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path") not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            if not host_is_loopback(headers.get(b"host", b"").decode("latin-1")):
                response = PlainTextResponse("Invalid Host header", status_code=421)
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def dashboard_html() -> str:
    """The dashboard page, shipped in the package (no build step, no outside assets)."""
    return resources.files("portpool.services").joinpath("static/dashboard.html").read_text("utf-8")


def health_client() -> httpx.AsyncClient:
    """The client of the health checks: ``trust_env=False`` (they go to loopback, never
    through a proxy from the environment), and each check's connection used once.

    Kept alive, the connections were closed by the services when they stopped, and the
    WebSocket service closes each first anyway: each port sat in TIME_WAIT, and for a
    minute after a stop a plain bind of it failed. Each check now asks the service to
    close (``Connection: close``) and answers that close with a reset (SO_LINGER 0), as
    load balancers' health checks do: nothing waits on either side. A reset of a
    connection the service meant to keep (without the header) made HTTP/1.1 servers
    such as ``http.server`` log a ConnectionResetError per check."""
    import httpx

    reset = [(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))]
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_keepalive_connections=0), socket_options=reset, trust_env=False
    )
    return httpx.AsyncClient(
        timeout=CHECK_TIMEOUT_S,
        trust_env=False,
        transport=transport,
        headers={"Connection": "close"},
    )


async def check_health(
    client: httpx.AsyncClient, name: str, port: int | None, host: str = CHECK_HOST
) -> dict[str, Any]:
    """Ask ``<host>:<port>/health`` now; ``healthy`` only if the answer names ``name``
    and ``port``. Never raises for a down or foreign service: ``error`` says what was seen."""
    import httpx

    if port is None:
        return {"healthy": False, "pid": None, "latency_ms": None, "error": "no port"}
    started = time.perf_counter()
    try:
        response = await client.get(f"http://{endpoint(host, port)}/health")
        body = response.json()
    except httpx.TimeoutException:
        silent = f"no answer within {CHECK_TIMEOUT_S:g} s"
        return {"healthy": False, "pid": None, "latency_ms": None, "error": silent}
    except (httpx.HTTPError, ValueError) as e:
        return {"healthy": False, "pid": None, "latency_ms": None, "error": _describe(e)}
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200:
        error: str | None = f"HTTP {response.status_code}"
    elif body.get("service") != name or body.get("port") != port:
        error = f"answered as {body.get('service')!r} on port {body.get('port')!r}"
    else:
        error = None
    pid = body.get("pid") if error is None else None
    return {"healthy": error is None, "pid": pid, "latency_ms": latency_ms, "error": error}


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _read_instances(app: str) -> tuple[list[dict[str, Any]], str | None]:
    """Every instance of ``app`` in the state dir as dicts, and a problem reading it."""
    try:
        from portpool.records import list_instances

        return [info.to_dict() for info in list_instances(app)], None
    except (PortPoolError, OSError) as e:
        return [], f"cannot read the state dir: {e}"


def _own_services(ctx: ServiceContext, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This instance's services: from its record when readable, else from the environment."""
    for record in instances:
        if record.get("number") == ctx.instance and record.get("services"):
            return [dict(service) for service in record["services"]]
    return [
        {"name": name, "pool": None, "port": port, "pid": None} for name, port in ctx.ports.items()
    ]


async def services_report(
    ctx: ServiceContext, client: httpx.AsyncClient, host: str = CHECK_HOST
) -> dict[str, Any]:
    """The body of ``/api/services``; the services are checked on ``host``."""
    instances, problem = await asyncio.to_thread(_read_instances, ctx.app)
    services = _own_services(ctx, instances)
    checks = await asyncio.gather(
        *(check_health(client, s["name"], s["port"], host) for s in services)
    )
    for service, check in zip(services, checks, strict=True):
        service["pid"] = check["pid"] or service.get("pid")
        service.update(healthy=check["healthy"], latency_ms=check["latency_ms"])
        service["error"] = check["error"]
    return {
        "app": ctx.app,
        "instance": ctx.instance,
        "checked_at": time.time(),
        "healthy": all(s["healthy"] for s in services),
        "problem": problem,
        "services": services,
    }


async def instances_report(
    ctx: ServiceContext, client: httpx.AsyncClient, health: bool, host: str = CHECK_HOST
) -> dict[str, Any]:
    """The body of ``/api/instances``; with ``health`` each service carries a ``health``
    (checked on ``host``: the instances of one app share its layout's host)."""
    instances, problem = await asyncio.to_thread(_read_instances, ctx.app)
    if health:
        pending = []
        for record in instances:
            for service in record.get("services", []):
                pending.append((record, service))
        checks = await asyncio.gather(
            *(
                check_health(client, service["name"], service.get("port"), host)
                if record.get("alive")
                else _not_running()
                for record, service in pending
            )
        )
        for (_, service), check in zip(pending, checks, strict=True):
            service["health"] = check
    return {
        "app": ctx.app,
        "instance": ctx.instance,
        "service": ctx.service,
        "port": ctx.port,
        "checked_at": time.time(),
        "problem": problem,
        "instances": instances,
    }


async def _not_running() -> dict[str, Any]:
    return {"healthy": False, "pid": None, "latency_ms": None, "error": "instance not running"}


def build_app(ctx: ServiceContext, check_host: str = CHECK_HOST) -> Starlette:
    """The ASGI app of the api-server; it checks the services' health on ``check_host``."""
    import contextlib
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    page = dashboard_html()
    no_store = {"Cache-Control": "no-store"}
    clients: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with health_client() as client:
            clients.append(client)
            yield

    async def health(_request: Request) -> Response:
        return JSONResponse(ctx.health(), headers=no_store)

    async def services(_request: Request) -> Response:
        report = await services_report(ctx, clients[0], check_host)
        return JSONResponse(report, headers=no_store)

    async def instances(request: Request) -> Response:
        wanted = request.query_params.get("health", "") not in ("", "0", "false", "no")
        report = await instances_report(ctx, clients[0], wanted, check_host)
        return JSONResponse(report, headers=no_store)

    async def dashboard(_request: Request) -> Response:
        return HTMLResponse(page, headers=no_store)

    routes = [
        Route("/", dashboard, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/services", services, methods=["GET"]),
        Route("/api/instances", instances, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def serve(ctx: ServiceContext, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve the API and the dashboard on ``sock`` until ``stop`` is set."""
    address = sock.getsockname()[0]
    app: Any = build_app(ctx, check_host_for(address))
    if is_loopback_address(address):
        app = loopback_only(app)
    await serve_asgi(app, sock, stop)
