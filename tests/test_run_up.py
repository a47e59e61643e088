"""End-to-end: `portpool run` and `portpool up` driven as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests.helpers import (
    PORTPOOL,
    is_listening,
    kill_if_running,
    occupy,
    portpool,
    read_line,
    release,
    run_python,
    start,
    status_json,
    wait_for,
    write_layout,
)

from portpool import load_layout, start_instance
from portpool._platform import listeners, owners_of_inode
from portpool.statedir import StateDir

PRINT_ENV = (
    "import os, json, sys\n"
    "keys = sorted(k for k in os.environ if k.startswith(('PORTPOOL_', 'PORT', 'LISTEN_')))\n"
    "print(json.dumps({k: os.environ[k] for k in keys}), flush=True)\n"
    "sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)\n"
)

# A small service that only uses the socket at fd 3 and answers one line per connection.
FD_SERVICE = (
    "import os, socket, signal, sys\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "sock = socket.socket(fileno=3)\n"
    "name = os.environ['PORTPOOL_SERVICE']\n"
    "while True:\n"
    "    conn, _ = sock.accept()\n"
    "    conn.sendall(f'{name} {os.getpid()}\\n'.encode())\n"
    "    conn.close()\n"
)

HTTP_ON_FD3 = (
    "import http.server, os, socket, sys\n"
    "assert os.environ['LISTEN_FDS'] == '1' and os.environ['LISTEN_PID'] == str(os.getpid())\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = f\"{os.environ['LISTEN_FDNAMES']} via fd 3\".encode()\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
    "    def log_message(self, *a): pass\n"
    "srv = http.server.HTTPServer(('127.0.0.1', 0), H, bind_and_activate=False)\n"
    "srv.socket.close(); srv.socket = socket.socket(fileno=3)\n"
    "print('ready', flush=True)\n"
    "srv.handle_request()\n"
)


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        return conn.makefile().readline().strip()


@pytest.fixture
def layout(tmp_path: Path, port_base: int) -> Path:
    return write_layout(tmp_path / "portpool.toml", port_base, stride=100)


def test_run_gives_env_and_returns_exit_code(layout: Path, port_base: int, home: Path) -> None:
    done = portpool("run", "--config", str(layout), "--", sys.executable, "-c", PRINT_ENV, "7")
    assert done.returncode == 7, done.stderr
    env = json.loads(done.stdout)
    assert env["PORTPOOL_INSTANCE"] == "1"
    assert env["PORTPOOL_APP"] == "testapp"
    assert env["PORTPOOL_PORT_ALPHA"] == str(port_base)
    assert env["PORTPOOL_PORT_BETA"] == str(port_base + 2)
    assert env["PORTPOOL_SERVICES"] == "alpha,beta"
    assert "PORT" not in env  # several services: no single PORT
    assert "LISTEN_FDS" not in env
    one = portpool(
        "run", "--config", str(layout), "-s", "beta", "--", sys.executable, "-c", PRINT_ENV
    )
    assert one.returncode == 0
    env = json.loads(one.stdout)
    assert env["PORT"] == str(port_base + 2)
    assert "PORTPOOL_PORT_ALPHA" not in env
    # Released afterwards.
    assert status_json(layout)["instances"] == []


def test_run_of_a_command_the_kernel_refuses_exits_126_and_releases(
    layout: Path, home: Path
) -> None:
    """An argument over the kernel's 128 KiB per string (E2BIG): the command cannot be
    executed, which is 126 as a shell says (the program exists), not an error of
    portpool's (1)."""
    from portpool import CommandNotFound, load_layout, run_command

    with pytest.raises(CommandNotFound) as refused:
        run_command(load_layout(str(layout)), ["true", "x" * (256 * 1024)])
    assert refused.value.exit_code == 126
    assert "'true': Argument list too long" in str(refused.value)
    assert status_json(layout)["instances"] == []


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"grace_s": "5"}, "grace_s='5': must be a number of seconds, 0 or more"),
        ({"grace_s": None}, "grace_s=None: must be a number of seconds, 0 or more"),
        ({"grace_s": -1}, "grace_s=-1: must be a number of seconds, 0 or more"),
        ({"grace_s": float("nan")}, "grace_s=nan: must be a number of seconds, 0 or more"),
        ({"pass_fds": [1]}, "pass_fds=1: not an open file descriptor above 2"),
        # Was CommandNotFound (exit_code 126): "the program cannot be executed".
        ({"pass_fds": ["closed"]}, "pass_fds=CLOSED: not an open file descriptor above 2"),
    ],
)
def test_run_command_refuses_arguments_it_cannot_use_before_the_command_runs(
    layout: Path, tmp_path: Path, home: Path, arguments: dict[str, Any], words: str
) -> None:
    """A grace of "5" or None ran the command, then raised TypeError as it stopped it
    (a logged traceback "while stopping instance 1")."""
    from portpool import InvalidArgument, load_layout, run_command

    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)  # a number no file is open at
    if arguments.get("pass_fds") == ["closed"]:
        arguments = {"pass_fds": [closed]}
        words = words.replace("CLOSED", str(closed))
    marker = tmp_path / "ran"
    with pytest.raises(InvalidArgument) as refused:
        run_command(load_layout(str(layout)), ["touch", str(marker)], **arguments)
    assert str(refused.value) == words
    assert not marker.exists()
    assert status_json(layout)["instances"] == []


NO_GRACE = """
import sys
from portpool import load_layout, run_command

leaves = sys.argv[2] != "nothing"  # a child that only a subreaper keeps track of
command = ["sh", "-c", sys.argv[2]] if leaves else ["true"]
run_command(load_layout(sys.argv[1]), command, grace_s=0, whole_tree=leaves)
"""


def test_run_command_with_no_grace_warns_only_of_what_it_kills(layout: Path, home: Path) -> None:
    """``grace_s=0`` said "still running 0 s after SIGTERM: SIGKILL to what is left"
    after a command that left nothing running; one that left a child names it."""
    leaves = "(trap '' TERM; exec sleep 30) &"
    for command in ("nothing", leaves):
        done = run_python(NO_GRACE, str(layout), command)
        assert done.returncode == 0, done.stderr
        if command == "nothing":
            assert "still running" not in done.stderr
        else:
            killed = r"still running 0 s after SIGTERM: SIGKILL to pid \d+ \(sleep\)"
            assert re.search(killed, done.stderr), done.stderr


@pytest.mark.parametrize(
    ("name", "content", "mode", "expected"),
    [
        ("no-such-file", None, 0, 127),
        ("script-without-x", "#!/bin/sh\necho hi\n", 0o644, 126),
        ("a-directory", "", 0o755, 126),
        ("missing-interpreter", "#!/nonexistent/interpreter\n", 0o755, 127),
        ("dangling-symlink", "->", 0, 127),
        ("through-a-file/sub", None, 0, 127),
    ],
)
def test_run_of_a_program_that_cannot_run_exits_as_a_shell_would(
    layout: Path,
    home: Path,
    tmp_path: Path,
    name: str,
    content: str | None,
    mode: int,
    expected: int,
) -> None:
    """POSIX shells (and env) exit 127 for a program that does not exist and 126 for one
    that exists but cannot be executed; `run` said 127 for both, so a script could not
    tell "not installed" from "chmod +x forgotten"."""
    program = tmp_path / name
    if content == "":
        program.mkdir()
    elif content == "->":
        program.symlink_to(tmp_path / "nowhere")
    elif name.startswith("through-a-file"):
        program.parent.write_text("")
    elif content is not None:
        program.write_text(content)
        program.chmod(mode)
    bash = subprocess.run(["sh", "-c", f"'{program}'"], capture_output=True, check=False)
    assert bash.returncode == expected  # what the shell says, for comparison
    done = portpool("run", "--config", str(layout), "--", str(program))
    assert done.returncode == expected, done.stderr
    assert "cannot start the command" in done.stderr
    # Why, as a shell says it: "No such file" for the missing one, and only for it.
    missing = "is not an executable file: it does not exist"
    assert (missing in done.stderr) == (name in ("no-such-file", "dangling-symlink"))
    if name.startswith("through-a-file"):
        assert ": a part of its path is not a directory" in done.stderr, done.stderr
    assert status_json(layout)["instances"] == []


def test_run_of_a_program_on_path_without_execute_permission_exits_126(
    layout: Path, home: Path, tmp_path: Path
) -> None:
    """A program found on PATH but not executable exists: bash and env say "Permission
    denied" and 126; `run` said it "was not found on PATH" and 127."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tool-without-x").write_text("#!/bin/sh\necho hi\n")
    (bin_dir / "tool-without-x").chmod(0o644)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    shell = subprocess.run(["env", "tool-without-x"], env=env, capture_output=True, check=False)
    assert shell.returncode == 126  # what env says, for comparison
    done = portpool("run", "--config", str(layout), "--", "tool-without-x", env=env)
    assert done.returncode == 126, done.stderr
    assert str(bin_dir / "tool-without-x") in done.stderr
    assert "not found" not in done.stderr
    assert status_json(layout)["instances"] == []


# Writes a line to the fd named in argv[1], then prints every fd it has open.
WRITE_TO_FD = (
    "import os, sys\n"
    "os.write(int(sys.argv[1]), b'through portpool\\n')\n"
    "names = os.listdir('/dev/fd')\n"
    "def is_open(fd):\n"
    "    try:\n"
    "        os.fstat(fd)\n"
    "    except OSError:\n"
    "        return False\n"
    "    return True\n"
    "print(sorted(int(n) for n in names if is_open(int(n))))\n"
)


@pytest.mark.parametrize("fds", [False, True])
def test_run_passes_the_fds_it_was_started_with_as_exec_would(
    layout: Path, home: Path, tmp_path: Path, fds: bool
) -> None:
    """A shell's `5>file` or `<(...)`, make's jobserver: the command gets what run was
    started with, at the same numbers (as after exec), and nothing of portpool's own."""
    import fcntl

    out = tmp_path / "out"
    with out.open("wb") as f:
        fd = fcntl.fcntl(f.fileno(), fcntl.F_DUPFD, 40)  # above what run itself opens
        try:
            extra = ["--fds"] if fds else []
            argv = [*PORTPOOL, "run", "-q", "--config", str(layout), *extra, "--"]
            done = subprocess.run(
                [*argv, sys.executable, "-c", WRITE_TO_FD, str(fd)],
                pass_fds=[fd],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(fd)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"through portpool\n"
    sockets = [3, 4] if fds else []  # alpha and beta, at 3 and 4
    assert json.loads(done.stdout) == [0, 1, 2, *sockets, fd]


# What another instance (an outer `up`, an `eval "$(portpool env --export)"`) left in
# the caller's environment: none of it may reach a program of this instance.
STALE = {
    "PORT": "1111",
    "PORTPOOL_APP": "other",
    "PORTPOOL_INSTANCE": "9",
    "PORTPOOL_SERVICE": "old",
    "PORTPOOL_SERVICES": "old,cache",
    "PORTPOOL_PORT_CACHE": "2222",
    "PORTPOOL_SUPERVISOR_PID": "1",
    "LISTEN_FDS": "1",
    "LISTEN_FDNAMES": "old",
    "LISTEN_PID": "1",
}


def test_run_gives_only_its_own_instance_variables(
    layout: Path, port_base: int, home: Path
) -> None:
    env = {**os.environ, **STALE, "LISTEN_ADDR": "0.0.0.0:8"}  # the app's own: kept
    done = portpool("run", "--config", str(layout), "--", sys.executable, "-c", PRINT_ENV, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "LISTEN_ADDR": "0.0.0.0:8",
        "PORTPOOL_APP": "testapp",
        "PORTPOOL_HOME": str(home),  # where the state is: kept for nested commands
        "PORTPOOL_INSTANCE": "1",
        "PORTPOOL_PORT_ALPHA": str(port_base),
        "PORTPOOL_PORT_BETA": str(port_base + 2),
        "PORTPOOL_SERVICES": "alpha,beta",
    }


def test_up_gives_only_its_own_instance_variables(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    out = tmp_path / "env.json"
    write_env = PRINT_ENV.replace(", flush=True)", f", file=open({str(out)!r}, 'w'))")
    command = [sys.executable, "-c", write_env]
    config = write_layout(
        tmp_path / "portpool.toml",
        port_base,
        services={"web": {"command": command, "ready": "none", "restart": "no"}},
    )
    done = portpool("up", "--config", str(config), env={**os.environ, **STALE})
    assert done.returncode == 5, done.stderr  # the service exits on its own once written
    seen = json.loads(out.read_text())
    assert seen.pop("PORTPOOL_SUPERVISOR_PID") != "1"  # up's own pid, not the stale one
    assert seen.pop("LISTEN_PID") != "1"  # its own socket (socket = "fd" by default)
    assert (seen.pop("LISTEN_FDS"), seen.pop("LISTEN_FDNAMES")) == ("1", "web")
    assert seen == {
        "PORT": str(port_base),
        "PORTPOOL_APP": "testapp",
        "PORTPOOL_HOME": str(home),
        "PORTPOOL_INSTANCE": "1",
        "PORTPOOL_PORT_WEB": str(port_base),
        "PORTPOOL_SERVICE": "web",
        "PORTPOOL_SERVICES": "web",
    }


def test_two_runs_at_once_get_instances_one_and_two(
    layout: Path, home: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    hold = PRINT_ENV.replace(
        "sys.exit(",
        "import time\nt=time.time()+60\n"
        "while not os.path.exists(sys.argv[2]) and time.time() < t: time.sleep(0.05)\nsys.exit(",
    )
    procs = [
        start("run", "--config", str(layout), "--", sys.executable, "-c", hold, "0", str(release))
        for _ in range(2)
    ]
    try:
        envs = sorted(
            (json.loads(read_line(p)) for p in procs), key=lambda e: e["PORTPOOL_INSTANCE"]
        )
        assert [e["PORTPOOL_INSTANCE"] for e in envs] == ["1", "2"]
        for key in ("PORTPOOL_PORT_ALPHA", "PORTPOOL_PORT_BETA"):
            assert int(envs[1][key]) - int(envs[0][key]) == 100
    finally:
        release.touch()
        assert [p.wait(timeout=30) for p in procs] == [0, 0]


def test_run_fds_serves_on_the_lease_socket(layout: Path, port_base: int, home: Path) -> None:
    proc = start(
        "run", "--config", str(layout), "--fds", "--service", "alpha", "--",
        sys.executable, "-c", HTTP_ON_FD3,
    )  # fmt: skip
    try:
        assert read_line(proc).strip() == "ready"
        # Exactly one listening socket on the port, owned by run and its child only.
        (listener,) = listeners(port_base)
        child_pids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        assert set(owners_of_inode(listener.inode or 0)) <= {proc.pid} | child_pids
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port_base}/", timeout=5) as resp:
            assert resp.read() == b"alpha via fd 3"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_env_and_port_under_run_with_service_name_only_its_services(
    layout: Path, home: Path
) -> None:
    """A run with ``--service`` holds no lease for the others: ``env`` lists only its own
    (exit 0), and ``port`` of another says so, as a record missing a service it does
    hold as a lease must not (tests/test_state_faults.py)."""
    inner = (
        f"{' '.join(PORTPOOL)} env --config {layout}; echo env=$?; "
        f"{' '.join(PORTPOOL)} port beta --config {layout}; echo port=$?"
    )
    done = portpool("run", "--config", str(layout), "--service", "alpha", "--", "sh", "-c", inner)
    assert done.returncode == 0, done.stderr
    assert "PORTPOOL_SERVICES=alpha\n" in done.stdout and "env=0" in done.stdout, done.stdout
    assert "PORTPOOL_PORT_BETA" not in done.stdout and "port=1" in done.stdout, done.stdout
    assert "holds no port for 'beta' (started with --service" in done.stderr, done.stderr


def test_run_forwards_signals(layout: Path, home: Path) -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGHUP, lambda s, f: sys.exit(11))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", script)
    assert read_line(proc).strip() == "ready"
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == 11
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", script)
    assert read_line(proc).strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    # The command died of SIGTERM: run dies of it too, as the bare command would.
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_run_exits_3_when_a_pool_is_exhausted(layout: Path, port_base: int, home: Path) -> None:
    foreign = [socket.create_server(("127.0.0.1", p)) for p in (port_base + 2, port_base + 3)]
    try:
        # Pinned: unpinned, a slot blocked by foreign programs is skipped for the next.
        done = portpool(
            "run", "--config", str(layout), "--instance", "1", "--", sys.executable, "-c", "pass"
        )
        assert done.returncode == 3
        assert f"port {port_base + 2}: in use" in done.stderr
        assert f"pid {os.getpid()}" in done.stderr
    finally:
        for s in foreign:
            s.close()


def up_layout(
    tmp_path: Path, base: int, *, extra: dict[str, dict[str, object]] | None = None
) -> Path:
    services: dict[str, dict[str, object]] = {
        name: {"command": [sys.executable, "-c", FD_SERVICE]} for name in ("web", "api", "db")
    }
    services.update(extra or {})
    return write_layout(tmp_path / "up.toml", base, services=services, stride=100)


def wait_up(proc: subprocess.Popen[str], config: Path, count: int = 3) -> dict[str, int]:
    def ready() -> dict[str, int] | None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        doc = status_json(config)
        mine = [i for i in doc["instances"] if i["pid"] == proc.pid]
        if not mine:
            return None
        ports = {s["name"]: s["port"] for s in mine[0]["services"]}
        # up says "is up" once every service passed its readiness probe. A record
        # with no state at all was written before the keepers started (not ready).
        states = [s.get("state") for s in mine[0]["services"]]
        ready = any(states) and all(state in (None, "ready") for state in states)
        return ports if ready and all(is_listening(p) for p in ports.values()) else None

    ports: dict[str, int] = wait_for(ready, 60)
    assert len(ports) == count
    return ports


def _up_again_on(config: Path, ports: dict[str, int], stop: signal.Signals) -> int:
    """Start ``up`` again, check it got ``ports``, stop it with ``stop``: its status."""
    again = start("up", "--config", str(config))
    try:
        assert wait_up(again, config) == ports
    finally:
        again.send_signal(stop)
        again.communicate(timeout=30)
    return again.returncode


def test_up_starts_serves_and_stops_cleanly(tmp_path: Path, port_base: int, home: Path) -> None:
    config = up_layout(tmp_path, port_base)
    proc = start("up", "--config", str(config))
    ports = wait_up(proc, config)
    assert ports == {"web": port_base, "api": port_base + 2, "db": port_base + 4}
    pids = {name: int(ask(port).split()[1]) for name, port in ports.items()}
    assert {name: ask(port).split()[0] for name, port in ports.items()} == {n: n for n in ports}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "instance 1 of testapp is up" in out
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    # Every lock is free: a second up gets instance 1 and the same ports.
    status = _up_again_on(config, ports, signal.SIGINT)
    assert status == -signal.SIGINT  # stopped by SIGINT: dies of it, as a shell job


def test_up_exits_5_when_a_service_dies(tmp_path: Path, port_base: int, home: Path) -> None:
    config = up_layout(tmp_path, port_base)
    proc = start("up", "--config", str(config))
    ports = wait_up(proc, config)
    victim = int(ask(ports["api"]).split()[1])
    others = [int(ask(ports[n]).split()[1]) for n in ("web", "db")]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5
    assert "portpool: service 'api' exited on its own (killed by SIGKILL)" in err.splitlines()
    assert out.splitlines()[-1] == "portpool: instance 1 stopped; its ports are free"
    for pid in others:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert status_json(config)["instances"] == []


def test_up_whose_reader_went_away_stops_cleanly_and_dies_of_sigpipe(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`portpool up | head -2`: once up next wrote (here: "stopping on SIGTERM") it
    exited 1 without a word; a pipeline's writer dies of SIGPIPE, after releasing."""
    config = up_layout(tmp_path, port_base)
    proc = start("up", "--config", str(config))
    ports = wait_up(proc, config)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGPIPE
    assert "Traceback" not in proc.stderr.read()
    proc.stderr.close()
    assert not any(is_listening(p) for p in ports.values())
    assert status_json(config)["instances"] == []


def test_up_whose_reader_went_away_stops_at_its_services_next_line(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """The services' lines are up's writes too: written into the void, up ran on
    unseen (until a service exited, or a stop), where `head` had ended the pipeline."""
    tick = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"
    config = write_layout(tmp_path / "up.toml", port_base, services={
        "ticker": {"command": [sys.executable, "-c", tick], "ready": "none"},
    })  # fmt: skip
    proc = start("up", "--config", str(config))
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(20):  # its table, then the service's first line
        if read_line(proc, timeout=30).endswith("| tick\n"):
            break
    else:
        raise AssertionError("the service's lines never came through up")
    proc.stdout.close()  # the reader is gone; only the service writes from now on
    try:
        assert proc.wait(timeout=30) == -signal.SIGPIPE
    finally:
        kill_if_running(proc)
    assert "Traceback" not in proc.stderr.read()
    proc.stderr.close()
    assert not is_listening(port_base)
    assert status_json(config)["instances"] == []


def test_kill_9_of_up_blocks_nothing_and_children_exit(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = up_layout(tmp_path, port_base)
    proc = start("up", "--config", str(config))
    ports = wait_up(proc, config)
    children = [int(ask(p).split()[1]) for p in ports.values()]
    proc.kill()
    proc.wait()
    # Its record stays till gc; its services' last states read as past, not "ready".
    shown = portpool("status", "--config", str(config)).stdout
    assert f"web={ports['web']} (was ready)" in shown, shown
    assert "(ready" not in shown
    # The orphans notice their supervisor is gone and exit.
    wait_for(lambda: not any(psutil.pid_exists(p) for p in children), 20)
    _up_again_on(config, ports, signal.SIGTERM)


def test_up_rotates_past_a_foreign_listener(tmp_path: Path, port_base: int, home: Path) -> None:
    config = up_layout(tmp_path, port_base)
    foreign = occupy("listen", "127.0.0.1", port_base)
    try:
        proc = start("up", "--config", str(config))
        ports = wait_up(proc, config)
        assert ports["web"] == port_base + 1
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert foreign.poll() is None  # never touched
    finally:
        release(foreign)


def test_forged_record_pid_is_never_signalled(tmp_path: Path, port_base: int, home: Path) -> None:
    config = up_layout(tmp_path, port_base)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        instances = home / "apps" / "testapp" / "instances"
        instances.mkdir(parents=True, mode=0o700)
        os.chmod(home, 0o700)
        forged = {
            "v": 1, "app": "testapp", "number": 1, "pid": bystander.pid,
            "start_token": "forged", "boot_id": "x", "host": "127.0.0.1",
            "started_at": time.time(), "heartbeat_at": time.time(),
            "services": [{"name": "web", "pool": [port_base], "port": port_base,
                          "pid": bystander.pid}],
        }  # fmt: skip
        (instances / "1.json").write_text(json.dumps(forged))
        (instances / "3.json").write_text(json.dumps({**forged, "number": 3}))
        proc = start("up", "--config", str(config))
        wait_up(proc, config)
        assert portpool("gc").returncode == 0
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


COUNT_SIGINT = (
    "import signal, sys, time\n"
    "got = []\n"
    "signal.signal(signal.SIGINT, lambda s, f: got.append(time.monotonic()))\n"
    "print('ready', flush=True)\n"
    "deadline = time.monotonic() + 30\n"
    "while time.monotonic() < deadline and not (got and time.monotonic() - got[0] > 1.0):\n"
    "    time.sleep(0.05)\n"
    "print('sigints', len(got), flush=True)\n"
    "sys.exit(len(got))\n"
)


def test_ctrl_c_in_a_terminal_reaches_the_command_once(layout: Path, home: Path) -> None:
    import pty
    import select

    pid, master = pty.fork()
    if pid == 0:  # the child: session leader with the pty as its terminal
        argv = ["-m", "portpool.cli", "run", "-c", str(layout), "--", sys.executable, "-c"]
        os.execv(sys.executable, [sys.executable, *argv, COUNT_SIGINT])
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"ready" not in output and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                output += os.read(master, 1024)
        assert b"ready" in output
        os.write(master, b"\x03")  # Ctrl-C: the terminal signals its foreground group
        # Until the count itself: a read can end between "sigints" and its number.
        while not re.search(rb"sigints \d", output) and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    output += os.read(master, 1024)
                except OSError:
                    break
        assert b"sigints 1" in output, output
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1
    finally:
        os.close(master)


def test_kill_9_of_run_stops_its_command(layout: Path, home: Path) -> None:
    script = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", script)
    command_pid = int(read_line(proc))
    proc.kill()
    proc.wait()
    # The command gets SIGTERM from the kernel when run dies: no instance number is
    # ever used by a command whose leases are gone.
    wait_for(lambda: not psutil.pid_exists(command_pid) or
             psutil.Process(command_pid).status() == "zombie", 20)  # fmt: skip
    done = portpool("run", "--config", str(layout), "--", sys.executable, "-c", PRINT_ENV)
    assert json.loads(done.stdout)["PORTPOOL_INSTANCE"] == "1"


def test_run_a_missing_command_exits_127_and_up_refuses_a_missing_program(
    tmp_path: Path, layout: Path, port_base: int, home: Path
) -> None:
    for extra in ([], ["--fds"]):
        done = portpool("run", "--config", str(layout), *extra, "--", "no-such-program-xyz")
        assert done.returncode == 127
        assert "'no-such-program-xyz' was not found on PATH" in done.stderr
    config = up_layout(tmp_path, port_base, extra={"db": {"command": ["no-such-program-xyz"]}})
    done = portpool("up", "--config", str(config))
    assert done.returncode == 1
    assert f"{config}: services.db.command" in done.stderr
    assert "is up" not in done.stdout
    assert status_json(config)["instances"] == []
    # Two such services: both named at once, as the layout's other errors are.
    two = {"db": {"command": ["no-such-program-xyz"]}, "cache": {"command": ["no-such-2"]}}
    config = up_layout(tmp_path, port_base, extra=two)
    done = portpool("up", "--config", str(config))
    assert done.returncode == 1
    assert f"{config}: services.db.command: 'no-such-program-xyz' was not" in done.stderr
    assert f"{config}: services.cache.command: 'no-such-2' was not" in done.stderr
    # `layout` warns of them (it said nothing, then `up` refused); `run` ignores them.
    shown = portpool("layout", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    for name, program in (("db", "no-such-program-xyz"), ("cache", "no-such-2")):
        said = f"warning: {config}: services.{name}.command: '{program}' was not found on PATH"
        assert f"{said}; up does not start the layout while it is so" in shown.stdout
    warned = json.loads(portpool("layout", "--json", "--config", str(config)).stdout)
    assert sum("services.db.command" in w for w in warned["warnings"]) == 1


@pytest.mark.skipif(os.name != "posix", reason="FIFOs, sh and a removed working directory")
def test_layout_and_up_say_why_of_a_fifo_on_path_and_from_a_removed_directory(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """An executable FIFO on PATH: reading its "#!" waited for a writer, and `layout`
    (and `up`) hung. From a removed working directory, a relative command ended both
    in a FileNotFoundError traceback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fifo = bin_dir / "fifosvc"
    os.mkfifo(fifo)
    fifo.chmod(0o755)
    extra = {"db": {"command": ["fifosvc"]}, "cache": {"command": ["./svc.sh"]}}
    config = up_layout(tmp_path, port_base, extra=extra)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    said = f"services.db.command: 'fifosvc' on PATH is '{fifo}', not a regular file"
    shown = portpool("layout", "--config", str(config), env=env, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert said in shown.stdout
    done = portpool("up", "--config", str(config), env=env, timeout=30)
    assert done.returncode == 1, done.stderr
    assert said in done.stderr
    # A program of that name later on PATH is the one exec runs (it goes past the FIFO,
    # EACCES): the FIFO hid it, and run refused with 126.
    later = tmp_path / "later"
    later.mkdir()
    (later / "fifosvc").write_text('#!/bin/sh\necho ran "$0"\n')
    (later / "fifosvc").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{later}{os.pathsep}{os.environ['PATH']}"
    done = portpool("run", "-q", "--config", str(config), "--", "fifosvc", env=env, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"ran {later / 'fifosvc'}\n"), done.stderr
    shown = portpool("layout", "--config", str(config), env=env, timeout=30)
    assert "services.db.command" not in shown.stdout
    # Given as a path (a link to it, too), it was refused without a reason.
    (tmp_path / "link").symlink_to(fifo)
    done = portpool("run", "--config", str(config), "--", str(tmp_path / "link"), timeout=30)
    assert done.returncode == 126, done.stderr
    assert f"'{tmp_path / 'link'}' is not an executable file: it is a FIFO" in done.stderr
    gone = tmp_path / "gone"
    gone.mkdir()
    for command in ("layout", "up"):
        script = f"cd {gone} && rmdir {gone} && exec {' '.join(PORTPOOL)} {command} -c {config}"
        done = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=30, check=False
        )
        assert "Traceback" not in done.stderr, done.stderr
        assert (
            "services.cache.command: './svc.sh' is not an executable file (relative to the "
            "working directory, which was removed)" in done.stdout + done.stderr
        ), (command, done.stdout, done.stderr)
        gone.mkdir()
    assert status_json(config)["instances"] == []


def test_up_refuses_a_command_that_names_no_program_before_anything_starts(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A directory passed the check (os.access says a directory is "executable"): web
    # started, then db failed with exit 5; a layout error starts nothing.
    marker = tmp_path / "web-started"
    web = {"command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], "ready": "none"}
    cases = {
        str(tmp_path): "is not an executable file",
        "python3 -m http.server": "the program and each argument are separate strings",
        "cd": "'cd' is a shell builtin",
        "$HOME/bin/server": "no shell expands '~' or '$VAR' in a command",
        "~/bin/server": "no shell expands '~' or '$VAR' in a command",
    }
    for name, first_line in (
        ("gone", "#!/no/such/interpreter -x"),
        ("env", "#!/usr/bin/env nope-9z"),
    ):
        script = tmp_path / name
        script.write_text(f"{first_line}\nexit 0\n")
        script.chmod(0o755)
        cases[str(script)] = (
            "starts with '#!/no/such/interpreter'"
            if name == "gone"
            else ("runs 'nope-9z' through env")
        )
    for program, said in cases.items():
        config = up_layout(
            tmp_path, port_base, extra={"web": web, "db": {"command": [program], "ready": "none"}}
        )
        done = portpool("up", "--config", str(config))
        assert done.returncode == 1, done.stderr
        assert f"{config}: services.db.command" in done.stderr
        assert said in done.stderr
        assert not marker.exists()
        assert status_json(config)["instances"] == []


def test_a_script_with_crlf_line_endings_is_refused_before_anything_starts(
    tmp_path: Path, layout: Path, port_base: int, home: Path
) -> None:
    # "#!/bin/sh\r\n": the kernel looks for "/bin/sh\r" (env for "python3\r"). The
    # check read the line split at any whitespace, passed it, and the service failed
    # only once started ("No such file or directory" for a file that exists).
    marker = tmp_path / "web-started"
    web = {"command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], "ready": "none"}
    for name, first_line, said in (
        ("sh", "#!/bin/sh", "names the interpreter '/bin/sh\\r'"),
        ("env", "#!/usr/bin/env python3", "has env look for 'python3\\r'"),
    ):
        script = tmp_path / name
        script.write_bytes(f"{first_line}\r\nexit 0\r\n".encode())
        script.chmod(0o755)
        config = up_layout(
            tmp_path, port_base, extra={"web": web, "db": {"command": [str(script)]}}
        )
        done = portpool("up", "--config", str(config))
        assert done.returncode == 1, done.stderr
        assert f"{config}: services.db.command" in done.stderr
        assert "CRLF line endings" in done.stderr and said in done.stderr, done.stderr
        assert not marker.exists()
        done = portpool("run", "--config", str(layout), "--", str(script))
        assert done.returncode == 127, done.stderr
        assert "CRLF line endings" in done.stderr


def test_the_command_checks_refuse_no_script_that_runs(
    tmp_path: Path, layout: Path, home: Path
) -> None:
    # What the kernel runs (execvpe, as the start does) must pass: a program found through
    # a relative PATH entry, a symlink to a script, env -S, a #! line with an argument.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "plain": "#!/bin/sh\nexit 0\n",
        "envs": f"#!/usr/bin/env -S {Path(sys.executable).name} -u\nimport sys\n",
        "args": "#!/bin/sh -e\nexit 0\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "link").symlink_to("plain")
    env = {
        **os.environ,
        "PATH": f"bin{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for program in ("plain", "bin/link", "bin/envs", "bin/args", str(bin_dir / "link")):
        done = portpool("run", "--config", str(layout), "--", program, cwd=tmp_path, env=env)
        assert done.returncode == 0, (program, done.stderr)


def test_a_service_named_twice_is_acquired_once(layout: Path, port_base: int, home: Path) -> None:
    done = portpool(
        "run", "--config", str(layout), "-s", "alpha", "-s", "alpha", "--",
        sys.executable, "-c", PRINT_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["PORT"] == str(port_base)
    assert portpool("gc", "--config", str(layout)).returncode == 0
    assert not list((home / "ports").glob("*.json"))


def test_options_end_at_the_command(layout: Path, port_base: int, home: Path) -> None:
    # Without "--", the command's own -c must not be taken for portpool's --config.
    done = portpool("run", "--config", str(layout), "-s", "alpha", sys.executable, "-c", PRINT_ENV)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["PORT"] == str(port_base)


# run_up with announce=: the instance's ports are said as soon as it is acquired, before
# any service is ready, also when a start then fails (the CLI's "instance N of APP" line).
ANNOUNCING_UP = """\
import sys
from portpool.errors import ServiceExited
from portpool.layout import load_layout
from portpool import run_up

def announce(instance):
    ports = " ".join(f"{n}={p}" for n, p in instance.ports.items())
    print(f"announced {instance.number}: {ports}", file=sys.stderr, flush=True)

try:
    outcome = run_up(
        load_layout(sys.argv[1]), on_up=lambda i, p: print("is up", flush=True), announce=announce
    )
except ServiceExited as e:
    print(f"outcome {e.exit_code}: {e}", file=sys.stderr, flush=True)
    print(f"raised {e.service} {e.returncode} {e.status} {e.reason} {e.lingering}", flush=True)
else:
    print(f"outcome {outcome.code}: {outcome.message}", file=sys.stderr, flush=True)
"""


def test_run_up_announces_the_instance_before_a_start_that_fails(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    crash = [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(7)"]
    config = up_layout(tmp_path, port_base, extra={"api": {"command": crash}})
    done = subprocess.run(
        [sys.executable, "-c", ANNOUNCING_UP, str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    lines = done.stderr.splitlines()
    announced = [i for i, line in enumerate(lines) if line.startswith("announced 1: ")]
    outcome = [i for i, line in enumerate(lines) if line.startswith("outcome ")]
    assert announced and outcome and announced[0] < outcome[0], done.stderr
    assert f"web={port_base} api={port_base + 2} db={port_base + 4}" in lines[announced[0]]
    assert "outcome 5: service 'api' exited before it was ready (exit status 7)" in done.stderr
    assert "is up" not in done.stdout
    # The library raises ServiceExited (as run raises ShieldTripped), after releasing.
    assert "raised api 7 7 early []" in done.stdout.splitlines()


# A program that uses the library and has children of its own, started before the call:
# one running, one exited and not yet waited for. portpool did not start them.
HOST_PROGRAM = """\
import os, signal, subprocess, sys
from portpool import load_layout, run_command, run_up

own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
if hasattr(os, "waitid"):  # not on macOS
    os.waitid(os.P_PID, exited.pid, os.WEXITED | os.WNOWAIT)  # exited, still unreaped
layout = load_layout(sys.argv[1])
if sys.argv[2] == "run":
    outcome = run_command(layout, [sys.executable, "-c", "pass"])
else:
    outcome = run_up(layout, on_up=lambda i, p: os.kill(os.getpid(), signal.SIGTERM))
print("outcome", outcome.code)
print("own child running", own.poll() is None)
print("exited child's status", exited.wait())
own.kill()
own.wait()
"""


@pytest.mark.parametrize("call", ["run", "up"])
def test_the_library_never_stops_or_reaps_its_callers_own_children(
    tmp_path: Path, port_base: int, home: Path, call: str
) -> None:
    """run_command and run_up stop what they started, with its tree, and leave the
    calling program's own children alone: not signalled, their exit status not taken."""
    sleeper = {"command": [sys.executable, "-c", "import time; time.sleep(60)"], "ready": "none"}
    config = write_layout(tmp_path / "p.toml", port_base, services={"web": sleeper})
    done = subprocess.run(
        [sys.executable, "-c", HOST_PROGRAM, str(config), call],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == [  # after up's own lines
        "outcome 0",
        "own child running True",
        "exited child's status 7",
    ], done.stderr
    assert status_json(config)["instances"] == []


KILLED_UP = """\
import sys
from portpool.errors import ServiceExited
from portpool.layout import load_layout
from portpool import run_up

try:
    run_up(load_layout(sys.argv[1]), on_up=lambda i, p: print("is up", flush=True))
except ServiceExited as e:
    print(f"raised {e.exit_code} {e.service} {e.returncode} {e.status} {e.reason}", flush=True)
    print(str(e), flush=True)
"""


def test_run_up_raises_service_exited_when_a_ready_service_is_killed(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = up_layout(tmp_path, port_base)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_UP, str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ports = wait_up(proc, config)  # every service ready, per the instance record
        victim = int(ask(ports["api"]).split()[1])
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "is up" in out.splitlines()
    assert out.splitlines()[-2:] == [
        f"raised 5 api {-signal.SIGKILL} {128 + signal.SIGKILL} exited",
        "service 'api' exited on its own (killed by SIGKILL)",
    ]
    assert status_json(config)["instances"] == []


TRIPPED_UP = """\
import sys
from portpool import ShieldTripped, load_layout, run_up

try:
    run_up(load_layout(sys.argv[1]))
except ShieldTripped as e:
    print(f"raised {e.exit_code} {e.port}", flush=True)
"""


@pytest.mark.parametrize("via", ["library", "cli"])
def test_a_shield_trip_under_up_raises_shield_tripped_and_exits_4(
    tmp_path: Path, port_base: int, home: Path, via: str
) -> None:
    # run_up returned Outcome(4) where run_command raised ShieldTripped: one rule now.
    config = up_layout(tmp_path, port_base)
    argv = (
        [sys.executable, "-c", TRIPPED_UP, str(config)]
        if via == "library"
        else [*PORTPOOL, "up", "--config", str(config)]
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ports = wait_up(proc, config)
        (home / "ports" / f"{ports['api']}.json").write_text("not a record")
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    if via == "library":
        assert out.splitlines()[-1] == f"raised 4 {ports['api']}", err
    else:
        assert proc.returncode == 4, err
        assert "portpool: shield tripped: " in err and f"ports/{ports['api']}.json" in err
        assert "stopped; its ports are free" in out


def test_run_command_refuses_bad_calls_with_usage_errors(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # An empty list was an IndexError, a string ran its first letter ("'t' was not
    # found"), a call from a thread a bare ValueError of the signal module.
    import threading

    from portpool import UsageError, load_layout, run_command, run_up

    layout = load_layout(str(write_layout(tmp_path / "l.toml", port_base)))
    for command in ([], "true", ["true", 1]):
        with pytest.raises(UsageError, match="list of strings"):
            run_command(layout, command)  # type: ignore[arg-type]
    raised: list[BaseException] = []

    def in_a_thread() -> None:
        for call in (lambda: run_command(layout, ["true"]), lambda: run_up(layout)):
            try:
                call()
            except BaseException as e:
                raised.append(e)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(timeout=30)
    assert [type(e) for e in raised] == [UsageError, UsageError], raised
    assert all("main thread" in str(e) for e in raised)
    assert status_json(tmp_path / "l.toml")["instances"] == []  # nothing was started


def test_up_detach_refuses_a_command_that_cannot_run_itself(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Found only by the background up: "the detached up exited with status 1" and a
    # log to read, instead of the layout error (file, key, why) and nothing started.
    config = up_layout(tmp_path, port_base, extra={"db": {"command": [str(tmp_path)]}})
    done = portpool("up", "--detach", "--config", str(config))
    assert done.returncode == 1, done.stderr
    assert f"{config}: services.db.command" in done.stderr
    assert "is not an executable file" in done.stderr
    assert "detached up" not in done.stderr
    assert not list(home.glob("apps/*/logs/.starting-*.log"))
    assert status_json(config)["instances"] == []


# Double-forks a daemon that listens on $PORT at argv[1] (a [::] socket dual-stack), then
# exits once the daemon has written its pid to argv[2]: what `nginx` without
# `daemon off` does, and outside a subreaper nothing brings the daemon back to us.
DAEMON_ON_ADDRESS = """\
import os, socket, sys, time
address, pid_file = sys.argv[1], sys.argv[2]
if os.fork():
    for _ in range(1000):
        if os.path.exists(pid_file) and open(pid_file).read():
            break
        time.sleep(0.01)
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
family = socket.AF_INET6 if ":" in address else socket.AF_INET
s = socket.socket(family)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((address, int(os.environ["PORT"])))
s.listen()
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("host", "address"),
    [("localhost", "::"), ("0.0.0.0", "127.0.0.1"), ("::", "0.0.0.0"), ("127.0.0.1", "0.0.0.0")],
)
def test_a_daemon_left_on_an_address_the_lease_covers_is_named_as_lingering(
    tmp_path: Path, port_base: int, home: Path, host: str, address: str
) -> None:
    """run_command (no subreaper) names what still listens on the instance's port once
    the command is gone: only a listener on the very spelling of ``host`` was named, so
    a daemon on [::] under host localhost, or on 127.0.0.1 under 0.0.0.0, left the port
    "free" while it served it. The one coverage rule of the pool, doctor and the shield
    decides now."""
    from portpool import load_layout, run_command
    from portpool._addresses import has_ipv6_loopback

    if ":" in host + address and not has_ipv6_loopback():
        pytest.skip("this host has no ::1")
    config = write_layout(tmp_path / "p.toml", port_base, services={"web": {"size": 1}})
    config.write_text(config.read_text().replace('host = "127.0.0.1"', f'host = "{host}"'))
    pid_file = tmp_path / "daemon.pid"
    command = [sys.executable, "-c", DAEMON_ON_ADDRESS, address, str(pid_file)]
    outcome = run_command(load_layout(str(config)), command, grace_s=1.0)
    daemon = int(pid_file.read_text())
    try:
        assert outcome.code == 0
        (said,) = outcome.lingering
        assert said.startswith(f"port {port_base} is still held by pid {daemon} ("), said
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_run_fds_of_a_port_service_does_not_say_its_bind_may_fail(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`run --fds` of a service whose layout says `socket = "port"` printed "a server
    that does not set SO_REUSEADDR cannot bind it yet" for a port whose bound socket it
    passed at fd 3: nothing binds that port again. Without --fds the note is right."""
    config = write_layout(tmp_path / "p.toml", port_base, services={"web": {"socket": "port"}})
    connected = occupy("connected", "127.0.0.1", port_base, reuse=True)
    try:
        fds = portpool("run", "--config", str(config), "--fds", "--", sys.executable, "-c", "")
        assert fds.returncode == 0, fds.stderr
        assert f"web={port_base}" in fds.stderr  # it did get the port the connection uses
        assert "SO_REUSEADDR" not in fds.stderr
        by_number = portpool("run", "--config", str(config), "--", sys.executable, "-c", "")
        assert by_number.returncode == 0, by_number.stderr
        assert f"service 'web' port {port_base}: a server that does not set SO_REUSEADDR" in (
            by_number.stderr
        )
    finally:
        release(connected)


# A service that takes SIGTERM and SIGINT for nothing: only SIGKILL ends it.
STUBBORN = (
    "import os, signal, socket, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "sock = socket.socket(fileno=3)\n"
    "print('pid', os.getpid(), flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def _stubborn_up(tmp_path: Path, port_base: int, grace: str) -> tuple[subprocess.Popen[str], int]:
    config = write_layout(tmp_path / "up.toml", port_base, services={
        "slow": {"command": [sys.executable, "-c", STUBBORN], "ready": "log:^pid "},
    })  # fmt: skip
    proc = start("up", "--config", str(config), "--grace", grace)
    pid = None
    for _ in range(20):
        line = read_line(proc, timeout=30)
        if "| pid " in line:
            pid = int(line.split()[-1])
        # Its "ready" line too: signalled between the two, up said "ready" after
        # "stopping on SIGTERM", which the callers' line order did not expect (1 CI run).
        if "slow ready on port" in line and pid is not None:
            return proc, pid
    raise AssertionError(f"the service never said its pid and got ready (pid {pid})")


def test_up_says_it_is_stopping_when_asked_and_when_it_kills_after_the_grace(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """Ctrl-C to an `up` whose service takes its time: up said nothing at all until
    every service had gone ("stopping on SIGINT" came last, after the whole grace
    period), and a service it had to SIGKILL once the grace was over went unmentioned."""
    proc, pid = _stubborn_up(tmp_path, port_base, "60")
    try:
        proc.send_signal(signal.SIGINT)
        while "stopping on SIGINT" not in (line := read_line(proc, timeout=30)):
            pass
        assert line == "portpool: stopping on SIGINT\n"
        assert psutil.pid_exists(pid)  # said at once: the service still runs its grace
        os.kill(pid, signal.SIGKILL)  # the test's own shortcut through the 60 s
        out, _ = proc.communicate(timeout=30)
        assert "stopping on" not in out  # said once
        assert proc.returncode == -signal.SIGINT
    finally:
        kill_if_running(proc)
    proc, pid = _stubborn_up(tmp_path, port_base, "0.2")
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        lines = out.splitlines()
        killed = "portpool: still running 0.2 s after SIGTERM (--grace): SIGKILL to"
        assert lines[lines.index("portpool: stopping on SIGTERM") + 1 :] == [
            f"{killed} service 'slow' (pid {pid})",
            "portpool: instance 1 stopped; its ports are free",
        ]
    finally:
        kill_if_running(proc)


def test_up_names_the_service_of_a_leftover_it_kills_after_the_grace(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """What a service left running that outlived the grace was named "SIGKILL to pid N"
    alone: which service's tree it was in went unsaid."""
    leftover = "(trap '' TERM; exec sleep 60) & echo started; wait"
    config = write_layout(
        tmp_path / "p.toml",
        port_base,
        services={"tree": {"command": ["sh", "-c", leftover], "ready": "none"}},
    )
    proc = subprocess.Popen(
        [*PORTPOOL, "up", "--grace", "0.3", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        while "tree | started" not in read_line(proc, timeout=30):
            pass
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        kill_if_running(proc)
    said = "portpool: still running 0.3 s after SIGTERM (--grace): SIGKILL to pid "
    [line] = [x for x in out.splitlines() if x.startswith(said)]
    assert re.fullmatch(r"\d+ \(of service 'tree'\)", line.removeprefix(said)), out


def test_run_names_a_leftover_it_kills_after_the_grace(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A leftover of the command that ignored SIGTERM held run's exit for the whole
    grace (5 s), then was SIGKILLed, and run said nothing of either, as up does."""
    config = write_layout(tmp_path / "p.toml", port_base)
    left = "(trap '' TERM; exec sleep 60) & echo $! > left.pid"
    done = subprocess.run(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", "sh", "-c", left],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pid = int((tmp_path / "left.pid").read_text())
    assert done.stderr == (
        f"portpool: WARNING: still running 5 s after SIGTERM: SIGKILL to pid {pid} (sleep)\n"
    )


def test_a_script_without_a_hash_bang_line_is_named_as_such(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """An executable Python file without a '#!' line: run and up said only "Exec format
    error", which names no cause; a shell would have run it as a shell script."""
    script = tmp_path / "web.py"
    script.write_text("import time\ntime.sleep(30)\n")
    script.chmod(0o755)
    hint = (
        f"cannot start the command: '{script}': Exec format error: neither a program nor a "
        "script that names its interpreter in a first '#!' line (such as "
        "'#!/usr/bin/env python3'); or start it through its interpreter"
    )
    config = write_layout(tmp_path / "p.toml", port_base, services={"web": {}})
    ran = portpool("run", "--config", str(config), "--", str(script))
    assert ran.returncode == 126
    assert f"portpool: error: {hint}\n" in ran.stderr
    config = write_layout(tmp_path / "up.toml", port_base, services={
        "web": {"command": [str(script)], "ready": "none"},
    })  # fmt: skip
    up = portpool("up", "--config", str(config))
    assert up.returncode == 5
    assert f"portpool: service 'web' could not start: {hint}\n" in up.stderr


def test_a_service_runs_in_the_working_directory_of_up_not_the_layouts(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """As the README says: with `--config ../portpool.toml` a relative path in a command
    is looked for in the working directory `up` was started in."""
    project = tmp_path / "project"
    sub = project / "sub"
    sub.mkdir(parents=True)
    where = "import os; print('cwd', os.getcwd(), flush=True)"
    config = write_layout(project / "portpool.toml", port_base, services={
        "web": {"command": [sys.executable, "-c", where], "ready": "none"},
    })  # fmt: skip
    done = portpool("up", "--config", "../portpool.toml", cwd=sub)
    assert done.returncode == 5  # the service exits on its own once it has printed
    assert f"web | cwd {sub}\n" in done.stdout, done.stdout + done.stderr
    assert config.exists()


# run_up whose on_up gets a SIGTERM while it says "is up" (as the last service got
# ready), then gives the stop's line a moment to get in between, as it did.
STOPPED_WHILE_UP = """\
import io, os, signal, sys, time
from portpool import load_layout, run_up

out = io.StringIO()
def on_up(instance, pids):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    out.write("is up\\n")
outcome = run_up(load_layout(sys.argv[1]), on_up=on_up, out=out)
print(outcome.code)
print(out.getvalue(), end="")
"""


def test_up_says_is_up_before_it_says_it_stops_never_after(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A stop asked for as the last service got ready: "stopping on SIGTERM" came first,
    # then "is up" and the table, and up --detach took that for up.
    config = up_layout(tmp_path, port_base)
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_UP, str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stdout.splitlines() if x.startswith(("is up", "portpool: stop"))]
    assert lines == ["is up", "portpool: stopping on SIGTERM"], done.stdout
    assert done.stdout.splitlines()[0] == "0"


def test_a_stop_waits_for_a_start_under_way_and_stops_its_program_too(
    tmp_path: Path, port_base: int, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Starts run side by side, outside the lock that keeps starting and stopping apart
    # (up's six services started one after another before). A stop must still see a
    # start under way: here its program runs, and the start has not returned yet.
    from portpool import _processes
    from portpool._processes import Supervisor
    from portpool.errors import PortPoolError

    real_spawn = _processes.spawn
    forked = threading.Event()

    def slow_to_return(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_spawn(*args, **kwargs)
        forked.set()
        time.sleep(0.5)  # the window: running, not in the supervisor's children yet
        return proc

    monkeypatch.setattr(_processes, "spawn", slow_to_return)
    instance = start_instance(load_layout(str(write_layout(tmp_path / "p.toml", port_base))),
                              state=state, heartbeat=False)  # fmt: skip
    started: list[subprocess.Popen[bytes]] = []
    try:
        supervisor = Supervisor(instance, grace_s=5.0)  # not adopting: only what it started
        starter = threading.Thread(
            target=lambda: started.append(
                supervisor.start_process(
                    "sleeper", ["sleep", "60"], dict(os.environ), capture=False
                )
            )
        )
        starter.start()
        assert forked.wait(10)
        supervisor.stop()  # returns once everything it started is gone
        starter.join(10)
        (proc,) = started
        assert proc.poll() is not None, "the program of a start under way outlived the stop"
        with pytest.raises(PortPoolError, match="stopping"):
            supervisor.start_process("late", ["true"], dict(os.environ), capture=False)
    finally:
        for left in started:
            kill_if_running(left)
        instance.release()


FLOOD = """\
import os, signal, sys, time
if sys.argv[1:] == ["loud-exit"]:  # says a lot as it stops: blocks on the full pipe
    signal.signal(signal.SIGTERM, lambda *a: (os.write(1, b"bye\\n" * 20000), os._exit(0)))
time.sleep(1)
while True:
    sys.stdout.write("talking " * 100 + "\\n")
"""


@pytest.mark.parametrize("exit_kind", ["quiet-exit", "loud-exit"])
def test_stop_acts_while_up_output_is_blocked_by_a_reader_that_does_not_read(
    tmp_path: Path, port_base: int, home: Path, exit_kind: str
) -> None:
    """A service talking into `portpool up | slow-reader` filled the pipe; the output
    pump then held the console while its write blocked, and the "stopping on SIGTERM"
    line waited for it: SIGTERM, and so `portpool stop`, did nothing until the reader
    read. The stop no longer waits to say so. `loud-exit`: a service that blocks on
    the pipe as it stops was never SIGKILLed, as up waited to say it would be."""
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    config = write_layout(tmp_path / "up.toml", port_base, services={
        "web": {"command": [sys.executable, str(script), exit_kind], "ready": "none"}
    })  # fmt: skip
    proc = subprocess.Popen(
        [*PORTPOOL, "up", "-c", str(config), "--grace", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        while b" is up" not in proc.stdout.readline():
            pass
        time.sleep(2)  # the service talks from 1 s on: the pipe is full, nobody reads it
        done = portpool("stop", "--config", str(config), "--timeout", "20")
        assert done.returncode == 0, done.stderr
        assert not is_listening(port_base)
    finally:
        if proc.stdout is not None:  # let it write its last lines, and end
            drained = threading.Thread(target=proc.stdout.read)
            drained.start()
            kill_if_running(proc)
            drained.join(30)
