"""Instance records: reading, validating and listing ``apps/<app>/instances/<n>.json``.

The record is for people (who, since when, which ports); ``portpool.instance`` writes
it atomically, so it never reads torn. An unreadable record shows as "record
unreadable", never as "no instance", and a hostile one is refused with a per-file
problem. Whether an instance is alive is the kernel's word (its slot lock), never the
heartbeat's age. Removing dead instances' records is ``portpool._gc``'s concern.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from portpool._dataclass import dataclass
from portpool._heldlock import holds_lock, is_held, lock_path_kind, unusable_lock_path
from portpool._jsonfile import NotAFile, decimal, not_a_record, read_json_file, record_problem
from portpool._platform import (
    DirHandle,
    LockTable,
    OpenFiles,
    locked_inodes,
)
from portpool._portstatus import lock_holder
from portpool._record import LAST_WALL_CLOCK
from portpool._slot_holder import record_mismatch, running_holder
from portpool.layout import name_problem
from portpool.statedir import StateDir, write_error


def _finite(value: float) -> bool:
    """False for NaN, infinities, and integers too large to be a float (10**400)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class ServiceInfo(NamedTuple):
    """One service of an instance, as its record says.

    A NamedTuple, not a frozen dataclass: text ``status`` over 1,000 records of 50
    services builds 50,000 of these, 12 ms as NamedTuples against 39 ms as frozen
    dataclasses, about 10% of that command's 270 ms of CPU (the bar for a speed trick).
    """

    name: str
    pool: tuple[int, ...]
    port: int | None
    pid: int | None
    state: str | None = None  # starting, ready, restarting, exited (supervised by `up`)
    restarts: int = 0
    last_exit_status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields under their names, ``pool`` as a list of int. Raises
        nothing."""
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


@functools.lru_cache(maxsize=1024)  # the same few names in every record of a status
def _valid_name(name: str) -> bool:
    return name_problem("service", name) is None


def _int_or_none(value: object) -> int | None:
    if type(value) is int and 0 <= value < 2**31:
        return value
    return None


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
    seen: set[str] = set()
    for item in raw:
        name = item.get("name") if type(item) is dict else None
        if type(name) is not str:
            raise ValueError("a service entry has no name")
        # A name reaches `env`'s KEY=value lines: "x'$(cmd)'" ran cmd in a shell that
        # sourced them. Only a layout's valid names are ever written.
        if not _valid_name(name):
            raise ValueError(f"a service entry has an invalid name {name[:64]!r}")
        if name in seen:  # `env` printed PORTPOOL_SERVICES=a,b,a,b
            raise ValueError(f"names service {name!r} twice")
        seen.add(name)
        pool = item.get("pool", [])
        if type(pool) is not list:
            raise ValueError(f"service {name!r} has an invalid pool")
        for p in pool:  # a loop, not all(<generator>): 50,000 pools per status at scale
            if type(p) is not int or not 0 < p < 65536:
                raise ValueError(f"service {name!r} has an invalid pool")
        port, pid, refusals = item.get("port"), item.get("pid"), item.get("refusals")
        # A port is one of its pool's, or the record is not one portpool wrote: read as
        # "no port", `env` dropped the service; outside the pool, `port` printed 22.
        if port is not None:
            if type(port) is not int or not 0 < port < 65536:
                raise ValueError(f"service {name!r} has an invalid port")
            if port not in pool:
                raise ValueError(f"service {name!r}: port {port} is not in its pool")
        entry: dict[str, Any] = {
            "name": name,
            "pool": pool,
            "port": port,
            "pid": pid if type(pid) is int and 0 < pid < 2**31 else None,
            # Most services skipped no port: no call, and no list to build and drop.
            "refusals": _parse_refusals(refusals) if refusals else [],
        }
        if "state" in item:
            state, restarts = item["state"], item.get("restarts")
            last = item.get("last_exit_status")
            entry["state"] = state if type(state) is str and state in _STATES else None
            entry["restarts"] = restarts if _int_or_none(restarts) is not None else 0
            planned = item.get("planned_restarts")  # a rolling restart's (SIGHUP)
            entry["planned_restarts"] = planned if _int_or_none(planned) is not None else 0
            entry["last_exit_status"] = last if type(last) is int and 0 <= last < 256 else None
            for key in ("started_at", "ready_at"):  # wall clock of the current process
                value = item.get(key)
                # An int too (as the record's own times): a JSON decoder may give either.
                ok = type(value) in (float, int) and _finite(value)
                entry[key] = float(value) if ok and 0 <= value <= LAST_WALL_CLOCK else None
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
        """One ServiceInfo per service entry of the record, in its order. Raises nothing
        (the entries were validated when read)."""
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
        """Seconds since the last heartbeat (rounded to ms, never negative), None if the
        record has none. Raises nothing."""
        if self.heartbeat_at is None:
            return None
        return round(max(0.0, time.time() - self.heartbeat_at), 3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the record's fields, ``heartbeat_age_s`` (seconds) and the service
        entries (dicts). Raises nothing."""
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
    named = raw.get("number", number)
    if named != number:  # it was read as this slot's instance
        shown = named if type(named) is int else f"a {type(named).__name__}"
        raise ValueError(f"names instance {shown}, not {number}")
    times = {}
    for key in ("started_at", "heartbeat_at"):
        v = raw.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool) or not _finite(v):
            raise ValueError(f"has no valid {key}")
        if not 0 <= v <= LAST_WALL_CLOCK:  # -1e300 printed an age of 301 digits
            raise ValueError(f"has no valid {key} ({v:.6g} is no time of day)")
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


def slot_numbers(names: Iterable[str]) -> list[int]:
    """The slot numbers of ``N.lock`` / ``N.json`` entries in ``names``; others ignored."""
    numbers = set()
    for name in names:
        stem, dot, ext = name.partition(".")
        number = decimal(stem) if dot and ext in ("lock", "json") else None
        if number is not None and number > 0:
            numbers.add(number)
    return sorted(numbers)


_READ_TRIES = 3
SLOT_UNUSABLE = "slot unusable: "  # starts InstanceInfo.problem of a slot nobody can take
LOCK_LOST = "runs without its slot lock: "  # starts the problem of one whose lock file went


def lost_lock(
    directory: DirHandle, number: int, holder: int, open_files: OpenFiles | None = None
) -> str | None:
    """The problem of slot ``number`` when its record's running process ``holder`` holds
    the lock of a slot lock file removed or replaced under it (read as not running by
    status and stop, while gc said its holder still ran, and a start took the number);
    None when it holds none (it exec'd another program, or released it: its number is
    free) or where that cannot be told (not Linux)."""
    path = os.path.realpath(os.path.join(directory.path, f"{number}.lock"))
    if not (open_files or OpenFiles()).holds_removed_flock(holder, path):
        return None
    return (
        f"{LOCK_LOST}pid {holder} runs on, its {number}.lock removed or replaced (an up "
        "or run stops at its shield's next check)"
    )


RECORD_BLOCKER = "a directory"  # at a record path: the one special file a rename cannot replace


def read_instance(
    directory: DirHandle,
    number: int,
    locked: LockTable | Callable[[], LockTable | None] | None = None,
    open_files: OpenFiles | None = None,
) -> InstanceInfo:
    """The state of slot ``number``: alive per its kernel lock, details per its record.

    ``locked``: a ``locked_inodes()`` snapshot or a function giving one, read only when
    the record's pid cannot confirm the lock itself (asked through ``open_files``,
    shared among the slots of one command); None probes. Raises StateDirError naming
    ``<dir>/<number>.lock`` if the slot cannot be examined (e.g. no search permission
    on the directory: every command that read it printed a traceback), ResourceLimit
    out of file descriptors; an unreadable record is reported, not raised.

    The record is read before the lock is asked, and an instance that stops cleanly
    removes its record before it unlocks: a record read from an instance that stopped
    in between would show a dead instance that never died. So a record whose slot is
    free counts only if it is still there afterwards; gone, the slot is read again
    (the instance stopped cleanly: "no record").
    """
    name = f"{number}.json"
    for _ in range(_READ_TRIES):
        try:
            info = _read_instance_once(directory, number, locked, open_files)
        except OSError as e:  # was a traceback (a directory we may list, not search)
            where = os.path.join(directory.path, f"{number}.lock")
            raise write_error(where, "cannot be examined", e) from e
        if info.alive or info.problem == "no record":
            return info
        if info.problem is not None and info.problem.startswith(SLOT_UNUSABLE):
            return info  # no record to race with
        try:
            if directory.stat_entry(name) is not None:
                return info  # a dead instance's record: it stays until gc or the next start
        except OSError:
            return info
    return info


def _read_instance_once(
    directory: DirHandle,
    number: int,
    locked: LockTable | Callable[[], LockTable | None] | None,
    open_files: OpenFiles | None,
) -> InstanceInfo:
    lock_kind = lock_path_kind(directory, f"{number}.lock")
    if lock_kind is not None and not lock_kind.startswith("a file"):
        # Never portpool's, and nobody can take the slot: no lock table lists it, and a
        # probe cannot open it, which read as "starting" to `stop` but absent to `status`.
        problem = unusable_lock_path(os.path.join(directory.path, f"{number}.lock"), lock_kind)
        return InstanceInfo(number, False, False, problem=SLOT_UNUSABLE + problem)
    raw: object = None
    unreadable: str | None = None
    record_is_dir = False
    try:
        raw = read_json_file(directory, f"{number}.json")
    except NotAFile as e:
        why = record_problem(f"{number}.json {e}", directory, f"{number}.json")
        unreadable = f"record unreadable: {why}"
        record_is_dir = e.kind == RECORD_BLOCKER
    except ValueError as e:
        why = record_problem(f"record {e}", directory, f"{number}.json")
        unreadable = f"record unreadable: {why}"
    holder = running_holder(raw)
    # Asked of that process first: a live pid with a copied start token that does not
    # hold the lock passed for the instance's process ("alive", its ports and all).
    vouched = holder is not None and holds_lock(directory, f"{number}.lock", holder, open_files)
    alive = vouched or is_held(directory, f"{number}.lock", locked, open_files=open_files)
    if lock_kind is not None and not (alive and holder is not None):
        # Another name of a lock file (a hard link): held by another slot's instance, it
        # read "starting (no record yet)"; only a running holder its record names makes
        # it this slot's. Free, no start can take it either.
        problem = unusable_lock_path(os.path.join(directory.path, f"{number}.lock"), lock_kind)
        return InstanceInfo(number, False, False, problem=SLOT_UNUSABLE + problem)
    if record_is_dir and not alive:
        # A start cannot write its record there (a symlink or FIFO it replaces): nobody
        # can take the slot, as with a special file at its lock path.
        problem = not_a_record(os.path.join(directory.path, f"{number}.json"), RECORD_BLOCKER)
        return InstanceInfo(number, False, False, problem=SLOT_UNUSABLE + problem)
    if unreadable is not None:
        return InstanceInfo(number, alive, False, problem=unreadable)
    if raw is None:
        if not alive:
            return InstanceInfo(number, False, False, problem="no record")
        # Named where the OS says: a record deleted under a running instance left it
        # "starting" for good, and nothing said which process to look at.
        table = locked() if callable(locked) else locked
        holder_pid = lock_holder(directory, f"{number}.lock", table)
        if holder_pid is None:
            return InstanceInfo(number, True, False, problem="starting (no record yet)")
        # A start writes its record at once: one missing for long was deleted, which the
        # heartbeat does not mend. Which of the two, only the user knows.
        why = f"starting, or its record was deleted (no record; pid {holder_pid} holds its slot)"
        return InstanceInfo(number, True, False, problem=why)
    try:
        info = _parse_record(number, alive, raw)
    except ValueError as e:
        problem = record_problem(f"record {e}", directory, f"{number}.json")
        return InstanceInfo(number, alive, False, problem=f"record unreadable: {problem}")
    lost = None if holder is None or alive else lost_lock(directory, number, holder, open_files)
    if lost is not None:
        # Listed as it is (its pid, its ports), and why no command may act on it.
        return dataclasses.replace(info, problem=lost)
    if alive and not vouched:
        # The slot is held, and the process the record names (pid, start token, boot id)
        # does not run here or does not say it holds the lock: the record may not be its
        # holder's (one starting has not written its own yet, or it was rewritten).
        # Shown, pid 1 passed for the instance's process, its ports and all.
        mismatch = record_mismatch(directory, number, raw, locked)
        if mismatch is not None:
            why = record_problem(mismatch, directory, f"{number}.json")  # which file, too
            return InstanceInfo(number, alive, False, problem=f"record unreadable: {why}")
    return info


def iter_instances(app: str, state: StateDir | None = None) -> Iterator[InstanceInfo]:
    """Every instance slot of ``app`` that has a lock file or a record, by number, each
    read when the caller asks for the next.

    ``app``: the app's name; ``state``: the state dir (default: this user's, opened with
    ``create=False`` at the first ``next`` and closed when the iteration ends). Read-only.
    Raises, as the iteration reaches it, TypeError for an ``app`` that is not a str (a
    ``Layout``: pass ``layout.app``), StateDirError for an invalid app name, an
    unsafe state dir or a slot that cannot be examined, ResourceLimit out of file
    descriptors (as ``read_instance``); an unreadable record is yielded with its
    problem, never raised.

    ``list_instances`` holds them all; this lets a caller let each go: ``status``
    over 1,000 records of 50 services held 50,000 service entries at once, and growing
    the heap for them was about a fifth of its CPU.
    """
    if not isinstance(app, str):
        # A Layout passed for its name raised "expected string or bytes-like object".
        hint = ": pass layout.app" if hasattr(app, "app") else ""
        raise TypeError(f"app is the app's name (a str), not a {type(app).__name__}{hint}")
    own = state is None
    state = state or StateDir.open(create=False)
    try:
        directory = state.find_instances(app)
        if directory is None:
            return  # never used by this app: nothing to list, and nothing is created
        # Read once, and only if some record's pid cannot confirm its own lock.
        locked = functools.cache(locked_inodes)
        open_files = OpenFiles()
        for number in slot_numbers(directory.listdir()):
            info = read_instance(directory, number, locked, open_files)
            # A free slot with no record is just a lock file left for reuse: not an instance.
            if info.alive or info.problem != "no record":
                yield info
    finally:
        if own:
            state.close()


def list_instances(app: str, state: StateDir | None = None) -> list[InstanceInfo]:
    """Every instance slot of ``app`` that has a lock file or a record, by number.

    ``app``: the app's name; ``state``: the state dir (default: this user's).
    Read-only: without ``state`` the state dir is opened with ``create=False``.
    Raises as ``iter_instances`` does; an unreadable record is listed with its problem,
    never raised.
    """
    return list(iter_instances(app, state))
