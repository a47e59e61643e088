"""Instance records on disk: atomic writes, reading, listing, and cleanup of the dead.

The record ``apps/<app>/instances/<n>.json`` is for people (who, since when, which
ports). It is replaced atomically (write a temp file, rename it over), so a reader never
sees it torn; an unreadable record shows as "record unreadable", never as "no
instance". Whether an instance is alive is the kernel's word (its slot lock), never the
heartbeat's age. Cleanup removes only what nobody holds, while holding its lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from portpool._platform import DirHandle, LockTable, identity_of, locked_inodes
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


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a symbolic link``, ... for an ``st_mode``: what a file is."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


class NotAFile(ValueError):
    """A special file (symlink, FIFO, directory, ...) where a record belongs."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"is {kind}, not a record")
        self.kind = kind


def read_json_file(directory: DirHandle, name: str) -> Any:
    """The JSON in ``<dir>/<name>`` (None if absent). Raises ValueError if unreadable,
    NotAFile (a ValueError) for a symlink, FIFO, directory, ... (never followed)."""
    try:
        fd = directory.open_file(name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        # O_NOFOLLOW fails a symlink with ELOOP, whose text ("Too many levels of symbolic
        # links") says nothing of what is there.
        if e.errno == errno.ELOOP:
            raise NotAFile("a symbolic link") from None
        if e.errno == errno.EISDIR:
            raise NotAFile("a directory") from None
        raise ValueError(f"cannot be opened: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(file_kind(st.st_mode))
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


def _parse_refusals(raw: object) -> list[dict[str, Any]]:
    """Why a service skipped earlier ports of its pool: port, reason, detail (validated;
    anything else is dropped, as a record is for people)."""
    if type(raw) is not list:
        return []
    out = []
    for item in raw[:64]:
        if type(item) is not dict:
            continue
        port, reason, detail = item.get("port"), item.get("reason"), item.get("detail")
        if type(port) is int and 0 < port < 65536 and type(reason) is str and type(detail) is str:
            out.append({"port": port, "reason": reason[:64], "detail": detail[:512]})
    return out


def _parse_services(raw: object) -> tuple[dict[str, Any], ...]:
    """Validated service entries as plain dicts of name, pool, port, pid, refusals, and
    for a service ``up`` supervises: state, restarts, planned_restarts, last_exit_status,
    started_at, ready_at.

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
            "refusals": _parse_refusals(item.get("refusals")),
        }
        if "state" in item:
            state, restarts, last = (
                item["state"],
                item.get("restarts"),
                item.get("last_exit_status"),
            )
            entry["state"] = state if type(state) is str and state in _STATES else None
            entry["restarts"] = restarts if type(restarts) is int and restarts >= 0 else 0
            planned = item.get("planned_restarts")  # a rolling restart's (SIGHUP)
            entry["planned_restarts"] = planned if type(planned) is int and planned >= 0 else 0
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
    directory: str | None = None  # the checkout it was started for (layout file's dir or cwd)

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
            "dir": self.directory,
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
    directory = raw.get("dir")
    return InstanceInfo(
        number,
        alive,
        True,
        pid=pid,
        start_token=token if isinstance(token, str) else None,
        started_at=times["started_at"],
        heartbeat_at=times["heartbeat_at"],
        service_entries=_parse_services(raw.get("services", [])),
        directory=directory[:4096] if isinstance(directory, str) else None,
    )


def decimal(text: str, max_digits: int = 6) -> int | None:
    """``text`` as a number if it is 1..``max_digits`` ASCII digits without a leading
    zero, else None. ``str.isdigit`` also accepts "²" and "٣", which ``int`` then
    refuses or reads as another number: a file named ``².json`` crashed every command."""
    if not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        return None
    if text[0] == "0" and len(text) > 1:
        return None  # "07.json" is not the file of slot 7: leave it alone
    return int(text)


def slot_numbers(names: Iterable[str]) -> list[int]:
    """The slot numbers of ``N.lock`` / ``N.json`` entries in ``names``; others ignored."""
    numbers = set()
    for name in names:
        stem, dot, ext = name.partition(".")
        number = decimal(stem) if dot and ext in ("lock", "json") else None
        if number is not None and number > 0:
            numbers.add(number)
    return sorted(numbers)


def read_instance(
    directory: DirHandle, number: int, locked: LockTable | None = None
) -> InstanceInfo:
    """The state of slot ``number``: alive per its kernel lock, details per its record."""
    alive = is_held(directory, f"{number}.lock", locked)
    try:
        raw = read_json_file(directory, f"{number}.json")
        if raw is None:
            problem = "starting (no record yet)" if alive else "no record"
            return InstanceInfo(number, alive, False, problem=problem)
        return _parse_record(number, alive, raw)
    except NotAFile as e:
        return InstanceInfo(number, alive, False, problem=f"record unreadable: {number}.json {e}")
    except ValueError as e:
        return InstanceInfo(number, alive, False, problem=f"record unreadable: record {e}")


def list_instances(app: str, state: StateDir | None = None) -> list[InstanceInfo]:
    """Every instance slot of ``app`` that has a lock file or a record, by number.

    ``app``: the app's name; ``state``: the state dir (default: this user's).
    Read-only: without ``state`` the state dir is opened with ``create=False``.
    Raises StateDirError for an invalid app name or an unsafe state dir; an unreadable
    record is listed with its problem, never raised.
    """
    own = state is None
    state = state or StateDir.open(create=False)
    try:
        directory = state.find_instances(app)
        if directory is None:
            return []  # never used by this app: nothing to list, and nothing is created
        locked = locked_inodes()
        numbers = slot_numbers(directory.listdir())
        infos = [read_instance(directory, n, locked) for n in numbers]
        # A free slot with no record is just a lock file left for reuse: not an instance.
        return [i for i in infos if i.alive or i.problem != "no record"]
    finally:
        if own:
            state.close()


# ---------------------------------------------------------------- cleanup


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
        return {
            "instances": self.instances,
            "ports": self.ports,
            "released": self.released,
            "temp_files": self.temp_files,
            "files": self.files,
            "problems": self.problems,
        }


def _remove_free_files(
    directory: DirHandle, lock_name: str, others: Sequence[str]
) -> list[str] | None:
    """Take ``lock_name``; if free, unlink ``others`` and the lock file while holding it
    (rule 2). Returns the files that were there and were unlinked (the lock file last,
    if it was there before we locked it); None if the lock was held."""
    existed = directory.stat_entry(lock_name) is not None
    try:
        held = HeldLock.acquire(directory, lock_name)
    except (LockHeld, PortPoolError):
        return None
    removed: list[str] = []
    try:
        for name in others:
            with contextlib.suppress(FileNotFoundError):
                directory.unlink(name)
                removed.append(name)
    finally:
        if existed and held.problem(check_kernel=False) is None:
            removed.append(lock_name)  # remove_and_release unlinks it: still ours
        held.remove_and_release()
    return removed


def _clean_temp_files(directory: DirHandle, report: GcReport, where: str = "") -> None:
    for name in directory.listdir():
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
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
    st = directory.stat_entry(name)
    if st is None or stat.S_ISREG(st.st_mode):
        return None
    what = "lock file" if name.endswith(".lock") else "record"
    return (
        f"{os.path.join(directory.path, name)}: is {file_kind(st.st_mode)}, not the {what} "
        f"of {of}; left alone (portpool removes only files it makes): remove it by hand"
    )


def clean_app(state: StateDir, app: str, report: GcReport | None = None) -> GcReport:
    """Remove the records of ``app``'s dead instances (their slot lock is free).

    A slot whose lock or record path holds a special file is left whole and named in
    ``report.problems``.
    """
    report = report or GcReport()
    directory = state.instances(app)
    names = directory.listdir()
    odd: set[int] = set()
    for number in slot_numbers(names):
        for name in (f"{number}.lock", f"{number}.json"):
            problem = _odd_entry(directory, name, f"slot {app}/{number}")
            if problem is not None:
                report.problems.append(problem)
                odd.add(number)
    if not any(n.endswith(".json") or n.endswith(_TMP_SUFFIX) for n in names):
        return report  # nothing a dead instance could have left: skip the kernel read
    locked = locked_inodes()
    for number in slot_numbers(names):
        if number in odd:
            continue
        try:
            if is_held(directory, f"{number}.lock", locked):
                continue
            removed = _remove_free_files(directory, f"{number}.lock", [f"{number}.json"])
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
        return
    try:
        had_record = read_port_record(ports, port) is not None
    except ValueError:
        had_record = True
    removed = _remove_free_files(ports, f"{port}.lock", [f"{port}.json"])
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

    ``state``: the state dir (default: this user's). Only what nobody holds is removed,
    and only while holding its lock (rule 2). An entry that cannot be handled is skipped
    and named in ``GcReport.problems``; raises StateDirError only for an unsafe state dir.
    """
    own = state is None
    state = state or StateDir.open()
    report = GcReport()
    try:
        for app in state.apps():
            try:
                clean_app(state, app, report)
            except (OSError, PortPoolError) as e:
                report.problems.append(f"app {app}: {e}")
        ports = state.ports()
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
