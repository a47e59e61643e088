"""Readiness probes on real sockets and programs, and `portpool up`'s start order:
"is up" only when every service is ready, dependents after their dependencies, and an
instance stopped when a service never gets ready or exits before it is."""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import LineReader, start, status_json, wait_for, write_service_layout

from portpool._platform import accept_queue_length, tcp_sockets
from portpool._readiness import ReadinessProbe, probe_host


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param(
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 on this host"),
    ),
]


@pytest.fixture
def listening(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    host = getattr(request, "param", "127.0.0.1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.bind((host, 0))
    sock.listen(16)
    yield sock
    sock.close()


# --- probes ---------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
@pytest.mark.parametrize("listening", FAMILIES, indirect=True)
def test_accept_queue_length_counts_waiting_connections(listening: socket.socket) -> None:
    address = listening.getsockname()[:2]
    assert accept_queue_length(listening) == 0
    clients = [socket.create_connection(address, timeout=5) for _ in range(3)]
    try:
        assert accept_queue_length(listening) == 3
        conn, _ = listening.accept()
        conn.close()
        assert accept_queue_length(listening) == 2
    finally:
        for c in clients:
            c.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
@pytest.mark.parametrize("listening", FAMILIES, indirect=True)
def test_tcp_on_a_passed_socket_waits_for_an_accept_not_a_handshake(
    listening: socket.socket,
) -> None:
    host, port = listening.getsockname()[:2]
    probe = ReadinessProbe("tcp", host, port, listening)
    try:
        # The kernel completes the probe's handshake, but nobody accepts: not ready.
        for _ in range(3):
            assert probe.check() is False
        assert accept_queue_length(listening) == 1  # the probe's (closed) connection waits
        assert "has not accepted" in probe.last_problem
        conn, _ = listening.accept()
        conn.close()
        assert probe.check() is True
    finally:
        probe.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
@pytest.mark.parametrize("listening", FAMILIES, indirect=True)
def test_a_connection_the_service_closed_first_counts_as_accepted(
    listening: socket.socket,
) -> None:
    """A fast service accepts the probe's connection and closes it before the probe
    does: its side is left without a file (FIN_WAIT2, then TIME_WAIT for a minute),
    which was read as "still queued", so up waited out the ready timeout and failed."""
    from portpool._platform import connection_accepted

    client = socket.create_connection(listening.getsockname()[:2], timeout=5)
    server_side, our_side = client.getpeername()[:2], client.getsockname()[:2]
    assert connection_accepted(listening.family, server_side, our_side) is False  # queued
    conn, _ = listening.accept()
    conn.close()  # the service closes first
    assert connection_accepted(listening.family, server_side, our_side) is True
    client.close()  # then the probe: the service's side is in TIME_WAIT
    assert connection_accepted(listening.family, server_side, our_side) is True


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
@pytest.mark.parametrize("listening", FAMILIES, indirect=True)
def test_a_service_that_shut_its_listening_socket_down_never_accepted(
    listening: socket.socket,
) -> None:
    """A service that never accepts but shuts the passed socket down (a common way to
    wake a thread blocked in accept, on a failed start): the kernel resets the queued
    probe connection, which is then gone from its table, and "gone" read as accepted
    and closed. up said the service was ready, and up, with the port listened on by
    nobody; a crash loop's runs each counted as progress."""
    host, port = listening.getsockname()[:2]
    probe = ReadinessProbe("tcp", host, port, listening)
    try:
        assert probe.check() is False  # queued, not accepted
        listening.shutdown(socket.SHUT_RD)  # as the service would, on the same socket
        for _ in range(3):
            assert probe.check() is False
            assert probe.proved_before_exit() is False
        assert "no longer listens" in probe.last_problem
    finally:
        probe.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
def test_tcp_probe_never_holds_up_a_server_that_reads_each_connection(
    listening: socket.socket,
) -> None:
    host, port = listening.getsockname()[:2]
    probe = ReadinessProbe("tcp", host, port, listening)
    assert probe.check() is False  # connected; nobody accepted yet
    with socket.create_connection((host, port), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert accept_queue_length(listening) == 2
        # A single-threaded server takes the probe's connection first and reads a
        # request from it: the probe closed its sending side, so the read ends at once.
        conn, _ = listening.accept()
        conn.settimeout(5)
        assert conn.recv(100) == b""
        conn.close()
        # One connection (the client's) still waits, yet the service proved it accepts.
        assert accept_queue_length(listening) == 1
        assert probe.check() is True


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
@pytest.mark.parametrize("listening", FAMILIES, indirect=True)
@pytest.mark.parametrize("answer", [b"ok\n", b""], ids=["answers", "closes"])
def test_tcp_probe_on_a_passed_socket_wakes_when_the_service_uses_its_connection(
    listening: socket.socket, answer: bytes
) -> None:
    # The keeper slept a whole interval (up to 50 ms) after the service had accepted;
    # the wait now ends when the service answers or closes the probe's connection.
    host, port = listening.getsockname()[:2]
    probe = ReadinessProbe("tcp", host, port, listening)
    stop = threading.Event()
    try:
        assert probe.check() is False  # connected; nobody accepted yet
        assert probe.wait(0.05, stop) is False  # a queued connection gets nothing
        conn, _ = listening.accept()
        if answer:
            conn.sendall(answer)
        conn.close()
        assert probe.wait(30, stop) is True  # woken by the service, not the time
        assert probe.check() is True
        assert probe.proved_before_exit() is True
    finally:
        probe.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
@pytest.mark.parametrize("host", FAMILIES)
def test_tcp_probe_sees_a_service_that_closed_its_connection_before_the_probe_did(
    host: str,
) -> None:
    # A service already accepting (a keeper's first check late on a loaded machine)
    # that closes each connection at once could close the probe's before the probe
    # closed its end: the service's side then waited out TIME_WAIT without a file,
    # which the kernel's table reads as "not accepted": not ready for a minute, so
    # the instance stopped at ready_timeout_s (about 1 start in 15 here).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    stop = threading.Event()
    for _ in range(50):
        with socket.socket(family) as listening:
            listening.bind((host, 0))
            listening.listen(16)
            port = listening.getsockname()[1]

            def serve(server: socket.socket = listening) -> None:
                with contextlib.suppress(OSError):
                    conn, _ = server.accept()
                    conn.close()

            service = threading.Thread(target=serve)
            service.start()
            probe = ReadinessProbe("tcp", host, port, listening)
            try:
                tries = 1
                while not probe.check() and tries < 100:  # 100 tries: 5 s at most
                    probe.wait(0.05, stop)
                    tries += 1
                assert probe.check() is True, f"not ready after {tries} tries"
            finally:
                probe.close()
                service.join(10)


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
def test_tcp_probe_asks_the_kernel_when_the_service_keeps_its_connection_silent(
    listening: socket.socket,
) -> None:
    host, port = listening.getsockname()[:2]
    probe = ReadinessProbe("tcp", host, port, listening)
    stop = threading.Event()
    try:
        assert probe.check() is False
        conn, _ = listening.accept()
        try:
            conn.settimeout(5)
            assert conn.recv(100) == b""  # the probe's end was closed for sending
            assert probe.wait(0.05, stop) is False  # accepted, but nothing reached us
            assert probe.check() is True  # the kernel says: taken off the queue
        finally:
            conn.close()
    finally:
        probe.close()


def test_tcp_on_a_port_means_something_listens(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    assert ReadinessProbe("tcp", "127.0.0.1", port).check() is True
    listening.close()
    probe = ReadinessProbe("tcp", "127.0.0.1", port)
    assert probe.check() is False
    assert "refused" in probe.last_problem.lower()


def test_http_wants_a_2xx_answer_on_the_path() -> None:
    answers = [503, 200]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(answers.pop(0) if answers else 200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        probe = ReadinessProbe("http:/health?x=1", "127.0.0.1", server.server_address[1])
        assert probe.check() is False
        assert "answered 503" in probe.last_problem
        assert probe.check() is True
        assert seen == ["/health?x=1", "/health?x=1"]
    finally:
        server.shutdown()
        server.server_close()


def test_log_matches_a_line_of_output_and_none_is_ready_at_once() -> None:
    probe = ReadinessProbe(r"log:listening on \d+", "127.0.0.1", 1)
    assert probe.check() is False
    assert "printed no line at all" in probe.last_problem  # buffered output, most likely
    probe.feed_line("starting")
    assert probe.check() is False
    assert "printed no line" not in probe.last_problem
    probe.feed_line("INFO listening on 8080")
    assert probe.check() is True
    assert ReadinessProbe("none", "127.0.0.1", 1).check() is True


def test_probe_host_maps_wildcards_to_loopback() -> None:
    assert [probe_host(h) for h in ("localhost", "0.0.0.0", "::", "::1", "10.0.0.1")] == [
        "127.0.0.1",
        "127.0.0.1",
        "::1",
        "::1",
        "10.0.0.1",
    ]


# --- through the real `portpool up` ---------------------------------------------------

# Records when it started and when it began to accept (a JSON line in RECORD), after
# DELAY seconds of "warming up"; prints "ready to serve" then; answers HTTP /health.
SERVICE = """\
import http.server, json, os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
name = os.environ["PORTPOOL_SERVICE"]
started = time.time()
print("warming up", flush=True)
time.sleep(float(os.environ.get("DELAY_" + name.upper(), "0")))
if os.environ.get("EXIT_" + name.upper()):
    sys.exit(int(os.environ["EXIT_" + name.upper()]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        self.wfile.write(name.encode())
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H, bind_and_activate=False)
srv.socket.close(); srv.socket = socket.socket(fileno=3)
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"name": name, "started": started, "accepting": time.time()}) + "\\n")
print("ready to serve", flush=True)
srv.serve_forever()
"""

NEVER_READY = """\
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # makes up wait its whole grace period
print("never ready", flush=True)
time.sleep(300)
"""


def write_config(tmp_path: Path, base: int, services: dict[str, dict[str, Any]]) -> Path:
    """A layout of ``services`` (their extra keys as TOML values), each running SERVICE."""
    return write_service_layout(tmp_path, base, services, app="readyapp", script=SERVICE)


def up_env(tmp_path: Path, **values: str) -> dict[str, str]:
    import os

    env = dict(os.environ, RECORD=str(tmp_path / "record.jsonl"))
    env.update(values)
    return env


def output_until_up(reader: LineReader, timeout: float = 60.0) -> list[str]:
    """``up``'s output lines up to "... is up" (bounded wait)."""
    return reader.until(lambda line: line.endswith("is up"), timeout)


def stop(reader: LineReader) -> tuple[str, str]:
    if reader.proc.poll() is None:
        reader.proc.send_signal(signal.SIGTERM)
    return reader.finish(60)


def script_command(tmp_path: Path, name: str, source: str) -> list[str]:
    """``[python, tmp_path/name]``, with ``source`` written there."""
    script = tmp_path / name
    script.write_text(source)
    return [sys.executable, str(script)]


def service_records(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """What each service of SERVICE wrote to ``record.jsonl`` (its start, its first
    accept), by name."""
    lines = (tmp_path / "record.jsonl").read_text().splitlines()
    return {r["name"]: r for r in map(json.loads, lines)}


def test_dependents_start_after_their_dependency_answered_its_probe(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_config(
        tmp_path,
        port_base,
        {
            "web": {"depends_on": ["api"], "ready": "http:/health"},
            "api": {"depends_on": ["db"], "ready": "http:/health"},
            "db": {"ready": "http:/health"},
        },
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path, DELAY_DB="1", DELAY_API="0.5"))
    reader = LineReader(proc)
    try:
        # While db is not ready, web waits unstarted: no pid yet (README, status --json).
        def waiting() -> dict[str, dict[str, Any]] | None:
            found = status_json(config)["instances"]
            by_name = {s["name"]: s for s in found[0]["services"]} if found else {}
            return by_name if by_name.get("db", {}).get("state") == "starting" else None

        services = wait_for(waiting, 30)
        assert services and services["web"]["state"] == "starting", services
        assert services["web"]["pid"] is None and services["web"]["started_at"] is None
        lines = output_until_up(reader)
        ready = [line.split()[1] for line in lines if " ready on port " in line]
        assert ready == ["db", "api", "web"], lines
        # Every service answers the moment "is up" is printed.
        for name in ("db", "api", "web"):
            (instance,) = status_json(config)["instances"]
            port = next(s["port"] for s in instance["services"] if s["name"] == name)
            assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).text == name
        records = service_records(tmp_path)
        assert records["api"]["started"] >= records["db"]["accepting"]
        assert records["web"]["started"] >= records["api"]["accepting"]
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


def test_log_readiness_waits_for_the_line(tmp_path: Path, port_base: int, home: Path) -> None:
    config = write_config(
        tmp_path,
        port_base,
        {"slow": {"ready": "log:^ready to serve$"}, "after": {"depends_on": ["slow"]}},
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path, DELAY_SLOW="1"))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader)
        said = lines.index(next(x for x in lines if x.endswith("| ready to serve")))
        became = lines.index(next(x for x in lines if "slow ready on port" in x))
        assert said < became
        by_name = service_records(tmp_path)
        assert by_name["after"]["started"] >= by_name["slow"]["accepting"]
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


def test_never_ready_stops_the_instance_within_the_timeout_and_grace(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    command = script_command(tmp_path, "never.py", NEVER_READY)
    config = write_config(
        tmp_path,
        port_base,
        {
            "stuck": {
                "command": command,
                "ready": "log:will never be printed",
                "ready_timeout_s": 2,
            },
            "later": {"depends_on": ["stuck"]},
        },
    )
    begun = time.monotonic()
    proc = start("up", "--config", str(config), "--grace", "1", env=up_env(tmp_path))
    reader = LineReader(proc)
    out, err = reader.finish(60)
    elapsed = time.monotonic() - begun
    assert proc.returncode == 5, (out, err)
    assert "service 'stuck' was not ready in time" in err
    # Which probe and which timeout, the keys to change (it said only what was missing).
    assert "(ready = 'log:will never be printed', ready_timeout_s = 2: no output line" in err
    assert "is up" not in out
    assert not (tmp_path / "record.jsonl").exists()  # "later" was never started
    # 2 s to get ready + 1 s of grace, plus room for two interpreters on a busy machine.
    assert elapsed < 2 + 1 + 20
    assert status_json(config)["instances"] == []


def test_exit_before_ready_stops_the_instance(tmp_path: Path, port_base: int, home: Path) -> None:
    config = write_config(tmp_path, port_base, {"early": {"restart": "on-failure"}, "b": {}})
    proc = start("up", "--config", str(config), env=up_env(tmp_path, EXIT_EARLY="7"))
    reader = LineReader(proc)
    out, err = reader.finish(60)
    assert proc.returncode == 5, (out, err)
    assert "service 'early' exited before it was ready (exit status 7)" in err
    assert "is up" not in out


@pytest.mark.slow
def test_reference_app_is_up_when_the_dashboard_answers(tmp_path: Path, home: Path) -> None:
    proc = start("up", env=up_env(tmp_path), cwd=str(tmp_path))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader, timeout=120)
        ready = [line.split()[1] for line in lines if " ready on port " in line]
        assert ready[-1] == "api-server" and len(ready) == 6
        (instance,) = status_json()["instances"]
        ports = {s["name"]: s["port"] for s in instance["services"]}
        # No waiting: the dashboard and every service answer now.
        page = httpx.get(f"http://127.0.0.1:{ports['api-server']}/", trust_env=False)
        assert page.status_code == 200 and "<html" in page.text.lower()
        for port in ports.values():
            assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200
        assert {s["state"] for s in instance["services"]} == {"ready"}
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


# Never ready; says which signal stopped it.
SAYS_ITS_SIGNAL = """\
import signal, sys, time
def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
time.sleep(60)
"""


def test_a_stop_while_starting_reaches_the_service_as_the_stop_signal(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    command = script_command(tmp_path, "says.py", SAYS_ITS_SIGNAL)
    config = write_config(
        tmp_path,
        port_base,
        {"slow": {"command": command, "ready": "log:never"}},
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path))
    reader = LineReader(proc)
    reader.until(lambda line: line.endswith("| started"))
    proc.send_signal(signal.SIGINT)
    out, _err = reader.finish(60)
    # up passes SIGINT on; the parent-death SIGTERM (a keeper thread that ended
    # before its service) must not get there first.
    assert "slow | got SIGINT" in out, out
    assert "got SIGTERM" not in out


# A listener that is nobody's child here: it forks, its parent exits, and it listens on
# the port given as soon as it can bind it (pid written to the file given then) until
# that file is removed.
FOREIGN = """\
import os, socket, sys, time
if os.fork():
    os._exit(0)
os.setsid()
deadline = time.monotonic() + 30
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
family = socket.AF_INET6 if ":" in host else socket.AF_INET
while True:
    try:
        server = socket.create_server((host, int(sys.argv[1])), family=family)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.005)
with open(sys.argv[2], "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 60
while os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="listeners' owners are read from /proc")
def test_a_foreign_listener_on_a_port_service_is_never_taken_for_the_service(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """socket = "port": the service binds the port itself, so a foreign program can be
    first. Its answer made the probe call the service ready ("is up", exit 0 for up
    --detach) while the service failed to bind; a crash loop was "ready" every time."""
    import subprocess

    service = (
        "import time; print('started', flush=True); time.sleep(2.0); "
        "raise SystemExit('could not bind: port taken')"
    )
    config = write_config(tmp_path, port_base, {
        "web": {"command": [sys.executable, "-c", service], "socket": "port"},
    })  # fmt: skip
    pid_file = tmp_path / "foreign.pid"
    # up holds the port while it starts; the foreign program binds it in the second
    # between up handing it over by number and the service binding it.
    proc = start("up", "--config", str(config), env=up_env(tmp_path))
    try:
        reader = LineReader(proc)
        reader.until(lambda line: line.endswith("| started"))
        subprocess.run([sys.executable, "-c", FOREIGN, str(port_base), str(pid_file)], check=True)
        out, err = reader.finish(60)
        assert pid_file.exists() and pid_file.read_text(), "the foreign listener never bound"
        # Stopped by the shield (4, the foreign listener), which the service's exit has
        # checked at once; never up.
        assert proc.returncode == 4, (out, err)
        assert "is up" not in out
        assert "ready on port" not in out
        # Not waited for, nor named as if portpool had started it (a subreaper knows).
        assert "still held" not in err
        assert out.splitlines()[-1] == "portpool: instance 1 stopped; its ports are free"
    finally:
        pid_file.unlink(missing_ok=True)  # the foreign listener ends
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Given its port by number: binds 127.0.0.1 once the foreign program holds its address.
BINDS_AFTER_FOREIGN = """\
import os, socket, sys, time
print("started", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
    if time.monotonic() > deadline:
        raise SystemExit("no foreign program")
    time.sleep(0.01)
try:
    server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
except OSError as e:
    raise SystemExit(f"could not bind: {e}")
print("bound", flush=True)
time.sleep(60)
"""


def _up_beside_a_foreign_taker(
    tmp_path: Path, port: int, host: str, foreign_host: str
) -> tuple[subprocess.Popen[str], str, str, str]:
    """``up`` of one `socket = "port"` service on ``port`` whose address ``foreign_host``
    a foreign program binds before the service binds 127.0.0.1 itself; the shield's
    interval (60 s) is longer than the test: only a check made at once names it."""
    pid_file = tmp_path / "foreign.pid"
    script = tmp_path / "service.py"
    script.write_text(BINDS_AFTER_FOREIGN)
    config = tmp_path / "portpool.toml"
    config.write_text(
        f'app = "takenapp"\nhost = "{host}"\nshield_interval = 60\nmax_instances = 1\n'
        f'[services.web]\nbase = {port}\nsize = 1\nsocket = "port"\n'
        f"command = {json.dumps([sys.executable, str(script), str(pid_file)])}\n"
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path))
    try:
        reader = LineReader(proc)
        reader.until(lambda line: line.endswith("| started"))
        foreign = [sys.executable, "-c", FOREIGN, str(port), str(pid_file), foreign_host]
        subprocess.run(foreign, check=True)
        out, err = reader.finish(60)
        return proc, out, err, pid_file.read_text()
    finally:
        pid_file.unlink(missing_ok=True)  # the foreign listener ends
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="listeners' owners are read from /proc")
def test_a_port_service_that_fails_to_bind_names_the_foreign_taker(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """The service failed to bind ("exited before it was ready", exit 5), and the
    program that took its port was never named: the shield had not looked yet."""
    proc, out, err, foreign_pid = _up_beside_a_foreign_taker(
        tmp_path, port_base, "127.0.0.1", "127.0.0.1"
    )
    assert proc.returncode == 4, (out, err)
    assert (f"port {port_base} is now listened on by pid {foreign_pid} (python") in out + err, (
        out,
        err,
    )
    assert "is up" not in out


@pytest.mark.skipif(sys.platform != "linux", reason="listeners' owners are read from /proc")
@pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 on this host")
def test_up_never_says_is_up_while_a_foreign_program_holds_a_covered_address(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """host = "localhost": the service bound 127.0.0.1 and was ready while a foreign
    program held [::1] of its port; "is up" was said (up --detach returned 0), and the
    shield stopped the instance at its next check."""
    proc, out, err, foreign_pid = _up_beside_a_foreign_taker(
        tmp_path, port_base, "localhost", "::1"
    )
    assert proc.returncode == 4, (out, err)
    assert f"listened on by pid {foreign_pid} (python" in out + err, (out, err)
    assert f"[::1]:{port_base}" in out + err
    assert "is up" not in out


def test_a_port_probe_names_a_foreign_listener_it_reached(tmp_path: Path) -> None:
    """The probe's words, for the log and the not-ready message."""
    import subprocess

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    pid_file = tmp_path / "foreign.pid"
    subprocess.run([sys.executable, "-c", FOREIGN, str(port), str(pid_file)], check=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the foreign listener did not start"
        time.sleep(0.05)
    try:
        probe = ReadinessProbe("tcp", "127.0.0.1", port)
        assert probe.check() is (sys.platform != "linux")  # elsewhere the OS does not say
        if sys.platform == "linux":
            assert probe.last_problem.startswith(
                f"port {port} is answered by pid {pid_file.read_text()} (python"
            ), probe.last_problem
    finally:
        pid_file.unlink()


def test_log_matches_a_line_as_a_terminal_shows_it() -> None:
    # A logger that colours its output, or ends lines with CRLF, still says the line.
    probe = ReadinessProbe("log:^listening on \\d+$", "127.0.0.1", 1)
    probe.feed_line("\x1b[1;32mlistening\x1b[0m on \x1b[4m8080\x1b[0m")
    assert probe.check() is True
    probe = ReadinessProbe("log:listening on 8080$", "127.0.0.1", 1)
    probe.feed_line("listening on 8080\r")
    assert probe.check() is True
    probe = ReadinessProbe("log:see \x1b", "127.0.0.1", 1)  # a pattern for the raw line
    probe.feed_line("see \x1b]8;;http://x\x1b\\")
    assert probe.check() is True


def test_log_matches_past_every_escape_and_a_carriage_return_inside_the_line() -> None:
    # `tput sgr0` ends a colour with "\x1b(B\x1b[m": the "\x1b(B" stayed and "ready on"
    # never matched. A spinner redraws its line after a "\r": "^ready" never matched.
    lines = {
        "^ready on port \\d+$": "\x1b[1mready\x1b(B\x1b[m on port 80",
        "^ready on port 80$": "starting...\r\x1b[2Kready on port 80",
        "^ready$": "\x1b7\x1b[2;1Hready\x1b8",
        "^up$": "\x1b]0;title\x07\x1bP+q544e\x1b\\up\x1b=",
    }
    for pattern, line in lines.items():
        probe = ReadinessProbe("log:" + pattern, "127.0.0.1", 1)
        probe.feed_line(line)
        assert probe.check() is True, (pattern, line)
    probe = ReadinessProbe("log:^ready$", "127.0.0.1", 1)
    probe.feed_line("not ready\rnot ready either")
    assert probe.check() is False


# A single-threaded server whose health check takes SLOW seconds to answer.
SLOW_HEALTH = """\
import http.server, os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(float(os.environ["SLOW"])); self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H, bind_and_activate=False)
srv.socket.close(); srv.socket = socket.socket(fileno=3)
srv.serve_forever()
"""


def test_a_health_check_slower_than_two_seconds_is_ready_within_ready_timeout(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Each probe gave up after 2 s and asked again: never ready, whatever the timeout.
    command = script_command(tmp_path, "slow.py", SLOW_HEALTH)
    slow = {"command": command, "ready": "http:/health", "ready_timeout_s": 30}
    config = write_config(tmp_path, port_base, {"slow": slow})
    proc = start("up", "--config", str(config), env=up_env(tmp_path, SLOW="2.5"))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader)
        assert any("slow ready on port" in line for line in lines), lines
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


def test_an_http_probe_sees_the_service_exit_while_it_awaits_the_answer(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # socket = "fd": the probe's request waits in up's own accept queue, so a service
    # that died before accepting it left the probe waiting the whole ready_timeout_s,
    # then "not ready in time" (a restart's crash too: the instance stopped where the
    # restart policy should have started it again).
    config = write_config(
        tmp_path, port_base, {"web": {"ready": "http:/health", "ready_timeout_s": 20}}
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path, DELAY_WEB="0.5", EXIT_WEB="3"))
    out, err = LineReader(proc).finish(60)
    assert proc.returncode == 5, (out, err)
    assert "service 'web' exited before it was ready (exit status 3)" in err, err


@pytest.mark.parametrize("answer", [b"\x15\x03\x03\x00\x02\x02\x28", b""])
def test_http_probe_of_a_tls_only_server_says_it_speaks_plain_http(answer: bytes) -> None:
    # A TLS server answers a plain request with an alert record (or nothing) and hangs up.
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        probe = ReadinessProbe("http:/health", "127.0.0.1", server.getsockname()[1])
        assert probe.check() is False
        assert "plain HTTP" in probe.last_problem and "HTTPS" in probe.last_problem
    finally:
        thread.join(10)
        server.close()


def test_http_probe_takes_a_2xx_status_without_waiting_for_the_body_to_end() -> None:
    # HTTP/1.0 without a length, connection kept open (or a body that streams): the
    # probe waited for the body's end until its timeout, and the service was never ready.
    server = socket.create_server(("127.0.0.1", 0))
    served = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nok")
            served.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        probe = ReadinessProbe("http:/health", "127.0.0.1", server.getsockname()[1])
        assert probe.check() is True, probe.last_problem
    finally:
        served.set()
        thread.join(10)
        server.close()


def test_a_dependency_without_a_command_passes_on_its_own_dependencies(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # api -> proxy (no command: run elsewhere) -> db: api started at once, before db.
    config = write_config(tmp_path, port_base, {"db": {"ready": "log:^ready to serve$"}})
    config.write_text(
        config.read_text()
        + f'[services.proxy]\nbase = {port_base + 2}\nsize = 2\nstride = 10\ndepends_on = ["db"]\n'
        + f"[services.api]\nbase = {port_base + 4}\nsize = 2\nstride = 10\n"
        + f"command = {json.dumps([sys.executable, str(tmp_path / 'service.py')])}\n"
        + 'depends_on = ["proxy"]\n'
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path, DELAY_DB="1"))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader)
        ready = [line.split()[1] for line in lines if " ready on port " in line]
        assert ready == ["db", "api"], lines
        by_name = service_records(tmp_path)
        assert by_name["api"]["started"] >= by_name["db"]["accepting"]
        # The proxy's socket is up's: its pid in status is up's own (the README), where
        # up's table shows "-"; the others' are their own processes'.
        (instance,) = status_json(config)["instances"]
        pids = {s["name"]: s["pid"] for s in instance["services"]}
        assert pids["proxy"] == proc.pid == instance["pid"], pids
        assert proc.pid not in (pids["db"], pids["api"]), pids
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


def test_an_http_path_that_is_not_ascii_is_sent_percent_encoded(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # "http:/héalth" raised UnicodeEncodeError in the keeper's thread: up never got
    # ready, never timed out, and waited until killed.
    paths = SERVICE.replace('self.path == "/health"', 'self.path == "/h%C3%A9alth?q=%C3%A9"')
    command = script_command(tmp_path, "paths.py", paths)
    config = write_config(
        tmp_path,
        port_base,
        {"s": {"command": command, "ready": "http:/héalth?q=é"}},
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader)
        assert any("s ready on port" in line for line in lines), lines
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


def test_a_readiness_check_that_raises_stops_the_instance_instead_of_hanging() -> None:
    # An exception out of a check ended the keeper's thread: no failure was reported,
    # so up neither got ready nor timed out.
    import subprocess

    from portpool._keeper import Failure, ServiceKeeper
    from portpool.layout import Service

    class Broken(ReadinessProbe):
        def check(self, wait_s: float = 2.0) -> bool:
            raise ValueError("probe bug")

    failures: list[Failure] = []
    done = threading.Event()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(_svc: Service, _probe: ReadinessProbe) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return procs[-1]

    def stop(_name: str) -> None:
        for p in procs:
            p.kill()

    def failed(failure: Failure) -> None:
        failures.append(failure)
        stop("s")

    service = Service(name="s", base=1, size=1, command=("x",), ready="tcp")
    keeper = ServiceKeeper(
        service,
        1,
        spawn=spawn,
        stop=stop,
        make_probe=lambda: Broken("tcp", "127.0.0.1", 1),
        on_change=lambda _k: None,
        on_ready=lambda _k, _s: None,
        on_failure=failed,
        done=done,
    )
    thread = threading.Thread(target=keeper.run, daemon=True)
    thread.start()
    thread.join(30)
    stop("s")
    assert not thread.is_alive()
    assert [f.kind for f in failures] == ["not-ready"]
    assert "ValueError: probe bug" in failures[0].detail


SLOW_ACCEPT = """\
import socket, sys, time
server = socket.socket(fileno=int(sys.argv[1]))
time.sleep(0.3)  # starting up
conn, _ = server.accept()
conn.sendall(b"ok\\n")
conn.close()
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the accept queue is read on Linux")
def test_a_keeper_sees_a_passed_socket_service_ready_when_it_answers_not_a_tick_later(
    listening: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the retry interval stretched to 30 s, only the service's answer on the probe
    # connection can end the wait after the first try: ready at the second try. The
    # keeper slept the whole interval, however soon the service accepted.
    import subprocess

    import portpool._keeper
    from portpool._keeper import Failure, ServiceKeeper
    from portpool.layout import Service

    monkeypatch.setattr(portpool._keeper, "_FIRST_PROBE_INTERVAL_S", 30.0)
    monkeypatch.setattr(portpool._keeper, "_PROBE_INTERVAL_S", 30.0)
    host, port = listening.getsockname()[:2]

    class Counting(ReadinessProbe):
        checks = 0

        def check(self, wait_s: float = 2.0) -> bool:
            Counting.checks += 1
            return super().check(wait_s)

    procs: list[subprocess.Popen[bytes]] = []
    failures: list[Failure] = []
    done = threading.Event()

    def spawn(_svc: Service, _probe: ReadinessProbe) -> subprocess.Popen[bytes]:
        fd = listening.fileno()
        procs.append(subprocess.Popen([sys.executable, "-c", SLOW_ACCEPT, str(fd)], pass_fds=[fd]))
        return procs[-1]

    def stop(_name: str) -> None:
        for p in procs:
            p.kill()

    keeper = ServiceKeeper(
        Service(name="s", base=port, size=1, command=("x",), ready="tcp"),
        port,
        spawn=spawn,
        stop=stop,
        make_probe=lambda: Counting("tcp", host, port, listening),
        on_change=lambda _k: None,
        on_ready=lambda _k, _s: None,
        on_failure=failures.append,
        done=done,
    )
    thread = threading.Thread(target=keeper.run, daemon=True)
    thread.start()
    try:
        assert keeper.ever_ready.wait(20), f"not ready after {Counting.checks} tries"
        assert Counting.checks == 2  # the first (not accepted yet), then the one it woke
        assert failures == []
    finally:
        done.set()
        stop("s")
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 on this host")
def test_a_localhost_service_listening_on_ipv6_alone_is_ready() -> None:
    # host = "localhost", socket = "port": a server that took ::1 alone (as Node's
    # listen(port, "localhost") does) was probed on 127.0.0.1 only, and never ready.
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server6(http.server.HTTPServer):
        address_family = socket.AF_INET6

    server = Server6(("::1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tcp = ReadinessProbe("tcp", "localhost", port)
        assert tcp.check() is True, tcp.last_problem
        http_probe = ReadinessProbe("http:/health", "localhost", port)
        assert http_probe.check() is True, http_probe.last_problem
    finally:
        server.shutdown()
        server.server_close()
    probe = ReadinessProbe("tcp", "localhost", port)
    assert probe.check() is False
    assert "127.0.0.1" in probe.last_problem and "[::1]" in probe.last_problem


# Given its port by number, binds IPv4 alone (0.0.0.0), as `python -m http.server` does.
IPV4_ONLY = """\
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 on this host")
@pytest.mark.parametrize("ready", ["tcp", "http:/"])
def test_an_ipv4_service_of_a_dual_stack_layout_is_ready(
    tmp_path: Path, port_base: int, home: Path, ready: str
) -> None:
    # host = "::" covers both families, so a service given the port by number may bind
    # 0.0.0.0; it answered on 127.0.0.1 while the probe tried [::1] alone: exit 5.
    (tmp_path / "v4.py").write_text(IPV4_ONLY)
    config = write_service_layout(
        tmp_path,
        port_base,
        {"web": {"socket": "port", "ready": ready, "ready_timeout_s": 20,
                 "command": [sys.executable, str(tmp_path / "v4.py")]}},
        app="dualapp",
        script="",
    )  # fmt: skip
    config.write_text('host = "::"\n' + config.read_text())
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader)
        assert any(f"web ready on port {port_base}" in line for line in lines), lines
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err


def test_a_service_with_no_check_was_ready_even_if_it_exited_before_the_first() -> None:
    # ready = "none" is ready once started: a service that exited before the keeper's
    # first look was "exited before it was ready" (and "on its own" a moment later).
    assert ReadinessProbe("none", "127.0.0.1", 1).proved_before_exit() is True
    assert ReadinessProbe("tcp", "127.0.0.1", 1).proved_before_exit() is False


# Writes its prompt without ending the line (flushed), then waits, as a REPL-like
# server or a progress line does.
PARTIAL_LINE = """\
import sys, time
sys.stdout.write("warming up\\n"); sys.stdout.write("ready to serve"); sys.stdout.flush()
time.sleep(60)
"""


def test_log_matches_a_flushed_line_that_was_not_ended_yet(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A terminal shows "ready to serve" at once; up read output by whole lines only, so
    # it waited for a newline that never came and said the service "printed no line at
    # all", and printed nothing of it either until the service exited.
    command = script_command(tmp_path, "partial.py", PARTIAL_LINE)
    config = write_config(
        tmp_path, port_base, {"prompt": {"command": command, "ready": "log:^ready to serve$"}}
    )
    proc = start("up", "--config", str(config), env=up_env(tmp_path))
    reader = LineReader(proc)
    try:
        lines = output_until_up(reader, timeout=30)
        assert any("prompt ready on port" in line for line in lines), lines
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err
    # The unfinished line is printed once, when the service's output ends.
    assert (_out + err).count("| ready to serve") == 1, (_out, err)


def test_a_line_given_in_pieces_counts_once_and_matches_as_it_stands() -> None:
    probe = ReadinessProbe("log:^ready$", "127.0.0.1", 1)
    probe.feed_partial("rea")
    assert probe.check() is False
    assert "no line at all" not in probe.last_problem  # it printed the start of one
    probe.feed_partial("ready")
    assert probe.check() is True
    probe.feed_line("ready and more")
    assert probe._lines == 1


@pytest.mark.parametrize("listening", FAMILIES, indirect=True)
def test_an_answer_that_is_not_http_is_named_on_one_line(listening: socket.socket) -> None:
    # The raw status line went into the message: "...: hello\r\n (the http: probe ...)"
    # split up's one-line failure in two, and a service's escape codes reached the terminal.
    def answer() -> None:
        conn, _ = listening.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"hello \x1b[31mthere\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    host, port = listening.getsockname()[:2]
    probe = ReadinessProbe("http:/health", host, port)
    assert probe.check() is False
    thread.join(10)
    assert "\n" not in probe.last_problem and "\r" not in probe.last_problem
    assert "\x1b" not in probe.last_problem
    assert "hello \\x1b[31mthere" in probe.last_problem, probe.last_problem


def test_output_pieces_reach_the_probe_as_a_terminal_shows_them() -> None:
    # Through a real pipe, piece by piece, as a service flushes them: a line not ended
    # yet is given as its part after the last carriage return (a progress bar redrawing
    # one line for minutes was matched whole on every piece), and not at all once that
    # part is long; whole lines as before, the last one at the end of the output.
    import io
    import os
    import queue

    from portpool._output import _PARTIAL_MAX, pump_lines

    read_fd, write_fd = os.pipe()
    partials: queue.Queue[str] = queue.Queue()
    lines: list[str] = []
    out = io.StringIO()
    pump = threading.Thread(
        target=pump_lines,
        args=("svc", 3, os.fdopen(read_fd, "rb"), out, threading.Lock()),
        kwargs={"on_line": lines.append, "on_partial": partials.put},
        daemon=True,
    )
    pump.start()

    def piece(data: bytes) -> str:
        os.write(write_fd, data)
        return partials.get(timeout=10)

    assert piece(b"fetching 1%") == "fetching 1%"
    assert piece(b"\rfetching 2%") == "fetching 2%"
    assert piece(b"\rready") == "ready"
    os.write(write_fd, b" " * (_PARTIAL_MAX + 1))  # too long a part: not given
    assert piece(b"\rstill going") == "still going"
    os.write(write_fd, b"\r\ndone\nlast")
    os.close(write_fd)
    pump.join(10)
    assert list(partials.queue) in ([], ["last"])  # "last" when read before the end
    assert lines == [
        "fetching 1%\rfetching 2%\rready" + " " * (_PARTIAL_MAX + 1) + "\rstill going\r",
        "done",
        "last",
    ]
    assert out.getvalue().split("\n")[1:] == ["svc | done", "svc | last", ""]


def test_an_http_answer_is_awaited_no_longer_than_the_time_left() -> None:
    # The wait for an answer was never under 2 s: with ready_timeout_s = 0.5, a health
    # check answering 200 after 1.5 s made the service "ready", a second after the
    # README's "awaited until ready_timeout_s runs out".
    server = socket.create_server(("127.0.0.1", 0))
    answered = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            answered.wait(1.5)  # set once the probe gave up
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        probe = ReadinessProbe("http:/health", "127.0.0.1", server.getsockname()[1])
        assert probe.check(0.3) is False
        assert "timed out" in probe.last_problem, probe.last_problem
    finally:
        answered.set()
        thread.join(10)
        server.close()


def test_a_line_that_never_ends_keeps_up_s_memory_bounded() -> None:
    # A progress line redrawn for ever without a newline was kept whole until its end:
    # up's memory grew by the size of every redraw (1.7 GB for 300 MB of output). What
    # a terminal shows no more is dropped, and one part too long is printed in pieces.
    import io
    import os
    import tracemalloc

    from portpool._output import _PENDING_MAX, pump_lines

    read_fd, write_fd = os.pipe()
    lines: list[str] = []
    pump = threading.Thread(
        target=pump_lines,
        args=("svc", 3, os.fdopen(read_fd, "rb"), io.StringIO(), threading.Lock()),
        kwargs={"on_line": lines.append},
        daemon=True,
    )
    redraw = b"\rprogress " + b"x" * (_PENDING_MAX // 2)
    tracemalloc.start()
    try:
        pump.start()
        for _ in range(40):  # 20 MB of redraws, never a newline
            os.write(write_fd, redraw)  # returns once the pump has read all but a pipe's worth
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    os.write(write_fd, b"\rdone\n" + b"y" * (3 * _PENDING_MAX) + b"\n")
    os.close(write_fd)
    pump.join(30)
    assert not pump.is_alive()
    assert peak < 8 * _PENDING_MAX, peak  # was the whole 20 MB, and more
    # The redrawn line ends as a terminal shows it: its last part, "done".
    assert lines[0].rsplit("\r", 1)[-1] == "done" and len(lines[0]) <= 2 * _PENDING_MAX
    # A 3 MiB line without a carriage return: in pieces, nothing lost.
    assert "".join(lines[1:]) == "y" * (3 * _PENDING_MAX) and len(lines) >= 3


# A line that makes the pattern ^(a|a)+$ backtrack for ever (2**40 ways to read it).
BACKTRACKING = """\
import time
print("a" * 40 + "b", flush=True)
time.sleep(300)
"""


def test_a_log_pattern_that_backtracks_times_out_instead_of_hanging_up(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """ready = "log:^(a|a)+$" (or ^(a+)+$) on a line of 40 a's and a b: matching it held
    up's interpreter for hours, so ready_timeout_s never fired and up took no SIGTERM (only
    kill -9 ended it). Each line's match is now bounded: the line does not match, the
    probe says why, and the timeout and signals work."""
    command = script_command(tmp_path, "backtracking.py", BACKTRACKING)
    config = write_config(
        tmp_path,
        port_base,
        {"slow": {"command": command, "ready": "log:^(a|a)+$", "ready_timeout_s": 2}},
    )
    proc = start("up", "--config", str(config), "--grace", "1", env=up_env(tmp_path))
    reader = LineReader(proc)
    out, err = reader.finish(60)
    assert proc.returncode == 5, (out, err)
    assert "service 'slow' was not ready in time" in err
    assert "took too long on a line" in err, err
    assert status_json(config)["instances"] == []


def test_a_line_that_makes_a_service_ready_is_printed_before_up_says_so() -> None:
    """The "log:" probe saw the line before the line was printed, and the keeper's
    "ready on port" line, written on its own thread, came first (a CI run). The probe
    now sees it under the output lock, right before it is written."""
    import io
    import os

    from portpool._output import pump_lines, write_line

    out, lock = io.StringIO(), threading.Lock()
    said: list[threading.Thread] = []

    def ready(line: str) -> None:  # what the keeper does once the probe matched
        keeper = threading.Thread(target=write_line, args=(out, lock, "up: ready", None))
        keeper.start()
        said.append(keeper)
        keeper.join(0.3)  # as long as the keeper may take to be first

    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"ready to serve\n")
    os.close(write_fd)
    pump_lines("svc", 3, os.fdopen(read_fd, "rb"), out, lock, on_line=ready)
    said[0].join(10)
    assert out.getvalue().splitlines() == ["svc | ready to serve", "up: ready"]


def test_a_blocked_console_does_not_hold_up_a_line_s_readiness() -> None:
    """Seen under the output lock, a line waited for a write that blocks (a terminal
    stopped by Ctrl-S holds the lock): its service would not get ready until then."""
    import io
    import os

    from portpool._output import pump_lines

    out, lock = io.StringIO(), threading.Lock()
    seen = threading.Event()
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"ready to serve\n")
    os.close(write_fd)
    pump = threading.Thread(
        target=pump_lines,
        args=("svc", 3, os.fdopen(read_fd, "rb"), out, lock),
        kwargs={"on_line": lambda line: seen.set()},
        daemon=True,
    )
    with lock:  # another service's write, blocked
        pump.start()
        assert seen.wait(10)  # ready while the console is still blocked
        assert out.getvalue() == ""
    pump.join(10)
    assert out.getvalue() == "svc | ready to serve\n"  # printed once it is free


# An HTTP/1.1 service that answers "Connection: close" and closes as a careful server
# does: its write side first, then it reads until the client's end (a lingering close).
LINGERING = """\
import os, socket, sys, time
sock = socket.socket(fileno=3)
while True:
    conn, _ = sock.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n")
    time.sleep(0.05)  # its own work first (a log line): the client has the answer by then
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError as e:
        with open(sys.argv[1], "a") as out:
            out.write(f"shutdown: {e!r}\\n")
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass  # the client's reset, once it saw our end: it leaves no TIME_WAIT here
    conn.close()
    with open(sys.argv[1] + ".closed", "a") as out:
        out.write("closed\\n")
"""


@pytest.mark.parametrize("service", ["http.server", "lingering close"])
def test_an_http_probe_leaves_no_time_wait_on_the_services_port(
    tmp_path: Path, port_base: int, home: Path, service: str
) -> None:
    """A service that closes each connection first (HTTP/1.0, "Connection: close") was
    left by the probe's FIN in TIME_WAIT on its own port: for a minute after ``up``
    stopped, a server that does not set SO_REUSEADDR could not bind it. The probe resets
    a connection the service closed, and only then: a reset sent before the service's
    own close made its shutdown() fail (ENOTCONN)."""
    errors = tmp_path / "errors"
    extra: dict[str, Any] = {"ready": "http:/health"}
    if service == "lingering close":
        extra["command"] = [*script_command(tmp_path, "linger.py", LINGERING), str(errors)]
    config = write_config(tmp_path, port_base, {"web": extra})
    proc = start("up", "--config", str(config), env=up_env(tmp_path))
    reader = LineReader(proc)
    try:
        output_until_up(reader)
        if service == "lingering close":  # its close of the probe's connection is done
            assert wait_for(Path(f"{errors}.closed").exists, 30)
    finally:
        _out, err = stop(reader)
    assert proc.returncode == 0, err
    assert [s for s in tcp_sockets(port_base) if s.state == "time-wait"] == []
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port_base))  # no SO_REUSEADDR
    finally:
        plain.close()
    assert not errors.exists(), errors.read_text()
