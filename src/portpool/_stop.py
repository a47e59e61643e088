"""Stopping running instances: SIGTERM only to a verified holder, then waiting until
its slot and ports are free (``portpool stop``).

``stop`` signals only the process that holds the slot's kernel lock and whose identity
(pid + start token + boot id) is the one recorded (rule 7: a pid from a file, signalled
blindly, kills whoever got the pid next).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from portpool._dataclass import dataclass, field
from portpool._find import (
    find_instance,
    lost_its_lock,
    running_slot,
    unreadable_detail,
    unusable_words,
)
from portpool._heldlock import is_held
from portpool._jsonfile import read_json_file, record_problem
from portpool._occupants import with_owners
from portpool._platform import (
    DirHandle,
    LockTable,
    boot_id,
    identity_of,
    is_alive,
    locked_inodes,
    process_tree,
    signal_verified,
    tcp_sockets,
)
from portpool._portstatus import inspect_port, lock_holder
from portpool.errors import NotRunning, StopFailed
from portpool.layout import Layout, require_layout
from portpool.records import InstanceInfo, list_instances, read_instance
from portpool.statedir import StateDir

__all__ = ["Stopped", "stop_instances"]

_POLL_S = 0.05


@dataclass(frozen=True)
class Stopped:
    """An instance ``stop`` ended: its number, the process signalled, its ports."""

    number: int
    pid: int
    ports: tuple[int, ...] = ()
    # The holder's process tree and its listeners' inodes on those ports when it was
    # signalled: only these are waited for. A foreign [::1]:P server beside an instance
    # on 127.0.0.1, there before or started while stopping, made `stop` time out.
    tree: frozenset[int] = field(default=frozenset(), compare=False)
    own: frozenset[int] = field(default=frozenset(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``number``, ``pid`` and ``ports`` (a list of int). Raises nothing."""
        return {"number": self.number, "pid": self.pid, "ports": list(self.ports)}


def _lock_holder(directory: DirHandle, number: int) -> int | None:
    """The pid holding slot ``number``'s kernel lock (Linux), else None if unknown."""
    return lock_holder(directory, f"{number}.lock", None)


def _mismatch(number: int, holder: int | None, recorded: int) -> StopFailed:
    held = f"pid {holder} holds it" if holder is not None else "another process holds it"
    return StopFailed(
        number,
        f"its record does not match the process holding the slot ({held}, the record "
        f"names {recorded}): not signalling anything",
    )


def _unreadable(number: int, why: str, directory: DirHandle) -> StopFailed:
    """Why an instance whose record cannot be read is not signalled, naming the pid that
    holds its slot where the OS says: the user had no way to find the process."""
    holder = _lock_holder(directory, number)
    held = f"; pid {holder} holds its slot" if holder is not None else ""
    return StopFailed(number, f"its record is unreadable: {why}: not signalling anything{held}")


def _stop_target(
    layout: Layout, number: int | None, state: StateDir, given_as: str = "number"
) -> InstanceInfo:
    """``find_instance``, except that a running slot whose record is unreadable is a
    StopFailed naming the problem (it was reported as "starting" or "not running").
    A running slot beyond a lowered max_instances is reached, as by ``port``."""
    if number is not None:
        info = running_slot(layout, number, state=state, given_as=given_as)
        detail = unreadable_detail(info) if info is not None and info.alive else None
        if detail:
            raise _unreadable(number, detail, state.instances(layout.app))
    return find_instance(layout, number, state=state, pick="its number (portpool stop N)")


def _verified_holder(layout: Layout, number: int, state: StateDir) -> tuple[InstanceInfo, str]:
    """The record of running instance ``number`` and why its pid may be signalled."""
    directory = state.instances(layout.app)
    info = _stop_target(layout, number, state)
    assert info.pid is not None  # a readable record has one
    try:
        raw = read_json_file(directory, f"{number}.json")
    except ValueError as e:
        why = record_problem(f"record {e}", directory, f"{number}.json")
        raise _unreadable(number, why, directory) from None
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


def _resume_if_suspended(pid: int, is_expected: Callable[[], bool]) -> None:
    """SIGCONT after the SIGTERM to a holder that is stopped (SIGSTOP, a Ctrl-Z): it acts
    on no other signal, and ``stop`` waited for it until its timeout. As ``kill %1`` in
    a shell does; only to the verified holder. Raises nothing."""
    cont = getattr(signal, "SIGCONT", None)
    if cont is None:
        return
    import psutil

    try:
        suspended = psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return
    if suspended:
        signal_verified(pid, is_expected, cont)


def _own_now(ports: tuple[int, ...], holder: int) -> tuple[frozenset[int], frozenset[int]]:
    """The ``holder``'s process tree and the inodes of the listeners on ``ports`` that
    are its (the shield's rule: one whose owner the OS does not name is not ours)."""
    tree = process_tree(holder)
    found = with_owners(s for port in ports for s in tcp_sockets(port, listening_only=True))
    own = (o.socket.inode for o in found if o.pids and all(p in tree for p in o.pids))
    return tree, frozenset(i for i in own if i)


def _ours_listening(port: int, stopped: Stopped) -> bool:
    """Whether a listener on ``port`` is one the holder's tree had, or is owned by a
    process of that tree (a service still shutting down)."""
    rest = []
    for s in tcp_sockets(port, listening_only=True):
        if s.inode and s.inode in stopped.own:
            return True
        rest.append(s)
    return any(p in stopped.tree for o in with_owners(rest) for p in o.pids)


def _still_up(stopped: Stopped, timeout_s: float) -> str:
    """Why ``stopped`` is not down after ``timeout_s``: its holder still runs, or, gone
    (a kill -9 meanwhile), what it started still listens. That named the dead pid and
    said "try again", which could not help."""
    now = identity_of(stopped.pid)
    if now is not None and is_alive(now):  # a zombie (killed, not reaped yet) is gone
        return (
            f"pid {stopped.pid} got SIGTERM but still holds the instance or its ports "
            f"after {timeout_s:g} s (try again, or a longer --timeout)"
        )
    held = []
    for port in stopped.ports:
        for o in with_owners(tcp_sockets(port, listening_only=True)):
            pids = sorted(p for p in o.pids if p in stopped.tree or o.socket.inode in stopped.own)
            if pids:
                held.append(f"port {port} by pid {', '.join(map(str, pids))}")
    what = "; ".join(dict.fromkeys(held)) or "its ports"
    return (
        f"pid {stopped.pid} got SIGTERM and is gone, but what it started still holds "
        f"{what} after {timeout_s:g} s (portpool signals only the recorded process)"
    )


def _is_down(state: StateDir, app: str, stopped: Stopped) -> bool:
    locked = locked_inodes()
    directory = state.instances(app)
    slot = f"{stopped.number}.lock"
    if is_held(directory, slot, locked) and not _taken_over(directory, slot, locked, stopped):
        return False
    for port in stopped.ports:
        seen = inspect_port(state, port, locked)
        if seen.is_free:
            if _ours_listening(port, stopped):
                return False  # something it started still listens: not free yet
        elif seen.record is None or seen.record.pid == stopped.pid:
            return False
        # else: a new holder (another instance) took it already: it is not ours to wait for
    return True


def _taken_over(
    directory: DirHandle, slot: str, locked: LockTable | None, stopped: Stopped
) -> bool:
    """Whether the held slot is another process's than the one ``stop`` signalled: a
    start took it (a restart loop, a pinned ``--instance N``) once ours let go, and
    ``stop`` waited for it to its timeout, then named the signalled pid, long gone."""
    holder = lock_holder(directory, slot, locked)
    if holder is not None:
        return holder != stopped.pid
    return identity_of(stopped.pid) is None  # where the OS does not name a lock's holder


def _signal_holder(layout: Layout, n: int, state: StateDir, directory: DirHandle) -> Stopped:
    """SIGTERM to the verified holder of running instance ``n`` (SIGCONT after it if it
    is suspended): what to wait for. Raises StopFailed (identity mismatch, unreadable
    record), NotRunning."""
    info, token = _verified_holder(layout, n, state)
    assert info.pid is not None
    ports = tuple(s.port for s in info.services if s.port is not None)
    tree, own = _own_now(ports, info.pid)
    if not signal_verified(info.pid, _is_recorded(info.pid, token, directory, n), signal.SIGTERM):
        if not read_instance(directory, n).alive:
            return Stopped(n, info.pid, ports, tree, own)  # it stopped on its own
        holder = _lock_holder(directory, n)
        if holder is not None and holder != info.pid:
            raise _mismatch(n, holder, info.pid)
        raise StopFailed(n, f"pid {info.pid} is no longer the recorded process: not signalling it")
    _resume_if_suspended(info.pid, _is_recorded(info.pid, token, directory, n))
    return Stopped(n, info.pid, ports, tree, own)


def stop_instances(
    layout: Layout,
    number: int | None = None,
    *,
    every: bool = False,
    timeout_s: float = 30.0,
    state: StateDir,
    given_as: str = "number",
    on_stopped: Callable[[Stopped], None] | None = None,
) -> list[Stopped]:
    """Ask instance ``number`` (default: as ``find_instance``), or ``every`` running one,
    to stop with SIGTERM to its ``up``/``run``, and wait until its slot and ports are free.

    The signal goes only to the process that holds the slot's kernel lock and whose
    identity matches the record (pid + start token + boot id), and SIGCONT after it
    when that process is stopped (SIGSTOP), so that it can act on the SIGTERM. Raises
    NotRunning (none to stop), StopFailed (identity mismatch, an unreadable record, or
    still up after ``timeout_s`` seconds; nothing is ever killed). With ``every``, a
    running slot whose record is unreadable, or does not match its holder, is left
    alone and reported once the others have stopped.
    UsageError (exit 2, naming ``number`` as ``given_as``, e.g. the CLI's NUMBER) for a
    ``number`` outside 1..max_instances that does not run. ``on_stopped`` is called
    with each instance once it is down, before any of those errors is raised: with
    ``every``, the instances stopped beside a refused one are known to the caller.
    TypeError for a ``layout`` that is no Layout.
    """
    require_layout(layout)
    refused: list[StopFailed] = []
    if every:
        alive = [i for i in list_instances(layout.app, state) if i.alive or lost_its_lock(i)]
        numbers = [i.number for i in alive if i.readable and not lost_its_lock(i)]
        for i in alive:
            detail = unreadable_detail(i)
            if detail:
                refused.append(_unreadable(i.number, detail, state.instances(layout.app)))
            elif not i.readable or lost_its_lock(i):
                # Its record deleted under it (or not written yet), or its lock file: it
                # was left out, and alone, "no instance is running" while status listed it.
                said = f"it {unusable_words(i)}: not signalling anything"
                refused.append(StopFailed(i.number, said))
        if not numbers and not refused:
            raise NotRunning(layout.app, f"no instance of {layout.app} is running")
    else:
        numbers = [_stop_target(layout, number, state, given_as).number]
    directory = state.instances(layout.app) if numbers else None
    sent: list[Stopped] = []
    for n in numbers:
        assert directory is not None
        try:
            sent.append(_signal_holder(layout, n, state, directory))
        except StopFailed as e:
            if not every:
                raise
            # One record that does not match its holder left every other instance
            # running: as for an unreadable one, stop the others, report it after.
            refused.append(e)
        except NotRunning:
            if not every:
                raise  # (with --all: it stopped on its own since it was listed)
    deadline = time.monotonic() + timeout_s
    late: list[StopFailed] = []
    for stopped in sent:
        while not _is_down(state, layout.app, stopped):
            if time.monotonic() > deadline:
                # Each other one is still looked at (and reported, once down): one slow
                # instance 1 hid that --all had stopped instance 2.
                late.append(StopFailed(stopped.number, _still_up(stopped, timeout_s)))
                break
            time.sleep(_POLL_S)
        else:
            if on_stopped is not None:
                on_stopped(stopped)
    if late or refused:
        raise StopFailed.of(late + refused)  # the others were stopped; refused ones not touched
    return sent
