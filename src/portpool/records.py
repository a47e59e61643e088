"""Instance records on disk: atomic writes, reading, listing, and cleanup of the dead.

The record ``apps/<app>/instances/<n>.json`` is for people (who, since when, which
ports). It is replaced atomically (write a temp file, rename it over), so a reader never
sees it torn; an unreadable record shows as "record unreadable", never as "no
instance". Whether an instance is alive is the kernel's word (its slot lock), never the
heartbeat's age. Cleanup removes only what nobody holds, while holding its lock.
"""

from __future__ import annotations

import contextlib
import gc as pygc
import json
import os
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from portpool._platform import DirHandle, identity_of, locked_inodes
from portpool.errors import LockHeld, PortPoolError, StateDirError
from portpool.layout import is_finite_number
from portpool.lock import HeldLock, is_held, read_port_record
from portpool.statedir import StateDir

RECORD_MAX_BYTES = 1 << 20
_TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------- records on disk


def write_atomic(directory: DirHandle, name: str, data: bytes) -> None:
    """Replace ``<dir>/<name>`` with ``data`` so readers see the old or the new, never torn."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}"
    try:
        fd = directory.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as e:
        raise StateDirError(directory.path, f"cannot write {name}: {e.strerror or e}") from e
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        directory.rename(tmp, name)
    except OSError as e:
        with contextlib.suppress(OSError):
            directory.unlink(tmp)
        raise StateDirError(directory.path, f"cannot write {name}: {e.strerror or e}") from e


def read_json_file(directory: DirHandle, name: str) -> Any:
    """The JSON in ``<dir>/<name>`` (None if absent). Raises ValueError if unreadable."""
    try:
        fd = directory.open_file(name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot be opened: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file")
        # Ask for what the file holds (plus one byte to see it grow), not the maximum:
        # a 1 MiB buffer per read made listing 1,000 records twice as slow.
        data = os.read(fd, min(st.st_size, RECORD_MAX_BYTES) + 1)
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > RECORD_MAX_BYTES:
        raise ValueError(f"is larger than {RECORD_MAX_BYTES} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("is not valid JSON") from None


class ServiceInfo(NamedTuple):
    """One service of an instance, as its record says.

    A NamedTuple, not a frozen dataclass: ``status`` builds tens of thousands of these,
    and a frozen dataclass costs several times more to construct.
    """

    name: str
    pool: tuple[int, ...]
    port: int | None
    pid: int | None
    state: str | None = None  # starting, ready, restarting, exited (supervised by `up`)
    restarts: int = 0
    last_exit_status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pool": list(self.pool),
            "port": self.port,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit_status": self.last_exit_status,
        }


_STATES = frozenset(("starting", "ready", "restarting", "exited"))


def _int_or_none(value: object) -> int | None:
    if type(value) is int and 0 <= value < 2**31:
        return value
    return None


def _valid_pool(pool: object) -> bool:
    if type(pool) is not list:
        return False
    return all(not (type(p) is not int or not 0 < p < 65536) for p in pool)


def _parse_services(raw: object) -> tuple[dict[str, Any], ...]:
    """Validated service entries as plain dicts of name, pool, port, pid, and for a
    service ``up`` supervises: state, restarts, last_exit_status, started_at, ready_at.

    Plain dicts because ``status --json`` passes tens of thousands of them straight to
    the JSON encoder; ``InstanceInfo.services`` wraps them on demand.
    """
    if type(raw) is not list:
        raise ValueError("'services' is not a list")
    out = []
    for item in raw:
        name = item.get("name") if type(item) is dict else None
        if type(name) is not str:
            raise ValueError("a service entry has no name")
        pool = item.get("pool", [])
        if not _valid_pool(pool):
            raise ValueError(f"service {name!r} has an invalid pool")
        port, pid = item.get("port"), item.get("pid")
        entry = {
            "name": name[:64],
            "pool": pool,
            "port": port if type(port) is int and 0 < port < 65536 else None,
            "pid": pid if type(pid) is int and 0 < pid < 2**31 else None,
        }
        if "state" in item:
            state, restarts, last = (
                item["state"],
                item.get("restarts"),
                item.get("last_exit_status"),
            )
            entry["state"] = state if type(state) is str and state in _STATES else None
            entry["restarts"] = restarts if type(restarts) is int and restarts >= 0 else 0
            entry["last_exit_status"] = last if type(last) is int and 0 <= last < 256 else None
            for key in ("started_at", "ready_at"):  # wall clock of the current process
                value = item.get(key)
                entry[key] = value if type(value) is float and is_finite_number(value) else None
        out.append(entry)
    return tuple(out)


@dataclass(frozen=True)
class InstanceInfo:
    """What the state dir says about one instance slot, for ``status`` and people."""

    number: int
    alive: bool  # its slot lock is held (the kernel's word, not the heartbeat's)
    readable: bool
    pid: int | None = None
    start_token: str | None = None
    started_at: float | None = None
    heartbeat_at: float | None = None
    service_entries: tuple[dict[str, Any], ...] = ()  # validated, JSON-ready
    problem: str | None = None

    @property
    def services(self) -> tuple[ServiceInfo, ...]:
        return tuple(
            ServiceInfo(
                e["name"],
                tuple(e["pool"]),
                e["port"],
                e["pid"],
                e.get("state"),
                e.get("restarts", 0),
                e.get("last_exit_status"),
            )
            for e in self.service_entries
        )

    @property
    def heartbeat_age_s(self) -> float | None:
        if self.heartbeat_at is None:
            return None
        return round(max(0.0, time.time() - self.heartbeat_at), 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "pid": self.pid,
            "alive": self.alive,
            "readable": self.readable,
            "problem": self.problem,
            "started_at": self.started_at,
            "heartbeat_age_s": self.heartbeat_age_s,
            "services": list(self.service_entries),
        }


def _parse_record(number: int, alive: bool, raw: object) -> InstanceInfo:
    if not isinstance(raw, dict) or raw.get("v") != 1:
        raise ValueError("is not a version-1 record")
    pid = _int_or_none(raw.get("pid"))
    if pid is None:
        raise ValueError("has no valid pid")
    times = {}
    for key in ("started_at", "heartbeat_at"):
        v = raw.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool) or not is_finite_number(v):
            raise ValueError(f"has no valid {key}")
        times[key] = float(v)
    token = raw.get("start_token")
    return InstanceInfo(
        number,
        alive,
        True,
        pid=pid,
        start_token=token if isinstance(token, str) else None,
        started_at=times["started_at"],
        heartbeat_at=times["heartbeat_at"],
        service_entries=_parse_services(raw.get("services", [])),
    )


def slot_numbers(names: Iterable[str]) -> list[int]:
    numbers = set()
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext in ("lock", "json") and stem.isdigit() and len(stem) < 7:
            numbers.add(int(stem))
    return sorted(numbers)


def read_instance(
    directory: DirHandle, number: int, locked: dict[int, int] | None = None
) -> InstanceInfo:
    """The state of slot ``number``: alive per its kernel lock, details per its record."""
    alive = is_held(directory, f"{number}.lock", locked)
    try:
        raw = read_json_file(directory, f"{number}.json")
        if raw is None:
            problem = "starting (no record yet)" if alive else "no record"
            return InstanceInfo(number, alive, False, problem=problem)
        return _parse_record(number, alive, raw)
    except ValueError as e:
        return InstanceInfo(number, alive, False, problem=f"record unreadable: record {e}")


def list_instances(app: str, state: StateDir | None = None) -> list[InstanceInfo]:
    """Every instance slot of ``app`` that has a lock file or a record, by number."""
    own = state is None
    state = state or StateDir.open()
    try:
        directory = state.instances(app)
        locked = locked_inodes()
        # Parsing thousands of records makes only acyclic objects: pausing the cyclic
        # collector meanwhile saves it scanning them again and again (~15% of the time).
        collecting = pygc.isenabled()
        pygc.disable()
        try:
            numbers = slot_numbers(directory.listdir())
            infos = [read_instance(directory, n, locked) for n in numbers]
        finally:
            if collecting:
                pygc.enable()
        # A free slot with no record is just a lock file left for reuse: not an instance.
        return [i for i in infos if i.alive or i.problem != "no record"]
    finally:
        if own:
            state.close()


# ---------------------------------------------------------------- cleanup


@dataclass
class GcReport:
    """What ``gc`` removed: stale instance records and stale port metadata."""

    instances: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)


def _remove_if_free(directory: DirHandle, lock_name: str, others: Sequence[str]) -> bool:
    """Take ``lock_name``; if free, unlink ``others`` and the lock file while holding it."""
    try:
        held = HeldLock.acquire(directory, lock_name)
    except (LockHeld, PortPoolError):
        return False
    try:
        for name in others:
            with contextlib.suppress(FileNotFoundError):
                directory.unlink(name)
    finally:
        held.remove_and_release()
    return True


def _clean_temp_files(directory: DirHandle, report: GcReport) -> None:
    for name in directory.listdir():
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is not None and pid != os.getpid() and identity_of(pid) is None:
            with contextlib.suppress(OSError):
                directory.unlink(name)
                report.temp_files.append(name)


def clean_app(state: StateDir, app: str, report: GcReport | None = None) -> GcReport:
    """Remove the records of ``app``'s dead instances (their slot lock is free)."""
    report = report or GcReport()
    directory = state.instances(app)
    names = directory.listdir()
    if not any(n.endswith(".json") or n.endswith(_TMP_SUFFIX) for n in names):
        return report  # nothing a dead instance could have left: skip the kernel read
    locked = locked_inodes()
    for number in slot_numbers(names):
        if is_held(directory, f"{number}.lock", locked):
            continue
        stale = directory.stat_entry(f"{number}.json") is not None
        if _remove_if_free(directory, f"{number}.lock", [f"{number}.json"]) and stale:
            report.instances.append(f"{app}/{number}")
    _clean_temp_files(directory, report)
    return report


def gc(state: StateDir | None = None) -> GcReport:
    """Remove metadata left by dead holders, in every app and for every port.

    Only what nobody holds is removed, and only while holding its lock (rule 2).
    """
    own = state is None
    state = state or StateDir.open()
    report = GcReport()
    try:
        for app in state.apps():
            clean_app(state, app, report)
        ports = state.ports()
        locked = locked_inodes()
        for name in sorted(ports.listdir()):
            stem, _, ext = name.partition(".")
            if ext not in ("lock", "json") or not stem.isdigit():
                continue
            port = int(stem)
            if ext == "json" and ports.stat_entry(f"{port}.lock") is not None:
                continue  # handled with its lock file
            if is_held(ports, f"{port}.lock", locked):
                continue
            try:
                had_record = read_port_record(ports, port) is not None
            except ValueError:
                had_record = True
            if _remove_if_free(ports, f"{port}.lock", [f"{port}.json"]) and had_record:
                report.ports.append(port)
    finally:
        if own:
            state.close()
    return report
