"""Which running instance a command from another terminal means, and its port and
environment (``port``, ``env``; ``stop`` and ``logs`` find their instance here too).

An instance runs while its slot's kernel lock is held: a record alone is never trusted.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Callable, Sequence
from typing import TypeGuard

from portpool._heldlock import is_held
from portpool._jsonfile import record_problem
from portpool._platform import DirHandle, LockTable, OpenFiles, ancestors, locked_inodes
from portpool._record import PortRecord, read_port_record
from portpool._slots import checkout_dir, previous_number
from portpool._text import printable
from portpool.errors import NotRunning
from portpool.layout import Layout, port_env_name, require_layout
from portpool.records import LOCK_LOST, SLOT_UNUSABLE, InstanceInfo, list_instances, read_instance
from portpool.statedir import StateDir

__all__ = [
    "enclosing_instance",
    "find_instance",
    "format_env",
    "instance_env",
    "lost_its_lock",
    "running_slot",
    "service_port",
    "unreadable_detail",
    "unusable_words",
]


def _alive(layout: Layout, state: StateDir) -> list[InstanceInfo]:
    """Every slot whose lock is held, its record readable or not, and every one whose
    process runs on without its lock (``records.lost_lock``): "no instance is running" then."""
    return [i for i in list_instances(layout.app, state) if i.alive or lost_its_lock(i)]


def lost_its_lock(info: InstanceInfo) -> bool:
    """Whether slot ``info``'s process runs without its lock file (``records.lost_lock``)."""
    return bool(info.problem and info.problem.startswith(LOCK_LOST))


def unreadable_detail(info: InstanceInfo) -> str | None:
    """What is wrong with a slot's record ("record has no valid pid"), if it is unreadable
    (not merely missing: a slot whose record is not written yet is starting)."""
    prefix = "record unreadable: "
    if info.readable or not info.problem or not info.problem.startswith(prefix):
        return None
    return info.problem.removeprefix(prefix)


def unusable_words(info: InstanceInfo) -> str:
    """Why a live slot cannot be used: its record is unreadable or not written yet, or
    its process runs without its lock file (``lost_its_lock``)."""
    detail = unreadable_detail(info)
    if detail:
        # A record that names no valid pid is not "starting": say what is wrong.
        return f"runs but its record is unreadable: {detail}"
    if lost_its_lock(info):
        return info.problem or ""
    return f"is {info.problem or 'starting (no record yet)'}"


def _listing(running: Sequence[InstanceInfo]) -> str:
    # The directory is the record's text: a newline in it started a line of its own.
    return "; ".join(
        f"instance {i.number} (pid {i.pid}, {printable(i.directory or '?')})" for i in running
    )


def running_slot(
    layout: Layout, number: int, *, state: StateDir, given_as: str = "--instance"
) -> InstanceInfo | None:
    """Slot ``number`` of the layout's app as ``read_instance`` reads it (None if the
    app has no slots yet). Raises UsageError (exit 2, naming the number ``given_as``)
    for a ``number`` outside 1..max_instances unless that slot runs: started before
    max_instances was lowered, it is listed by ``status`` and must stay reachable by
    its number (and for one that is not an int: "1" raised TypeError from a compare)."""
    if type(number) is not int:
        layout.check_number(number, given_as)
    directory = state.find_instances(layout.app) if number > 0 else None
    info = read_instance(directory, number) if directory is not None else None
    if info is None or not info.alive:
        layout.check_number(number, given_as)
    return info


def enclosing_instance(running: Sequence[InstanceInfo]) -> InstanceInfo | None:
    """The one of ``running`` whose ``run`` or ``up`` started this process (its process is
    one of ours' ancestors), else None: a script under ``run`` that asked ``portpool port``
    got this checkout's other instance. Only looked for where some instance's ``run`` or
    ``up`` gave its environment (``PORTPOOL_INSTANCE``), of any app: one of another app
    may run in between; a stale export names no ancestor."""
    if "PORTPOOL_INSTANCE" not in os.environ:
        return None
    by_pid = {i.pid: i for i in running}
    # The nearest: `run` inside `run` of one app took the outer one, and stop stopped it.
    return next((by_pid[pid] for pid in ancestors(os.getpid()) if pid in by_pid), None)


def _named_unreadable(layout: Layout, alive: Sequence[InstanceInfo]) -> InstanceInfo | None:
    """The live slot ``PORTPOOL_APP`` and ``PORTPOOL_INSTANCE`` name when its record is
    unreadable: no pid to find among our ancestors."""
    if os.environ.get("PORTPOOL_APP") != layout.app:
        return None
    named = os.environ.get("PORTPOOL_INSTANCE")
    return next((i for i in alive if not i.readable and str(i.number) == named), None)


def find_instance(
    layout: Layout,
    number: int | None = None,
    *,
    state: StateDir,
    cwd: str | None = None,
    pick: str = "--instance",
) -> InstanceInfo:
    """The running instance ``number``, else the one whose ``run`` or ``up`` started this
    process, else this checkout's (see ``checkout_dir``), else the only running one.
    ``pick``: how the command is given a number, for the message listing several
    (``stop`` takes it as an argument: "--instance" sent users to an option it lacks).

    Raises UsageError (exit 2) for a ``number`` outside 1..max_instances that does not
    run, NotRunning (exit 1) when that instance does not run, when none runs, or when
    several run and none is this checkout's (the message lists them), TypeError for a
    ``layout`` that is no Layout.
    """
    app = require_layout(layout).app
    if number is not None:
        info = running_slot(layout, number, state=state)
        if info is not None and info.alive and info.readable:
            return info
        running = [i for i in _alive(layout, state) if i.readable and not lost_its_lock(i)]
        others = f"; running: {_listing(running)}" if running else ""
        live = info is not None and (info.alive or lost_its_lock(info))
        why = unusable_words(info) if info is not None and live else "is not running"
        if info is not None and info.problem and info.problem.startswith(SLOT_UNUSABLE):
            why += f" ({info.problem})"
        raise NotRunning(app, f"instance {number} of {app} {why}{others}", [
            i.number for i in running
        ])  # fmt: skip
    alive = _alive(layout, state)
    running = [i for i in alive if i.readable and not lost_its_lock(i)]
    enclosing = enclosing_instance(alive) or _named_unreadable(layout, alive)
    if enclosing is not None:
        if enclosing.readable and not lost_its_lock(enclosing):
            return enclosing
        # Not this checkout's other instance instead: stop stopped that one.
        raise NotRunning(app, (
            f"instance {enclosing.number} of {app}, whose run or up started this command, "
            f"{unusable_words(enclosing)}"
        ), [i.number for i in running])  # fmt: skip
    here = checkout_dir(layout, cwd)
    mine = [i for i in running if i.directory == here]
    if mine:
        remembered = previous_number(state, layout, here)
        return next((i for i in mine if i.number == remembered), mine[0])
    # This checkout's instance runs without its lock: "the only running one" would be
    # another checkout's (stop stopped it).
    lost = next((i for i in alive if lost_its_lock(i) and i.directory == here), None)
    if lost is not None:
        raise NotRunning(app, f"instance {lost.number} of {app} {lost.problem}", [
            i.number for i in running
        ])  # fmt: skip
    # A live slot whose record is unreadable may be this checkout's: "the only running
    # one" must not then mean another checkout's (stop stopped it). One only starting
    # (no record yet) is not counted: that is a moment, and says nothing of whose.
    unreadable = [i for i in alive if not i.readable and unreadable_detail(i)]
    if len(running) == 1 and not unreadable:
        return running[0]
    if not running and alive:
        # Its lock is held: "no instance is running" sent users to start a second one.
        what = "; ".join(f"instance {i.number} {unusable_words(i)}" for i in alive)
        raise NotRunning(app, f"no instance of {app} can be used: {what}", [
            i.number for i in alive
        ])  # fmt: skip
    if not running:
        raise NotRunning(app, f"no instance of {app} is running")
    listing = "; ".join(
        [_listing(running)] + [f"instance {i.number} {unusable_words(i)}" for i in unreadable]
    )
    raise NotRunning(
        app,
        f"{len(running) + len(unreadable)} instances of {app} are running and none for "
        f"{here}; pick one with {pick}: {listing}",
        [i.number for i in running],
    )


def service_port(
    layout: Layout, service: str, number: int | None = None, *, state: StateDir
) -> tuple[InstanceInfo, int]:
    """The instance (as ``find_instance``) and the port its ``service`` holds.

    Raises UnknownService (exit 2) for a name the layout does not have; NotRunning when
    no instance is found or the one found holds no port for ``service``; TypeError for
    a ``layout`` that is no Layout.
    """
    require_layout(layout).service(service)
    info = find_instance(layout, number, state=state)
    tables = _tables()  # one lock table and one fd scan for both checks
    for entry in info.services:
        if entry.name == service and entry.port is not None:
            _vouch(layout.app, info, state, tables, only=service)
            return info, entry.port
    _vouch_unlisted(layout, info, state, tables, [service])
    raise NotRunning(
        layout.app,
        f"instance {info.number} of {layout.app} holds no port for {service!r} "
        "(started with --service for other services?)",
        [info.number],
    )


def instance_env(layout: Layout, number: int | None = None, *, state: StateDir) -> dict[str, str]:
    """The environment every service of the instance is given, minus the per-service
    ``PORT``: ``PORTPOOL_APP``, ``PORTPOOL_INSTANCE``, each ``PORTPOOL_PORT_<SERVICE>``
    and ``PORTPOOL_SERVICES``. Raises NotRunning, TypeError for a ``layout`` that is no
    Layout."""
    info = find_instance(layout, number, state=state)
    tables = _tables()  # one lock table and one fd scan for both checks
    _vouch(layout.app, info, state, tables)
    listed = {e["name"] for e in info.service_entries if e["port"] is not None}
    missing = [s.name for s in layout.services if s.name not in listed]
    _vouch_unlisted(layout, info, state, tables, missing)
    env = {"PORTPOOL_APP": layout.app, "PORTPOOL_INSTANCE": str(info.number)}
    names = []
    for entry in info.services:
        if entry.port is not None:
            env[port_env_name(entry.name)] = str(entry.port)
            names.append(entry.name)
    env["PORTPOOL_SERVICES"] = ",".join(names)
    return env


_Tables = tuple[Callable[[], LockTable | None], OpenFiles]


def _tables() -> _Tables:
    """The kernel's lock table, read once when first asked, and one fd scan, for every
    port a command checks (as records and gc share theirs)."""
    return functools.cache(locked_inodes), OpenFiles()


def _names(record: PortRecord | None, app: str, number: int, service: str) -> TypeGuard[PortRecord]:
    """Whether a port's own ``record`` names ``service`` of instance ``number`` of ``app``."""
    return record is not None and (record.app, record.instance, record.service) == (
        app,
        number,
        service,
    )


def _vouch(
    app: str, info: InstanceInfo, state: StateDir, tables: _Tables, only: str | None = None
) -> None:
    """Raise NotRunning unless each service port the instance's record names (of service
    ``only``, if given) is that service's lease: the port's lock is held and its own
    record names this app, instance and service. A record is the instance's word; a
    hand-edited one (pool ``[22]``, port 22, or a service the layout lacks) had ``port``
    print 22 while ``doctor`` named the real lease."""
    directory = state.find("ports")
    locked, open_files = tables
    for service, port in ((e["name"], e["port"]) for e in info.service_entries):
        if port is None or only not in (None, service):
            continue
        problem, record = _port_lease(directory, port, info.pid, locked, open_files)
        if problem is None:
            if _names(record, app, info.number, service):
                continue
            problem = "its own record names " + (record.describe() if record else "nobody")
        raise NotRunning(
            app,
            f"instance {info.number} of {app} runs but its record is not its leases': it "
            f"names port {port} for {service!r}, and {problem}",
            [info.number],
        )


def _vouch_unlisted(
    layout: Layout, info: InstanceInfo, state: StateDir, tables: _Tables, services: Sequence[str]
) -> None:
    """Raise NotRunning if the instance holds a lease for one of ``services``, which its
    record does not list: a record edited by hand (its services deleted) had ``env``
    exit 0 without their ports, and ``port`` say "started with --service". A run with
    ``--service`` holds no lease for the others, so this finds none for it."""
    directory = state.find("ports")
    if not services or directory is None:
        return
    try:
        pools = layout.pools(info.number)
    except ValueError:  # a number this layout no longer admits: no pool to look in
        return
    locked, open_files = tables
    for service in services:
        for port in pools.get(service, ()):
            problem, record = _port_lease(directory, port, info.pid, locked, open_files)
            if (
                problem is None
                and _names(record, layout.app, info.number, service)
                and record.pid == info.pid
            ):
                raise NotRunning(
                    layout.app,
                    f"instance {info.number} of {layout.app} runs but its record is not its "
                    f"leases': it names no port for {service!r}, whose lease is port {port} "
                    "(its lock held, its own record naming it)",
                    [info.number],
                )


def _port_lease(
    directory: DirHandle | None,
    port: int,
    holder: int | None,
    locked: Callable[[], LockTable | None],
    open_files: OpenFiles,
) -> tuple[str | None, PortRecord | None]:
    """Why ``port`` cannot be a lease (its lock is not held, or its record cannot be
    read: which of the two), else None and its record (None if it has none)."""
    try:
        if directory is None or not is_held(
            directory, f"{port}.lock", locked, holder=holder, open_files=open_files
        ):
            return "its lock is not held", None
        return None, read_port_record(directory, port)
    except OSError as e:
        return f"its lock cannot be examined ({e.strerror or e})", None
    except ValueError as e:
        why = e if directory is None else record_problem(e, directory, f"{port}.json")
        return f"its lock is held but its own record is unreadable: {why}", None


_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+-]*")


def format_env(env: dict[str, str], *, export: bool = False) -> str:
    """``KEY=value`` lines (a docker compose ``--env-file``), or ``export KEY=value`` lines
    quoted for a POSIX shell's ``eval``. Values with other characters are single-quoted,
    which both read literally. ``env``: name -> value, as ``instance_env`` gives it.
    Raises nothing."""
    lines = []
    for key, value in env.items():
        if export:
            lines.append(f"export {key}={shlex.quote(value)}")
        elif _PLAIN.fullmatch(value):
            lines.append(f"{key}={value}")
        else:
            lines.append(f"{key}='{value}'")  # app and service names never hold a quote
    return "\n".join(lines)
