"""The pytest plugin, in real pytest sessions (with pytest-xdist) started as subprocesses.

Each session runs in its own directory with its own ``pytest.ini`` and shares one
temporary PORTPOOL_HOME with the sessions it races, as concurrent runs on a host share
the user's state dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks._sessions import (
    count_log,
    pytest_cmd,
    run_serving_sessions,
    serve_tests,
    session_dir,
    session_env,
)
from tests.conftest import find_free_block
from tests.helpers import Terminal, kill_if_running, wait_for, write_layout


def _run(where: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pytest_cmd(*args),
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# Apart from the 20000-30000 blocks other tests pick, below the ephemeral range, and
# below the README's fixed ports (18080.., 18200..): these sessions' servers bind without
# SO_REUSEADDR, and their TIME_WAITs once refused the README's acquire of 18200-18202.
LOW, HIGH = 10000, 17999


def _free_range(size: int) -> tuple[int, int]:
    base = find_free_block(size, low=LOW, high=HIGH)
    return base, base + size - 1


def test_concurrent_xdist_sessions_never_share_a_port_and_always_bind(tmp_path: Path) -> None:
    # 600 servers each leave TIME_WAIT on their port for a minute: a range of 900 ports
    # means the workers' shares meet, and the ones that move into ports used earlier
    # in this run must skip them.
    low, high = _free_range(900)
    text = serve_tests(300, "portpool_port", fail_on_bind_error=True)
    done, lines = run_serving_sessions(
        tmp_path, text, f"portpool_port_range = {low}-{high}\n", timeout_s=180
    )
    outputs = [out for _, out in done]
    failures = [x for x in lines if x[0] == "BINDFAIL"]
    assert failures == [], outputs
    for status, out in done:
        assert status == 0, out
        assert "300 passed" in out, out
    served = [(int(x[1]), float(x[2]), float(x[3]), x[4]) for x in lines if x[0] == "OK"]
    assert len(served) == 600
    assert all(low <= port <= high for port, *_ in served)
    # The two runs really ran at the same time.
    starts = {run: min(s for _, s, _, r in served if r == run) for run in ("a", "b")}
    ends = {run: max(e for _, _, e, r in served if r == run) for run in ("a", "b")}
    assert max(starts.values()) < min(ends.values())
    assert count_log(lines) == (600, 0, 0, len({port for port, *_ in served})), lines


HOLD = """
import os, socket, time

def test_hold(portpool_port):
    server = socket.socket()
    server.bind(("127.0.0.1", portpool_port))
    server.listen()
    with open(os.environ["PLUGIN_READY"], "w") as f:
        f.write(f"{os.getpid()} {portpool_port}")
    time.sleep(120)
"""

TAKE = """
import socket

def test_take(portpool_port):
    server = socket.socket()
    server.bind(("127.0.0.1", portpool_port))
    server.listen()
    print("GOT", portpool_port)
    server.close()
"""


def test_a_killed_test_process_frees_its_port_at_once(tmp_path: Path) -> None:
    home = tmp_path / "state"
    low, _ = _free_range(1)
    ini = f"portpool_port_range = {low}-{low}\n"
    ready = tmp_path / "ready"
    holder_dir = session_dir(tmp_path, "holder", HOLD, ini)
    holder = subprocess.Popen(
        pytest_cmd("-s"),
        cwd=holder_dir,
        env=session_env(home, PLUGIN_READY=str(ready)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = wait_for(lambda: ready.exists() and ready.read_text(), timeout=60)
        pid, port = (int(x) for x in text.split())
        assert pid == holder.pid and port == low
        taker_dir = session_dir(tmp_path, "taker", TAKE, ini)
        refused = _run(taker_dir, session_env(home), "-s")
        assert refused.returncode == 1, refused.stdout
        assert "PoolExhausted" in refused.stdout
        assert f"pid {holder.pid}" in refused.stdout, refused.stdout
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        got = _run(taker_dir, session_env(home), "-s")
        assert got.returncode == 0, got.stdout
        assert f"GOT {low}" in got.stdout
    finally:
        kill_if_running(holder)


def test_an_exhausted_range_names_the_foreign_listener(tmp_path: Path) -> None:
    low, _ = _free_range(1)
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", low))
    foreign.listen()
    try:
        where = session_dir(tmp_path, "s", TAKE, f"portpool_port_range = {low}-{low}\n")
        done = _run(where, session_env(tmp_path / "state"))
    finally:
        foreign.close()
    assert done.returncode == 1, done.stdout
    assert f"no free port in {low}-{low}" in done.stdout
    # The words of the library's diagnosis, as doctor and acquire say it.
    listening = f"port {low}: in use (used by pid {os.getpid()} ("
    assert listening in done.stdout, done.stdout
    assert f") listening on 127.0.0.1:{low})" in done.stdout
    # The error and its words, not the plugin's own code: the traceback printed the
    # whole of the port source's take() above them.
    assert "PoolExhausted" in done.stdout
    for inside in ("_pytest_source.py", "pytest_plugin.py", "def take("):
        assert inside not in done.stdout, done.stdout


@pytest.mark.parametrize("reuse", [True, False], ids=["server-reuseaddr", "plain-server"])
def test_a_port_left_in_time_wait_is_not_handed_out(tmp_path: Path, reuse: bool) -> None:
    low, _ = _free_range(1)
    # An earlier server answers one connection and closes first: TIME_WAIT on the port.
    # One that set SO_REUSEADDR (asyncio's, http.server's do) lets portpool's own bind
    # through: only the check without SO_REUSEADDR sees the TIME_WAIT then.
    server = socket.socket()
    if reuse:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", low))
    server.listen()
    client = socket.create_connection(("127.0.0.1", low))
    conn, _ = server.accept()
    conn.close()
    assert client.recv(16) == b""
    client.close()
    server.close()
    plain = socket.socket()
    with pytest.raises(OSError):
        plain.bind(("127.0.0.1", low))  # what the next test's server would meet
    plain.close()
    where = session_dir(tmp_path, "s", TAKE, f"portpool_port_range = {low}-{low}\n")
    done = _run(where, session_env(tmp_path / "state"))
    assert done.returncode == 1, done.stdout
    assert "1 error" in done.stdout  # refused at set-up, never handed to the test
    assert f"no free port in {low}-{low} (1 port)" in done.stdout
    # The diagnosis's words: our own bind passes a TIME_WAIT the server's SO_REUSEADDR
    # left; without it, our bind fails too. Never "a foreign process (unknown)".
    if reuse:
        said = "in use (a server that does not set SO_REUSEADDR cannot bind it yet: "
    else:
        said = "in use (used by "
    assert f"port {low}: {said}a closed connection in TIME_WAIT" in done.stdout, done.stdout
    assert f"a closed connection in TIME_WAIT from 127.0.0.1:{low} to 127.0.0.1:" in done.stdout
    assert "foreign process" not in done.stdout


INSTANCE = """
import os, socket, time
import pytest

@pytest.mark.parametrize("i", range(8))
def test_instance(i, portpool_instance, portpool_lease):
    lease = portpool_instance.leases["web"]
    assert lease.socket is not None
    assert portpool_lease.socket.getsockname()[1] == portpool_lease.port
    client = socket.create_connection(("127.0.0.1", portpool_lease.port))
    conn, _ = portpool_lease.socket.accept()
    conn.sendall(b"hi")
    assert client.recv(2) == b"hi"
    conn.close()
    client.close()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["PLUGIN_LOG_DIR"], worker), "a") as f:
        f.write(f"{portpool_instance.number} {lease.port}\\n")
    time.sleep(0.1)  # both workers get tests
"""


def test_portpool_instance_gives_each_worker_its_own_instance(tmp_path: Path) -> None:
    base = find_free_block(20, low=LOW, high=HIGH)
    logs = tmp_path / "logs"
    logs.mkdir()
    where = session_dir(tmp_path, "s", INSTANCE, "portpool_layout = conf/app.toml\n")
    (where / "conf").mkdir()
    write_layout(where / "conf" / "app.toml", base, app="plugin-test", services={"web": {}})
    done = _run(where, session_env(tmp_path / "state", PLUGIN_LOG_DIR=str(logs)), "-n", "2")
    assert done.returncode == 0, done.stdout
    per_worker = {
        f.name: {tuple(line.split()) for line in f.read_text().splitlines()} for f in logs.iterdir()
    }
    assert sorted(per_worker) == ["gw0", "gw1"]
    assert all(len(seen) == 1 for seen in per_worker.values()), per_worker
    numbers = {next(iter(seen))[0] for seen in per_worker.values()}
    ports = {next(iter(seen))[1] for seen in per_worker.values()}
    assert numbers == {"1", "2"}
    assert ports == {str(base), str(base + 10)}


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except OSError:
        pytest.skip("this OS does not tell its ephemeral port range in /proc")
    return low, high


@pytest.mark.parametrize("where", ["option", "ini"])
def test_a_range_overlapping_the_ephemeral_range_is_a_usage_error(
    tmp_path: Path, where: str
) -> None:
    low, high = _ephemeral()
    value = f"{low - 10}-{low + 10}"
    ini = f"portpool_port_range = {value}\n" if where == "ini" else ""
    args = ["--portpool-port-range", value] if where == "option" else []
    session = session_dir(tmp_path, "s", TAKE, ini)
    done = _run(session, session_env(tmp_path / "state"), *args)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert f"overlaps this host's ephemeral port range {low}-{high}" in done.stderr


def test_a_malformed_range_is_a_usage_error(tmp_path: Path) -> None:
    session = session_dir(tmp_path, "s", TAKE)
    done = _run(session, session_env(tmp_path / "state"), "--portpool-port-range", "20000")
    assert done.returncode == 4
    assert "expected LOW-HIGH" in done.stderr


def test_the_plugin_is_inert_in_a_session_that_asks_for_no_port(tmp_path: Path) -> None:
    home = tmp_path / "state"
    session = session_dir(tmp_path, "s", "def test_nothing():\n    pass\n")
    done = _run(session, session_env(home))
    assert done.returncode == 0, done.stdout
    assert not home.exists()  # not even the state dir was created


def test_ports_of_one_test_are_distinct_and_released_after_it(tmp_path: Path) -> None:
    low, high = _free_range(4)
    text = """
import socket

def test_many(portpool_port, portpool_port_factory):
    ports = [portpool_port] + [portpool_port_factory() for _ in range(3)]
    assert len(set(ports)) == 4
    for port in ports:
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.close()

def test_again(portpool_port_factory):
    assert len({portpool_port_factory() for _ in range(4)}) == 4
"""
    where = session_dir(tmp_path, "s", text, f"portpool_port_range = {low}-{high}\n")
    done = _run(where, session_env(tmp_path / "state"))
    assert done.returncode == 0, done.stdout


def test_the_benchmark_counts_overlaps_and_bind_failures() -> None:
    lines = [
        ["OK", "5000", "1.0", "2.0"],
        ["OK", "5000", "1.5", "2.5"],  # the same port while the first test still had it
        ["OK", "5000", "3.0", "4.0"],  # later: fine
        ["OK", "5001", "1.0", "2.0"],
        ["BINDFAIL", "5002", "98"],
    ]
    assert count_log(lines) == (4, 1, 1, 2)


# A test that changes the environment or directory before its first port: the run's
# state dir was fixed at start-up, so its ports are locked where every other worker and
# run looks (a worker once moved to another state dir and got a port another one held).
MOVE = """
import os

def test_moves_then_takes(monkeypatch, request):
    how, elsewhere = os.environ["PLUGIN_MOVE"], os.environ["PLUGIN_ELSEWHERE"]
    monkeypatch.setenv(how, elsewhere)
    port = request.getfixturevalue("portpool_port")
    instance = request.getfixturevalue("portpool_instance")
    print("GOT", port, instance.number)
"""


@pytest.mark.parametrize(
    ("how", "xdist"),
    [
        ("PORTPOOL_HOME", False),
        ("PORTPOOL_HOME", True),
        ("XDG_RUNTIME_DIR", False),
    ],
)
def test_the_state_dir_is_fixed_at_start_up(tmp_path: Path, how: str, xdist: bool) -> None:
    low, high = _free_range(2)
    base = find_free_block(20, low=LOW, high=HIGH)
    where = session_dir(tmp_path, "s", MOVE, f"portpool_port_range = {low}-{high}\n")
    write_layout(where / "portpool.toml", base, app="plugin-move", services={"web": {}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    env = session_env(tmp_path / "state", PLUGIN_MOVE=how, PLUGIN_ELSEWHERE=str(elsewhere))
    state = tmp_path / "state"
    if how == "XDG_RUNTIME_DIR":
        del env["PORTPOOL_HOME"]
        (tmp_path / "xdg").mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(tmp_path / "xdg")
        state = tmp_path / "xdg" / "portpool"
    if xdist:
        # The controller's environment changes after start-up, before its workers are
        # started: they still take the controller's state dir (through workerinput).
        (where / "conftest.py").write_text(
            "import os\n\n"
            "def pytest_sessionstart(session):\n"
            "    if not hasattr(session.config, 'workerinput'):\n"
            "        os.environ['PORTPOOL_HOME'] = os.environ['PLUGIN_ELSEWHERE']\n"
        )
    done = _run(where, env, "-s", *(["-n", "2"] if xdist else []))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GOT" in done.stdout or xdist  # xdist does not show -s output
    assert sorted(os.listdir(elsewhere)) == []
    assert (state / "ports").is_dir()
    assert (state / "apps" / "plugin-move" / "instances").is_dir()


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist"])
@pytest.mark.parametrize("value", ["", "state"])
def test_an_empty_or_relative_portpool_home_fails_the_tests_that_ask_for_a_port(
    tmp_path: Path, value: str, xdist: bool
) -> None:
    """A relative one once named another state dir in every working directory (a test
    that changed directory took ports in another one); an empty one fell back to the
    per-user default without a word. Refused, it failed every pytest run of the
    environment (exit 4), even one that asks for no port: now each test that asks
    fails with the one line, and the others pass."""
    tests = "def test_nothing():\n    pass\n\ndef test_a_port(portpool_port):\n    pass\n"
    where = session_dir(tmp_path, "s", tests)
    env = session_env(tmp_path / "unused")
    env["PORTPOOL_HOME"] = value
    done = _run(where, env, *(["-p", "xdist", "-n", "2"] if xdist else []), "-rfE")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # a test failed, not a usage error (4)
    assert "1 passed" in out and ("1 failed" in out or "1 error" in out), out
    assert f"portpool: state dir PORTPOOL_HOME={value!r}: is " in out, out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    assert not (where / "state").exists()


OWN = """
def test_all_mine(portpool_port_factory):
    portpool_port_factory()
    portpool_port_factory()
    portpool_port_factory()
"""


def test_an_exhausted_range_tells_ports_this_run_holds_from_others(tmp_path: Path) -> None:
    low, high = _free_range(2)
    where = session_dir(tmp_path, "s", OWN, f"portpool_port_range = {low}-{high}\n")
    done = _run(where, session_env(tmp_path / "state"))
    assert done.returncode == 1, done.stdout
    assert f"no free port in {low}-{high} (2 ports)" in done.stdout
    assert "2 held by this test process itself (pid " in done.stdout, done.stdout
    assert "tests of this run still holding them), e.g. port " in done.stdout
    assert "other portpool users" not in done.stdout
    # One port is "it" ("1 held ... still holding them").
    (where / "pytest.ini").write_text(f"[pytest]\nportpool_port_range = {low}-{low}\n")
    done = _run(where, session_env(tmp_path / "state"))
    assert "1 held by this test process itself (pid " in done.stdout, done.stdout
    assert "tests of this run still holding it), e.g. port " in done.stdout, done.stdout


@pytest.mark.parametrize("where", ["option", "ini"])
def test_a_bad_layout_is_a_usage_error_at_start_up(tmp_path: Path, where: str) -> None:
    session = session_dir(tmp_path, "s", "def test_nothing():\n    pass\n")
    if where == "option":
        done = _run(session, session_env(tmp_path / "state"), "--portpool-layout", "missing.toml")
        assert done.returncode == 4, done.stdout + done.stderr
        assert "portpool: --portpool-layout = 'missing.toml': " in done.stderr
    else:
        (session / "pytest.ini").write_text("[pytest]\nportpool_layout = bad.toml\n")
        (session / "bad.toml").write_text("app = \n")
        done = _run(session, session_env(tmp_path / "state"))
        assert done.returncode == 4, done.stdout + done.stderr
        assert "portpool: portpool_layout (ini) = 'bad.toml': " in done.stderr
        assert "bad.toml" in done.stderr.split("'bad.toml': ", 1)[1]
    assert not (tmp_path / "state").exists()


def test_a_layout_overlapping_the_port_range_is_warned_about(tmp_path: Path) -> None:
    low, high = _free_range(40)
    session = session_dir(
        tmp_path,
        "s",
        "def test_nothing():\n    pass\n",
        f"portpool_port_range = {low}-{high}\nportpool_layout = app.toml\n",
    )
    write_layout(session / "app.toml", low + 10, services={"web": {}}, max_instances=2)
    done = _run(session, session_env(tmp_path / "state"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PortpoolWarning: portpool: the pools of layout " in done.stdout, done.stdout
    assert f"share 4 ports ({low + 10}, {low + 11}, {low + 20}, {low + 21})" in done.stdout
    assert "1 passed, 1 warning in" in done.stdout, done.stdout
    # Once, by the controller: each xdist worker added it again ("1 passed, 3 warnings").
    done = _run(session, session_env(tmp_path / "state"), "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 warning in" in done.stdout, done.stdout
    # Apart: no warning.
    write_layout(session / "app.toml", high + 1, services={"web": {}}, max_instances=2)
    done = _run(session, session_env(tmp_path / "state"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PortpoolWarning" not in done.stdout
    # One port shared is "it" ("a test holding one of them ... apart from them").
    (session / "app.toml").write_text(
        f'app = "one"\nmax_instances = 1\n[services.web]\nbase = {high}\nsize = 1\n'
    )
    done = _run(session, session_env(tmp_path / "state"))
    text = " ".join(done.stdout.split())  # the warning is wrapped
    assert f"share 1 port ({high}) with the portpool_port range" in text, done.stdout
    assert "a test holding it blocks that pool" in text and "apart from it" in text, text


ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + d) for d in range(10)))
FULLWIDTH = str.maketrans("0123456789", "".join(chr(0xFF10 + d) for d in range(10)))


@pytest.mark.parametrize(
    "text",
    [
        "20000-29999".translate(ARABIC_INDIC),
        "20000-29999".translate(FULLWIDTH),
        "+20000-29999",
        "20_000-29_999",
        "20000",
        "1-2-3",
    ],
)
def test_a_range_of_anything_but_ascii_digits_is_refused(text: str) -> None:
    from portpool.pytest_plugin import parse_port_range

    with pytest.raises(pytest.UsageError, match="expected LOW-HIGH"):
        parse_port_range(text)


@pytest.mark.parametrize("text", ["20000-20099", " 20000 - 20099 ", "20000..20099"])
def test_a_range_of_ascii_digits_is_read(text: str) -> None:
    from portpool.pytest_plugin import parse_port_range

    assert parse_port_range(text) == (20000, 20099)


# Ephemeral ranges (first, last) with room beside them: Linux's default, ranges starting
# at 1024 (a common tuning), ending at 65535, and one below 1024.
ROOMY = [(32768, 60999), (1024, 2000), (60000, 65535), (1024, 65000), (1, 1000), (49152, 65535)]


@pytest.mark.parametrize("ephemeral", ROOMY)
def test_the_advice_for_an_overlapping_range_is_a_range_outside_the_ephemeral_one(
    ephemeral: tuple[int, int],
) -> None:
    from portpool.pytest_plugin import MIN_SIZE, default_range, range_advice

    advice = range_advice(ephemeral)
    match = re.fullmatch(r"choose a range outside it, e.g. ([0-9]+)-([0-9]+)", advice)
    assert match, advice
    low, high = int(match[1]), int(match[2])
    assert low >= 1024 and high <= 65535 and high - low + 1 >= MIN_SIZE, advice
    assert high < ephemeral[0] or ephemeral[1] < low, advice
    # ... and it is the range the plugin takes when none is set.
    assert default_range(ephemeral) == (low, high)


# 1024-65535 got "choose a range outside it, e.g. 65536-65535".
@pytest.mark.parametrize("ephemeral", [(1024, 65535), (1, 65535), (1000, 65500)])
def test_no_room_beside_the_ephemeral_range_is_said_with_what_to_do(
    ephemeral: tuple[int, int],
) -> None:
    from portpool.pytest_plugin import default_range, range_advice

    assert default_range(ephemeral) is None
    advice = range_advice(ephemeral)
    assert advice.startswith("no 100 ports within 1024-65535 are outside it; narrow it, e.g. ")
    assert "e.g. sudo sysctl" in advice or sys.platform not in ("linux", "darwin"), advice
    below = ephemeral[0] - 1  # ports below it: for root only
    assert (f"choose a range within 1-{below}" in advice) == (below > 0), advice
    assert not re.search(r"[0-9]+-[0-9]+, and", advice), advice  # no range "outside" it


@pytest.mark.parametrize(
    "ephemeral", [None, (32768, 60999), (5000, 5100), (1024, 19999), (30000, 65535)]
)
def test_the_default_range_is_20000_29999_where_it_is_outside_the_ephemeral_range(
    ephemeral: tuple[int, int] | None,
) -> None:
    """An ephemeral range all below 20000 (5000-5100) moved the default below itself,
    to 1024-4999, though 20000-29999 was free of it, as the README says."""
    from portpool.pytest_plugin import default_range

    assert default_range(ephemeral) == (20000, 29999)


def test_a_session_that_asks_for_nothing_imports_little_of_portpool(tmp_path: Path) -> None:
    text = """
import sys

def test_modules():
    print("LOADED", sorted(m for m in sys.modules if m.startswith("portpool")))
"""
    session = session_dir(tmp_path, "s", text)
    done = _run(session, session_env(tmp_path / "state"), "-s")
    assert done.returncode == 0, done.stdout
    assert "'portpool.pytest_plugin'" in done.stdout  # the plugin was loaded
    heavy = ("instance", "pool", "lock", "layout", "diagnosis", "records", "shield")
    for name in heavy:
        assert f"'portpool.{name}'" not in done.stdout, done.stdout


def test_a_default_layout_overlapping_the_range_is_warned_about_when_used(
    tmp_path: Path,
) -> None:
    low, high = _free_range(40)
    text = "def test_instance(portpool_instance):\n    assert portpool_instance.number == 1\n"
    session = session_dir(tmp_path, "s", text, f"portpool_port_range = {low}-{high}\n")
    write_layout(session / "portpool.toml", low + 10, services={"web": {}}, max_instances=2)
    done = _run(session, session_env(tmp_path / "state"))
    assert done.returncode == 0, done.stdout + done.stderr
    # Said at the layout file, not at a line of pytest's fixtures.py.
    assert "portpool.toml:1: PortpoolWarning: portpool: the pools of layout " in done.stdout, (
        done.stdout
    )
    assert "_pytest" not in done.stdout, done.stdout


def _readme_section(title: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end < 0 else end]


def _python_blocks(section: str) -> list[str]:
    """The runnable ```python blocks of ``section`` (not those marked a fragment)."""
    blocks = []
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "```python" and (i == 0 or lines[i - 1].strip() != "<!-- fragment -->"):
            end = lines.index("```", i + 1)
            blocks.append("\n".join(lines[i + 1 : end]) + "\n")
    return blocks


def test_the_readmes_pytest_examples_pass_as_tests_under_xdist(tmp_path: Path) -> None:
    # The README's test examples ran only as scripts (tests/test_readme.py), which
    # defines the test functions and calls none: a broken example passed there.
    blocks = [b for b in _python_blocks(_readme_section("Testing with pytest")) if "def test_" in b]
    assert len(blocks) >= 5
    layout = _readme_section("The command line").split("# file: portpool.toml\n", 1)[1]
    layout = layout.split("```", 1)[0]
    low, high = _free_range(200)
    where = tmp_path / "suite"
    where.mkdir()
    (where / "pytest.ini").write_text(f"[pytest]\nportpool_port_range = {low}-{high}\n")
    (where / "portpool.toml").write_text(layout)
    # The worker that an example starts itself, saved as the README saves it.
    worker = _readme_section("The command line").split("# file: worker.py\n", 1)[1]
    (where / "worker.py").write_text(worker.split("```", 1)[0])
    for number, block in enumerate(blocks):
        (where / f"test_readme_{number}.py").write_text(block)
    tests = sum(block.count("\ndef test_") + block.startswith("def test_") for block in blocks)
    done = _run(where, session_env(tmp_path / "state"), "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{tests} passed" in done.stdout, done.stdout


UNUSABLE = """
def test_port(portpool_port):
    pass

def test_factory(portpool_port_factory):
    portpool_port_factory()

def test_lease(portpool_lease):
    pass

def test_instance(portpool_instance):
    pass

def test_plain():
    pass
"""


@pytest.mark.parametrize("xdist", [False, True])
def test_an_unusable_state_dir_is_one_line_per_test_not_a_traceback(
    tmp_path: Path, xdist: bool
) -> None:
    """A state dir portpool refuses (here: open to others) is the environment's fault,
    the same for every test: each test that asks for a port said so under a screenful
    of traceback through pytest-asyncio, the plugin and ``statedir``."""
    low, high = _free_range(4)
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o755)
    where = session_dir(tmp_path, "s", UNUSABLE, f"portpool_port_range = {low}-{high}\n")
    base = find_free_block(2, low=LOW, high=HIGH)
    write_layout(where / "portpool.toml", base, app="plugin-unusable", services={"web": {}})
    done = _run(where, session_env(home), *(["-n", "2"] if xdist else []))
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed, 3 errors" in done.stdout, out
    said = f"portpool: state dir {home}: is readable by group or others (mode 755)"
    assert done.stdout.count(said) >= 4, out
    for frame in ("statedir.py", "pytest_plugin.py", "_pytest_source.py", "Traceback"):
        assert frame not in out, out
    assert "INTERNALERROR" not in out


def test_the_plugin_is_named_portpool_for_p_and_no(tmp_path: Path) -> None:
    """What the README says: ``-p no:portpool`` turns it off (a suite of plain tests
    still runs), ``-p portpool`` loads it where autoloading is off."""
    low, high = _free_range(2)
    plain = session_dir(tmp_path, "plain", "def test_nothing():\n    pass\n")
    off = _run(plain, session_env(tmp_path / "state"), "-p", "no:portpool")
    assert off.returncode == 0, off.stdout + off.stderr
    assert "1 passed" in off.stdout
    assert not (tmp_path / "state").exists()
    ported = session_dir(tmp_path, "ported", TAKE, f"portpool_port_range = {low}-{high}\n")
    env = session_env(tmp_path / "state", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    loaded = _run(ported, env, "-s", "-p", "portpool")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert f"GOT {low}" in loaded.stdout or f"GOT {high}" in loaded.stdout, loaded.stdout
    unloaded = _run(ported, env)
    assert unloaded.returncode == 1, unloaded.stdout
    assert "fixture 'portpool_port' not found" in unloaded.stdout


BY_NUMBER = """
import errno, socket
import pytest

def test_bind_the_instance_port_itself(portpool_instance):
    lease = portpool_instance.leases["web"]
    with pytest.raises(OSError) as refused:
        socket.create_server(("127.0.0.1", lease.port))
    assert refused.value.errno == errno.EADDRINUSE
    lease.close_socket()
    server = socket.socket()
    server.bind(("127.0.0.1", lease.port))  # no SO_REUSEADDR
    server.listen()
    assert portpool_instance.env("web")["PORT"] == str(lease.port)
    assert lease.lock.problem() is None  # the lock stays ours
    server.close()
"""


def test_a_service_binding_the_instance_port_itself_does_so_once_the_socket_is_closed(
    tmp_path: Path,
) -> None:
    """What the README tells a test that starts a ``socket = "port"`` service itself."""
    base = find_free_block(20, low=LOW, high=HIGH)
    where = session_dir(tmp_path, "s", BY_NUMBER)
    write_layout(where / "portpool.toml", base, app="plugin-by-number", services={"web": {}})
    done = _run(where, session_env(tmp_path / "state"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


TWO_INSTANCE_TESTS = """
def test_a(portpool_instance):
    pass

def test_b(portpool_instance):
    pass
"""


def test_an_instance_that_cannot_start_is_its_error_not_portpools_code(tmp_path: Path) -> None:
    """The error of ``start_instance`` (here the only slot's pool taken by a foreign
    listener) with its words, once per test: the report printed the source of
    ``acquire`` and the frames of ``instance`` and ``_slots`` above it, twice."""
    base = find_free_block(1, low=LOW, high=HIGH)
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", base))
    foreign.listen()
    try:
        where = session_dir(tmp_path, "s", TWO_INSTANCE_TESTS)
        (where / "portpool.toml").write_text(
            f'app = "plugin-full"\nmax_instances = 1\n[services.web]\nbase = {base}\nsize = 1\n'
        )
        done = _run(where, session_env(tmp_path / "state"))
    finally:
        foreign.close()
    assert done.returncode == 1, done.stdout
    assert "2 errors" in done.stdout
    said = f"PoolExhausted: instance 1: service 'web': no free port in pool [{base}]"
    assert done.stdout.count(said) >= 2, done.stdout
    assert f"port {base}: in use (used by pid {os.getpid()} (" in done.stdout
    for inside in (": in fill_slot", ": in start_instance", "def acquire(", "pytest_plugin.py"):
        assert inside not in done.stdout, done.stdout


def _with_ephemeral(first: int, last: int) -> list[str]:
    """A command prefix: a network namespace of its own with this ephemeral range."""
    set_it = f'echo "{first} {last}" > /proc/sys/net/ipv4/ip_local_port_range && exec "$@"'
    wrap = ["unshare", "-rn", "sh", "-c", set_it, "sh"]
    if subprocess.run([*wrap, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no unprivileged network namespace here (unshare -rn) to set its range")
    return wrap


def test_a_host_with_no_default_range_is_one_error_not_the_plugins_code(tmp_path: Path) -> None:
    """Where the ephemeral range leaves no default range, a test asking for a port got
    the error under the source of ``port_range`` and ``_source``, and the range as a
    Python tuple; it said "set --portpool-port-range", which every range would fail."""
    wrap = _with_ephemeral(1024, 65535)
    where = session_dir(tmp_path, "s", TAKE)
    env = session_env(tmp_path / "state")
    done = subprocess.run(
        [*wrap, *pytest_cmd()],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    said = (
        "portpool: this host's ephemeral port range 1024-65535 leaves no default range for "
        "portpool_port: no 100 ports within 1024-65535 are outside it; narrow it, e.g. sudo "
        "sysctl -w net.ipv4.ip_local_port_range='32768 60999', and run pytest again"
    )
    assert said in done.stdout, done.stdout
    for inside in ("def port_range(", "pytest_plugin.py", "--portpool-port-range"):
        assert inside not in done.stdout, done.stdout
    # A range given there: refused, with the same advice, never "e.g. 65536-65535".
    option = ["--portpool-port-range", "43000-43099"]
    done = subprocess.run(
        [*wrap, *pytest_cmd(*option)],
        check=False,
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert "overlaps this host's ephemeral port range 1024-65535" in done.stderr, done.stderr
    assert "narrow it, e.g. sudo sysctl" in done.stderr, done.stderr
    assert "65536" not in done.stderr, done.stderr


def test_a_host_with_no_room_below_its_ephemeral_range_defaults_above_it(tmp_path: Path) -> None:
    wrap = _with_ephemeral(1024, 65000)
    where = session_dir(tmp_path, "s", TAKE)
    done = subprocess.run(
        [*wrap, *pytest_cmd("-s")],
        check=False,
        cwd=where,
        env=session_env(tmp_path / "state"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    got = re.search(r"GOT ([0-9]+)", done.stdout)
    assert got and 65001 <= int(got[1]) <= 65535, done.stdout


HOLD_BOTH = """
import os, time

def test_hold(portpool_port, portpool_lease):
    with open(os.environ["PLUGIN_READY"], "w") as f:
        f.write(f"{portpool_port} {portpool_lease.port}")
    time.sleep(120)
"""


def test_a_run_stopped_by_ctrl_c_releases_its_ports_at_teardown(tmp_path: Path) -> None:
    """Ctrl-C typed at the terminal while a test holds ports: pytest tears the fixtures
    down, so the ports' records read as released (not only unlocked by the exit), and
    the next run takes the same ports."""
    low, high = _free_range(2)
    ini = f"portpool_port_range = {low}-{high}\n"
    ready = tmp_path / "ready"
    home = tmp_path / "state"
    where = session_dir(tmp_path, "held", HOLD_BOTH, ini)
    env = session_env(home, PLUGIN_READY=str(ready))
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *pytest_cmd("-s")]
    terminal = Terminal(argv, where)
    try:
        text = wait_for(lambda: ready.exists() and ready.read_text(), timeout=60)
        ports = sorted(int(x) for x in text.split())
        assert ports == [low, high]
        terminal.ctrl_c()
        status = terminal.wait()
    finally:
        terminal.close()
    assert status == 2, terminal.output  # pytest's "interrupted"
    assert b"KeyboardInterrupt" in terminal.output
    for port in ports:
        assert json.loads((home / "ports" / f"{port}.json").read_text()) == {}
    again = session_dir(tmp_path, "again", HOLD_BOTH.replace("time.sleep(120)", "pass"), ini)
    ready.unlink()
    done = _run(again, env)
    assert done.returncode == 0, done.stdout
    assert sorted(int(x) for x in ready.read_text().split()) == ports
