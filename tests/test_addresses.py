"""A lease covers every address its clients may use; the faults of issue 11, end to end.

Each test is one reported fault, with real foreign processes and real sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.helpers import (
    PORTPOOL,
    LineReader,
    kill_if_running,
    occupy,
    portpool,
    read_line,
    release,
    start,
    start_script,
    status_json,
    wait_for,
    write_layout,
)

import portpool as portpool_lib
from portpool._addresses import bind_targets, covered_scopes, endpoint, has_ipv6_loopback
from portpool._portstatus import inspect_port
from portpool.diagnosis import diagnose
from portpool.errors import LayoutError, PoolExhausted
from portpool.layout import (
    Layout,
    Service,
    describe_layout,
    host_meaning,
    load_layout,
    normalize_host,
)
from portpool.pool import acquire
from portpool.statedir import StateDir

needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no ::1")


def _layout(path: Path, base: int, host: str, **kw: object) -> Path:
    kw.setdefault("services", {"web": {}})
    write_layout(path, base, **kw)  # type: ignore[arg-type]
    path.write_text(path.read_text().replace('host = "127.0.0.1"', f'host = "{host}"'))
    return path


@pytest.fixture
def foreign() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        release(proc)


@needs_ipv6
def test_localhost_skips_a_port_a_foreign_server_holds_on_ipv6_loopback(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """Fault 1: a foreign [::1]:P server started first; `run` took P on 127.0.0.1 and a
    client resolving localhost to ::1 (Node 17+) reached the foreign server."""
    foreign.append(occupy("listen", "::1", port_base))
    layout = _layout(tmp_path / "p.toml", port_base, "localhost")
    done = portpool("run", "--fds", "--config", str(layout), "--", "sh", "-c", "echo $PORT")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(port_base + 1)
    # No silent skip: one line naming the port it got and why the first was refused.
    assert f"got port {port_base + 1}, not {port_base}" in done.stderr
    assert f"pid {foreign[0].pid} (python" in done.stderr
    assert f"[::1]:{port_base}" in done.stderr


@needs_ipv6
def test_localhost_lease_holds_ipv6_loopback_and_refuses_its_clients(
    state: StateDir, port_base: int
) -> None:
    with acquire(state, [port_base], host="localhost") as lease:
        assert [t.address for t in bind_targets("localhost")] == ["127.0.0.1", "::1"]
        intruder = socket.socket(socket.AF_INET6)
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            intruder.bind(("::1", port_base))
        intruder.close()
        # A ::1 client is refused at once (never reaches a stranger); 127.0.0.1 is served.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", port_base), timeout=5).close()
        socket.create_connection(("127.0.0.1", port_base), timeout=5).close()
        lease.close_socket()  # handed off by number: the held socket goes too
        assert lease.held == []


@needs_ipv6
def test_a_host_in_another_spelling_covers_what_its_one_spelling_covers(
    state: StateDir, port_base: int
) -> None:
    """acquire(host="LOCALHOST") bound 127.0.0.1 alone, as a name: ::1 was left to a
    stranger, and the lease kept the raw spelling (a layout reads one spelling)."""
    for spelling, one in (("LOCALHOST", "localhost"), ("0:0:0:0:0:0:0:1", "::1")):
        with acquire(state, [port_base], host=spelling) as lease:
            assert lease.host == one
            intruder = socket.socket(socket.AF_INET6)
            with pytest.raises(OSError):
                intruder.bind(("::1", port_base))
            intruder.close()


@needs_ipv6
def test_wildcard_ipv6_is_dual_stack(state: StateDir, port_base: int) -> None:
    """Fault 2: `::` was IPv6-only; IPv4 clients were refused and a foreign 0.0.0.0:P
    listener could receive them."""
    with acquire(state, [port_base], host="::") as lease:
        assert lease.socket is not None
        assert lease.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        client = socket.create_connection(("127.0.0.1", port_base), timeout=5)
        conn, _ = lease.socket.accept()  # the IPv4 client reached our socket
        client.close()  # the client closes first: no TIME_WAIT is left on our port
        conn.close()
        for host in ("0.0.0.0", "127.0.0.1"):
            intruder = socket.socket()
            with pytest.raises(OSError):
                intruder.bind((host, port_base))
            intruder.close()


@needs_ipv6
def test_an_ipv6_only_wildcard_of_another_user_stops_no_instance(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """Fault 3: a [::] socket with IPV6_V6ONLY=1 made every start on 127.0.0.1 exit 4."""
    foreign.append(occupy("listen", "::", port_base, "1"))
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", shield=0.05)
    # The command runs for many shield intervals, then reports the port it was given.
    script = "import os, time; time.sleep(1.0); print(os.environ['PORT'])"
    done = portpool("run", "--config", str(layout), "--", sys.executable, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(port_base)  # the pool did not skip it either
    assert "shield tripped" not in done.stderr


def test_doctor_names_an_outgoing_connection_on_a_pool_port(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """Fault 4: doctor said "free" for a port `run` refused as "foreign (unknown)"."""
    proc = occupy("connected", "127.0.0.1", port_base)
    foreign.append(proc)
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", max_instances=1)
    done = portpool("doctor", "--config", str(layout))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if f" {port_base}  " in x)
    assert f"pid {proc.pid} (python" in line
    assert f"a connection from 127.0.0.1:{port_base}" in line
    ran = portpool("run", "--config", str(layout), "--", "sh", "-c", "echo $PORT")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str(port_base + 1)
    # run's reason is doctor's text, word for word.
    assert line.split(f"{port_base}  ", 1)[1] in ran.stderr
    as_json = json.loads(portpool("doctor", "--json", "--config", str(layout)).stdout)
    first = next(p for p in as_json["ports"] if p["port"] == port_base)
    assert first["kind"] == "foreign" and first["occupants"][0]["pids"] == [proc.pid]


def test_gc_reports_exactly_the_files_it_removes(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """Fault 6: gc printed "0 removed" while deleting a released port's files."""
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1")
    assert portpool("run", "--config", str(layout), "--", "true").returncode == 0
    before = {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()}
    done = portpool("gc", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    after = {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()}
    assert sorted(report["files"]) == sorted(before - after)
    assert f"ports/{port_base}.lock" in report["files"]
    assert report["released"] == [f"port {port_base}"]
    again = portpool("gc")
    assert again.stdout.strip() == "gc: 0 files removed"


@pytest.mark.parametrize(
    ("host", "words"),
    [("::ffff:127.0.0.1", "IPv4-mapped"), ("fe80::1%lo", "link-local"), ("fe80::1", "link-local")],
)
def test_hosts_that_can_never_be_bound_are_refused(host: str, words: str) -> None:
    """Fault 7: these passed validation, then every bind failed with EINVAL (exit 3)."""
    with pytest.raises(LayoutError, match=words):
        Layout("a", (Service("web", 20000, 2),), host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "::", "0.0.0.0", "10.1.2.3"])
def test_layout_explains_each_host_in_one_line(host: str) -> None:
    lines = describe_layout(Layout("a", (Service("web", 20000, 2),), host=host))
    covers = [line for line in lines if line.startswith("covers: ")]
    assert len(covers) == 1 and len(covers[0]) < 160


HOLD_OUTSIDE = """
import sys
from portpool.pool import acquire
from portpool.statedir import StateDir
lease = acquire(StateDir.open(), [int(sys.argv[1])], service="tests")
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_lease_outside_an_instance_is_described_in_plain_words(
    state: StateDir, port_base: int
) -> None:
    """Fault 8: it read "instance 0 of  (pid 12, service )"."""
    proc = start_script(HOLD_OUTSIDE, str(port_base))
    try:
        text = inspect_port(state, port_base).describe()
        assert text == f"held by pid {proc.pid}, outside any instance, service tests"
    finally:
        release(proc)


def test_a_shield_trip_is_reported_once(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """Issue 15: a trip printed the same reason three times (shield, instance, CLI)."""
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", shield=0.05)
    # The command is given the port by number, then a stranger takes it.
    script = (
        "import os, subprocess, sys, time\nprint(os.environ['PORT'], flush=True)\ntime.sleep(30)\n"
    )
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", script)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == str(port_base)
        stranger = occupy("listen", "127.0.0.1", port_base)
        foreign.append(stranger)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 4, err
    assert err.count(f"listened on by pid {stranger.pid}") == 1, err


def test_no_silent_skip_up_prints_it_and_status_shows_it(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """Fault 5: `up` took P+1 and said nothing about why P was skipped."""
    stranger = occupy("listen", "127.0.0.1", port_base)
    foreign.append(stranger)
    layout = tmp_path / "p.toml"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # The sleeper never listens: no readiness probe, or `up` would wait for it.
    web = {"command": sleeper, "socket": "port", "ready": "none"}
    write_layout(layout, port_base, services={"web": web})
    up = start("up", "--config", str(layout))
    reader = LineReader(up)  # `is up` may come in one write with the lines before it
    try:
        reader.until(lambda line: "is up" in line, timeout=30)
        doc = status_json(layout)
        (service,) = doc["instances"][0]["services"]
        assert service["port"] == port_base + 1
        (refusal,) = service["refusals"]
        assert refusal["port"] == port_base and refusal["reason"] == "in use"
        assert f"pid {stranger.pid} (python" in refusal["detail"]
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = reader.finish(timeout=30)
    assert err.count(f"got port {port_base + 1}, not {port_base}") == 1, err
    assert refusal["detail"] in err


SERVE_ON_LOOPBACK = (
    "import os, socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
    "print('serving', flush=True)\n"
    "time.sleep(60)\n"
)


@needs_ipv6
def test_doctor_names_a_foreign_listener_on_a_held_port(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """A `run` in port mode on localhost: its held ::1 socket is closed with the served
    one, so a foreign [::1]:P server can start and receive the lease's clients. doctor
    printed "held by instance 1 ..." with `"occupants": []`."""
    # The shield would stop the run at once; a long interval leaves time to ask doctor.
    layout = _layout(tmp_path / "p.toml", port_base, "localhost", shield=60, max_instances=1)
    script = [sys.executable, "-c", SERVE_ON_LOOPBACK]
    run = start("run", "--config", str(layout), "--", *script)
    try:
        assert read_line(run).strip() == "serving"
        stranger = occupy("listen", "::1", port_base)
        foreign.append(stranger)
        done = portpool("doctor", "--config", str(layout))
        as_json = json.loads(portpool("doctor", "--json", "--config", str(layout)).stdout)
    finally:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if f" {port_base}  " in x)
    assert line.split(f"{port_base}  ", 1)[1].startswith("held by instance 1 of testapp")
    assert f"also listened on by pid {stranger.pid} (python) on [::1]:{port_base}" in line
    assert "1 held port is also listened on by a foreign program" in done.stdout
    first = next(p for p in as_json["ports"] if p["port"] == port_base)
    assert first["kind"] == "held"
    assert any(o["pids"] == [stranger.pid] for o in first["occupants"])


REUSE_CONNECTION = (
    "import socket, sys\n"
    "server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen()\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.connect(server.getsockname())\n"
    "peer, _ = server.accept()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "peer.close(); s.recv(1); s.close()\n"  # the server side closes first: no TIME_WAIT on P
)


def test_run_by_number_notes_a_port_a_plain_bind_cannot_take(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """An outgoing SO_REUSEADDR connection from 127.0.0.1:P: doctor's note was empty
    after its colon, and `run` handed P out silently, then the service's plain bind
    failed."""
    proc = start_script(REUSE_CONNECTION, str(port_base))
    foreign.append(proc)
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", max_instances=1)
    doctor = portpool("doctor", "--all", "--config", str(layout))
    line = next(x for x in doctor.stdout.splitlines() if f" {port_base}  " in x)
    note = line.split(f"{port_base}  free; ", 1)[1]
    assert note.startswith("a server that does not set SO_REUSEADDR cannot bind it yet: pid ")
    assert f"pid {proc.pid} (python) has a connection from 127.0.0.1:{port_base}" in note
    # The service binds the number itself, without SO_REUSEADDR: it fails.
    bind = "import os, socket; socket.socket().bind(('127.0.0.1', int(os.environ['PORT'])))"
    ran = portpool("run", "--config", str(layout), "--", sys.executable, "-c", bind)
    assert ran.returncode == 1 and "Address already in use" in ran.stderr
    # ... and run said why, in doctor's words, on one line.
    notes = [x for x in ran.stderr.splitlines() if "SO_REUSEADDR" in x]
    assert notes == [f"portpool: service 'web' port {port_base}: {note}"]
    # A socket handed over keeps the port: no note.
    fds = portpool("run", "--fds", "--config", str(layout), "--", "true")
    assert fds.returncode == 0 and "SO_REUSEADDR" not in fds.stderr


LISTENER = (
    "import socket, sys\n"
    "family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
    "s = socket.socket(family); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


HANDED_OVER = (
    "import sys\n"
    "from portpool.pool import acquire\n"
    "from portpool.statedir import StateDir\n"
    "lease = acquire(StateDir.open(), [int(sys.argv[1])], host='127.0.0.1', service='web')\n"
    "lease.close_socket()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@needs_ipv6
def test_diagnose_gives_the_notes_doctor_gives(
    tmp_path: Path, port_base: int, state: StateDir, foreign: list[subprocess.Popen[str]]
) -> None:
    """diagnose() is doctor for one port (README), yet its notes() left out the foreign
    listener a held port's shield stops the instance for, and the listener on the
    other loopback of a free one: a library caller could not see either."""
    free, held = port_base, port_base + 1
    layout = _layout(tmp_path / "p.toml", port_base, "::1", max_instances=1)
    foreign.append(start_script(LISTENER, "127.0.0.1", str(free)))
    # The holder hands its port over by number; a foreign server (not of its tree) got
    # there first.
    foreign.append(start_script(HANDED_OVER, str(held), what="holder"))
    foreign.append(start_script(LISTENER, "127.0.0.1", str(held), what="intruder"))
    pid = foreign[-1].pid
    [intruder] = diagnose(held, "::1", state=state).notes()  # judged by the lease's host
    assert intruder.startswith(f"but also listened on by pid {pid} (python) on 127.0.0.1:")
    doctor = portpool("doctor", "--config", str(layout))
    [line] = [x for x in doctor.stdout.splitlines() if f" {held}  " in x]
    assert line.endswith(f"; {intruder}"), line
    [elsewhere] = diagnose(free, "::1").notes()
    assert elsewhere.startswith(f"pid {foreign[0].pid} (python) listens on 127.0.0.1:{free}, ")
    assert elsewhere in portpool("doctor", "--config", str(layout)).stdout


# A sidecar the shell starts before it execs portpool: once `up`'s service answers on
# 127.0.0.1:P it listens on [::1]:P, which a lease on localhost covers, and writes its
# pid to the file it is given.
SIDECAR = (
    "import os, socket, sys, time\n"
    "port = int(sys.argv[1])\n"
    "for _ in range(600):\n"
    "    try:\n"
    "        socket.create_connection(('127.0.0.1', port), timeout=1).close()\n"
    "        break\n"
    "    except OSError:\n"
    "        time.sleep(0.05)\n"
    # Once the test says "go" (up said "is up": up's own check before it saw nothing).
    "while len(sys.argv) > 3 and not os.path.exists(sys.argv[3]):\n"
    "    time.sleep(0.05)\n"
    # Until the service runs, up still holds [::1]:port (the lease's held socket).
    "for _ in range(600):\n"
    "    s = socket.socket(socket.AF_INET6)\n"
    "    try:\n"
    "        s.bind(('::1', port))\n"
    "        break\n"
    "    except OSError:\n"
    "        s.close()\n"
    "        time.sleep(0.05)\n"
    "s.listen()\n"
    "open(sys.argv[2] + '.tmp', 'w').write(str(os.getpid()))\n"
    "os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
    "time.sleep(60)\n"
)
# A service on PORT at 127.0.0.1 that writes its pid to the file it is given.
SERVE = (
    "import os, socket, sys, time\n"
    "s = socket.create_server(('127.0.0.1', int(os.environ['PORT'])))\n"
    "if len(sys.argv) > 1:\n"
    "    open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "    os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(60)\n"
)


def _up_beside(layout: Path, sidecar: str, *args: str) -> subprocess.Popen[str]:
    """`sh -c 'sidecar & exec portpool up'`: the Python ``sidecar`` (with ``args``) is a
    child of up's process that up did not start."""
    up = " ".join([*PORTPOOL, "up", "--config", str(layout)])
    script = f'{sys.executable} -c "$SIDECAR" {" ".join(args)} >/dev/null 2>&1 & exec {up}'
    return subprocess.Popen(
        ["sh", "-c", script], env={**os.environ, "SIDECAR": sidecar}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _kill_all(proc: subprocess.Popen[str], *pids: int | None) -> None:
    """Kill ``proc`` and the processes ``pids`` (None: not known), all of them started
    by the test (a sidecar through up's shell, and its orphan)."""
    kill_if_running(proc)
    for pid in pids:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pid_in(path: Path) -> int | None:
    """The pid a test's process wrote to ``path``, None if it wrote none (yet)."""
    return int(path.read_text()) if path.exists() else None


def _named_then_tripped(
    proc: subprocess.Popen[str], layout: Path, port: int, pid: int, reader: LineReader | None = None
) -> None:
    """doctor names ``pid``'s listener on ``port`` as one the shield stops the instance
    for, and then the shield of ``proc`` (an ``up``, its output read by ``reader`` if
    given) trips on it (exit 4)."""
    doctor = portpool("doctor", "--config", str(layout))
    [line] = [x for x in doctor.stdout.splitlines() if f" {port}  " in x]
    said = f"but also listened on by pid {pid} (python"
    assert said in line and "(the shield stops the instance)" in line, line
    # The shield trips within its interval.
    _, err = reader.finish(60) if reader is not None else proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert f"listened on by pid {pid} (python" in err


@needs_ipv6
def test_doctor_names_an_inherited_sidecar_s_listener_the_shield_trips_on(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`sh -c 'sidecar & exec portpool up'`: the sidecar descends from up's process, so
    doctor took its [::1]:P listener for up's own and called the port clean, while the
    shield (rightly: up did not start it) tripped on it."""
    serve, pid_file = tmp_path / "serve.py", tmp_path / "sidecar.pid"
    serve.write_text(SERVE)
    service = {"command": [sys.executable, str(serve)], "socket": "port"}
    layout = _layout(
        tmp_path / "p.toml", port_base, "localhost", shield=3, services={"web": service}
    )
    go = tmp_path / "go"
    proc = _up_beside(layout, SIDECAR, str(port_base), str(pid_file), str(go))
    reader = LineReader(proc)
    sidecar = None
    try:
        reader.until(lambda line: line.endswith("is up"))
        go.touch()
        assert wait_for(pid_file.exists, timeout=30)
        sidecar = int(pid_file.read_text())
        _named_then_tripped(proc, layout, port_base, sidecar, reader)
    finally:
        _kill_all(proc, sidecar)


# A sidecar that takes the instance's variables (`eval "$(portpool env --export)"`) and
# leaves an orphan listening on the port (its shell exits): re-parented to up, the
# orphan carries PORTPOOL_APP and PORTPOOL_INSTANCE, but not up's services' marks.
MARKED_SIDECAR = (
    "import os, subprocess, sys, time\n"
    "config, pid_file = sys.argv[1:3]\n"
    "open(pid_file + '.sidecar', 'w').write(str(os.getpid()))\n"
    "for _ in range(600):\n"
    "    done = subprocess.run([sys.executable, '-m', 'portpool.cli', 'env', '-c', config],\n"
    "                          capture_output=True, text=True)\n"
    "    if done.returncode == 0:\n"
    "        break\n"
    "    time.sleep(0.05)\n"
    "env = {**os.environ, **dict(x.split('=', 1) for x in done.stdout.split())}\n"
    "listen = (\n"
    "    'import os, socket, sys, time\\n'\n"
    "    'for _ in range(600):\\n'\n"
    "    '    try:\\n'\n"
    "    '        s = socket.create_server((\"127.0.0.1\", int(sys.argv[1])))\\n'\n"
    "    '        break\\n'\n"
    "    '    except OSError:\\n'\n"
    "    '        time.sleep(0.05)\\n'\n"
    "    'open(sys.argv[2], \"w\").write(str(os.getpid()))\\n'\n"
    "    'time.sleep(60)\\n'\n"
    ")\n"
    "port = env['PORTPOOL_PORT_WEB']\n"
    "subprocess.run(['sh', '-c', f'{sys.executable} -c \"$L\" {port} {pid_file} &'],\n"
    "               env={**env, 'L': listen}, check=True)\n"
    "time.sleep(60)\n"
)


def test_doctor_names_an_orphan_with_the_instance_s_variables_but_not_up_s_marks(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A sidecar's orphan carrying PORTPOOL_APP and PORTPOOL_INSTANCE: doctor took it
    for the instance's, the shield (which also wants up's PORTPOOL_SUPERVISOR_PID)
    tripped on it."""
    pid_file = tmp_path / "orphan.pid"
    idle = {"command": [sys.executable, "-c", "import time; time.sleep(60)"]}
    service = {**idle, "socket": "port", "ready": "none"}
    layout = _layout(
        tmp_path / "p.toml", port_base, "127.0.0.1", shield=3, services={"web": service}
    )
    proc = _up_beside(layout, MARKED_SIDECAR, str(layout), str(pid_file))
    orphan = None
    try:
        assert wait_for(pid_file.exists, timeout=30)
        time.sleep(0.1)  # the file is written whole by then
        orphan = int(pid_file.read_text())
        assert psutil.Process(orphan).ppid() == proc.pid  # adopted by up, a subreaper
        _named_then_tripped(proc, layout, port_base, orphan)
    finally:
        _kill_all(proc, orphan, _pid_in(tmp_path / "orphan.pid.sidecar"))


# A service that daemonizes: its orphan listens on PORT, keeping its environment (the
# instance's marks), and writes its pid to the file it is given.
DAEMONIZES = (
    "import os, socket, sys, time\n"
    "if os.fork() == 0:\n"
    "    if os.fork() == 0:\n"
    "        s = socket.create_server(('127.0.0.1', int(os.environ['PORT'])))\n"
    "        open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "        os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "        time.sleep(60)\n"
    "    os._exit(0)\n"
    "time.sleep(60)\n"
)


def test_doctor_takes_the_marks_from_the_record_not_from_a_service_that_cleared_them(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """With a sidecar inherited through exec, doctor read the marks an orphan must carry
    from the first service's environment; one started with `env -i` has none, so doctor
    named the other service's daemon an intruder the shield (which never tripped) stops."""
    pid_file = tmp_path / "daemon.pid"
    cleared = {"command": ["env", "-i", "A=1", "/bin/sleep", "60"], "ready": "none"}
    daemon = {"command": [sys.executable, "-c", DAEMONIZES, str(pid_file)], "ready": "none"}
    services = {"quiet": {**cleared, "socket": "port"}, "web": {**daemon, "socket": "port"}}
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", shield=0.2, services=services)
    sidecar = tmp_path / "sidecar.pid"
    idle = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)"
    proc = _up_beside(layout, idle, str(sidecar))
    orphan = None
    try:
        assert wait_for(pid_file.exists, timeout=30)
        orphan = int(pid_file.read_text())
        record = json.loads((home / "apps" / "testapp" / "instances" / "1.json").read_text())
        assert record["inherited"] and record["marks"]["PORTPOOL_INSTANCE"] == "1"
        doctor = portpool("doctor", "--config", str(layout))
        [line] = [x for x in doctor.stdout.splitlines() if f" {port_base + 2}  " in x]
        assert "held by instance 1" in line and "listened on" not in line, line
        time.sleep(1)  # five shield checks: none trips on the service's own daemon
        assert proc.poll() is None
    finally:
        _kill_all(proc, orphan, _pid_in(sidecar))


# A program that starts its service outside its own tree (setsid -f) and records it
# with set_service_pids; it stops the service and releases when its stdin closes.
LIBRARY_HOLDER = (
    "import os, pathlib, signal, subprocess, sys, time\n"
    "import portpool\n"
    "layout, serve, pid_file = sys.argv[1:4]\n"
    "inst = portpool.start_instance(portpool.load_layout(layout))\n"
    "lease = inst.leases['web']\n"
    "lease.close_socket()\n"
    "env = {**os.environ, 'PORT': str(lease.port)}\n"
    "subprocess.run(['setsid', '-f', sys.executable, serve, pid_file], env=env, check=True)\n"
    "for _ in range(600):\n"
    "    if os.path.exists(pid_file):\n"
    "        break\n"
    "    time.sleep(0.05)\n"
    "pid = int(pathlib.Path(pid_file).read_text())\n"
    "inst.set_service_pids({'web': pid})\n"
    "inst.start_shield()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "print(inst.lost_reason, flush=True)\n"
    "os.kill(pid, signal.SIGTERM)\n"
    "inst.release()\n"
)


def test_doctor_counts_a_library_instance_s_service_outside_its_tree_as_its_own(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A service a program started outside its own tree and recorded with
    set_service_pids: its shield counts it as the instance's, and doctor called it an
    intruder "the shield stops", which it never did."""
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", shield=0.2, max_instances=1)
    serve, pid_file = tmp_path / "serve.py", tmp_path / "service.pid"
    serve.write_text(SERVE)
    holder = start_script(LIBRARY_HOLDER, str(layout), str(serve), str(pid_file))
    try:
        service = int(pid_file.read_text())
        assert psutil.Process(service).ppid() != holder.pid  # outside the holder's tree
        doctor = portpool("doctor", "--config", str(layout))
        [line] = [x for x in doctor.stdout.splitlines() if f" {port_base}  " in x]
        assert "held by instance 1" in line and "listened on" not in line, line
        assert portpool_lib.diagnose(port_base, "127.0.0.1").notes() == []
        time.sleep(0.6)  # three shield checks
    finally:
        out, _ = holder.communicate(timeout=30)  # closes its stdin: it stops
    assert out == "None\n"  # its shield agreed: never tripped


# A library instance that holds its ports until its stdin closes (no heartbeat: the
# test's edits of its record stay).
HOLD_INSTANCE = (
    "import sys\n"
    "import portpool\n"
    "inst = portpool.start_instance(portpool.load_layout(sys.argv[1]), heartbeat=False)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "inst.release()\n"
)


@pytest.mark.parametrize("pid", [[1], {"a": 1}, "12", -1, 2**40, True])
def test_doctor_reads_a_hostile_service_pid_in_an_instance_record_as_unknown(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]], pid: object
) -> None:
    """An instance record whose service names an unhashable pid ([1]) crashed doctor,
    doctor --json (nothing on stdout) and diagnose() with a TypeError."""
    layout = _layout(tmp_path / "p.toml", port_base, "127.0.0.1", max_instances=1)
    foreign.append(start_script(HOLD_INSTANCE, str(layout)))
    record = home / "apps" / "testapp" / "instances" / "1.json"
    doc = json.loads(record.read_text())
    doc["services"][0]["pid"] = pid
    doc["inherited"] = [pid, "x", None]
    record.write_text(json.dumps(doc))
    done = portpool("doctor", "--json", "--config", str(layout))
    assert done.returncode == 0, done.stderr
    [verdict] = [v for v in json.loads(done.stdout)["ports"] if v["port"] == port_base]
    assert verdict["kind"] == "held", verdict
    assert portpool_lib.diagnose(port_base, "127.0.0.1").held is not None


# An IPv6 connection whose socket was bound to [::]:P (dual-stack, SO_REUSEADDR) before
# it connected from [::1]: the kernel's table lists it at [::1]:P, yet it keeps a plain
# bind off 0.0.0.0:P.
WIDE_CONNECTION = (
    "import socket, sys\n"
    "server = socket.create_server(('::1', 0), family=socket.AF_INET6)\n"
    "s = socket.socket(socket.AF_INET6)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.bind(('::', int(sys.argv[1]))); s.connect(server.getsockname()[:2])\n"
    "peer, _ = server.accept()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "peer.close(); s.recv(1); s.close()\n"
)


@needs_ipv6
def test_a_dual_stack_connection_listed_on_ipv6_is_named_for_a_plain_bind_on_0_0_0_0(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """run printed no note, and doctor and diagnose() said the plain bind was kept off by
    "a socket the OS does not list", though the OS lists it (at [::1]:P)."""
    proc = start_script(WIDE_CONNECTION, str(port_base))
    foreign.append(proc)
    plain = socket.socket()
    with pytest.raises(OSError):  # the kernel's word: a plain bind fails
        plain.bind(("0.0.0.0", port_base))
    plain.close()
    note = (
        "a server that does not set SO_REUSEADDR cannot bind it yet: "
        f"pid {proc.pid} (python) has a connection from [::1]:{port_base} to [::1]:"
    )
    why = ", whose socket was bound to [::] (IPv6 and IPv4) before it connected"
    found = diagnose(port_base, "0.0.0.0")
    assert found.bindable and found.inferred
    [said] = found.notes()
    assert said.startswith(note) and why in said, said
    assert "which counts against the port's IPv4 wildcard (0.0.0.0), no other IPv4 address" in said
    loopback = socket.socket()
    loopback.bind(("127.0.0.1", port_base))  # the kernel's word: the note is right
    loopback.close()
    layout = _layout(tmp_path / "p.toml", port_base, "0.0.0.0", max_instances=1)
    doctor = portpool("doctor", "--all", "--config", str(layout))
    line = next(x for x in doctor.stdout.splitlines() if f" {port_base}  " in x)
    assert line.split(f"{port_base}  free; ", 1)[1] == said
    ran = portpool("run", "--config", str(layout), "--", "true")
    assert ran.returncode == 0, ran.stderr
    notes = [x for x in ran.stderr.splitlines() if "SO_REUSEADDR" in x]
    assert notes == [f"portpool: service 'web' port {port_base}: {said}"]


@needs_ipv6
def test_a_connection_bound_to_ipv6_loopback_alone_is_no_note_for_0_0_0_0(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    """Listed alike, a socket bound to [::1]:P before it connected keeps nothing off
    0.0.0.0:P: run guessed from the table and said a plain bind would fail, while it
    worked and doctor said nothing."""
    narrow = WIDE_CONNECTION.replace("s.bind(('::',", "s.bind(('::1',")
    foreign.append(start_script(narrow, str(port_base)))
    plain = socket.socket()
    plain.bind(("0.0.0.0", port_base))  # the kernel's word: nothing keeps it off
    plain.close()
    assert diagnose(port_base, "0.0.0.0").notes() == []
    layout = _layout(tmp_path / "p.toml", port_base, "0.0.0.0", max_instances=1)
    ran = portpool("run", "--config", str(layout), "--", "true")
    assert ran.returncode == 0 and "SO_REUSEADDR" not in ran.stderr, ran.stderr


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("::0", "::"), ("0:0:0:0:0:0:0:0", "::"), ("0:0:0:0:0:0:0:1", "::1")],
)
def test_every_spelling_of_a_host_reads_as_its_canonical_one(
    state: StateDir, port_base: int, spelling: str, canonical: str
) -> None:
    """layout said "covers: ::0 only" for a host that binds dual-stack."""
    if not has_ipv6_loopback():
        pytest.skip("this host has no ::1")
    assert normalize_host(spelling) == canonical
    assert host_meaning(spelling) == host_meaning(canonical)
    assert covered_scopes(spelling) == covered_scopes(canonical)
    lines = describe_layout(Layout("a", (Service("web", port_base, 2),), host=spelling))
    assert f"covers: {host_meaning(canonical)}" in lines
    found = diagnose(port_base, spelling)
    assert found.host == canonical
    # From a layout file, in what layout and doctor print (they printed the spelling).
    config = Path(state.path).parent / "spelled.toml"
    web = f"[services.web]\nbase = {port_base}\nsize = 2\n"
    config.write_text(f'app = "a"\nmax_instances = 1\nhost = "{spelling}"\n{web}')
    for command in ("layout", "doctor"):
        done = portpool(command, "--json", "--config", str(config))
        assert json.loads(done.stdout)["host"] == canonical, done.stdout
    text = portpool("doctor", "--config", str(config)).stdout
    assert text.startswith(f"app a: 1 instance, host {canonical}\n"), text


def test_the_wording_of_addresses_refusals_and_hosts(
    state: StateDir, port_base: int, foreign: list[subprocess.Popen[str]]
) -> None:
    assert host_meaning("::1").endswith(
        "IPv4 clients are not served by this lease (another program may listen on 127.0.0.1)"
    )
    for host in ("127.0.0.1", "0.0.0.0"):
        assert "not served by this lease (another program may listen on ::1)" in host_meaning(host)
    assert all("refused" not in host_meaning(h) for h in ("::1", "127.0.0.1", "0.0.0.0"))
    # True on every machine: it read "127.0.0.1, served" where localhost is ::1 alone.
    assert host_meaning("localhost") == (
        "127.0.0.1 served and ::1 held bound (where this host has IPv6): no one else "
        "listens there; the other way round where localhost resolves to ::1 alone"
    )
    with pytest.raises(LayoutError, match=r"'::1%lo' has a scope id \(%lo\).*write '::1'"):
        Layout("a", (Service("web", 20000, 2),), host="::1%lo")
    # A held port's refusal says "held" once.
    proc = start_script(HOLD_OUTSIDE, str(port_base))
    foreign.append(proc)
    with pytest.raises(PoolExhausted) as raised:
        acquire(state, [port_base])
    (refusal,) = raised.value.refusals
    assert (
        str(refusal)
        == f"port {port_base}: held by pid {proc.pid}, outside any instance, service tests"
    )


def test_a_host_this_machine_does_not_have_is_reported(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """192.0.2.1 passed `layout` silently and doctor listed every port "unavailable"."""
    layout = _layout(tmp_path / "p.toml", port_base, "192.0.2.1", max_instances=1)
    shown = portpool("layout", "--config", str(layout))
    assert shown.returncode == 0, shown.stderr
    warnings = [x for x in shown.stdout.splitlines() if "192.0.2.1 is not an address" in x]
    assert len(warnings) == 1 and warnings[0].startswith("warning: host 192.0.2.1")
    # The same warning in --json and from the library (both had none).
    doc = json.loads(portpool("layout", "--json", "--config", str(layout)).stdout)
    assert [w for w in doc["warnings"] if "192.0.2.1 is not an address" in w] == [
        warnings[0].removeprefix("warning: ")
    ]
    assert doc["warnings"] == list(portpool_lib.layout_warnings(load_layout(str(layout))))
    doctor = portpool("doctor", "--config", str(layout))
    assert doctor.stdout.count("host 192.0.2.1 is not an address of this machine") == 1
    assert "unavailable (192.0.2.1 is not an address of this host)" in doctor.stdout
    # A loopback host gets no such line.
    local = _layout(tmp_path / "q.toml", port_base, "127.0.0.1", max_instances=1)
    assert "not an address" not in portpool("layout", "--config", str(local)).stdout


def test_up_notes_a_port_a_plain_bind_cannot_take_for_a_service_given_the_number(
    tmp_path: Path, port_base: int, home: Path, foreign: list[subprocess.Popen[str]]
) -> None:
    proc = start_script(REUSE_CONNECTION, str(port_base))
    foreign.append(proc)
    layout = tmp_path / "p.toml"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    services = {  # the sleepers never serve: no readiness probes
        "web": {"command": sleeper, "socket": "port", "ready": "none"},
        "api": {"command": sleeper, "ready": "none"},
    }
    write_layout(layout, port_base, services=services, max_instances=1)
    up = start("up", "--config", str(layout))
    reader = LineReader(up)  # `is up` may come in one write with the lines before it
    try:
        reader.until(lambda line: "is up" in line, timeout=30)
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = reader.finish(timeout=30)
    notes = [x for x in err.splitlines() if "SO_REUSEADDR" in x]
    assert len(notes) == 1, err
    assert notes[0].startswith(f"portpool: service 'web' port {port_base}: a server that")
    assert f"pid {proc.pid} (python) has a connection from 127.0.0.1:{port_base}" in notes[0]


def test_a_host_this_machine_does_not_have_fails_at_once_not_slot_by_slot(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """Each of the 10 slots was tried in turn, with a warning that its pool was "taken
    by others", before the same error: nobody held these ports, and no slot can do
    better when the host itself is missing."""
    layout = _layout(tmp_path / "p.toml", port_base, "192.0.2.1", max_instances=10)
    for args in (["run", "--config", str(layout), "--", "true"], ["up", "--config", str(layout)]):
        done = portpool(*args)
        assert done.returncode == 3, done.stderr
        assert "skipped" not in done.stderr and "taken by others" not in done.stderr
        assert done.stderr.startswith("portpool: error: instance 1: service "), done.stderr
        assert "unavailable (192.0.2.1 is not an address of this host)" in done.stderr


def _in_own_hosts_file(hosts: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE ARGS`` where /etc/hosts reads as ``hosts`` (a private mount
    namespace: ``unshare -rm``); skips where this system cannot make one."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to give its own hosts")
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, str(hosts), sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


LOCALHOST_CLIENT = """
import socket, sys
from portpool.pool import acquire
from portpool.statedir import StateDir
print(sorted({i[4][0] for i in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}))
with StateDir.open() as state, acquire(state, [int(sys.argv[1])], host="localhost") as lease:
    assert lease.socket is not None
    client = socket.create_connection(("localhost", lease.port), timeout=10)
    lease.socket.settimeout(10)
    conn, peer = lease.socket.accept()
    print(conn.getsockname()[0], [s.getsockname()[0] for s in lease.held])
    conn.close()
    client.close()
"""


@needs_ipv6
def test_a_localhost_lease_serves_where_the_system_resolves_localhost(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """With `::1 localhost` alone in /etc/hosts, a localhost lease served 127.0.0.1 and
    held ::1: every client of `localhost:P` (Python's create_connection) was refused."""
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 localhost\n")
    done = _in_own_hosts_file(hosts, LOCALHOST_CLIENT, str(port_base))
    assert done.returncode == 0, done.stderr
    resolved, reached = done.stdout.splitlines()
    assert resolved == "['::1']"
    assert reached == "::1 ['127.0.0.1']"  # and 127.0.0.1 is still held from others
    # Where localhost resolves to 127.0.0.1 (alone or first), it is served, ::1 held.
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    done = _in_own_hosts_file(hosts, LOCALHOST_CLIENT, str(port_base))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "127.0.0.1 ['::1']"


# In a network namespace of its own whose loopback has no IPv6 (a host without ::1).
_NO_IPV6 = (
    "ip link set lo up && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
    'echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 && exec "$@"'
)


def _without_ipv6(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on a network of its own whose loopback has 127.0.0.1 and no ::1
    (``unshare -rn``); skips where this system cannot make one."""
    probe = subprocess.run(
        ["unshare", "-rn", "sh", "-c", _NO_IPV6, "sh", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("no unprivileged network namespace without IPv6 here (unshare -rn)")
    return subprocess.run(
        ["unshare", "-rn", "sh", "-c", _NO_IPV6, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_layout_warns_of_ipv6_loopback_on_a_host_without_it(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """On a host without IPv6, `doctor` said "host ::1 is not an address of this machine:
    every start fails" and `run` failed, while `layout` called a ::1 layout fine."""
    layout = str(_layout(tmp_path / "p.toml", port_base, "::1", max_instances=1))
    shown = _without_ipv6(*PORTPOOL, "layout", "--config", layout)
    assert shown.returncode == 0, shown.stderr
    warning = "warning: host ::1 is not an address of this machine: every start fails"
    assert [x for x in shown.stdout.splitlines() if x.startswith(warning)] == [
        f"{warning} until it is (use 127.0.0.1, localhost, :: or 0.0.0.0)"
    ]
    doctor = _without_ipv6(*PORTPOOL, "doctor", "--config", layout)
    assert "host ::1 is not an address of this machine" in doctor.stdout, doctor.stderr
    run = _without_ipv6(*PORTPOOL, "run", "--config", layout, "--", "true")
    assert run.returncode == 3, run.stderr
    # What works there is not warned of: 127.0.0.1, localhost (127.0.0.1 alone), and ::.
    for host in ("127.0.0.1", "localhost", "::"):
        other = str(_layout(tmp_path / "q.toml", port_base, host, max_instances=1))
        assert "not an address" not in _without_ipv6(*PORTPOOL, "layout", "--config", other).stdout
        assert _without_ipv6(*PORTPOOL, "run", "--config", other, "--", "true").returncode == 0
    # Where ::1 exists, no warning.
    if has_ipv6_loopback():
        assert "not an address" not in portpool("layout", "--config", layout).stdout


@pytest.mark.parametrize(
    ("host", "bound"),
    [("::ffff:127.0.0.1", "127.0.0.1"), ("::1%lo", "::1"), ("::1%1", "::1"), ("::%lo", "::")],
)
def test_acquire_binds_the_address_its_coverage_names(
    state: StateDir, port_base: int, host: str, bound: str
) -> None:
    """A v4-mapped host (covering 127.0.0.1) was bound IPv6-only, and ::1%lo was passed
    to the resolver: every port of the pool was refused ("Invalid argument", "Name or
    service not known") although nothing used it."""
    if ":" in bound and not has_ipv6_loopback():
        pytest.skip("this host has no ::1")
    with acquire(state, [port_base], host=host) as lease:
        assert lease.socket is not None
        assert lease.socket.getsockname()[0] == bound
        assert diagnose(port_base + 1, host).refusal() is None
        family = socket.AF_INET6 if ":" in bound else socket.AF_INET
        with socket.socket(family) as other, pytest.raises(OSError):
            other.bind((bound, port_base))  # covered: nobody else binds it


def _link_local_address() -> str | None:
    """A link-local IPv6 address of this host with its zone (``fe80::1%eth0``), or None."""
    try:
        with open("/proc/net/if_inet6") as table:
            rows = [line.split() for line in table]
    except OSError:
        return None
    for raw, _, _, scope, flags, name in (r for r in rows if len(r) == 6):
        if int(scope, 16) == 0x20 and not int(flags, 16) & 0x40:  # link, not tentative
            return f"{socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))}%{name}"
    return None


def test_acquire_binds_a_link_local_address_with_its_zone(state: StateDir, port_base: int) -> None:
    """Python's bind drops ``%eth0``: a link-local host was refused on every port
    ("Invalid argument"). No traffic: the address is only bound."""
    host = _link_local_address()
    if host is None:
        pytest.skip("this host has no link-local IPv6 address")
    with acquire(state, [port_base], host=host) as lease:
        assert lease.socket is not None
        assert lease.socket.getsockname()[0].partition("%")[0] == host.partition("%")[0]
        assert lease.socket.getsockname()[3] == socket.if_nametoindex(host.partition("%")[2])


NAME_CLIENT = """
import socket, sys
from portpool.pool import acquire
from portpool.statedir import StateDir
port = int(sys.argv[1])
with StateDir.open() as state, acquire(state, [port], host="pp-both") as lease:
    assert lease.socket is not None
    print(sorted([lease.socket.getsockname()[0], *(s.getsockname()[0] for s in lease.held)]))
    for address, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        for option in (None, socket.SO_REUSEADDR, socket.SO_REUSEPORT):
            with socket.socket(family) as other:
                if option is not None:
                    other.setsockopt(socket.SOL_SOCKET, option, 1)
                try:
                    other.bind((address, port))
                    other.listen()
                    print("a foreign program listens on", address, option)
                except OSError:
                    pass
    with socket.create_connection(("pp-both", port), timeout=10):
        lease.socket.settimeout(10)
        lease.socket.accept()[0].close()
    print("reached")
"""


@needs_ipv6
def test_a_host_name_covers_every_address_it_resolves_to(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A name was bound on its first address alone (acquire's docstring said every one):
    a foreign program could listen on its other loopback and get the clients that try
    that one first."""
    hosts = tmp_path / "hosts"
    # 203.0.113.7 (a documentation address) is no address of this machine: nothing to hold.
    hosts.write_text("127.0.0.1 pp-both\n::1 pp-both\n203.0.113.7 pp-both\n")
    done = _in_own_hosts_file(hosts, NAME_CLIENT, str(port_base))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['127.0.0.1', '::1']", "reached"]


def test_an_endpoint_brackets_an_ipv6_address() -> None:
    """A reference service on `::` said it was "serving on :::37985"."""
    assert endpoint("::", 8080) == "[::]:8080"
    assert endpoint("::1", 80) == "[::1]:80"
    assert endpoint("127.0.0.1", 80) == "127.0.0.1:80"
    assert endpoint("localhost", 80) == "localhost:80"
