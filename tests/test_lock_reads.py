"""Whether a lock is held, answered without the kernel's whole lock table where we can.

Reading /proc/locks takes the kernel's file-lock rwsem for writing: the read waits for
an RCU grace period (10-30 ms of wall time per process on the machines measured) and
every flock() on the host waits with it. Our own locks are asked of our own fds
(``flock_held``), a live instance's slot of its recorded process (``OpenFiles.holds_flock``);
the table is read only when neither can tell (a dead holder, another user's process).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import hold_port_lock, portpool, wait_for, write_layout

from portpool import _heldlock
from portpool import _platform as plat
from portpool._heldlock import HeldLock
from portpool.statedir import StateDir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux fdinfo")

# A child that takes the lock, says so, and holds it until its stdin closes.
HOLD = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)
# The same, with a second file open and not locked: it must not vouch for that one.
DECOY = "import os, sys\nunlocked = os.open(sys.argv[2], os.O_RDWR)\n" + HOLD


def test_flock_held_follows_our_own_fd(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    st = os.fstat(fd)
    try:
        assert plat.try_lock(fd)
        assert plat.flock_held(fd, st.st_dev, st.st_ino) is True
        fcntl.flock(fd, fcntl.LOCK_UN)  # the file stays open: only the lock is gone
        assert plat.flock_held(fd, st.st_dev, st.st_ino) is False
    finally:
        os.close(fd)


def test_a_lock_fd_closed_and_reused_for_another_locked_file_is_lost(state: StateDir) -> None:
    a = HeldLock.acquire(state.ports(), "1.lock")
    b = HeldLock.acquire(state.ports(), "2.lock")
    try:
        assert a.problem() is None
        os.dup2(b.fd, a.fd)  # library code closed a's fd; the number now holds b's file
        assert a.problem() == "lock file 1.lock is no longer locked by the kernel"
        assert b.problem() is None
    finally:
        reused, a.fd = a.fd, -1  # the number is b's file now: a has nothing to release
        os.close(reused)
        a.release()
        b.release()


def test_open_files_confirm_only_the_process_that_holds_that_files_lock(tmp_path: Path) -> None:
    path, other = tmp_path / "x.lock", tmp_path / "y.lock"
    path.touch()
    other.touch()
    st, st_other = path.stat(), other.stat()
    where, where_other = os.path.realpath(path), os.path.realpath(other)
    mine = os.open(path, os.O_RDWR)  # open here too, without the lock
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    # A process holding another file's lock while it has this one open, unlocked.
    decoy = subprocess.Popen(
        [sys.executable, "-c", DECOY, str(other), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for proc in (child, decoy):
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "held"
        files = plat.OpenFiles()
        assert files.holds_flock(child.pid, where, st.st_dev, st.st_ino)
        assert not files.holds_flock(os.getpid(), where, st.st_dev, st.st_ino)
        assert not files.holds_flock(decoy.pid, where, st.st_dev, st.st_ino)
        assert files.holds_flock(decoy.pid, where_other, st_other.st_dev, st_other.st_ino)
        assert not files.holds_flock(child.pid, where, st.st_dev, st.st_ino + 1)
        assert not files.holds_flock(2**31 - 1, where, st.st_dev, st.st_ino)  # no such pid
    finally:
        os.close(mine)
        child.communicate("", timeout=30)
        decoy.communicate("", timeout=30)
    assert not plat.OpenFiles().holds_flock(child.pid, where, st.st_dev, st.st_ino)


@pytest.mark.parametrize("source", ["own fd", "lock table"])
def test_a_lock_unlocked_behind_our_back_is_a_problem(
    state: StateDir, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    if source == "lock table":  # where fdinfo cannot tell (an older kernel, macOS)
        monkeypatch.setattr(_heldlock, "flock_held", lambda fd, device, inode: None)
    held = HeldLock.acquire(state.ports(), "7.lock")
    try:
        assert held.problem() is None
        fcntl.flock(held.fd, fcntl.LOCK_UN)  # e.g. a forked child sharing the open file
        assert held.problem() == "lock file 7.lock is no longer locked by the kernel"
    finally:
        held.release()


# Runs the CLI in this interpreter and says on stderr each time /proc/locks is opened.
AUDITED_CLI = """\
import os, sys
def hook(event, args):
    if event == "open" and args and str(args[0]) == "/proc/locks":
        os.write(2, b"READ /proc/locks\\n")
sys.addaudithook(hook)
from portpool.cli import main
sys.argv = ["portpool", *sys.argv[1:]]
main()
"""


def _audited(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", AUDITED_CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_run_and_status_of_live_instances_never_read_the_lock_table(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_layout(tmp_path / "l.toml", port_base, shield=0.05)
    holders = [
        subprocess.Popen(
            [sys.executable, "-m", "portpool.cli", "run", "-c", str(config), "--", "sleep", "30"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in holders:
            assert proc.stderr is not None
            assert "instance" in proc.stderr.readline()  # its ports are announced
        status = _audited("status", "--json", "-c", str(config))
        assert status.returncode == 0, status.stderr
        assert status.stdout.count('"alive":true') == 2, status.stdout
        assert "READ /proc/locks" not in status.stderr
        # A run whose shield checks a few times (every 0.05 s) and then releases.
        run = _audited("run", "-q", "-c", str(config), "--", "sleep", "0.5")
        assert run.returncode == 0, run.stderr
        assert "READ /proc/locks" not in run.stderr
    finally:
        for proc in holders:
            proc.terminate()
            proc.communicate(timeout=30)


def test_status_of_a_dead_instance_still_asks_the_lock_table(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    config = write_layout(tmp_path / "l.toml", port_base)
    proc = subprocess.Popen(
        [sys.executable, "-m", "portpool.cli", "run", "-c", str(config), "--", "sleep", "30"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "instance" in proc.stderr.readline()
    proc.kill()  # its record stays; the kernel freed its locks
    proc.wait(timeout=30)
    status = _audited("status", "--json", "-c", str(config))
    assert status.returncode == 0, status.stderr
    assert '"alive":false' in status.stdout, status.stdout
    assert "READ /proc/locks" in status.stderr  # no live process could vouch for it


def test_logs_follow_asks_the_running_up_not_the_lock_table(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    serve = "import socket, time\ns = socket.socket(fileno=3)\nprint('hello', flush=True)\n"
    serve += "time.sleep(60)\n"
    services = {"web": {"command": [sys.executable, "-c", serve], "ready": "none"}}
    config = write_layout(tmp_path / "portpool.toml", port_base, services=services)
    up = portpool("up", "--detach", "-c", str(config), cwd=tmp_path, timeout=60)
    assert up.returncode == 0, up.stderr
    follower = subprocess.Popen(
        [sys.executable, "-c", AUDITED_CLI, "logs", "-f", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        time.sleep(1.5)  # a few of its checks (every 0.2 s) that the up still runs
        stopped = portpool("stop", "-c", str(config), cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert "web | hello" in out  # it followed the log until the instance stopped
        assert "READ /proc/locks" not in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        portpool("stop", "--all", "-c", str(config), cwd=tmp_path)


def test_a_lock_an_incomplete_table_does_not_list_is_asked_of_the_file(state: StateDir) -> None:
    # A table read while locks kept changing may lack a lock held throughout: what it
    # lacks is neither held nor free until the file itself says.
    ports = state.ports()
    for name in ("1.lock", "2.lock"):
        os.close(ports.open_file(name, os.O_RDWR | os.O_CREAT))
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, os.path.join(ports.path, "1.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        incomplete = plat.LockTable(complete=False)
        assert incomplete.holds(1, 2) is None
        assert plat.LockTable().holds(1, 2) is False
        assert _heldlock.is_held(ports, "1.lock", incomplete)
        assert not _heldlock.is_held(ports, "2.lock", incomplete)
    finally:
        child.communicate("", timeout=30)


# Takes and drops batches of flocks on its own files (argv[1]: how many) in a temporary
# directory (argv[2]) until its stdin closes or 60 s pass; prints how many batches.
CHURN = """\
import fcntl, os, random, sys, threading, time
count, where = int(sys.argv[1]), sys.argv[2]
names = [os.path.join(where, f"{os.getpid()}-{i}") for i in range(count)]
fds = [os.open(name, os.O_RDWR | os.O_CREAT) for name in names]
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("churning", flush=True)
batches, end = 0, time.monotonic() + 60
while not done.is_set() and time.monotonic() < end:
    batch = fds[: random.randint(count // 2, count)]
    for fd in batch:
        fcntl.flock(fd, fcntl.LOCK_EX)
    time.sleep(random.random() * 0.01)
    for fd in batch:
        fcntl.flock(fd, fcntl.LOCK_UN)
    batches += 1
print(batches, flush=True)
"""


def test_a_held_port_never_reads_free_while_other_locks_come_and_go(
    state: StateDir, tmp_path: Path
) -> None:
    # /proc/locks is read a page at a time, each page resuming by position: a lock
    # released ahead of that position between two pages hid one held throughout, and
    # a held port read as "free" (once in a parallel test run; 1 read in 25 here).
    from benchmarks._common import read_proc_locks

    from portpool._portstatus import inspect_port

    port = 40124
    holder = hold_port_lock(port)
    churn = tmp_path / "churn"
    churn.mkdir()
    churners = [
        subprocess.Popen(
            [sys.executable, "-c", CHURN, "60", str(churn)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        for churner in churners:
            assert churner.stdout is not None and churner.stdout.readline() == "churning\n"
        # Many pages of locks: 240 lines of ~50 bytes, at ~80 a page.
        wait_for(lambda: len(read_proc_locks()) >= 240, timeout=30)
        seen = [inspect_port(state, port) for _ in range(300)]
        assert [s for s in seen if s.is_free] == []
    finally:
        outs = [proc.communicate(timeout=60)[0] for proc in [*churners, holder]]
    # Every churner took and dropped locks meanwhile.
    assert all(int(out.split()[-1]) > 0 for out in outs[:-1]), outs
