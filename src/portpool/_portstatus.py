"""Who holds a port in a state dir, seen from outside: ``inspect_port`` and ``PortStatus``.

Read-only: never disturbs a holder, and never answers "free" while the port's kernel lock
is held (an unreadable record is "held-unreadable").
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable
from typing import Literal, NamedTuple

from portpool._dataclass import dataclass
from portpool._heldlock import is_held, lock_path_problem
from portpool._jsonfile import read_json_file, record_problem
from portpool._platform import (
    DirHandle,
    LockTable,
    OpenFiles,
    identity_of,
    is_alive,
    locked_inodes,
    namespace_pids,
    process_name,
)
from portpool._record import PortRecord, read_port_record
from portpool._text import printable
from portpool.errors import StateDirError
from portpool.statedir import StateDir

PortState = Literal["free", "held", "held-unreadable"]


@dataclass(frozen=True)
class PortStatus:
    """What the state dir says about one port."""

    port: int
    state: PortState
    record: PortRecord | None = None
    problem: str | None = None  # why the record is unreadable
    # The record is a dead holder's (its process no longer runs): the lock's holder has
    # not written its own yet. ``holder``: that holder's pid, where the kernel names it.
    stale: bool = False
    holder: int | None = None
    # The lock is held through another name of the file (a hard link) and no record
    # names this port: why this path is not a lock file portpool made, as acquire says
    # it of a free one. doctor called such a port "held, metadata unreadable (not
    # written yet)", which never changed.
    unusable: str | None = None
    # The record's live process holds the flock of this port's lock file, removed or
    # replaced under it: doctor said "free" and a start took the port (gc said its
    # holder still ran), until the holder's shield tripped.
    lock_removed: bool = False

    @property
    def is_free(self) -> bool:
        return self.state == "free"

    def describe(self) -> str:
        """``free``, ``held by <the record's holder>``, or what is known of a holder its
        record does not name. Raises nothing."""
        if self.state == "free":
            return "free"
        if self.unusable is not None:
            return self.unusable
        if self.lock_removed and self.record is not None:
            return (
                f"held by {self.record.describe()}, its {self.port}.lock removed or replaced "
                "under it (it stops at its shield's next check)"
            )
        if self.record is not None and not self.stale:
            return f"held by {self.record.describe()}"
        who = "held"
        if self.holder is not None:
            name = process_name(self.holder)
            who = f"held by pid {self.holder}" + (f" ({printable(name)})" if name else "")
        if self.record is not None and self.record.pid == self.holder:
            # Not "pid P holds it; the record names pid P, which no longer runs".
            return (
                f"{who}; its record names {self.record.describe()} with another start "
                "time (an earlier process of that pid, or a record edited by hand)"
            )
        if self.record is not None:
            return (
                f"{who}; its record still names the previous holder, "
                f"{self.record.describe()}, which no longer runs"
            )
        if self.problem is None:
            return f"{who}, metadata unreadable (not written yet)"
        return f"{who}, metadata unreadable: {self.problem}"  # it ends with its file's path


def lock_holder(directory: DirHandle, name: str, locked: LockTable | None) -> int | None:
    """The pid the kernel's lock table names for ``<dir>/<name>``, if that process holds
    the lock on that file (a pid the table names may have been reused); None if unknown.
    Raises nothing."""
    try:
        entry = directory.stat_entry(name)
        table = locked_inodes() if locked is None else locked
    except OSError:
        return None
    if entry is None or table is None:
        return None
    pid = table.get((entry.st_dev, entry.st_ino))
    path = os.path.join(os.path.realpath(directory.path), name)
    if pid is None or not OpenFiles().holds_flock(pid, path, entry.st_dev, entry.st_ino):
        return None
    return pid


def _unusable(directory: DirHandle, name: str) -> str | None:
    """``lock_path_problem``, None where the path cannot be examined."""
    try:
        return lock_path_problem(directory, name)
    except OSError:
        return None


def _stale(record: PortRecord, holder: int | None) -> bool:
    """Whether ``record`` names a process that does not run, nor holds the lock from
    another pid namespace (the holder's start token and boot id are the record's)."""
    if is_alive(record.identity):
        return False
    seen = None if holder is None else identity_of(holder)
    return seen is None or (seen.start_token, seen.boot_id) != (
        record.start_token,
        record.boot_id,
    )


def removed_lock_status(
    directory: DirHandle, port: int, record: PortRecord | None
) -> PortStatus | None:
    """The status of ``port`` when ``record`` names a live process that holds the flock
    of its lock file removed or replaced under it (by hand, a cleaner of /tmp): the port
    is still that process's until its shield trips. None otherwise, or where that
    cannot be told (not Linux)."""
    if record is None or not is_alive(record.identity):
        return None
    path = os.path.realpath(os.path.join(directory.path, f"{port}.lock"))
    if not OpenFiles().holds_removed_flock(record.pid, path):
        return None
    return PortStatus(port, "held", record, lock_removed=True)


def is_recorded_process(holder: int, pid: object, start_token: object, boot_id: object) -> bool:
    """Whether the process ``holder`` (a pid of this namespace) is the one a record names
    by ``pid``, ``start_token`` and ``boot_id``, seen from another pid namespace too (a
    container sharing the state dir): by its pid in its own namespace, not by the token
    alone (two processes started in one clock tick share it). Raises nothing."""
    seen = identity_of(holder)
    if seen is None or (seen.start_token, seen.boot_id) != (start_token, boot_id):
        return False
    inner = namespace_pids(holder)
    return inner is None or pid in inner


def _other_holder(
    directory: DirHandle, port: int, record: PortRecord, locked: LockTable | None
) -> int | None:
    """The pid holding ``port``'s lock when the kernel names another process than the
    live one ``record`` names (a record edited by hand); None when it names that one or
    cannot tell. Only a lock the table gives to another pid is looked into further."""
    try:
        entry = directory.stat_entry(f"{port}.lock")
    except OSError:
        return None
    listed = None if entry is None or locked is None else locked.get((entry.st_dev, entry.st_ino))
    if listed in (None, record.pid):
        return None
    holder = lock_holder(directory, f"{port}.lock", locked)
    if holder is None or identity_of(holder) is None:
        return None  # cannot tell
    if is_recorded_process(holder, record.pid, record.start_token, record.boot_id):
        return None
    return holder


def inspect_port(state: StateDir, port: int, locked: LockTable | None = None) -> PortStatus:
    """Who holds ``port`` in this state dir. Never "free" while its lock is held.

    ``locked`` is a ``locked_inodes()`` snapshot, to share one kernel read among many ports.
    """
    directory = state.find("ports")  # read-only: a state dir never used has no ports
    if directory is None:
        return PortStatus(port, "free")
    if locked is None:
        locked = locked_inodes()
    if not is_held(directory, f"{port}.lock", locked):
        with contextlib.suppress(ValueError):
            removed = removed_lock_status(directory, port, read_port_record(directory, port))
            if removed is not None:
                return removed
        return PortStatus(port, "free")
    try:
        record = read_port_record(directory, port)
    except ValueError as e:
        holder = lock_holder(directory, f"{port}.lock", locked)
        why = record_problem(e, directory, f"{port}.json")
        return PortStatus(port, "held-unreadable", None, why, holder=holder)
    if record is None or record.port != port:
        problem = None
        if record is not None:  # with its path, as every other unreadable record's
            problem = record_problem(f"record names port {record.port}", directory, f"{port}.json")
        holder = lock_holder(directory, f"{port}.lock", locked)
        return PortStatus(
            port,
            "held-unreadable",
            None,
            problem,
            holder=holder,
            unusable=_unusable(directory, f"{port}.lock"),
        )
    if is_alive(record.identity):
        other = _other_holder(directory, port, record, locked)
        if other is None:
            return PortStatus(port, "held", record)
        # doctor named the record's process, which a user would then go after.
        why = f"record names pid {record.pid}, which does not hold the port's lock"
        problem = record_problem(why, directory, f"{port}.json")
        return PortStatus(port, "held-unreadable", None, problem, holder=other)
    # A holder killed with -9 leaves its record until the next holder writes its own:
    # "held by pid <dead>" named a process that no longer ran.
    holder = lock_holder(directory, f"{port}.lock", locked)
    if not _stale(record, holder):
        return PortStatus(port, "held", record)
    return PortStatus(port, "held", record, stale=True, holder=holder)


class SharedLockTable:
    """The kernel's lock table, read once for the diagnoses of many refused ports (one
    ``acquire`` of a pool), and again when asked for a fresh one. Each read walks every
    lock of the host: read per refused port, 2,000 ports held elsewhere took 61 s to
    refuse, where one read took a fraction of a second."""

    def __init__(self) -> None:
        self._table: LockTable | None = None
        self._read = False

    def __call__(self, *, fresh: bool = False) -> LockTable | None:
        """The table (None where the OS lists no locks), read now if ``fresh`` or never
        read yet. Raises nothing beyond ``locked_inodes``."""
        if fresh or not self._read:
            self._table, self._read = locked_inodes(), True
        return self._table


def refused_port_status(state: StateDir, port: int, table: SharedLockTable | None) -> PortStatus:
    """``inspect_port`` of a port whose lock this process just failed to take, by
    ``table`` (shared among a pool's refusals; None reads one), read afresh when it says
    the port is free: locked since the shared table was read."""
    if table is None:
        return inspect_port(state, port)
    status = inspect_port(state, port, table())
    return inspect_port(state, port, table(fresh=True)) if status.is_free else status


_MAX_PIDS = 256  # a record's pid lists read; a hostile one cannot make doctor walk more
# In the environment of every process an instance starts (``up``'s services also carry
# PORTPOOL_SUPERVISOR_PID, up's pid), and so of what they start (a daemon keeps them):
# an instance record's "marks" are some of these (``_lineage``).
INSTANCE_MARKS = ("PORTPOOL_APP", "PORTPOOL_INSTANCE", "PORTPOOL_SUPERVISOR_PID")


class InstanceProcesses(NamedTuple):
    """What an instance record says of its processes: its services' pids, the children
    its ``up``/``run`` inherited through exec, and the marks (environment variables) an
    orphan of unknown lineage must carry to be the instance's (``_lineage``)."""

    services: frozenset[int] = frozenset()
    inherited: frozenset[int] = frozenset()
    marks: tuple[tuple[str, str], ...] = ()


def instance_processes(state: StateDir, record: PortRecord) -> InstanceProcesses:
    """What the instance record of ``record``'s holder says of its processes; nothing
    when the port is no instance's or the record is another process's or unreadable.
    Raises nothing."""
    if record.instance <= 0:
        return InstanceProcesses()
    try:
        directory = state.find_instances(record.app)
        raw = None if directory is None else read_json_file(directory, f"{record.instance}.json")
    except (OSError, ValueError, StateDirError):
        return InstanceProcesses()
    if not isinstance(raw, dict) or raw.get("pid") != record.pid:
        return InstanceProcesses()
    entries = raw.get("services")
    # A list, not a set: a hostile pid ([1], {}) is unhashable, and doctor crashed on it.
    services = [
        e.get("pid")
        for e in (entries[:_MAX_PIDS] if type(entries) is list else [])
        if isinstance(e, dict)
    ]
    inherited = raw.get("inherited")
    marks = raw.get("marks")
    given = marks if isinstance(marks, dict) else {}
    return InstanceProcesses(
        _pids(services) - {record.pid},
        _pids(inherited if type(inherited) is list else []),
        tuple((k, given[k]) for k in INSTANCE_MARKS if isinstance(given.get(k), str)),
    )


def _pids(values: Iterable[object]) -> frozenset[int]:
    """The valid pids among ``values`` (at most ``_MAX_PIDS``). Raises nothing."""
    found = (v for v in values if type(v) is int and 0 < v < 2**31)
    return frozenset(itertools.islice(found, _MAX_PIDS))
