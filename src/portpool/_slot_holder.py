"""Who holds an instance slot: the process its record names, confirmed by the OS, or
another one, when the record does not match the slot lock's holder.

``portpool.records`` asks this of every held slot it reads, and ``portpool._gc`` before
it removes a record; the lock is the kernel's word, the record only names a process.
"""

from __future__ import annotations

from collections.abc import Callable

from portpool._platform import (
    DirHandle,
    LockTable,
    ProcessIdentity,
    identity_of,
    is_alive,
)
from portpool._portstatus import is_recorded_process, lock_holder

__all__ = ["record_mismatch", "running_holder"]


def running_holder(raw: object) -> int | None:
    """The pid a record (``raw``, as decoded) names when that very process runs (pid,
    start token and boot id match), else None: only then is it asked whether it holds
    the lock (a reused pid could be any process, with any number of open files). Raises
    nothing."""
    if not isinstance(raw, dict):
        return None
    pid, token, boot = raw.get("pid"), raw.get("start_token"), raw.get("boot_id")
    if type(pid) is not int or not 0 <= pid < 2**31:
        return None
    if not isinstance(token, str) or not isinstance(boot, str):
        return None
    return pid if is_alive(ProcessIdentity(pid, token, boot)) else None


def record_mismatch(
    directory: DirHandle,
    number: int,
    raw: object,
    locked: LockTable | Callable[[], LockTable | None] | None,
) -> str | None:
    """What is wrong with slot ``number``'s record ``raw`` (a valid one) when the slot is
    held but the process the record names does not run here or does not say it holds
    the lock, or None when the lock's holder cannot be told (no lock table, or the pid
    it names does not hold that file: ``lock_holder``, as a port's diagnosis asks) or
    is that process, seen from another pid namespace (same start token and boot id: a
    container sharing the state dir). The lock table is read only on this rare path.
    ``locked``: a ``locked_inodes()`` snapshot, a function giving one, or None. Raises
    nothing."""
    assert isinstance(raw, dict)  # parsed already
    holder = lock_holder(directory, f"{number}.lock", locked() if callable(locked) else locked)
    if holder is None:
        return None
    recorded = raw.get("pid")
    if is_recorded_process(holder, recorded, raw.get("start_token"), raw.get("boot_id")):
        return None
    if holder == recorded:  # as a port record's: "a reused pid" read as another process
        names = f"the record names pid {recorded} with another start time (an earlier process"
        names += " of that pid, or a record edited by hand)"
    elif running_holder(raw) is not None:  # its start token copied in by hand
        names = f"the record names pid {recorded}, a running process that does not hold it"
    elif type(recorded) is int and identity_of(recorded) is not None:  # 1, a shell, ...
        names = f"the record names pid {recorded}, another process, with another start time"
    else:
        names = f"the record names pid {recorded}, which is not running"
    return f"record does not match the process holding the slot (pid {holder} holds it, {names})"
