"""Choosing an instance's slot: which number an instance gets, and remembering it.

The number is the pinned one if given, else the one the last instance started for the
same checkout had, else the lowest free one; a slot where a service's whole pool is
taken (by foreign programs or other apps' leases) is skipped. A slot is the kernel lock
``apps/<app>/instances/<n>.lock``; here too, whether a held slot and its record are
still ours (``own_slot_problem``). What runs in it (the leases, what the record says) is
``portpool.instance``'s concern.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from portpool._heldlock import HeldLock, lock_path_kind
from portpool._jsonfile import not_a_record, read_json_file, write_atomic
from portpool._layout_load import absolute_path, working_directory
from portpool._platform import DirHandle, current_identity, locked_inodes
from portpool._slot_holder import running_holder
from portpool._text import printable
from portpool.errors import (
    AlreadyHeldHere,
    LockHeld,
    NoFreeSlot,
    PoolExhausted,
    PortPoolError,
    SlotHolder,
    SlotUnavailable,
    StateDirError,
    UsageError,
)
from portpool.layout import Layout
from portpool.records import (
    RECORD_BLOCKER,
    SLOT_UNUSABLE,
    lost_lock,
    read_instance,
)
from portpool.statedir import StateDir, check_name, special_entry

__all__ = [
    "checkout_dir",
    "fill_slot",
    "own_slot_problem",
    "previous_number",
    "remember_number",
]

log = logging.getLogger("portpool.instance")
T = TypeVar("T")

_SLOT_PASSES = 3


def checkout_dir(layout: Layout, cwd: str | None = None) -> str:
    """The directory an instance is started for: the layout file's directory, or ``cwd``
    (default: the working directory) for a layout that is not a file (the built-in one).
    Raises UsageError if the working directory it needs was removed."""
    if layout.source and os.path.isfile(layout.source):
        # The directory the file is in, not its target's if it is a symlink: worktrees
        # that link one shared layout file were all one checkout (port/stop crossed them).
        return os.path.realpath(os.path.dirname(absolute_path(layout.source)))
    return os.path.realpath(cwd if cwd is not None else working_directory())


def _checkout_file(directory: str) -> str:
    digest = hashlib.sha256(directory.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{digest[:32]}.json"


def previous_number(state: StateDir, layout: Layout, directory: str) -> int | None:
    """The number the last instance started for ``directory`` had, if it is admissible."""
    try:
        handle = state.subdir("apps", check_name("app", layout.app), "checkouts")
        raw = read_json_file(handle, _checkout_file(directory))
    except (ValueError, PortPoolError):
        return None
    if not isinstance(raw, dict) or raw.get("dir") != directory:
        return None
    number = raw.get("number")
    if type(number) is int and 1 <= number <= layout.max_instances:
        return number
    return None


def remember_number(
    state: StateDir, app: str, directory: str, number: int, remembered: int | None, *, pinned: bool
) -> None:
    """Remember ``number`` as ``directory``'s, unless it is ``remembered`` (the number
    ``previous_number`` gave) or ``remembered`` still runs there: a second copy for the
    same checkout, pinned to a number or not, must not move the first one's number
    (``stop`` without one stopped the second). Not ``pinned``, a start took another
    number only because ``remembered`` was busy: it moves the checkout only while another
    checkout's instance holds it (a copy that ended since moved it: eight parallel runs
    left the checkout on 4). A failure is logged, never raised."""
    if number == remembered:
        return
    if remembered is not None:
        info = read_instance(state.instances(app), remembered)
        here = info.alive and info.directory == directory
        elsewhere = info.alive and info.directory not in (None, directory)  # None: starting
        if here or not (pinned or elsewhere):
            return
    data = json.dumps({"dir": directory, "number": number}).encode()
    try:
        handle = state.subdir("apps", check_name("app", app), "checkouts")
        write_atomic(handle, _checkout_file(directory), data)
    except PortPoolError as e:
        log.warning("cannot remember instance %d for %s: %s", number, directory, e)


def _slot_order(layout: Layout, preferred: int | None, skip: set[int]) -> list[int]:
    numbers = [n for n in range(1, layout.max_instances + 1) if n not in skip]
    if preferred in numbers:
        numbers.remove(preferred)
        numbers.insert(0, preferred)
    return numbers


def _take_slot(
    state: StateDir, layout: Layout, preferred: int | None = None, skip: set[int] | None = None
) -> tuple[int, HeldLock]:
    directory = state.instances(layout.app)
    order = _slot_order(layout, preferred, skip or set())
    for attempt in range(_SLOT_PASSES):
        if attempt:
            # A cleaner holds a dead slot's lock for a moment while it removes the
            # record: look again before telling the user every slot is taken.
            time.sleep(0.02 * attempt)
        for number in order[:]:
            blocker = _record_blocker(directory, number)
            if blocker is not None:
                # A directory at its record path ended every start of the app after
                # its leases were taken ("cannot write 1.json"), other slots free.
                log.warning("instance slot %d of %s skipped: %s", number, layout.app, blocker)
                order.remove(number)
                continue
            try:
                held = HeldLock.acquire(directory, f"{number}.lock")
            except (LockHeld, AlreadyHeldHere):
                unusable = _held_elsewhere(directory, number)
                if unusable is not None:  # another slot's lock file: skipped without a word
                    log.warning("instance slot %d of %s skipped: %s", number, layout.app, unusable)
                    order.remove(number)
                continue
            except StateDirError as e:
                if e.path != os.path.join(directory.path, f"{number}.lock"):
                    raise  # the directory itself refuses: so does every slot
                # A symlink or a directory at one slot's lock path ended every start
                # of the app: that slot is not free, the next one may be (as a pool
                # rotates past such a port). Named once; NoFreeSlot lists it too.
                log.warning("instance slot %d of %s skipped: %s", number, layout.app, e)
                order.remove(number)
                continue
            lost = _keep_unless_lost(directory, number, held)
            if lost is None:
                return number, held
            # Its instance runs on, its lock file removed under it: the number is still
            # its (two instances 1 ran until its shield's next check).
            log.warning("instance slot %d of %s skipped: it %s", number, layout.app, lost)
            order.remove(number)
    locked = locked_inodes()
    holders = []
    for number in range(1, layout.max_instances + 1):
        info = read_instance(directory, number, locked)
        if info.readable:
            detail = f"pid {info.pid}, heartbeat {info.heartbeat_age_s:.0f} s ago"
            detail += f"; {info.problem}" if info.problem else ""
        else:
            detail = info.problem or "record unreadable"
        holders.append(SlotHolder(number, info.pid, detail))
    raise NoFreeSlot(layout.app, holders, _limit_words(layout))


def _keep_unless_lost(directory: DirHandle, number: int, held: HeldLock) -> str | None:
    """``_lock_lost`` for the slot whose lock ``held`` was just taken: None with it kept;
    else the words, with it released. Released too when the check is interrupted (a
    Ctrl-C there kept the slot, held by nobody's instance)."""
    try:
        lost = _lock_lost(directory, number)
    except BaseException:
        held.release()
        raise
    if lost is not None:
        held.release()
    return lost


def _lock_lost(directory: DirHandle, number: int) -> str | None:
    """``lost_lock``'s words when slot ``number``'s record names a process that runs
    (not this one) holding the lock of a removed or replaced lock file of the slot; else
    None. Asked once the slot is ours: no instance can have taken it since. Raises
    nothing."""
    try:
        raw = read_json_file(directory, f"{number}.json")
    except (OSError, ValueError):
        return None
    holder = running_holder(raw)
    return None if holder in (None, os.getpid()) else lost_lock(directory, number, holder)


def _record_blocker(directory: DirHandle, number: int) -> str | None:
    """Why slot ``number``'s record cannot be written (a directory at its path), or None.
    A symlink or FIFO there is replaced by the record's rename, never followed."""
    try:
        kind = special_entry(directory, f"{number}.json")
    except OSError:
        return None  # the start's own write says what is wrong, naming the path
    if kind != RECORD_BLOCKER:
        return None
    return not_a_record(os.path.join(directory.path, f"{number}.json"), kind)


def _held_elsewhere(directory: DirHandle, number: int) -> str | None:
    """Why held slot ``number`` is no instance's: its lock file is another name (a hard
    link) of a lock someone holds, and no running holder's record makes it this slot's
    (``read_instance``'s words); None for a slot that is simply held."""
    try:
        if lock_path_kind(directory, f"{number}.lock") is None:
            return None  # one name: held by its own instance
    except OSError:
        return None
    problem = read_instance(directory, number).problem or ""
    return problem.removeprefix(SLOT_UNUSABLE) if problem.startswith(SLOT_UNUSABLE) else None


def _limit_words(layout: Layout) -> str:
    if layout.max_instances < layout.admissible_instances:
        return f"max_instances = {layout.max_instances} in the layout"
    many = "instance" if layout.admissible_instances == 1 else "instances"
    return f"the layout admits {layout.admissible_instances} {many}: {layout.limit_reason}"


def _take_pinned(state: StateDir, layout: Layout, number: int) -> HeldLock:
    if type(number) is not int or not 1 <= number <= layout.max_instances:
        raise UsageError(
            f"instance must be 1..{layout.max_instances} for app {layout.app!r}, not {number!r}"
        )
    directory = state.instances(layout.app)
    blocker = _record_blocker(directory, number)
    if blocker is not None:
        raise SlotUnavailable(layout.app, number, f"its slot is unusable: {blocker}")
    for attempt in range(_SLOT_PASSES):
        if attempt:
            time.sleep(0.02 * attempt)  # a cleaner may hold a dead slot's lock for a moment
        try:
            held = HeldLock.acquire(directory, f"{number}.lock")
        except (LockHeld, AlreadyHeldHere):
            continue
        except StateDirError as e:
            if e.path != os.path.join(directory.path, f"{number}.lock"):
                raise  # the directory itself refuses
            # Not free, as when unpinned (exit 3): it ended as a state dir error (1).
            raise SlotUnavailable(layout.app, number, f"its slot is unusable: {e}") from e
        lost = _keep_unless_lost(directory, number, held)
        if lost is None:
            return held
        raise SlotUnavailable(layout.app, number, f"it {lost}")
    info = read_instance(directory, number)
    if info.problem is not None and info.problem.startswith(SLOT_UNUSABLE):
        # A second name of another slot's held lock: not running, never to be had.
        why = info.problem.removeprefix(SLOT_UNUSABLE)
        raise SlotUnavailable(layout.app, number, f"its slot is unusable: {why}")
    who = f"pid {info.pid}" if info.pid is not None else (info.problem or "unknown")
    where = f", started for {printable(info.directory)}" if info.directory else ""
    raise SlotUnavailable(layout.app, number, f"it is running ({who}{where})")


def _blocked(error: PoolExhausted) -> bool:
    """Every port of the pool is refused (by foreign programs, or by leases of another
    app or process sharing the state dir): the next slot's pool may well be free. A
    pool partly held by another app's instance used to end the start (exit 3) while
    the next slot was free. Not when the host is no address of this machine: that
    refuses every slot alike, and trying each one printed a warning per slot (329 of
    them) before the same error."""
    reasons = {r.reason for r in error.refusals}
    return bool(reasons) and reasons != {"unavailable"}


def fill_slot(
    state: StateDir,
    layout: Layout,
    fill: Callable[[int, HeldLock], T],
    *,
    number: int | None,
    preferred: int | None,
) -> tuple[T, int, list[tuple[int, str]]]:
    """Take a slot and return ``fill(number, slot)`` (which owns the slot from then on,
    and releases it before raising), the number taken, and the slots skipped as
    ``(number, why)``.

    The slot is ``number`` if given (SlotUnavailable if it is running, UsageError if it
    is outside 1..max), else ``preferred`` if it is free, else the lowest free one. When
    ``fill`` raises PoolExhausted because a whole pool is refused (foreign programs, other
    apps' leases; not a host this machine lacks), the next free slot is tried (a warning
    says which and why). Raises NoFreeSlot, or the last
    such PoolExhausted when every free slot was blocked (exit 3).
    """
    skipped: list[tuple[int, str]] = []
    blocked: PoolExhausted | None = None
    while True:
        if number is not None:
            taken, slot = number, _take_pinned(state, layout, number)
        else:
            try:
                taken, slot = _take_slot(state, layout, preferred, {n for n, _ in skipped})
            except NoFreeSlot:
                if blocked is None:
                    raise
                raise blocked from None  # every free slot was blocked: say why (exit 3)
        try:
            return fill(taken, slot), taken, skipped
        except PoolExhausted as e:
            if number is not None or not _blocked(e):
                raise
            refused = "; ".join(str(r) for r in e.refusals)
            every = "its only port is" if len(e.refusals) == 1 else "every port of its pool is"
            why = f"service {e.service!r}: {every} refused ({refused})"
            log.warning("instance %d of %s skipped: %s", taken, layout.app, why)
            skipped.append((taken, why))
            blocked = e


def own_slot_problem(state: StateDir, app: str, number: int, slot: HeldLock) -> str | None:
    """None while slot ``number``'s lock (``slot``, held by this process) and its record
    are still this process's, as our handles see them, else what went wrong: then they
    are ours to remove, even in a state dir moved away. Raises StateDirError if the
    instances directory cannot be opened, OSError if the lock cannot be examined."""
    slot_problem = slot.problem()
    if slot_problem is not None:
        return f"instance slot {number}: {slot_problem}"
    try:
        raw = read_json_file(state.instances(app), f"{number}.json")
    except ValueError as e:
        return f"instance record {number}.json {e}"
    me = current_identity()
    if not isinstance(raw, dict):
        return f"instance record {number}.json was removed by another process"
    if (raw.get("pid"), raw.get("start_token")) != (me.pid, me.start_token):
        return (
            f"instance record {number}.json was rewritten by another process "
            f"(it now names pid {raw.get('pid')})"
        )
    return None
