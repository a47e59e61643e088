"""What every reference service shares: its context from the environment, its socket,
signals, the supervisor watch and serving an ASGI app on a socket we already hold."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from portpool._addresses import endpoint
from portpool._dataclass import dataclass, field
from portpool.errors import PassedSocketError, PortPoolError
from portpool.layout import port_env_name

log = logging.getLogger("portpool.services")

PORT_PREFIX = "PORTPOOL_PORT_"
SUPERVISOR_POLL_S = 1.0
GRACEFUL_STOP_S = 1


@dataclass(frozen=True)
class ServiceContext:
    """Who this service is, as the environment given by ``portpool up`` says (DESIGN.md)."""

    app: str
    instance: int
    service: str  # the name the supervisor knows it by
    kind: str  # which reference service runs (the argument of ``python -m portpool.services``)
    port: int
    ports: dict[str, int] = field(default_factory=dict)  # every service of the instance
    host: str = "127.0.0.1"
    pid: int = 0
    supervisor_pid: int | None = None

    @classmethod
    def from_environ(cls, kind: str, environ: Mapping[str, str] | None = None) -> ServiceContext:
        """Read the context; raises PortPoolError when a variable is missing or malformed.

        ``PORTPOOL_PORT_<SERVICE>`` names are upper case with "_" for anything else, so the
        service names are read back as lower case with "-" (exact for the default layout).
        """
        env = os.environ if environ is None else environ
        service = env.get("PORTPOOL_SERVICE") or kind
        ports = {}
        for key, value in env.items():
            if key.startswith(PORT_PREFIX) and key != PORT_PREFIX:
                name = key[len(PORT_PREFIX) :].lower().replace("_", "-")
                ports[name] = _number(key, value)
        exact = [n for n in env.get("PORTPOOL_SERVICES", "").split(",") if n]
        if exact:  # the supervisor's exact names, for layouts that use "_" in names
            by_key = {port_env_name(n): n for n in exact}
            ports = {by_key.get(port_env_name(name), name): port for name, port in ports.items()}
        own_key = port_env_name(service)
        port_text = env.get("PORT") or env.get(own_key)
        if port_text is None:
            raise PortPoolError(
                f"{service}: neither PORT nor {own_key} is set; start it with "
                "`portpool up` or `portpool run`, or set PORT"
            )
        port = _number("PORT", port_text)
        ports.setdefault(service, port)
        supervisor = env.get("PORTPOOL_SUPERVISOR_PID")
        return cls(
            app=env.get("PORTPOOL_APP", "qwen-valencia"),
            instance=_number("PORTPOOL_INSTANCE", env.get("PORTPOOL_INSTANCE", "1")),
            service=service,
            kind=kind,
            port=port,
            ports=ports,
            pid=os.getpid(),
            supervisor_pid=_number("PORTPOOL_SUPERVISOR_PID", supervisor) if supervisor else None,
        )

    def health(self) -> dict[str, Any]:
        """The body of ``GET /health``: enough for a checker to know it reached us."""
        return {
            "ok": True,
            "app": self.app,
            "service": self.service,
            "instance": self.instance,
            "port": self.port,
            "pid": self.pid,
        }


def _number(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise PortPoolError(f"{key}={value!r} is not a number") from None


def listening_socket(ctx: ServiceContext) -> socket.socket:
    """The socket passed by ``LISTEN_FDS`` (named after the service, or the only one), else
    a new one bound exclusively to ``127.0.0.1:$PORT``. Raises PortPoolError or OSError."""
    if "LISTEN_FDS" not in os.environ:
        from portpool.pool import bind_listen

        return bind_listen(ctx.host, ctx.port)
    from portpool.integrations import listen_fds

    sockets = listen_fds()
    if ctx.service in sockets:
        return sockets.pop(ctx.service)
    if len(sockets) == 1:
        return sockets.popitem()[1]
    raise PassedSocketError(
        f"{ctx.service}: no passed socket named {ctx.service!r} "
        f"(got: {', '.join(sockets) or 'none'})"
    )


ServeFn = Callable[[ServiceContext, socket.socket, asyncio.Event], Awaitable[None]]


def run(kind: str, serve: ServeFn) -> int:
    """Serve ``kind`` until SIGTERM/SIGINT or the supervisor's death; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Servers' own loggers speak at warning level: one line per request at most.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "mcp", "websockets", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        ctx = ServiceContext.from_environ(kind)
        sock = listening_socket(ctx)
    except (PortPoolError, OSError) as e:
        print(f"cannot start {kind}: {e}", file=sys.stderr)
        return 1
    return asyncio.run(_main(ctx, sock, serve))


async def _main(ctx: ServiceContext, sock: socket.socket, serve: ServeFn) -> int:
    stop = asyncio.Event()
    with _stop_on_signals(stop):
        watch = asyncio.create_task(watch_supervisor(ctx, stop))
        address = sock.getsockname()
        log.info(
            "%s of %s instance %d serving on %s (pid %d)",
            ctx.service,
            ctx.app,
            ctx.instance,
            endpoint(address[0], address[1]),
            ctx.pid,
        )
        try:
            await serve(ctx, sock, stop)
        finally:
            watch.cancel()
            sock.close()
    log.info("%s stopped", ctx.service)
    return 0


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = [signal.SIGTERM, signal.SIGINT]

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    installed = []
    for signum in signals:
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # Windows event loops
            signal.signal(signum, lambda n, _f: loop.call_soon_threadsafe(on_signal, n))
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _supervisor_gone(ctx: ServiceContext, first_parent: int) -> str | None:
    if os.getppid() != first_parent:
        return f"parent process {first_parent} is gone"
    if ctx.supervisor_pid is not None and ctx.supervisor_pid != first_parent:
        # Started through a wrapper: the supervisor is not our parent, watch it directly.
        import psutil

        if not psutil.pid_exists(ctx.supervisor_pid):
            return f"supervisor pid {ctx.supervisor_pid} is gone"
    return None


async def watch_supervisor(ctx: ServiceContext, stop: asyncio.Event) -> None:
    """Set ``stop`` once the process that started us (``portpool up``) has disappeared,
    so a kill -9 of the supervisor does not leave services serving forever."""
    first_parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(SUPERVISOR_POLL_S)
        reason = _supervisor_gone(ctx, first_parent)
        if reason is not None:
            log.info("%s: %s; stopping", ctx.service, reason)
            stop.set()


async def serve_asgi(app: Any, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve ``app`` with uvicorn on ``sock`` (never re-bound) until ``stop`` is set or a
    stop signal arrives; the graceful stop is bounded, since open MCP streams would hold it."""
    from portpool.integrations.asgi import serve_asgi_async

    serving = asyncio.create_task(
        serve_asgi_async(
            app,
            sock,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_STOP_S,
        )
    )
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if serving.done():
        serving.result()  # re-raise a failure to start
        return
    serving.cancel()  # serve_asgi_async shuts down gracefully, then gives way
    with contextlib.suppress(asyncio.CancelledError):
        await serving
