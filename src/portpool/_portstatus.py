"""Who holds a port in a state dir, seen from outside: ``inspect_port`` and ``PortStatus``.

Read-only: never disturbs a holder, and never answers "free" while the port's kernel lock
is held (an unreadable record is "held-unreadable").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from portpool._heldlock import is_held
from portpool._platform import LockTable, locked_inodes
from portpool._record import PortRecord, read_port_record
from portpool.statedir import StateDir

PortState = Literal["free", "held", "held-unreadable"]


@dataclass(frozen=True)
class PortStatus:
    """What the state dir says about one port."""

    port: int
    state: PortState
    record: PortRecord | None = None
    problem: str | None = None  # why the record is unreadable

    @property
    def is_free(self) -> bool:
        return self.state == "free"

    def describe(self) -> str:
        if self.state == "free":
            return "free"
        if self.record is not None:
            return f"held by {self.record.describe()}"
        return f"held, metadata unreadable ({self.problem or 'not written yet'})"


def inspect_port(state: StateDir, port: int, locked: LockTable | None = None) -> PortStatus:
    """Who holds ``port`` in this state dir. Never "free" while its lock is held.

    ``locked`` is a ``locked_inodes()`` snapshot, to share one kernel read among many ports.
    """
    directory = state.find("ports")  # read-only: a state dir never used has no ports
    if directory is None:
        return PortStatus(port, "free")
    if locked is None:
        locked = locked_inodes()
    if not is_held(directory, f"{port}.lock", locked):
        return PortStatus(port, "free")
    try:
        record = read_port_record(directory, port)
    except ValueError as e:
        return PortStatus(port, "held-unreadable", None, str(e))
    if record is None or record.port != port:
        problem = None if record is None else f"record names port {record.port}"
        return PortStatus(port, "held-unreadable", None, problem)
    return PortStatus(port, "held", record)
