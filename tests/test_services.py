"""The reference services, as real processes on real pooled sockets, with real clients.

The first part starts the services itself, the way ``portpool up`` does (an instance of a
layout on free test ports, each socket passed at fd 3 by the systemd protocol), so each
protocol is tested alone. The end-to-end part runs ``portpool up`` with the default
layout, as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tests.helpers import kill_if_running

from conftest import find_free_block
from portpool._platform import tcp_sockets
from portpool.instance import Instance, start_instance
from portpool.layout import Layout, Service
from portpool.pool import acquire
from portpool.services import SERVICES
from portpool.statedir import StateDir

MCP_SERVICES = ["mcp-universal", "ollama-mcp", "groq-api", "sandra-ia"]
ALL_SERVICES = [*MCP_SERVICES, "conversational", "api-server"]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# Puts the socket at fd 3 and sets LISTEN_PID to the service's own pid, then execs it:
# what portpool's spawner does, in four lines.
SHIM = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES=sys.argv[2], LISTEN_PID=str(os.getpid()))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'portpool.services', sys.argv[2]])\n"
)

# A stand-in for `portpool up`: starts one service through SHIM, prints its pid, waits.
FAKE_SUPERVISOR = (
    "import os, subprocess, sys, time\n"
    "env = dict(os.environ, PORTPOOL_SUPERVISOR_PID=str(os.getpid()))\n"
    "fd = int(sys.argv[2])\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], *sys.argv[2:]],\n"
    "                         env=env, pass_fds=(fd,), stderr=sys.stderr)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(300)\n"
)


# ---------------------------------------------------------------- helpers


def free_block_twice(size: int = 20) -> int:
    """A block free for instance 1 and for instance 2 (100 ports higher)."""
    for _ in range(50):
        base = find_free_block(size, low=16000, high=16900)
        if find_free_block(size, low=base + 100, high=base + 100 + size + 1) == base + 100:
            return base
    raise RuntimeError("no port block free for two instances in 16000..17000")


def layout_on(base: int) -> Layout:
    """The default layout's six services, on pools of 3 from ``base`` (stride 100)."""
    services = tuple(Service(name, base + 3 * i, 3) for i, name in enumerate(ALL_SERVICES))
    return Layout(app="qwen-valencia", services=services)


def spawn(
    kind: str,
    env: dict[str, str],
    log: Path,
    sock: socket.socket | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m portpool.services kind`` with ``sock`` at fd 3 (or no socket)."""
    with log.open("ab") as err:
        if sock is None:
            return subprocess.Popen(
                [sys.executable, "-m", "portpool.services", kind], env=env, stderr=err
            )
        fd = sock.fileno()
        return subprocess.Popen(
            [sys.executable, "-c", SHIM, str(fd), kind], env=env, pass_fds=(fd,), stderr=err
        )


def service_env(instance: Instance, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT"))}
    env["PORTPOOL_HOME"] = os.environ["PORTPOOL_HOME"]
    env.update(instance.env(name))
    env["PORTPOOL_SUPERVISOR_PID"] = str(os.getpid())
    return env


def wait_healthy(
    port: int, proc: subprocess.Popen[bytes] | None, log: Path, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """Poll ``GET /health`` until it answers (bounded); fail with the service's log."""
    where = f"[{host}]" if ":" in host else host
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"service on {port} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            response = httpx.get(f"http://{where}:{port}/health", timeout=2, trust_env=False)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.1)
    pytest.fail(f"service on {port} did not answer /health: {last}\n{log.read_text()}")


def wait_gone(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """True once ``pid`` has exited (reaped, or a zombie nobody has reaped yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Running:
    """An instance of the test layout with all six services running as processes."""

    instance: Instance
    procs: dict[str, subprocess.Popen[bytes]]
    logs: Path
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, service: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"


def start_all(state: StateDir, layout: Layout, logs: Path) -> Running:
    instance = start_instance(layout, state=state, heartbeat=False)
    running = Running(instance, {}, logs, dict(instance.ports))
    try:
        for name in ALL_SERVICES:
            lease = instance.leases[name]
            assert lease.socket is not None
            proc = spawn(name, service_env(instance, name), logs / f"{name}.log", lease.socket)
            running.procs[name] = proc
            lease.close_socket()  # the service holds it now, as under `portpool up`
        instance.set_service_pids({name: p.pid for name, p in running.procs.items()})
        for name, proc in running.procs.items():
            wait_healthy(running.ports[name], proc, logs / f"{name}.log")
    except BaseException:
        stop_all(running)
        raise
    return running


def stop_all(running: Running) -> dict[str, int]:
    for proc in running.procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = {name: stop(proc) for name, proc in running.procs.items()}
    running.instance.release()
    return codes


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Instance 1 of the test layout, six services serving, in a private state dir."""
    root = tmp_path_factory.mktemp("services")
    mp = pytest.MonkeyPatch()
    mp.setenv("PORTPOOL_HOME", str(root / "state"))
    state = StateDir.open(str(root / "state"))
    try:
        layout = layout_on(free_block_twice())
        run = start_all(state, layout, root)
        yield run
        stop_all(run)
    finally:
        state.close()
        mp.undo()


def mcp_call(url: str, tool: str) -> tuple[list[str], Any]:
    """The tool names of the MCP server at ``url`` and ``tool``'s structured answer."""
    from mcp import Client

    async def talk() -> tuple[list[str], Any]:
        async with Client(url) as client:
            tools = await client.list_tools()
            result = await client.call_tool(tool, {})
            assert not result.is_error, result
            return [t.name for t in tools.tools], result.structured_content

    return asyncio.run(asyncio.wait_for(talk(), 30))


def ws_exchange(url: str, messages: list[str | bytes]) -> list[dict[str, Any]]:
    from websockets.asyncio.client import connect

    async def talk() -> list[dict[str, Any]]:
        replies = []
        async with connect(url, open_timeout=10) as ws:
            for message in messages:
                await ws.send(message)
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return replies

    return asyncio.run(talk())


# ---------------------------------------------------------------- each protocol alone


def test_every_default_service_has_a_module() -> None:
    assert set(SERVICES) == set(ALL_SERVICES)
    assert {SERVICES[name] for name in MCP_SERVICES} == {"mcp_server"}


@pytest.mark.parametrize("name", MCP_SERVICES)
def test_mcp_service_tools_over_streamable_http(running: Running, name: str) -> None:
    tools, info = mcp_call(running.url(name, "/mcp"), "instance_info")
    assert {"ping", "instance_info"} <= set(tools)
    assert info["app"] == "qwen-valencia"
    assert info["instance"] == running.instance.number == 1
    assert info["service"] == name
    assert info["port"] == running.ports[name]
    assert info["pid"] == running.procs[name].pid
    assert info["ports"] == running.ports

    _, pong = mcp_call(running.url(name, "/mcp"), "ping")
    assert pong == {"result": f"pong from {name} (instance 1)"}


def test_every_service_reports_health_with_its_own_pid(running: Running) -> None:
    for name, proc in running.procs.items():
        health = httpx.get(running.url(name, "/health"), trust_env=False).json()
        assert health == {
            "ok": True,
            "app": "qwen-valencia",
            "service": name,
            "instance": 1,
            "port": running.ports[name],
            "pid": proc.pid,
        }


def test_conversational_replies_naming_instance_and_service(running: Running) -> None:
    port = running.ports["conversational"]
    replies = ws_exchange(f"ws://127.0.0.1:{port}/", ["hello", "second message", b"\x00"])
    assert replies[0]["reply"] == "instance 1 conversational heard: hello"
    assert replies[0]["instance"] == 1
    assert replies[0]["service"] == "conversational"
    assert replies[0]["port"] == port
    assert replies[1]["message"] == "second message"
    assert "error" in replies[2]


def test_a_client_that_closes_with_an_error_code_is_no_traceback_in_the_log(
    running: Running,
) -> None:
    """A client closing with 1011 (or dropping the connection) made the conversational
    service log "connection handler failed" with a full ConnectionClosedError traceback."""
    from websockets.asyncio.client import connect

    port = running.ports["conversational"]
    log = running.logs / "conversational.log"

    async def talk_then_fail() -> None:
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
            await ws.send("hello")
            await asyncio.wait_for(ws.recv(), 10)
            await ws.close(code=1011, reason="client failed")

    asyncio.run(talk_then_fail())
    # It still serves, and said nothing of the client's close.
    assert ws_exchange(f"ws://127.0.0.1:{port}/", ["again"])[0]["message"] == "again"
    assert "Traceback" not in log.read_text()
    assert "connection handler failed" not in log.read_text()


def test_health_checks_leave_no_wait_and_no_error_on_a_checked_server(port_base: int) -> None:
    """The api-server's checks kept connections alive (each port then sat in TIME_WAIT
    after its service stopped); reset without asking the service to close, they made
    an HTTP/1.1 http.server log a ConnectionResetError on every check."""
    import http.server
    import threading

    from portpool.services.api_server import check_health, health_client

    errors: list[str] = []

    class Health(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps a connection unless asked to close

        def do_GET(self) -> None:
            body = json.dumps({"service": "svc", "port": port_base, "pid": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(repr(sys.exc_info()[1]))

    server = Server(("127.0.0.1", port_base), Health)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()

    async def check_thrice() -> list[dict[str, Any]]:
        async with health_client() as client:
            return [await check_health(client, "svc", port_base) for _ in range(3)]

    try:
        checks = asyncio.run(check_thrice())
        time.sleep(0.2)  # the server's threads end their connections
    finally:
        server.shutdown()
        server.server_close()
    assert [c["healthy"] for c in checks] == [True] * 3, checks
    assert errors == []
    waiting = {"time-wait", "fin-wait-1", "fin-wait-2", "closing"}
    assert [s for s in tcp_sockets(port_base) if s.state in waiting] == []


def test_api_services_lists_all_six_healthy(running: Running) -> None:
    body = httpx.get(running.url("api-server", "/api/services"), trust_env=False).json()
    assert body["app"] == "qwen-valencia"
    assert body["instance"] == 1
    assert body["healthy"] is True
    by_name = {s["name"]: s for s in body["services"]}
    assert sorted(by_name) == sorted(ALL_SERVICES)
    for name, service in by_name.items():
        assert service["healthy"] is True, service
        assert service["port"] == running.ports[name]
        assert service["pool"] == running.instance.pool(name)
        assert service["pid"] == running.procs[name].pid


def test_api_health(running: Running) -> None:
    body = httpx.get(running.url("api-server", "/api/health"), trust_env=False).json()
    assert body["ok"] is True
    assert body["pid"] == running.procs["api-server"].pid


def test_api_instances_lists_every_instance_with_live_health(running: Running) -> None:
    # A second instance in the same state dir whose ports nobody serves: it must be
    # listed, alive, with every service down (the check times out on the unserved socket).
    layout = running.instance.layout
    second = start_instance(layout, state=running.instance.state, heartbeat=False)
    try:
        url = running.url("api-server", "/api/instances")
        plain = httpx.get(url, trust_env=False).json()
        assert [i["number"] for i in plain["instances"]] == [1, 2]
        assert all("health" not in s for i in plain["instances"] for s in i["services"])

        checked = httpx.get(url, params={"health": "1"}, timeout=10, trust_env=False).json()
        first, other = checked["instances"]
        assert first["alive"] and other["alive"]
        assert {s["name"]: s["port"] for s in first["services"]} == running.ports
        assert all(s["health"]["healthy"] for s in first["services"])
        assert {s["name"]: s["port"] for s in other["services"]} == second.ports
        assert all(p - running.ports[n] == 100 for n, p in second.ports.items())
        assert not any(s["health"]["healthy"] for s in other["services"])
        assert {s["health"]["error"] for s in other["services"]} == {"no answer within 1 s"}
    finally:
        second.release()
    after = httpx.get(url, trust_env=False).json()
    assert [i["number"] for i in after["instances"]] == [1]


def test_the_api_server_checks_its_services_on_the_layouts_host(
    state: StateDir, tmp_path: Path
) -> None:
    """With ``host = "::1"`` the api-server checked 127.0.0.1: every service read as
    down on the dashboard while ``up`` said all were ready."""
    from portpool._addresses import has_ipv6_loopback

    if not has_ipv6_loopback():
        pytest.skip("this host has no ::1")
    base = find_free_block(6, low=16000, high=16900)
    names = ("conversational", "api-server")
    layout = Layout(
        "qwen-valencia", tuple(Service(n, base + 3 * i, 3) for i, n in enumerate(names)), "::1"
    )
    instance = start_instance(layout, state=state, heartbeat=False)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in names:
            lease = instance.leases[name]
            assert lease.socket is not None
            log = tmp_path / f"{name}.log"
            procs[name] = spawn(name, service_env(instance, name), log, lease.socket)
            lease.close_socket()
        instance.set_service_pids({name: p.pid for name, p in procs.items()})
        for name, proc in procs.items():
            wait_healthy(instance.ports[name], proc, tmp_path / f"{name}.log", "::1")
        url = f"http://[::1]:{instance.ports['api-server']}"
        body = httpx.get(f"{url}/api/services", timeout=10, trust_env=False).json()
        assert body["healthy"] is True, body
        assert {s["name"]: s["pid"] for s in body["services"]} == {
            n: p.pid for n, p in procs.items()
        }
        listed = httpx.get(f"{url}/api/instances?health=1", timeout=10, trust_env=False).json()
        (record,) = listed["instances"]
        assert all(s["health"]["healthy"] for s in record["services"]), record
    finally:
        for proc in procs.values():
            stop(proc)
        instance.release()


def test_the_api_server_answers_only_loopback_host_names(running: Running) -> None:
    """A page of evil.example that resolves itself to 127.0.0.1 (DNS rebinding) could
    read every instance's directories and pids: only loopback names are answered (421
    else), as the MCP services do; /health answers any Host, for health checkers."""
    port = running.ports["api-server"]
    url = running.url("api-server")

    def status(path: str, host: str) -> int:
        return httpx.get(url + path, headers={"Host": host}, trust_env=False).status_code

    for path in ("/", "/api/instances", "/api/services"):
        assert status(path, f"evil.example:{port}") == 421, path
        assert status(path, f"localhost.evil.example:{port}") == 421, path
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert status(path, host) == 200, (path, host)
    assert status("/health", f"evil.example:{port}") == 200
    assert status("/api/health", f"evil.example:{port}") == 200


def test_dashboard_page_is_served_self_contained(running: Running) -> None:
    response = httpx.get(running.url("api-server", "/"), trust_env=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'id="instances"' in page
    assert "/api/instances?health=1" in page
    assert "http://" not in page and "https://" not in page  # no assets from elsewhere


# ---------------------------------------------------------------- stopping


def lone_service(
    state: StateDir, kind: str, tmp_path: Path, socket_passed: bool = True
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """One service on a fresh lease, started by this test process."""
    base = find_free_block(5, low=16000, high=17000)
    lease = acquire(state, range(base, base + 5), app="qwen-valencia", instance=1, service=kind)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT"))}
    env.update(
        PORTPOOL_APP="qwen-valencia",
        PORTPOOL_INSTANCE="1",
        PORTPOOL_SERVICE=kind,
        PORT=str(lease.port),
        PORTPOOL_HOME=str(state.path),
        PORTPOOL_SUPERVISOR_PID=str(os.getpid()),
    )
    log = tmp_path / f"{kind}.log"
    if socket_passed:
        proc = spawn(kind, env, log, lease.socket)
        lease.close_socket()
    else:
        lease.close_socket()  # "port" mode: the service binds the number itself
        proc = spawn(kind, env, log)
    try:
        wait_healthy(lease.port, proc, log)
    except BaseException:
        stop(proc)
        raise
    finally:
        lease.release()
    return proc, lease.port, log


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    ("kind", "signum"),
    [
        ("mcp-universal", signal.SIGTERM),
        ("conversational", signal.SIGTERM),
        ("api-server", signal.SIGTERM),
        ("api-server", signal.SIGINT),
    ],
)
def test_stop_signal_exits_zero_and_closes_the_port(
    state: StateDir, tmp_path: Path, kind: str, signum: signal.Signals
) -> None:
    proc, port, log = lone_service(state, kind, tmp_path)
    proc.send_signal(signum)
    assert proc.wait(STOP_TIMEOUT_S) == 0, log.read_text()
    assert refused(port)
    assert f"{kind} stopped" in log.read_text()


def test_port_mode_binds_the_number_itself(state: StateDir, tmp_path: Path) -> None:
    proc, port, log = lone_service(state, "conversational", tmp_path, socket_passed=False)
    try:
        reply = ws_exchange(f"ws://127.0.0.1:{port}/", ["hi"])[0]
        assert reply["port"] == port
    finally:
        assert stop(proc) == 0, log.read_text()


@pytest.mark.parametrize("kind", ["conversational", "api-server"])
def test_service_exits_when_its_supervisor_is_killed(
    state: StateDir, tmp_path: Path, kind: str
) -> None:
    base = find_free_block(5, low=16000, high=17000)
    lease = acquire(state, range(base, base + 5), service=kind)
    assert lease.socket is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT"))}
    env.update(PORTPOOL_APP="qwen-valencia", PORTPOOL_INSTANCE="1", PORT=str(lease.port))
    log = tmp_path / "service.log"
    fd = lease.socket.fileno()
    with log.open("ab") as err:
        supervisor = subprocess.Popen(
            [sys.executable, "-c", FAKE_SUPERVISOR, SHIM, str(fd), kind],
            env=env,
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=err,
        )
    lease.close_socket()
    service_pid = None
    try:
        assert supervisor.stdout is not None
        service_pid = int(supervisor.stdout.readline())
        health = wait_healthy(lease.port, None, log)
        assert health["pid"] == service_pid
        supervisor.kill()  # no chance to stop its child: the child must notice by itself
        supervisor.wait()
        assert wait_gone(service_pid), log.read_text()
        assert "is gone; stopping" in log.read_text()
        assert refused(lease.port)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        if service_pid is not None and not wait_gone(service_pid, 0.1):
            os.kill(service_pid, signal.SIGKILL)
        lease.release()


def test_unknown_service_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "portpool.services", "no-such-service"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown service 'no-such-service'" in result.stderr
    assert "api-server" in result.stderr


# Holds the import of a service's runtime open (cold byte-code caches on a fresh clone
# take about a second there), saying so: a signal then lands inside the imports.
SLOW_IMPORT = """\
import sys, time
class SlowImport:
    def find_spec(self, name, path=None, target=None):
        if name == "portpool.services._runtime":
            print("importing", file=sys.stderr, flush=True)
            time.sleep(30)
        return None
sys.meta_path.insert(0, SlowImport())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_ctrl_c_while_a_service_imports_ends_it_without_a_traceback(tmp_path: Path) -> None:
    """A Ctrl-C early in `make run` reached the services in their imports: each printed
    a KeyboardInterrupt traceback of 60 lines."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "portpool.services", "groq-api"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    try:
        assert proc.stderr.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        kill_if_running(proc)
    assert proc.returncode == -signal.SIGINT, err  # dies of it, as an interrupted process
    assert "Traceback" not in err, err


# ---------------------------------------------------------------- end to end: `portpool up`

PORTPOOL = str(Path(sys.executable).with_name("portpool"))
FOREIGN_PORT = 6000


@dataclass
class Up:
    """One `portpool up` of the default layout, once all six services answer."""

    proc: subprocess.Popen[bytes]
    log: Path
    number: int
    ports: dict[str, int]
    pools: dict[str, list[int]]
    pids: dict[str, int]

    def url(self, service: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT"))}
    env["PORTPOOL_HOME"] = str(home)
    return env


def status_json(home: Path) -> dict[str, Any]:
    result = subprocess.run(
        [PORTPOOL, "status", "--json"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(result.stdout))


def start_up(home: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PORTPOOL, "up"], env=cli_env(home), stdout=out, stderr=subprocess.STDOUT
        )


def wait_up(home: Path, proc: subprocess.Popen[bytes], log: Path) -> Up:
    """Wait (bounded) until ``proc``'s instance is recorded with its service pids and every
    service answers /health."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"portpool up exited with {proc.returncode}:\n{log.read_text()}")
        for record in status_json(home)["instances"]:
            services = record["services"]
            if record["pid"] == proc.pid and all(
                s["pid"] not in (None, proc.pid) for s in services
            ):
                up = Up(
                    proc,
                    log,
                    record["number"],
                    {s["name"]: s["port"] for s in services},
                    {s["name"]: s["pool"] for s in services},
                    {s["name"]: s["pid"] for s in services},
                )
                for port in up.ports.values():
                    wait_healthy(port, proc, log)
                return up
        time.sleep(0.2)
    pytest.fail(f"portpool up did not record its services in time:\n{log.read_text()}")


def stop_up(up: Up) -> int:
    code = stop(up.proc)
    for pid in up.pids.values():
        if not wait_gone(pid, 5):
            os.kill(pid, signal.SIGKILL)
    return code


def api(up: Up, path: str, **params: str) -> dict[str, Any]:
    response = httpx.get(up.url("api-server", path), params=params, timeout=15, trust_env=False)
    response.raise_for_status()
    return dict(response.json())


@pytest.mark.slow
def test_up_serves_the_six_reference_services(home: Path, tmp_path: Path) -> None:
    up = wait_up(home, start_up(home, tmp_path / "up.log"), tmp_path / "up.log")
    try:
        assert up.number == 1
        assert sorted(up.ports) == sorted(ALL_SERVICES)
        # Every MCP service, through the official SDK's client, says what `status` says.
        for name in MCP_SERVICES:
            tools, info = mcp_call(up.url(name, "/mcp"), "instance_info")
            assert {"ping", "instance_info"} <= set(tools)
            assert info["service"] == name
            assert info["instance"] == 1
            assert info["port"] == up.ports[name]
            assert info["pid"] == up.pids[name]
            assert info["ports"] == up.ports

        services = api(up, "/api/services")
        assert services["healthy"] is True
        assert {s["name"]: s["port"] for s in services["services"]} == up.ports
        assert {s["name"]: s["pid"] for s in services["services"]} == up.pids
        assert all(s["healthy"] for s in services["services"])

        port = up.ports["conversational"]
        reply = ws_exchange(f"ws://127.0.0.1:{port}/", ["hello from a user"])[0]
        assert reply["reply"] == "instance 1 conversational heard: hello from a user"
        assert reply["pid"] == up.pids["conversational"]
    finally:
        code = stop_up(up)
    assert code == 0, up.log.read_text()
    assert all(wait_gone(pid, 0) for pid in up.pids.values())
    assert all(refused(port) for port in up.ports.values())
    assert status_json(home)["instances"] == []


@pytest.mark.slow
def test_two_ups_get_instances_one_and_two_and_see_each_other(home: Path, tmp_path: Path) -> None:
    logs = [tmp_path / "up1.log", tmp_path / "up2.log"]
    procs = [start_up(home, log) for log in logs]  # at once: they race for the slots
    ups: list[Up] = []
    try:
        ups = sorted(
            (wait_up(home, p, log) for p, log in zip(procs, logs, strict=True)),
            key=lambda u: u.number,
        )
        first, second = ups
        assert (first.number, second.number) == (1, 2)
        for name in ALL_SERVICES:
            assert second.pools[name] == [p + 100 for p in first.pools[name]]
            assert first.ports[name] in first.pools[name]
            assert second.ports[name] in second.pools[name]
        assert not set(first.ports.values()) & set(second.ports.values())

        ports = [port for up in ups for port in up.ports.values()]
        before = _closed_by_the_service(ports)  # what our own /health waits left
        for up in ups:
            listed = api(up, "/api/instances", health="1")
            assert listed["instance"] == up.number
            by_number = {i["number"]: i for i in listed["instances"]}
            assert sorted(by_number) == [1, 2]
            for other in ups:
                services = by_number[other.number]["services"]
                assert {s["name"]: s["port"] for s in services} == other.ports
                assert all(s["health"]["healthy"] for s in services), services
    finally:
        for proc in procs:
            stop(proc)
        for up in ups:
            stop_up(up)
    # The api-server's checks (the dashboard's, every 3 s) kept connections alive that
    # the services closed when stopped, and the WebSocket service closes each first:
    # every port of both instances was left in TIME_WAIT, unbindable without
    # SO_REUSEADDR for a minute after "its ports are free".
    assert _closed_by_the_service(ports) <= before


def _closed_by_the_service(ports: list[int]) -> set[tuple[int, str | None]]:
    """(port, peer) of every connection on ``ports`` whose service's side closed first
    and still waits (TIME_WAIT, FIN_WAIT): each keeps a plain bind off its port."""
    waiting = {"time-wait", "fin-wait-1", "fin-wait-2", "closing"}
    return {
        (s.port, s.remote)
        for port in ports
        for s in tcp_sockets(port)
        if s.state in waiting and s.port == port
    }


@pytest.mark.slow
def test_kill_9_of_up_leaves_no_service_serving(home: Path, tmp_path: Path) -> None:
    up = wait_up(home, start_up(home, tmp_path / "up.log"), tmp_path / "up.log")
    try:
        up.proc.kill()
        up.proc.wait()
        gone = {name: wait_gone(pid) for name, pid in up.pids.items()}
        assert all(gone.values()), (gone, up.log.read_text())
        assert all(refused(port) for port in up.ports.values())
    finally:
        stop_up(up)


@pytest.mark.slow
def test_foreign_listener_on_6000_moves_mcp_universal_to_6001(home: Path, tmp_path: Path) -> None:
    foreign = socket.socket()
    # Only to bind over TIME_WAIT leftovers of earlier tests; never over a live listener.
    foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        foreign.bind(("0.0.0.0", FOREIGN_PORT))
    except OSError as e:
        foreign.close()
        pytest.skip(
            f"port {FOREIGN_PORT} is already used on this host ({e.strerror}); "
            "the test needs to place its own foreign listener there"
        )
    foreign.listen()
    up = None
    try:
        up = wait_up(home, start_up(home, tmp_path / "up.log"), tmp_path / "up.log")
        assert up.ports["mcp-universal"] == 6001
        (record,) = status_json(home)["instances"]
        assert {s["name"]: s["port"] for s in record["services"]}["mcp-universal"] == 6001
        for name in MCP_SERVICES:
            _, info = mcp_call(up.url(name, "/mcp"), "instance_info")
            assert info["ports"]["mcp-universal"] == 6001
        services = api(up, "/api/services")
        assert {s["name"]: s["port"] for s in services["services"]}["mcp-universal"] == 6001
        assert services["healthy"] is True
        listed = api(up, "/api/instances", health="1")
        mcp = next(s for s in listed["instances"][0]["services"] if s["name"] == "mcp-universal")
        assert mcp["port"] == 6001 and mcp["health"]["healthy"]
        # The foreign program was left alone: it still listens and accepts.
        with socket.create_connection(("127.0.0.1", FOREIGN_PORT), timeout=5):
            pass
        assert foreign.fileno() != -1
    finally:
        if up is not None:
            stop_up(up)
        foreign.close()


def test_the_api_server_on_another_loopback_address_answers_only_loopback_host_names(
    state: StateDir, tmp_path: Path
) -> None:
    """On ``host = "127.0.0.2"`` (a loopback too) the Host check was off: only the three
    names 127.0.0.1, localhost and ::1 turned it on, so DNS rebinding to 127.0.0.2 read
    every instance's directories and pids. ``localhost.`` (the absolute name) is loopback."""
    base = find_free_block(3, low=16000, high=16900)
    layout = Layout("rebind-app", (Service("api-server", base, 3),), "127.0.0.2")
    instance = start_instance(layout, state=state, heartbeat=False)
    proc = None
    try:
        lease = instance.leases["api-server"]
        assert lease.socket is not None
        log = tmp_path / "api-server.log"
        proc = spawn("api-server", service_env(instance, "api-server"), log, lease.socket)
        lease.close_socket()
        port = instance.ports["api-server"]
        wait_healthy(port, proc, log, "127.0.0.2")

        def status(host: str) -> int:
            url = f"http://127.0.0.2:{port}/api/instances"
            return httpx.get(url, headers={"Host": host}, trust_env=False).status_code

        assert status(f"evil.example:{port}") == 421
        for host in (f"127.0.0.2:{port}", f"localhost.:{port}", "127.0.0.1", f"[::1]:{port}"):
            assert status(host) == 200, host
    finally:
        if proc is not None:
            stop(proc)
        instance.release()
