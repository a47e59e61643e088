"""Serving a lease's socket with asyncio, uvicorn, aiohttp and http.server: real servers
on real portpool leases, real requests over loopback, real signals to real processes."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from tests.helpers import kill_if_running

import portpool.integrations
from portpool import Lease, PortPoolError, StateDir, acquire
from portpool.integrations import (
    make_http_server,
    serve_aiohttp,
    serve_aiohttp_async,
    serve_asgi,
    serve_asgi_async,
    serve_protocol_async,
    serve_streams_async,
)

posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def url(lease: Lease, path: str = "/") -> str:
    return f"http://127.0.0.1:{lease.port}{path}"


def inode(sock: Any) -> int:
    return os.fstat(sock.fileno()).st_ino


def assert_still_reserved(lease: Lease) -> None:
    """The server has stopped, but the lease's socket still listens: the port is ours."""
    assert lease.socket is not None and lease.socket.fileno() != -1
    assert lease.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    with socket.socket() as intruder, pytest.raises(OSError, match="in use"):
        intruder.bind(("127.0.0.1", lease.port))


# --- import weight ---------------------------------------------------------------------

HEAVY = {"uvicorn", "aiohttp", "starlette", "click", "mcp", "httpx", "anyio", "websockets"}


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout))


def test_importing_portpool_loads_no_server_library() -> None:
    plain = loaded_after("import portpool")
    with_integrations = loaded_after("import portpool, portpool.integrations")
    assert not {m for m in plain if m.split(".")[0] in HEAVY}
    assert not {m for m in with_integrations if m.split(".")[0] in HEAVY}
    # The helpers load even asyncio and http.server only when called.
    added = with_integrations - plain
    assert not {m for m in added if m.split(".")[0] in {"asyncio", "http", "socketserver"}}


def test_one_naming_rule_serve_x_blocks_and_serve_x_async_is_a_coroutine() -> None:
    """``serve_*`` once blocked in one module and was a coroutine in another: a caller
    could not tell from the name whether to ``await`` it."""
    helpers = [n for n in portpool.integrations.__all__ if n.startswith("serve_")]
    assert len(helpers) == 7
    for name in helpers:
        is_coroutine = inspect.iscoroutinefunction(getattr(portpool.integrations, name))
        assert is_coroutine == name.endswith("_async"), name


# --- asyncio ---------------------------------------------------------------------------


def test_serve_streams_async_on_the_lease_socket(lease: Lease) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()

    async def main() -> bytes:
        server = await serve_streams_async(lease, echo)
        assert [inode(s) for s in server.sockets] == [inode(lease)]  # the same socket
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", lease.port)
            writer.write(b"hello\n")
            reply = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            await writer.wait_closed()
        return reply

    assert asyncio.run(main()) == b"echo hello\n"
    assert_still_reserved(lease)


def test_serve_protocol_async_on_the_lease_socket(lease: Lease) -> None:
    class Shout(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())
            self.transport.close()

    async def main() -> bytes:
        server = await serve_protocol_async(lease, Shout)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", lease.port)
            writer.write(b"quiet\n")
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        return reply

    assert asyncio.run(main()) == b"QUIET\n"


# --- uvicorn / ASGI --------------------------------------------------------------------


def asgi_app(events: list[str]) -> Any:
    """A bare ASGI app (no framework): records lifespan events, answers with its pid."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = json.dumps({"pid": os.getpid(), "path": scope["path"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def test_serve_asgi_async_serves_then_stops_gracefully_on_cancel(lease: Lease) -> None:
    events: list[str] = []

    async def main() -> httpx.Response:
        serving = asyncio.create_task(
            serve_asgi_async(asgi_app(events), lease, log_config=None, lifespan="on")
        )
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            response = await client.get(url(lease, "/hello"))
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        return response

    response = asyncio.run(main())
    assert response.status_code == 200
    assert response.json() == {"pid": os.getpid(), "path": "/hello"}
    assert events == ["lifespan.startup", "lifespan.shutdown"]  # shut down, not torn down
    assert_still_reserved(lease)


# --- aiohttp ---------------------------------------------------------------------------


def test_serve_aiohttp_async_on_the_lease_socket(lease: Lease) -> None:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"pid": os.getpid(), "path": request.path})

    async def main() -> httpx.Response:
        app = web.Application()
        app.router.add_get("/{tail:.*}", hello)
        runner = await serve_aiohttp_async(app, lease)
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                return await client.get(url(lease, "/aio"))
        finally:
            await runner.cleanup()

    response = asyncio.run(main())
    assert response.json() == {"pid": os.getpid(), "path": "/aio"}
    assert_still_reserved(lease)


# --- http.server -----------------------------------------------------------------------


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[1]}".encode()  # type: ignore[index]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("server_class", [None, HTTPServer])
def test_make_http_server_on_the_lease_socket(
    lease: Lease, server_class: type[HTTPServer] | None
) -> None:
    if server_class is None:
        server: HTTPServer = make_http_server(lease, Hello)
        assert isinstance(server, ThreadingHTTPServer)
    else:
        server = make_http_server(lease, Hello, server_class)
        assert type(server) is HTTPServer
    assert inode(server.socket) == inode(lease)  # the same socket: no second bind
    assert server.server_address == ("127.0.0.1", lease.port)
    assert server.server_port == lease.port
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        response = httpx.get(url(lease), timeout=30, trust_env=False)
    finally:
        server.shutdown()
        thread.join(timeout=30)
        server.server_close()
    assert response.text == f"hello from {lease.port}"
    assert not thread.is_alive()
    assert_still_reserved(lease)


def test_a_bare_socket_is_handed_over_and_closed_with_the_server(lease: Lease) -> None:
    assert lease.socket is not None
    bare = lease.socket.dup()
    server = make_http_server(bare, Hello)
    assert server.socket is bare  # as it is: not even duplicated
    server.server_close()
    assert bare.fileno() == -1


# --- what the helpers refuse -----------------------------------------------------------


def test_helpers_refuse_options_that_would_bind(lease: Lease) -> None:
    from aiohttp import web

    with pytest.raises(TypeError, match="drop port"):
        serve_asgi(asgi_app([]), lease, port=8000)
    with pytest.raises(TypeError, match="drop reload"):
        serve_asgi(asgi_app([]), lease, reload=True)
    with pytest.raises(TypeError, match="drop host, port"):
        serve_aiohttp(web.Application(), lease, host="0.0.0.0", port=8080)
    with pytest.raises(TypeError, match="drop reuse_port"):
        asyncio.run(serve_streams_async(lease, lambda r, w: None, reuse_port=True))
    assert lease.socket is not None and lease.socket.fileno() != -1  # untouched


def test_helpers_refuse_sockets_they_cannot_serve(lease: Lease) -> None:
    with socket.socket() as bound_only:
        bound_only.bind(("127.0.0.1", 0))
        with pytest.raises(PortPoolError, match="not listening"):
            make_http_server(bound_only, Hello)
    with (
        socket.socket(type=socket.SOCK_DGRAM) as udp,
        pytest.raises(PortPoolError, match="not a stream socket"),
    ):
        make_http_server(udp, Hello)
    with pytest.raises(TypeError, match=r"Lease or a socket\.socket"):
        make_http_server(lease.port, Hello)  # type: ignore[call-overload]
    lease.close_socket()
    with pytest.raises(PortPoolError, match=f"port {lease.port}: the lease's socket"):
        make_http_server(lease, Hello)


# --- blocking helpers in a real process, stopped by a real signal ----------------------

CHILD = """
import asyncio, json, os, sys
from portpool import StateDir, acquire
from portpool.integrations import serve_aiohttp, serve_asgi, serve_http

kind, port = sys.argv[1], int(sys.argv[2])
state = StateDir.open(os.environ["PORTPOOL_HOME"])


def say(line):
    print(line, flush=True)


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                say("lifespan shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/slow":
        say("slow request")
        await asyncio.sleep(1)
    body = json.dumps({"pid": os.getpid()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


with acquire(state, [port], service="web") as lease:
    say("ready")
    if kind == "asgi":
        serve_asgi(asgi, lease, log_level="warning", lifespan="on")
    elif kind == "aiohttp":
        from aiohttp import web

        async def hello(request):
            return web.json_response({"pid": os.getpid()})

        app = web.Application()
        app.router.add_get("/", hello)
        serve_aiohttp(app, lease, print=None)
    else:
        from http.server import BaseHTTPRequestHandler

        class Hello(BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"pid": os.getpid()}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        serve_http(lease, Hello)
    say("returned")
say("released")
"""


def start_child(kind: str, port: int) -> subprocess.Popen[bytes]:
    # Unbuffered bytes, so a select() on the pipe sees every line the child printed.
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def read_line(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            proc.kill()
            raise AssertionError(f"no line from the child in {timeout_s} s")
    return proc.stdout.readline().decode().strip()


@posix_signals
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("kind", ["asgi", "aiohttp", "http"])
def test_blocking_helper_serves_until_signal_then_returns_and_releases(
    state: StateDir, port_base: int, kind: str, stop: signal.Signals
) -> None:
    proc = start_child(kind, port_base)
    try:
        assert read_line(proc) == "ready"
        response = httpx.get(f"http://127.0.0.1:{port_base}/", timeout=30, trust_env=False)
        assert response.json() == {"pid": proc.pid}
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().split()
    assert lines[-2:] == ["returned", "released"]  # the helper returned; `with` released
    # Lock, socket and record are gone: the port can be acquired again at once.
    with acquire(state, [port_base], service="web") as again:
        assert again.port == port_base


@posix_signals
def test_serve_asgi_finishes_a_request_in_flight_on_sigterm(
    state: StateDir, port_base: int
) -> None:
    proc = start_child("asgi", port_base)
    result: list[httpx.Response] = []

    def slow_request() -> None:
        result.append(httpx.get(f"http://127.0.0.1:{port_base}/slow", timeout=30, trust_env=False))

    client = threading.Thread(target=slow_request)
    try:
        assert read_line(proc) == "ready"
        client.start()
        assert read_line(proc) == "slow request"
        proc.send_signal(signal.SIGTERM)  # while the request is being handled
        client.join(timeout=30)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
        client.join(timeout=30)
    assert [r.status_code for r in result] == [200]
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["lifespan shutdown", "returned", "released"]


IN_A_THREAD = """
import os, sys, threading, urllib.request
from portpool import StateDir, acquire
from portpool.integrations import serve_aiohttp, serve_asgi, serve_http

kind, port = sys.argv[1], int(sys.argv[2])
state = StateDir.open(os.environ["PORTPOOL_HOME"])
errors = []


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": kind.encode()})


def serve(lease):
    try:
        if kind == "asgi":
            serve_asgi(asgi, lease, log_level="warning", lifespan="off")
        elif kind == "aiohttp":
            from aiohttp import web

            async def hello(request):
                return web.Response(text=kind)

            app = web.Application()
            app.router.add_get("/", hello)
            serve_aiohttp(app, lease, print=None)
        else:
            from http.server import BaseHTTPRequestHandler

            class Hello(BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(kind)))
                    self.end_headers()
                    self.wfile.write(kind.encode())

                def log_message(self, *args):
                    pass

            serve_http(lease, Hello)
    except BaseException as e:
        errors.append(repr(e))


with acquire(state, [port], service="web") as lease:
    server = threading.Thread(target=serve, args=(lease,), daemon=True)
    server.start()
    body = "none"
    for _ in range(60):  # the lease's socket queues a request until a server accepts it
        if errors:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as reply:
                body = reply.read().decode()
            break
        except OSError:
            continue
    print(body, errors, flush=True)
"""


@pytest.mark.parametrize("kind", ["asgi", "aiohttp", "http"])
def test_blocking_helpers_serve_from_a_thread_that_is_not_the_main_one(
    state: StateDir, port_base: int, kind: str
) -> None:
    """Signal handlers belong to the main thread, so there each helper serves until the
    process ends (as the docstrings say). ``serve_aiohttp`` failed at once instead:
    aiohttp's ``run_app`` set its signal handlers, 'set_wakeup_fd only works in main
    thread', and every request waited for a server that was gone."""
    done = subprocess.run(
        [sys.executable, "-c", IN_A_THREAD, kind, str(port_base)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [kind, "[]"], done.stdout + done.stderr
