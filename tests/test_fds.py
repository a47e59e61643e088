"""Receiving sockets by LISTEN_FDS: real children with real sockets at fds 3, 4, ...

Anything that makes listen_fds wrap fds runs in a child: in this process fd 3 belongs
to pytest. A tiny exec shim puts the sockets at fds 3.. and sets LISTEN_PID to its own
pid, which the exec'd program keeps (no preexec_fn).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from portpool import Lease, PassedSocketError
from portpool.integrations import listen_fds, listen_socket

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="LISTEN_FDS is POSIX-only")

ENV = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")

# Usage: python -c SHIM <pid: self|unset|N> <count> <fd>... <program> <args>...
SHIM = """
import fcntl, os, sys
pid_mode, count = sys.argv[1], int(sys.argv[2])
sources = [int(a) for a in sys.argv[3:3 + count]]
command = sys.argv[3 + count:]
top = 3 + count
temps = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in sources]
for fd in sources:
    if fd >= top:
        os.close(fd)
for i, temp in enumerate(temps):
    os.dup2(temp, 3 + i)
    os.close(temp)
if pid_mode == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
elif pid_mode != "unset":
    os.environ["LISTEN_PID"] = pid_mode
os.execv(command[0], command)
"""

PROBE = """
import json, os, sys
from portpool.errors import PassedSocketError
from portpool.integrations import listen_fds, listen_socket
out = {"pid": os.getpid()}
try:
    got = listen_fds()
    out["sockets"] = {
        name: {
            "port": s.getsockname()[1] if isinstance(s.getsockname(), tuple) else None,
            "inode": os.fstat(s.fileno()).st_ino,
            "fd": s.fileno(),
            "inheritable": s.get_inheritable(),
        }
        for name, s in got.items()
    }
    out["same_objects_again"] = all(listen_fds()[n] is s for n, s in got.items())
    out["by_name"] = {n: listen_socket(n).fileno() for n in got}
except PassedSocketError as e:
    out["error"] = str(e)
out["env"] = {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")}
try:
    os.fstat(3)
    out["fd3_open"] = True
except OSError:
    out["fd3_open"] = False
print(json.dumps(out))
"""

SERVER = """
import json, os, sys
from portpool.integrations import listen_socket
kind = sys.argv[1]
sock = listen_socket("web")
info = json.dumps({
    "pid": os.getpid(),
    "inode": os.fstat(sock.fileno()).st_ino,
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}).encode()
if kind == "http":
    from http.server import BaseHTTPRequestHandler
    from portpool.integrations import serve_http

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(info)))
            self.end_headers()
            self.wfile.write(info)

        def log_message(self, *args):
            pass

    serve_http(sock, Handler)
elif kind == "asgi":
    from portpool.integrations import serve_asgi

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": info})

    serve_asgi(app, sock, log_level="warning", lifespan="off")
elif kind == "aiohttp":
    from aiohttp import web
    from portpool.integrations import serve_aiohttp

    async def handle(request):
        return web.Response(body=info)

    app = web.Application()
    app.router.add_get("/", handle)
    serve_aiohttp(app, sock, print=None)
print("stopped", flush=True)
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def spawn(
    fds: list[int],
    argv: list[str],
    *,
    names: str | None = None,
    pid: str = "self",
    count: str | None = None,
) -> subprocess.Popen[str]:
    """Start ``argv`` with ``fds`` at 3.., LISTEN_FDS/LISTEN_FDNAMES set, LISTEN_PID per ``pid``."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["LISTEN_FDS"] = str(len(fds)) if count is None else count
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return subprocess.Popen(
        [sys.executable, "-c", SHIM, pid, str(len(fds)), *map(str, fds), *argv],
        env=env,
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def probe(fds: list[int], **kw: Any) -> dict[str, Any]:
    proc = spawn(fds, [sys.executable, "-c", PROBE], **kw)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def listeners(count: int) -> list[socket.socket]:
    made = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        made.append(s)
    return made


# --- serving a received socket, end to end ---------------------------------------------


@pytest.mark.parametrize("kind", ["http", "asgi", "aiohttp"])
def test_child_serves_the_received_socket_as_is(lease: Lease, kind: str) -> None:
    proc = spawn([lease.fileno()], [sys.executable, "-c", SERVER, kind], names="web")
    try:
        # The lease's socket listens already: the request waits in its backlog until
        # the child accepts, so there is no readiness race and no moment the port is free.
        response = httpx.get(f"http://127.0.0.1:{lease.port}/", timeout=30, trust_env=False)
        assert response.status_code == 200
        info = response.json()
        assert info["pid"] == proc.pid  # the exec'd child served it, under LISTEN_PID
        assert info["inode"] == lease.socket_inode  # the very socket we hold, not a rebind
        assert info["env"] == []  # LISTEN_* unset, so its own children won't take the fds
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped")  # the helper returned after a graceful stop


# --- what listen_fds returns -----------------------------------------------------------


def test_names_map_to_the_sockets_in_order() -> None:
    socks = listeners(3)
    ports = [s.getsockname()[1] for s in socks]
    try:
        out = probe([s.fileno() for s in socks], names="api::web")
    finally:
        for s in socks:
            s.close()
    got = out["sockets"]
    assert list(got) == ["api", "fd4", "web"]  # an empty name falls back to its fd number
    assert [got[n]["port"] for n in got] == ports
    assert [got[n]["fd"] for n in got] == [3, 4, 5]
    assert not any(entry["inheritable"] for entry in got.values())
    assert out["same_objects_again"] is True  # a second call does not re-wrap the fds
    assert out["by_name"] == {"api": 3, "fd4": 4, "web": 5}
    assert out["env"] == dict.fromkeys(ENV)


def test_missing_names_are_named_by_fd() -> None:
    socks = listeners(2)
    try:
        out = probe([s.fileno() for s in socks])  # no LISTEN_FDNAMES at all
        fewer = probe([s.fileno() for s in socks], names="web")
    finally:
        for s in socks:
            s.close()
    assert list(out["sockets"]) == ["fd3", "fd4"]
    assert list(fewer["sockets"]) == ["web", "fd4"]


def test_fd_that_is_not_a_socket_is_refused_and_left_open(tmp_path: Path) -> None:
    sock = listeners(1)[0]
    path = tmp_path / "not-a-socket"
    path.write_text("x")
    with path.open() as f:
        try:
            out = probe([sock.fileno(), f.fileno()], names="web:file")
        finally:
            sock.close()
    assert "fd 4 (file) is not a socket" in out["error"]
    assert out["fd3_open"] is True  # the socket already wrapped is not closed by the error
    assert out["env"] == dict.fromkeys(ENV)  # unset even on error


def test_listen_pid_of_another_process_in_a_child_gets_nothing() -> None:
    sock = listeners(1)[0]
    try:
        out = probe([sock.fileno()], names="web", pid="1")
        unset = probe([sock.fileno()], names="web", pid="unset")
    finally:
        sock.close()
    assert out["sockets"] == {}
    assert out["fd3_open"] is True
    assert unset["sockets"] == {}  # the protocol requires LISTEN_PID


def test_listen_pid_of_another_process_gets_nothing_and_unsets(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_FDNAMES", "web")
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert listen_fds() == {}
    assert all(name not in os.environ for name in ENV)


def test_nothing_passed(clean_env: pytest.MonkeyPatch) -> None:
    assert listen_fds() == {}
    with pytest.raises(PassedSocketError, match="no sockets were passed"):
        listen_socket("web")


def test_unset_environment_false_keeps_the_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_PID", "1")
    assert listen_fds(unset_environment=False) == {}
    assert os.environ["LISTEN_FDS"] == "1"
    assert os.environ["LISTEN_PID"] == "1"


@pytest.mark.parametrize(
    ("count", "pid", "names", "message"),
    [
        ("two", "self", None, "not numbers"),
        ("", "self", None, "not numbers"),
        ("1", "12x", None, "not numbers"),
        ("-1", "self", None, "out of range"),
        ("5000", "self", None, "out of range"),
        ("1", "self", "a:b", "2 names"),
        ("2", "self", "web:web", "names web more than once"),
    ],
)
def test_malformed_variables_raise(
    clean_env: pytest.MonkeyPatch, count: str, pid: str, names: str | None, message: str
) -> None:
    # Each of these is refused before any fd is looked at, so it is safe in this process.
    clean_env.setenv("LISTEN_FDS", count)
    clean_env.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    if names is not None:
        clean_env.setenv("LISTEN_FDNAMES", names)
    with pytest.raises(PassedSocketError, match=message):
        listen_fds()
    assert all(name not in os.environ for name in ENV)  # unset even on error


def test_listen_socket_errors_name_what_was_passed() -> None:
    socks = listeners(2)
    script = (
        "from portpool.integrations import listen_socket\n"
        "from portpool.errors import PassedSocketError\n"
        "for name in (None, 'nope'):\n"
        "    try:\n"
        "        listen_socket(name)\n"
        "    except PassedSocketError as e:\n"
        "        print(e)\n"
        "print(listen_socket('api').getsockname()[1], listen_socket('web').getsockname()[1])\n"
    )
    try:
        proc = spawn([s.fileno() for s in socks], [sys.executable, "-c", script], names="api:web")
        out, err = proc.communicate(timeout=60)
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    assert proc.returncode == 0, err
    several, unknown, both = out.strip().splitlines()
    assert "several sockets were passed (api, web); name one" in several
    assert "no socket named 'nope' was passed (got: api, web)" in unknown
    assert both.split() == [str(p) for p in ports]  # both names can be taken, one by one
