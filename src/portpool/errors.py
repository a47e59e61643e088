"""The one exception tree of portpool.

    PortPoolError
    ├── StateDirError          the state dir is unsafe or unusable (path, problem)
    ├── LayoutError            a layout file or value is invalid (file, key, problem)
    ├── LockError              a lock could not be taken or kept
    │   ├── LockHeld           someone else holds it (port or path, holder)
    │   └── AlreadyHeldHere    this process already holds it (a second acquire is a bug)
    ├── StartError             nothing was started (exit code 3)
    │   ├── PoolExhausted      every port of a pool was refused (refusals, per port)
    │   └── NoFreeSlot         every instance slot is taken (holders, per slot)
    ├── ShieldTripped          a lease or the slot stopped being ours (exit code 4)
    ├── ServiceExited          a supervised service exited on its own (exit code 5)
    ├── CommandNotFound        the command given to ``run`` cannot be executed (exit 127)
    ├── Interrupted            a signal stopped ``run``/``up`` while starting (128+N)
    └── PassedSocketError      LISTEN_FDS was absent, for another process, or malformed

Every error carries its context as attributes, so callers never parse messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PortPoolError(Exception):
    """Base of every error portpool raises on purpose."""

    exit_code: int = 1


class StateDirError(PortPoolError):
    """The state dir (or a file in it) is unsafe or unusable."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"state dir {path}: {problem}")


class LayoutError(PortPoolError):
    """A layout is invalid. ``errors`` lists every problem found, not only the first."""

    def __init__(self, file: str, key: str, problem: str, errors: Sequence[str] = ()) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        self.errors = list(errors) or [f"{file}: {key}: {problem}"]
        super().__init__("\n".join(self.errors))


class LockError(PortPoolError):
    """A lock could not be taken or kept."""


class LockHeld(LockError):
    """The lock at ``path`` is held by another lock holder (``holder`` as far as known)."""

    def __init__(self, path: str, holder: object | None = None) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path} is held by {holder or 'another process'}")


class AlreadyHeldHere(LockError):
    """This process already holds the lock: acquiring it twice is a bug in the caller."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"{path} is already held by this process; release it first")


@dataclass(frozen=True)
class Refusal:
    """Why one port of a pool was not acquired."""

    port: int
    reason: str  # "held", "in use", "permission denied", "unavailable", "error"
    detail: str  # for people: who holds it, or what the OS said

    def __str__(self) -> str:
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
        lines = "\n".join(f"  {r}" for r in self.refusals)
        super().__init__(f"{who}no free port in pool {self.pool}\n{lines}")


@dataclass(frozen=True)
class SlotHolder:
    """Who holds one instance slot, as far as its record says."""

    number: int
    pid: int | None
    detail: str

    def __str__(self) -> str:
        return f"instance {self.number}: {self.detail}"


class NoFreeSlot(StartError):
    """Every instance slot 1..max of ``app`` is held."""

    def __init__(self, app: str, holders: Sequence[SlotHolder]) -> None:
        self.app = app
        self.holders = list(holders)
        lines = "\n".join(f"  {h}" for h in self.holders)
        super().__init__(
            f"no free instance slot for app {app!r} (all {len(self.holders)} are held)\n{lines}"
        )


class ShieldTripped(PortPoolError):
    """A lease or the instance slot stopped being ours."""

    exit_code = 4

    def __init__(self, reason: str, port: int | None = None) -> None:
        self.reason = reason
        self.port = port
        super().__init__(f"shield tripped: {reason}")


class ServiceExited(PortPoolError):
    """A supervised service exited on its own."""

    exit_code = 5

    def __init__(self, service: str, returncode: int) -> None:
        self.service = service
        self.returncode = returncode
        super().__init__(f"service {service!r} exited on its own with status {returncode}")


class CommandNotFound(PortPoolError):
    """The command to run cannot be executed; nothing was started (127, as a shell)."""

    exit_code = 127

    def __init__(self, command: str, problem: str) -> None:
        self.command = command
        self.problem = problem
        super().__init__(f"cannot start the command: {problem}")


class PassedSocketError(PortPoolError):
    """Sockets passed by the socket-activation protocol are missing or not for us."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class Interrupted(PortPoolError):
    """A signal stopped ``run`` or ``up`` before its command started: everything was
    released and nothing is left running. The CLI then dies of ``signum`` itself, as an
    interrupted command would (exit 128+N where it cannot)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum} before the command started")
