"""The shield: trips once, with a reason a person can act on, when a lease stops being
ours; never trips when nothing is wrong; never fires once stopped.

Real files in a temporary state dir, real sockets, real foreign processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.conftest import find_free_block
from tests.helpers import release

from portpool._addresses import parse_address, takes_traffic
from portpool._platform import TcpSocket, locked_inodes
from portpool._portstatus import inspect_port
from portpool._record import encode_record, read_port_record
from portpool.pool import Lease, acquire
from portpool.shield import LeaseReport, Shield
from portpool.statedir import StateDir

INTERVAL_S = 0.2
DEADLINE_S = 5.0  # a trip is expected within one interval; this only bounds the wait


@dataclass
class Trips:
    """What on_lost was called with, and from which thread."""

    calls: list[tuple[Lease | None, str]] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    fired: threading.Event = field(default_factory=threading.Event)

    def __call__(self, lease: Lease | None, reason: str) -> None:
        self.calls.append((lease, reason))
        self.threads.append(threading.current_thread().name)
        self.fired.set()

    def wait(self, timeout: float = DEADLINE_S) -> tuple[Lease | None, str]:
        assert self.fired.wait(timeout), "the shield did not trip"
        return self.calls[0]


@pytest.fixture
def ports() -> int:
    """First of 30 consecutive free loopback ports in this module's range."""
    return find_free_block(size=30, low=23000, high=24000)


@pytest.fixture
def leases(state: StateDir, ports: int) -> Iterator[list[Lease]]:
    """Three leases, released at the end whatever the test did."""
    held = [
        acquire(state, [ports + i], app="test", instance=1, service=f"svc-{i}") for i in range(3)
    ]
    yield held
    for lease in held:
        lease.release()


@pytest.fixture
def trips() -> Trips:
    return Trips()


@pytest.fixture
def make_shield(trips: Trips) -> Iterator[Callable[..., Shield]]:
    """Build shields that report to ``trips``; every one is stopped at the end."""
    made: list[Shield] = []

    def make(leases: list[Lease], **kwargs: object) -> Shield:
        kwargs.setdefault("interval_s", INTERVAL_S)
        kwargs.setdefault("on_lost", trips)
        shield = Shield(leases, **kwargs)  # type: ignore[arg-type]
        made.append(shield)
        return shield

    yield make
    for shield in made:
        shield.stop(timeout=5)


# ------------------------------------------------------------------ helper processes

HOLD_PORT_LOCK = """
import os, sys
from portpool.lock import PortLock
from portpool.statedir import StateDir

state = StateDir.open(sys.argv[1])
port = int(sys.argv[2])
if sys.argv[3] == "replace":
    # Replace the lock file with a new one, the way a careless tool would.
    path = os.path.join(sys.argv[1], "ports", f"{port}.lock")
    with open(path + ".new", "w") as f:
        f.write("")
    os.replace(path + ".new", path)
# And its record: while that names its live holder, PortLock refuses the new file.
os.unlink(os.path.join(sys.argv[1], "ports", f"{port}.json"))
lock = PortLock.acquire(state, port)
lock.write_record(app="other", instance=9, service="intruder", host="127.0.0.1")
print("ready", flush=True)
sys.stdin.read()
"""

LISTEN = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack: takes IPv4 too
s.bind((host, port))
s.listen()
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def helper(*argv: str, program: str = sys.executable) -> Iterator[subprocess.Popen[str]]:
    """A helper process (``program`` with ``argv``) that prints "ready" once set up and
    lives until its stdin closes (``helpers.release``, on leaving)."""
    proc = subprocess.Popen(
        [program, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            _, err = proc.communicate(timeout=5)
            pytest.fail(f"helper {argv[:2]} failed: {line!r} {err}")
        yield proc
    finally:
        release(proc)


def wait_for_checks(shield: Shield, n: int = 3) -> None:
    """Wait until the shield's loop completed ``n`` more checks: "no trip" after a sleep
    proves nothing on a loaded machine where no check ran. Fails after DEADLINE_S."""
    target = shield.checks_completed + n
    deadline = time.monotonic() + DEADLINE_S
    while shield.checks_completed < target:
        assert time.monotonic() < deadline, f"only {shield.checks_completed} of {target} ran"
        time.sleep(INTERVAL_S / 4)


def lock_path(home: Path, port: int) -> Path:
    return home / "ports" / f"{port}.lock"


def locked_by(path: Path) -> int | None:
    """The pid that holds the kernel lock on ``path``, per the kernel."""
    table = locked_inodes()
    assert table is not None, "these tests read /proc/locks"
    st = path.stat()
    return table.get((st.st_dev, st.st_ino))


# ------------------------------------------------------------------ lock and metadata


@pytest.mark.parametrize(
    ("how", "expected"),
    [("delete", "was deleted by another process"), ("replace", "was replaced by another file")],
)
def test_lock_file_taken_over_trips_and_the_new_holders_files_survive_our_shutdown(
    home: Path,
    state: StateDir,
    leases: list[Lease],
    make_shield: Callable[..., Shield],
    trips: Trips,
    how: str,
    expected: str,
) -> None:
    victim = leases[1]
    shield = make_shield(leases)
    shield.start()
    if how == "delete":
        lock_path(home, victim.port).unlink()
        trips.wait()  # then someone else takes the port's lock: a new file at the path
    with helper("-c", HOLD_PORT_LOCK, str(home), str(victim.port), how) as other:
        lease, reason = trips.wait()
        assert lease is victim
        assert expected in reason
        assert f"{victim.port}.lock" in reason
        assert "svc-1" in reason
        assert shield.tripped == reason
        # The shutdown an instance does on a trip: release everything.
        for held in leases:
            held.release()
        # The new holder's lock file and record are untouched.
        assert locked_by(lock_path(home, victim.port)) == other.pid
        record = read_port_record(state.ports(), victim.port)
        assert record is not None
        assert (record.pid, record.app, record.service) == (other.pid, "other", "intruder")
        # Ours are gone: the kernel freed them and the records were erased.
        for held in (leases[0], leases[2]):
            assert inspect_port(state, held.port).is_free
    assert len(trips.calls) == 1


def test_metadata_rewritten_with_another_pid_trips(
    home: Path,
    state: StateDir,
    leases: list[Lease],
    make_shield: Callable[..., Shield],
    trips: Trips,
) -> None:
    victim = leases[2]
    assert victim.record is not None
    forged = dataclasses.replace(victim.record, pid=os.getppid())
    make_shield(leases).start()
    fd = os.open(home / "ports" / f"{victim.port}.json", os.O_WRONLY)
    try:
        os.pwrite(fd, encode_record(forged), 0)
    finally:
        os.close(fd)
    lease, reason = trips.wait()
    assert lease is victim
    assert f"rewritten by another process (it now names pid {os.getppid()})" in reason
    # Our lock file itself was not touched: still ours until we release it.
    assert locked_by(lock_path(home, victim.port)) == os.getpid()
    assert len(trips.calls) == 1


def test_metadata_replaced_by_a_copy_of_another_of_our_records_trips(
    home: Path,
    leases: list[Lease],
    make_shield: Callable[..., Shield],
    trips: Trips,
) -> None:
    """Our own pid and start token, but another port's record (`cp 32020.json
    32010.json`): only the pid was compared, so the shield called it ours."""
    victim, other = leases[2], leases[1]
    make_shield(leases).start()
    copy = (home / "ports" / f"{other.port}.json").read_bytes()
    fd = os.open(home / "ports" / f"{victim.port}.json", os.O_WRONLY)
    try:
        os.pwrite(fd, copy, 0)
    finally:
        os.close(fd)
    lease, reason = trips.wait()
    assert lease is victim
    assert f"replaced by another record (it now names port {other.port}" in reason
    assert len(trips.calls) == 1


def test_our_shutdown_leaves_a_record_rewritten_by_another_process(
    home: Path, state: StateDir, leases: list[Lease]
) -> None:
    victim = leases[0]
    assert victim.record is not None
    forged = dataclasses.replace(victim.record, pid=os.getppid())
    fd = os.open(home / "ports" / f"{victim.port}.json", os.O_WRONLY)
    try:
        os.pwrite(fd, encode_record(forged), 0)
    finally:
        os.close(fd)
    assert victim.lock.problem() is not None
    victim.release()  # what the instance does after the trip
    assert read_port_record(state.ports(), victim.port) == forged


# ------------------------------------------------------------------ the port


def test_foreign_listener_after_our_socket_closed_trips_naming_its_pid(
    leases: list[Lease], make_shield: Callable[..., Shield], trips: Trips
) -> None:
    victim = leases[0]
    shield = make_shield(leases)
    shield.start()
    victim.close_socket()  # handed off by number: a missing listener alone is fine
    wait_for_checks(shield)
    assert not trips.calls
    with helper("-c", LISTEN, "127.0.0.1", str(victim.port)) as foreign:
        lease, reason = trips.wait()
        assert lease is victim
        assert f"port {victim.port} is now listened on by pid {foreign.pid} (python" in reason
    assert len(trips.calls) == 1


LISTEN_V6ONLY = LISTEN.replace("IPV6_V6ONLY, 0)", "IPV6_V6ONLY, 1)")


@pytest.mark.parametrize(
    ("address", "v6only", "conflicts", "shown"),
    [
        ("127.0.0.1", False, True, "on 127.0.0.1:"),
        ("0.0.0.0", False, True, "on 0.0.0.0:"),
        ("::", False, True, "(IPv6 and IPv4)"),
        # Another user's IPv6-only wildcard cannot take IPv4 traffic: tripping on it let
        # any local user stop every instance on 127.0.0.1 (exit 4).
        ("::", True, False, ""),
        ("127.0.0.2", False, False, ""),
    ],
)
def test_which_foreign_addresses_count(
    leases: list[Lease],
    make_shield: Callable[..., Shield],
    address: str,
    v6only: bool,
    conflicts: bool,
    shown: str,
) -> None:
    victim = leases[0]
    shield = make_shield(leases)
    victim.close_socket()
    with helper("-c", LISTEN_V6ONLY if v6only else LISTEN, address, str(victim.port)) as foreign:
        report = {r.port: r for r in shield.check_once()}[victim.port]
    assert report.ok is not conflicts, report
    if conflicts:
        assert f"pid {foreign.pid}" in report.problems[0]
        assert shown in report.problems[0]


def _listener(address: str, v6only: bool | None = None, state: str = "listen") -> TcpSocket:
    return TcpSocket(6 if ":" in address else 4, address, 8000, state, v6only=v6only)


def test_address_overlap_rules() -> None:
    """The one rule the shield and doctor judge a listener by (``_addresses.meets``)."""
    assert takes_traffic(_listener("127.0.0.1"), "127.0.0.1")
    assert takes_traffic(_listener("0.0.0.0"), "127.0.0.1")
    # v6only unknown: a dual-stack wildcard may take IPv4
    assert takes_traffic(_listener("::"), "127.0.0.1")
    assert takes_traffic(_listener("::", v6only=False), "127.0.0.1")
    assert not takes_traffic(_listener("::", v6only=True), "127.0.0.1")
    assert not takes_traffic(_listener("127.0.0.2"), "127.0.0.1")
    assert not takes_traffic(_listener("0.0.0.0"), "::1")
    assert takes_traffic(_listener("::"), "::1")
    assert not takes_traffic(_listener("::2"), "::1")
    assert takes_traffic(_listener("10.1.2.3"), "0.0.0.0")
    assert not takes_traffic(_listener("::1"), "0.0.0.0")
    assert takes_traffic(_listener("::ffff:127.0.0.1"), "127.0.0.1")
    assert not takes_traffic(_listener("127.0.0.1", state="bound"), "127.0.0.1")
    assert parse_address("::ffff:127.0.0.1") == parse_address("127.0.0.1")
    assert parse_address("[fe80::1%lo]") == parse_address("fe80::1")


def test_our_child_listening_on_the_port_is_ours_a_stranger_is_not(
    leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    victim = leases[0]
    victim.close_socket()
    with helper("-c", LISTEN, "127.0.0.1", str(victim.port)) as child:
        ours = make_shield(leases, own_pids=lambda: [child.pid])
        stranger = make_shield(leases)
        assert all(r.ok for r in ours.check_once())
        assert all(r.ok for r in ours.check_once())  # second time from the inode cache
        report = {r.port: r for r in stranger.check_once()}[victim.port]
        assert not report.ok
        assert f"pid {child.pid}" in report.problems[0]


def test_a_grandchild_of_our_child_counts_as_ours(
    leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    victim = leases[1]
    victim.close_socket()
    # A service started through a shell: the shell is our child, python its child.
    wrapper = f'"{sys.executable}" -c "$0" "$1" "$2"; true'
    with helper("-c", wrapper, LISTEN, "127.0.0.1", str(victim.port), program="sh") as proc:
        shield = make_shield(leases, own_pids=lambda: [proc.pid])
        assert all(r.ok for r in shield.check_once())


# A foreign server as most are written: SO_REUSEADDR, which lets it bind beside a socket
# that is bound but not listening (ours, once a holder shut it down); "listen" or not.
REUSEADDR_SERVER = """
import socket, sys
port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
if mode == "listen":
    s.listen()
print("ready", flush=True)
sys.stdin.readline()
try:
    s.listen()
    print("listening", flush=True)
except OSError as e:
    print(f"refused {e.errno}", flush=True)
sys.stdin.read()
"""


def test_a_foreign_server_in_the_window_of_a_shut_down_socket_still_trips(
    leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    """A holder's shutdown(2) leaves our socket bound but not listening, and a
    SO_REUSEADDR server can then bind and listen on the port. The shield puts our socket
    back in listen state, but never over a foreign listener: that is a trip."""
    victim = leases[0]
    shield = make_shield(leases)
    assert victim.socket is not None
    victim.socket.shutdown(socket.SHUT_RDWR)  # as a service holding a copy would
    with helper("-c", REUSEADDR_SERVER, str(victim.port), "listen") as foreign:
        reports = shield.check_once()
        assert [r.ok for r in reports] == [False, True, True]
        assert f"is now also listened on by pid {foreign.pid}" in " ".join(reports[0].problems)
        assert "no longer listening" in " ".join(reports[0].problems)


def test_a_shut_down_socket_listens_again_before_a_foreign_bind_can_listen(
    leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    """The other order: the foreign server only bound in the window; once the shield
    made our socket listen again, its listen is refused and the port stays ours."""
    victim = leases[0]
    shield = make_shield(leases)
    assert victim.socket is not None
    victim.socket.shutdown(socket.SHUT_RDWR)
    with helper("-c", REUSEADDR_SERVER, str(victim.port), "bind") as foreign:
        assert [r.ok for r in shield.check_once()] == [True, True, True]
        assert foreign.stdin is not None and foreign.stdout is not None
        foreign.stdin.write("\n")
        foreign.stdin.flush()
        assert foreign.stdout.readline().strip() == f"refused {errno.EADDRINUSE}"
    with socket.create_connection(("127.0.0.1", victim.port), timeout=5):
        pass  # our socket's backlog takes it


def test_a_socket_closed_under_the_lease_is_reported(
    leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    shield = make_shield(leases)
    assert leases[2].socket is not None
    leases[2].socket.close()  # closed, but not handed off: nothing reserves the port now
    reports = shield.check_once()
    assert [r.ok for r in reports] == [True, True, False]
    assert "our listening socket was closed" in reports[2].problems[0]


# ------------------------------------------------------------------ instance, reports


def test_instance_problem_trips_with_no_lease(
    leases: list[Lease], make_shield: Callable[..., Shield], trips: Trips
) -> None:
    problem: list[str] = []
    shield = make_shield(leases, instance_check=lambda: problem[0] if problem else None)
    shield.start()
    wait_for_checks(shield)
    assert not trips.calls
    problem.append("instance slot 1: lock file 1.lock was deleted by another process")
    lease, reason = trips.wait()
    assert lease is None
    assert reason == problem[0]
    assert trips.threads == ["portpool-shield"]


def test_check_once_reports_every_lease_and_the_instance(
    leases: list[Lease], make_shield: Callable[..., Shield], home: Path
) -> None:
    shield = make_shield(leases, instance_check=lambda: None)
    reports = shield.check_once()
    assert [(r.service, r.port, r.ok, r.kind) for r in reports] == [
        *((lease.service, lease.port, True, "lease") for lease in leases),
        ("", 0, True, "instance"),
    ]
    lock_path(home, leases[0].port).unlink()
    reports = shield.check_once()
    assert not reports[0].ok
    assert reports[0].problems == (
        f"lock file {leases[0].port}.lock was deleted by another process",
    )
    assert all(r.ok for r in reports[1:])
    assert str(reports[1]) == f"svc-1 port {leases[1].port}: ok"
    assert isinstance(reports[0], LeaseReport)
    assert shield.tripped is None  # a report never trips


def test_a_failing_callback_is_logged_and_fires_once(
    home: Path, leases: list[Lease], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def on_lost(lease: Lease | None, reason: str) -> None:
        calls.append(reason)
        raise RuntimeError("callback broke")

    shield = Shield(leases, interval_s=INTERVAL_S, on_lost=on_lost)
    with caplog.at_level("DEBUG", logger="portpool.shield"):
        shield.start()
        lock_path(home, leases[0].port).unlink()
        deadline = time.monotonic() + DEADLINE_S
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        shield.stop(timeout=5)
    assert shield._thread is not None
    assert not shield._thread.is_alive()  # no check can run after this: none did fire
    assert len(calls) == 1
    assert any(r.levelname == "DEBUG" and "tripped" in r.getMessage() for r in caplog.records)
    failed = [r for r in caplog.records if "on_lost failed" in r.getMessage()]
    assert failed and calls[0] in failed[0].getMessage()  # the reason is not lost
    time.sleep(3 * INTERVAL_S)
    assert len(calls) == 1


def test_checks_racing_constant_heartbeat_writes_stay_clean(
    leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    """Record reads race in-place heartbeat writes; a torn read is retried, never a trip."""
    shield = make_shield(leases)
    stop = threading.Event()
    beats = [0]

    def beat() -> None:
        while not stop.is_set():
            for lease in leases:
                lease.heartbeat()
            beats[0] += 1

    writer = threading.Thread(target=beat)
    writer.start()
    try:
        bad = [r for _ in range(300) for r in shield.check_once() if not r.ok]
    finally:
        stop.set()
        writer.join(DEADLINE_S)
    assert bad == []
    assert beats[0] > 0


def test_on_lost_may_stop_its_own_shield(
    home: Path, leases: list[Lease], make_shield: Callable[..., Shield]
) -> None:
    """The instance stops the shield from inside on_lost: no deadlock, no second call."""
    calls: list[str] = []
    done = threading.Event()
    shield: Shield | None = None

    def on_lost(lease: Lease | None, reason: str) -> None:
        calls.append(reason)
        assert shield is not None
        shield.stop(timeout=DEADLINE_S)  # from the shield's own thread: must not join it
        done.set()

    shield = make_shield(leases, on_lost=on_lost)
    shield.start()
    lock_path(home, leases[2].port).unlink()
    assert done.wait(DEADLINE_S)
    assert shield._thread is not None
    shield._thread.join(DEADLINE_S)
    assert not shield._thread.is_alive()
    assert len(calls) == 1


# ------------------------------------------------------------------ stopping


def test_a_stopped_shield_never_fires(
    home: Path, leases: list[Lease], make_shield: Callable[..., Shield], trips: Trips
) -> None:
    shield = make_shield(leases)
    shield.start()
    wait_for_checks(shield, 1)
    shield.stop(timeout=5)
    shield.stop()  # idempotent
    assert shield._thread is not None
    assert not shield._thread.is_alive()  # the loop ended: no check can run any more
    checked = shield.checks_completed
    lock_path(home, leases[0].port).unlink()
    time.sleep(4 * INTERVAL_S)
    assert shield.checks_completed == checked
    assert not trips.calls
    assert shield.tripped is None
    assert not shield.check_once()[0].ok  # still reports, never fires
    with pytest.raises(RuntimeError):
        shield.start()


def test_stop_during_a_check_in_flight_neither_trips_nor_leaves_locks(
    state: StateDir, leases: list[Lease], make_shield: Callable[..., Shield], trips: Trips
) -> None:
    in_check = threading.Event()
    let_go = threading.Event()

    def slow_instance_check() -> str | None:
        in_check.set()
        let_go.wait(DEADLINE_S)
        return "instance slot 1: lost (would trip if it counted)"

    shield = make_shield(leases, instance_check=slow_instance_check)
    shield.start()
    assert in_check.wait(DEADLINE_S)
    stopper = threading.Thread(target=shield.stop, kwargs={"timeout": DEADLINE_S})
    stopper.start()
    deadline = time.monotonic() + DEADLINE_S
    while not shield.stopped and time.monotonic() < deadline:
        time.sleep(0.005)
    # What an instance does after stopping its shield: release everything.
    for lease in leases:
        lease.release()
    let_go.set()
    stopper.join(DEADLINE_S)
    assert not stopper.is_alive()
    assert not trips.calls
    assert shield.tripped is None
    for lease in leases:
        assert inspect_port(state, lease.port).is_free


def test_stop_racing_real_checks_never_trips(state: StateDir, ports: int) -> None:
    """Stop then release at random moments against a shield checking every 5 ms."""
    rng = random.Random(4)
    fired: list[str] = []
    for round_ in range(40):
        held = [acquire(state, [ports + i], service=f"s{i}") for i in range(5)]
        shield = Shield(
            held,
            interval_s=0.005,
            on_lost=lambda lease, reason: fired.append(reason),
            name=f"race-{round_}",
        )
        shield.start()
        time.sleep(rng.uniform(0, 0.03))
        shield.stop(timeout=5)
        for lease in held:
            lease.release()
        assert all(inspect_port(state, lease.port).is_free for lease in held)
    assert fired == []


def test_run_async_trips_in_the_loop_and_cancel_stops(
    home: Path, leases: list[Lease], trips: Trips
) -> None:
    async def main() -> tuple[str, bool]:
        shield = Shield(leases, interval_s=INTERVAL_S, on_lost=trips)
        task = asyncio.create_task(shield.run_async())
        deadline = time.monotonic() + DEADLINE_S
        while shield.checks_completed < 3:  # "no trip" means something once 3 checks ran
            assert time.monotonic() < deadline, shield.checks_completed
            await asyncio.sleep(INTERVAL_S / 4)
        assert not trips.calls
        lock_path(home, leases[0].port).unlink()
        await asyncio.wait_for(task, DEADLINE_S)
        other = Shield(leases[1:], interval_s=INTERVAL_S, on_lost=trips)
        other_task = asyncio.create_task(other.run_async())
        await asyncio.sleep(INTERVAL_S)
        other_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await other_task
        return threading.current_thread().name, other.stopped

    loop_thread, other_stopped = asyncio.run(main())
    lease, reason = trips.wait(0)
    assert lease is leases[0]
    assert "was deleted by another process" in reason
    assert trips.threads == [loop_thread]
    assert other_stopped
    assert len(trips.calls) == 1


# ------------------------------------------------------------------ no false positives


@pytest.mark.slow
def test_twenty_busy_leases_for_a_minute_never_trip(state: StateDir) -> None:
    base = find_free_block(size=20, low=23000, high=24000)
    held = [acquire(state, [base + i], service=f"svc-{i}", app="busy") for i in range(20)]
    checks: list[float] = []
    fired: list[str] = []

    def instance_check() -> str | None:
        checks.append(time.monotonic())
        return None

    shield = Shield(
        held,
        interval_s=INTERVAL_S,
        on_lost=lambda lease, reason: fired.append(reason),
        instance_check=instance_check,
    )
    stop = threading.Event()
    served = [0]
    errors: list[BaseException] = []

    def heartbeat() -> None:
        while not stop.wait(0.05):
            for lease in held:
                lease.heartbeat()

    def serve(lease: Lease) -> None:
        sock = lease.socket
        assert sock is not None
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(conn.recv(16))
                served[0] += 1

    def client() -> None:
        try:
            i = 0
            while not stop.wait(0.01):
                lease = held[i % len(held)]
                with socket.create_connection(("127.0.0.1", lease.port), timeout=5) as c:
                    c.sendall(b"ping")
                    assert c.recv(16) == b"ping"
                i += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=heartbeat), threading.Thread(target=client)]
    threads += [threading.Thread(target=serve, args=(lease,)) for lease in held]
    shield.start()
    for t in threads:
        t.start()
    try:
        stop.wait(60)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        shield.stop(timeout=5)
        for lease in held:
            lease.release()
    assert errors == []
    assert fired == []
    assert shield.tripped is None
    assert served[0] > 100
    assert len(checks) > 60  # the shield really was checking all along


# ------------------------------------------------------------------ end to end


@contextlib.contextmanager
def _run_holding_its_port(
    tmp_path: Path, ports: int
) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`portpool run` (shield every 0.2 s) of a child that holds its port: (the run, the
    port, the child's pid); killed if still running afterwards, its pipes closed."""
    from tests.helpers import read_line, start, write_layout

    layout = write_layout(tmp_path / "portpool.toml", ports, services={"alpha": {}}, shield=0.2)
    child = "import os, time; print(os.environ['PORT'], os.getpid(), flush=True); time.sleep(60)"
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", child)
    try:
        port_text, pid_text = read_line(proc).split()
        yield proc, int(port_text), int(pid_text)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _tripped(proc: subprocess.Popen[str], child_pid: int) -> str:
    """What the run said once it exited 4, after checking it stopped its own child."""
    from tests.helpers import pid_alive, wait_for

    assert proc.wait(timeout=20) == 4
    assert proc.stderr is not None
    err = proc.stderr.read()
    wait_for(lambda: not pid_alive(child_pid), timeout=10)  # own child stopped
    return err


def test_portpool_run_exits_4_when_its_lock_file_is_deleted(
    home: Path, tmp_path: Path, ports: int
) -> None:
    """The whole chain: the shield trips, the instance stops its child and exits 4."""
    with _run_holding_its_port(tmp_path, ports) as (proc, port, child_pid):
        lock_path(home, port).unlink()
        assert f"{port}.lock was deleted by another process" in _tripped(proc, child_pid)


def test_portpool_run_exits_4_when_its_state_dir_is_moved_away(
    home: Path, tmp_path: Path, ports: int
) -> None:
    """`mv $PORTPOOL_HOME elsewhere` kept every lock held and every file the same (the
    handles moved with the directory), so the shield saw nothing while a second start
    by that path made a new state dir and got the same number and port."""
    with _run_holding_its_port(tmp_path, ports) as (proc, _, child_pid):
        home.rename(tmp_path / "moved")
        assert f"state dir {home} was moved away or removed" in _tripped(proc, child_pid)
        # Its own files, where they went, are removed as on any stop (rule 7).
        instances = tmp_path / "moved" / "apps" / "testapp" / "instances"
        assert sorted(p.name for p in instances.iterdir()) == []


# `portpool run` in a process of its own (a subreaper): the command daemonizes a server
# on the port (a subshell that exits at once: the server is adopted by `run`), then the
# running shield's checks are made at once, with doctor's word on the same port.
DAEMONIZING_RUN = r"""
import os, sys, threading, time
from portpool._doctor import classify_port
from portpool._platform import tcp_sockets
from portpool._run import run_command
from portpool.layout import load_layout
from portpool.statedir import StateDir

layout, release = load_layout(sys.argv[1]), sys.argv[2]
server = (
    "import os, socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
    "while not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
)
command = ["sh", "-c", '(python3 -c "$0" "$1" &); while [ ! -e "$1" ]; do sleep 0.05; done',
           server, release]
found = {}

def check():
    instance = found["instance"]
    (port,) = [lease.port for lease in instance.leases.values()]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [
        s for s in tcp_sockets(port) if s.state == "listen"
    ]:
        time.sleep(0.02)
    (listener,) = [s for s in tcp_sockets(port) if s.state == "listen"]
    reports = instance.verify_all()
    print("shield", all(r.ok for r in reports), [str(r) for r in reports], flush=True)
    with StateDir.open() as state:
        _, notes, _ = classify_port(state, port, layout.host)
    print("doctor", list(notes), flush=True)
    open(release, "w").close()

def announce(instance):
    found["instance"] = instance
    threading.Thread(target=check, daemon=True).start()

outcome = run_command(layout, command, announce=announce, whole_tree=True)
print("code", outcome.code, flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="a child subreaper is Linux's")
def test_a_service_that_daemonizes_under_run_is_ours_for_the_shield_as_for_doctor(
    tmp_path: Path, ports: int
) -> None:
    """`run`/`up` adopt what their command daemonizes (a child subreaper) and stop it with
    the instance, and doctor called its server the holder's; the shield called it a
    foreign listener and stopped the instance (exit 4)."""
    config = tmp_path / "portpool.toml"
    config.write_text(
        f'app = "t"\nmax_instances = 1\nshield_interval = 0.2\n[services.web]\nbase = {ports}\n'
        "size = 1\n"
    )
    env = {**os.environ, "PORTPOOL_HOME": str(tmp_path / "state")}
    done = subprocess.run(
        [sys.executable, "-c", DAEMONIZING_RUN, str(config), str(tmp_path / "release")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert lines[:1] == [f"shield True ['web port {ports}: ok', 'instance: ok']"], done
    assert lines[1:] == ["doctor []", "code 0"], done


# The README's worker pattern from a program using the library: the instance's own
# process closes a `socket = "port"` lease's socket and starts the worker that binds the
# number (directly, or through a shell), while the default shield watches every 0.1 s.
OWN_WORKER = """
import socket, subprocess, sys, time
import portpool
from portpool.layout import load_layout

layout = load_layout(sys.argv[1])
instance = portpool.start_instance(layout)
instance.start_shield()  # the default: a trip ends this process with exit code 4
port = instance.port("worker")
instance.leases["worker"].close_socket()
serve = f"import socket,time; s=socket.create_server(('127.0.0.1',{port})); time.sleep(3)"
argv = [sys.executable, "-c", serve]
if sys.argv[2] == "shell":
    argv = ["sh", "-c", '"$0" "$@"; true', *argv]
worker = subprocess.Popen(argv)
shield = instance._shield  # its count proves the checks ran while the worker listened
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
first = shield.checks_completed
while time.monotonic() < deadline and shield.checks_completed < first + 10:
    time.sleep(0.05)
print("checks", shield.checks_completed - first, flush=True)
print("reports", [(r.port, r.ok, r.problems) for r in instance.verify_all()], flush=True)
worker.kill()
worker.wait()
instance.release()
print("survived", flush=True)
"""


@pytest.mark.parametrize("how", ["direct", "shell"])
def test_a_worker_the_instance_process_starts_is_ours_for_the_default_shield(
    tmp_path: Path, home: Path, how: str
) -> None:
    """A program calling the library closed a `socket = "port"` lease's socket and
    started the worker that binds its number, as README's worker.py: the default shield
    took the worker, this process's own child, for a foreign listener and ended the
    program with exit code 4 (its ``finally`` never ran, the worker kept the port)."""
    base = find_free_block()
    layout = tmp_path / "portpool.toml"
    layout.write_text(
        f'app = "own-worker"\nshield_interval = 0.1\n'
        f'[services.worker]\nbase = {base}\nsize = 2\nsocket = "port"\n'
    )
    script = tmp_path / "own_worker.py"
    script.write_text(OWN_WORKER)
    done = subprocess.run(
        [sys.executable, str(script), str(layout), how],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "survived" in done.stdout
    assert "checks 10" in done.stdout, done.stdout
    assert f"({base}, True, ())" in done.stdout, done.stdout
