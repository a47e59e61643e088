"""Starting one program as ``run`` and ``up`` do (``_launch.spawn``, prepared in the forked
child by ``_spawn.ChildSetup``): sockets at fds 3.. in order, ``LISTEN_PID`` its own
pid, an empty signal mask whatever the spawning thread blocks, only the fds it is given,
its own process group, SIGTERM when its parent dies, and otherwise exactly what it would
get from ``exec``: its arguments, its environment (names no shell would take, ``PWD`` as
it was), and CommandNotFound (exit 127 or 126, as a shell) for what the kernel will not
execute.

A faster start through ``posix_spawn`` + ``setpriv`` + ``sh`` was tried and dropped: the
shell drops environment variables whose names are not shell names (exported bash
functions), rewrites ``PWD``, runs files without a ``#!`` line and names its own script
in errors. These tests held the exec shim (a second python per start) to that, and hold
what replaced it, the same steps in the forked child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from portpool._launch import spawn

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fds by number need POSIX")

# What the started program sees, as JSON on stdout.
REPORT = r"""
import json, os, socket, stat, sys
def port(fd):
    try:
        return socket.socket(fileno=os.dup(fd)).getsockname()[1]
    except OSError:
        return None
inodes = set()
for name in os.listdir("/proc/self/fd"):
    try:
        inodes.add(os.fstat(int(name)).st_ino)
    except OSError:
        pass
status = open("/proc/self/status").read()
mask = lambda key: int(status.split(key + ":")[1].split()[0], 16)
print(json.dumps({
    "pid": os.getpid(), "pgid": os.getpgid(0),
    "env": {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")},
    "ports": [port(3), port(4)], "inodes": sorted(inodes),
    "blocked": mask("SigBlk"),
}))
"""


@pytest.fixture
def two_sockets() -> Iterator[list[socket.socket]]:
    made = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        made.append(s)
    yield made
    for s in made:
        s.close()


def _in_blocking_thread(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """``start()`` in a thread that blocks the stop signals, as up's keepers do, and
    lives until the process exits, as they do: the parent-death signal (Linux) follows
    the thread that started the process."""
    started: list[subprocess.Popen[bytes]] = []
    ready = threading.Event()

    def body() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
        try:
            started.append(start())
        finally:
            ready.set()
        started[0].wait(60)

    threading.Thread(target=body, daemon=True).start()
    ready.wait(30)
    assert started, "the start raised"
    return started[0]


def _report(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_the_program_gets_its_sockets_in_order_and_its_own_listen_pid(
    two_sockets: list[socket.socket],
) -> None:
    first, second = two_sockets
    # The second socket first, so a source may well sit on the other's target number.
    sockets = [(second.fileno(), "admin"), (first.fileno(), "web")]
    proc = _in_blocking_thread(
        lambda: spawn(
            [sys.executable, "-c", REPORT],
            dict(os.environ),
            sockets=sockets,
            watch_parent=True,
            own_group=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    seen = _report(proc)
    assert seen["ports"] == [second.getsockname()[1], first.getsockname()[1]]
    assert seen["env"] == {
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "admin:web",
        "LISTEN_PID": str(proc.pid),
    }
    assert seen["pid"] == proc.pid  # the exec'd program itself, not a shell around it
    assert seen["pgid"] == proc.pid
    assert seen["blocked"] == 0  # (dispositions: test_signals, with a program not Python)


def test_the_program_gets_the_fds_it_is_given_and_no_other() -> None:
    kept_r, kept_w = os.pipe()
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_r, True)  # as an fd our own parent left us
    try:
        proc = spawn(
            [sys.executable, "-c", REPORT],
            dict(os.environ),
            keep_fds=[kept_r],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        seen = _report(proc)
        assert os.fstat(kept_r).st_ino in seen["inodes"]
        assert os.fstat(stray_r).st_ino not in seen["inodes"]
        assert seen["env"]["LISTEN_FDS"] is None  # no sockets: no socket activation
        assert seen["pgid"] != proc.pid  # not asked to lead a group
    finally:
        for fd in (kept_r, kept_w, stray_r, stray_w):
            os.close(fd)


# A parent that starts the program as run does and is then killed with -9.
MIDDLE = r"""
import os, subprocess, sys
from portpool._launch import spawn
child = spawn([sys.executable, "-c", {code!r}, {flag!r}], dict(os.environ), watch_parent=True)
print(child.pid, flush=True)
sys.stdin.read()
"""
ON_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("term"), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
"""


def test_the_program_gets_sigterm_when_its_parent_dies(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    flag = tmp_path / "got-term"
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE.format(code=ON_TERM, flag=str(flag))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert middle.stdout is not None
        assert middle.stdout.readline().strip().isdigit()
        assert middle.stdout.readline() == "ready\n"  # its handler is in place
        middle.kill()
        middle.wait(30)
        for _ in range(300):  # the file exists a moment before its text is written
            if flag.exists() and flag.read_text():
                break
            time.sleep(0.02)
        assert flag.read_text() == "term"
    finally:
        middle.kill()
        middle.wait(30)


ECHO_ARGS = "import json, sys; print(json.dumps(sys.argv[1:]))"


@pytest.mark.parametrize(
    "args",
    [
        ["two words", "", "$HOME", "`id`", "*", "a\nb", "-c", "--", "'\"", "\\"],
        ["-x", "exec", "$1", "$@", ";", "|", "&&"],
    ],
)
def test_the_program_gets_its_arguments_exactly(args: list[str]) -> None:
    proc = spawn(
        [sys.executable, "-c", ECHO_ARGS, *args],
        dict(os.environ),
        watch_parent=True,
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=60)
    assert json.loads(out) == args


def test_a_program_whose_name_starts_with_a_dash_runs(tmp_path: Path) -> None:
    program = tmp_path / "-hello"
    program.write_text('#!/bin/sh\necho hello from "$0"\n')
    program.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = spawn(["-hello"], env, watch_parent=True, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.decode().startswith("hello from ")


def test_the_environment_arrives_as_given(tmp_path: Path) -> None:
    # An exported bash function, names with '-' and '.', and what a shell would rewrite.
    given = {
        "PATH": os.environ.get("PATH", os.defpath),
        "BASH_FUNC_greet%%": "() {  echo hi\n}",
        "my-var": "1",
        "a.b": "2",
        "IFS": "x",
        "OPTIND": "7",
        "PPID": "123",
        "PWD": "/nonexistent",
    }
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    proc = spawn([sys.executable, "-c", dump], given, watch_parent=True, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    seen = json.loads(out)
    seen.pop("LC_CTYPE", None)  # python's own locale coercion, not the start's
    assert seen == given


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        ("echo a script without a #! line\n", 0o755, 126),  # the kernel: exec format error
        ("#!/bin/sh\necho not executable\n", 0o644, 126),
        ("#!/nonexistent/interpreter\n", 0o755, 127),  # the kernel: no such file
    ],
)
def test_what_the_kernel_will_not_execute_is_refused_as_a_shell_says(
    tmp_path: Path, content: str, mode: int, expected: int
) -> None:
    from portpool import CommandNotFound

    program = tmp_path / "prog"
    program.write_text(content)
    program.chmod(mode)
    with pytest.raises(CommandNotFound) as refused:
        spawn([str(program)], dict(os.environ), watch_parent=True, stderr=subprocess.PIPE)
    # 127 for no such file (the interpreter), 126 for a file that cannot be executed.
    assert refused.value.exit_code == expected
    assert str(refused.value).startswith(f"cannot start the command: {str(program)!r}: ")
    # The child that could not exec was reaped: no zombie of ours is left.
    zombies = [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


def test_starts_from_many_threads_while_others_hold_locks_never_hang(
    two_sockets: list[socket.socket], tmp_path: Path
) -> None:
    """The child runs Python between fork and exec: it must take no lock another thread
    may hold at the fork. Four threads start 25 programs each while three others keep
    taking the locks a forked child could wait on (logging's, the import lock, the C
    library's environment lock); every program starts with its sockets and exits 0."""
    import importlib
    import logging

    log = logging.getLogger("portpool-test-churn")
    log.addHandler(logging.FileHandler(tmp_path / "churn.log"))
    log.propagate = False
    stop = threading.Event()
    churned = {"log": 0, "import": 0, "env": 0}

    def churn(kind: str) -> None:
        while not stop.is_set():
            if kind == "log":
                log.warning("churn %d", churned["log"])
            elif kind == "import":
                sys.modules.pop("colorsys", None)
                importlib.import_module("colorsys")
            else:
                os.environ["PORTPOOL_TEST_CHURN"] = str(churned["env"])
            churned[kind] += 1

    sockets = [(s.fileno(), f"s{i}") for i, s in enumerate(two_sockets)]
    check = 'test "$LISTEN_PID" = "$$" && test "$LISTEN_FDS" = 2'
    codes: list[int] = []

    def starter() -> None:
        for _ in range(25):
            proc = spawn(["sh", "-c", check], dict(os.environ), sockets=sockets, watch_parent=True)
            codes.append(proc.wait(60))

    churners = [threading.Thread(target=churn, args=(k,), daemon=True) for k in churned]
    starters = [threading.Thread(target=starter, daemon=True) for _ in range(4)]
    for t in churners + starters:
        t.start()
    for t in starters:
        t.join(120)
    stop.set()
    for t in churners:
        t.join(10)
    os.environ.pop("PORTPOOL_TEST_CHURN", None)
    assert not any(t.is_alive() for t in starters), "a start hung"
    assert codes == [0] * 100
    assert all(n > 0 for n in churned.values()), churned  # the locks were busy meanwhile


# A process holding COUNT listening sockets and as many other fds (as run holds a lock
# and a record per service), at a descriptor limit that leaves room only for the start
# itself (its two pipes and Popen's): it starts a program with all the sockets.
NEAR_THE_LIMIT = r"""
import os, resource, socket, sys
from portpool._launch import spawn
count = int(sys.argv[1])
sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
others = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
highest = max(int(name) for name in os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 6, hard))
named = [(s.fileno(), f"s{i}") for i, s in enumerate(sockets)]
proc = spawn(["sh", "-c", 'echo "$LISTEN_FDS"'], dict(os.environ), sockets=named)
sys.exit(proc.wait())
"""


def test_the_program_starts_with_all_its_sockets_near_the_descriptor_limit() -> None:
    """The forked child holds every fd of its parent until the exec: copying N sockets
    above their targets there needed N more descriptors than the program ever holds,
    and ``run --fds`` of 40 services failed under the limit its own error asked for
    ("needs about 136"), which the exec shim (started with only the sockets) met."""
    count = 40
    done = subprocess.run(
        [sys.executable, "-c", NEAR_THE_LIMIT, str(count)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{count}\n", "")


def test_a_start_refused_before_the_fork_leaks_no_descriptor() -> None:
    """Popen refuses an argument with a NUL byte before it forks (ValueError): the pipe
    that reports a failed exec was left open, one descriptor per refused start."""
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ValueError, match="null byte"):
            spawn(["sh", "-c", "echo a\0b"], dict(os.environ), watch_parent=True)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_child_tries_the_paths_execvp_would_in_its_order() -> None:
    """The search is done before the fork (os.execvpe's runs Python that may take a
    lock), and must try exactly what execvpe would, as the program's own PATH says."""
    from portpool._spawn import exec_candidates

    for env in ({"PATH": "/usr/bin::bin"}, {}, {"PATH": ""}, {"PATH": "/opt/x:/bin"}):
        for program in ("true", "./prog", "dir/prog", "/bin/true"):
            if os.path.dirname(program):
                expected = [os.fsencode(program)]
            else:
                expected = [os.fsencode(os.path.join(d, program)) for d in os.get_exec_path(env)]
            assert exec_candidates(program, env) == expected, (program, env)


def test_no_handler_of_the_caller_runs_in_the_child_before_its_exec() -> None:
    """The child is a copy of the caller until its exec: a signal that reached it there
    ran the caller's Python handler in the copy (with the caller's wakeup fd closed and
    its number reused). Signals sent to children that are still copies of us, while 40
    programs start, must never run our handler anywhere but here."""
    read_end, write_end = os.pipe()
    ours = os.getpid()

    def handler(signum: int, frame: object) -> None:
        os.write(write_end, f"{os.getpid()}\n".encode())

    me = psutil.Process()
    cmdline = me.cmdline()
    old = signal.signal(signal.SIGUSR1, handler)
    done = threading.Event()
    sent = [0]

    def pester() -> None:
        while not done.is_set():
            for child in me.children():
                try:
                    if child.cmdline() == cmdline:  # not exec'd yet
                        child.send_signal(signal.SIGUSR1)
                        sent[0] += 1
                except psutil.Error:
                    pass

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        # Until 20 children were caught before their exec: 40 starts caught none now and
        # then (a child execs within microseconds), and passed without the mask too.
        for started in range(1, 401):
            spawn(["sleep", "0"], dict(os.environ)).wait(60)
            if started >= 40 and sent[0] >= 20:
                break
    finally:
        done.set()
        thread.join(10)
        signal.signal(signal.SIGUSR1, old)
        os.close(write_end)
        with os.fdopen(read_end) as r:
            ran_in = {int(line) for line in r.read().split()}
    assert sent[0] > 0, "no child was ever caught before its exec: the test proved nothing"
    assert ran_in <= {ours}, ran_in


# A process whose descriptors all are in use when it starts its first program: spawn's
# own module for the child's steps is imported then, and an import opens its file.
FIRST_START_AT_THE_LIMIT = r"""
import os, resource, sys
import portpool.statedir  # as run and up have, long before their first start
from portpool._launch import spawn
from portpool.errors import ResourceLimit
assert "portpool._spawn" not in sys.modules
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
highest = max(int(name) for name in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
held = []
while True:
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
try:
    spawn(["true"], dict(os.environ), watch_parent=True)
except ResourceLimit as e:
    print("ResourceLimit", e.exit_code)
"""


def test_the_first_start_out_of_descriptors_is_the_resource_limit() -> None:
    """The first start imports the child's steps: out of descriptors there, the import's
    OSError escaped as is, and ``up`` of 12 services under ``ulimit -n 48`` stopped with
    exit 5, "service 's2' could not start: [Errno 24] Too many open files: '.../_spawn.py'"
    instead of the one line naming the limit (exit 1)."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_START_AT_THE_LIMIT],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "ResourceLimit 1\n", "")
