"""Pools and leases: rotation past held and foreign ports, refusals, the socket, release."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from tests.helpers import count_proc_scans, mounted_tmpfs, ports_held, run_python

from portpool._portstatus import inspect_port
from portpool.errors import InvalidArgument, InvalidPort, LayoutError, PoolExhausted, PortPoolError
from portpool.lock import PortLock
from portpool.pool import Lease, acquire, bind_listen
from portpool.statedir import StateDir

FOREIGN = r"""
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b"foreign")
    conn.close()
"""


@pytest.fixture(params=["127.0.0.1", "0.0.0.0"])
def foreign(request: pytest.FixtureRequest, port_base: int):
    """A plain program (not portpool) listening on ``port_base``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREIGN, request.param, str(port_base)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    yield proc
    proc.kill()
    proc.wait()


def _connect(port: int, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=5) as c:
        return c.recv(16)


def test_acquire_returns_listening_socket_and_record(state: StateDir, port_base: int):
    pool = [port_base, port_base + 1]
    with acquire(state, pool, app="app", instance=2, service="api") as lease:
        assert isinstance(lease, Lease)
        assert lease.port == port_base
        assert lease.refusals == []
        assert lease.socket is not None
        assert lease.socket.getsockname() == ("127.0.0.1", port_base)
        client = socket.create_connection(("127.0.0.1", port_base), timeout=5)
        conn, _ = lease.socket.accept()  # it is listening: the reservation is real
        conn.close()
        client.close()
        assert lease.record is not None
        assert (lease.record.app, lease.record.instance, lease.record.service) == (
            "app",
            2,
            "api",
        )
        assert lease.socket_inode == os.fstat(lease.fileno()).st_ino
        assert inspect_port(state, port_base).record == lease.record
    assert lease.socket is None
    assert inspect_port(state, port_base).is_free


def test_release_twice_and_after_context_is_safe(state: StateDir, port_base: int):
    lease = acquire(state, [port_base])
    sock = lease.socket
    lease.release()
    lease.release()
    with lease:
        pass
    assert sock is not None
    assert sock.fileno() == -1
    assert inspect_port(state, port_base).is_free
    acquire(state, [port_base]).release()  # and the port is free to take again


def test_a_lease_dropped_unreleased_stays_whole_until_the_process_exits(
    state: StateDir, port_base: int
):
    """Dropped without release, the garbage collector closed a lease's socket and its
    lock stayed: the port was locked with nothing listening, and nothing left to
    release it. It now keeps lock, socket and record together until exit."""
    code = (
        "import gc, socket, sys, warnings\n"
        "warnings.simplefilter('error')\n"  # a socket closed by the collector warns
        "from portpool.errors import PoolExhausted\n"
        "from portpool.pool import acquire\n"
        "from portpool.statedir import StateDir\n"
        "state, port = StateDir.open(sys.argv[1]), int(sys.argv[2])\n"
        "acquire(state, [port], service='web')\n"
        "gc.collect()\n"
        "socket.create_connection(('127.0.0.1', port), timeout=5).close()  # still listens\n"
        "try:\n"
        "    acquire(state, [port])\n"
        "except PoolExhausted as e:\n"
        "    print(e.refusals[0])\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, state.path, str(port_base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == f"port {port_base}: held (by this process already)\n"
        assert child.stdout.readline() == "done\n"
        seen = inspect_port(state, port_base)  # from outside: its record, its holder
        assert seen.record is not None and seen.record.pid == child.pid, seen
        assert seen.record.service == "web"
    finally:
        child.communicate("", timeout=30)
    assert child.returncode == 0
    assert inspect_port(state, port_base).is_free  # the exit freed it, as any lock


def test_listen_again_revives_a_socket_a_holder_shut_down(state: StateDir, port_base: int):
    """shutdown(2) by any holder of the listening socket stops it listening for all;
    it stays bound, so ``listen_again`` makes it serve the same port again."""
    with acquire(state, [port_base]) as lease:
        assert lease.socket is not None
        assert lease.listen_again() is False  # listening: nothing to do
        copy = socket.socket(fileno=os.dup(lease.fileno()))  # as a service holds it
        copy.shutdown(socket.SHUT_RDWR)
        copy.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port_base), timeout=5).close()
        assert lease.listen_again() is True
        socket.create_connection(("127.0.0.1", port_base), timeout=5).close()
        assert lease.socket.getsockname()[1] == port_base


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's accept-queue bound")
def test_listen_again_keeps_the_backlog_it_was_acquired_with(state: StateDir, port_base: int):
    """A revived socket queued 128 connections whatever ``acquire(backlog=)`` said."""
    with acquire(state, [port_base], backlog=1) as lease:
        copy = socket.socket(fileno=os.dup(lease.fileno()))
        copy.shutdown(socket.SHUT_RDWR)
        copy.close()
        assert lease.listen_again() is True
        # Linux queues backlog + 1 accepted connections, then drops the next SYN.
        queued = [socket.create_connection(("127.0.0.1", port_base), timeout=5) for _ in "ab"]
        try:
            with pytest.raises(TimeoutError):
                socket.create_connection(("127.0.0.1", port_base), timeout=0.5).close()
        finally:
            for client in queued:
                client.close()


def test_rotates_past_a_port_held_by_another_lease(state: StateDir, port_base: int):
    pool = [port_base, port_base + 1, port_base + 2]
    with acquire(state, pool, service="a") as first, acquire(state, pool, service="b") as second:
        assert (first.port, second.port) == (port_base, port_base + 1)
        [refusal] = second.refusals
        assert refusal.port == port_base
        assert refusal.reason == "held"
        assert "by this process already" in refusal.detail


def test_rotates_past_a_port_held_by_another_process(state: StateDir, port_base: int):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from portpool.pool import acquire; from portpool.statedir import "
            "StateDir; l = acquire(StateDir.open(), [int(sys.argv[1])], app='other', "
            "instance=5, service='web'); print('ok', flush=True); time.sleep(60)",
            str(port_base),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ok"
        with acquire(state, [port_base, port_base + 1]) as lease:
            assert lease.port == port_base + 1
            [refusal] = lease.refusals
            assert refusal.reason == "held"
            assert f"pid {holder.pid}" in refusal.detail
            assert "instance 5 of other" in refusal.detail
    finally:
        holder.kill()
        holder.wait()


def test_foreign_listener_makes_acquire_rotate(state: StateDir, port_base: int, foreign):
    with acquire(state, [port_base, port_base + 1], service="api") as lease:
        assert lease.port == port_base + 1
        [refusal] = lease.refusals
        assert refusal.port == port_base
        assert refusal.reason == "in use"
        # The refusal names the foreign program as the OS tells it: pid and program.
        assert f"pid {foreign.pid} (python" in refusal.detail
    # Never fought: the foreign program still runs and still serves its port.
    assert foreign.poll() is None
    assert _connect(port_base) == b"foreign"
    # portpool locked nothing it could not bind: the port's lock was given back.
    assert inspect_port(state, port_base).is_free


def test_pool_exhausted_names_every_port(state: StateDir, port_base: int, foreign):
    other = acquire(state, [port_base + 1], service="mine")
    try:
        with pytest.raises(PoolExhausted) as info:
            acquire(state, [port_base, port_base + 1], service="api")
    finally:
        other.release()
    err = info.value
    assert err.service == "api"
    assert err.pool == [port_base, port_base + 1]
    assert [(r.port, r.reason) for r in err.refusals] == [
        (port_base, "in use"),
        (port_base + 1, "held"),
    ]
    assert f"pid {foreign.pid}" in str(err)
    assert err.exit_code == 3


def test_unassigned_address_is_refused_as_unavailable(state: StateDir, port_base: int):
    with pytest.raises(PoolExhausted) as info:
        acquire(state, [port_base], host="192.0.2.1")  # TEST-NET-1: not on this host
    [refusal] = info.value.refusals
    assert refusal.reason == "unavailable"
    assert inspect_port(state, port_base).is_free


def test_privileged_port_is_refused_as_permission_denied(tmp_path: Path):
    """As an unprivileged user, ports below 1024 cannot be bound: refused, not crashed."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start == 0:
        pytest.skip("this kernel lets anyone bind any port: nothing to refuse")
    code = (
        "import os, sys, psutil\n"
        "from portpool.errors import PoolExhausted\n"
        "from portpool.pool import acquire\n"
        "from portpool.statedir import StateDir\n"
        "if os.getuid() == 0:\n"
        "    os.setgid(65534)\n"
        "    os.setuid(65534)\n"
        "try:\n"
        "    acquire(StateDir.open(sys.argv[1]), [int(sys.argv[2]) - 1])\n"
        "except PoolExhausted as e:\n"
        "    print(e.refusals[0].reason)\n"
    )
    state_path = tmp_path / "state"
    if os.getuid() == 0:  # the child drops to nobody: give it a state dir it owns
        shared = Path(tempfile.mkdtemp(prefix="portpool-nobody-"))
        shared.chmod(0o755)
        state_path = shared / "state"
        state_path.mkdir(mode=0o700)
        os.chown(state_path, 65534, 65534)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(state_path), str(start)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if os.getuid() == 0:
            shutil.rmtree(state_path.parent)
    assert out.stdout.strip() == "permission denied", out.stderr


def test_invalid_ports_are_caller_errors_not_layout_errors(state: StateDir):
    # A bad argument once raised LayoutError(file="pool"), as if a layout file were wrong.
    for bad in (0, 65536, -1, True):
        with pytest.raises(InvalidPort) as info:
            acquire(state, [bad])
        assert isinstance(info.value, ValueError)
        assert not isinstance(info.value, LayoutError)
        assert info.value.value is bad


def test_a_pool_given_as_an_iterator_is_tried_not_used_up(state: StateDir, port_base: int):
    # Checking the ports once consumed an iterator or a generator: a free port was then
    # refused as "no free port in pool []".
    for pool in (iter([port_base]), (p for p in [port_base]), range(port_base, port_base + 1)):
        with acquire(state, pool) as lease:
            assert lease.port == port_base


def test_a_pool_given_as_one_str_is_a_type_error(state: StateDir, port_base: int):
    # A str is a sequence: its characters were checked as ports ("'2' is not a port").
    with pytest.raises(TypeError, match="port numbers"):
        acquire(state, str(port_base))  # type: ignore[arg-type]
    # host=None raised AttributeError ('NoneType' object has no attribute 'lower').
    with pytest.raises(TypeError, match="host must be a str"):
        acquire(state, [port_base], host=None)  # type: ignore[arg-type]
    assert inspect_port(state, port_base).is_free  # nothing was locked


@pytest.mark.parametrize(
    ("arguments", "error", "words"),
    [
        # A record that no reader could read: "metadata unreadable" in doctor and diagnose.
        ({"instance": "1"}, TypeError, "instance must be an int, not '1'"),
        ({"instance": True}, TypeError, "instance must be an int, not True"),
        ({"instance": -1}, InvalidArgument, "instance=-1: must be 0 or more"),
        ({"app": 5}, TypeError, "app must be a str, not 5"),  # "object of type 'int' has no len()"
        ({"service": None}, TypeError, "service must be a str, not None"),
        ({"backlog": 2**31}, InvalidArgument, "backlog=2147483648: must be 0 or more"),  # Overflow
        ({"backlog": "x"}, TypeError, "backlog must be an int, not 'x'"),
        # Each was "no free port in pool" (PoolExhausted, exit code 3): every bind failed.
        ({"host": "127.0.0.1:8000"}, InvalidArgument, "host='127.0.0.1:8000': cannot be resolved"),
        ({"host": ""}, InvalidArgument, "host='': cannot be resolved"),
        ({"host": " 127.0.0.1"}, InvalidArgument, "host=' 127.0.0.1': cannot be resolved"),
        ({"host": "fe80::1"}, InvalidArgument, "host='fe80::1': is a link-local address without"),
        # Leased and listened on, where no TCP client ever reaches it.
        ({"host": "224.0.0.1"}, InvalidArgument, "host='224.0.0.1': is a multicast or broadcast"),
        ({"host": "ff02::1"}, InvalidArgument, "is a multicast or broadcast address"),
        ({"host": "255.255.255.255"}, InvalidArgument, "is a multicast or broadcast address"),
        ({"host": "::ffff:224.0.0.1"}, InvalidArgument, "is a multicast or broadcast address"),
        # Short and numeric forms, which the resolver turns into those addresses.
        ({"host": "224.1"}, InvalidArgument, "host='224.1': is a multicast or broadcast"),
        ({"host": "4294967295"}, InvalidArgument, "is a multicast or broadcast address"),
    ],
)
def test_arguments_acquire_cannot_use_are_refused_before_any_port_is_locked(
    state: StateDir, port_base: int, arguments: dict[str, object], error: type, words: str
) -> None:
    with pytest.raises(error) as refused:
        acquire(state, [port_base], **arguments)  # type: ignore[arg-type]
    assert words in str(refused.value)
    if error is InvalidArgument:
        assert isinstance(refused.value, ValueError) and refused.value.exit_code == 2
    assert inspect_port(state, port_base).is_free  # nothing was locked or written
    with acquire(state, [port_base], instance=3, app="app", service="api", host="LOCALHOST"):
        assert inspect_port(state, port_base).record is not None  # the good ones still do


def test_fileno_of_a_lease_whose_socket_a_server_closed_raises(state: StateDir, port_base: int):
    """A server given ``lease.socket`` closes it as it stops: fileno() then returned -1,
    which a service handed it as its fd took for a valid descriptor."""
    with acquire(state, [port_base]) as lease:
        assert lease.socket is not None
        lease.socket.close()
        with pytest.raises(PortPoolError, match="socket was already closed"):
            lease.fileno()


def test_a_state_or_pool_of_the_wrong_kind_is_a_type_error_that_says_what_is_wanted(
    tmp_path: Path, state: StateDir, port_base: int
) -> None:
    # Each raised AttributeError ('str' object has no attribute 'ports') or "'NoneType'
    # object is not iterable" from deep inside.
    with pytest.raises(TypeError, match=r"state must be a StateDir \(StateDir\.open\(\)\)"):
        acquire(str(tmp_path), [port_base])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pool must be port numbers"):
        acquire(state, None)  # type: ignore[arg-type]

    class Ports:  # iterable through __getitem__ alone, as Python iterates it: still a pool
        def __getitem__(self, index: int) -> int:
            if index:
                raise IndexError(index)
            return port_base

    with acquire(state, Ports()) as lease:  # type: ignore[arg-type]
        assert lease.port == port_base
    assert inspect_port(state, port_base).is_free  # nothing was locked


def test_empty_pool_is_exhausted(state: StateDir):
    with pytest.raises(PoolExhausted) as info:
        acquire(state, [])
    assert info.value.refusals == []


def test_close_socket_keeps_the_lock(state: StateDir, port_base: int):
    with acquire(state, [port_base]) as lease:
        lease.close_socket()
        assert lease.socket is None
        assert lease.socket_inode is None
        assert inspect_port(state, port_base).state == "held"
        with pytest.raises(PoolExhausted):
            acquire(state, [port_base])
    assert inspect_port(state, port_base).is_free


def test_heartbeat_through_the_lease(state: StateDir, port_base: int):
    with acquire(state, [port_base]) as lease:
        assert lease.record is not None
        before = lease.record.heartbeat_at
        lease.lock.heartbeat(now=before + 5)
        lease.heartbeat()
        assert inspect_port(state, port_base).record.heartbeat_at >= before


def test_bind_listen_is_exclusive(port_base: int):
    sock = bind_listen("127.0.0.1", port_base)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with pytest.raises(OSError):
            bind_listen("127.0.0.1", port_base).close()
        with pytest.raises(OSError):
            bind_listen("0.0.0.0", port_base).close()
    finally:
        sock.close()


def test_bind_listen_ipv6_and_names(port_base: int):
    try:
        v6 = bind_listen("::1", port_base)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with v6:
        assert v6.family == socket.AF_INET6
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    with bind_listen("localhost", port_base + 1) as named:
        assert named.getsockname()[1] == port_base + 1


def test_lease_from_a_locked_port_after_kill_9(state: StateDir, port_base: int):
    """kill -9 of a holder between lock and release: the port is free at once."""
    code = (
        "import os, sys, time\n"
        "from portpool.pool import acquire\n"
        "from portpool.statedir import StateDir\n"
        "l = acquire(StateDir.open(), [int(sys.argv[1])], service='doomed')\n"
        "print('ok', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port_base)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ok"
    assert inspect_port(state, port_base).record.pid == proc.pid
    proc.kill()
    proc.wait()
    with acquire(state, [port_base, port_base + 1], service="next") as lease:
        assert lease.port == port_base
        assert lease.refusals == []


def test_port_lock_is_released_when_bind_fails(state: StateDir, port_base: int, foreign):
    with pytest.raises(PoolExhausted):
        acquire(state, [port_base])
    lock = PortLock.acquire(state, port_base)  # not left locked by the failed attempt
    lock.release()


def test_a_lease_refuses_pickling_with_what_to_pass_instead(state: StateDir, port_base: int):
    # multiprocessing's spawn and forkserver (the default start methods off Linux and
    # from Python 3.14) pickle a Process's arguments: a Lease failed with "cannot pickle
    # '_thread.lock' object". The socket is what another process can be given.
    import pickle
    from multiprocessing.reduction import ForkingPickler

    with acquire(state, [port_base], service="web") as lease:
        for dumps in (pickle.dumps, ForkingPickler.dumps):
            with pytest.raises(
                TypeError, match=r"Lease \(port \d+\) cannot be pickled.*lease\.socket"
            ):
                dumps(lease)
        assert lease.socket is not None and lease.socket.getsockname()[1] == port_base


# A file system that refuses to grow our files (a quota, a full disk), made real with a
# file size limit of 0 bytes in a child process: every record write fails with EFBIG.
NO_GROWTH = r"""
import resource, signal, sys
from portpool.errors import PortPoolError, StateDirError
from portpool.pool import acquire
from portpool.statedir import StateDir

port = int(sys.argv[1])
state = StateDir.open()
held = acquire(state, [port])  # its record is written while writes still work
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal, please
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
for what, call in (("heartbeat", held.heartbeat), ("acquire", lambda: acquire(state, [port + 1]))):
    try:
        call()
        print(what, "no error")
    except StateDirError as e:
        print(what, "StateDirError", e.path.rsplit("/", 1)[-1], e.problem)
    except PortPoolError as e:
        print(what, type(e).__name__, e)
held.release()
"""


def test_a_file_system_that_refuses_record_writes_is_a_state_dir_error(
    home: Path, port_base: int
) -> None:
    # acquire() once grew each new record file before its lock's record was written,
    # outside the handler that reports a failed write: the OSError (EFBIG, EDQUOT)
    # escaped `except PortPoolError`. Lease.heartbeat() let it out too.
    done = run_python(NO_GROWTH, str(port_base))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"heartbeat StateDirError {port_base}.json cannot write metadata: File too large",
        f"acquire StateDirError {port_base + 1}.json cannot write metadata: File too large",
    ]
    assert inspect_port(StateDir.open(str(home)), port_base + 1).is_free


def test_a_read_only_state_dir_is_a_state_dir_error_not_an_exhausted_pool(
    tmp_path: Path, port_base: int
) -> None:
    # Every port's lock file failed to open with EROFS, each a per-port refusal: acquire
    # raised PoolExhausted (exit 3, "no free port") advising to "remove what is there".
    from portpool.errors import StateDirError

    with mounted_tmpfs(tmp_path / "fs", "1m") as fs:
        state = StateDir.open(str(fs / "state"))
        acquire(state, [port_base]).release()  # the ports directory exists
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(StateDirError) as info:
            acquire(state, [port_base + 1, port_base + 2])
        assert info.value.path == str(fs / "state" / "ports")
        assert "Read-only file system" in info.value.problem
        assert "remove what is there" not in info.value.problem
        state.close()


def test_a_pool_refused_port_by_port_reads_the_lock_table_once(
    state: StateDir, port_base: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refused port's holder was named by a read of the kernel's whole lock table:
    with every port of a 2,000-port pool held elsewhere, acquire took 61 s to raise
    PoolExhausted. One read now serves the whole pool (counted, not timed)."""
    import portpool._portstatus as portstatus

    pool = list(range(port_base, port_base + 20))
    with ports_held(pool, "lease") as holder:
        reads: list[object] = []
        real = portstatus.locked_inodes

        def counted() -> object:
            reads.append(None)
            return real()

        monkeypatch.setattr(portstatus, "locked_inodes", counted)
        with pytest.raises(PoolExhausted) as info:
            acquire(state, pool, service="api")
        assert [r.reason for r in info.value.refusals] == ["held"] * len(pool)
        # Each still names its holder, from the one table.
        assert all(f"pid {holder.pid}" in r.detail for r in info.value.refusals), info.value
        assert len(reads) == 1, len(reads)


def test_a_lease_released_after_its_state_dir_was_closed_erases_its_record(
    home: Path, port_base: int
) -> None:
    """The release could not look at its path through the closed state dir: it left
    its record whole (this live pid), and gc said "its holder still runs but does not
    hold <port>.lock" until the process exited."""
    from portpool._gc import gc

    with StateDir.open() as state:
        lease = acquire(state, [port_base], service="web")
    lease.release()
    record = home / "ports" / f"{port_base}.json"
    assert f'"pid":{os.getpid()}'.encode() not in record.read_bytes()
    with StateDir.open() as state:
        assert inspect_port(state, port_base).is_free
        assert gc(state).problems == []
        with acquire(state, [port_base]) as again:  # and the port is there to take
            assert again.port == port_base


@pytest.mark.skipif(sys.platform != "linux", reason="owners are found by scanning /proc")
def test_a_pool_a_foreign_program_holds_is_refused_with_one_scan_of_socket_owners(
    state: StateDir, port_base: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refused port's occupant was named by a scan of every process's descriptors:
    a 2,000-port pool held by a foreign program took 10 s to refuse (7 M readlinks).
    One scan (and at most one more, for a socket opened since) serves the pool."""
    pool = list(range(port_base, port_base + 20))
    with ports_held(pool) as foreign:
        scans = count_proc_scans(monkeypatch)
        with pytest.raises(PoolExhausted) as info:
            acquire(state, pool, service="api")
        assert all(f"pid {foreign.pid}" in r.detail for r in info.value.refusals), info.value
        assert len(info.value.refusals) == len(pool) and 1 <= len(scans) <= 2, len(scans)
