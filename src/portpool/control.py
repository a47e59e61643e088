"""Reaching a running instance from another terminal or a script: which instance, its
ports and environment, stopping it, starting ``up`` detached and reading its logs.

Everything here reads the state dir and never trusts a record alone: an instance runs
while its slot's kernel lock is held, and ``stop`` signals only the process that holds
that lock and whose identity (pid + start token + boot id) is the one recorded (rule 7:
a pid from a file, signalled blindly, kills whoever got the pid next).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from portpool._host_warnings import layout_warnings
from portpool._jsonfile import read_json_file, write_atomic
from portpool._platform import (
    DirHandle,
    boot_id,
    detached_options,
    identity_of,
    listeners,
    locked_inodes,
    signal_verified,
)
from portpool._slots import checkout_dir, previous_number
from portpool.errors import DetachFailed, NotRunning, StopFailed, UsageError
from portpool.layout import Layout, port_env_name
from portpool.lock import inspect_port, is_held
from portpool.records import InstanceInfo, list_instances, read_instance
from portpool.statedir import StateDir, check_name

__all__ = [
    "Detached",
    "Stopped",
    "find_instance",
    "follow_log",
    "format_env",
    "instance_env",
    "layout_document",
    "log_path",
    "service_port",
    "start_detached",
    "stop_instances",
]

_POLL_S = 0.05

# ---------------------------------------------------------------- which instance


def _running(layout: Layout, state: StateDir) -> list[InstanceInfo]:
    return [i for i in list_instances(layout.app, state) if i.alive and i.readable]


def _unreadable(info: InstanceInfo) -> str | None:
    """What is wrong with a slot's record ("record has no valid pid"), if it is unreadable
    (not merely missing: a slot whose record is not written yet is starting)."""
    prefix = "record unreadable: "
    if info.readable or not info.problem or not info.problem.startswith(prefix):
        return None
    return info.problem.removeprefix(prefix)


def _listing(running: Sequence[InstanceInfo]) -> str:
    return "; ".join(f"instance {i.number} (pid {i.pid}, {i.directory or '?'})" for i in running)


def find_instance(
    layout: Layout, number: int | None = None, *, state: StateDir, cwd: str | None = None
) -> InstanceInfo:
    """The running instance ``number``, else this checkout's (see ``checkout_dir``), else
    the only running one.

    Raises NotRunning (exit 1) when that instance does not run, when none runs, or when
    several run and none is this checkout's (the message lists them).
    """
    app = layout.app
    if number is not None:
        directory = state.find_instances(app)  # read-only: a missing dir is "not running"
        info = read_instance(directory, number) if directory is not None else None
        if info is not None and info.alive and info.readable:
            return info
        running = _running(layout, state)
        others = f"; running: {_listing(running)}" if running else ""
        if info is None or not info.alive:
            why = "is not running"
        elif _unreadable(info):
            # A record that names no valid pid is not "starting": say what is wrong.
            why = f"runs but its record is unreadable: {_unreadable(info)}"
        else:
            why = "is starting (no record yet)"
        raise NotRunning(app, f"instance {number} of {app} {why}{others}", [
            i.number for i in running
        ])  # fmt: skip
    running = _running(layout, state)
    here = checkout_dir(layout, cwd)
    mine = [i for i in running if i.directory == here]
    if mine:
        remembered = previous_number(state, layout, here)
        return next((i for i in mine if i.number == remembered), mine[0])
    if len(running) == 1:
        return running[0]
    if not running:
        raise NotRunning(app, f"no instance of {app} is running")
    raise NotRunning(
        app,
        f"{len(running)} instances of {app} are running and none for {here}; "
        f"pick one with --instance: {_listing(running)}",
        [i.number for i in running],
    )


def service_port(
    layout: Layout, service: str, number: int | None = None, *, state: StateDir
) -> tuple[InstanceInfo, int]:
    """The instance (as ``find_instance``) and the port its ``service`` holds.

    Raises UnknownService (exit 2) for a name the layout does not have; NotRunning when
    no instance is found or the one found holds no port for ``service``.
    """
    layout.service(service)
    info = find_instance(layout, number, state=state)
    for entry in info.services:
        if entry.name == service and entry.port is not None:
            return info, entry.port
    raise NotRunning(
        layout.app,
        f"instance {info.number} of {layout.app} holds no port for {service!r} "
        "(started with --service for other services?)",
        [info.number],
    )


def instance_env(layout: Layout, number: int | None = None, *, state: StateDir) -> dict[str, str]:
    """The environment every service of the instance is given, minus the per-service
    ``PORT``: ``PORTPOOL_APP``, ``PORTPOOL_INSTANCE``, each ``PORTPOOL_PORT_<SERVICE>``
    and ``PORTPOOL_SERVICES``. Raises NotRunning."""
    info = find_instance(layout, number, state=state)
    env = {"PORTPOOL_APP": layout.app, "PORTPOOL_INSTANCE": str(info.number)}
    names = []
    for entry in info.services:
        if entry.port is not None:
            env[port_env_name(entry.name)] = str(entry.port)
            names.append(entry.name)
    env["PORTPOOL_SERVICES"] = ",".join(names)
    return env


_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+-]*")


def format_env(env: dict[str, str], *, export: bool = False) -> str:
    """``KEY=value`` lines (a docker compose ``--env-file``), or ``export KEY=value`` lines
    quoted for a POSIX shell's ``eval``. Values with other characters are single-quoted,
    which both read literally."""
    lines = []
    for key, value in env.items():
        if export:
            lines.append(f"export {key}={shlex.quote(value)}")
        elif _PLAIN.fullmatch(value):
            lines.append(f"{key}={value}")
        else:
            lines.append(f"{key}='{value}'")  # app and service names never hold a quote
    return "\n".join(lines)


# ---------------------------------------------------------------- stop


@dataclass(frozen=True)
class Stopped:
    """An instance ``stop`` ended: its number, the process signalled, its ports."""

    number: int
    pid: int
    ports: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "pid": self.pid, "ports": list(self.ports)}


def _lock_holder(directory: DirHandle, number: int) -> int | None:
    """The pid holding slot ``number``'s kernel lock (Linux), else None if unknown."""
    locked = locked_inodes()
    if locked is None:
        return None
    st = directory.stat_entry(f"{number}.lock")
    return locked.get((st.st_dev, st.st_ino)) if st is not None else None


def _mismatch(number: int, holder: int | None, recorded: int) -> StopFailed:
    held = f"pid {holder} holds it" if holder is not None else "another process holds it"
    return StopFailed(
        number,
        f"its record does not match the process holding the slot ({held}, the record "
        f"names {recorded}): not signalling anything",
    )


def _stop_target(layout: Layout, number: int | None, state: StateDir) -> InstanceInfo:
    """``find_instance``, except that a running slot whose record is unreadable is a
    StopFailed naming the problem (it was reported as "starting" or "not running")."""
    if number is not None:
        directory = state.find_instances(layout.app)
        info = read_instance(directory, number) if directory is not None else None
        detail = _unreadable(info) if info is not None and info.alive else None
        if detail:
            raise StopFailed(number, f"its record is unreadable: {detail}: not signalling anything")
    return find_instance(layout, number, state=state)


def _verified_holder(layout: Layout, number: int, state: StateDir) -> tuple[InstanceInfo, str]:
    """The record of running instance ``number`` and why its pid may be signalled."""
    directory = state.instances(layout.app)
    info = _stop_target(layout, number, state)
    assert info.pid is not None  # a readable record has one
    try:
        raw = read_json_file(directory, f"{number}.json")
    except ValueError as e:
        raise StopFailed(
            number, f"its record is unreadable: record {e}: not signalling anything"
        ) from None
    if not isinstance(raw, dict) or raw.get("boot_id") != boot_id():
        raise StopFailed(number, "its record is from another boot: not signalling anything")
    holder = _lock_holder(directory, number)
    if holder is not None and holder != info.pid:
        raise _mismatch(number, holder, info.pid)
    return info, str(raw.get("start_token"))


def _is_recorded(pid: int, token: str, directory: DirHandle, number: int) -> Callable[[], bool]:
    def check() -> bool:
        now = identity_of(pid)
        if now is None or now.start_token != token:
            return False
        holder = _lock_holder(directory, number)
        return holder == pid if holder is not None else is_held(directory, f"{number}.lock", None)

    return check


def _is_down(state: StateDir, app: str, stopped: Stopped) -> bool:
    locked = locked_inodes()
    if is_held(state.instances(app), f"{stopped.number}.lock", locked):
        return False
    for port in stopped.ports:
        seen = inspect_port(state, port, locked)
        if seen.is_free:
            if listeners(port):
                return False  # something it started still listens: not free yet
        elif seen.record is None or seen.record.pid == stopped.pid:
            return False
        # else: a new holder (another instance) took it already: it is not ours to wait for
    return True


def stop_instances(
    layout: Layout,
    number: int | None = None,
    *,
    every: bool = False,
    timeout_s: float = 30.0,
    state: StateDir,
) -> list[Stopped]:
    """Ask instance ``number`` (default: as ``find_instance``), or ``every`` running one,
    to stop with SIGTERM to its ``up``/``run``, and wait until its slot and ports are free.

    The signal goes only to the process that holds the slot's kernel lock and whose
    identity matches the record (pid + start token + boot id). Raises NotRunning (none
    to stop), StopFailed (identity mismatch, an unreadable record, or still up after
    ``timeout_s`` seconds; nothing is ever killed). With ``every``, a running slot whose
    record is unreadable is left alone and reported once the others have stopped.
    """
    refused: list[StopFailed] = []
    if every:
        alive = [i for i in list_instances(layout.app, state) if i.alive]
        numbers = [i.number for i in alive if i.readable]
        for i in alive:
            detail = _unreadable(i)
            if detail:
                refused.append(
                    StopFailed(i.number, f"its record is unreadable: {detail}: not signalling it")
                )
        if not numbers and not refused:
            raise NotRunning(layout.app, f"no instance of {layout.app} is running")
    else:
        numbers = [_stop_target(layout, number, state).number]
    directory = state.instances(layout.app) if numbers else None
    sent: list[Stopped] = []
    for n in numbers:
        assert directory is not None
        info, token = _verified_holder(layout, n, state)
        assert info.pid is not None
        ports = tuple(s.port for s in info.services if s.port is not None)
        if not signal_verified(
            info.pid, _is_recorded(info.pid, token, directory, n), signal.SIGTERM
        ):
            if not read_instance(directory, n).alive:
                sent.append(Stopped(n, info.pid, ports))  # it stopped on its own meanwhile
                continue
            holder = _lock_holder(directory, n)
            if holder is not None and holder != info.pid:
                raise _mismatch(n, holder, info.pid)
            raise StopFailed(
                n, f"pid {info.pid} is no longer the recorded process: not signalling it"
            )
        sent.append(Stopped(n, info.pid, ports))
    deadline = time.monotonic() + timeout_s
    for stopped in sent:
        while not _is_down(state, layout.app, stopped):
            if time.monotonic() > deadline:
                raise StopFailed(
                    stopped.number,
                    f"pid {stopped.pid} got SIGTERM but still holds the instance or its "
                    f"ports after {timeout_s:g} s (try again, or a longer --timeout)",
                )
            time.sleep(_POLL_S)
    if refused:
        raise refused[0]  # the others were stopped; this one was not touched
    return sent


# ---------------------------------------------------------------- detached up and its logs


def _logs_dir(state: StateDir, app: str) -> DirHandle:
    return state.subdir("apps", check_name("app", app), "logs")


def log_path(state: StateDir, app: str, number: int) -> str:
    """Where the output of detached instance ``number`` of ``app`` is kept."""
    return os.path.join(state.path, "apps", check_name("app", app), "logs", f"{number}.log")


# `<n>.log` is tied to the `up` that wrote it by `<n>.owner.json` (its pid and start
# token): a later attached instance on the same number has no log, and must not be shown
# the previous detached one's as if it were its own.
def _owner_name(number: int) -> str:
    return f"{number}.owner.json"


def _log_owner(logs: DirHandle, number: int) -> tuple[int, str] | None:
    try:
        raw = read_json_file(logs, _owner_name(number))
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    pid, token = raw.get("pid"), raw.get("start_token")
    if type(pid) is not int or not isinstance(token, str):
        return None
    return pid, token


@dataclass(frozen=True)
class Detached:
    """An instance started by ``start_detached``: number, ``up``'s pid, ports (from its
    verified record), log, and the lines ``up`` printed about itself before it was up
    (warnings such as a skipped slot)."""

    number: int
    pid: int
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# The line `up` prints once every service is ready: "portpool: instance N of APP is up".
# Anchored at "portpool: " so that a service's own output ("name | ...") never matches.
_UP_LINE = re.compile(rb"(?m)^portpool: instance (\d+)\b[^\n]*\bis up\b")
_OWN_LINE = re.compile(rb"(?m)^portpool: [^\n]*")
_TAIL_LINES = 20
_STOP_WAIT_S = 10.0


def _outcome(returncode: int | None) -> str:
    from portpool.supervisor import describe_status  # one wording for a child's end

    if returncode is None:
        return "stopped"
    if returncode < 0:
        return f"was {describe_status(returncode)}"
    return f"exited with status {returncode}"


def _read_all(directory: DirHandle, name: str) -> bytes:
    fd = directory.open_file(name, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _tail(seen: bytes) -> str:
    return b"\n".join(seen.splitlines()[-_TAIL_LINES:]).decode(errors="replace")


def start_detached(
    layout: Layout, up_args: Sequence[str], *, state: StateDir, cwd: str | None = None
) -> Detached:
    """Start ``portpool up UP_ARGS`` in the background, in its own session, its output
    (the services' prefixed lines and its own) going to ``log_path(...)``; return once it
    says the instance is up and its record (pid, start token, lock) shows it running.

    Raises DetachFailed with its exit status (128+N if killed by signal N) and the log's
    tail if it exits first, or if it stopped right after it said it was up.
    """
    logs = _logs_dir(state, layout.app)
    starting = f".starting-{os.getpid()}.log"
    fd = logs.open_file(starting, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "portpool.cli", "up", *up_args],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd=cwd,
            env=env,
            **detached_options(),
        )
    finally:
        os.close(fd)
    # Its identity now, while it surely runs: the record must name this very process.
    identity = identity_of(proc.pid)
    reader = logs.open_file(starting, os.O_RDONLY)
    seen = b""
    try:
        while True:
            chunk = os.read(reader, 1 << 16)
            seen += chunk
            found = _UP_LINE.search(seen)
            if found:
                number = int(found.group(1))
                break
            if not chunk:
                if proc.poll() is not None:
                    rest = os.read(reader, 1 << 20)
                    if rest:
                        seen += rest
                        continue
                    raise DetachFailed(
                        proc.returncode,
                        os.path.join(logs.path, starting),
                        _tail(seen),
                        _outcome(proc.returncode),
                    )
                time.sleep(_POLL_S)
    except BaseException:
        if proc.poll() is None:  # interrupted while waiting: do not leave it half-started
            proc.terminate()
            proc.wait()
        raise
    finally:
        os.close(reader)
    notes = tuple(
        m.group().decode(errors="replace") for m in _OWN_LINE.finditer(seen, 0, found.start())
    )
    info = read_instance(state.instances(layout.app), number)
    if not (
        identity is not None
        and info.alive
        and info.readable
        and info.pid == proc.pid
        and info.start_token == identity.start_token
    ):
        # It said "is up" and stopped at once: its ports are not held, do not list them.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_WAIT_S)
        seen = _read_all(logs, starting)
        raise DetachFailed(
            proc.returncode,
            os.path.join(logs.path, starting),
            _tail(seen),
            _outcome(proc.returncode),
            when="right after it was up",
        )
    with contextlib.suppress(FileNotFoundError):
        logs.unlink(f"{number}.log")  # the previous owner's: never shown under the new one
    owner = {"pid": proc.pid, "start_token": identity.start_token}
    write_atomic(logs, _owner_name(number), json.dumps(owner).encode())
    logs.rename(starting, f"{number}.log")
    ports = {s.name: s.port for s in info.services if s.port is not None}
    return Detached(number, proc.pid, os.path.join(logs.path, f"{number}.log"), ports, notes)


def _service_of(line: str) -> str | None:
    head, sep, _ = line.partition(" | ")
    return head.rstrip() if sep else None


def _no_log(layout: Layout, number: int, running: bool) -> NotRunning:
    if not running:
        return NotRunning(
            layout.app,
            f"instance {number} of {layout.app} is not running and has no log "
            "(only `portpool up --detach` writes one)",
        )
    return NotRunning(
        layout.app,
        f"instance {number} of {layout.app} has no log (it was not started with --detach)",
        [number],
    )


def _owner_runs(state: StateDir, app: str, number: int, owner: tuple[int, str]) -> bool:
    """Whether the ``up`` that wrote the log still runs and holds slot ``number``."""
    now = identity_of(owner[0])
    if now is None or now.start_token != owner[1]:
        return False
    directory = state.find_instances(app)
    return directory is not None and is_held(directory, f"{number}.lock", locked_inodes())


def follow_log(
    layout: Layout,
    write: Callable[[str], None],
    *,
    service: str | None = None,
    number: int | None = None,
    follow: bool = False,
    state: StateDir,
) -> int:
    """Write the log of a detached instance line by line (only ``service``'s lines, with
    their prefix, when given); with ``follow`` keep writing until the ``up`` that wrote
    it stops.

    The instance is ``number``, else as ``find_instance``, else this checkout's last
    number. A running instance is shown only the log its own ``up`` wrote; a stopped one,
    the last detached instance's. Returns that number. Raises UnknownService, NotRunning
    (no such instance, or it has no log). Read-only: creates nothing.
    """
    if service is not None:
        layout.service(service)
    running: InstanceInfo | None = None
    if number is None:
        try:
            running = find_instance(layout, state=state)
            number = running.number
        except NotRunning:
            number = previous_number(state, layout, checkout_dir(layout))
            if number is None:
                raise
    else:
        directory = state.find_instances(layout.app)
        slot = read_instance(directory, number) if directory is not None else None
        running = slot if slot is not None and slot.alive else None
    logs = state.find("apps", check_name("app", layout.app), "logs")
    owner = _log_owner(logs, number) if logs is not None else None
    if logs is None or (
        running is not None and (owner is None or (running.pid, running.start_token) != owner)
    ):
        # Running, but not the up that wrote this log: that log is not this instance's.
        raise _no_log(layout, number, running is not None)
    try:
        fd = logs.open_file(f"{number}.log", os.O_RDONLY)
    except FileNotFoundError:
        raise _no_log(layout, number, running is not None) from None
    follow = follow and owner is not None and running is not None
    pending = b""
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if service is None or _service_of(line) == service:
                        write(line)
                continue
            if not follow:
                break
            assert owner is not None
            if not _owner_runs(state, layout.app, number, owner):
                follow = False  # stopped: read what it wrote before it went, then end
                continue
            time.sleep(0.2)
    finally:
        os.close(fd)
    if pending and (service is None or _service_of(pending.decode(errors="replace")) == service):
        write(pending.decode(errors="replace"))
    return number


# ---------------------------------------------------------------- layout, for scripts


def layout_document(layout: Layout) -> dict[str, Any]:
    """The layout as one JSON-ready object: settings, services, every admissible
    instance's pools, warnings."""
    return {
        "app": layout.app,
        "source": layout.source,
        "host": layout.host,
        "heartbeat_interval": layout.heartbeat_interval_s,
        "shield_interval": layout.shield_interval_s,
        "max_instances": layout.max_instances,
        "admissible_instances": layout.admissible_instances,
        "limit_reason": layout.limit_reason,
        "services": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
            for s in layout.services
        ],
        "instances": [
            {"number": n, "pools": layout.pools(n)} for n in range(1, layout.max_instances + 1)
        ],
        "warnings": list(layout_warnings(layout)),
    }


def check_number(layout: Layout, number: int | None) -> None:
    """UsageError (exit 2) for an instance number outside 1..max_instances."""
    if number is not None and not 1 <= number <= layout.max_instances:
        raise UsageError(
            f"--instance must be 1..{layout.max_instances} for app {layout.app!r}, not {number}"
        )
