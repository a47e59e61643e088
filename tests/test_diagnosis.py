"""The one diagnosis of a port: the pool's refusals, ``doctor`` and the shield agree.

A table of real occupants (foreign processes): listening, only bound, connected with the
port as local port, TIME_WAIT; both families; wildcard and specific addresses;
IPV6_V6ONLY on and off. For every occupant and every host a lease may use, doctor's
verdict is exactly the Refusal ``acquire`` gives (or both say the port is free), and the
shield trips on a listener exactly when the diagnosis says it takes the lease's traffic.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from benchmarks._common import bindable
from tests.conftest import find_free_block
from tests.helpers import (
    HOLD,
    OCCUPANT,
    count_proc_scans,
    hold_port_lock,
    occupy,
    ports_held,
    read_line,
    releasing,
    start,
    wait_for,
)

from portpool._addresses import has_ipv6_loopback, takes_traffic
from portpool._doctor import classify_port, examine_layout
from portpool._handover import handed_over, plain_bind_notes
from portpool._platform import owners_of_inodes, tcp_sockets
from portpool.diagnosis import PortDiagnosis, diagnose
from portpool.errors import InvalidArgument, InvalidPort, PoolExhausted, Refusal, RefusalReason
from portpool.layout import Layout, Service
from portpool.lock import PortLock
from portpool.pool import Lease, acquire
from portpool.shield import LeaseReport, Shield
from portpool.statedir import StateDir

HOSTS = ["127.0.0.1", "::1", "localhost", "::", "0.0.0.0"]

# (kind, address, IPV6_V6ONLY): every state, both families, wildcard and specific.
OCCUPANTS = [
    ("listen", "127.0.0.1", "-"),
    ("listen", "127.0.0.2", "-"),
    ("listen", "0.0.0.0", "-"),
    ("listen", "::1", "-"),
    ("listen", "::", "1"),
    ("listen", "::", "0"),
    ("bound", "127.0.0.1", "-"),
    ("bound", "::1", "-"),
    ("bound", "::", "1"),
    ("bound", "::", "0"),
    ("connected", "127.0.0.1", "-"),
    ("connected", "::1", "-"),
    # Bound to a wildcard, then connected: the kernel's table lists the connection's
    # address ([::1]:P), its bind check the wildcard (a 0.0.0.0 lease was refused by
    # "a process the OS does not name").
    ("connected", "::", "-"),
    ("connected", "0.0.0.0", "-"),
    ("timewait", "127.0.0.1", "-"),
    ("timewait", "::1", "-"),
    ("timewait", "::", "-"),
    ("timewait", "0.0.0.0", "-"),
]

IPV6 = has_ipv6_loopback()


def _needs_ipv6(*addresses: str) -> None:
    if not IPV6 and any(":" in a or a == "localhost" for a in addresses):
        pytest.skip("this host has no IPv6 loopback (::1)")


@pytest.fixture
def port() -> int:
    """A port no socket uses in any state or family (TIME_WAIT leftovers of earlier
    cases last 60 s, and a plain bind on 127.0.0.1 does not see those on ::1), nor the
    next one, which some cases use too (one found taken while another test ran)."""
    rng = random.SystemRandom()
    for _ in range(200):
        candidate = rng.randrange(31000, 32000)
        pair = (candidate, candidate + 1)
        if not any(tcp_sockets(p) for p in pair) and all(bindable(p) for p in pair):
            return candidate
    raise RuntimeError("no unused port in 31000..32000")


@pytest.fixture
def occupants() -> Iterator[list[subprocess.Popen[str]]]:
    """The foreign processes a test started: released after it."""
    with releasing() as started:
        yield started


Occupy = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def occupy_port(port: int, occupants: list[subprocess.Popen[str]]) -> Occupy:
    """``occupy_port(kind, address, v6only="-", reuse=False)``: a foreign process on
    ``port`` (``helpers.occupy``), returned once the kernel lists its socket in the
    state it should be in; released after the test."""
    want = {"listen": "listen", "bound": "bound", "connected": "established"}
    want["timewait"] = "time-wait"

    def start(
        kind: str, address: str, v6only: str = "-", *, reuse: bool = False
    ) -> subprocess.Popen[str]:
        proc = occupy(kind, address, port, v6only, reuse=reuse)
        occupants.append(proc)
        wait_for(lambda: any(s.state == want[kind] for s in tcp_sockets(port)), timeout=10)
        return proc

    return start


def _spawn(started: list[subprocess.Popen[str]], *argv: str) -> subprocess.Popen[str]:
    """A process with stdin and stdout on pipes (it ends when its stdin closes), added to
    ``started`` (the ``occupants`` fixture's list) to be released after the test."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started.append(proc)
    assert proc.stdout is not None
    return proc


def _shield(lease: Lease, own_pids: tuple[int, ...] = ()) -> Shield:
    """A shield over ``lease`` alone, for ``check_once`` (``own_pids``: our services')."""
    return Shield(
        [lease], interval_s=1, on_lost=lambda lease, reason: None, own_pids=lambda: own_pids
    )


def _report(shield: Shield) -> LeaseReport:
    (report,) = shield.check_once()
    return report


def _try_acquire(state: StateDir, port: int, host: str) -> Lease | PoolExhausted:
    try:
        return acquire(state, [port], host=host)
    except PoolExhausted as e:
        return e


@pytest.mark.parametrize(("kind", "address", "v6only"), OCCUPANTS)
def test_doctor_and_pool_agree_on_every_occupant(
    state: StateDir, port: int, occupy_port: Occupy, kind: str, address: str, v6only: str
) -> None:
    _needs_ipv6(address)
    proc = occupy_port(kind, address, v6only)
    for host in HOSTS:
        if not IPV6 and (":" in host or host == "localhost"):
            continue
        refusal, _, found = classify_port(state, port, host)
        assert found is not None
        lease = _try_acquire(state, port, host)
        if isinstance(lease, PoolExhausted):
            assert lease.refusals == [refusal], (host, found)
            if kind != "timewait":
                assert f"pid {proc.pid} (python" in lease.refusals[0].detail
            else:
                assert "TIME_WAIT" in lease.refusals[0].detail, (host, lease.refusals)
            continue
        with lease:
            assert refusal is None, (host, refusal)
            # A listener the pool could coexist with never takes the lease's traffic:
            # the shield agrees and stays quiet.
            assert not any(takes_traffic(o.socket, host) for o in found.occupants)
            assert _report(_shield(lease)).ok, (host, kind, address)


@pytest.mark.parametrize("what", ["fifo", "directory", "symlink", "hard link"])
def test_doctor_and_pool_agree_on_a_lock_path_that_is_not_a_file(
    state: StateDir, port: int, home: Path, what: str
) -> None:
    # doctor called such a port free (no lock held on it, the bind works) while every
    # acquire refused it: "lock path is not a regular file".
    _try_acquire(state, port + 1, "127.0.0.1").release()  # makes ports/
    lock = home / "ports" / f"{port}.lock"
    if what == "fifo":
        os.mkfifo(lock)
    elif what == "directory":
        lock.mkdir()
    elif what == "hard link":  # a second name of a free lock file: no slot's or port's
        os.link(home / "ports" / f"{port + 1}.lock", lock)
    else:
        lock.symlink_to(home / "elsewhere")
    refusal, _, _ = classify_port(state, port, "127.0.0.1")
    refused = _try_acquire(state, port, "127.0.0.1")
    assert isinstance(refused, PoolExhausted)
    assert refusal is not None
    assert refusal.reason == refused.refusals[0].reason == "error"
    # In the same words: doctor said "lock path is a directory", run "is a directory
    # ...; never followed".
    assert refusal.detail == refused.refusals[0].detail
    assert refusal.detail.startswith(f"state dir {lock}: is a "), refusal.detail


def test_doctor_status_and_run_agree_on_a_directory_at_a_port_record_path(
    home: Path, tmp_path: Path, port: int
) -> None:
    """A directory at ``ports/<port>.json``: acquire cannot replace it (a symlink or a
    file it does) and refused the port, while doctor called it free, and ``doctor
    --all`` listed it among the free ones."""
    import json

    from tests.helpers import portpool

    config = tmp_path / "portpool.toml"
    config.write_text(f'app = "rec"\nmax_instances = 1\n[services.web]\nbase = {port}\nsize = 1\n')
    assert portpool("run", "-q", "--config", str(config), "--", "true").returncode == 0
    record = home / "ports" / f"{port}.json"
    record.unlink(missing_ok=True)
    record.mkdir()
    # The same words from both, to the "state dir " that run's prefixed and doctor's not.
    why = (
        f"state dir {record}: metadata path is a directory, not a record portpool wrote (remove it)"
    )
    ran = portpool("run", "--config", str(config), "--", "true")
    assert ran.returncode == 3, ran.stderr
    assert f"port {port}: error" in ran.stderr and why in ran.stderr, ran.stderr
    for args in ((), ("--all",)):
        text = portpool("doctor", *args, "--config", str(config))
        line = next(x for x in text.stdout.splitlines() if f" {port}  " in x)
        assert "free" not in line and why in line, text.stdout
    doc = json.loads(portpool("doctor", "--json", "--config", str(config)).stdout)
    (listed,) = [p for p in doc["ports"] if p["port"] == port]
    assert listed["kind"] == "error" and why in listed["text"], listed
    assert record.is_dir()  # doctor and run only read it


def test_a_second_name_of_a_held_lock_file_is_unusable_to_doctor_run_and_gc_alike(
    state: StateDir, home: Path, tmp_path: Path, port: int
) -> None:
    """``ports/<port>.lock`` a hard link of another port's held lock file: doctor said
    "held, metadata unreadable (not written yet)", for ever, run "held (held, ...)", and
    gc nothing; the free case read "is a file with 2 hard links" everywhere."""
    import json

    from tests.helpers import portpool

    holder = _try_acquire(state, port + 1, "127.0.0.1")  # a live holder, its record written
    assert isinstance(holder, Lease)
    with holder:
        lock = home / "ports" / f"{port}.lock"
        os.link(home / "ports" / f"{port + 1}.lock", lock)
        config = tmp_path / "portpool.toml"
        config.write_text(
            f'app = "linked"\nmax_instances = 1\n[services.web]\nbase = {port}\nsize = 1\n'
        )
        why = (
            f"state dir {lock}: is a file with 2 hard links, not a lock file portpool made "
            "(remove it)"
        )
        ran = portpool("run", "--config", str(config), "--", "true")
        assert ran.returncode == 3, ran.stderr
        assert f"port {port}: error ({why})" in ran.stderr, ran.stderr
        text = portpool("doctor", "--config", str(config)).stdout
        assert f" {port}  error ({why})" in text, text
        # Each kind by the word its lines use: "1 refused" summed the "error" lines.
        assert "0 free, 0 held by portpool, 0 used by foreign processes, 1 error" in text, text
        doc = json.loads(portpool("doctor", "--json", "--config", str(config)).stdout)
        (listed,) = doc["ports"]
        assert (listed["kind"], listed["text"]) == ("error", f"error ({why})"), listed
        assert doc["counts"] == {"free": 0, "held": 0, "foreign": 0, "error": 1}, doc
        # The real holder's own port still reads held by it.
        refusal, _, _ = classify_port(state, port + 1, "127.0.0.1")
        assert refusal is not None and refusal.reason == "held", refusal
        assert refusal.detail.startswith(f"held by pid {os.getpid()}"), refusal
        cleaned = portpool("gc")
        assert cleaned.returncode == 1, cleaned.stderr
        assert f"{lock}: is a file with 2 hard links, not the lock file of port {port}" in (
            cleaned.stderr
        )
        assert lock.stat().st_nlink == 2  # named, never removed


def test_doctors_count_line_names_each_kind_by_its_lines_word() -> None:
    # "2 refused" summed ports whose lines said "error"; then "2 error".
    from portpool._doctor import DoctorReport, PortVerdict

    def verdict(port: int, reason: RefusalReason | None) -> PortVerdict:
        return PortVerdict(1, "web", port, None if reason is None else Refusal(port, reason, "x"))

    reasons: list[RefusalReason | None] = [None, "held", "error", "error", "unavailable"]
    report = DoctorReport(
        "a", "127.0.0.1", 1, tuple(verdict(6000 + i, r) for i, r in enumerate(reasons))
    )
    assert report.tally() == (
        "1 free, 1 held by portpool, 0 used by foreign processes, 2 errors, 1 unavailable"
    )


# What the kernel's rules say, for the faults that were reported (True: refused).
EXPECTED = [
    # localhost covers ::1 too: a foreign [::1]:P server must make the pool skip P.
    ("localhost", "listen", "::1", "-", True),
    ("localhost", "listen", "127.0.0.1", "-", True),
    # "::" is dual-stack: it conflicts with an IPv4 listener.
    ("::", "listen", "0.0.0.0", "-", True),
    ("::", "listen", "127.0.0.1", "-", True),
    # Another user's IPv6-only [::] socket does not touch 127.0.0.1.
    ("127.0.0.1", "listen", "::", "1", False),
    ("127.0.0.1", "listen", "::", "0", True),
    ("127.0.0.1", "listen", "::1", "-", False),
    # An outgoing connection using P as local port blocks a server on that address.
    ("127.0.0.1", "connected", "127.0.0.1", "-", True),
    ("127.0.0.1", "bound", "127.0.0.1", "-", True),
]


@pytest.mark.parametrize(("host", "kind", "address", "v6only", "refused"), EXPECTED)
def test_the_kernel_rules_the_pool_follows(
    state: StateDir,
    port: int,
    occupy_port: Occupy,
    host: str,
    kind: str,
    address: str,
    v6only: str,
    refused: bool,
) -> None:
    _needs_ipv6(host, address)
    occupy_port(kind, address, v6only)
    if refused:
        with pytest.raises(PoolExhausted):
            acquire(state, [port], host=host).release()
    else:
        acquire(state, [port], host=host).release()


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    ("address", "v6only"),
    [
        ("127.0.0.1", "-"),
        ("127.0.0.2", "-"),
        ("0.0.0.0", "-"),
        ("::1", "-"),
        ("::", "1"),
        ("::", "0"),
    ],
)
def test_the_shield_trips_exactly_when_the_diagnosis_says_traffic_is_taken(
    state: StateDir, port: int, occupy_port: Occupy, host: str, address: str, v6only: str
) -> None:
    _needs_ipv6(host, address)
    with acquire(state, [port], host=host) as lease:
        shield = _shield(lease)
        lease.close_socket()  # handed off by number: now anyone may bind the port
        proc = occupy_port("listen", address, v6only)
        listener = next(s for s in tcp_sockets(port) if s.state == "listen")
        expected = takes_traffic(listener, host)
        report = _report(shield)
        assert report.ok is not expected, (host, address, v6only, report)
        if expected:
            assert f"pid {proc.pid}" in report.problems[0]
    # The verdict itself, spelled out for the cases the issue names.
    if host == "127.0.0.1" and address == "::" and v6only == "1":
        assert not expected  # another user's IPv6-only socket is no trip (it was a DoS)
    if host == "localhost" and address == "::1":
        assert expected  # the second loopback is covered
    if host == "::" and address in ("0.0.0.0", "127.0.0.1"):
        assert expected  # dual-stack covers IPv4


def test_time_wait_is_named_and_whether_it_blocks_a_plain_server(
    state: StateDir, port: int, occupy_port: Occupy
) -> None:
    occupy_port("timewait", "127.0.0.1")
    found = diagnose(port, "127.0.0.1")
    waits = [o for o in found.occupants if o.state == "time-wait"]
    assert waits and "TIME_WAIT" in waits[0].describe()
    # The occupant did not set SO_REUSEADDR, so not even our SO_REUSEADDR bind passes;
    # whatever the kernel says, the plain-bind answer is at least as strict.
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port))
        plain_error = 0
    except OSError as e:
        plain_error = e.errno or -1
    finally:
        plain.close()
    assert plain_error in (0, errno.EADDRINUSE)
    plain_ok = plain_error == 0
    assert found.plain_bind_blocked is (not plain_ok) or not found.bindable
    if not found.bindable:
        assert found.refusal() is not None
        assert "TIME_WAIT" in found.refusal().detail  # type: ignore[union-attr]


def test_doctor_names_the_pid_of_an_outgoing_connection(
    state: StateDir, port: int, occupy_port: Occupy
) -> None:
    proc = occupy_port("connected", "127.0.0.1")
    refusal, _, _ = classify_port(state, port, "127.0.0.1")
    assert refusal is not None and refusal.reason == "in use"
    assert f"pid {proc.pid} (python" in refusal.detail
    assert f"a connection from 127.0.0.1:{port}" in refusal.detail


@pytest.mark.parametrize(
    ("error", "refusal"),
    [
        # No socket the OS lists (another user's, or gone since): still said, never "".
        (errno.EADDRINUSE, Refusal(80, "in use", "used by a process the OS does not name")),
        (errno.EACCES, Refusal(80, "permission denied", "binding [::1]:80: Denied")),
        (errno.EADDRNOTAVAIL, Refusal(80, "unavailable", "::1 is not an address of this host")),
        # A kernel without IPv6 was an "error" per port, and every slot was tried in turn.
        (errno.EAFNOSUPPORT, Refusal(80, "unavailable", "::1: this host has no IPv6")),
        (errno.EINVAL, Refusal(80, "error", "binding [::1]:80: Denied")),
    ],
)
def test_each_bind_error_is_the_refusal_acquire_reports(error: int, refusal: Refusal) -> None:
    assert PortDiagnosis(80, "::1", (), error, "Denied").refusal() == refusal


@pytest.mark.skipif(sys.platform != "linux", reason="sock_diag and /proc/net are Linux's")
def test_sock_diag_reads_states_and_v6only_and_agrees_with_the_tables(port: int) -> None:
    from portpool._platform._sockdiag import _proc_net

    _needs_ipv6("::")
    made: list[socket.socket] = []
    try:
        for flag, offset in ((1, 0), (0, 1)):
            s = socket.socket(socket.AF_INET6)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, flag)
            s.bind(("::", port + offset))
            s.listen()
            made.append(s)
        client = socket.create_connection(("127.0.0.1", port + 1))
        made.append(client)
        by_port = {p: tcp_sockets(p) for p in (port, port + 1)}
        (only6,) = by_port[port]
        assert (only6.state, only6.address, only6.v6only) == ("listen", "::", True)
        dual = next(s for s in by_port[port + 1] if s.state == "listen")
        assert dual.v6only is False
        assert dual.inode == os.fstat(made[1].fileno()).st_ino
        # The fallback tables list the same sockets (without the V6ONLY flag).
        for p, found in by_port.items():
            table = {(s.family, s.address, s.state, s.inode) for s in _proc_net(p)}
            assert {(s.family, s.address, s.state, s.inode) for s in found} == table
    finally:
        for s in made:
            s.close()


# A held port in port mode (the service binds it itself; the held ::1 socket of a
# localhost lease is closed with the served one): what the service listens on, per host.
SERVED = {
    "127.0.0.1": ("127.0.0.1", "-"),
    "::1": ("::1", "-"),
    "localhost": ("127.0.0.1", "-"),
    "::": ("::", "0"),
    "0.0.0.0": ("0.0.0.0", "-"),
}


def _stranger(
    started: list[subprocess.Popen[str]], address: str, port: int, v6only: str
) -> int | None:
    """A listener started through a shell that exits at once, so it is no descendant of
    this process (a foreign program, not the lease holder's service); its pid, or None
    if it could not listen. It ends when its stdin closes (``release`` of the shell)."""
    # via fd 3: a background job's stdin is /dev/null (even with <&0 in dash)
    script = 'exec 3<&0; "$@" <&3 3<&- & echo $!'
    listener = (sys.executable, "-c", OCCUPANT, "listen", address, str(port), v6only)
    shell = _spawn(started, "sh", "-c", script, "sh", *listener)
    assert shell.stdout is not None
    # Both reads end: the listener prints "ready" or exits (closing the pipe) at once.
    pid = int(shell.stdout.readline())
    return pid if shell.stdout.readline().strip() == "ready" else None


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    ("address", "v6only"), [("127.0.0.1", "-"), ("::1", "-"), ("::", "1"), ("0.0.0.0", "-")]
)
def test_doctor_and_the_shield_agree_on_a_held_port(
    state: StateDir,
    port: int,
    occupants: list[subprocess.Popen[str]],
    occupy_port: Occupy,
    host: str,
    address: str,
    v6only: str,
) -> None:
    """doctor said "held by instance 1 ..." with no occupant while the shield tripped on
    a foreign [::1]:P server that received a localhost lease's clients."""
    _needs_ipv6(host, address)
    with acquire(state, [port], host=host) as lease:
        lease.close_socket()  # handed over by number
        served, flag = SERVED[host]
        service = occupy_port("listen", served, flag)
        intruder = _stranger(occupants, address, port, v6only)
        report = _report(_shield(lease, own_pids=(service.pid,)))
        refusal, notes, found = classify_port(state, port, host)
        assert refusal is not None and refusal.reason == "held"
        assert found is not None
        assert bool(notes) is (not report.ok), (host, address, v6only, notes, report)
        if notes:
            assert intruder is not None
            assert f"pid {intruder} (python" in notes[0]
            assert f"pid {intruder} (python" in report.problems[0]
            assert any(intruder in o.pids for o in found.occupants)
        if host == "localhost" and address == "::1":
            assert notes  # the case: the second loopback receives the clients


@pytest.mark.parametrize("kind", ["connected", "timewait"])
def test_the_plain_bind_note_names_its_occupant(
    state: StateDir, port: int, occupy_port: Occupy, kind: str
) -> None:
    """The note read "cannot bind it yet: " with nothing after the colon. The occupant
    sets SO_REUSEADDR: our bind takes the port, a plain one not."""
    proc = occupy_port(kind, "127.0.0.1", reuse=True)
    refusal, notes, found = classify_port(state, port, "127.0.0.1")
    assert refusal is None and found is not None and found.plain_bind_blocked
    (note,) = notes
    assert note.startswith("a server that does not set SO_REUSEADDR cannot bind it yet: ")
    if kind == "connected":
        assert f"pid {proc.pid} (python" in note
        assert f"has a connection from 127.0.0.1:{port}" in note
    else:
        assert f"TIME_WAIT from 127.0.0.1:{port}" in note
    # A lease handed over by number gets the same note; one that keeps its socket not.
    with acquire(state, [port], host="127.0.0.1") as lease:
        lease.service = "web"
        (line,) = plain_bind_notes([lease])
        assert line == f"service 'web' port {port}: {note}"
    assert plain_bind_notes([]) == []


def test_doctor_lists_a_free_port_with_a_note_without_all(
    home: Path, tmp_path: Path, port: int, occupy_port: Occupy
) -> None:
    """run warned of a TIME_WAIT that blocks a plain bind while doctor, without --all,
    only counted the port as free: the one diagnosis must say the same everywhere."""
    import json

    from tests.helpers import portpool

    occupy_port("timewait", "127.0.0.1", reuse=True)
    config = tmp_path / "portpool.toml"
    config.write_text(f'app = "tw"\n[services.web]\nbase = {port}\nsize = 1\n')
    text = portpool("doctor", "--config", str(config))
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if f" {port}  " in x)
    assert "free; a server that does not set SO_REUSEADDR cannot bind it yet" in line
    assert f"TIME_WAIT from 127.0.0.1:{port}" in line
    doc = json.loads(portpool("doctor", "--json", "--config", str(config)).stdout)
    (listed,) = [p for p in doc["ports"] if p["port"] == port]
    assert listed["kind"] == "free" and listed["notes"], listed


# A server that daemonizes (double fork, new session) and listens on argv[1]; it prints
# its pid and ends when its stdin closes.
DAEMON = (
    "import os, socket, sys\n"
    "if os.fork(): os._exit(0)\n"
    "os.setsid()\n"
    "if os.fork(): os._exit(0)\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print(os.getpid(), flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_service_that_daemonizes_gets_a_hint_in_the_trip(
    state: StateDir, port: int, occupants: list[subprocess.Popen[str]]
) -> None:
    """A double-forked server is re-parented, so the shield calls it foreign; the trip
    says it may be the service's own detached child."""
    with acquire(state, [port], host="127.0.0.1") as lease:
        lease.close_socket()
        service = _spawn(occupants, sys.executable, "-c", DAEMON, str(port))
        assert service.stdout is not None
        detached = int(service.stdout.readline())
        assert service.wait(timeout=10) == 0  # the first fork's parent is gone
        report = _report(_shield(lease, own_pids=(service.pid,)))
        assert not report.ok
        (problem,) = report.problems
        assert f"listened on by pid {detached} (python" in problem
        assert "if this is your service's own detached child" in problem
        assert 'use socket = "fd")' in problem


@pytest.mark.skipif(sys.platform != "linux", reason="a child subreaper is Linux's")
def test_a_subreaper_gives_no_detached_child_hint(
    state: StateDir, port: int, occupants: list[subprocess.Popen[str]]
) -> None:
    """Under run and up on Linux (subreapers) a daemonized service is adopted, so a
    foreign listener is not one: the hint to keep it in the foreground misled. The
    shield here runs in a subreaper; the listener is a stranger's, started after."""
    holder = (
        "import sys\n"
        "from portpool._platform import become_subreaper, is_subreaper\n"
        "from portpool.pool import acquire\n"
        "from portpool.shield import Shield\n"
        "from portpool.statedir import StateDir\n"
        "assert not is_subreaper() and become_subreaper() and is_subreaper()\n"
        "lease = acquire(StateDir.open(sys.argv[1]), [int(sys.argv[2])])\n"
        "lease.close_socket()  # handed over by number\n"
        "print('leased', flush=True)\n"
        "sys.stdin.readline()\n"
        "shield = Shield([lease], interval_s=1, on_lost=lambda *_: None)\n"
        "(report,) = shield.check_once()\n"
        "print(repr(report.problems), flush=True)\n"
        "lease.release()\n"
    )
    shield = _spawn(occupants, sys.executable, "-c", holder, state.path, str(port))
    assert shield.stdout is not None and shield.stdin is not None
    assert shield.stdout.readline() == "leased\n"
    stranger = _spawn(occupants, sys.executable, "-c", DAEMON, str(port))
    assert stranger.stdout is not None
    detached = int(stranger.stdout.readline())
    shield.stdin.write("go\n")
    shield.stdin.flush()
    problems = shield.stdout.readline()
    assert f"listened on by pid {detached} (python" in problems, problems
    assert "detached child" not in problems, problems


def test_the_leases_handed_over_by_number(state: StateDir, port: int) -> None:
    layout = Layout("a", (Service("web", port, 1, socket="port"), Service("api", port + 1, 1)))
    with acquire(state, [port], service="web") as lease:
        assert handed_over(layout, [lease]) == [lease]  # socket = "port"
        lease.service = "api"  # socket = "fd": its socket is handed over, no note
        assert handed_over(layout, [lease]) == []
        lease.close_socket()  # `run` without --fds
        assert handed_over(layout, [lease]) == [lease]


def test_the_plain_bind_note_counts_many_occupants_and_names_three(
    state: StateDir, port: int
) -> None:
    """A busy port's note listed 5,561 TIME_WAIT connections in one 411,543-char line."""
    many = 40
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(many)
    clients = []
    try:
        for _ in range(many):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            accepted, _ = server.accept()
            accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    finally:
        for client in clients:
            client.close()
        server.close()
    waiting = wait_for(
        lambda: (
            len(w := [s for s in tcp_sockets(port) if s.state == "time-wait" and s.port == port])
            >= many
            and w
        ),
        10,
    )
    with acquire(state, [port], host="127.0.0.1") as lease:
        lease.service = "web"
        (line,) = plain_bind_notes([lease])
    assert line.startswith(
        f"service 'web' port {port}: a server that does not set SO_REUSEADDR cannot bind "
        f"it yet: {len(waiting)} sockets ({len(waiting)} in TIME_WAIT) block it, the first 3: "
    )
    assert line.count("TIME_WAIT from") == 3
    assert len(line) < 500


def test_a_refusal_names_the_listener_and_counts_a_busy_ports_connections(
    state: StateDir, port: int
) -> None:
    """A foreign server with 40 open connections made its refusal one entry per
    connection (3,716 characters in `up`'s error, `doctor` and `status --json`)."""
    many = 40
    server = socket.create_server(("127.0.0.1", port), backlog=many)
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(many):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            pairs.append((client, server.accept()[0]))
        lease = _try_acquire(state, port, "127.0.0.1")
        assert isinstance(lease, PoolExhausted)
        (refusal,) = lease.refusals
        doctor_refusal, _, _ = classify_port(state, port, "127.0.0.1")
        assert doctor_refusal == refusal  # the same words for the pool and doctor
    finally:
        for client, accepted in pairs:
            client.close()  # the client closes first: no TIME_WAIT is left on the port
            accepted.close()
        server.close()
    assert refusal.detail.startswith(f"used by pid {os.getpid()} ("), refusal.detail
    assert f"listening on 127.0.0.1:{port}; " in refusal.detail  # the listener first
    assert refusal.detail.count("has a connection from") == 2  # then 2 of the 40 accepted
    assert refusal.detail.endswith(f"; and {many - 2} more sockets"), refusal.detail
    assert len(str(refusal)) < 500


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's sock_diag names orphans")
def test_a_connection_its_program_closed_is_named_no_process(port: int) -> None:
    """A service's side of a connection it closed (FIN-WAIT-2 while the peer keeps its
    end open) has no process; it was "an unknown process has a connection", in doctor's
    note on every port of a reference app just stopped."""
    server = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    try:
        accepted.close()  # the active close: our side goes to FIN-WAIT-2, orphaned
        server.close()
        wait_for(lambda: any(s.state == "fin-wait-2" for s in tcp_sockets(port)), 10)
        found = diagnose(port, "127.0.0.1")
    finally:
        client.close()
    (orphan,) = [o for o in found.occupants if o.state == "fin-wait-2"]
    assert orphan.orphaned and orphan.pids == ()
    assert orphan.who() == "no process (its program closed it)"
    assert orphan.describe() == (
        f"a closed connection from 127.0.0.1:{port} to {orphan.socket.remote} (fin-wait-2), "
        "which the kernel ends on its own"
    )
    assert found.plain_bind_blocked
    (note,) = found.notes()
    assert "unknown process" not in note and "which the kernel ends on its own" in note


def test_doctor_names_a_listener_on_the_loopback_the_host_does_not_cover(
    state: StateDir, port: int, occupy_port: Occupy, tmp_path: Path
) -> None:
    """A foreign server on [::1]:P beside a 127.0.0.1 layout takes `localhost:P`'s
    clients that try ::1 first (browsers, Node); doctor called the port plainly free."""
    _needs_ipv6("::1")
    from portpool._doctor import examine_layout

    proc = occupy_port("listen", "::1")
    layout = Layout("a", (Service("web", port, 1),), host="127.0.0.1", max_instances=1)
    (verdict,) = examine_layout(layout, state).verdicts
    assert verdict.kind == "free" and verdict.listed  # listed without --all
    assert verdict.describe().startswith(f"free; pid {proc.pid} (python")
    assert verdict.describe().endswith(
        f"listens on [::1]:{port}, which host 127.0.0.1 does not cover: a client of "
        f'localhost:{port} that tries it first reaches that program (host = "localhost" '
        "holds both loopbacks)"
    )
    assert verdict.to_dict()["notes"] == [verdict.describe().removeprefix("free; ")]
    # Held by an instance, it is named too, and is not one of the foreign listeners the
    # shield trips on (those are counted in the summary).
    config = tmp_path / "portpool.toml"
    config.write_text(f'app = "a"\nmax_instances = 1\n[services.web]\nbase = {port}\nsize = 1\n')
    release_file = tmp_path / "release"
    holder = start("run", "--config", str(config), "--", sys.executable, "-c", HOLD,
                   str(release_file))  # fmt: skip
    try:
        assert read_line(holder).strip() == "1"
        report = examine_layout(layout, state)
        (verdict,) = report.verdicts
        assert verdict.kind == "held"
        assert f"listens on [::1]:{port}, which host 127.0.0.1 does not cover" in (
            verdict.describe()
        )
        assert report.summary() == []
    finally:
        release_file.touch()
        holder.wait(timeout=30)
    # A program of the holder's own (a `socket = "port"` service binding ::1 itself) is
    # not named: it is the service.
    other = find_free_block(1, 32000, 32500)
    with acquire(state, [other], host="127.0.0.1"):
        own = socket.socket(socket.AF_INET6)
        try:
            own.bind(("::1", other))
            own.listen()
            one = Layout("a", (Service("web", other, 1),), host="127.0.0.1", max_instances=1)
            (verdict,) = examine_layout(one, state).verdicts
            assert verdict.kind == "held" and verdict.elsewhere == (), verdict
        finally:
            own.close()
    # Beside a 0.0.0.0 layout the fix is ::, which keeps every IPv4 address (localhost
    # would shrink it to the loopbacks).
    every4 = Layout("a", (Service("web", port, 1),), host="0.0.0.0", max_instances=1)
    (verdict,) = examine_layout(every4, state).verdicts
    assert verdict.describe().endswith(
        f"listens on [::1]:{port}, which host 0.0.0.0 does not cover: a client of "
        f'localhost:{port} that tries it first reaches that program (host = "::" holds '
        "every address of both families)"
    )
    # A layout on localhost covers ::1: nothing to say (acquire would refuse the port).
    both = Layout("a", (Service("web", port, 1),), host="localhost", max_instances=1)
    (verdict,) = examine_layout(both, state).verdicts
    assert verdict.elsewhere == () and verdict.kind == "foreign"


def test_doctors_summary_counts_one_intruded_port_in_the_singular() -> None:
    """It read "1 held ports are also listened on"."""
    from portpool._doctor import DoctorReport, PortVerdict

    held = Refusal(7000, "held", "held by instance 1 of a (pid 1, service web)")
    intruded = PortVerdict(1, "web", 7000, held, ("but also listened on by pid 2 ...",))
    one = DoctorReport("a", "127.0.0.1", 1, (intruded,))
    assert one.summary() == [
        "1 held port is also listened on by a foreign program, which can receive their clients"
    ]
    two = DoctorReport("a", "127.0.0.1", 2, (intruded, intruded))
    assert two.summary()[0].startswith("2 held ports are also listened on")
    # Its heading read "app a: 1 instances".
    assert one.heading() == "app a: 1 instance, host 127.0.0.1"
    assert two.heading() == "app a: 2 instances, host 127.0.0.1"


@pytest.mark.parametrize(("lease_host", "address"), [("127.0.0.1", "::1"), ("localhost", "::1")])
def test_doctor_judges_a_held_port_by_the_host_of_the_lease_that_holds_it(
    state: StateDir,
    port: int,
    occupants: list[subprocess.Popen[str]],
    lease_host: str,
    address: str,
) -> None:
    """Two layouts sharing a state dir: doctor of a localhost layout said a foreign
    [::1]:P listener beside another app's lease on 127.0.0.1 "can receive the lease's
    clients (the shield stops the instance)", and that shield never tripped; doctor of a
    127.0.0.1 layout named no intruder beside a localhost lease whose shield trips."""
    _needs_ipv6(lease_host, address)
    with acquire(state, [port], host=lease_host) as lease:
        lease.close_socket()  # handed over by number: the other loopback is open
        intruder = _stranger(occupants, address, port, "-")
        assert intruder is not None
        report = _report(_shield(lease))
        for host in HOSTS:
            refusal, notes, _ = classify_port(state, port, host)
            assert refusal is not None and refusal.reason == "held"
            assert bool(notes) is (not report.ok), (lease_host, host, notes, report)
            layout = Layout("a", (Service("web", port, 1),), host=host, max_instances=1)
            (verdict,) = examine_layout(layout, state).verdicts
            # The other loopback's listener is named once: as an intruder or elsewhere.
            assert verdict.describe().count(f"pid {intruder} (python") == 1, verdict


@pytest.mark.parametrize("value", [0, -1, 65536, True])
def test_a_value_that_is_not_a_port_is_refused_by_the_diagnosis_as_by_acquire(
    state: StateDir, value: int
) -> None:
    """diagnose(0) called port 0 bindable (its probe bound a random port) and 65536 raised
    OverflowError, while acquire refuses both as InvalidPort."""
    with pytest.raises(InvalidPort):
        acquire(state, [value])
    with pytest.raises(InvalidPort):
        diagnose(value, "127.0.0.1")
    with pytest.raises(InvalidPort):
        classify_port(state, value, "127.0.0.1")


def _daemon_sharing(started: list[subprocess.Popen[str]], sock: socket.socket) -> int:
    """A process that shares ``sock`` (inherited, as by a service) and is no descendant
    of this one (started through a shell that exits at once, as a daemon's double fork
    does); its pid. It ends when its stdin closes (``release`` of the shell)."""
    script = 'exec 3<&0; "$@" <&3 3<&- & echo $!'
    wait = (sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()")
    shell = subprocess.Popen(
        ("sh", "-c", script, "sh", *wait),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=[sock.fileno()],
    )
    started.append(shell)
    assert shell.stdout is not None
    pid = int(shell.stdout.readline())
    assert shell.stdout.readline().strip() == "ready"
    return pid


@pytest.mark.parametrize("which", ["the lease's", "one bound after hand-over"])
def test_a_socket_the_holder_shares_with_a_daemon_is_the_holders(
    state: StateDir, port: int, occupants: list[subprocess.Popen[str]], which: str
) -> None:
    """A `socket = "fd"` service that daemonizes keeps the lease's socket: doctor named
    that socket, with the holder's own pid, as a foreign listener "the shield stops",
    and the shield tripped on such a socket it did not know yet (bound after a hand-over
    by number), although the holder itself has it open."""
    with acquire(state, [port], host="127.0.0.1") as lease:
        shield = _shield(lease)
        sock = lease.socket
        assert sock is not None
        if which != "the lease's":
            lease.close_socket()
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
        try:
            daemon = _daemon_sharing(occupants, sock)
            (listener,) = [s for s in tcp_sockets(port) if s.state == "listen"]
            owners = owners_of_inodes([listener.inode or 0])[listener.inode or 0]
            assert sorted(owners) == sorted([os.getpid(), daemon])  # shared, as meant
            refusal, notes, _ = classify_port(state, port, "127.0.0.1")
            assert refusal is not None and refusal.reason == "held"
            assert notes == ()
            assert _report(shield).ok
        finally:
            sock.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's lock table is Linux's")
def test_a_held_port_without_a_readable_record_does_not_name_its_holder_as_an_intruder(
    state: StateDir, port: int, home: Path
) -> None:
    """Between the lock and the record's write, or with a damaged record, doctor named
    the holder's own listening socket as a foreign listener "the shield stops"; the
    shield never counts its own socket."""
    with acquire(state, [port], host="127.0.0.1") as lease:
        (home / "ports" / f"{port}.json").write_bytes(b"{ torn")
        refusal, notes, _ = classify_port(state, port, "127.0.0.1")
        assert refusal is not None and refusal.reason == "held"
        # Naming the file: "unreadable" alone left users to guess which one.
        where = home / "ports" / f"{port}.json"
        assert refusal.detail.endswith(f"metadata unreadable: record has no checksum ({where})")
        assert notes == ()
        problems = _report(_shield(lease)).problems
        assert problems and not any("listened on" in p for p in problems), problems


# A holder of another app that is killed with -9 once its record is written.
DEAD_HOLDER = """
import sys
from portpool.pool import acquire
from portpool.statedir import StateDir
lease = acquire(StateDir.open(), [int(sys.argv[1])], host="127.0.0.1", app="other")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's lock table is Linux's")
def test_a_dead_holders_record_does_not_name_the_new_holder_as_an_intruder(
    state: StateDir, port: int, home: Path, occupants: list[subprocess.Popen[str]]
) -> None:
    """A holder killed with -9 leaves its record until the lock's next holder writes its
    own: doctor took the dead process for the holder and named the new holder's own
    listening socket as a foreign listener "the shield stops"."""
    dead = _spawn(occupants, sys.executable, "-c", DEAD_HOLDER, str(port))
    assert read_line(dead).strip() == "held"
    dead.kill()
    dead.wait()
    # The next holder: locked, bound and listening, its record not written yet.
    lock = PortLock.acquire(state, port)
    try:
        with socket.create_server(("127.0.0.1", port)):
            assert b'"app":"other"' in (home / "ports" / f"{port}.json").read_bytes()
            refusal, notes, found = classify_port(state, port, "127.0.0.1")
            assert refusal is not None and refusal.reason == "held"
            assert found is not None and [o.pids for o in found.occupants] == [(os.getpid(),)]
            assert notes == ()
            # Judged by the host of the layout, not by the dead holder's record.
            layout = Layout("t", (Service("web", port, 1),), host="127.0.0.1", max_instances=1)
            report = examine_layout(layout, state)
            (verdict,) = report.verdicts
            assert verdict.describe().startswith("held by ") and not verdict.notes
            assert report.summary() == []
    finally:
        lock.release()


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's lock table is Linux's")
def test_a_dead_holders_record_is_not_named_as_the_holder_of_the_port(
    state: StateDir, port: int, home: Path, occupants: list[subprocess.Popen[str]]
) -> None:
    """Until the lock's next holder writes its record, the dead one's stays: doctor and
    the pool's refusal said "held by pid <dead>" of a process that no longer ran, while
    the kernel's lock table named the process holding it."""
    dead = _spawn(occupants, sys.executable, "-c", DEAD_HOLDER, str(port))
    assert read_line(dead).strip() == "held"
    dead.kill()
    dead.wait()
    lock = PortLock.acquire(state, port)  # the next holder, its record not written yet
    try:
        refusal, _, _ = classify_port(state, port, "127.0.0.1")
        code = (
            "import sys\n"
            "from portpool.pool import acquire\n"
            "from portpool.statedir import StateDir\n"
            "try:\n"
            "    acquire(StateDir.open(), [int(sys.argv[1])])\n"
            "except Exception as e:\n"
            "    print(e.refusals[0])\n"
        )
        pool = subprocess.run(
            [sys.executable, "-c", code, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refusal is not None and refusal.reason == "held"
        assert str(refusal) == pool.stdout.strip(), pool.stderr
        for text in (refusal.detail, pool.stdout):
            holder, _, record = text.partition(";")
            assert f"held by pid {os.getpid()} (" in holder, text
            assert f"pid {dead.pid}" in record and "which no longer runs" in record, text
    finally:
        lock.release()


# A holder in a pid namespace of its own (a container sharing the state dir and the
# network): its record names pid 1, its pid there. With "port" it closes its socket (a
# hand-over by number), and a foreign program listens there instead.
NAMESPACED_HOLDER = """
import os, sys
from portpool.pool import acquire
from portpool.statedir import StateDir
lease = acquire(StateDir.open(), [int(sys.argv[1])], host="127.0.0.1", app="boxed")
if sys.argv[2] == "port":
    lease.close_socket()
print(os.getpid(), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="pid namespaces are Linux's")
@pytest.mark.parametrize("handed", ["fd", "port"])
def test_a_holder_recorded_under_another_pid_namespace_is_known_by_its_lock(
    state: StateDir,
    port: int,
    occupants: list[subprocess.Popen[str]],
    occupy_port: Occupy,
    handed: str,
) -> None:
    """A record written in another pid namespace names a pid that here is another
    process (pid 1: every process descends from it): doctor counted every listener on
    the port as the holder's, a foreign one that took its clients too; judged by when
    that process started, the holder's own socket read as a foreign listener. The
    process that holds the lock is the holder."""
    argv = ["unshare", "-rpf", "--mount-proc", sys.executable, "-c", NAMESPACED_HOLDER]
    if subprocess.run([*argv[:3], "true"], capture_output=True, check=False).returncode:
        pytest.skip("no unprivileged pid namespace here (unshare -rpf --mount-proc)")
    holder = _spawn(occupants, *argv, str(port), handed)
    assert read_line(holder).strip() == "1"
    if handed == "port":
        intruder = occupy_port("listen", "127.0.0.1")
    refusal, notes, found = classify_port(state, port, "127.0.0.1")
    assert refusal is not None and refusal.detail.startswith("held by pid 1 of app boxed")
    assert found is not None and len(found.occupants) == 1  # the one listener
    if handed == "fd":
        assert notes == ()
    else:
        assert len(notes) == 1 and f"by pid {intruder.pid} " in notes[0], notes


_UNRESOLVED = """
import socket, sys
from portpool import diagnose

port = int(sys.argv[1])
for listening in (False, True):
    server = socket.create_server(("127.0.0.1", port)) if listening else None
    try:
        diagnose(port, "portpool-unresolvable.invalid")
        print("returned")
    except OSError:
        print("OSError")
    if server is not None:
        server.close()
"""


def test_a_host_that_does_not_resolve_raises_whether_or_not_the_port_is_used() -> None:
    """As the docstring says: OSError. It raised only when a socket used the port (its
    address was compared with the host's); on a free port it returned a diagnosis.
    Run on a network of its own (``unshare -rn``), where no name server is reachable:
    the name is never sent off this host."""
    wrap = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if subprocess.run([*wrap, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no unprivileged network namespace here (unshare -rn)")
    port = find_free_block(1)
    done = subprocess.run(
        [*wrap, sys.executable, "-c", _UNRESOLVED, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OSError", "OSError"], done.stdout


@pytest.mark.parametrize("name", ["a" * 64 + ".test", "a..test"])
def test_a_host_name_that_cannot_be_looked_up_is_an_os_error_not_a_unicode_error(
    state: StateDir, name: str
) -> None:
    """Python refuses to encode such a name before any lookup (no query leaves the
    host): its UnicodeError escaped ``diagnose`` and ``acquire`` raw, where a name that
    does not resolve is an OSError, and an argument ``acquire`` cannot use (it was a
    refused port: "no free port in pool", exit code 3)."""
    port = find_free_block(1)
    with pytest.raises(OSError, match=f"host name {name!r} cannot be looked up"):
        diagnose(port, name)
    with pytest.raises(InvalidArgument) as refused:
        acquire(state, [port], host=name)
    assert f"host name {name!r} cannot be looked up" in str(refused.value)
    assert refused.value.exit_code == 2 and isinstance(refused.value, ValueError)


@pytest.mark.skipif(sys.platform != "linux", reason="owners are found by scanning /proc")
def test_doctor_names_the_owners_of_many_foreign_ports_with_one_scan(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """doctor scanned every process's descriptors once per occupied port; one scan (and
    at most one more, for a socket opened since) now serves the whole layout."""
    base = find_free_block(20)
    layout = Layout("a", (Service("web", base, 10), Service("api", base + 10, 10)), max_instances=1)
    with ports_held(range(base, base + 20)) as foreign:
        scans = count_proc_scans(monkeypatch)
        verdicts = examine_layout(layout, state).verdicts
        assert len(verdicts) == 20
        assert all(f"pid {foreign.pid}" in v.describe() for v in verdicts), verdicts[0]
        assert 1 <= len(scans) <= 2, len(scans)


def test_diagnose_never_probes_a_port_whose_portpool_lock_is_held(
    port_base: int, home: Path
) -> None:
    """diagnose() bound a port whose portpool lock another process held (its socket
    closed, about to bind the port itself, as a `portpool_port` test does) for a moment
    to probe it, so that holder's own bind failed now and then (8,259 of 1.85 M binds
    beside a diagnose loop), and called the port bindable. Now it says who holds it,
    as doctor does, without a probe: a probe of the unbound port would succeed.

    (The holder's binds are not counted here: any scan of who has a socket open, as
    ``ss -p`` or ``lsof`` too, holds the holder's closing socket for a moment.)"""
    holder = hold_port_lock(port_base)
    try:
        for _ in range(100):
            found = diagnose(port_base, "127.0.0.1")
            assert not found.bindable
            assert found.bind_error is None and not found.probed  # no probe bind
            refusal = found.refusal()
            assert refusal is not None and refusal.reason == "held", refusal
            assert f"pid {holder.pid}" in str(refusal)
            assert found.to_dict()["held"] == refusal.detail
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert diagnose(port_base, "127.0.0.1").bindable  # released: free again, probed


def test_diagnose_with_no_host_is_a_type_error_as_for_acquire(port_base: int, home: Path) -> None:
    """diagnose(port, None) raised AttributeError ("'NoneType' object has no attribute
    'lower'") from deep in the name handling."""
    with pytest.raises(TypeError, match="host must be a str"):
        diagnose(port_base, None)  # type: ignore[arg-type]
