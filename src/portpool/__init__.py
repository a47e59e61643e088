"""portpool: exclusive, predictable ports for every instance of a multi-service app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from portpool.errors import (
    AlreadyHeldHere,
    CommandNotFound,
    DetachFailed,
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

if TYPE_CHECKING:
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

# Each name's module, imported on first access: importing the package (which pytest does
# for the pytest11 plugin in every project, using it or not) stays cheap.
_LAZY = {
    **dict.fromkeys(
        (
            "Instance",
            "current_instance",
            "get_service_port_pool",
            "init_instance_manager",
            "start_instance",
        ),
        "instance",
    ),
    **dict.fromkeys(
        ("Layout", "Service", "default_layout", "load_layout", "resolve_layout"), "layout"
    ),
    **dict.fromkeys(("PortLock", "PortRecord", "PortStatus", "inspect_port"), "lock"),
    **dict.fromkeys(("Lease", "acquire", "bind_listen"), "pool"),
    "list_instances": "records",
    "StateDir": "statedir",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        from importlib import import_module

        value = getattr(import_module(f"portpool.{module}"), name)
        globals()[name] = value  # later accesses skip this function
        return value
    # importlib.metadata costs tens of ms to import: pay it only when asked.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("portpool")
        except PackageNotFoundError:  # running from a source tree
            return "0.0.0"
    raise AttributeError(f"module 'portpool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AlreadyHeldHere",
    "CommandNotFound",
    "DetachFailed",
    "Instance",
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
