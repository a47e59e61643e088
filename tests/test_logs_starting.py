"""`portpool logs` of a detached instance that is still starting, and of one whose
`up --detach` was killed before it was up: its log is found, shown and followed.

A new user's trial: a slow service, `up --detach` in the background, `logs -f` while it
starts said "it was not started with --detach" (exit 1), and so did every `logs` for the
whole life of an instance whose `up --detach` was killed before "is up"."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import (
    HOLD,
    PORTPOOL,
    kill_if_running,
    portpool,
    read_line,
    start,
    status_json,
    wait_for,
    write_layout,
)

# Says it warms up, then waits for the test's release file (60 s at most) before the
# line its readiness waits for: the instance stays "starting" until the test says.
SLOW = """\
import os, sys, time
print("warming up", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
print("ready to serve", flush=True)
time.sleep(600)
"""

NOT_DETACHED = "instance 1 of testapp has no log (it was not started with --detach)"


def _slow_layout(tmp_path: Path, port_base: int, release: Path) -> Path:
    web = {
        "command": [sys.executable, "-c", SLOW, str(release)],
        "ready": "log:ready to serve",
        "ready_timeout_s": 120,
    }
    return write_layout(tmp_path / "portpool.toml", port_base, services={"web": web})


def _warming_up(home: Path, detach_pid: int) -> bool:
    """The service runs and said so (in the log `up --detach` started it with): the
    instance has its record and is starting."""
    log = home / "apps" / "testapp" / "logs" / f".starting-{detach_pid}.log"
    return log.exists() and "warming up" in log.read_text()


def _start_warming_up(
    tmp_path: Path, port_base: int, home: Path
) -> tuple[Path, subprocess.Popen[str]]:
    """A slow instance 1 started with `up --detach`, once its service runs (still
    starting): the release file, touched, lets it get up; and the waiting `up --detach`."""
    release = tmp_path / "release"
    _slow_layout(tmp_path, port_base, release)
    detach = start("up", "--detach", cwd=tmp_path)
    try:
        wait_for(lambda: _warming_up(home, detach.pid), timeout=30)
    except BaseException:
        kill_if_running(detach)
        raise
    return release, detach


class _Follower:
    """``portpool logs -f ...`` running, its output read as it comes (from the pipe
    itself: a line already in a file object's buffer is not seen by select)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [*PORTPOOL, "logs", "-f", *args], stdout=subprocess.PIPE, cwd=cwd
        )
        self.seen = b""

    def until(self, text: str, timeout: float = 30.0) -> str:
        """Everything it printed so far, once that holds ``text`` (a bounded wait)."""
        assert self.proc.stdout is not None
        fd, deadline = self.proc.stdout.fileno(), time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            assert ready, f"no {text!r} within {timeout} s: {self.seen!r}"
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"it ended before {text!r}: {self.seen!r}"
            self.seen += chunk
        return self.seen.decode()


def test_logs_and_logs_follow_show_an_instance_while_it_starts(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    release, detach = _start_warming_up(tmp_path, port_base, home)
    follower: _Follower | None = None
    try:
        [starting] = status_json(tmp_path / "portpool.toml")["instances"]
        assert starting["number"] == 1 and detach.poll() is None  # not up yet

        for args in (["logs"], ["logs", "--instance", "1"], ["logs", "web"]):
            shown = portpool(*args, cwd=tmp_path)
            assert shown.returncode == 0, (args, shown.stderr)
            assert "web | warming up" in shown.stdout, args
            assert "is up" not in shown.stdout

        follower = _Follower("--instance", "1", cwd=tmp_path)
        assert "web | warming up" in follower.until("warming up")
        release.touch()
        # It follows the start through "is up": the log moved to 1.log under it.
        followed = follower.until("portpool: instance 1 of testapp is up")
        assert "web | ready to serve" in followed
        out, err = detach.communicate(timeout=60)
        assert detach.returncode == 0, err
        assert "instance 1 of testapp is up" in out
        assert follower.proc.poll() is None  # still following the running instance

        stopped = portpool("stop", "1", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert follower.proc.wait(timeout=30) == 0  # -f ends with the instance
        after = portpool("logs", "--instance", "1", cwd=tmp_path)
        assert "web | warming up" in after.stdout and "stopped" in after.stdout
    finally:
        kill_if_running(detach)
        if follower is not None:
            kill_if_running(follower.proc)
        portpool("stop", "--all", cwd=tmp_path)


def test_logs_follow_an_instance_whose_up_detach_was_killed_before_it_was_up(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    release, detach = _start_warming_up(tmp_path, port_base, home)
    follower: _Follower | None = None
    try:
        detach.kill()  # kill -9 of the waiting `up --detach`: its background up goes on
        detach.wait(timeout=30)

        shown = portpool("logs", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert "web | warming up" in shown.stdout
        follower = _Follower(cwd=tmp_path)
        follower.until("web | warming up")
        release.touch()
        follower.until("portpool: instance 1 of testapp is up")

        # Up, with nobody to move its log: it is still this instance's, plain or -f.
        [up] = status_json(tmp_path / "portpool.toml")["instances"]
        assert up["alive"]
        again = portpool("logs", "web", "--instance", "1", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines() == ["web | warming up", "web | ready to serve"]

        stopped = portpool("stop", "1", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert follower.proc.wait(timeout=30) == 0
    finally:
        kill_if_running(detach)
        if follower is not None:
            kill_if_running(follower.proc)
        portpool("stop", "--all", cwd=tmp_path)

    # That log is its up's alone: an attached instance on the same number has none.
    holder = start("run", "--", sys.executable, "-c", HOLD, str(tmp_path / "free"), cwd=tmp_path)
    try:
        assert read_line(holder) == "1\n"
        for args in (["logs"], ["logs", "-f"]):
            done = portpool(*args, cwd=tmp_path, timeout=20)
            assert (done.returncode, done.stdout) == (1, ""), (args, done.stderr)
            assert NOT_DETACHED in done.stderr, args
    finally:
        (tmp_path / "free").touch()
        holder.wait(timeout=30)


# A first detached instance 1, started and stopped: its `1.log` is what `logs` showed
# instead of the next instance 1's, whose `up --detach` was killed before it was up.
FIRST = "import time; print('first instance', flush=True); time.sleep(600)"


def _first_instance_stopped(tmp_path: Path, port_base: int) -> None:
    web = {"command": [sys.executable, "-c", FIRST], "ready": "log:first instance"}
    write_layout(tmp_path / "portpool.toml", port_base, services={"web": web})
    done = portpool("up", "--detach", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert portpool("stop", "1", cwd=tmp_path).returncode == 0
    assert "web | first instance" in portpool("logs", cwd=tmp_path).stdout


def _detach_killed_while_warming_up(tmp_path: Path, port_base: int, home: Path) -> Path:
    """A slow instance 1 started with `up --detach`, which is killed -9 once the service
    runs: its background up goes on. The release file, touched, lets it get up."""
    release, detach = _start_warming_up(tmp_path, port_base, home)
    detach.kill()
    detach.wait(timeout=30)
    return release


def _logs_of_this_instance(tmp_path: Path, home: Path) -> str:
    """`logs` of the stopped instance 1: this one's output, never the first one's, and
    kept where `logs` looks (`1.log`, not a starting log)."""
    for args in (["logs"], ["logs", "-f"], ["logs", "--instance", "1"]):
        shown = portpool(*args, cwd=tmp_path, timeout=30)
        assert shown.returncode == 0, (args, shown.stderr)
        assert "web | warming up" in shown.stdout, (args, shown.stdout)
        assert "first instance" not in shown.stdout, (args, shown.stdout)
    logs = home / "apps" / "testapp" / "logs"
    assert "web | warming up" in (logs / "1.log").read_text()
    assert not list(logs.glob(".starting-*")), list(logs.iterdir())
    return shown.stdout


def test_logs_after_stop_show_the_instance_whose_up_detach_was_killed_before_it_was_up(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # The trial: `portpool up --detach & sleep 2; kill -9 $!`, the instance up a few
    # seconds later, then `stop` and `logs`: the previous instance 1's log was shown.
    _first_instance_stopped(tmp_path, port_base)
    release = _detach_killed_while_warming_up(tmp_path, port_base, home)
    try:
        release.touch()
        wait_for(lambda: "is up" in portpool("logs", cwd=tmp_path).stdout, timeout=60)
        # Its up moved its log itself before it said so: `1.log` from then on.
        logs = home / "apps" / "testapp" / "logs"
        assert "web | ready to serve" in (logs / "1.log").read_text()
        assert not list(logs.glob(".starting-*")), list(logs.iterdir())
        stopped = portpool("stop", "1", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
    finally:
        portpool("stop", "--all", cwd=tmp_path)
    shown = _logs_of_this_instance(tmp_path, home)
    assert "web | ready to serve" in shown
    assert "portpool: instance 1 of testapp is up" in shown


def test_logs_after_stop_show_an_instance_stopped_while_starting_after_its_up_detach_died(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Never up: `stop` while its service still warms up, nobody left to move its log.
    _first_instance_stopped(tmp_path, port_base)
    _detach_killed_while_warming_up(tmp_path, port_base, home)
    try:
        [starting] = status_json(tmp_path / "portpool.toml")["instances"]
        assert starting["alive"] and starting["number"] == 1
        stopped = portpool("stop", "1", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
    finally:
        portpool("stop", "--all", cwd=tmp_path)
    shown = _logs_of_this_instance(tmp_path, home)
    assert "is up" not in shown and "ready to serve" not in shown


def test_logs_in_a_checkout_whose_detached_instance_stopped_show_its_own_log_only(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`logs` in checkout A, whose `up --detach` instance 2 was stopped, while another
    checkout's instance (not detached) was the only one running: it said "instance 3
    ... has no log (it was not started with --detach)", which is that checkout's, and
    never showed A's; with two others running it listed them. Once another checkout's
    detached instance had number 2 since, its log is not A's to show."""
    hello = "import os, time; print('hello from', os.getcwd(), flush=True); time.sleep(120)"
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        service = {"command": [sys.executable, "-c", hello], "ready": "log:hello from"}
        write_layout(tmp_path / name / "portpool.toml", port_base, services={"web": service})
    attached: list[subprocess.Popen[str]] = []

    def up(checkout: str, number: int, *detach: str) -> None:
        if detach:
            done = portpool("up", *detach, "--instance", str(number), cwd=tmp_path / checkout)
            assert done.returncode == 0, done.stderr
            return
        attached.append(start("up", "--instance", str(number), cwd=tmp_path / checkout))
        config = tmp_path / checkout / "portpool.toml"
        wait_for(lambda: number in [i["number"] for i in status_json(config)["instances"]])

    def logs_of_a() -> subprocess.CompletedProcess[str]:
        return portpool("logs", cwd=tmp_path / "a")

    try:
        up("a", 2, "--detach")
        assert portpool("stop", cwd=tmp_path / "a").returncode == 0
        up("b", 3)
        shown = logs_of_a()
        assert shown.returncode == 0, shown.stderr
        assert f"web | hello from {tmp_path / 'a'}" in shown.stdout
        up("c", 4)  # two others run now
        assert f"web | hello from {tmp_path / 'a'}" in logs_of_a().stdout
        theirs = portpool("logs", cwd=tmp_path / "b")  # b's own: its instance has no log
        assert theirs.returncode == 1 and "instance 3 of testapp has no log" in theirs.stderr
        assert portpool("stop", "--all", cwd=tmp_path / "b").returncode == 0
        up("b", 2, "--detach")  # b's detached instance 2 replaces 2.log
        assert portpool("stop", "2", cwd=tmp_path / "b").returncode == 0
        up("c", 4)
        shown = logs_of_a()  # not b's log, as if it were a's
        assert shown.returncode == 1 and "hello from" not in shown.stdout, shown.stdout
        assert "instance 4 of testapp has no log" in shown.stderr, shown.stderr
    finally:
        portpool("stop", "--all", cwd=tmp_path / "a")
        for proc in attached:
            kill_if_running(proc)


def test_logs_with_nothing_running_never_shows_another_checkouts_log_as_this_ones(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """X's detached instance 1 stopped, then Y's: nothing runs, and `logs` in X showed
    Y's log (number 1 is X's last) as X's. A log whose owner file names no checkout (an
    older portpool wrote it) is still shown, as before."""
    hello = "import os, time; print('hello from', os.getcwd(), flush=True); time.sleep(120)"
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        service = {"command": [sys.executable, "-c", hello], "ready": "log:hello from"}
        write_layout(tmp_path / name / "portpool.toml", port_base, services={"web": service})
        up = portpool("up", "--detach", cwd=tmp_path / name)
        assert up.returncode == 0 and " instance 1 " in up.stdout, up.stderr
        assert portpool("stop", cwd=tmp_path / name).returncode == 0
    shown = portpool("logs", cwd=tmp_path / "x")
    assert shown.returncode == 1 and "hello from" not in shown.stdout, shown.stdout
    assert shown.stderr == (
        "portpool: error: instance 1 of testapp is not running, and its last log is "
        f"another checkout's ({tmp_path / 'y'})\n"
    )
    assert portpool("logs", cwd=tmp_path / "y").returncode == 0  # Y's own
    owner = home / "apps" / "testapp" / "logs" / "1.owner.json"
    written = json.loads(owner.read_text())
    owner.write_text(json.dumps({k: v for k, v in written.items() if k != "dir"}))
    older = portpool("logs", cwd=tmp_path / "x")
    assert older.returncode == 0 and f"hello from {tmp_path / 'y'}" in older.stdout


def test_logs_of_an_up_detach_that_failed_before_it_was_up_names_its_output(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # `logs` said only "has no log (only `portpool up --detach` writes one)" of an
    # instance whose up --detach had just failed, its output left at .starting-<pid>.log.
    failing = {"command": ["sh", "-c", "echo boom; exit 3"], "ready": "tcp"}
    write_layout(tmp_path / "portpool.toml", port_base, services={"web": failing})
    done = portpool("up", "--detach", cwd=tmp_path)
    assert done.returncode == 5, done.stderr
    left = done.stderr.partition("(log: ")[2].partition(")")[0]
    assert left.endswith(".log") and "boom" in Path(left).read_text(), done.stderr
    shown = portpool("logs", cwd=tmp_path)
    assert shown.returncode == 1, shown.stdout
    assert "instance 1 of testapp is not running and has no log" in shown.stderr
    assert f"failed before it was up left its output in {left})" in shown.stderr
