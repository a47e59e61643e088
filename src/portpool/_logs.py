"""The logs of detached instances: where each is kept, which ``up`` wrote it, and
reading or following one (``portpool logs [-f]``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator

from portpool._find import enclosing_instance, find_instance, running_slot
from portpool._heldlock import is_held
from portpool._jsonfile import NotAFile, read_json_file, write_atomic
from portpool._platform import DirHandle, identity_of, locked_inodes
from portpool._slots import checkout_dir, previous_number
from portpool._text import printable
from portpool.errors import NotRunning, StateDirError, UsageError
from portpool.layout import Layout, require_layout
from portpool.records import SLOT_UNUSABLE, InstanceInfo
from portpool.statedir import StateDir, check_name, special_entry

__all__ = ["STARTING_LOG", "drop_log_owner", "follow_log", "log_path", "logs_dir", "set_log_owner"]


def logs_dir(state: StateDir, app: str) -> DirHandle:
    """The directory of ``app``'s detached logs, created if missing."""
    return state.subdir("apps", check_name("app", app), "logs")


def log_path(state: StateDir, app: str, number: int) -> str:
    """The path (str) where the output of detached instance ``number`` (1..) of ``app``
    is kept; the file may not exist. Raises StateDirError if ``app`` is not a valid name
    (it becomes a directory name), UsageError for a ``number`` below 1 (or not an int):
    it named "logs/0.log" and "logs/-3.log"."""
    if type(number) is not int or number < 1:
        raise UsageError(f"instance number must be 1 or more, not {number!r}")
    return os.path.join(state.path, "apps", check_name("app", app), "logs", f"{number}.log")


# `<n>.log` is tied to the `up` that wrote it by `<n>.owner.json` (its pid and start
# token): a later attached instance on the same number has no log, and must not be shown
# the previous detached one's as if it were its own. Until it is moved there (by `up
# --detach` once the instance is up; by the background up itself, once it has its number,
# if `up --detach` died), the log is `.starting-<pid>.log`, tied the same way by
# `.owner-of-starting-<pid>.json`, which the background up writes itself before it takes
# a slot: the log is its instance's while it starts, and if `up --detach` dies first.
# (Not `.starting-<pid>.owner.json`: `.starting-*` is how users pick out those logs.)
_STARTING = ".starting-"
STARTING_LOG = re.compile(r"\.starting-([0-9]+)\.log")  # an up's log until it has a slot
_STARTING_OWNER = re.compile(r"\.owner-of-starting-([0-9]+)\.json")


def _owner_name(log: str) -> str:
    if log.startswith(_STARTING):
        return f".owner-of-{log[1:].removesuffix('.log')}.json"
    return log.removesuffix(".log") + ".owner.json"


def _read_owner(logs: DirHandle, log: str) -> dict[str, object] | None:
    try:
        raw = read_json_file(logs, _owner_name(log))
    except NotAFile as e:
        # Never portpool's: "not started with --detach" hid a detached instance's log.
        where = os.path.join(logs.path, _owner_name(log))
        raise StateDirError(where, f"{e}: remove it") from e
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


def _log_owner(logs: DirHandle, log: str) -> tuple[int, str] | None:
    raw = _read_owner(logs, log)
    if raw is None:
        return None
    pid, token = raw.get("pid"), raw.get("start_token")
    if type(pid) is not int or not 0 < pid < 2**31 or not isinstance(token, str):
        return None
    return pid, token


def set_log_owner(
    logs: DirHandle, log: str, pid: int, start_token: str, directory: str | None = None
) -> None:
    """Record that the log named ``log`` (``<n>.log`` before it is renamed into place,
    ``.starting-<pid>.log`` before its ``up`` takes a slot) is written by the ``up``
    with ``pid`` and ``start_token``, for the checkout ``directory`` (an instance's
    number may be another checkout's later). Raises StateDirError if it cannot be
    written."""
    owner = {"pid": pid, "start_token": start_token, "dir": directory}
    write_atomic(logs, _owner_name(log), json.dumps(owner).encode())


def drop_log_owner(logs: DirHandle, log: str) -> None:
    """Remove the record of who writes ``log``, if any (its log moved, or its ``up``
    is gone). Raises nothing: a record left behind names an ``up`` that no longer runs."""
    with contextlib.suppress(OSError):
        logs.unlink(_owner_name(log))


def _starting_logs(logs: DirHandle) -> Iterator[str]:
    """The ``.starting-<pid>.log`` names some ``up`` claimed (of ups starting, or whose
    ``up --detach`` died before they were up, or that failed), listed when first asked."""
    try:
        names = logs.listdir()
    except OSError as e:
        raise StateDirError(logs.path, f"cannot be listed: {e.strerror or e}") from e
    for name in names:
        claimed = _STARTING_OWNER.fullmatch(name)
        if claimed:
            yield f"{_STARTING}{claimed.group(1)}.log"


def _service_of(line: str) -> str | None:
    head, sep, _ = line.partition(" | ")
    return head.rstrip() if sep else None


def _failed_start(logs: DirHandle | None) -> str:
    """Where the newest ``.starting-<pid>.log`` that no ``up`` claims is (the output of an
    ``up --detach`` that failed before it was up), as words for "has no log", else "":
    that alone sent users looking for a log that was there."""
    if logs is None:
        return ""
    try:
        claimed = set(_starting_logs(logs))
        found = [
            (st.st_mtime, name)
            for name in logs.listdir()
            if STARTING_LOG.fullmatch(name)
            and name not in claimed
            and (st := logs.stat_entry(name)) is not None
        ]
    except (OSError, StateDirError):
        return ""
    if not found:
        return ""
    newest = os.path.join(logs.path, max(found)[1])
    return f"; an `up --detach` that failed before it was up left its output in {newest}"


def _no_log(
    layout: Layout,
    number: int,
    running: bool,
    why: str | None = None,
    logs: DirHandle | None = None,
) -> NotRunning:
    """``why``: what is wrong with the slot (``slot unusable: ...``), said too: every
    other command names it, and logs said only "not running". ``logs``: where to look
    for the output of a failed start, named too."""
    if not running:
        return NotRunning(
            layout.app,
            f"instance {number} of {layout.app} is not running"
            + (f" ({why})" if why else "")
            + " and has no log (only `portpool up --detach` writes one"
            + _failed_start(logs)
            + ")",
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
    # Asked of the owner's own fds (it is the very process: start token checked above):
    # read every 0.2 s, /proc/locks would stall every flock() on the host each time.
    return directory is not None and is_held(
        directory, f"{number}.lock", locked_inodes, holder=owner[0]
    )


def _wrote_log(
    state: StateDir, app: str, running: InstanceInfo, owner: tuple[int, str] | None
) -> bool:
    """Whether the running instance is the ``up`` that wrote the log (``owner``). Its
    record says; an unreadable one cannot (it read as "not started with --detach", and
    the log was hidden), so the owner is asked: it runs and holds the slot."""
    if owner is None:
        return False
    if running.readable:
        return (running.pid, running.start_token) == owner
    if not _owner_runs(state, app, running.number, owner):
        return False
    # It runs and the slot is held; held by it, where the kernel's table says who.
    directory = state.find_instances(app)
    st = directory.stat_entry(f"{running.number}.lock") if directory is not None else None
    table = locked_inodes()
    if st is None or table is None:
        return st is not None
    pid = table.get((st.st_dev, st.st_ino))
    return pid == owner[0] or (pid is None and not table.complete)  # not listed: unknown


def _log_error(logs: DirHandle, log: str, problem: str) -> StateDirError:
    return StateDirError(os.path.join(logs.path, log), problem)


def _open_log(logs: DirHandle, log: str) -> int | None:
    """The log's fd, None if there is none. A symlink or directory there ended in a
    traceback; it is never portpool's, so it is named (StateDirError), not followed."""
    try:
        kind = special_entry(logs, log)
        if kind is not None:
            raise _log_error(logs, log, f"is {kind}, not a log portpool wrote; remove it")
        return logs.open_file(log, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _log_error(logs, log, f"cannot be read: {e.strerror or e}") from e


def _read_log(logs: DirHandle, log: str, fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError as e:
        raise _log_error(logs, log, f"cannot be read: {e.strerror or e}") from e


def _open_own_log(
    state: StateDir, app: str, logs: DirHandle, running: InstanceInfo
) -> tuple[str, tuple[int, str], int] | None:
    """The log the running instance's own ``up`` writes: its name, owner and an open fd;
    None if there is none (it was not started with --detach). Raises NotRunning if its
    log was there and was removed, StateDirError as ``_open_log``.

    ``<n>.log`` is asked before and after the starting logs: `up --detach` or its up moves it
    there (owner, rename, then the starting owner removed) while this looks, and one of
    the three looks finds it wherever the move had got to."""
    placed = f"{running.number}.log"
    claimed = False
    for log in itertools.chain([placed], _starting_logs(logs), [placed]):
        owner = _log_owner(logs, log)
        if owner is None or not _wrote_log(state, app, running, owner):
            continue
        claimed = True
        fd = _open_log(logs, log)
        if fd is not None:
            return log, owner, fd
    if not claimed:
        return None
    # Its own up wrote it (the owner matched): it was there, and someone removed it.
    path = os.path.join(logs.path, placed)
    raise NotRunning(app, f"the log of instance {running.number} ({path}) was removed", [
        running.number
    ])  # fmt: skip


def _log_checkout(logs: DirHandle | None, number: int) -> str | None:
    """The checkout ``<number>.log`` was written for, as its owner file says; None if it
    does not say (no log, or one an older portpool wrote)."""
    owner = None if logs is None else _read_owner(logs, f"{number}.log")
    named = None if owner is None else owner.get("dir")
    return named if isinstance(named, str) else None


def _own_stopped_number(
    layout: Layout, state: StateDir, logs: DirHandle | None, here: str
) -> int | None:
    """This checkout's (``here``'s) last number when it does not run and has a log in
    ``logs`` written for this checkout (another checkout may have had the number since),
    else None."""
    own = previous_number(state, layout, here)
    if own is None or logs is None or _log_checkout(logs, own) not in (None, here):
        return None
    slot = running_slot(layout, own, state=state)
    try:
        found = logs.stat_entry(f"{own}.log") is not None
    except OSError:
        return None
    return own if found and not (slot is not None and slot.alive) else None


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

    The instance is ``number``, else as ``find_instance`` (but this checkout's last
    number rather than another checkout's, unless that one started this process, when
    this checkout's stopped and has its log),
    else this checkout's last number. A running instance is shown only the log its
    own ``up`` wrote, from its start (while it starts too, and if its ``up --detach``
    died before it was up); a stopped one, the last detached instance's. Returns that
    number. Raises
    UnknownService, UsageError (a ``number`` outside 1..max_instances that does not
    run), NotRunning (no such instance, or it has no log), StateDirError (the log is a
    symlink, a directory, ... or cannot be read), TypeError (``layout`` no Layout).
    Read-only: creates nothing.
    """
    require_layout(layout)
    if service is not None:
        layout.service(service)
    running: InstanceInfo | None = None
    unusable: str | None = None
    if number is None:
        here = checkout_dir(layout)
        logs = state.find("apps", check_name("app", layout.app), "logs")
        try:
            running = find_instance(layout, state=state)
            number = running.number
            if running.directory != here and enclosing_instance([running]) is None:
                # This checkout's last instance, stopped, with its log: not another
                # checkout's "only running one" (it said that one "has no log", never
                # showing this one's).
                stopped = _own_stopped_number(layout, state, logs, here)
                if stopped is not None:
                    running, number = None, stopped
        except NotRunning as e:
            # None runs: this checkout's last log. Some run (several, none of them this
            # checkout's, or one whose record is unreadable): which one is for the user.
            if e.running:
                number = _own_stopped_number(layout, state, logs, here)
            else:
                number = previous_number(state, layout, here)
            if number is None:
                raise
            other = _log_checkout(logs, number)
            if other is not None and other != here:  # shown as ours
                raise NotRunning(layout.app, (
                    f"instance {number} of {layout.app} is not running, and its last "
                    f"log is another checkout's ({printable(other)})"
                ), []) from None  # fmt: skip
    else:
        slot = running_slot(layout, number, state=state)
        running = slot if slot is not None and slot.alive else None
        if slot is not None and (slot.problem or "").startswith(SLOT_UNUSABLE):
            unusable = slot.problem
    logs = state.find("apps", check_name("app", layout.app), "logs")
    if logs is None:
        raise _no_log(layout, number, running is not None, unusable)
    owner: tuple[int, str] | None = None  # the up that writes it: followed while it runs
    if running is not None:
        # Only the log its own up wrote: another one is not this instance's.
        own = _open_own_log(state, layout.app, logs, running)
        if own is None:
            raise _no_log(layout, number, True)
        log, owner, fd = own
    else:
        log = f"{number}.log"
        opened = _open_log(logs, log)
        if opened is None:
            raise _no_log(layout, number, False, unusable, logs)
        fd = opened
    # A line's parts until it ends, joined once: adding each chunk to one bytes object
    # and splitting it all again made a long line quadratic (16 MB: 2.1 s, 32 MB: 7.3 s).
    pending: list[bytes] = []
    try:
        while True:
            chunk = _read_log(logs, log, fd)
            if chunk:
                if b"\n" not in chunk:
                    pending.append(chunk)
                    continue
                *lines, rest = b"".join([*pending, chunk]).split(b"\n")
                pending = [rest]
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if service is None or _service_of(line) == service:
                        write(line)
                continue
            if not follow or owner is None:
                break
            if not _owner_runs(state, layout.app, number, owner):
                follow = False  # stopped: read what it wrote before it went, then end
                continue
            time.sleep(0.2)
    finally:
        os.close(fd)
    last = b"".join(pending).decode(errors="replace")
    if last and (service is None or _service_of(last) == service):
        write(last)
    return number
