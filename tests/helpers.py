"""Helpers for end-to-end tests: test layouts and running the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

PORTPOOL = [sys.executable, "-m", "portpool.cli"]
# For a child script: lower the descriptor limit to 64 (the hard limit kept) and take
# every descriptor left, keeping them in ``held`` (the script closes them, or exits).
EXHAUST_DESCRIPTORS = """
import os as _os, resource as _resource
_soft, _hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
_resource.setrlimit(_resource.RLIMIT_NOFILE, (64, _hard))
held = []
try:
    while True:
        held.append(_os.open(_os.devnull, _os.O_RDONLY))
except OSError:
    pass
"""


def write_layout(
    path: Path,
    base: int,
    *,
    app: str = "testapp",
    services: dict[str, dict[str, Any]] | None = None,
    stride: int = 10,
    max_instances: int = 10,
    heartbeat: float = 0.5,
    shield: float = 0.2,
) -> Path:
    """A layout file whose pools start at ``base``: by default two services of 2 ports."""
    services = services or {"alpha": {}, "beta": {}}
    lines = [
        f'app = "{app}"',
        'host = "127.0.0.1"',
        f"heartbeat_interval = {heartbeat}",
        f"shield_interval = {shield}",
        f"max_instances = {max_instances}",
    ]
    offset = 0
    for name, extra in services.items():
        size = extra.get("size", 2)
        lines += ["", f"[services.{name}]", f"base = {base + offset}", f"size = {size}"]
        lines.append(f"stride = {stride}")
        if "command" in extra:
            lines.append(f"command = {json.dumps(extra['command'])}")
        if "socket" in extra:
            lines.append(f'socket = "{extra["socket"]}"')
        for key in ("restart", "depends_on", "ready", "ready_timeout_s"):  # for up
            if key in extra:
                lines.append(f"{key} = {json.dumps(extra[key])}")
        offset += size
    path.write_text("\n".join(lines) + "\n")
    return path


def portpool(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``portpool ARGS`` to completion and capture its output."""
    return subprocess.run(
        [*PORTPOOL, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE ARGS`` to completion (this interpreter) and capture its output."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """Start ``portpool ARGS`` in the background, output captured line by line."""
    return subprocess.Popen(
        [*PORTPOOL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def status_json(config: Path | None = None) -> dict[str, Any]:
    args = ["status", "--json"] + (["--config", str(config)] if config else [])
    done = portpool(*args)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line of ``proc`` (bounded wait)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no output from pid {proc.pid} within {timeout} s")
        return proc.stdout.readline()
    finally:
        sel.close()


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A foreign program occupying a port: listening, only bound, connected with the port as
# its local port, or leaving a TIME_WAIT behind (it closes first). argv: kind, host,
# port, v6only ("1", "0" or "-" for the default), and "reuse" to set SO_REUSEADDR.
OCCUPANT = r"""
import socket, sys
kind, host, port, v6only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET6 and v6only != "-":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
if sys.argv[5:] == ["reuse"]:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
keep = [s]
if kind in ("listen", "bound"):
    s.bind((host, port))
    if kind == "listen":
        s.listen()
else:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    s.bind((host, port))
    s.connect(server.getsockname()[:2])
    peer, _ = server.accept()
    keep += [server, peer]
    if kind == "timewait":
        s.close()  # the active close leaves our side in TIME_WAIT for up to 60 s
        peer.recv(1)
        peer.close()
print("ready", flush=True)
sys.stdin.read()
if kind == "connected":
    # The server side closes first, so the TIME_WAIT lands on its ephemeral port, not on
    # the occupied one: a TIME_WAIT left on P would block later tests for 60 s.
    peer.close()
    s.settimeout(10)
    s.recv(1)
    s.close()
"""


def start_script(
    code: str, *args: str, ready: str = "ready", what: str = "script"
) -> subprocess.Popen[str]:
    """Start ``python -c CODE ARGS`` (stdin, stdout and stderr piped); returns once it
    prints the line ``ready`` (stop it with ``release``, which closes its stdin)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = read_line(proc, timeout=20)
    if line.strip() != ready:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"{what} {' '.join(args)} failed: {err}")
    return proc


def occupy(
    kind: str, host: str, port: int, v6only: str = "-", *, reuse: bool = False
) -> subprocess.Popen[str]:
    """Start an OCCUPANT process; returns once it is set up (stop it with ``release``).
    ``reuse``: its socket sets SO_REUSEADDR (our bind takes the port, a plain one not)."""
    flags = ["reuse"] if reuse else []
    return start_script(OCCUPANT, kind, host, str(port), v6only, *flags, what="occupant")


def kill_if_running(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc`` if it still runs, and reap it (a test's cleanup, whatever failed)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def release(proc: subprocess.Popen[str]) -> None:
    """End an ``occupy`` process (closing its stdin) and reap it."""
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def releasing() -> Iterator[list[subprocess.Popen[str]]]:
    """A list to put started occupants in (any process with a stdin pipe that ends when
    it closes); each is ``release``d on leaving, whatever the test did."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            release(proc)


class LineReader:
    """Reads a process's stdout lines and its stderr in threads, so waiting for a line
    never misses one already buffered (a selector on a buffered text stream can).
    Once it exists, use ``finish`` instead of ``communicate``."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import queue
        import threading

        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.lines: list[str] = []  # stdout lines handed out by ``until``
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        out, err = proc.stdout, proc.stderr

        def pump_out() -> None:
            for line in out:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        self._threads = [
            threading.Thread(target=pump_out, daemon=True),
            threading.Thread(target=lambda: self._err.extend(err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def until(self, predicate: Any, timeout: float = 60.0) -> list[str]:
        """The stdout lines so far, once one satisfies ``predicate``; fails at the end of
        the output or after ``timeout`` seconds."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout} s: {self.lines}") from None
            if line is None:
                raise AssertionError(f"the output ended without a matching line: {self.lines}")
            self.lines.append(line)
            if predicate(line):
                return list(self.lines)

    def finish(self, timeout: float = 60.0) -> tuple[str, str]:
        """Wait for the process to exit; its whole stdout and stderr."""
        self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        return "".join(f"{x}\n" for x in self.lines), "".join(self._err)


def held_lock_files(root: Path) -> list[Path]:
    """Lock files under ``root`` that the kernel says are flock-held right now (Linux)."""
    from portpool._platform import locked_inodes

    locked = locked_inodes() or {}
    return [p for p in root.rglob("*.lock") if (p.stat().st_dev, p.stat().st_ino) in locked]


# A command for `run` that prints its instance number and waits until the file named by
# its first argument appears (at most 60 s).
HOLD = (
    "import os, sys, time\n"
    "print(os.environ['PORTPOOL_INSTANCE'], flush=True)\n"
    "deadline = time.time() + 60\n"
    "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
    "    time.sleep(0.05)\n"
)


def write_service_layout(
    tmp_path: Path, base: int, services: dict[str, dict[str, Any]], *, app: str, script: str
) -> Path:
    """``tmp_path/portpool.toml``: app ``app`` with ``services`` (their extra keys as TOML
    values; 2 ports each from ``base``, stride 10), each running the Python ``script``
    unless its keys give a ``command``."""
    script_path = tmp_path / "service.py"
    script_path.write_text(script)
    lines = [f'app = "{app}"', "heartbeat_interval = 0.5", "shield_interval = 0.5"]
    for i, (name, keys) in enumerate(services.items()):
        lines += [f"[services.{name}]", f"base = {base + 2 * i}", "size = 2", "stride = 10"]
        command = keys.pop("command", [sys.executable, str(script_path)])
        lines.append(f"command = {json.dumps(command)}")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path = tmp_path / "portpool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (mount's spelling: "64k", "4m") on the new directory
    ``where``, unmounted after (made writable first, in case the test remounted it
    read-only). Skips the test where mounting is denied (it needs root)."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(where)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def in_forked_child(child: Callable[[], bool]) -> int:
    """Run ``child`` in a forked child, where a hang ends by SIGALRM after 10 s; its
    exit code: 0 when ``child`` returned True."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(10)
        code = 1
        try:
            code = 0 if child() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fork_while_held(mutex: Any, child: Callable[[], bool]) -> int:
    """Fork while another thread holds ``mutex`` (as a heartbeat holds its lock while it
    writes) and run ``child`` in the child, where a hang ends by SIGALRM after 10 s.
    Returns the child's exit code: 0 when ``child`` returned True."""
    held, forked = threading.Event(), threading.Event()

    def hold() -> None:
        with mutex:
            held.set()
            forked.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        with warnings.catch_warnings():  # fork() with a thread running: the case itself
            warnings.simplefilter("ignore", DeprecationWarning)
            return in_forked_child(child)
    finally:
        forked.set()
        thread.join(30)


class Terminal:
    """A program running in a new pseudo-terminal, as in a user's terminal window."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: session leader, the pty is its terminal
            try:
                if cwd is not None:
                    os.chdir(cwd)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.output = b""
        self._drainer: threading.Thread | None = None

    def drain(self) -> None:
        """Read the output in a thread from now on (a test that waits on something
        else must not let the program block on a full terminal)."""

        def read() -> None:
            with contextlib.suppress(OSError):
                while chunk := os.read(self.master, 4096):
                    self.output += chunk

        self._drainer = threading.Thread(target=read, daemon=True)
        self._drainer.start()

    def read_until(self, pattern: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while pattern not in self.output and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                self.output += chunk
        assert pattern in self.output, self.output.decode(errors="replace")
        return self.output

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the terminal signals its foreground group

    def wait(self, timeout: float = 60) -> int:
        """The exit status, -N if killed by signal N (reading output meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                with contextlib.suppress(OSError):
                    while self._drainer is None and select.select([self.master], [], [], 0.1)[0]:
                        chunk = os.read(self.master, 4096)
                        if not chunk:
                            break
                        self.output += chunk
                return os.waitstatus_to_exitcode(status)
            if self._drainer is None and select.select([self.master], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    self.output += os.read(self.master, 4096)
            elif self._drainer is not None:
                time.sleep(0.05)
        raise AssertionError(f"pid {self.pid} still running: {self.output!r}")

    def close(self) -> None:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.master)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


def hold_port_lock(port: int) -> subprocess.Popen[str]:
    """A child holding ``port``'s lock in the state dir ``PORTPOOL_HOME`` names, from when
    this returns until its stdin is closed (it prints "held" once it holds it)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from portpool.lock import PortLock\n"
            "from portpool.statedir import StateDir\n"
            f"lock = PortLock.acquire(StateDir.open(), {port})\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


# Holds a plain (non-portpool) listening socket on each port of its arguments, says
# "listening", and keeps them until its stdin closes; with "lease" it holds each port
# as a portpool lease instead (PORTPOOL_HOME's state dir).
HOLD_PORTS = r"""
import socket, sys
ports = [int(p) for p in sys.argv[2:]]
if sys.argv[1] == "lease":
    from portpool.pool import acquire
    from portpool.statedir import StateDir
    state = StateDir.open()
    held = [acquire(state, [p], service="other") for p in ports]
else:
    held = [socket.create_server(("127.0.0.1", p)) for p in ports]
print("listening", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def ports_held(ports: Iterable[int], how: str = "plain") -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``ports`` (``how``: "plain" listening sockets, a foreign
    program's, or "lease": portpool leases) for the ``with`` block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_PORTS, how, *map(str, ports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "listening\n"
        yield holder
    finally:
        holder.communicate(timeout=30)


def count_proc_scans(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """A list that grows by one each time this process starts a scan of every
    process's descriptors (``os.scandir("/proc")``), from now on."""
    scans: list[None] = []
    real = os.scandir

    def counted(path: Any = ".") -> Any:
        if path == "/proc":
            scans.append(None)
        return real(path)

    monkeypatch.setattr(os, "scandir", counted)
    return scans
