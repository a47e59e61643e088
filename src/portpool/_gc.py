"""Cleanup: removing what dead instances and dead port holders left in the state dir.

Only what nobody holds is removed, and only while holding its lock (rule 2): an
instance's record with its free slot lock, a port's record with its free lock file, and
a dead writer's temporary files. Whether something is held is the kernel's word.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Sequence
from typing import Any

from portpool._dataclass import dataclass, field
from portpool._heldlock import HeldLock, is_held, lock_path_kind
from portpool._jsonfile import TMP_SUFFIX, decimal, read_json_file
from portpool._platform import (
    DirHandle,
    LockTable,
    OpenFiles,
    identity_of,
    is_alive,
    locked_inodes,
)
from portpool._record import PortRecord, read_port_record
from portpool._slot_holder import running_holder
from portpool.errors import LockHeld, PortPoolError, ResourceLimit
from portpool.records import slot_numbers
from portpool.statedir import StateDir, special_entry


@dataclass
class GcReport:
    """What ``gc`` removed, exactly: ``files`` lists every file it unlinked (relative to
    the state dir); the other lists say what they were. ``instances``: records of dead
    instances ("app/n"); ``ports``: ports whose dead holder left its metadata;
    ``released``: files a released port or a free slot left for reuse ("port 6000",
    "slot app/3"); ``temp_files``: a dead writer's temporary files."""

    instances: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # Entries gc could not handle (a directory where a record belongs, ...): reported,
    # skipped, and never a reason to stop halfway with nothing said about what was done.
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each field's list, under the field's name. Raises nothing."""
        return {
            "instances": self.instances,
            "ports": self.ports,
            "released": self.released,
            "temp_files": self.temp_files,
            "files": self.files,
            "problems": self.problems,
        }


def _remove_free_files(
    directory: DirHandle, lock_name: str, others: Sequence[str], problems: list[str]
) -> list[str] | None:
    """Take ``lock_name``; if free, unlink ``others`` and the lock file while holding it
    (rule 2). Returns the files that were there and were unlinked (the lock file last,
    if it was there before we locked it); None if the lock was held or could not be
    taken. What could not be done is added to ``problems``, naming its file: gc skipped
    an immutable lock file without a word, and for a record it could not unlink named
    the lock file (which it had removed, unlisted) instead."""
    existed = directory.stat_entry(lock_name) is not None
    try:
        held = HeldLock.acquire(directory, lock_name)
    except LockHeld:
        return None
    except PortPoolError as e:
        where = os.path.join(directory.path, lock_name)
        problems.append(f"{where}: cannot be locked to remove it: {e}")
        return None
    removed: list[str] = []
    kept = False
    try:
        for name in others:
            try:
                directory.unlink(name)
                removed.append(name)
            except FileNotFoundError:
                pass
            except OSError as e:
                kept = True  # the pair stays together: the lock file is kept too
                where = os.path.join(directory.path, name)
                problems.append(f"{where}: cannot be removed: {e.strerror or e}")
    finally:
        if kept:
            held.release()
        else:
            if existed and held.problem(check_kernel=False) is None:
                removed.append(lock_name)  # remove_and_release unlinks it: still ours
            held.remove_and_release()
    return removed


def _recorded_start(directory: DirHandle, number: int) -> tuple[int, str, object] | None:
    """(pid, start token, started_at) of slot ``number``'s record when the process it
    names runs, else None (no record, unreadable, or that process is gone): one
    instance's record keeps it across heartbeats, a new instance in the slot has
    another. Raises nothing."""
    try:
        raw = read_json_file(directory, f"{number}.json")
    except (OSError, ValueError, ResourceLimit):
        return None
    pid = running_holder(raw)
    if pid is None or not isinstance(raw, dict):
        return None
    return pid, str(raw.get("start_token")), raw.get("started_at")


def _live_holder(where: str, pid: int, lock_name: str) -> str:
    return (
        f"{where}: its holder (pid {pid}) still runs but does not hold {lock_name} (removed "
        "or replaced under it?); left alone: a record of a live process is never removed"
    )


def _held_now(directory: DirHandle, lock_name: str, holder: int | None) -> bool:
    """Whether ``lock_name`` is held, asked again of the kernel's current table before a
    live holder is said to have lost its lock: gc judges by a table read at its start,
    and a holder that locked since (a starting instance) read as "still runs but does
    not hold" it (gc exited 1 on a healthy instance). Raises OSError as ``is_held``."""
    return is_held(directory, lock_name, locked_inodes(), holder=holder)


def _linked_lock(directory: DirHandle, name: str, of: str) -> str | None:
    """The problem with a lock file that has other names (hard links), else None: no
    start takes it, and gc skipped it without a word, for ever. Raises OSError."""
    kind = lock_path_kind(directory, name)
    if kind is None:
        return None
    return (
        f"{os.path.join(directory.path, name)}: is {kind}, not the lock file of {of}; "
        "left alone (portpool removes only files it makes): remove it by hand"
    )


def _clean_temp_files(directory: DirHandle, report: GcReport, where: str = "") -> None:
    for name in directory.listdir():
        if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
            continue
        parts = name.split(".")
        pid = decimal(parts[-3], 7) if len(parts) >= 4 else None
        if pid is not None and pid != os.getpid() and identity_of(pid) is None:
            with contextlib.suppress(OSError):
                directory.unlink(name)
                report.temp_files.append(name)
                report.files.append(f"{where}{name}")


def _odd_entry(directory: DirHandle, name: str, of: str) -> str | None:
    """The problem with ``<dir>/<name>`` if it is not a regular file, else None.

    A directory, FIFO or symlink at a lock or record path is never ours (portpool makes
    regular files only): gc once skipped such lock paths without a word, and removed such
    records as "records of dead instances". It leaves them, never following a symlink,
    and says what is in whose way.
    """
    kind = special_entry(directory, name)
    if kind is None:
        return None
    what = "lock file" if name.endswith(".lock") else "record"
    return (
        f"{os.path.join(directory.path, name)}: is {kind}, not the {what} "
        f"of {of}; left alone (portpool removes only files it makes): remove it by hand"
    )


def clean_app(state: StateDir, app: str, report: GcReport | None = None) -> GcReport:
    """Remove the records of ``app``'s dead instances (their slot lock is free).

    A slot whose lock or record path holds a special file is left whole and named in
    ``report.problems``.
    """
    report = report or GcReport()
    directory = state.find_instances(app)  # an app dir without instances: nothing to do
    if directory is None:
        return report
    names = directory.listdir()
    odd: set[int] = set()
    for number in slot_numbers(names):
        for name in (f"{number}.lock", f"{number}.json"):
            try:
                problem = _odd_entry(directory, name, f"slot {app}/{number}")
            except OSError as e:  # it said "app a: [Errno 13] Permission denied: '1.lock'"
                where = os.path.join(directory.path, name)
                report.problems.append(f"{where}: cannot be examined: {e.strerror or e}")
                if e.errno in (errno.EACCES, errno.EPERM):
                    return report  # a directory we may list, not search: so is every slot
                odd.add(number)
                break
            if problem is not None:
                report.problems.append(problem)
                odd.add(number)
    if not any(n.endswith(".json") or n.endswith(TMP_SUFFIX) for n in names):
        return report  # nothing a dead instance could have left: skip the kernel read
    # Read once, and only if a record's pid cannot confirm its own lock (a dead one).
    locked = functools.cache(locked_inodes)
    open_files = OpenFiles()
    for number in slot_numbers(names):
        if number in odd:
            continue
        try:
            started = _recorded_start(directory, number)
            holder = None if started is None else started[0]
            if is_held(directory, f"{number}.lock", locked, holder=holder, open_files=open_files):
                # Held through another name (a hard link) with no running holder of its
                # own: named, as for a port, never removed (gc said nothing of it).
                linked = holder is None and _linked_lock(
                    directory, f"{number}.lock", f"slot {app}/{number}"
                )
                if linked:
                    report.problems.append(linked)
                continue
            if holder is not None and _held_now(directory, f"{number}.lock", holder):
                continue  # locked since the table gc judges by was read
            # Asked again: a holder killed since its record was read is a dead one; one
            # that released the slot and was followed by a new holder (its record written
            # after it locked, so after the lock was asked) is not to be judged.
            if holder is not None:
                now = _recorded_start(directory, number)
                if now is not None and now != started:
                    continue
                holder = None if now is None else holder
            if holder is not None:
                # Its lock file was removed or replaced under it: the instance runs (pid
                # and start token checked) and its shield stops it. gc called its record
                # a dead instance's and removed it; status then listed nothing.
                where = os.path.join(directory.path, f"{number}.json")
                report.problems.append(_live_holder(where, holder, f"{number}.lock"))
                continue
            linked = _linked_lock(directory, f"{number}.lock", f"slot {app}/{number}")
            if linked is not None:
                report.problems.append(linked)
                continue
            removed = _remove_free_files(
                directory, f"{number}.lock", [f"{number}.json"], report.problems
            )
        except OSError as e:
            where = os.path.join(directory.path, f"{number}.json")
            report.problems.append(f"{where}: {e.strerror or e}")
            continue
        if not removed:
            continue
        report.files.extend(f"apps/{app}/instances/{name}" for name in removed)
        if f"{number}.json" in removed:
            report.instances.append(f"{app}/{number}")
        else:
            report.released.append(f"slot {app}/{number}")
    _clean_temp_files(directory, report, f"apps/{app}/instances/")
    return report


def _read_record(ports: DirHandle, port: int) -> tuple[PortRecord | None, bool]:
    """The port's record (None if unreadable or absent) and whether a file was there."""
    try:
        record = read_port_record(ports, port)
    except ValueError:
        return None, True
    return record, record is not None


def _clean_port(ports: DirHandle, name: str, locked: LockTable | None, report: GcReport) -> None:
    stem, _, ext = name.partition(".")
    port = decimal(stem, 5) if ext in ("lock", "json") else None
    if port is None or not 0 < port < 65536:
        return
    problem = _odd_entry(ports, name, f"port {port}")
    if problem is not None:
        report.problems.append(problem)
        return
    partner = f"{port}.json" if ext == "lock" else f"{port}.lock"
    if _odd_entry(ports, partner, "") is not None:
        return  # the partner is named when the loop reaches it; neither is touched
    if ext == "json" and ports.stat_entry(f"{port}.lock") is not None:
        return  # handled with its lock file
    if is_held(ports, f"{port}.lock", locked):
        # Held through another name (a hard link) with no record of its own: gc said
        # nothing, and doctor "not written yet", for ever. Only named, never removed.
        if _read_record(ports, port)[0] is None:
            linked = _linked_lock(ports, f"{port}.lock", f"port {port}")
            if linked is not None:
                report.problems.append(linked)
        return
    record, had_record = _read_record(ports, port)
    if record is not None and is_alive(record.identity):
        first = (record.identity, record.acquired_at)
        if _held_now(ports, f"{port}.lock", None):
            return  # locked since the table gc judges by was read
        record, had_record = _read_record(ports, port)  # a holder killed since: dead
        if record is not None and (record.identity, record.acquired_at) != first:
            # Released and acquired again between the two reads: a holder writes its
            # record after it locks, so the lock was asked before it took it (gc exited
            # 1 on a healthy port, "removed or replaced under it?").
            return
    if record is not None and is_alive(record.identity):
        where = os.path.join(ports.path, f"{port}.json")
        report.problems.append(_live_holder(where, record.pid, f"{port}.lock"))
        return
    linked = _linked_lock(ports, f"{port}.lock", f"port {port}")
    if linked is not None:
        report.problems.append(linked)
        return
    removed = _remove_free_files(ports, f"{port}.lock", [f"{port}.json"], report.problems)
    if not removed:
        return
    report.files.extend(f"ports/{name}" for name in removed)
    # A released port leaves a blank record and its lock file for reuse.
    if had_record:
        report.ports.append(port)
    else:
        report.released.append(f"port {port}")


def gc(state: StateDir | None = None) -> GcReport:
    """Remove metadata left by dead holders, in every app and for every port.

    ``state``: the state dir (default: this user's; a missing one is not created). Only
    what nobody holds is removed, and only while holding its lock (rule 2). An entry that
    cannot be handled is skipped and named in ``GcReport.problems``; raises StateDirError
    only for an unsafe state dir.
    """
    own = state is None
    state = state or StateDir.open(create=False)  # cleaning creates nothing
    report = GcReport()
    try:
        for app in state.apps():
            try:
                clean_app(state, app, report)
                # write_atomic's temporary files elsewhere in the app (the checkouts'
                # numbers, the logs' owners) were never removed.
                for sub in ("checkouts", "logs"):
                    found = state.find("apps", app, sub)
                    if found is not None:
                        _clean_temp_files(found, report, f"apps/{app}/{sub}/")
            except (OSError, PortPoolError) as e:
                report.problems.append(f"app {app}: {e}")
        try:
            ports = state.find("ports")
        except PortPoolError as e:  # a symlink there: what was removed above is still said
            report.problems.append(str(e))
            return report
        if ports is None:
            return report
        locked = locked_inodes()
        for name in sorted(ports.listdir()):
            try:
                _clean_port(ports, name, locked, report)
            except OSError as e:
                report.problems.append(f"{os.path.join(ports.path, name)}: {e.strerror or e}")
    finally:
        if own:
            state.close()
    return report
