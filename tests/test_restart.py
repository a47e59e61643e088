"""Restart policy, backoff, start order and their layout keys; and, through the real
`portpool up`, services restarted on the socket `up` keeps (the port never changes and
no connection is refused), the crash-loop limit, SIGHUP's rolling restart."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests.helpers import (
    PORTPOOL,
    LineReader,
    held_lock_files,
    kill_if_running,
    portpool,
    start,
    status_json,
    wait_for,
    write_layout,
    write_service_layout,
)

from portpool._order import dependency_problems, start_order
from portpool._platform import listeners
from portpool._relay import DUPLICATE_S
from portpool._restart import (
    BACKOFF_CAP_S,
    RESTART_BURST,
    RESTART_WINDOW_S,
    RestartTracker,
    backoff_delay_s,
    made_progress,
    wants_restart,
)
from portpool.errors import LayoutError
from portpool.layout import default_layout, describe_layout, parse_layout

# --- the rules, without processes ------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "returncode", "expected"),
    [
        ("no", 1, False),
        ("no", 0, False),
        ("on-failure", 1, True),
        ("on-failure", -9, True),
        ("on-failure", 0, False),
        ("always", 0, True),
        ("always", -9, True),
    ],
)
def test_policy_decides_by_exit(policy: str, returncode: int, expected: bool) -> None:
    assert wants_restart(policy, returncode) is expected


def test_backoff_doubles_from_a_tenth_and_is_capped() -> None:
    assert [backoff_delay_s(k) for k in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert backoff_delay_s(8) == pytest.approx(25.6)
    assert backoff_delay_s(9) == BACKOFF_CAP_S == 30.0
    assert backoff_delay_s(10_000) == 30.0


def test_tracker_gives_up_after_five_restarts_in_sixty_seconds() -> None:
    tracker = RestartTracker("on-failure")
    delays = [tracker.on_exit(1, now=float(t)).delay_s for t in range(RESTART_BURST)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6]
    sixth = tracker.on_exit(1, now=10.0)
    assert not sixth.restart and sixth.give_up
    assert tracker.count == RESTART_BURST
    # Once the first restarts leave the window, the service may be restarted again.
    later = tracker.on_exit(1, now=RESTART_WINDOW_S + 2.5)
    assert later.restart and later.delay_s == 0.4  # two restarts are still in the window


def test_a_run_that_made_progress_is_no_crash_loop_and_resets_the_backoff() -> None:
    tracker = RestartTracker("on-failure")
    # Ready by a probe, then exits: far more than 5 exits within 60 s, never given up.
    for t in range(50):
        decision = tracker.on_exit(1, now=t * 0.1, progressed=True)
        assert decision.restart and decision.delay_s == 0.1
    assert tracker.count == 50
    # Failures without progress still count, and one run with progress clears them.
    assert [tracker.on_exit(1, now=6.0).delay_s for _ in range(3)] == [0.1, 0.2, 0.4]
    assert tracker.on_exit(1, now=6.5, progressed=True).delay_s == 0.1
    assert [tracker.on_exit(1, now=7.0).delay_s for _ in range(RESTART_BURST)] == [
        0.1, 0.2, 0.4, 0.8, 1.6,
    ]  # fmt: skip
    assert tracker.on_exit(1, now=8.0).give_up
    assert not RestartTracker("on-failure").on_exit(0, now=0.0, progressed=True).restart


@pytest.mark.parametrize(
    ("kind", "ready", "ran_s", "expected"),
    [
        ("tcp", True, 0.01, True),
        ("http", True, 0.01, True),
        ("log", True, 0.01, True),
        ("tcp", False, 100.0, False),  # exited before its probe answered: no progress
        ("none", True, 0.5, False),  # "none" is ready at once: only the time it ran says
        ("none", True, 1.0, True),
    ],
)
def test_what_counts_as_progress(kind: str, ready: bool, ran_s: float, expected: bool) -> None:
    assert made_progress(kind, ready, ran_s) is expected


def test_tracker_with_policy_no_never_restarts() -> None:
    decision = RestartTracker("no").on_exit(1, now=0.0)
    assert not decision.restart and not decision.give_up


def test_start_order_follows_dependencies_and_keeps_layout_order() -> None:
    graph = {"api": ("db", "cache"), "web": ("api",), "db": (), "cache": ("db",), "x": ()}
    assert start_order(graph) == ["db", "cache", "api", "web", "x"]


def test_cycles_unknown_names_and_self_dependencies_are_problems() -> None:
    assert dependency_problems({"a": ("b",), "b": ("c",), "c": ("a",)}) == [
        ("a", "dependency cycle: a -> b -> c -> a")
    ]
    assert dependency_problems({"a": ("a",)}) == [("a", "a service cannot depend on itself")]
    assert dependency_problems({"a": ("zz",)}) == [
        ("a", "depends on 'zz', which is not a service; known: a")
    ]
    with pytest.raises(ValueError, match="cycle"):
        start_order({"a": ("b",), "b": ("a",)})


def _layout_doc(**extra: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = {
        "a": {"base": 21000, "size": 1},
        "b": {"base": 21010, "size": 1},
    }
    for name, keys in extra.items():
        services[name].update(keys)
    return {"app": "demo", "services": services}


@pytest.mark.parametrize(
    ("keys", "key", "problem"),
    [
        ({"restart": "sometimes"}, "restart", "must be one of 'no', 'on-failure', 'always'"),
        ({"depends_on": "b"}, "depends_on", "must be an array of service names"),
        ({"depends_on": [1]}, "depends_on[0]", "must be a string, not an integer"),
        ({"depends_on": ["b", "b"]}, "depends_on[1]", "names 'b' twice"),
        ({"depends_on": ["nope"]}, "depends_on", "depends on 'nope', which is not a service"),
        ({"ready": "tcp:80"}, "ready", "must be 'tcp', 'http:<path>', 'log:<regex>' or 'none'"),
        ({"ready": "http:health"}, "ready", "the path must start with '/'"),
        ({"ready": "http:/ he alth"}, "ready", "the path must have no spaces"),
        ({"ready": "http:/a\tb"}, "ready", "the path must have no spaces"),
        ({"ready": "log:("}, "ready", "invalid regular expression"),
        ({"ready_timeout_s": 0}, "ready_timeout_s", "must be a number of seconds from 0.01"),
        ({"ready_timeout_s": "5"}, "ready_timeout_s", "must be a number of seconds"),
    ],
)
def test_supervision_keys_are_validated(keys: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(LayoutError) as info:
        parse_layout(_layout_doc(a=keys), "f.toml")
    assert any(e.startswith(f"f.toml: services.a.{key}: {problem}") for e in info.value.errors), (
        info.value.errors
    )


def test_a_dependency_cycle_is_a_layout_error() -> None:
    doc = _layout_doc(a={"depends_on": ["b"]}, b={"depends_on": ["a"]})
    with pytest.raises(LayoutError) as info:
        parse_layout(doc, "f.toml")
    assert info.value.errors == ["f.toml: services.a.depends_on: dependency cycle: a -> b -> a"]


def test_a_service_with_its_own_problem_is_still_a_known_name() -> None:
    doc = _layout_doc(a={"depends_on": ["b"]}, b={"restart": "x"})
    with pytest.raises(LayoutError) as info:
        parse_layout(doc, "f.toml")
    assert [e for e in info.value.errors if "depends_on" in e] == []


def test_layout_shows_the_keys_and_the_default_services_declare_readiness() -> None:
    doc = _layout_doc(
        a={"command": ["x"], "restart": "always", "ready": "log:up", "ready_timeout_s": 4},
        b={"command": ["y"], "depends_on": ["a"]},
    )
    lines = describe_layout(parse_layout(doc, "f.toml"))
    assert "service a: ready log:up within 4 s, restart always, after -" in lines
    assert "service b: ready tcp within 30 s, restart no, after a" in lines
    services = {s.name: s for s in default_layout().services}
    assert {s.ready for s in services.values()} == {"http:/health"}
    assert set(services["api-server"].depends_on) == set(services) - {"api-server"}


# --- through the real `portpool up` ---------------------------------------------------

# Serves on the socket at fd 3: answers "<pid> <n>" to each request line, and exits
# with status 1 right after every FAIL_EVERY-th answer.
SERVICE = """\
import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
every = int(os.environ.get("FAIL_EVERY", "0"))
sock = socket.socket(fileno=3)
time.sleep(float(os.environ.get("START_DELAY", "0")))
print("serving", flush=True)
n = 0
while True:
    conn, _ = sock.accept()
    data = conn.recv(100)
    if not data:  # a readiness probe: it sends nothing
        conn.close()
        continue
    n += 1
    conn.sendall(f"{os.getpid()} {n}\\n".encode())
    conn.close()
    if every and n % every == 0:
        sys.exit(1)
"""


def write_config(tmp_path: Path, base: int, services: dict[str, dict[str, Any]]) -> Path:
    """A layout of ``services`` (their extra keys as TOML values), each running SERVICE."""
    return write_service_layout(tmp_path, base, services, app="restartapp", script=SERVICE)


def request(port: int, timeout: float = 30.0) -> tuple[int, int]:
    """One request over a fresh connection: (pid, n) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"hello\n")
        pid, n = conn.makefile().readline().split()
    return int(pid), int(n)


def wait_is_up(reader: LineReader, timeout: float = 60.0) -> list[str]:
    """``up``'s output lines up to "... is up" (bounded wait)."""
    return reader.until(lambda line: line.endswith("is up"), timeout)


def service_record(config: Path, name: str) -> dict[str, Any]:
    (instance,) = status_json(config)["instances"]
    return next(s for s in instance["services"] if s["name"] == name)


def stop_up(reader: LineReader) -> tuple[str, str]:
    if reader.proc.poll() is None:
        reader.proc.send_signal(signal.SIGTERM)
    return reader.finish(60)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def env_with(**values: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(values)
    return env


def test_on_failure_restarts_keep_the_port_and_answer_every_request(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_config(tmp_path, port_base, {"flaky": {"restart": "on-failure"}})
    proc = start("up", "--config", str(config), env=env_with(FAIL_EVERY="20"))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        port = service_record(config, "flaky")["port"]
        answers: list[tuple[int, int]] = []
        errors: list[str] = []
        deadline = time.monotonic() + 5.0
        # Continuous, unpaced (the acceptance test): every restart follows a run
        # that was ready, so none counts toward the crash-loop limit, however many.
        while time.monotonic() < deadline and len(answers) < 10_000:
            try:
                answers.append(request(port))
            except OSError as e:  # refused, reset: exactly what must not happen
                errors.append(repr(e))
        assert errors == []
        exits = sum(1 for _, n in answers if n == 20)
        # More than the old "5 restarts in 60 s" rule allowed: it gave up here (exit 5).
        assert exits > RESTART_BURST, f"only {exits} restarts in {len(answers)} answers"
        assert proc.poll() is None
        assert len({pid for pid, _ in answers}) >= exits
        # Counted in the record once the last restart is ready again.
        record = wait_for(
            lambda: (
                (r := service_record(config, "flaky"))["state"] == "ready"
                and r["restarts"] == exits
                and r
            ),
            30,
        )
        assert record["port"] == port
        assert record["last_exit_status"] == 1
        assert [listener.port for listener in listeners(port)] == [port]
    finally:
        out, err = stop_up(reader)
    assert proc.returncode == 0, err
    # A run may serve its 20 requests and exit between two readiness checks: it was
    # ready (its probe connection was accepted, which counts as progress), unannounced.
    assert 1 <= out.count("flaky ready on port") <= exits + 1
    said = "portpool: service 'flaky' exited (exit status 1); restarting in 0.1 s"
    assert out.count(said) == exits


def test_a_service_that_crashes_at_every_restart_with_tcp_readiness_gives_up(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Serves one request (ready by its tcp probe), exits 1; every later start crashes
    # before it accepts: those runs made no progress and count toward the limit.
    script = tmp_path / "once.py"
    script.write_text(
        "import os, socket, sys, time\n"
        "marker = sys.argv[1]\n"
        "if os.path.exists(marker):\n"
        "    time.sleep(0.05)\n"
        "    sys.exit(3)\n"
        "open(marker, 'w').close()\n"
        "sock = socket.socket(fileno=3)\n"
        "while True:\n"
        "    conn, _ = sock.accept()\n"
        "    if conn.recv(100):\n"
        "        conn.sendall(b'1 1\\n')\n"
        "        conn.close()\n"
        "        sys.exit(1)\n"
        "    conn.close()\n"
    )
    command = [sys.executable, str(script), str(tmp_path / "started")]
    config = write_config(
        tmp_path, port_base, {"crashy": {"restart": "on-failure", "command": command}}
    )
    proc = start("up", "--config", str(config), "--grace", "2")
    reader = LineReader(proc)
    wait_is_up(reader)
    port = service_record(config, "crashy")["port"]
    assert request(port) == (1, 1)
    # While it waits to restart, the record names no process (the old one is dead).
    waiting = wait_for(
        lambda: (r := service_record(config, "crashy"))["state"] == "restarting" and r, 30
    )
    assert waiting["pid"] is None
    assert waiting["started_at"] is None and waiting["ready_at"] is None
    out, err = reader.finish(90)
    assert proc.returncode == 5, (out, err)
    assert (
        "service 'crashy' gave up: more than 5 restarts within 60 s, none of them ready "
        "(last: exit status 3)" in err
    )
    assert "portpool: service 'crashy' exited (exit status 1); restarting in 0.1 s" in out
    assert "portpool: service 'crashy' exited (exit status 3); restarting in 1.6 s" in out


def test_crash_loop_of_one_service_stops_the_whole_instance(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    script = tmp_path / "crash.py"
    script.write_text("import sys, time\ntime.sleep(0.05)\nsys.exit(3)\n")
    config = write_config(
        tmp_path,
        port_base,
        {
            "calm": {},
            "crash": {
                "restart": "always",
                "ready": "none",
                "command": [sys.executable, str(script)],
            },
        },
    )
    proc = start("up", "--config", str(config), "--grace", "2")
    reader = LineReader(proc)
    lines = wait_is_up(reader)
    calm_pid = service_record(config, "calm")["pid"]
    out, err = reader.finish(90)
    assert proc.returncode == 5, (lines, out, err)
    assert (
        "service 'crash' gave up: more than 5 restarts within 60 s, none of them ran 1 s "
        "(last: exit status 3)" in err
    )
    assert not psutil.pid_exists(calm_pid) or psutil.Process(calm_pid).status() == "zombie"
    assert status_json(config)["instances"] == []


def test_kill_9_of_an_always_service_brings_it_back_on_the_same_socket(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_config(tmp_path, port_base, {"steady": {"restart": "always"}})
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        port = service_record(config, "steady")["port"]
        (before,) = listeners(port)
        first_pid, _ = request(port)
        os.kill(first_pid, signal.SIGKILL)
        # Dead first (a process still in accept() could take the next connection with
        # it), then a request while the service is down: it waits in the kept queue.
        wait_for(lambda: not _running(first_pid), 20)
        second_pid, n = request(port)
        assert second_pid != first_pid and n == 1
        assert listeners(port) == [before]  # the same listening socket (same inode)
        record = wait_for(
            lambda: (r := service_record(config, "steady"))["state"] == "ready" and r, 30
        )
        assert record["restarts"] == 1
        assert record["last_exit_status"] == 128 + signal.SIGKILL
        assert record["pid"] == second_pid and record["port"] == port
        shown = portpool("status", "--config", str(config)).stdout
        assert f"steady={port} (ready, 1 restart, last exit 137)" in shown
        # A rolling restart stops it with SIGTERM on purpose: the last failure stays.
        proc.send_signal(signal.SIGHUP)
        after = wait_for(
            lambda: (
                (r := service_record(config, "steady"))["state"] == "ready"
                and r["planned_restarts"] == 1
                and r
            ),
            30,
        )
        assert after["last_exit_status"] == 128 + signal.SIGKILL and after["restarts"] == 1
        assert after["pid"] not in (None, second_pid)
    finally:
        _out, err = stop_up(reader)
    assert proc.returncode == 0, err


def test_kill_9_of_up_leaves_nothing_with_restarting_services(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_config(
        tmp_path, port_base, {"one": {"restart": "always"}, "two": {"restart": "on-failure"}}
    )
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    wait_is_up(reader)
    ports = [service_record(config, n)["port"] for n in ("one", "two")]
    pids = [request(p)[0] for p in ports]
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 20)
    for port in ports:
        wait_for(lambda port=port: listeners(port) == [], 20)
    # Every lock was freed by the kernel: the next up gets the same ports.
    again = start("up", "--config", str(config))
    again_reader = LineReader(again)
    try:
        wait_is_up(again_reader)
        assert [service_record(config, n)["port"] for n in ("one", "two")] == ports
    finally:
        stop_up(again_reader)


def test_sighup_restarts_every_service_in_dependency_order_on_the_same_ports(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_config(tmp_path, port_base, {"web": {"depends_on": ["db"]}, "db": {}})
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        ports = {n: service_record(config, n)["port"] for n in ("db", "web")}
        old = {n: request(p)[0] for n, p in ports.items()}
        proc.send_signal(signal.SIGHUP)
        # Both come back, on the same ports, with new processes.
        new = wait_for(
            lambda: (
                (pids := {n: service_record(config, n)["pid"] for n in ports})["web"] != old["web"]
                and service_record(config, "web")["state"] == "ready"
                and pids
            ),
            60,
        )
        assert new["db"] != old["db"]
        assert {n: request(p)[0] for n, p in ports.items()} == new
        db, web = service_record(config, "db"), service_record(config, "web")
        assert web["started_at"] >= db["ready_at"]  # db was ready again before web restarted
        assert db["restarts"] == web["restarts"] == 0  # on purpose: not a failure
        assert db["planned_restarts"] == web["planned_restarts"] == 1
        assert db["last_exit_status"] is None  # its SIGTERM exit is no failure
        assert proc.poll() is None
    finally:
        out, err = stop_up(reader)
    assert proc.returncode == 0, err
    assert "portpool: rolling restart of db, web" in out
    assert out.count("(rolling restart)") == 2
    assert "(restart " not in out


def test_sighups_while_starting_or_restarting_are_queued_once(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_config(tmp_path, port_base, {"slow": {}})
    proc = start("up", "--config", str(config), env=env_with(START_DELAY="1.5"))
    reader = LineReader(proc)
    try:
        # The first record up writes has no state yet (and up's own pid): wait for one
        # with the service's process in it (CI under load read the first one).
        first = wait_for(
            lambda: (r := _record_if_any(config, "slow")) and "state" in r and r["pid"] and r, 30
        )
        assert first["state"] == "starting"
        # Each SIGHUP after the previous one's line: pending signals of one kind merge,
        # and up takes the same signal from the same sender within DUPLICATE_S as one.
        proc.send_signal(signal.SIGHUP)  # while starting: runs once it is ready
        reader.until(lambda line: "rolling restart once every service is ready" in line, 30)
        time.sleep(DUPLICATE_S + 0.1)  # (the same signal within DUPLICATE_S is one)
        # The same restart: it has not begun (two while starting ran two restarts).
        proc.send_signal(signal.SIGHUP)
        reader.until(lambda line: "a rolling restart is already queued" in line, 30)
        # While that one runs (its service takes 1.5 s to be ready): one more after it,
        # and no third.
        reader.until(lambda line: "portpool: rolling restart of slow" in line, 30)
        proc.send_signal(signal.SIGHUP)
        reader.until(lambda line: "rolling restart queued (one is running)" in line, 30)
        time.sleep(DUPLICATE_S + 0.1)
        proc.send_signal(signal.SIGHUP)
        reader.until(lambda line: "a rolling restart is already queued" in line, 30)
        assert proc.poll() is None
        record = wait_for(
            lambda: (
                (r := service_record(config, "slow"))["planned_restarts"] == 2
                and r["state"] == "ready"
                and r
            ),
            60,
        )
        assert record["pid"] != first["pid"] and record["restarts"] == 0
    finally:
        out, err = stop_up(reader)
    assert proc.returncode == 0, err
    assert out.count("(rolling restart)") == 2
    assert out.count("portpool: rolling restart of slow") == 2


def _record_if_any(config: Path, name: str) -> dict[str, Any] | None:
    instances = status_json(config)["instances"]
    if not instances:
        return None
    return next((s for s in instances[0]["services"] if s["name"] == name), None)


def test_restart_no_still_stops_the_instance(tmp_path: Path, port_base: int, home: Path) -> None:
    config = write_config(tmp_path, port_base, {"once": {}})
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    wait_is_up(reader)
    pid, _ = request(service_record(config, "once")["port"])
    os.kill(pid, signal.SIGKILL)
    _out, err = reader.finish(60)
    assert proc.returncode == 5
    assert "service 'once' exited on its own (killed by SIGKILL)" in err


def test_a_terminal_hangup_stops_up_instead_of_restarting(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    from tests.test_signals import Terminal

    config = write_config(tmp_path, port_base, {"svc": {"restart": "always"}})
    terminal = Terminal([sys.executable, "-m", "portpool.cli", "up", "--config", str(config)])
    try:
        terminal.read_until(b"is up")
        pid = service_record(config, "svc")["pid"]
        os.close(terminal.master)  # the window closes: the kernel hangs up on up
        terminal.master = os.open(os.devnull, os.O_RDONLY)  # for close() below
        deadline = time.monotonic() + 60
        while os.waitpid(terminal.pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, "up still runs after its terminal hung up"
            time.sleep(0.05)
        wait_for(lambda: not psutil.pid_exists(pid), 20)
        assert status_json(config)["instances"] == []
    finally:
        terminal.close()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_a_hangup_passed_on_by_the_shell_stops_up_too(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # `up` run from an interactive shell whose window closes: the kernel hangs up on the
    # shell, and bash passes SIGHUP on to its jobs as an ordinary signal from its own pid
    # (not from the kernel). That is still a hangup: `up` stops, it does not restart.
    from tests.test_signals import Terminal

    config = write_config(tmp_path, port_base, {"svc": {"restart": "always"}})
    command = " ".join(shlex.quote(a) for a in [*PORTPOOL, "up", "--config", str(config)])
    terminal = Terminal(["bash", "--norc", "--noprofile", "-i"])
    try:
        os.write(terminal.master, command.encode() + b"\n")
        terminal.read_until(b"is up")
        pid = service_record(config, "svc")["pid"]
        os.close(terminal.master)  # the window closes
        terminal.master = os.open(os.devnull, os.O_RDONLY)  # for close() below
        wait_for(lambda: not psutil.pid_exists(pid) and held_lock_files(home) == [], 60)
        assert status_json(config)["instances"] == []
    finally:
        terminal.close()


# Serves for a moment, then exits 1: ready (the probe connected), restarted, again.
SHORT_LIVED = """
import socket, sys, time
server = socket.socket(fileno=3)
server.settimeout(0.05)
end = time.monotonic() + 0.05
while time.monotonic() < end:
    try:
        server.accept()[0].close()
    except OSError:
        pass
sys.exit(1)
"""
COUNT_PUMPS = """
import gc, os, signal, sys, threading, time
from portpool import load_layout, run_up

def count() -> None:
    time.sleep(float(sys.argv[2]))
    pumps = [o for o in gc.get_objects()
             if isinstance(o, threading.Thread) and o.name.startswith("portpool-out-")]
    with open(sys.argv[3], "w") as out:  # not stdout: up's output may cut into the line
        out.write(str(len(pumps)))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=count, daemon=True).start()
run_up(load_layout(sys.argv[1]))
"""


def test_restarts_leave_no_output_pumps_behind(tmp_path: Path, port_base: int, home: Path) -> None:
    # Each start made a thread copying the service's output; finished ones were kept in a
    # list for good, so up grew by ~2 kB with every restart of a service that exits often.
    script = tmp_path / "short.py"
    script.write_text(SHORT_LIVED)
    service = {"command": [sys.executable, str(script)], "restart": "on-failure"}
    config = write_layout(tmp_path / "p.toml", port_base, services={"blip": service})
    done = subprocess.run(
        [sys.executable, "-c", COUNT_PUMPS, str(config), "4", str(tmp_path / "pumps")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    restarts = done.stdout.count("restarting in")
    assert restarts >= 5, done.stdout + done.stderr  # it did restart, many times
    pumps = int((tmp_path / "pumps").read_text())
    assert pumps <= 2, (pumps, restarts)


# Leaves a daemon (double fork, setsid) serving its socket, noting its pid in argv[1],
# then exits 1 (a crash) once the daemon answered.
LEAVES_A_DAEMON = """
import os, socket, sys, time
listening = socket.socket(fileno=3)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1], "a") as f:
            f.write(f"{os.getpid()}\\n")
        while True:
            conn, _ = listening.accept()
            conn.close()
    os._exit(0)
time.sleep(0.5)
sys.exit(1)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_restart_stops_what_the_previous_process_left_running(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Each restart left the crashed process's daemon running beside the new one: old
    # code kept answering on the same socket, one more copy per restart.
    pids_file = tmp_path / "daemons"
    script = tmp_path / "leaves.py"
    script.write_text(LEAVES_A_DAEMON)
    command = [sys.executable, str(script), str(pids_file)]
    keys = {"command": command, "restart": "always", "ready": "tcp"}
    config = write_service_layout(tmp_path, port_base, {"web": keys}, app="leftover", script="")
    proc = subprocess.Popen(
        [*PORTPOOL, "up", "-q", "--grace", "2", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def daemons() -> list[int]:
        return [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []

    try:
        assert wait_for(lambda: len(daemons()) >= 3, timeout=60), daemons()
        earlier = daemons()[:2]  # both started before a restart: stopped before it
        assert wait_for(lambda: all(_gone(p) for p in earlier), timeout=20), earlier
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, err
    assert all(_gone(p) for p in daemons())


def test_a_restart_that_cannot_exec_for_a_moment_is_retried_by_the_policy(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A program being rewritten (a build, a copy: ETXTBSY) while its service restarts
    could not be executed for a moment: that was a run exiting 127 for the restart
    policy, which retried it; starting programs without the exec shim made it the end
    of the whole instance ("could not start", exit 5)."""
    program = tmp_path / "svc.sh"
    gate = tmp_path / "exit-now"
    program.write_text(
        f"#!/bin/sh\necho run\nwhile [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.02; done\n"
        f"rm -f {shlex.quote(str(gate))}\nexit 1\n"
    )
    program.chmod(0o755)
    config = write_config(
        tmp_path,
        port_base,
        {
            "svc": {
                "restart": "on-failure",
                "ready": "log:^run$",
                "socket": "port",
                "command": [str(program)],
            }
        },
    )
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        writer = os.open(program, os.O_WRONLY | os.O_APPEND)  # the build writes it
        try:
            gate.touch()
            said = reader.until(lambda line: "could not be started again" in line, 30)
        finally:
            os.close(writer)
        assert "Text file busy); restarting in " in said[-1], said
        record = wait_for(
            lambda: (
                (r := service_record(config, "svc"))["state"] == "ready"
                and r["restarts"] >= 2
                and r
            ),
            30,
        )
        assert record["pid"] is not None
    finally:
        _out, err = stop_up(reader)
    assert proc.returncode == 0, err


# Answers one request with its pid, then shuts the passed listening socket down (as a
# server does to wake a thread blocked in accept) and exits 1.
SHUTS_ITS_SOCKET_DOWN = """\
import os, socket, sys
sock = socket.socket(fileno=3)
print("serving", flush=True)
while True:
    conn, _ = sock.accept()
    if conn.recv(100):
        conn.sendall(f"{os.getpid()} 1\\n".encode())
        conn.close()
        break
    conn.close()  # a readiness probe: it sends nothing
sock.shutdown(socket.SHUT_RDWR)
sys.exit(1)
"""


def _shutting_down_layout(tmp_path: Path, port_base: int, code: str) -> Path:
    """A layout of one on-failure service "svc" running ``code`` (ready at "serving").
    Only the restart is watched: a shield check right between a run's shutdown and its
    exit would see the socket not listening, which is its business."""
    script = tmp_path / "shuts.py"
    script.write_text(code)
    keys = {
        "restart": "on-failure",
        "ready": "log:^serving",
        "command": [sys.executable, str(script)],
    }
    config = write_config(tmp_path, port_base, {"svc": keys})
    config.write_text(config.read_text().replace("shield_interval = 0.5", "shield_interval = 60"))
    return config


def test_a_restart_gets_its_socket_listening_though_the_last_run_shut_it_down(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """shutdown(2) on a passed listening socket stops it listening for every holder,
    ``up``'s copy too: each restart was handed a dead socket (its accept failed with
    EINVAL) and every client was refused, though the restart policy promises the same
    socket. The socket is still bound to the port: ``up`` listens on it again before
    the next run starts."""
    config = _shutting_down_layout(tmp_path, port_base, SHUTS_ITS_SOCKET_DOWN)
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        pids = []
        for _ in range(3):
            for _attempt in range(200):  # refused while it restarts (bounded)
                try:
                    pids.append(request(port_base)[0])
                    break
                except OSError:
                    time.sleep(0.05)
        assert len(set(pids)) == 3, pids
        assert proc.poll() is None
    finally:
        _out, err = stop_up(reader)
    assert proc.returncode == 0, err


# A database whose first run serves until $GATE exists, then crashes; each later run
# takes a second before it serves (its port is bound by itself: refused meanwhile).
FLAKY_DB = """\
import os, socket, sys, time
runs = os.environ["RUNS"]
first = not os.path.exists(runs)
open(runs, "a").write("x")
if not first:
    time.sleep(1.0)
server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
server.settimeout(0.05)
print("serving", flush=True)
while not (first and os.path.exists(os.environ["GATE"])):
    try:
        server.accept()[0].close()
    except OSError:
        pass
sys.exit(1)
"""

# Connects to the database as it starts (fails if it is down), then serves fd 3.
NEEDS_DB = """\
import os, socket
socket.create_connection(("127.0.0.1", int(os.environ["PORTPOOL_PORT_DB"])), 5).close()
sock = socket.socket(fileno=3)
print("serving", flush=True)
while True:
    sock.accept()[0].close()
"""


def test_a_rolling_restart_waits_for_a_dependency_that_is_restarting_after_a_crash(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A SIGHUP while db restarted after a crash: db was passed over ("not ready"), and
    api, which depends on it, was restarted onto a dead db, failed, and ended the
    instance (exit 5)."""
    db, api = tmp_path / "db.py", tmp_path / "api.py"
    db.write_text(FLAKY_DB)
    api.write_text(NEEDS_DB)
    config = write_config(tmp_path, port_base, {
        "db": {"command": [sys.executable, str(db)], "socket": "port", "ready": "log:serving",
               "restart": "on-failure"},
        "api": {"command": [sys.executable, str(api)], "ready": "log:serving", "restart": "no",
                "depends_on": ["db"]},
    })  # fmt: skip
    gate = tmp_path / "gate"
    env = {**os.environ, "GATE": str(gate), "RUNS": str(tmp_path / "runs")}
    proc = start("up", "--config", str(config), env=env)
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        gate.touch()  # db crashes; its next run serves a second later
        wait_for(lambda: service_record(config, "db")["state"] != "ready", 30, interval=0.01)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: service_record(config, "api")["planned_restarts"] == 1, 30)
        assert service_record(config, "db")["state"] == "ready"
        assert proc.poll() is None
    finally:
        out, err = stop_up(reader)
    assert proc.returncode == 0, err
    assert "api exited" not in out and "ConnectionRefusedError" not in out, out


IGNORES_SIGTERM = """\
import signal, socket
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sock = socket.socket(fileno=3)
print("serving", flush=True)
while True:
    sock.accept()[0].close()
"""


# Starts a child that ignores SIGTERM (left behind when it exits), then serves fd 3.
LEAVES_A_STUBBORN_CHILD = """\
import signal, socket, subprocess, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 300"])
sock = socket.socket(fileno=3)
print("serving", flush=True)
while True:
    sock.accept()[0].close()
"""


@pytest.mark.parametrize(
    ("script", "killed"),
    [
        (IGNORES_SIGTERM, r"SIGKILL to service 'svc' \(pid \d+\)"),
        (LEAVES_A_STUBBORN_CHILD, r"SIGKILL to pid \d+ \(of service 'svc'\)"),
    ],
    ids=["the service", "its leftover"],
)
def test_a_rolling_restart_names_what_it_sigkills_after_the_grace(
    tmp_path: Path, port_base: int, home: Path, script: str, killed: str
) -> None:
    """A stop names each process it SIGKILLs when the grace is over; a rolling restart
    SIGKILLed a service that ignored SIGTERM, and what its process left running, without
    a word."""
    path = tmp_path / "svc.py"  # write_config writes its own service.py
    path.write_text(script)
    keys = {"command": [sys.executable, str(path)], "ready": "log:serving"}
    config = write_config(tmp_path, port_base, {"svc": keys})
    proc = start("up", "--grace", "0.3", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: service_record(config, "svc")["planned_restarts"] == 1, 30)
    finally:
        out, _err = stop_up(reader)
    restarting = out.partition("rolling restart of svc")[2].partition("stopping on SIGTERM")[0]
    assert re.search(r"still running 0\.3 s after SIGTERM \(--grace\): " + killed, restarting), out


# Says whether fd 3 came non-blocking, then sets it so (as an event loop does) and serves
# blocking-style: a restart handed the socket in that state failed at its first accept.
SETS_NONBLOCKING = """\
import os, select, socket
sock = socket.socket(fileno=3)
print("non-blocking at start:", not os.get_blocking(3), flush=True)
os.set_blocking(3, False)
print("serving", flush=True)
while True:
    select.select([sock], [], [])
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        continue
    conn.sendall(f"{os.getpid()} 1\\n".encode())
    conn.close()
"""


def test_every_run_gets_its_socket_blocking_whatever_the_last_run_set(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """O_NONBLOCK belongs to the socket, not to a descriptor: a run that set it (asyncio,
    node) handed it on to every restart, and a blocking accept() there failed at once
    (BlockingIOError), a restart loop that never gave up."""
    config = _shutting_down_layout(tmp_path, port_base, SETS_NONBLOCKING)
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        first, _ = request(port_base)
        proc.send_signal(signal.SIGHUP)  # a rolling restart: a new run on the same socket
        wait_for(lambda: service_record(config, "svc")["planned_restarts"] == 1, 30)
        assert request(port_base)[0] != first
    finally:
        out, err = stop_up(reader)
    assert proc.returncode == 0, err
    assert out.count("svc | non-blocking at start: False") == 2, out
    assert "non-blocking at start: True" not in out, out


# Shuts the passed listening socket down, says so, and exits 1 once $GATE exists.
SHUTS_DOWN_AND_WAITS = """\
import os, socket, sys, time
sock = socket.socket(fileno=3)
print("serving", flush=True)
sock.shutdown(socket.SHUT_RDWR)
print("shut down", flush=True)
for _ in range(3000):
    if os.path.exists(os.environ["GATE"]):
        break
    time.sleep(0.01)
sys.exit(1)
"""


def test_a_socket_that_cannot_listen_again_trips_the_shield_at_once(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """Between a run's shutdown(2) of the passed socket and its restart, a foreign
    socket with SO_REUSEADDR bound the port and listened: ``up`` cannot listen on its own
    socket again. It said so quoting Python ("[Errno 98] ..."), then handed the dead
    socket to every restart, announcing each "ready", until the shield's next check (10
    s by default; 60 here). It names the reason and trips now: exit 4, naming the
    foreign listener, no restart."""
    config = _shutting_down_layout(tmp_path, port_base, SHUTS_DOWN_AND_WAITS)
    gate = tmp_path / "gate"
    proc = start("up", "--config", str(config), env=env_with(GATE=str(gate)))
    reader = LineReader(proc)
    foreign = socket.socket()
    try:
        reader.until(lambda line: line.endswith("shut down"), 60)
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        foreign.bind(("127.0.0.1", port_base))
        foreign.listen()
        gate.touch()
        said = reader.until(lambda line: "cannot listen again" in line, 60)
        assert said[-1].endswith(
            "portpool: service 'svc': its socket cannot listen again (Address already in use)"
        ), said[-1]
        out, err = reader.finish(30)  # it ends by itself: no SIGTERM from here
    finally:
        foreign.close()
        out, err = stop_up(reader)
    assert proc.returncode == 4, out + err
    assert "shield tripped" in err and f"pid {os.getpid()}" in err, err
    assert "(restart 1)" not in out, out
    assert "Errno" not in out + err and "Traceback" not in err, out + err


# Serves on the socket at fd 3 (answering "<pid> 1"); on SIGTERM it shuts the listening
# socket down, drains for DRAIN_S seconds and exits 0: a graceful server's stop.
DRAINS_ON_SIGTERM = """\
import os, signal, socket, sys, threading, time
sock = socket.socket(fileno=3)
def drain(*a):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: draining already
    print("draining", flush=True)
    sock.shutdown(socket.SHUT_RDWR)
    time.sleep(float(os.environ.get("DRAIN_S", "1.5")))
    os._exit(0)
signal.signal(signal.SIGTERM, drain)
def serve():
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if conn.recv(100):
            conn.sendall(f"{os.getpid()} 1\\n".encode())
        conn.close()
threading.Thread(target=serve, daemon=True).start()
print("serving", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("command", ["up", "run"])
def test_a_service_that_shuts_its_socket_down_to_drain_does_not_trip_the_shield(
    tmp_path: Path, port_base: int, home: Path, command: str
) -> None:
    """A graceful server shuts its listening socket down on SIGTERM and drains: the
    shield, checking meanwhile, found our socket "no longer listening" and stopped the
    instance with exit 4 (a rolling restart of `up`, a `run` stopped by SIGTERM). Only
    a holder of the socket can shut it down, never a foreign program: the shield puts
    it back in listen state, the port stays ours, and clients queue for the next run."""
    script = tmp_path / "drains.py"
    script.write_text(DRAINS_ON_SIGTERM)
    argv = [sys.executable, str(script)]
    keys = {"restart": "on-failure", "ready": "log:^serving", "command": argv}
    config = write_config(tmp_path, port_base, {"svc": keys})
    config.write_text(config.read_text().replace("shield_interval = 0.5", "shield_interval = 0.1"))
    if command == "run":
        proc = start("run", "--config", str(config), "--fds", "--", *argv)
        reader = LineReader(proc)
        reader.until(lambda line: line == "serving", 60)
        first = request(port_base)[0]
        proc.send_signal(signal.SIGTERM)
        out, err = reader.finish(60)
        assert proc.returncode == 0, err  # the command's own status, not the shield's 4
        assert "shield" not in err
        assert "draining" in out
        return
    proc = start("up", "--config", str(config))
    reader = LineReader(proc)
    try:
        wait_is_up(reader)
        first = request(port_base)[0]
        proc.send_signal(signal.SIGHUP)  # a rolling restart: SIGTERM to the service
        reader.until(lambda line: "svc ready on port" in line and "rolling" in line, 60)
        second = request(port_base)[0]
        assert second != first
        assert proc.poll() is None
    finally:
        _out, err = stop_up(reader)
    assert proc.returncode == 0, err
    assert "shield tripped" not in err


def test_probe_and_stop_backoff_stay_capped_after_thousands_of_tries() -> None:
    """Readiness probes every 50 ms and the stop's checks computed 0.005 * 2**attempt:
    past attempt 1074 (about 52 s of waiting: a long ready_timeout_s, a --grace of a
    minute) that is past a float, and up crashed with OverflowError mid-stop, leaving a
    service that ignored SIGTERM running, never SIGKILLed."""
    from portpool._restart import backoff_s

    assert backoff_s(0.005, 0.05, 0) == 0.005
    assert backoff_s(0.005, 0.05, 3) == 0.04
    for attempt in (10, 1074, 1075, 100_000):
        assert backoff_s(0.005, 0.05, attempt) == 0.05
