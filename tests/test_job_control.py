"""``run`` started as a background job of an interactive shell (``run ... &``): its
command is in a process group of its own, and ``run`` keeps the two one job, as the
shell sees them: stopped together, continued together, the terminal handed on by ``fg``.

Real bash in a pseudo-terminal, real job control."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.helpers import PORTPOOL, Terminal, write_layout

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX job control"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="job control of an interactive bash"),
]

# Reads lines from the terminal and echoes each; "end" ends it with status 7.
ECHO_LINES = """
import sys
print("reading", flush=True)
for line in sys.stdin:
    if line.strip() == "end":
        sys.exit(7)
    print("got-" + line.strip(), flush=True)
"""


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(["env", "PS1=SH$ ", "bash", "--norc", "--noprofile", "-i"], cwd=tmp_path)
    term.read_until(b"SH$ ", timeout=30)
    yield term
    # Jobs left in the background have groups of their own: the shell's kill misses them.
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(term.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    term.close()


def _start_in_background(shell: Terminal, tmp_path: Path, port_base: int) -> None:
    config = write_layout(tmp_path / "run.toml", port_base)
    script = tmp_path / "echo_lines.py"
    script.write_text(ECHO_LINES)
    run = shlex.join([*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, str(script)])
    os.write(shell.master, f"{run} &\n".encode())
    shell.read_until(b"reading", timeout=60)


def _type(shell: Terminal, *lines: str, expect: str) -> None:
    """Type each of ``lines`` and Enter, then wait (30 s at most) for ``expect``."""
    for line in lines:
        os.write(shell.master, f"{line}\n".encode())
    shell.read_until(expect.encode(), timeout=30)


def _await_job(shell: Terminal, state: str) -> str:
    """Ask bash's ``jobs -l`` (unlike ``jobs``, it names the signal) until job 1 is in
    ``state`` (``Running``, ``Stopped (tty input)``, ...), for at most 15 s; returns the
    last answer."""
    found = ""
    for attempt in range(30):
        mark = f"mark-{state[:4]}-{attempt}"
        os.write(shell.master, f"jobs -l; echo {mark}\n".encode())
        text = shell.read_until(f"\n{mark}".encode(), timeout=30).decode(errors="replace")
        answer = text.split(f"jobs -l; echo {mark}")[-1]
        states = re.findall(r"\[1\]\+?\s+\d+\s+(\w[\w ()]*?)\s{2,}", answer)
        found = states[-1] if states else ""
        if found == state:
            break
        time.sleep(0.5)
    return found


def test_a_background_run_whose_command_reads_the_terminal_stops_as_one_job(
    tmp_path: Path, port_base: int, home: Path, shell: Terminal
) -> None:
    """`run ... &` whose command reads the terminal: the kernel stops the command (SIGTTIN).
    The job, ``run``, ran on: bash said "Running", and ``fg`` gave the terminal to run's
    group, not the command's, which stayed stopped: a hang. Now run stops as the command
    did, and ``fg`` hands the terminal on and continues the command."""
    _start_in_background(shell, tmp_path, port_base)
    assert _await_job(shell, "Stopped (tty input)") == "Stopped (tty input)", shell.text
    _type(shell, "fg", "hello", expect="got-hello")
    _type(shell, "end", "echo status-$?", expect="status-7")


def test_ctrl_z_then_fg_and_bg_keep_the_command_and_run_one_job(
    tmp_path: Path, port_base: int, home: Path, shell: Terminal
) -> None:
    """After ``fg`` the command's group has the terminal: a Ctrl-Z stops it, and run
    stops with it, so bash takes the terminal back ("Stopped") instead of waiting on a
    job it thinks runs. ``bg`` then continues both; ``fg`` gives the terminal back."""
    _start_in_background(shell, tmp_path, port_base)
    _type(shell, "fg", "one", expect="got-one")
    os.write(shell.master, b"\x1a")  # Ctrl-Z
    shell.read_until(b"Stopped", timeout=30)
    assert _await_job(shell, "Stopped") == "Stopped", shell.text
    os.write(shell.master, b"bg\n")
    # Continued in the background, it reads the terminal again: stopped again, as one job.
    assert _await_job(shell, "Stopped (tty input)") == "Stopped (tty input)", shell.text
    _type(shell, "fg", "two", expect="got-two")
    _type(shell, "end", "echo status-$?", expect="status-7")
    # The terminal is the shell's again: a command it runs next reads it.
    _type(shell, "read -r x; echo read-$x", "back", expect="read-back")


# Logs SIGTERM and SIGCONT as they come (TERM ends it with status 43), then reads the
# terminal.
SIGNAL_LOG = """
import os, signal, sys
log = sys.argv[1]
def note(name):
    with open(log, "a") as f:
        f.write(name + "\\n")
def term(*_):
    note("TERM")
    os._exit(43)
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGCONT, lambda *_: note("CONT"))
print("reading", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("attempt", range(3))  # a race: about 1 in 4 showed it
def test_kill_of_a_job_stopped_on_a_read_gives_the_command_its_signal_before_sigcont(
    tmp_path: Path, port_base: int, home: Path, shell: Terminal, attempt: int
) -> None:
    """`kill %1` of a stopped job sends SIGTERM, then SIGCONT: a bare command acts on
    the SIGTERM. run, continued, resumed its command at once, before passing the
    SIGTERM on: the command read the terminal and was stopped again first (a hangup
    the same way: SIGCONT, then SIGHUP)."""
    config = write_layout(tmp_path / "run.toml", port_base)
    script, log = tmp_path / "signal_log.py", tmp_path / "signals.log"
    script.write_text(SIGNAL_LOG)
    run = shlex.join(
        [*PORTPOOL, "run", "-q", "-c", str(config), "--", sys.executable, str(script), str(log)]
    )
    os.write(shell.master, f"{run} &\n".encode())
    shell.read_until(b"reading", timeout=60)
    assert _await_job(shell, "Stopped (tty input)") == "Stopped (tty input)", shell.text
    os.write(shell.master, b"kill %1\n")
    assert _await_job(shell, "Exit 43") == "Exit 43", shell.text
    assert log.read_text().split() == ["TERM"], shell.text
