"""portpool: exclusive, predictable ports for every instance of a multi-service app."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from portpool.errors import (
    AlreadyHeldHere,
    LayoutError,
    LockError,
    LockHeld,
    NoFreeSlot,
    PassedSocketError,
    PoolExhausted,
    PortPoolError,
    Refusal,
    ServiceExited,
    ShieldTripped,
    SlotHolder,
    StartError,
    StateDirError,
)
from portpool.lock import PortLock, PortRecord, PortStatus, inspect_port
from portpool.pool import Lease, acquire, bind_listen
from portpool.statedir import StateDir

try:
    __version__ = version("portpool")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AlreadyHeldHere",
    "LayoutError",
    "Lease",
    "LockError",
    "LockHeld",
    "NoFreeSlot",
    "PassedSocketError",
    "PoolExhausted",
    "PortLock",
    "PortPoolError",
    "PortRecord",
    "PortStatus",
    "Refusal",
    "ServiceExited",
    "ShieldTripped",
    "SlotHolder",
    "StartError",
    "StateDir",
    "StateDirError",
    "__version__",
    "acquire",
    "bind_listen",
    "inspect_port",
]
