"""Process identity and liveness: pid + start token + boot id, never a bare pid.

psutil reads the start time the same way on every OS (``/proc/<pid>/stat`` on Linux,
``sysctl`` on macOS, ``GetProcessTimes`` on Windows) and checks liveness without sending
a signal. It is imported on first use so ``import portpool`` stays light; on Linux the
start token is read from ``/proc`` with psutil's own formula, so ``run`` and ``up`` do
not import psutil at all.
"""

from __future__ import annotations

import functools
import os
import sys

from portpool._dataclass import dataclass


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as it can be recognised later: a reused pid has another start token."""

    pid: int
    start_token: str
    boot_id: str

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "start_token": self.start_token, "boot_id": self.boot_id}


@functools.cache
def boot_id() -> str:
    """An identifier of the current boot: a record from an earlier boot names nobody alive."""
    if sys.platform == "linux":
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                return f.read().strip()
        except OSError:
            pass
    import psutil

    return f"boot-{psutil.boot_time():.0f}"


@functools.cache
def _linux_boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


_PF_EXITING = 0x4  # in /proc/<pid>/stat's flags (field 9), set as do_exit() begins


def _linux_start_token(pid: int, *, running: bool = False) -> str | None:
    """psutil's ``create_time()`` computed as psutil computes it on Linux (start ticks /
    clock ticks + boot time), so tokens match records written through psutil.
    ``running``: None for a zombie too (exited, not reaped yet), and for a process that
    is exiting (PF_EXITING): the kernel drops its locks before it is a zombie, and gc
    racing a ``kill -9`` said "its holder still runs but does not hold" the lock.

    Read here because importing psutil costs ~15 ms, a tenth of ``portpool run``.
    """
    if sys.platform == "win32":  # never called there; tells type checkers os.sysconf exists
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # The name (field 2) may hold spaces and parentheses: count from the last ')'.
        fields = data[data.rindex(b")") + 2 :].split()
        if running and (fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING):
            return None
        return f"{float(fields[19]) / os.sysconf('SC_CLK_TCK') + _linux_boot_time():.3f}"
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def _proc_mounted() -> bool:
    # Without /proc every process would look dead: psutil then says what it can.
    return sys.platform == "linux" and os.path.exists("/proc/self/stat")


def _start_token(pid: int, *, running: bool = False) -> str | None:
    if _proc_mounted():
        return _linux_start_token(pid, running=running)
    import psutil

    try:
        process = psutil.Process(pid)
        if running and process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{process.create_time():.3f}"
    except (psutil.Error, OSError, ValueError):
        return None


_own: ProcessIdentity | None = None


def _forget_own() -> None:
    global _own
    _own = None


if hasattr(os, "register_at_fork"):
    # A forked child is another process: it must not present its parent's identity.
    os.register_at_fork(after_in_child=_forget_own)


def current_identity() -> ProcessIdentity:
    """This process's identity (computed once per process; forgotten in a forked child)."""
    global _own
    if _own is None:
        token = _start_token(os.getpid()) or "unknown"
        _own = ProcessIdentity(os.getpid(), token, boot_id())
    return _own


def identity_of(pid: int) -> ProcessIdentity | None:
    """The identity of a running process, or None if no process has that pid."""
    if pid <= 0:
        return None
    token = _start_token(pid)
    if token is None:
        return None
    return ProcessIdentity(pid, token, boot_id())


def namespace_pids(pid: int) -> tuple[int, ...] | None:
    """The pids of process ``pid`` in each pid namespace it is in, outermost first (Linux
    ``NSpid``: ``(4242, 1)`` for a container's first process), or None where the OS
    does not tell or there is no such process. A record written in a container names
    the inner pid."""
    if not _proc_mounted():
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return tuple(int(p) for p in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


def is_alive(identity: ProcessIdentity) -> bool:
    """True if the very process ``identity`` names still runs (a reused pid does not count).

    A zombie does not run: killed, a holder stays one until its parent reaps it, its locks
    already free, and gc called it "a live holder that lost its lock" (exit 1)."""
    if identity.boot_id != boot_id() or identity.pid <= 0:
        return False
    return _start_token(identity.pid, running=True) == identity.start_token


def process_name(pid: int) -> str | None:
    """The process's name as the OS reports it, or None where it will not say."""
    import psutil

    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None


def descends_from(pid: int, ancestors: set[int]) -> bool:
    """Whether process ``pid`` is a descendant of one of the pids in ``ancestors``.

    False when ``pid`` is gone or cannot be read (psutil walks the parent chain).
    """
    import psutil

    try:
        return any(parent.pid in ancestors for parent in psutil.Process(pid).parents())
    except (psutil.Error, OSError):
        return False


def ancestors(pid: int) -> list[int]:
    """The pids of ``pid``'s parent, its parent's parent, ... up to the first process;
    [] when ``pid`` is gone or cannot be read (psutil walks the parent chain)."""
    import psutil

    try:
        return [parent.pid for parent in psutil.Process(pid).parents()]
    except (psutil.Error, OSError):
        return []


def environment_of(pid: int) -> dict[str, str] | None:
    """The environment of process ``pid``, None when it is gone or the OS will not say
    (another user's process)."""
    import psutil

    try:
        return dict(psutil.Process(pid).environ())
    except (psutil.Error, OSError):
        return None


def process_tree(pid: int) -> frozenset[int]:
    """``pid`` and every process descending from it now; just ``pid`` when it is gone
    or cannot be read (psutil walks the children)."""
    import psutil

    try:
        return frozenset({pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))})
    except (psutil.Error, OSError):
        return frozenset({pid})


def ours_since(pids: list[int], since_s: float) -> bool:
    """Whether every process in ``pids`` runs as this process's user and started at or
    after ``since_s`` (seconds since the epoch, with 1 s of slack: start times are read
    in clock ticks since boot). False when one is gone or cannot be read."""
    import psutil

    try:
        me = psutil.Process().username()
        procs = [psutil.Process(p) for p in pids]
        return all(p.username() == me and p.create_time() >= since_s - 1 for p in procs)
    except (psutil.Error, OSError):
        return False
