"""Signals and process trees of `portpool run` and `portpool up`, with real signals.

A typed Ctrl-C is a real pseudo-terminal (the kernel signals its foreground process
group); a sent signal is os.kill. Every fault of the issue on signals has a test here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from benchmarks._common import bindable
from tests.helpers import (
    PORTPOOL,
    Terminal,
    held_lock_files,
    is_listening,
    kill_if_running,
    portpool,
    wait_for,
    write_layout,
)

from portpool._platform import listeners
from portpool._relay import SignalScope
from portpool.errors import Interrupted

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, Linux /proc")

# Serves HTTP on the socket at fd 3; each request takes 1.5 s. SIGINT (and, with
# "term" in argv, SIGTERM) stops it gracefully: the request in flight still completes.
GRACEFUL = """\
import http.server, os, signal, socket, sys, threading, time
got = []
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("request", flush=True)
        time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"done")
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H, bind_and_activate=False)
srv.socket.close()
srv.socket = socket.socket(fileno=3)
def on_signal(signum, frame):
    got.append(signum)
    print(f"signal {signal.Signals(signum).name} {len(got)}", flush=True)
    threading.Thread(target=srv.shutdown).start()
signal.signal(signal.SIGINT, on_signal)
if "term" in sys.argv:
    signal.signal(signal.SIGTERM, on_signal)
print("ready", flush=True)
srv.serve_forever()
time.sleep(0.5)  # a second signal, if one came, is counted before we report
print(f"stopped after {len(got)} signals", flush=True)
"""

COUNT_SIGINT = """\
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not got:
    time.sleep(0.05)
time.sleep(1.0)  # a second delivery would arrive within this
print("sigints", len(got), flush=True)
sys.exit(len(got))
"""


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    yield made
    for term in made:
        term.close()


def _request(port: int, result: list[str]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        result.append(data.decode(errors="replace"))
    except OSError as e:
        result.append(f"error: {e}")


def _ctrl_c_during_a_request(term: Terminal, port: int, ready: bytes) -> list[str]:
    """Once ``term`` prints ``ready``, send a request to ``port`` and type Ctrl-C while
    it is in flight; the client's result (one string) once it has ended."""
    term.read_until(ready)
    result: list[str] = []
    client = threading.Thread(target=_request, args=(port, result))
    client.start()
    term.read_until(ready.replace(b"ready", b"request"))
    term.ctrl_c()
    client.join(timeout=30)
    return result


def _web_layout(tmp_path: Path, port_base: int, *command: str) -> Path:
    """``tmp_path/up.toml``: one service, web, running ``command`` with its socket at fd 3."""
    services = {"web": {"command": list(command), "socket": "fd"}}
    return write_layout(tmp_path / "up.toml", port_base, services=services)


def _read_until(proc: subprocess.Popen[str], text: str) -> None:
    """Read ``proc``'s stdout until a line holds ``text`` (fails at its end)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed; exit {proc.wait(timeout=30)}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_ctrl_c_to_up_lets_a_graceful_service_finish_its_request(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    script = tmp_path / "graceful.py"
    script.write_text(GRACEFUL)
    config = _web_layout(tmp_path, port_base, sys.executable, str(script))
    term = Terminal([*PORTPOOL, "up", "--config", str(config)])
    terminals.append(term)
    result = _ctrl_c_during_a_request(term, port_base, b"web | ready")
    assert result and result[0].endswith("done"), result  # the request in flight completed
    assert term.wait() == -signal.SIGINT  # up stopped by Ctrl-C dies of SIGINT
    assert "signal SIGINT 1" in term.text
    assert "stopped after 1 signals" in term.text, term.text
    assert "exited on its own" not in term.text
    assert listeners(port_base) == []  # (a bind may still meet the request's TIME_WAIT)


def test_one_ctrl_c_to_run_lets_a_graceful_command_finish_its_request(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    script = tmp_path / "graceful.py"
    script.write_text(GRACEFUL)
    config = write_layout(tmp_path / "run.toml", port_base)
    argv = [*PORTPOOL, "run", "-c", str(config), "--fds", "-s", "alpha", "--"]
    term = Terminal([*argv, sys.executable, str(script), "term"])
    terminals.append(term)
    result = _ctrl_c_during_a_request(term, port_base, b"ready")
    assert result and result[0].endswith("done"), result
    assert term.wait() == 0  # the command handled SIGINT and exited 0: so does run
    assert "stopped after 1 signals" in term.text, term.text


def test_kill_int_to_a_foreground_run_reaches_the_command_once(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    config = write_layout(tmp_path / "run.toml", port_base)
    term = Terminal([*PORTPOOL, "run", "-c", str(config), "--", sys.executable, "-c", COUNT_SIGINT])
    terminals.append(term)
    term.read_until(b"ready")
    os.kill(term.pid, signal.SIGINT)  # from another shell: only run gets it
    assert term.wait() == 1, term.text
    assert "sigints 1" in term.text


def test_a_typed_ctrl_c_reaches_a_command_that_left_runs_process_group_once(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    # `run -- timeout 8 sleep 100`: timeout (as setsid, or a program's own setpgid)
    # puts itself in a group of its own, which the terminal's Ctrl-C no longer reaches;
    # run took the Ctrl-C for one its command had got, and the command ran to its end.
    config = write_layout(tmp_path / "run.toml", port_base)
    own_group = "import os; os.setpgid(0, 0)\n" + COUNT_SIGINT
    term = Terminal([*PORTPOOL, "run", "-c", str(config), "--", sys.executable, "-c", own_group])
    terminals.append(term)
    term.read_until(b"ready")
    term.ctrl_c()
    assert term.wait() == 1, term.text
    assert "sigints 1" in term.text


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
def test_a_typed_ctrl_c_reaches_the_group_a_command_that_left_leads(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    # `run -- setsid sh -c 'prog; echo'`: the Ctrl-C went to sh alone, which waits on,
    # and prog, in sh's new group, ran to its end.
    config = write_layout(tmp_path / "run.toml", port_base)
    script = tmp_path / "count.py"
    script.write_text(COUNT_SIGINT)
    inner = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}; echo after"
    term = Terminal([*PORTPOOL, "run", "-c", str(config), "--", "setsid", "sh", "-c", inner])
    terminals.append(term)
    term.read_until(b"ready")
    term.ctrl_c()
    term.wait()
    assert "sigints 1" in term.text, term.text


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_timeout_s_int_reaches_the_command_once(tmp_path: Path, port_base: int, home: Path) -> None:
    # timeout signals its child, then its whole process group.
    config = write_layout(tmp_path / "run.toml", port_base)
    argv = [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, "-c", COUNT_SIGINT]
    done = subprocess.run(
        ["timeout", "--preserve-status", "-s", "INT", "3", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ready" in done.stdout, done.stderr
    assert "sigints 1" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1


def test_ctrl_c_stops_the_calling_shell_script(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    config = write_layout(tmp_path / "run.toml", port_base)
    run = " ".join(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", "sh", "-c", "'echo ready; sleep 30'"]
    )
    # bash goes on after a child that exited 130 (it takes that as "the child handled
    # Ctrl-C"); it stops only for a child that died of SIGINT.
    term = Terminal(["bash", "-c", f"{run}; echo continued"])
    terminals.append(term)
    term.read_until(b"ready")
    term.ctrl_c()
    assert term.wait() == -signal.SIGINT
    assert "continued" not in term.text


def _tree_script(tmp_path: Path) -> Path:
    """A command whose descendants hold the listening socket at fd 3: a child of bash
    (which does not exec), a double-forked grandchild and a setsid child."""
    holder = tmp_path / "holder.py"
    holder.write_text(
        "import os, socket, sys, time\n"
        "if sys.argv[1] == 'double':\n"
        "    if os.fork():\n"
        "        os._exit(0)\n"
        "    if os.fork():\n"
        "        os._exit(0)\n"
        "s = socket.socket(fileno=os.dup(3))\n"
        # One write of a whole line: the three holders share the pipe, and print() with
        # PYTHONUNBUFFERED set writes each piece on its own ("holder childholder setsid").
        "os.write(1, f'holder {sys.argv[1]} {os.getpid()}\\n'.encode())\n"
        "time.sleep(120)\n"
    )
    script = tmp_path / "tree.sh"
    py = sys.executable
    script.write_text(
        f"{py} {holder} double\n"
        f"setsid {py} {holder} setsid &\n"
        f"{py} {holder} child &\n"
        "sleep 120\n"
        "echo ended\n"
    )
    return script


def _read_holders(proc: subprocess.Popen[str]) -> dict[str, int]:
    """The pid of each holder of ``_tree_script``, by kind, read from ``proc``'s stdout."""
    assert proc.stdout is not None
    holders: dict[str, int] = {}
    lines: list[str] = []
    while len(holders) < 3:
        line = proc.stdout.readline()
        assert line, (lines, proc.wait(timeout=30), proc.stderr.read() if proc.stderr else "")
        lines.append(line)
        holders.update((m[0], int(m[1])) for m in re.findall(r"holder (\w+) (\d+)", line))
    return holders


def _assert_gone_and_free(holders: dict[str, int], port: int) -> None:
    assert [pid for pid in holders.values() if not _gone(pid)] == []
    assert bindable(port, reuse_addr=False)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
def test_up_stops_grandchildren_and_the_port_is_free_after(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    tree = _tree_script(tmp_path)
    config = _web_layout(tmp_path, port_base, "bash", str(tree))
    proc = subprocess.Popen(
        [*PORTPOOL, "up", "-c", str(config), "--grace", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holders = _read_holders(proc)
    assert set(holders) == {"double", "setsid", "child"}
    assert psutil.Process(holders["setsid"]).pid == os.getsid(holders["setsid"])
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    _assert_gone_and_free(holders, port_base)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
def test_run_stops_grandchildren_and_the_port_is_free_after(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    tree = _tree_script(tmp_path)
    config = write_layout(tmp_path / "run.toml", port_base)
    proc = subprocess.Popen(
        [
            *PORTPOOL,
            "run",
            "-q",
            "-c",
            str(config),
            "--fds",
            "-s",
            "alpha",
            "--",
            "bash",
            str(tree),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # said by _read_holders if run ends before the holders
        text=True,
    )
    holders = _read_holders(proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # bash died of it: so does run
    _assert_gone_and_free(holders, port_base)


def _in_interpreter_start_up(err: str) -> bool:
    """A Ctrl-C that met CPython's own start-up (site import, .pth files) or the
    console-script wrapper pip writes, before the first line of portpool ran: out of
    our reach, and nothing is held yet. Its traceback has no frame of portpool."""
    import portpool

    ours = (os.path.dirname(portpool.__file__), "_portpool_entry.py")
    files = re.findall(r'File "([^"]+)"', err)
    return (
        "KeyboardInterrupt" in err
        and bool(files)
        and not any(f.startswith(ours[0]) or f.endswith(ours[1]) for f in files)
    )


def test_ctrl_c_at_random_moments_of_start_up_leaves_nothing(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_layout(tmp_path / "run.toml", port_base)
    marker = tmp_path / "pids"
    errors = tmp_path / "stderr"
    # A quiet command (no Python of its own): it records its pid, then sleeps.
    command = f"echo $$ >> {marker}; exec sleep 30"
    rng = random.Random(10)
    outcomes: dict[str, int] = {}
    # The console script users run: a Ctrl-C while Python imports portpool is quiet too.
    script = Path(sys.executable).with_name("portpool")
    assert script.exists()
    argv = [str(script), "run", "-q", "-c", str(config), "--fds", "--", "sh", "-c", command]
    for _ in range(30):
        with errors.open("w") as err_file:
            # Its own group, signalled whole, as a terminal does.
            proc = subprocess.Popen(argv, stderr=err_file, start_new_session=True)
        time.sleep(rng.uniform(0, 0.6))
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # CPython can swallow a Ctrl-C that meets an import callback while it starts.
            assert _in_interpreter_start_up(errors.read_text()), errors.read_text()
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
        err = errors.read_text()
        if _in_interpreter_start_up(err):
            moment = "interpreter"
        else:
            assert "Traceback" not in err and "runpy" not in err, err
            assert proc.returncode == -signal.SIGINT, err
            moment = "started" if marker.exists() else "before"
        outcomes[moment] = outcomes.get(moment, 0) + 1
        if marker.exists():
            pids = [int(pid) for pid in marker.read_text().split()]
            wait_for(lambda pids=pids: all(_gone(pid) for pid in pids), 10)
            marker.unlink()
        assert held_lock_files(home) == []
    # Both kinds of moment were hit: before the command started, and after.
    assert outcomes.get("before") and outcomes.get("started"), outcomes


def test_ctrl_c_while_run_searches_the_pool_starts_nothing(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    # Fault 2: a slow search (the pool's first 100 ports are taken by a foreign program;
    # each refusal names its holder), and a Ctrl-C typed meanwhile.
    foreign = []
    for port in range(port_base, port_base + 100):
        with contextlib.suppress(OSError):
            foreign.append(socket.create_server(("127.0.0.1", port)))
    services = {"alpha": {"size": 120}}
    config = write_layout(tmp_path / "run.toml", port_base, services=services, max_instances=1)
    marker = tmp_path / "started"
    slot = home / "apps" / "testapp" / "instances" / "1.lock"
    try:
        term = Terminal([*PORTPOOL, "run", "-q", "-c", str(config), "--", "touch", str(marker)])
        terminals.append(term)
        wait_for(lambda: slot.exists() and held_lock_files(home), 30, interval=0.005)
        assert not marker.exists()  # still searching: the Ctrl-C comes before the command
        term.ctrl_c()
        status = term.wait()
    finally:
        for s in foreign:
            s.close()
    assert not marker.exists()  # the command never started
    assert held_lock_files(home) == []
    assert "Traceback" not in term.text
    assert status == -signal.SIGINT, term.text


def test_up_whose_services_die_of_a_group_ctrl_c_is_interrupted_not_crashed(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Fault 6: the whole group of up gets SIGINT, as from a terminal.
    # `sleep` never listens: ready = "none" lets up call it up at once.
    services = {
        n: {"command": ["sleep", "60"], "socket": "port", "ready": "none"} for n in ("a", "b", "c")
    }
    config = write_layout(tmp_path / "up.toml", port_base, services=services)
    for _ in range(3):
        proc = subprocess.Popen(
            [*PORTPOOL, "up", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        # One "ready" line per service comes first; the stream ends if up exits.
        assert any("is up" in line for line in proc.stdout), proc.stderr
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT, err
        assert "exited on its own" not in err


def _status_mask(text: str, field: str) -> int:
    found = re.search(re.escape(field) + r":\s*([0-9a-f]+)", text)
    assert found, text
    return int(found[1], 16)


def _started_statuses(tmp_path: Path, port_base: int, **kw: Any) -> list[tuple[str, str]]:
    """``/proc/self/status`` of a command ``run`` starts (with and without ``--fds``) and
    of a service ``up`` starts, each with the prefix of its lines ("web | " for up's);
    ``kw`` goes to subprocess.run (a ``preexec_fn``)."""
    config = write_layout(tmp_path / "run.toml", port_base)
    statuses = []
    for extra in ([], ["--fds"]):
        done = portpool(
            "run", "-q", "-c", str(config), *extra, "--", "cat", "/proc/self/status", **kw
        )
        assert done.returncode == 0, done.stderr
        statuses.append((done.stdout, ""))
    config = _web_layout(tmp_path, port_base, "cat", "/proc/self/status")
    done = portpool("up", "-c", str(config), **kw)
    statuses.append((done.stdout, "web | "))
    return statuses


def test_started_programs_have_default_signals_and_an_empty_mask(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Fault 7. What our own parent ignores (nohup) is passed on, as a shell would.
    with open("/proc/self/status") as f:
        inherited = _status_mask(f.read(), "SigIgn")
    python_ignores = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    expected = inherited & ~python_ignores
    for text, prefix in _started_statuses(tmp_path, port_base):
        assert _status_mask(text, prefix + "SigIgn") == expected
        assert _status_mask(text, prefix + "SigBlk") == 0
    config = write_layout(tmp_path / "run.toml", port_base)
    done = portpool("run", "-q", "-c", str(config), "--", "sh", "-c", "yes | head -1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "y\n", "")


def test_signals_the_caller_ignored_stay_ignored_for_the_command(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # `nohup portpool run ...` and `portpool run ... &` in a script: what the caller
    # ignored (HUP; INT and QUIT for a background job) stays ignored, as after a shell.
    ignored = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)

    def ignore() -> None:
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)

    bits = sum(1 << (s - 1) for s in ignored)
    # preexec_fn: the test's own child, before portpool starts (no threads)
    for text, prefix in _started_statuses(tmp_path, port_base, preexec_fn=ignore):
        assert _status_mask(text, prefix + "SigIgn") & bits == bits


def test_after_kill_9_of_up_a_service_finishes_its_shutdown(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Fault 4: its SIGTERM handler prints; the output pipe's reader (up) is gone.
    done = tmp_path / "finished"
    script = tmp_path / "svc.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "def bye(*a):\n"
        "    for i in range(200):\n"
        "        print('shutting down', i, flush=True)\n"
        # Written, then renamed: seen existing, it was once read before its write.
        f"    open({str(done)!r} + '.tmp', 'w').write('ok')\n"
        f"    os.replace({str(done)!r} + '.tmp', {str(done)!r})\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    config = _web_layout(tmp_path, port_base, sys.executable, str(script))
    proc = subprocess.Popen([*PORTPOOL, "up", "-c", str(config)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    _read_until(proc, "web | ready")
    proc.kill()
    proc.wait()
    proc.stdout.close()
    wait_for(done.exists, 60)
    assert done.read_text() == "ok"


def test_a_shell_that_forks_gets_a_clear_listen_pid_error(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Fault 8: sh does not exec its last command here, so LISTEN_PID is the shell's pid.
    config = write_layout(tmp_path / "run.toml", port_base)
    use = "from portpool.integrations import listen_socket; listen_socket()"
    done = subprocess.run(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--fds", "-s", "alpha", "--",
         "sh", "-c", f"{sys.executable} -c '{use}'; exit $?"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "LISTEN_PID" in done.stderr and "exec" in done.stderr, done.stderr
    assert "start it with `portpool run --fds`" not in done.stderr


def test_a_port_held_by_an_escaped_process_is_named_not_called_free(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A service hands its listening socket to a process outside its tree (here over a
    # unix socket, as one that escaped on a system without a subreaper would keep it).
    path = str(tmp_path / "hand-over.sock")
    keeper = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys, time\n"
         f"srv = socket.socket(socket.AF_UNIX); srv.bind({path!r}); srv.listen()\n"
         "print('listening', flush=True)\n"
         "conn, _ = srv.accept()\n"
         "_, fds, _, _ = socket.recv_fds(conn, 16, 1)\n"
         "print('got', fds[0], flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert keeper.stdout is not None
        assert keeper.stdout.readline().strip() == "listening"
        giver = (
            "import socket, time\n"
            f"c = socket.socket(socket.AF_UNIX); c.connect({path!r})\n"
            "socket.send_fds(c, [b'x'], [3])\n"
            "print('handed', flush=True)\n"
            "time.sleep(60)\n"
        )
        config = _web_layout(tmp_path, port_base, sys.executable, "-c", giver)
        proc = subprocess.Popen(
            [*PORTPOOL, "up", "-c", str(config), "--grace", "0.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert keeper.stdout.readline().startswith("got")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert f"port {port_base} is still held by pid {keeper.pid}" in err, err
        assert "its ports are free" not in out
    finally:
        keeper.kill()
        keeper.wait()


def test_up_stops_a_process_a_service_starts_while_it_stops(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    pid_file = tmp_path / "late"
    script = (
        "import signal, subprocess, sys, time\n"
        "def bye(*a):\n"
        "    late = subprocess.Popen(['setsid', 'sleep', '60'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(late.pid))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    config = _web_layout(tmp_path, port_base, sys.executable, "-c", script)
    proc = subprocess.Popen(
        [*PORTPOOL, "up", "-q", "-c", str(config)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    _read_until(proc, "web | ready")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    late = int(pid_file.read_text())  # it was started, while up was stopping
    assert _gone(late)


def test_a_caller_that_ignores_sigchld_still_gets_the_exit_status(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Ignored SIGCHLD: the kernel reaps children itself and every wait says 0.
    config = write_layout(tmp_path / "run.toml", port_base)

    def ignore_chld() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    done = portpool(
        "run", "-q", "-c", str(config), "--", "sh", "-c", "exit 3", preexec_fn=ignore_chld
    )
    assert done.returncode == 3, done.stderr
    done = portpool(
        "run", "-q", "-c", str(config), "--", "sh", "-c", "kill -TERM $$", preexec_fn=ignore_chld
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
    service = {"web": {"command": ["sh", "-c", "exit 3"], "ready": "none"}}
    config = write_layout(tmp_path / "up.toml", port_base + 5, services=service)
    done = portpool("up", "-c", str(config), preexec_fn=ignore_chld)
    assert done.returncode == 5
    assert "exited on its own (exit status 3)" in done.stderr


COUNT_USR1 = """
import signal, sys, time
count = 0
def got(*_):
    global count
    count += 1
signal.signal(signal.SIGUSR1, got)
signal.signal(signal.SIGTERM, lambda *_: (print("usr1", count, flush=True), sys.exit(0)))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_signals_a_script_sends_in_a_row_each_reach_the_command(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # The same signal from the same sender within 0.25 s was taken for timeout's copy.
    config = write_layout(tmp_path / "run.toml", port_base)
    proc = subprocess.Popen(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, "-c", COUNT_USR1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        for _ in range(5):
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.12)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        kill_if_running(proc)
    assert out == "usr1 5\n"


LOG_SIGNALS = """
import os, signal, sys, time
log = sys.argv[1]
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
def got(signum, frame):
    note(signal.Signals(signum).name)
    if sys.argv[3:] == ["die"]:  # of the signal, as a program without a handler would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
for name in ("SIGHUP", "SIGTERM", "SIGINT"):
    signal.signal(getattr(signal, name), got)
note("ready")
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    time.sleep(0.05)
note("done")
"""


def _up_logging_signals(tmp_path: Path, port_base: int, seconds: int) -> tuple[Path, Path]:
    """(log, layout): one service that notes in ``log`` each stop signal it gets, and
    dies of it, running ``seconds`` at most."""
    log = tmp_path / "log"
    script = tmp_path / "log_signals.py"
    script.write_text(LOG_SIGNALS)
    command = [sys.executable, str(script), str(log), str(seconds), "die"]
    config = write_layout(tmp_path / "up.toml", port_base,
                          services={"web": {"command": command, "ready": "none"}})  # fmt: skip
    return log, config


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_terminal_hangup_reaches_the_command_when_run_leads_the_session(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    """ssh -t / tmux / xterm -e: the kernel sends a hangup to the session leader alone.
    run took it for a signal its whole group had got, and its command ran on, holding
    the lease, after the terminal was gone."""
    config = write_layout(tmp_path / "run.toml", port_base)
    log = tmp_path / "log"
    script = tmp_path / "log_signals.py"
    script.write_text(LOG_SIGNALS)
    term = Terminal([*PORTPOOL, "run", "-q", "-c", str(config), "--",
                     sys.executable, str(script), str(log), "20", "die"])  # fmt: skip
    terminals.append(term)
    wait_for(lambda: "ready" in _lines(log), 30)
    os.close(term.master)  # the window closes: the kernel hangs the terminal up
    term.master = os.open(os.devnull, os.O_RDONLY)  # for close() and wait()'s reads
    status = term.wait(timeout=30)
    assert _lines(log) == ["ready", "SIGHUP"]  # once, and it ended the command early
    assert status == -signal.SIGHUP  # the command died of it: so does run
    assert not is_listening(port_base)


def test_a_group_signal_to_run_reaches_what_its_command_started(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`timeout -s INT` signals run and its own group, which outside a terminal does not
    hold the command's group: passed to the command alone, `sh -c 'prog; echo'` ran
    prog to its end, where the bare command's group gets it (so must the command's)."""
    config = write_layout(tmp_path / "run.toml", port_base)
    log = tmp_path / "log"
    script = tmp_path / "log_signals.py"
    script.write_text(LOG_SIGNALS)
    shell = '"$0" "$1" "$2" 30 die; echo after'
    done = subprocess.run(
        ["timeout", "-s", "INT", "2", *PORTPOOL, "run", "-q", "-c", str(config), "--",
         "sh", "-c", shell, sys.executable, str(script), str(log)],
        start_new_session=True, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 124, done.stderr  # timeout's "timed out"
    assert _lines(log) == ["ready", "SIGINT"]  # once, and it ended the program early


def test_up_leading_its_session_dies_of_the_hangup_though_its_terminal_is_gone(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    """Its last lines went to the hung-up terminal (EIO), and up exited 1 with "cannot
    write to standard output" instead of dying of SIGHUP; the services were stopped."""
    log, config = _up_logging_signals(tmp_path, port_base, 20)
    term = Terminal([*PORTPOOL, "up", "-c", str(config)])
    terminals.append(term)
    term.read_until(b"is up")
    wait_for(lambda: "ready" in _lines(log), 30)
    os.close(term.master)  # the window closes
    term.master = os.open(os.devnull, os.O_RDONLY)
    assert term.wait(timeout=30) == -signal.SIGHUP
    assert _lines(log) == ["ready", "SIGTERM"]  # a hangup stops services with SIGTERM
    assert not is_listening(port_base)


ASK_PASSWORD = """\
printf 'password: ' > /dev/tty
read answer < /dev/tty
echo "got $answer" > "$1"
"""


def test_a_command_reads_the_terminal_though_run_has_no_std_fd_on_it(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    # With fds 0-2 redirected, run took itself for outside a terminal and put the
    # command in a process group of its own: its read of /dev/tty (sudo's, ssh's
    # password prompt) stopped it with SIGTTIN, and run waited for it for good.
    config = write_layout(tmp_path / "run.toml", port_base)
    answer = tmp_path / "answer"
    command = [*PORTPOOL, "run", "-q", "-c", str(config), "--", "sh", "-c", ASK_PASSWORD]
    quoted = shlex.join([*command, "sh", str(answer)])
    # The shell keeps the terminal open, as a user's does (not exec: no fd would).
    term = Terminal(["sh", "-c", f"{quoted} < /dev/null > /dev/null 2>&1"])
    terminals.append(term)
    term.read_until(b"password: ")
    os.write(term.master, b"secret\n")
    assert term.wait(timeout=30) == 0, term.text
    assert answer.read_text() == "got secret\n"


def test_a_stop_signal_inside_the_import_machinery_is_kept_for_check() -> None:
    # A Ctrl-C that met an import lock's callback raised there: CPython printed
    # "Exception ignored in ... _get_module_lock" with a traceback and dropped it.
    namespace: dict[str, object] = {}
    code = compile("import sys\nframe = sys._getframe()", "<frozen importlib._bootstrap>", "exec")
    exec(code, namespace)
    importlib_frame = namespace["frame"]
    with SignalScope() as scope:
        scope._interrupt(signal.SIGINT, importlib_frame)  # type: ignore[arg-type]
        with pytest.raises(Interrupted):
            scope.check()
    with SignalScope() as scope, pytest.raises(Interrupted):
        scope._interrupt(signal.SIGINT, sys._getframe())  # anywhere else: at once


def test_a_signal_that_came_before_the_command_is_handed_on_as_such() -> None:
    """run took what came between its last check and the command's fork for the
    command's own when the kernel sent it (a Ctrl-C typed as the command started) and
    dropped it: the command, not yet there, never got it (10 in 200 typed keys)."""
    from portpool._run import relay_to

    sent: list[int] = []

    class Command:  # where relay_to sends: the signals it passes on, recorded
        children: dict[str, Any] = {}  # noqa: RUF012 (none started: in run's group)

        def send(self, signum: int, names: list[str]) -> None:
            sent.append(signum)

        def resume_stopped(self, names: list[str]) -> None:
            pass

    got: list[Any] = []
    relayed = threading.Event()
    with SignalScope() as scope:
        scope.block()
        os.kill(os.getpid(), signal.SIGUSR1)  # pending: blocked in this thread
        early = scope.take_pending()
        assert [e.signum for e in early] == [signal.SIGUSR1]
        pass_on = relay_to(Command(), "command", shared_group=True)  # type: ignore[arg-type]

        def callback(received: Any) -> None:
            got.append(received)
            pass_on(received)
            relayed.set()

        scope.relay(callback, None, None, early)
        assert relayed.wait(10)
    assert [(r.signum, r.before_command) for r in got] == [(signal.SIGUSR1, True)]
    assert sent == [signal.SIGUSR1]
    # The same signal as a terminal's, after the command started: it had it already.
    sent.clear()
    from_terminal = dataclasses.replace(got[0], before_command=False, from_kernel=True)
    pass_on(from_terminal)
    assert sent == []


# Forks (with "child") or not, then the process that is to be suspended handles SIGTERM
# by writing the marker file ``argv[1]``, says its pid and stops itself (SIGSTOP).
SUSPENDS_ITSELF = """\
import os, signal, sys, time
marker, who = sys.argv[1], sys.argv[2]
parent = who == "child" and os.fork()
if not parent:
    def on_term(signum, frame):
        with open(marker, "w") as f:
            f.write("stopped gracefully")
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
    os.write(1, f"suspended {os.getpid()}\\n".encode())
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(120)
"""


@pytest.mark.parametrize(
    ("command", "who", "stop"),
    [
        ("run", "child", signal.SIGTERM),
        ("up", "child", signal.SIGTERM),
        ("up", "service", signal.SIGTERM),
        ("up", "service", signal.SIGHUP),  # a rolling restart stops it
    ],
)
def test_a_suspended_process_of_the_tree_gets_its_stop_signal_handled(
    tmp_path: Path, port_base: int, home: Path, command: str, who: str, stop: int
) -> None:
    """A process of the tree stopped by SIGSTOP (a debugger's, a Ctrl-Z of its own)
    acts on no signal but SIGKILL and SIGCONT: it was sent SIGTERM, sat stopped through
    the grace period and was killed, its SIGTERM handler never run. As systemd does,
    what is stopped gets SIGCONT after the stop signal, and shuts down as it chose."""
    script = tmp_path / "suspends.py"
    script.write_text(SUSPENDS_ITSELF)
    marker = tmp_path / "marker"
    argv = [sys.executable, str(script), str(marker), who]
    if command == "run":
        config = write_layout(tmp_path / "run.toml", port_base)
        args = ["run", "-c", str(config), "--", *argv]
    else:
        # Ready once it said so: a rolling restart waits for every service to be ready.
        service = {"command": argv, "socket": "fd", "ready": "log:^suspended"}
        config = write_layout(tmp_path / "up.toml", port_base, services={"web": service})
        args = ["up", "-c", str(config)]
    proc = subprocess.Popen(
        [*PORTPOOL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = next(line for line in proc.stdout if "suspended" in line)
        pid = int(line.split()[-1])
        wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED)
        proc.send_signal(stop)
        if stop == signal.SIGHUP:  # the service started again stops itself too
            next(line for line in proc.stdout if "suspended" in line)
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert marker.read_text() == "stopped gracefully", err
    assert _gone(pid)


@pytest.mark.skipif(shutil.which("bash") is None, reason="job control of an interactive bash")
def test_up_as_a_background_job_starts_and_takes_a_hangup_without_stopping(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    """`portpool up > log &` in a terminal: up asked its terminal whether it had hung up
    by reading it, and a read from a background process group stopped the whole job
    ("Stopped (tty input)"): nothing started. A `kill -HUP` to such a job stopped it the
    same way instead of restarting its services."""
    log, config = _up_logging_signals(tmp_path, port_base, 60)
    term = Terminal(["bash", "--norc", "--noprofile", "-i"])
    terminals.append(term)
    term.drain()
    up = shlex.join([*PORTPOOL, "up", "-c", str(config)])
    os.write(term.master, f"{up} > {shlex.quote(str(tmp_path / 'up.log'))} 2>&1 &\n".encode())
    wait_for(lambda: "ready" in _lines(log), 30)  # it started its service

    def job() -> psutil.Process:
        (found,) = [p for p in psutil.Process(term.pid).children() if "up" in p.cmdline()]
        return found

    assert job().status() != psutil.STATUS_STOPPED
    os.write(term.master, b"kill -HUP %1\n")  # a rolling restart, as in the foreground
    wait_for(lambda: _lines(log).count("ready") == 2, 30)
    assert _lines(log)[:2] == ["ready", "SIGTERM"]
    assert job().status() != psutil.STATUS_STOPPED
    os.write(term.master, b"kill %1; wait; exit\n")
    assert term.wait(timeout=60) == 0, term.text
    assert not is_listening(port_base)


@pytest.mark.skipif(shutil.which("bash") is None, reason="job control of an interactive bash")
def test_run_of_an_interactive_shell_keeps_the_terminal(
    tmp_path: Path, port_base: int, home: Path, terminals: list[Terminal]
) -> None:
    """An interactive shell under run takes the terminal for its own process group; run,
    then in a background group, read the terminal and was stopped (SIGTTIN): the outer
    shell said "Stopped" and took the terminal back while the inner one still ran."""
    config = write_layout(tmp_path / "run.toml", port_base)
    term = Terminal(["bash", "--norc", "--noprofile", "-i"])
    terminals.append(term)
    inner = shlex.join([*PORTPOOL, "run", "-q", "-c", str(config), "--",
                        "env", "PS1=INNER$ ", "bash", "--norc", "--noprofile", "-i"])  # fmt: skip
    os.write(term.master, f"{inner}\n".encode())
    term.read_until(b"INNER$ ", timeout=30)
    os.write(term.master, b"echo inner-alive-$PORTPOOL_INSTANCE\n")
    term.read_until(b"inner-alive-1", timeout=30)
    os.write(term.master, b"exit\n")
    os.write(term.master, b"echo outer-$?\n")
    term.read_until(b"outer-0", timeout=30)
    os.write(term.master, b"exit\n")
    assert term.wait(timeout=30) == 0
    assert b"Stopped" not in term.output, term.text
