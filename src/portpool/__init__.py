"""portpool: exclusive, predictable ports for every instance of a multi-service app."""

from __future__ import annotations

from portpool.errors import (
    AlreadyHeldHere,
    CommandNotFound,
    DetachFailed,
    InvalidPort,
    LayoutError,
    LayoutFileError,
    LockError,
    LockHeld,
    NoFreeSlot,
    NotRunning,
    PassedSocketError,
    PoolExhausted,
    PortPoolError,
    Refusal,
    ResourceLimit,
    ServiceExited,
    ShieldTripped,
    SlotHolder,
    SlotUnavailable,
    StartError,
    StateDirError,
    StopFailed,
    UnknownService,
    UsageError,
)
from portpool.instance import (
    Instance,
    current_instance,
    get_service_port_pool,
    init_instance_manager,
    start_instance,
)
from portpool.layout import Layout, Service, default_layout, load_layout, resolve_layout
from portpool.lock import PortLock, PortRecord, PortStatus, inspect_port
from portpool.pool import Lease, acquire, bind_listen
from portpool.records import list_instances
from portpool.statedir import StateDir


def __getattr__(name: str) -> str:
    # importlib.metadata costs tens of ms to import: pay it only when asked.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("portpool")
        except PackageNotFoundError:  # running from a source tree
            return "0.0.0"
    raise AttributeError(f"module 'portpool' has no attribute {name!r}")


__all__ = [
    "AlreadyHeldHere",
    "CommandNotFound",
    "DetachFailed",
    "Instance",
    "InvalidPort",
    "Layout",
    "LayoutError",
    "LayoutFileError",
    "Lease",
    "LockError",
    "LockHeld",
    "NoFreeSlot",
    "NotRunning",
    "PassedSocketError",
    "PoolExhausted",
    "PortLock",
    "PortPoolError",
    "PortRecord",
    "PortStatus",
    "Refusal",
    "ResourceLimit",
    "Service",
    "ServiceExited",
    "ShieldTripped",
    "SlotHolder",
    "SlotUnavailable",
    "StartError",
    "StateDir",
    "StateDirError",
    "StopFailed",
    "UnknownService",
    "UsageError",
    "__version__",
    "acquire",
    "bind_listen",
    "current_instance",
    "default_layout",
    "get_service_port_pool",
    "init_instance_manager",
    "inspect_port",
    "list_instances",
    "load_layout",
    "resolve_layout",
    "start_instance",
]
