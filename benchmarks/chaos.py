"""Chaos harness: many processes race for instances and ports while a killer SIGKILLs them.

    python -m benchmarks.chaos --seconds 60 --workers 48 [--json chaos.json]

Workers (forked from this single-threaded harness) loop: start an instance of a test
layout (or acquire one port of some instance's pool), hold it with heartbeat and shield
running, release it, pause, repeat. They announce each phase on a shared pipe (one
``write`` of less than PIPE_BUF bytes is atomic, so a SIGKILL never leaves half a line).

A killer SIGKILLs workers at a steady rate, aimed at workers that just announced an
acquisition or a release (so the kill lands inside ``start_instance``/``release``),
at holders (whose heartbeat rewrites records every 0.1 s), and at random; each victim
is replaced at once.

An independent checker reads the kernel, not portpool's records: ``/proc/locks``
(flock holder of each lock file, matched by inode), ``/proc/net/tcp`` (who listens on
each port) and ``/proc/<pid>/fd`` (which process owns each listening socket). It counts:

- ``double_owner``: the lock holder of a port is not the process listening on it, or
  two processes listen on one port, or two live workers report the same port;
- ``listen_without_lock`` / ``lock_without_listen``: one of the two without the other;
- ``slot_mismatch`` / ``duplicate_instance``: a slot lock held by a worker that says it
  holds another instance (or nothing), or two live workers reporting the same number;
- ``not_taken_after_kill``: after a holder was SIGKILLed, a probe could not take its
  port or slot although no other live process held it;
- ``worker_errors`` / ``shield_trips``: a worker failed on its own, or its shield fired.

The three state conditions count only when they persist across samples for longer than
``--grace`` seconds (default: one shield interval): the lock-then-bind and
close-then-unlock windows are microseconds long. Exit status 1 if any count is nonzero.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._common import find_free_block, read_proc_locks

PORT_LOW, PORT_HIGH = 30000, 39999
SERVICES = ("alpha", "beta", "gamma")
PORTS_PER_SERVICE = 2
STRIDE = 10
_PROBE_TRIES = 20


# ------------------------------------------------------------------ configuration


@dataclass
class Config:
    seconds: float
    workers: int
    kill_rate: float  # kills per second
    max_instances: int
    heartbeat_s: float
    shield_s: float
    grace_s: float
    sample_s: float
    base: int
    state_path: str
    seed: int
    pool_worker_share: float  # fraction of workers that acquire single ports
    gc_share: float  # fraction of instance workers' rounds that run gc instead
    rogues: int  # rule-breaking processes, to prove the checker counts what it claims
    quiet: bool


@dataclass
class Counts:
    """Everything that must stay zero."""

    double_owner: int = 0
    listen_without_lock: int = 0
    lock_without_listen: int = 0
    slot_mismatch: int = 0
    duplicate_instance: int = 0
    not_taken_after_kill: int = 0
    worker_errors: int = 0
    shield_trips: int = 0
    final_blocked: int = 0


@dataclass
class Stats:
    """What happened (proof that the run did real work)."""

    rounds: int = 0  # acquisition attempts announced by workers
    acquisitions: int = 0  # instances started + single ports acquired
    instances: int = 0
    port_leases: int = 0
    busy: int = 0  # NoFreeSlot / PoolExhausted: contention, expected
    gc_runs: int = 0
    kills: int = 0
    kills_acquiring: int = 0
    kills_holding: int = 0
    kills_releasing: int = 0
    kills_random: int = 0
    spawned: int = 0
    probes: int = 0
    probes_taken: int = 0
    probes_held_by_other: int = 0
    probes_skipped: int = 0
    samples: int = 0
    sample_ms_median: float = 0.0
    elapsed_s: float = 0.0


def make_layout(cfg: Config) -> Any:
    from portpool.layout import Layout, Service

    services = tuple(
        Service(name, cfg.base + i * PORTS_PER_SERVICE, PORTS_PER_SERVICE, STRIDE)
        for i, name in enumerate(SERVICES)
    )
    return Layout(
        app="chaos",
        services=services,
        host="127.0.0.1",
        heartbeat_interval_s=cfg.heartbeat_s,
        shield_interval_s=cfg.shield_s,
        max_instances=cfg.max_instances,
        source="<chaos>",
    )


def all_ports(layout: Any) -> list[int]:
    return sorted(
        {
            p
            for n in range(1, layout.max_instances + 1)
            for pool in layout.pools(n).values()
            for p in pool
        }
    )


def find_base(max_instances: int) -> int:
    """A base in 30000-39999 whose whole span of ports is bindable right now."""
    try:
        return find_free_block(STRIDE * max_instances, PORT_LOW, PORT_HIGH)
    except RuntimeError as e:
        raise SystemExit(f"chaos: {e}") from None


# ------------------------------------------------------------------ workers


def _say(fd: int, text: str) -> None:
    line = f"{os.getpid()} {text}\n".encode()
    with contextlib.suppress(OSError):
        os.write(fd, line[:4000])  # < PIPE_BUF: atomic


def rogue_main(wfd: int, cfg: Config, seed: int) -> None:
    """A process that breaks the rules on purpose (``--rogue``), to show the checker sees it:
    it listens on pool ports without their lock, and flocks lock files without listening."""
    import fcntl

    rng = random.Random(seed)
    layout = make_layout(cfg)
    ports = all_ports(layout)
    _say(wfd, "rogue")
    for turn in itertools.count():
        port = rng.choice(ports)
        try:
            if turn % 2 == 0:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                    s.listen()
                    time.sleep(cfg.grace_s * 2.5)
            else:
                path = os.path.join(cfg.state_path, "ports", f"{port}.lock")
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    time.sleep(cfg.grace_s * 2.5)
                finally:
                    os.close(fd)
        except OSError as e:
            _say(wfd, f"rogue {turn} {port} {e}")
        time.sleep(0.05)


def worker_main(wfd: int, cfg: Config, mode: str, seed: int) -> None:
    """One worker's life: acquire, hold, release, pause; forever (until killed)."""
    if mode == "rogue":
        rogue_main(wfd, cfg, seed)
    import logging

    from portpool import pool as pool_mod
    from portpool._gc import gc
    from portpool.errors import PortPoolError, StartError
    from portpool.instance import start_instance
    from portpool.statedir import StateDir

    logging.basicConfig(level=logging.CRITICAL)
    rng = random.Random(seed)
    layout = make_layout(cfg)
    state = StateDir.open(cfg.state_path)

    def lost(lease: object, reason: str) -> None:
        _say(wfd, f"trip {reason}"[:3000])
        os._exit(4)

    while True:
        # Long enough pauses that 48 workers leave a 2-core machine usable.
        hold = rng.uniform(0.1, 0.8)
        pause = rng.uniform(0.1, 0.6)
        try:
            if mode == "pool":
                n = rng.randint(1, layout.max_instances)
                svc = rng.choice(SERVICES)
                _say(wfd, "acq")
                try:
                    lease = pool_mod.acquire(
                        state,
                        layout.pool(svc, n),
                        host=layout.host,
                        app="chaos-pool",
                        instance=n,
                        service=svc,
                    )
                except StartError:
                    _say(wfd, "busy")
                else:
                    _say(wfd, f"lease {lease.port}")
                    time.sleep(hold)
                    _say(wfd, "rel")
                    lease.release()
                    _say(wfd, "free")
            elif rng.random() < cfg.gc_share:
                _say(wfd, "gc")
                gc(state)
                _say(wfd, "free")
            else:
                _say(wfd, "acq")
                try:
                    inst = start_instance(layout, state=state, heartbeat=True)
                except StartError:
                    _say(wfd, "busy")
                else:
                    ports = ",".join(str(p) for p in inst.ports.values())
                    _say(wfd, f"held {inst.number} {ports}")
                    inst.start_shield(on_lost=lost)
                    time.sleep(hold)
                    _say(wfd, "rel")
                    inst.release()
                    _say(wfd, "free")
        except PortPoolError as e:
            _say(wfd, f"err {type(e).__name__}: {e}"[:3000])
            os._exit(1)
        time.sleep(pause)


# ------------------------------------------------------------------ kernel readers


def read_flocks() -> dict[tuple[int, int], set[int]]:
    """(device, inode) -> pids holding a flock on it (waiters excluded), from /proc/locks.

    By device too: with other programs' locks on other file systems, an inode number
    alone can name a file that is not ours.
    """
    held: dict[tuple[int, int], set[int]] = {}
    for lock in read_proc_locks():
        if lock.kind == "FLOCK" and not lock.waiting:  # POSIX/OFD locks are not ours
            held.setdefault((lock.dev, lock.ino), set()).add(lock.pid)
    return held


def read_tcp_listeners(ports: set[int]) -> dict[int, list[int]]:
    """port -> socket inodes listening on it (IPv4 and IPv6), for ports in ``ports``.

    Asked of the kernel's sock_diag (only listening sockets are dumped: cheap even when
    the connection table holds thousands of TIME_WAIT entries); /proc/net/tcp otherwise.
    """
    try:
        found: dict[int, list[int]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for port, inode in _diag_listening(family):
                if port in ports:
                    found.setdefault(port, []).append(inode)
        return found
    except OSError:
        return _proc_tcp_listeners(ports)


_NL_HEADER = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBI48x")  # family, protocol, ext, pad, states, zero sockid
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


def _diag_listening(family: int) -> list[tuple[int, int]]:
    """(port, inode) of every listening TCP socket of ``family``. Raises OSError."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
    try:
        nl.settimeout(2.0)
        req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << 10)  # TCPF_LISTEN
        nl.sendto(_NL_HEADER.pack(_NL_HEADER.size + len(req), 20, 0x301, 1, 0) + req, (0, 0))
        out: list[tuple[int, int]] = []
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NL_HEADER.size <= len(data):
                length, kind, _, _, _ = _NL_HEADER.unpack_from(data, offset)
                if kind == 3:  # NLMSG_DONE
                    return out
                if kind == 2 or length < _NL_HEADER.size:  # NLMSG_ERROR
                    raise OSError("sock_diag refused the request")
                if length >= _NL_HEADER.size + _DIAG_MSG.size:
                    fields = _DIAG_MSG.unpack_from(data, offset + _NL_HEADER.size)
                    out.append((int.from_bytes(fields[4], "big"), fields[14]))
                offset += (length + 3) & ~3
    finally:
        nl.close()


def _proc_tcp_listeners(ports: set[int]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            f = open(table, encoding="ascii")  # noqa: SIM115
        except FileNotFoundError:
            continue
        with f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) < 10 or fields[3] != "0A":
                    continue
                port = int(fields[1].rpartition(":")[2], 16)
                if port in ports:
                    found.setdefault(port, []).append(int(fields[9]))
    return found


def socket_owners(pids: set[int], wanted: set[int]) -> dict[int, set[int]]:
    """socket inode -> pids (among ``pids``) that have it open, for inodes in ``wanted``."""
    owners: dict[int, set[int]] = {}
    if not wanted:
        return owners
    for pid in pids:
        for inode in _socket_inodes(pid) & wanted:
            owners.setdefault(inode, set()).add(pid)
    return owners


def _socket_inodes(pid: int) -> set[int]:
    """The socket inodes process ``pid`` has open (empty if it is gone)."""
    found: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def all_socket_owners(wanted: set[int]) -> dict[int, set[int]]:
    """Like ``socket_owners`` over every process (for sockets no worker owns)."""
    pids = {int(e) for e in os.listdir("/proc") if e.isdigit()}
    return socket_owners(pids, wanted)


def file_inode(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, as ``read_flocks`` keys them."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ------------------------------------------------------------------ the harness


@dataclass
class Worker:
    pid: int
    mode: str
    phase: str = "start"  # start, acq, busy, held, lease, rel, free, gc
    instance: int | None = None
    ports: tuple[int, ...] = ()
    killed: bool = False


@dataclass
class _Anomaly:
    signature: object
    since: float
    samples: int = 1
    counted: bool = False


@dataclass
class Harness:
    cfg: Config
    layout: Any
    rng: random.Random
    counts: Counts = field(default_factory=Counts)
    stats: Stats = field(default_factory=Stats)
    workers: dict[int, Worker] = field(default_factory=dict)
    anomalies: dict[tuple[str, int], _Anomaly] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    armed: str | None = None  # "acq" / "rel": kill the next worker entering that phase
    sample_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        from portpool.statedir import StateDir

        self.state = StateDir.open(self.cfg.state_path)
        self.ports = all_ports(self.layout)
        self.port_set = set(self.ports)
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self.buffer = b""
        self.slot_dir = os.path.join(self.cfg.state_path, "apps", self.layout.app, "instances")
        self.port_dir = os.path.join(self.cfg.state_path, "ports")

    # -- workers

    def spawn(self, mode: str) -> None:
        seed = self.rng.getrandbits(32)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the harness
            code = 0
            try:
                os.close(self.rfd)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                worker_main(self.wfd, self.cfg, mode, seed)
            except BaseException:
                import traceback

                _say(self.wfd, "err " + traceback.format_exc()[-2000:].replace("\n", " | "))
                code = 1
            os._exit(code)
        self.workers[pid] = Worker(pid, mode)
        self.stats.spawned += 1

    def log(self, text: str) -> None:
        self.details.append(text)
        if not self.cfg.quiet:
            print(f"chaos: {text}", file=sys.stderr, flush=True)

    def kill(self, w: Worker, category: str) -> None:
        if w.killed:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)
        w.killed = True
        self.stats.kills += 1
        setattr(self.stats, f"kills_{category}", getattr(self.stats, f"kills_{category}") + 1)
        probe = w.phase in ("held", "lease", "rel")
        victim_ports, victim_slot = (w.ports, w.instance) if probe else ((), None)
        if not self._reap(w.pid, timeout_s=2.0):
            self.stats.probes_skipped += 1
            return
        del self.workers[w.pid]
        if victim_ports:
            self.probe_port(w.pid, self.rng.choice(victim_ports))
            if victim_slot is not None:
                self.probe_slot(w.pid, victim_slot)
        self.spawn(w.mode)

    def _reap(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if done:
                return True
            time.sleep(0.001)
        return False

    def reap_exited(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self.drain()
            code = os.waitstatus_to_exitcode(status)
            if w.killed:
                continue
            if code == 4:
                self.counts.shield_trips += 1
            else:
                self.counts.worker_errors += 1
            self.log(f"worker {pid} ({w.mode}) exited on its own with status {code}")
            self.spawn(w.mode)

    # -- probes after a kill (rule 1: a dead holder's lock is free at once)

    def _live_other(self, pids: set[int], victim: int) -> bool:
        return any(p != victim and p in self.workers and not self.workers[p].killed for p in pids)

    def probe_port(self, victim: int, port: int) -> None:
        from portpool import pool as pool_mod
        from portpool.errors import PoolExhausted

        def attempt() -> str | None:
            try:
                lease = pool_mod.acquire(
                    self.state, [port], host=self.layout.host, app="chaos-probe"
                )
            except PoolExhausted as e:
                return str(e.refusals)
            lease.release()
            return None

        self._probe(victim, attempt, f"{self.port_dir}/{port}.lock", port, f"port {port}")

    def probe_slot(self, victim: int, number: int) -> None:
        from portpool._heldlock import HeldLock
        from portpool.errors import LockHeld

        directory = self.state.instances(self.layout.app)

        def attempt() -> str | None:
            try:
                held = HeldLock.acquire(directory, f"{number}.lock")
            except LockHeld as e:
                return str(e)
            held.release()
            return None

        self._probe(victim, attempt, f"{self.slot_dir}/{number}.lock", None, f"slot {number}")

    def _probe(
        self, victim: int, attempt: Any, lock_path: str, port: int | None, what: str
    ) -> None:
        """Take what the killed ``victim`` held, at once. A refusal is fine only while the
        kernel shows another live process holding it (a newcomer got there first); a
        holder seen between our try and our look is given a few more tries."""
        self.stats.probes += 1
        refusal = None
        holders: set[int] = set()
        owners: set[int] = set()
        for _ in range(_PROBE_TRIES):
            refusal = attempt()
            if refusal is None:
                self.stats.probes_taken += 1
                return
            holders = read_flocks().get(file_inode(lock_path) or (-1, -1), set())
            owners = set()
            if port is not None:
                listening = set(read_tcp_listeners({port}).get(port, []))
                owners = set().union(*all_socket_owners(listening).values()) if listening else set()
            if self._live_other(holders | owners, victim):
                self.stats.probes_held_by_other += 1
                return
            time.sleep(0.01)
        self.counts.not_taken_after_kill += 1
        self.log(
            f"{what} of killed pid {victim} could not be taken: {refusal}; "
            f"kernel lock holders {holders}, listeners owned by {owners}"
        )

    # -- worker reports

    def drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.handle(line.decode(errors="replace"))

    def handle(self, line: str) -> None:
        pid_text, _, rest = line.partition(" ")
        kind, _, args = rest.partition(" ")
        w = self.workers.get(int(pid_text)) if pid_text.isdigit() else None
        if w is None or w.killed:
            return  # a late line of a worker already killed
        w.phase = kind
        if kind == "acq":
            self.stats.rounds += 1
            w.instance, w.ports = None, ()
        elif kind == "held":
            number, _, ports = args.partition(" ")
            w.instance, w.ports = int(number), tuple(int(p) for p in ports.split(","))
            self.stats.acquisitions += 1
            self.stats.instances += 1
            self._check_reported_unique(w)
        elif kind == "lease":
            w.instance, w.ports = None, (int(args),)
            self.stats.acquisitions += 1
            self.stats.port_leases += 1
            self._check_reported_unique(w)
        elif kind == "busy":
            self.stats.busy += 1
        elif kind == "gc":
            self.stats.gc_runs += 1
        elif kind in ("rel", "free"):
            if kind == "free":
                w.instance, w.ports = None, ()
        elif kind == "trip":
            self.log(f"worker {w.pid}: shield tripped: {args}")
        elif kind == "err":
            self.log(f"worker {w.pid}: {args}")
        if self.armed == kind and kind in ("acq", "rel"):
            self.armed = None
            self.kill(w, "acquiring" if kind == "acq" else "releasing")

    def _holding(self) -> list[Worker]:
        return [w for w in self.workers.values() if not w.killed and w.phase in ("held", "lease")]

    def _check_reported_unique(self, new: Worker) -> None:
        """At the moment a worker reports a new holding, no other live worker may report
        the same instance number or port (a worker says "rel" before releasing)."""
        for w in self._holding():
            if w is new:
                continue
            same_instance = new.instance is not None and w.instance == new.instance
            shared = set(w.ports) & set(new.ports)
            if not (same_instance or shared) or not _alive(w.pid):
                continue  # a worker that died on its own, not reaped yet, holds nothing
            if same_instance:
                self.counts.duplicate_instance += 1
                inode = file_inode(f"{self.slot_dir}/{new.instance}.lock")
                self.log(
                    f"instance {new.instance} reported by pids {w.pid} and {new.pid}; "
                    f"kernel: slot lock {inode} held by "
                    f"{read_flocks().get(inode or (-1, -1))}"
                    f" fds {_fd_files(w.pid)} / {_fd_files(new.pid)}"
                )
            if shared:
                self.counts.double_owner += 1
                self.log(f"ports {sorted(shared)} reported by pids {w.pid} and {new.pid}")

    # -- the kernel checker

    def sample(self) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        flocks = read_flocks()
        listening = read_tcp_listeners(self.port_set)
        live = {w.pid for w in self.workers.values() if not w.killed}
        port_holders: dict[int, set[int]] = {}
        for port in self.ports:
            inode = file_inode(f"{self.port_dir}/{port}.lock")
            port_holders[port] = flocks.get(inode, set()) if inode is not None else set()
        owners = self._listener_owners(listening, port_holders, live)
        seen: dict[tuple[str, int], object] = {}
        for port in self.ports:
            holders = port_holders[port]
            inodes = listening.get(port, [])
            listeners = {p for i in inodes for p in owners.get(i, {-1})}
            if len(inodes) > 1 or len(listeners) > 1 or len(holders) > 1:
                seen[("double_owner", port)] = (
                    tuple(inodes),
                    frozenset(listeners),
                    frozenset(holders),
                )
            elif holders and listeners and holders != listeners:
                seen[("double_owner", port)] = (frozenset(holders), frozenset(listeners))
            elif listeners and not holders:
                seen[("listen_without_lock", port)] = frozenset(listeners)
            elif holders and not listeners:
                seen[("lock_without_listen", port)] = frozenset(holders)
        numbers: dict[int, int] = {}
        for n in range(1, self.layout.max_instances + 1):
            inode = file_inode(f"{self.slot_dir}/{n}.lock")
            holders = flocks.get(inode, set()) if inode is not None else set()
            for pid in holders:
                w = self.workers.get(pid)
                # A slot lock is held by its instance, or briefly by a starter/gc run
                # cleaning stale records (phase "acq"/"gc"), or during release.
                if w is None or w.killed:
                    if pid != os.getpid():
                        seen[("slot_mismatch", n)] = (pid, "not a live worker")
                elif w.phase == "held" and w.instance != n:
                    seen[("slot_mismatch", n)] = (pid, w.instance)
                elif w.phase not in ("held", "acq", "gc", "rel", "start"):
                    seen[("slot_mismatch", n)] = (pid, w.phase)
        for w in self._holding():
            if w.instance is not None:
                numbers[w.instance] = numbers.get(w.instance, 0) + 1
        for n, k in numbers.items():
            if k > 1:
                seen[("duplicate_instance", n)] = k
        self._account(seen, now)
        self.stats.samples += 1
        self.sample_ms.append((time.perf_counter() - t0) * 1000)

    def _listener_owners(
        self, listening: dict[int, list[int]], port_holders: dict[int, set[int]], live: set[int]
    ) -> dict[int, set[int]]:
        """socket inode -> pids that have it open, read from /proc/<pid>/fd.

        Scanning every worker's fd table each sample costs ~100 ms on a loaded 2-core
        machine, so the lock holder's table (a kernel fact) is looked at first; sockets
        found nowhere there, and every tenth sample, get the full scan.
        """
        wanted = {i for inodes in listening.values() for i in inodes}
        if self.stats.samples % 10 == 0:
            owners = socket_owners(live | {os.getpid()}, wanted)
        else:
            owners = {}
            tables: dict[int, set[int]] = {}
            for port, inodes in listening.items():
                for pid in port_holders.get(port, set()):
                    if pid not in tables:
                        tables[pid] = _socket_inodes(pid)
                    for inode in inodes:
                        if inode in tables[pid]:
                            owners.setdefault(inode, set()).add(pid)
            missing = wanted - owners.keys()
            if missing:
                # Sockets bound after /proc/locks was read: their owner is acquiring now.
                acquiring = {w.pid for w in self.workers.values() if w.phase == "acq"}
                owners.update(socket_owners(acquiring & live, missing))
                missing = wanted - owners.keys()
            if missing:
                owners.update(socket_owners(live | {os.getpid()}, missing))
        unowned = wanted - owners.keys()
        if unowned:
            owners.update(all_socket_owners(unowned))
        return owners

    def _account(self, seen: dict[tuple[str, int], object], now: float) -> None:
        for key in list(self.anomalies):
            if key not in seen:
                del self.anomalies[key]
        for key, signature in seen.items():
            a = self.anomalies.get(key)
            if a is None or a.signature != signature:
                self.anomalies[key] = _Anomaly(signature, now)
                continue
            a.samples += 1
            if not a.counted and a.samples >= 2 and now - a.since > self.cfg.grace_s:
                a.counted = True
                kind, where = key
                setattr(self.counts, kind, getattr(self.counts, kind) + 1)
                self.log(f"{kind} at {where} for {now - a.since:.2f} s: {signature}")

    # -- the run

    def run(self) -> None:
        cfg = self.cfg
        pool_workers = round(cfg.workers * cfg.pool_worker_share)
        for i in range(cfg.workers):
            self.spawn("pool" if i < pool_workers else "instance")
        for _ in range(cfg.rogues):
            self.spawn("rogue")
        start = time.monotonic()
        end = start + cfg.seconds
        next_sample = start
        next_kill = start + self.rng.expovariate(cfg.kill_rate) if cfg.kill_rate > 0 else end
        while (now := time.monotonic()) < end:
            timeout = max(0.0, min(next_sample, next_kill, end) - now)
            ready, _, _ = select.select([self.rfd], [], [], timeout)
            if ready:
                self.drain()
            self.reap_exited()
            now = time.monotonic()
            if now >= next_kill and cfg.kill_rate > 0:
                self.kill_someone()
                next_kill = now + self.rng.expovariate(cfg.kill_rate) if cfg.kill_rate else end
            if now >= next_sample:
                self.drain()
                self.sample()
                next_sample = now + cfg.sample_s
        self.stats.elapsed_s = round(time.monotonic() - start, 1)
        self.stop_all()
        self.final_check()

    def kill_someone(self) -> None:
        choice = self.rng.random()
        if choice < 0.35:
            self.armed = "acq"  # the next worker announcing an acquisition dies in it
            return
        if choice < 0.5:
            self.armed = "rel"
            return
        live = [w for w in self.workers.values() if not w.killed and w.mode != "rogue"]
        holding = [w for w in live if w.phase in ("held", "lease")]
        if choice < 0.8 and holding:
            self.kill(self.rng.choice(holding), "holding")
        elif live:
            self.kill(self.rng.choice(live), "random")

    def stop_all(self) -> None:
        for w in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGKILL)
            w.killed = True
        for pid in list(self.workers):
            self._reap(pid, timeout_s=5.0)
        self.workers.clear()

    def final_check(self) -> None:
        """Once every worker is dead: nothing is locked or listened on, and every slot and
        every instance's first ports can be taken (nothing half-written blocks anyone)."""
        from portpool.errors import PortPoolError
        from portpool.instance import start_instance

        flocks = read_flocks()
        listening = read_tcp_listeners(self.port_set)
        for port in self.ports:
            inode = file_inode(f"{self.port_dir}/{port}.lock")
            if inode in flocks or port in listening:
                self.counts.final_blocked += 1
                self.log(f"after the run port {port} is still locked or listened on")
        started = []
        try:
            for n in range(1, self.layout.max_instances + 1):
                try:
                    # Pinned: unpinned, a start prefers this directory's last number.
                    inst = start_instance(self.layout, state=self.state, heartbeat=False, number=n)
                except PortPoolError as e:
                    self.counts.final_blocked += 1
                    self.log(f"after the run, starting instance {n} failed: {e}")
                    break
                started.append(inst)
                expected = {s: pool[0] for s, pool in self.layout.pools(n).items()}
                if inst.number != n or inst.ports != expected:
                    self.counts.final_blocked += 1
                    self.log(f"after the run got {inst!r}, expected number {n} ports {expected}")
        finally:
            for inst in started:
                inst.release()


def _fd_files(pid: int) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if "instances" in target:
                    out.append(
                        f"{target.rpartition('/')[2]}:{os.stat(f'/proc/{pid}/fd/{name}').st_ino}"
                    )
    return out


def _alive(pid: int) -> bool:
    """Alive and not a zombie (a killed worker not reaped yet is dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def summary(h: Harness) -> dict[str, Any]:
    if h.sample_ms:
        h.stats.sample_ms_median = round(sorted(h.sample_ms)[len(h.sample_ms) // 2], 2)
    cfg = asdict(h.cfg)
    cfg.pop("quiet")
    return {
        "config": cfg,
        "stats": asdict(h.stats),
        "counts": asdict(h.counts),
        "ok": not any(asdict(h.counts).values()),
        "details": h.details[:200],
    }


def print_report(doc: dict[str, Any]) -> None:
    cfg, stats, counts = doc["config"], doc["stats"], doc["counts"]
    print(
        f"chaos: {cfg['workers']} workers, {stats['elapsed_s']} s, ports "
        f"{cfg['base']}..{cfg['base'] + STRIDE * cfg['max_instances'] - 1}, "
        f"{cfg['max_instances']} slots, kill rate {cfg['kill_rate']}/s"
    )
    for name, value in stats.items():
        print(f"  {name:<22} {value}")
    print("counts (all must be 0):")
    for name, value in counts.items():
        print(f"  {name:<22} {value}{'' if value == 0 else '   <-- FAIL'}")
    print("chaos: OK" if doc["ok"] else "chaos: FAILED")


def parse_args(argv: list[str] | None) -> tuple[Config, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=30.0, help="how long to run (default 30)")
    p.add_argument("--workers", type=int, default=48, help="worker processes (default 48)")
    p.add_argument("--kill-rate", type=float, default=3.0, help="SIGKILLs per second (default 3)")
    p.add_argument("--max-instances", type=int, default=24, help="instance slots (default 24)")
    p.add_argument("--heartbeat", type=float, default=0.1, help="heartbeat interval, s")
    p.add_argument("--shield", type=float, default=1.0, help="shield interval, s")
    p.add_argument("--grace", type=float, default=None, help="persistence before a count, s")
    p.add_argument("--sample", type=float, default=0.2, help="checker sampling interval, s")
    p.add_argument("--base", type=int, default=None, help="first port (default: a free block)")
    p.add_argument("--state", default=None, help="state dir (default: a fresh temporary one)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--pool-workers", type=float, default=0.25, help="share of single-port workers")
    p.add_argument("--gc", type=float, default=0.05, help="share of rounds that run gc")
    p.add_argument(
        "--rogue",
        type=int,
        default=0,
        help="also run N rule-breaking processes (the counts must then be nonzero)",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no per-event lines on stderr")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().getrandbits(32)
    base = a.base if a.base is not None else find_base(a.max_instances)
    if not PORT_LOW <= base <= PORT_HIGH - STRIDE * a.max_instances:
        p.error(f"--base must leave the whole span inside {PORT_LOW}..{PORT_HIGH}")
    return Config(
        seconds=a.seconds,
        workers=a.workers,
        kill_rate=a.kill_rate,
        max_instances=a.max_instances,
        heartbeat_s=a.heartbeat,
        shield_s=a.shield,
        grace_s=a.grace if a.grace is not None else a.shield,
        sample_s=a.sample,
        base=base,
        state_path=a.state or "",
        seed=seed,
        pool_worker_share=a.pool_workers,
        gc_share=a.gc,
        rogues=a.rogue,
        quiet=a.quiet,
    ), a.json_path


def main(argv: list[str] | None = None) -> int:
    if not sys.platform.startswith("linux"):
        print("chaos: the checker reads /proc; Linux only", file=sys.stderr)
        return 2
    cfg, json_path = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="portpool-chaos-") as tmp:
        if not cfg.state_path:
            cfg.state_path = os.path.join(tmp, "state")
        harness = Harness(cfg, make_layout(cfg), random.Random(cfg.seed))
        try:
            harness.run()
        finally:
            harness.stop_all()
        doc = summary(harness)
    print_report(doc)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
