"""The shield: every interval, check that each lease of an instance is still ours.

Per lease, each check asks:

1. lock: our fd still holds the kernel lock and the path still names that file;
2. metadata: the record at the path still names our pid and start token;
3. port: our socket is still open, bound to our address and listening, and no other
   process listens on that port where it can receive traffic meant for the lease: on
   any address the lease covers (both loopbacks for ``localhost``), by the one rule of
   ``portpool.diagnosis`` (so another user's ``[::]`` socket with ``IPV6_V6ONLY`` never
   trips a lease on 127.0.0.1: that was a denial of service against every user);
4. instance: the slot lock and record are still ours (``instance_check``).

The first failure is a trip: ``on_lost`` is called once and the shield stops. The
original shield only re-read its own lock file and reacted by deleting files, which
cascaded into the other holder's failure; this one looks at the port too and leaves
the reaction to the caller. A check reads ``/proc/locks`` and the kernel's socket
tables once for all leases, so it stays cheap enough to run every second.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from portpool._addresses import covered_scopes, overlaps, socket_scopes
from portpool._platform import (
    LockTable,
    TcpSocket,
    descends_from,
    locked_inodes,
    owners_of_inode,
    process_name,
    socket_inode,
    tcp_sockets,
)
from portpool.diagnosis import Occupant, meets

if TYPE_CHECKING:
    import asyncio

    from portpool.pool import Lease

log = logging.getLogger("portpool.shield")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A check that finds a problem (or cannot run) is repeated with fresh kernel reads
# before it counts: a read racing a heartbeat write or a child re-binding is no trip.
_RETRY_DELAYS_S = (0.01, 0.05)


@dataclass(frozen=True)
class LeaseReport:
    """What one check found for one lease (or, with ``kind="instance"``, the slot)."""

    service: str
    port: int
    ok: bool
    problems: tuple[str, ...]  # human-readable reasons, empty when ok
    kind: Literal["lease", "instance"] = "lease"

    def __str__(self) -> str:
        what = "instance" if self.kind == "instance" else f"{self.service} port {self.port}"
        return f"{what}: {'ok' if self.ok else '; '.join(self.problems)}"


@functools.lru_cache(maxsize=256)
def parse_address(text: str) -> IPAddress:
    """An IP address from a socket or table, v4-mapped IPv6 as IPv4. Raises ValueError."""
    addr = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def takes_traffic(listener_address: str, ours: IPAddress, v6only: bool | None = None) -> bool:
    """Whether a socket listening on ``listener_address`` (``v6only``: its IPV6_V6ONLY,
    None if unknown) would take traffic meant for a socket on ``ours`` (same port).
    ``portpool.diagnosis.takes_traffic`` is the same rule for a lease's whole host."""
    try:
        theirs = parse_address(listener_address)
    except ValueError:
        return True  # an address we cannot read: assume the worst
    mine = socket_scopes(ours.version, str(ours), ours.version == 6)
    return overlaps(socket_scopes(theirs.version, str(theirs), v6only), mine)


def _expected_address(lease: Lease) -> IPAddress | None:
    """The address our socket is bound to, as far as it can be known now."""
    sock = lease.socket
    if sock is not None and sock.fileno() != -1:
        with contextlib.suppress(OSError, ValueError):
            return parse_address(str(sock.getsockname()[0]))
    try:
        return parse_address(lease.host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(lease.host, None, type=socket.SOCK_STREAM)
        return parse_address(str(infos[0][4][0]))
    except (OSError, ValueError, IndexError):
        return None


class _Snapshot:
    """The kernel reads of one check, made at most once and shared by every lease."""

    def __init__(self, own_pids: Callable[[], Iterable[int]] | None) -> None:
        self._own_pids = own_pids
        self.refresh()

    def refresh(self) -> None:
        self._locked: LockTable | None = None
        self._locked_read = False
        self._listeners: dict[int, list[TcpSocket]] | None = None
        self._children: set[int] | None = None

    def locked(self) -> LockTable | None:
        if not self._locked_read:
            self._locked = locked_inodes()
            self._locked_read = True
        return self._locked

    def listeners_on(self, port: int) -> list[TcpSocket]:
        if self._listeners is None:
            by_port: dict[int, list[TcpSocket]] = {}
            for found in tcp_sockets(listening_only=True):
                by_port.setdefault(found.port, []).append(found)
            self._listeners = by_port
        return self._listeners.get(port, [])

    def children(self) -> set[int]:
        """Our supervised children's pids (asked only when needed)."""
        if self._children is None:
            self._children = set() if self._own_pids is None else set(self._own_pids())
        return self._children

    def is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is this process, a supervised child, or a descendant of one
        (a service's worker, the real server behind a shell wrapper)."""
        if pid == os.getpid() or pid in self.children():
            return True
        return bool(self.children()) and descends_from(pid, self.children())


@dataclass
class _Watch:
    """One lease and what the shield has learned about it."""

    lease: Lease
    address: IPAddress | None
    # Every address the lease covers; None: unknown (a name that stopped resolving),
    # so every listener on the port counts.
    scopes: frozenset[tuple[int, str | None]] | None = None
    base_inodes: set[int] = field(default_factory=set)  # our socket's, passed to children
    resolved_inodes: set[int] = field(default_factory=set)  # found in own processes


class Shield:
    """Watches the leases of one instance and trips once when one stops being ours.

    ``on_lost(lease, reason)`` is called once, on the first trip (``lease`` is None for
    an instance-level problem), in the shield's thread (or, with ``run_async``, in the
    event loop's thread); its exceptions are logged, never raised. A stopped shield
    never fires. The shield never trips because of the heartbeat's age.
    """

    def __init__(
        self,
        leases: Sequence[Lease],
        *,
        interval_s: float,
        on_lost: Callable[[Lease | None, str], None],
        instance_check: Callable[[], str | None] | None = None,
        own_pids: Callable[[], Iterable[int]] | None = None,
        name: str = "portpool-shield",
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"shield interval must be positive, not {interval_s!r}")
        self.interval_s = float(interval_s)
        self.name = name
        self._on_lost = on_lost
        self._instance_check = instance_check
        self._own_pids = own_pids
        self._watches = [self._watch(lease) for lease in leases]
        self._state = threading.Lock()  # orders a trip against stop()
        self._check_mutex = threading.Lock()  # one check at a time: the caches are shared
        self._stop_event = threading.Event()
        self._stopped = False
        self._tripped: str | None = None
        self._checks_completed = 0  # by the loop; tests prove "no trip" meant "checked"
        self._running = False
        self._thread: threading.Thread | None = None
        self._async_wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    @staticmethod
    def _watch(lease: Lease) -> _Watch:
        try:
            scopes: frozenset[tuple[int, str | None]] | None = covered_scopes(lease.host)
        except OSError:
            scopes = None
        watch = _Watch(lease, _expected_address(lease), scopes)
        inode = lease.socket_inode if lease.socket is not None else None
        if inode is not None:
            watch.base_inodes.add(inode)
        return watch

    # ------------------------------------------------------------ public surface

    @property
    def tripped(self) -> str | None:
        """The reason of the trip, once tripped; None before (and after a plain stop)."""
        return self._tripped

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def checks_completed(self) -> int:
        """How many checks the shield's loop (thread or task) has run to the end, found
        trouble or not; ``check_once`` calls are not counted. "No trip for a while"
        means nothing until this has grown: a loaded machine may run no check at all."""
        return self._checks_completed

    def start(self) -> None:
        """Check every ``interval_s`` from a daemon thread. Raises RuntimeError if the
        shield already runs or was stopped."""
        self._claim()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop checking. Once this returns the shield never fires, even if a check was
        in flight (a trip already decided before it may still be finishing ``on_lost``).
        Waits up to ``timeout`` for the thread, unless called from the shield's own
        thread (e.g. by ``on_lost``). Idempotent."""
        with self._state:
            self._stopped = True
        self._stop_event.set()
        wake = self._async_wake
        if wake is not None:
            loop, event = wake
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(event.set)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def check_once(self) -> list[LeaseReport]:
        """Run every check now, retrying transient failures, and report per lease (plus
        one ``kind="instance"`` report when there is an ``instance_check``). Never trips."""
        return self._check(abort=lambda: False)

    def verify_all(self) -> list[LeaseReport]:
        """The report of ``check_once``, for ``status`` and ``doctor``."""
        return self.check_once()

    async def run_async(self) -> None:
        """The shield's loop as an asyncio task: checks run in the loop's default
        executor, ``on_lost`` in the loop's thread. Cancelling the task stops the shield.
        Raises RuntimeError if the shield already runs or was stopped."""
        import asyncio

        self._claim()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._async_wake = (loop, wake)
        try:
            next_at = time.monotonic() + self.interval_s
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, next_at - time.monotonic()))
                if self._stop_event.is_set():
                    return
                found = await loop.run_in_executor(None, self._find_trip)
                if found is not None:
                    self._fire(*found)
                    return
                next_at = self._next_time(next_at)
        finally:
            self._async_wake = None
            with self._state:
                self._stopped = True
            self._stop_event.set()

    # ------------------------------------------------------------ the loop

    def _claim(self) -> None:
        with self._state:
            if self._stopped:
                raise RuntimeError(f"{self.name} was stopped; create a new shield")
            if self._running:
                raise RuntimeError(f"{self.name} is already running")
            self._running = True

    def _next_time(self, previous: float) -> float:
        # Keep a steady rhythm; after an overrun (a slow /proc scan) wait a full interval.
        now = time.monotonic()
        nxt = previous + self.interval_s
        return nxt if nxt > now else now + self.interval_s

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # e.g. an interval too large to wait for (OverflowError)
            # A shield whose thread died is off: that is a trip, never a silent end.
            log.exception("%s: the shield's thread failed", self.name)
            self._fire(None, f"the shield stopped working: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop_event.wait(max(0.0, next_at - time.monotonic())):
            try:
                found = self._find_trip()
            except Exception:  # a bug in a check must not silently end the shield
                log.exception("%s: a check failed unexpectedly", self.name)
                found = None
            if found is not None:
                self._fire(*found)
                return
            next_at = self._next_time(next_at)

    def _find_trip(self) -> tuple[Lease | None, str] | None:
        """The first failure of one check, as (lease, reason), or None."""
        reports = self._check(abort=self._stop_event.is_set)
        if self._stop_event.is_set():
            return None  # a check interrupted by stop() proves nothing
        self._checks_completed += 1
        for watch, report in zip(self._watches, reports, strict=False):
            if not report.ok:
                reason = "; ".join(report.problems)
                if watch.lease.service:
                    reason = f"service {watch.lease.service!r}: {reason}"
                return watch.lease, reason
        if len(reports) > len(self._watches) and not reports[-1].ok:
            return None, "; ".join(reports[-1].problems)
        return None

    def _fire(self, lease: Lease | None, reason: str) -> None:
        with self._state:
            if self._stopped:
                return  # stop() won the race: a stopped shield never fires
            self._stopped = True
            self._tripped = reason
        self._stop_event.set()
        # Reported once, by on_lost's owner (the CLI prints it; Instance's default logs it):
        # logging here too printed every trip three times.
        log.debug("%s tripped: %s", self.name, reason)
        try:
            self._on_lost(lease, reason)
        except Exception:
            log.exception("%s: on_lost failed after the trip: %s", self.name, reason)

    # ------------------------------------------------------------ the checks

    def _check(self, abort: Callable[[], bool]) -> list[LeaseReport]:
        with self._check_mutex:
            snapshot = _Snapshot(self._own_pids)
            reports: list[LeaseReport] = []
            for watch in self._watches:
                if abort():
                    break
                lease = watch.lease
                problems = self._retrying(
                    functools.partial(self._lease_problems, watch, snapshot), snapshot, abort
                )
                reports.append(LeaseReport(lease.service, lease.port, not problems, problems))
            instance_check = self._instance_check
            if instance_check is not None and not abort():

                def check_instance() -> list[str]:
                    problem = instance_check()
                    return [] if problem is None else [problem]

                problems = self._retrying(check_instance, snapshot, abort)
                reports.append(LeaseReport("", 0, not problems, problems, "instance"))
            return reports

    @staticmethod
    def _retrying(
        check: Callable[[], list[str]], snapshot: _Snapshot, abort: Callable[[], bool]
    ) -> tuple[str, ...]:
        """Problems that ``check`` finds on every attempt; errors count only if they last."""
        problems: list[str] = []
        for attempt in range(len(_RETRY_DELAYS_S) + 1):
            if attempt:
                time.sleep(_RETRY_DELAYS_S[attempt - 1])
                if abort():
                    return ()
                snapshot.refresh()
            try:
                problems = check()
            except Exception as e:  # OSError mostly; anything else is retried the same way
                log.debug("check failed, retrying: %r", e)
                problems = [f"could not be checked: {e}"]
            if not problems:
                return ()
        return tuple(problems)

    def _lease_problems(self, watch: _Watch, snapshot: _Snapshot) -> list[str]:
        lock_problem = watch.lease.lock.problem(locked=snapshot.locked())
        problems = [] if lock_problem is None else [lock_problem]
        problems.extend(self._port_problems(watch, snapshot))
        return problems

    def _port_problems(self, watch: _Watch, snapshot: _Snapshot) -> list[str]:
        lease = watch.lease
        port = lease.port
        problems: list[str] = []
        sock = lease.socket  # None: handed to a child by number, so nothing to hold
        ours = set(watch.base_inodes)
        socket_closed = sock is not None and sock.fileno() == -1
        if sock is not None and not socket_closed:
            problem = self._socket_problem(watch, sock)
            if problem is not None:
                problems.append(problem)
            inode = socket_inode(sock)
            if inode is not None:
                ours.add(inode)
        ours |= watch.resolved_inodes
        seen_inodes: set[int] = set()
        ours_listening = False
        for listener in snapshot.listeners_on(port):
            if listener.inode is not None:
                seen_inodes.add(listener.inode)
            if watch.scopes is not None and not meets(listener, watch.scopes):
                continue
            foreign = self._foreign_owner(listener, ours, watch, snapshot)
            if foreign is None:
                ours_listening = True
                continue
            also = "also " if sock is not None and not socket_closed else ""
            problems.append(f"port {port} is now {also}listened on by {foreign}")
        # Forget inodes of our children's sockets that are gone (a restart re-binds).
        watch.resolved_inodes &= seen_inodes
        if socket_closed and not ours_listening:
            problems.append(
                f"port {port}: our listening socket was closed, so the port is not reserved"
            )
        return problems

    @staticmethod
    def _socket_problem(watch: _Watch, sock: socket.socket) -> str | None:
        """Whether our socket is still bound to our address and port, and listening."""
        port = watch.lease.port
        name = sock.getsockname()
        if name[1] != port:
            return f"port {port}: our socket is now bound to port {name[1]}"
        if watch.address is not None and parse_address(str(name[0])) != watch.address:
            return f"port {port}: our socket is now bound to {name[0]}, not {watch.address}"
        accept_option = getattr(socket, "SO_ACCEPTCONN", None)
        if accept_option is not None and not sock.getsockopt(socket.SOL_SOCKET, accept_option):
            return f"port {port}: our socket is no longer listening"
        return None

    @staticmethod
    def _foreign_owner(
        listener: TcpSocket, ours: set[int], watch: _Watch, snapshot: _Snapshot
    ) -> str | None:
        """None if ``listener`` is ours (or the OS will not say whose), else who has it,
        in the words of ``portpool.diagnosis`` (as ``doctor`` says it)."""
        if listener.inode is not None:
            if listener.inode in ours:
                return None
            # An unknown socket: find its processes (a /proc scan, so only now).
            pids = owners_of_inode(listener.inode)
            foreign = [p for p in pids if not snapshot.is_ours(p)]
            if pids and not foreign:
                watch.resolved_inodes.add(listener.inode)
                return None
            return _occupant(listener, foreign, watch.lease)
        if listener.pid is not None:
            if snapshot.is_ours(listener.pid):
                return None
            return _occupant(listener, [listener.pid], watch.lease)
        return None  # the OS does not say whose: never trip on a guess


def _occupant(listener: TcpSocket, pids: list[int], lease: Lease) -> str:
    """``pid 12 (nginx) on [::]:8000 (IPv6 and IPv4)``: the diagnosis's words."""
    found = Occupant(listener, tuple(pids), tuple(process_name(p) or "?" for p in pids))
    text = f"{found.who()} on {found.place()}"
    if _maybe_detached_service(pids, lease):
        text += (
            " (if this is your service's own detached child, keep it in the foreground"
            ' or use socket = "fd")'
        )
    return text


def _maybe_detached_service(pids: list[int], lease: Lease) -> bool:
    """Whether a foreign listener may be the service itself, daemonized: the port was
    handed over by number (a double fork re-parents the server, so it is no descendant
    of ours), and the process is our user's and started after the lease was taken."""
    sock = lease.socket
    record = lease.record
    if not pids or record is None or (sock is not None and sock.fileno() != -1):
        return False
    import psutil

    try:
        me = psutil.Process().username()
        procs = [psutil.Process(p) for p in pids]
        # 1 s of slack: process start times are read in clock ticks since boot
        return all(
            pr.username() == me and pr.create_time() >= record.acquired_at - 1 for pr in procs
        )
    except (psutil.Error, OSError):
        return False
