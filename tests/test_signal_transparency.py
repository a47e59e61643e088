"""`run` and `up` pass on every signal a command started with `exec` would have got,
and stop their whole trees, with real processes and real signals (Linux)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest
from tests.helpers import (
    PORTPOOL,
    Terminal,
    kill_if_running,
    run_python,
    status_json,
    wait_for,
    write_layout,
    write_service_layout,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, Linux /proc")

# Notes (by number) every signal it is sent in the file argv[1]; SIGTERM ends it with status 0.
NOTE_SIGNALS = """
import os, signal, sys, time
log = sys.argv[1]
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
def got(signum, frame):
    note(str(signum))
    if signum == signal.SIGTERM:
        sys.exit(0)
for signum in (signal.SIGALRM, signal.SIGWINCH, signal.SIGVTALRM, signal.SIGRTMIN + 3,
               signal.SIGTERM):
    signal.signal(signum, got)
note("ready")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
"""

PASSED = [signal.SIGALRM, signal.SIGWINCH, signal.SIGVTALRM, signal.SIGRTMIN + 3]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _send_each(pid: int, log: Path, expected: list[str]) -> None:
    """Send ``PASSED`` one at a time, each once its predecessor arrived."""
    for signum in PASSED:
        os.kill(pid, signum)
        expected.append(str(signum))
        assert wait_for(lambda: _lines(log) == expected, timeout=20), (_lines(log), signum)


def test_run_passes_alrm_winch_and_realtime_signals_to_its_command_once(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # SIGALRM (default: end the process) ended run without releasing: its record stayed
    # and the command got SIGTERM from the parent-death signal; SIGWINCH was dropped.
    config = write_layout(tmp_path / "run.toml", port_base)
    script = tmp_path / "note.py"
    script.write_text(NOTE_SIGNALS)
    log = tmp_path / "signals.log"
    proc = subprocess.Popen(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, str(script), str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: _lines(log) == ["ready"], timeout=30), _lines(log)
        expected = ["ready"]
        _send_each(proc.pid, log, expected)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert _lines(log) == [*expected, str(signal.SIGTERM.value)]
    assert status_json(config)["instances"] == []


def test_a_terminal_resize_while_run_starts_does_not_interrupt_it(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # SIGWINCH does nothing by default: while starting, it must not be taken for an
    # interrupt (the command, not started yet, would not have heard it either).
    config = write_layout(tmp_path / "run.toml", port_base)
    code = "import sys; print('ran', flush=True); sys.exit(7)"
    proc = subprocess.Popen(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )
    sent = [0]
    done = threading.Event()

    def resize() -> None:
        for _ in range(2000):  # bounded; every 5 ms from the start until it exits
            if done.is_set() or proc.poll() is not None:
                return
            try:
                os.kill(proc.pid, signal.SIGWINCH)
            except ProcessLookupError:
                return
            sent[0] += 1
            time.sleep(0.005)

    sender = threading.Thread(target=resize)
    sender.start()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        done.set()
        sender.join()
        kill_if_running(proc)
    assert sent[0] > 10  # the resizes happened, also while it started
    assert (proc.returncode, out) == (7, "ran\n")
    assert status_json(config)["instances"] == []


def test_up_passes_alrm_winch_and_realtime_signals_to_its_services_and_keeps_running(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    log = tmp_path / "signals.log"
    config = write_service_layout(
        tmp_path,
        port_base,
        {"web": {"ready": "none"}},
        app="passup",
        script=NOTE_SIGNALS.replace("sys.argv[1]", repr(str(log))),
    )
    proc = subprocess.Popen(
        [*PORTPOOL, "up", "-q", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: _lines(log) == ["ready"], timeout=30), _lines(log)
        expected = ["ready"]
        _send_each(proc.pid, log, expected)
        assert proc.poll() is None  # passed on: none of them stops up
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, err
    assert _lines(log) == [*expected, str(signal.SIGTERM.value)]
    assert status_json(config)["instances"] == []


# Says "real-time N" at each SIGRTMIN+1, read blocked (a Python handler runs once for
# a burst); SIGTERM ends it.
COUNT_REAL_TIME = """
import signal
rt = signal.SIGRTMIN + 1
signal.pthread_sigmask(signal.SIG_BLOCK, [rt, signal.SIGTERM])
print("ready", flush=True)
count = 0
while signal.sigwaitinfo([rt, signal.SIGTERM]).si_signo == rt:
    count += 1
    print("real-time", count, flush=True)
"""


def test_real_time_signals_sent_in_a_burst_each_reach_the_command(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # The kernel queues real-time signals: three sent at once are three delivered, as
    # to a bare command; run took the second and third for copies of the first.
    config = write_layout(tmp_path / "run.toml", port_base)
    proc = subprocess.Popen(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, "-c", COUNT_REAL_TIME],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()))
    reader.start()
    try:
        assert wait_for(lambda: lines[:1] == ["ready\n"], timeout=30), lines
        for _ in range(3):
            os.kill(proc.pid, signal.SIGRTMIN + 1)
        assert wait_for(lambda: len(lines) >= 4, timeout=20), lines
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        kill_if_running(proc)
        reader.join(timeout=30)
    assert proc.returncode == 0
    assert lines == ["ready\n", "real-time 1\n", "real-time 2\n", "real-time 3\n"]


@pytest.mark.parametrize("command", ["run", "up"])
def test_a_child_inherited_through_exec_is_never_signalled(
    tmp_path: Path, port_base: int, home: Path, command: str
) -> None:
    # `sh -c 'sidecar & exec portpool up'`: the sidecar is a child of portpool's process,
    # but portpool did not start it. The stop took every child for its own and killed it.
    pid_file = tmp_path / "sidecar.pid"
    config = write_service_layout(
        tmp_path,
        port_base,
        {"web": {"ready": "none"}},
        app="inherit",
        script="import time\ntime.sleep(60)\n",
    )
    portpool = " ".join([*PORTPOOL, command, "-q", "-c", str(config)])
    if command == "run":
        portpool += " -- true"
    script = f"sleep 60 >/dev/null & echo $! > {pid_file}; exec {portpool}"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    sidecar = None
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=30)
        sidecar = psutil.Process(int(pid_file.read_text()))
        if command == "up":
            assert proc.stdout is not None
            assert wait_for(lambda: "is up" in proc.stdout.readline(), timeout=30)
            os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert status_json(config)["instances"] == []  # it did stop
        assert sidecar.is_running() and sidecar.status() != psutil.STATUS_ZOMBIE
    finally:
        kill_if_running(proc)
        if sidecar is not None:
            with contextlib.suppress(psutil.Error):
                sidecar.kill()


def test_a_terminal_resize_is_not_passed_to_up_s_services(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Services run outside the terminal: a resize is not for them (nginx and httpd take
    # SIGWINCH for "stop your workers gracefully"); kill -WINCH to up still is.
    log = tmp_path / "signals.log"
    note = NOTE_SIGNALS.replace("sys.argv[1]", repr(str(log)))
    note = note.replace("signal.SIGTERM):", "signal.SIGTERM, signal.SIGUSR1):")
    config = write_service_layout(
        tmp_path, port_base, {"web": {"ready": "none"}}, app="resize", script=note
    )
    # The session leader, in the foreground of the pty.
    term = Terminal([sys.executable, "-m", "portpool.cli", "up", "-c", str(config)])
    term.drain()
    try:
        assert wait_for(lambda: _lines(log) == ["ready"], timeout=30), (_lines(log), term.text)
        for rows in (30, 40, 50):  # the kernel signals the foreground group of the pty
            fcntl.ioctl(term.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 80, 0, 0))
            time.sleep(0.05)
        os.kill(term.pid, signal.SIGUSR1)  # after the resizes: once it arrives, they would have
        usr1 = str(signal.SIGUSR1.value)
        assert wait_for(lambda: usr1 in _lines(log), timeout=20), _lines(log)
        os.kill(term.pid, signal.SIGWINCH)  # sent by a process: passed on
        winch = str(signal.SIGWINCH.value)
        assert wait_for(lambda: winch in _lines(log), timeout=20), _lines(log)
        os.kill(term.pid, signal.SIGTERM)
        assert term.wait() == 0, term.text
    finally:
        term.close()
    assert _lines(log) == ["ready", usr1, winch, str(signal.SIGTERM.value)]


# Notes "ready", each SIGHUP a process sent (the kernel's own, which a closed terminal
# may add whatever runs in it, are not counted), and "done" 1.5 s after the first.
SI_KERNEL = 0x80
NOTE_HANGUPS = f"""
import signal, sys, time
log = sys.argv[1]
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
note("ready")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    info = signal.sigtimedwait([signal.SIGHUP], 0.05)
    if info is not None and info.si_code != {SI_KERNEL}:
        note("SIGHUP")
        deadline = min(deadline, time.monotonic() + 1.5)
note("done")
"""


# A job-control shell in a terminal, as bash: runs argv as its foreground job, and on
# the terminal's hangup passes SIGHUP on to the job's process group, then waits for it.
SHELL = """
import os, signal, sys, time
hung = []
signal.signal(signal.SIGHUP, lambda s, f: hung.append(s))
job = os.fork()
if job == 0:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(0, os.getpid())
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    os.execvp(sys.argv[1], sys.argv[1:])
deadline = time.monotonic() + 60
while not hung and time.monotonic() < deadline:
    time.sleep(0.05)
os.killpg(job, signal.SIGHUP)
os.waitpid(job, 0)
"""


def test_a_closed_terminal_gives_the_command_of_run_one_hangup(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # The shell passes its hangup on to its job, run's group, which holds the command:
    # run passed it on once more, and the command got two.
    config = write_layout(tmp_path / "run.toml", port_base)
    script = tmp_path / "hangups.py"
    script.write_text(NOTE_HANGUPS)
    log = tmp_path / "log"
    run = [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, str(script), str(log)]
    pid, master = pty.fork()
    if pid == 0:  # the shell: the session's leader, the pty its terminal
        try:
            os.execv(sys.executable, [sys.executable, "-c", SHELL, *run])
        finally:
            os._exit(127)
    try:
        assert wait_for(lambda: _lines(log) == ["ready"], timeout=30), _lines(log)
        # run is held stopped while the shell passes the hangup on, so that its copy,
        # if any, comes after the command read the shell's (not merged with it).
        run_pid = psutil.Process(pid).children()[0].pid
        os.kill(run_pid, signal.SIGSTOP)
        assert wait_for(lambda: psutil.Process(run_pid).status() == psutil.STATUS_STOPPED)
        os.close(master)  # the window closes
        master = -1
        assert wait_for(lambda: "SIGHUP" in _lines(log), timeout=30), _lines(log)
        os.kill(run_pid, signal.SIGCONT)
        assert wait_for(lambda: "done" in _lines(log), timeout=30), _lines(log)
        os.waitpid(pid, 0)
        assert _lines(log) == ["ready", "SIGHUP", "done"]
        assert status_json(config)["instances"] == []
    finally:
        if master >= 0:
            os.close(master)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


TIMED_CALLER = """
import signal, sys
from portpool import load_layout
from portpool._run import run_command
fired = []
signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
signal.setitimer(signal.ITIMER_REAL, 0.5)  # the caller's own timer (pytest-timeout's)
command = [sys.executable, "-c", "import time; time.sleep(2)"]
outcome = run_command(load_layout(sys.argv[1]), command)
print("code", outcome.code, "alarms", len(fired))
"""


def test_a_caller_s_own_alarm_handler_is_left_alone_by_run_command(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # SIGALRM is passed on to the command only where nobody handles it: a program that
    # times itself with it (pytest-timeout) got no alarm, and its command was killed.
    config = write_layout(tmp_path / "run.toml", port_base)
    done = run_python(TIMED_CALLER, str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "code 0 alarms 1\n"


# The command of `run`: lets the sidecar go on (file `go`), waits until what the
# sidecar started (pid in file `orphan`) is an orphan re-parented to portpool, then
# exits 0 (file `seen`); with "listen" or "hold" it waits instead, up to 30 s, for
# the shield or `up`'s stop to end it.
AFTER_SIDECAR = """
import os, pathlib, sys, time
here = pathlib.Path(sys.argv[1])
(here / "go").write_text("")
deadline = time.monotonic() + 30
def ready():
    text = (here / "orphan").read_text() if (here / "orphan").exists() else ""
    if not text.endswith("\\n"):
        return False
    with open(f"/proc/{int(text)}/stat") as f:  # ppid: the 4th field, after ") S "
        return int(f.read().rpartition(")")[2].split()[1]) == os.getppid()
while time.monotonic() < deadline and not ready():
    time.sleep(0.02)
(here / "seen").write_text("")
if sys.argv[2] in ("listen", "hold"):
    while time.monotonic() < deadline:
        time.sleep(0.05)
"""

# The sidecar a shell starts before it execs portpool: once the command runs, it starts
# `child` in the background and exits, so `child` is re-parented to portpool.
SIDECAR = (
    "( while [ ! -f {here}/go ]; do sleep 0.02; done; {child} & echo $! > {here}/orphan.tmp;"
    " mv {here}/orphan.tmp {here}/orphan ) >/dev/null 2>&1 &"
)

LISTENER = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
time.sleep(60)
"""


@pytest.mark.parametrize(("kind", "marked"), [("sleep", False), ("listen", False), ("sleep", True)])
def test_an_orphan_of_an_inherited_child_is_not_portpool_s(
    tmp_path: Path, port_base: int, home: Path, kind: str, marked: bool
) -> None:
    # `sh -c 'sidecar & exec portpool run'`: what the sidecar starts and leaves is
    # re-parented to portpool (a subreaper), but portpool did not start it. The stop
    # killed it; and when it listened on the instance's port, the shield took it for
    # the command's and let it hold the port (exit 0, not 4). `marked`: the caller
    # exported the instance's variables (eval "$(portpool env --export)"), so the
    # sidecar carried the marks of the command's own processes, and was killed.
    config = write_layout(tmp_path / "run.toml", port_base, services={"web": {"size": 1}})
    listener = f"{sys.executable} -c '{LISTENER}' {port_base}"
    child = listener if kind == "listen" else "sleep 60"
    (tmp_path / "cmd.py").write_text(AFTER_SIDECAR)
    run = [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, "cmd.py", ".", kind]
    script = SIDECAR.format(here=tmp_path, child=child) + " exec " + " ".join(run)
    marks = {"PORTPOOL_APP": "testapp", "PORTPOOL_INSTANCE": "1"} if marked else {}
    proc = subprocess.Popen(
        ["sh", "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **marks},
    )  # fmt: skip
    orphan = None
    try:
        _, err = proc.communicate(timeout=60)
        orphan = psutil.Process(int((tmp_path / "orphan").read_text()))
        assert orphan.is_running() and orphan.status() != psutil.STATUS_ZOMBIE
        if kind == "listen":
            assert proc.returncode == 4, err  # the shield tripped on the foreign listener
            assert b"is now listened on by pid" in err, err
            assert b"still held" not in err, err  # not ours to wait for either
        else:
            assert proc.returncode == 0, err
    finally:
        kill_if_running(proc)
        if orphan is not None:
            with contextlib.suppress(psutil.Error):
                orphan.kill()


def test_an_orphan_of_an_inherited_child_is_not_stopped_with_up(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # The same under `up`: its service lets the sidecar go on, and `up` is stopped once
    # the sidecar's child is an orphan of `up`'s.
    (tmp_path / "cmd.py").write_text(AFTER_SIDECAR)
    command = [sys.executable, str(tmp_path / "cmd.py"), str(tmp_path), "hold"]
    config = write_layout(
        tmp_path / "up.toml", port_base, services={"web": {"command": command, "ready": "none"}}
    )
    up = " ".join([*PORTPOOL, "up", "-q", "-c", str(config)])
    script = SIDECAR.format(here=tmp_path, child="sleep 60") + " exec " + up
    proc = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL)
    orphan = None
    try:
        assert wait_for((tmp_path / "seen").exists, timeout=30)
        orphan = psutil.Process(int((tmp_path / "orphan").read_text()))
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert orphan.is_running() and orphan.status() != psutil.STATUS_ZOMBIE
    finally:
        kill_if_running(proc)
        if orphan is not None:
            with contextlib.suppress(psutil.Error):
                orphan.kill()


# Notes each INT, TERM, USR1 and USR2 it gets (read with sigtimedwait: none is merged
# with another by a handler); after USR2 it notes what else is pending, and ends.
NOTE_EACH = """
import signal, sys
log = sys.argv[1]
wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
note("ready")
for _ in range(600):
    info = signal.sigtimedwait(wanted, 0.1)
    if info is not None:
        note(str(info.si_signo))
        if info.si_signo == signal.SIGUSR2:
            break
while (info := signal.sigtimedwait(wanted, 0)) is not None:
    note(str(info.si_signo))
"""

# In a terminal's foreground (run shares its group with the command): USR1 to run
# alone, then TERM to the whole group (the script survives it), then USR2 to run.
GROUP_KILL = """
trap 'echo script got TERM' TERM
wait_for() {{
  for _ in $(seq 600); do grep -qx "$1" {log} 2>/dev/null && return; sleep 0.05; done
}}
{run} &
pp=$!
wait_for ready; kill -USR1 $pp
wait_for {usr1}; kill -TERM 0
wait_for {term}; kill -USR2 $pp
wait $pp; echo "run exited $?"
"""


# The command sends TERM to its whole group at once, `run` and its witness in it: the
# witness, started after the command, missed it, and run passed it on a second time.
KILL_AT_ONCE = """
trap 'echo outer got TERM' TERM
for i in 1 2 3 4 5 6 7 8; do
  {run} -- sh -c 'trap "echo got TERM \\$\\$" TERM; kill -TERM 0; sleep 0.2; echo end'
done
echo all done
"""


def test_a_group_signal_the_command_sends_as_it_starts_reaches_it_once(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_layout(tmp_path / "run.toml", port_base)
    run = " ".join([*PORTPOOL, "run", "-q", "-c", str(config)])
    term = Terminal(["/bin/sh", "-c", KILL_AT_ONCE.format(run=run)], cwd=tmp_path)
    try:
        term.read_until(b"all done", timeout=120)
        term.wait()
    finally:
        term.close()
    lines = term.text.splitlines()
    got = [x for x in lines if x.startswith("got TERM")]
    assert len(got) == 8 and len(set(got)) == 8, term.text  # once for each command
    assert lines.count("end") == 8, term.text


def test_a_signal_sent_to_the_group_run_shares_reaches_the_command_once(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # `kill 0` in a script (or a shell passing on a signal to its job) reaches every
    # process of the group, the command too: run passed it on as well, a second time.
    log = tmp_path / "signals.log"
    config = write_layout(tmp_path / "run.toml", port_base)
    (tmp_path / "note.py").write_text(NOTE_EACH)
    run = [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, "note.py", str(log)]
    script = GROUP_KILL.format(
        log=log, run=" ".join(run), usr1=int(signal.SIGUSR1), term=int(signal.SIGTERM)
    )
    # The shell: session leader in the foreground of the pty; run in its group.
    term = Terminal(["/bin/sh", "-c", script], cwd=tmp_path)
    try:
        term.read_until(b"run exited", timeout=60)
        term.wait()
    finally:
        term.close()
    assert b"run exited 0" in term.output, term.text
    expected = ["ready", *(str(int(s)) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2))]
    assert _lines(log) == expected, term.text
