"""Many real processes racing for one small pool: exclusivity, winner counts, refusals.

Racers are long-lived subprocesses driven round by round over their stdin/stdout, so
a round costs acquires, not interpreter start-ups. They are released together by a
flock barrier: each racer blocks on a shared lock of a file the test holds exclusively,
and the test unlocks it once the kernel shows every racer waiting (/proc/locks), so all
of them wake in the same instant. The observer (this test) looks only through channels
that cannot perturb the racers: /proc/locks via ``inspect_port`` and bind attempts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks._common import read_proc_locks

from portpool._portstatus import inspect_port
from portpool.statedir import StateDir

POOL_SIZE = 3

RACER = r"""
import fcntl, json, os, sys
from portpool.errors import PoolExhausted
from portpool._record import read_port_record
from portpool.pool import acquire
from portpool.statedir import StateDir

pool = json.loads(sys.argv[1])
barrier = os.open(sys.argv[2], os.O_RDONLY)
state = StateDir.open()

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

say({"ready": os.getpid()})
for line in sys.stdin:
    if line.strip() == "quit":
        break
    fcntl.flock(barrier, fcntl.LOCK_SH)  # blocks until the test opens the barrier
    fcntl.flock(barrier, fcntl.LOCK_UN)
    lease = None
    try:
        lease = acquire(state, pool, app="race", instance=1, service="racer")
    except PoolExhausted as e:
        say({"lost": [[r.port, r.reason, r.detail] for r in e.refusals]})
    else:
        # The winner's own view: the record at its port names it.
        rec = read_port_record(state.ports(), lease.port)
        say({"won": lease.port, "record_pid": rec.pid if rec else None})
    sys.stdin.readline()  # "release"
    if lease is not None:
        lease.release()
    say({"released": True})
"""


class Racer:
    """One racing subprocess and its line protocol."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def _read_lines(racers: list[Racer], timeout_s: float = 60.0) -> dict[int, dict[str, object]]:
    """One JSON line from every racer (bounded in time)."""
    sel = selectors.DefaultSelector()
    for r in racers:
        assert r.proc.stdout is not None
        sel.register(r.proc.stdout, selectors.EVENT_READ, r)
    got: dict[int, dict[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(racers):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} of {len(racers)} racers answered"
        for key, _ in sel.select(remaining):
            racer: Racer = key.data
            line = key.fileobj.readline()  # type: ignore[union-attr]
            assert line, f"racer {racer.pid} died: exit {racer.proc.poll()}"
            got[racer.pid] = json.loads(line)
            sel.unregister(key.fileobj)
    sel.close()
    return got


def _waiters_on(inode: int) -> int:
    return sum(1 for lock in read_proc_locks() if lock.waiting and lock.ino == inode)


def _wait_all_blocked(barrier_fd: int, n: int, timeout_s: float = 20.0) -> None:
    """Until the kernel shows ``n`` processes waiting on the barrier (Linux), bounded."""
    if not sys.platform.startswith("linux"):
        time.sleep(0.2)
        return
    inode = os.fstat(barrier_fd).st_ino
    deadline = time.monotonic() + timeout_s
    while _waiters_on(inode) < n:
        assert time.monotonic() < deadline, "racers never all reached the barrier"
        time.sleep(0.002)


@contextlib.contextmanager
def racers_for(pool: list[int], n: int, tmp: Path) -> Iterator[tuple[list[Racer], int]]:
    barrier_path = tmp / "barrier"
    barrier_path.touch()
    barrier = os.open(barrier_path, os.O_RDWR)
    racers = [
        Racer(
            subprocess.Popen(
                [sys.executable, "-c", RACER, json.dumps(pool), str(barrier_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        for _ in range(n)
    ]
    try:
        _read_lines(racers)  # every racer imported portpool and opened the state dir
        yield racers, barrier
    finally:
        for r in racers:
            with contextlib.suppress(OSError):
                r.send("quit")
                assert r.proc.stdin is not None
                r.proc.stdin.close()  # EOF ends a racer wherever it waits
        for r in racers:
            try:
                r.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
        os.close(barrier)


def _bind_fails(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    finally:
        s.close()
    return False


def _run_rounds(state: StateDir, pool: list[int], racers: list[Racer], barrier: int, rounds: int):
    pids = {r.pid for r in racers}
    for rnd in range(rounds):
        fcntl.flock(barrier, fcntl.LOCK_EX)
        for r in racers:
            r.send("go")
        _wait_all_blocked(barrier, len(racers))
        fcntl.flock(barrier, fcntl.LOCK_UN)  # every racer wakes at once
        results = _read_lines(racers)

        winners = {pid: res["won"] for pid, res in results.items() if "won" in res}
        losers = {pid: res["lost"] for pid, res in results.items() if "lost" in res}
        assert len(winners) + len(losers) == len(racers)
        assert len(winners) == min(POOL_SIZE, len(racers)), (rnd, results)
        # Never two holders of one port: winners' ports are distinct...
        assert len(set(winners.values())) == len(winners), (rnd, winners)
        for pid, port in winners.items():
            assert results[pid]["record_pid"] == pid
            # ...and, seen from outside while they hold, each is held by exactly its winner.
            status = inspect_port(state, port)
            assert status.state == "held", (rnd, port, status)
            assert status.record is not None
            assert status.record.pid == pid
            assert status.record.pid in pids
            assert _bind_fails(port), f"round {rnd}: port {port} is held but bindable"
        for refusals in losers.values():
            assert [p for p, _, _ in refusals] == pool
            assert all(reason == "held" for _, reason, _ in refusals), refusals

        for r in racers:
            r.send("release")
        assert all(res == {"released": True} for res in _read_lines(racers).values())
        for port in pool:
            assert inspect_port(state, port).is_free, (rnd, port)


@pytest.mark.slow
def test_32_racers_for_3_ports_many_rounds(state: StateDir, port_base: int, tmp_path: Path):
    pool = list(range(port_base, port_base + POOL_SIZE))
    with racers_for(pool, 32, tmp_path) as (racers, barrier):
        _run_rounds(state, pool, racers, barrier, rounds=100)


def test_fewer_racers_than_ports_all_win(state: StateDir, port_base: int, tmp_path: Path):
    pool = list(range(port_base, port_base + POOL_SIZE))
    with racers_for(pool, 2, tmp_path) as (racers, barrier):
        _run_rounds(state, pool, racers, barrier, rounds=10)


CHURNER = r"""
import os, random, sys, time
from portpool.errors import PoolExhausted
from portpool._record import read_port_record
from portpool.pool import acquire
from portpool.statedir import StateDir

pool = [int(p) for p in sys.argv[1].split(",")]
log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)
state = StateDir.open()
rng = random.Random(os.getpid())
wins = 0
for _ in range(int(sys.argv[3])):
    try:
        lease = acquire(state, pool, app="churn", instance=1, service="c")
    except PoolExhausted:
        continue
    wins += 1
    # Logged after acquiring and before releasing: a logged interval lies inside the
    # real holding time, so two overlapping logged intervals mean a real double holder.
    os.write(log, b"+ %d %d\n" % (lease.port, os.getpid()))
    time.sleep(rng.random() * 0.001)
    # While we hold it, nobody else may touch our port's record (a racer that wrongly
    # got the lock would erase it when its bind fails).
    try:
        mine = read_port_record(state.ports(), lease.port).pid == os.getpid()
    except (ValueError, AttributeError):
        mine = False
    if not mine:
        os.write(log, b"! %d %d\n" % (lease.port, os.getpid()))
    os.write(log, b"- %d %d\n" % (lease.port, os.getpid()))
    lease.release()
print(wins)
"""


def test_churn_never_two_holders(home: Path, port_base: int, tmp_path: Path):
    """Processes acquiring and releasing at random: the log never shows two holders."""
    pool = [port_base, port_base + 1]
    log = tmp_path / "log"
    log.touch()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHURNER, ",".join(map(str, pool)), str(log), "300"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    wins = 0
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        wins += int(out)
    holder: dict[int, int] = {}
    events = log.read_text().split("\n")[:-1]
    assert not [e for e in events if e.startswith("!")], "a holder's record was touched"
    assert len(events) == 2 * wins
    assert wins > 300  # there was real contention and real winning
    for event in events:
        kind, port_text, pid_text = event.split()
        port, pid = int(port_text), int(pid_text)
        if kind == "+":
            assert port not in holder, f"port {port}: {pid} won while {holder.get(port)} held"
            holder[port] = pid
        else:
            assert holder.pop(port) == pid
