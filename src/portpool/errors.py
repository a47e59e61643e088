"""The one exception tree of portpool.

    PortPoolError
    ├── StateDirError          the state dir is unsafe or unusable (path, problem)
    ├── LayoutError            a layout file or value is invalid (file, key, problem)
    ├── LockError              a lock could not be taken or kept
    │   ├── LockHeld           someone else holds it (port or path, holder)
    │   └── AlreadyHeldHere    this process already holds it (a second acquire is a bug)
    ├── ResourceLimit          out of file descriptors or another OS limit (limit, needed)
    ├── StartError             nothing was started (exit code 3)
    │   ├── PoolExhausted      every port of a pool was refused (refusals, per port)
    │   ├── NoFreeSlot         every instance slot is taken (holders, per slot)
    │   └── SlotUnavailable    the pinned instance number cannot be had
    ├── ShieldTripped          a lease or the slot stopped being ours (exit code 4)
    ├── ServiceExited          a supervised service exited on its own (exit code 5)
    ├── CommandNotFound        the command given to ``run`` cannot be executed (127 / 126)
    ├── Interrupted            a signal stopped ``run``/``up`` while starting (128+N)
    ├── PassedSocketError      LISTEN_FDS was absent, for another process, or malformed
    ├── UsageError             wrong use of a command (exit code 2)
    │   ├── InvalidArgument    a value a library call does not take (also a ValueError)
    │   ├── InvalidPort        a value given as a port is not one (also a ValueError)
    │   ├── LayoutFileError    the layout file cannot be used at all (also a LayoutError)
    │   └── UnknownService     no such service in the layout (also a LayoutError)
    ├── NotRunning             the instance asked for does not run
    ├── StopFailed             stop refused to signal, or the instance did not stop
    └── DetachFailed           a detached up exited before it was up (its exit status)

Every error carries its context as attributes, so callers never parse messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypeAlias

from portpool._dataclass import dataclass
from portpool._text import printable

# Every reason a Refusal gives; status --json and the dashboard show these strings.
# "free now": the pytest plugin found the port freed while it looked for one.
RefusalReason: TypeAlias = Literal[
    "held", "in use", "permission denied", "unavailable", "error", "free now"
]


class LockHolder(Protocol):
    """Who holds a lock, as ``LockHeld`` reports it: a port's lock gives its
    ``PortStatus`` (from ``inspect_port``; its ``record`` names the holder)."""

    @property
    def is_free(self) -> bool: ...

    # Why the lock's path is not a lock file portpool made, though its file is locked
    # (through another name); None if it is one.
    @property
    def unusable(self) -> str | None: ...

    def describe(self) -> str: ...


class PortPoolError(Exception):
    """Base of every error portpool raises on purpose. Each one pickles and copies as
    it is (its message, its attributes), whatever its ``__init__`` takes."""

    exit_code: int = 1

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its args and attributes, never by calling __init__ with the
        # message: a PoolExhausted raised in a multiprocessing worker broke the pool
        # (BrokenProcessPool), and an InvalidPort came back with its message doubled.
        return (_rebuilt, (type(self), self.args), self.__dict__)


def _rebuilt(cls: type[PortPoolError], args: tuple[object, ...]) -> PortPoolError:
    """An instance of ``cls`` with ``args``, its ``__init__`` not run (pickle then sets
    its attributes). Raises nothing."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class StateDirError(PortPoolError):
    """The state dir (or a file in it) is unsafe or unusable."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"state dir {printable(path)}: {problem}")  # one line, whatever the path


class LayoutError(PortPoolError):
    """A layout is invalid. ``errors`` lists every problem found, not only the first."""

    def __init__(self, file: str, key: str, problem: str, errors: Sequence[str] = ()) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        # A newline in a path or key split the message: each line is escaped on its own.
        self.errors = list(errors) or [f"{printable(file)}: {printable(key)}: {problem}"]
        super().__init__("\n".join(self.errors))


class ResourceLimit(PortPoolError):
    """An OS resource limit stopped the command: ``limit`` (e.g. "open files"), its
    current value, and how many of it the command needs where known."""

    def __init__(self, limit: str, current: int | None, needed: int | None, advice: str) -> None:
        self.limit = limit
        self.current = current
        self.needed = needed
        self.advice = advice
        now = f" (the limit is {current})" if current is not None else ""
        need = f"; this layout needs about {needed}" if needed is not None else ""
        super().__init__(f"out of {limit}{now}{need}: {advice}")

    def for_need(self, needed: int) -> ResourceLimit:
        """A new error like this one, saying ``needed`` (a count) and, for open files, a
        limit that would do. Returns it; raises nothing."""
        advice = self.advice
        if self.limit == "open files":
            advice = (
                f"raise the limit (e.g. ulimit -n {max(1024, 2 * needed)}) or start fewer services"
            )
        return ResourceLimit(self.limit, self.current, needed, advice)


class LockError(PortPoolError):
    """A lock could not be taken or kept."""


class LockHeld(LockError):
    """The lock at ``path`` is held by another lock holder: ``holder`` is what was seen
    of it (a port lock's ``PortStatus``), None where nobody looked."""

    def __init__(self, path: str, holder: LockHolder | None = None) -> None:
        self.path = path
        self.holder = holder
        # A holder gone by the time we looked says "free": the lock was still held.
        seen = "held by another process"
        if holder is not None and not holder.is_free:
            seen = holder.describe()
        super().__init__(f"{path} is {seen}")


class AlreadyHeldHere(LockError):
    """This process already holds the lock: acquiring it twice is a bug in the caller."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"{path} is already held by this process; release it first")


@dataclass(frozen=True)
class Refusal:
    """Why one port of a pool was not acquired."""

    port: int
    reason: RefusalReason  # "held", "in use", "permission denied", "unavailable", ...
    detail: str  # for people: who holds it, or what the OS said

    def __str__(self) -> str:
        # No "held (held by pid ...)" nor "held (held, metadata unreadable ...)".
        if self.detail.startswith(tuple(f"{self.reason}{c}" for c in " ,;")):
            return f"port {self.port}: {self.detail}"
        return f"port {self.port}: {self.reason} ({self.detail})"


class StartError(PortPoolError):
    """Nothing was started: no slot, or a pool with no port left."""

    exit_code = 3


class PoolExhausted(StartError):
    """Every port of ``pool`` was refused; ``refusals`` says why, per port, in pool order."""

    def __init__(
        self, pool: Sequence[int], refusals: Sequence[Refusal], service: str | None = None
    ) -> None:
        self.pool = list(pool)
        self.refusals = list(refusals)
        self.service = service
        who = f"service {service!r}: " if service else ""
        lines = "".join(f"\n  {r}" for r in self.refusals)  # none: no trailing newline
        super().__init__(f"{who}no free port in pool {self.pool}{lines}")


@dataclass(frozen=True)
class SlotHolder:
    """Who holds one instance slot, as far as its record says."""

    number: int
    pid: int | None
    detail: str

    def __str__(self) -> str:
        return f"instance {self.number}: {self.detail}"


class NoFreeSlot(StartError):
    """Every instance slot 1..max of ``app`` is held; ``limit`` says, in words, where
    the maximum comes from (the layout's ``max_instances``, or what keeps its pools
    disjoint), as a user of one slot otherwise asks why there is only one."""

    def __init__(self, app: str, holders: Sequence[SlotHolder], limit: str = "") -> None:
        self.app = app
        self.holders = list(holders)
        self.limit = limit
        unusable = any(h.detail.startswith("slot unusable") for h in self.holders)
        held = "held or unusable" if unusable else "held"
        one = len(self.holders) == 1
        held = f"its only slot is {held}" if one else f"all {len(self.holders)} are {held}"
        why = f"; {limit}" if limit else ""
        lines = "\n".join(f"  {h}" for h in self.holders)
        super().__init__(f"no free instance slot for app {app!r} ({held}{why})\n{lines}")


class ShieldTripped(PortPoolError):
    """A lease or the instance slot stopped being ours: ``reason`` in words, ``port``
    the lease's port (None: the slot), ``lingering`` what still held a port after
    ``run``/``up`` stopped everything they started."""

    exit_code = 4

    def __init__(
        self, reason: str, port: int | None = None, *, lingering: Sequence[str] = ()
    ) -> None:
        self.reason = reason
        self.port = port
        self.lingering = list(lingering)
        super().__init__(f"shield tripped: {reason}")


class ServiceExited(PortPoolError):
    """A service of ``up`` ended the instance: it exited on its own and its restart
    policy said no, gave up restarting, could not start, or was not ready in time.
    Raised once everything was stopped and released.

    ``service`` is its name; ``returncode`` its last ``Popen`` return code (negative:
    killed by that signal; None when it never exited: not ready in time, could not
    start) and ``status`` the same as a shell's exit status (128+N for signal N);
    ``reason`` is "exited", "early" (exited before it was ready), "gave-up",
    "not-ready" or "cannot-start"; ``lingering`` the ports something still held after
    the stop ("port P is still held by pid X (name)").
    """

    exit_code = 5

    def __init__(
        self,
        service: str,
        returncode: int | None,
        message: str | None = None,
        *,
        reason: str = "exited",
        lingering: Sequence[str] = (),
    ) -> None:
        self.service = service
        self.returncode = returncode
        self.status: int | None = None
        if returncode is not None:
            self.status = 128 - returncode if returncode < 0 else returncode
        self.reason = reason
        self.lingering = list(lingering)
        default = f"service {service!r} exited on its own with status {returncode}"
        super().__init__(message or default)


class CommandNotFound(PortPoolError):
    """The command to run cannot be executed; nothing was started. ``exit_code`` is a
    shell's: 127 when the program (or its ``#!`` interpreter) does not exist, 126 when
    it exists but cannot be executed (``found=True``: no execute permission, a
    directory, not a program, arguments too long), as POSIX shells and ``env`` say."""

    exit_code = 127

    def __init__(self, command: str, problem: str, *, found: bool = False) -> None:
        self.command = command
        self.problem = problem
        self.found = found
        if found:
            self.exit_code = 126
        super().__init__(f"cannot start the command: {problem}")


class PassedSocketError(PortPoolError):
    """Sockets passed by the socket-activation protocol are missing or not for us."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class UsageError(PortPoolError):
    """The command was used wrongly: an unknown service, a missing layout file, a number
    outside 1..max (exit code 2, like click's own usage errors)."""

    exit_code = 2


class InvalidArgument(UsageError, ValueError):
    """A value passed to a library call is not one it takes: ``name`` the argument,
    ``value`` what was given, ``problem`` why (a host that does not resolve, a grace
    below 0 s). A caller's bug, as InvalidPort: an unresolvable host read as "no free
    port in pool" (PoolExhausted, exit code 3). Also a ValueError."""

    def __init__(self, name: str, value: object, problem: str) -> None:
        self.name = name
        self.value = value
        self.problem = problem
        super().__init__(f"{name}={value!r}: {problem}")


class InvalidPort(UsageError, ValueError):
    """A value passed as a port (to ``acquire``) is not a port number in 1..65535.

    A caller's bug, not a layout's: it once read "pool: port: ..." as if a layout file
    were at fault. Also a ValueError, as Python's own functions raise for a bad value.
    """

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(f"{value!r} is not a port number in 1..65535")


class LayoutFileError(UsageError, LayoutError):
    """The layout file is missing, not a regular file, too large or unreadable.

    Exit code 2 (usage): the command was pointed at something that is not a layout.
    """

    exit_code = 2

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(file, "file", problem, errors=[f"{printable(file)}: {problem}"])


class UnknownService(UsageError, LayoutError):
    """A service name the layout does not have."""


class NotRunning(PortPoolError):
    """The instance asked for is not running (or none is, or several are and none was
    named). ``running`` lists the numbers of the running instances."""

    def __init__(self, app: str, message: str, running: Sequence[int] = ()) -> None:
        self.app = app
        self.running = list(running)
        super().__init__(message)


class SlotUnavailable(StartError):
    """The pinned instance number (``--instance N``) cannot be had; nothing was started."""

    def __init__(self, app: str, number: int, reason: str) -> None:
        self.app = app
        self.number = number
        self.reason = reason
        super().__init__(f"instance {number} of {app!r} cannot be had: {reason}")


class StopFailed(PortPoolError):
    """``stop`` refused to signal, or the instance did not stop in time."""

    def __init__(self, number: int, reason: str) -> None:
        self.number = number
        self.reason = reason
        self.failures: tuple[StopFailed, ...] = (self,)  # each instance's, with --all
        super().__init__(f"instance {number}: {reason}")

    @classmethod
    def of(cls, failures: Sequence[StopFailed]) -> StopFailed:
        """One error for ``failures`` (non-empty, one per instance): the first's number
        and reason, a message naming each on its own line, and all of them as
        ``failures``. Raises nothing. (``stop --all`` named only the first.)"""
        first = failures[0]
        combined = cls(first.number, first.reason)
        combined.failures = tuple(failures)
        combined.args = ("\n".join(str(f) for f in failures),)
        return combined


class DetachFailed(PortPoolError):
    """A detached ``up`` exited before its instance was up, or stopped right after it
    said so; exits with its status (128+N when killed by signal N, 1 if unknown)."""

    def __init__(
        self,
        returncode: int | None,
        log_path: str,
        tail: str,
        outcome: str | None = None,
        when: str = "before it was up",
    ) -> None:
        # returncode as subprocess gives it (-N: killed by signal N; None: not yet
        # exited); outcome: "exited with status 3", "was killed by SIGKILL", ...
        self.returncode = returncode
        self.log_path = log_path
        self.tail = tail
        if returncode is None:
            self.exit_code = 1
        elif returncode < 0:
            self.exit_code = 128 - returncode  # a shell's status for death by signal N
        else:
            self.exit_code = returncode if 0 < returncode < 256 else 1
        outcome = outcome or f"exited with status {returncode}"
        if not tail.strip():
            # Its error went nowhere: a full disk took the log's writes too, and the
            # caller read only that it exited.
            tail = "(its log is empty" + (
                ": it could not write even its error there, as on a full disk; "
                "`portpool up` in the foreground shows it)"
                if returncode is not None and returncode > 0
                else ")"
            )
        super().__init__(f"the detached up {outcome} {when} (log: {log_path})\n{tail}")


class Interrupted(PortPoolError):
    """A signal stopped ``run`` or ``up`` before its command started: everything was
    released and nothing is left running. The CLI then dies of ``signum`` itself, as an
    interrupted command would (exit 128+N where it cannot)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum} before the command started")
