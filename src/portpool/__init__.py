"""portpool: exclusive, predictable ports for every instance of a multi-service app.

The public names load on first use (PEP 562): ``import portpool`` alone costs almost
nothing, so the CLI, the exec shim and a program that only wants one name don't pay
for sockets, threads and dataclasses they never use.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing alone costs more than the rest of this file,
# and the exec shim that starts every service imports this package. Type checkers treat
# any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from portpool.errors import (
        AlreadyHeldHere,
        CommandNotFound,
        DetachFailed,
        Interrupted,
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

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(
        (
            "AlreadyHeldHere",
            "CommandNotFound",
            "DetachFailed",
            "Interrupted",
            "LayoutError",
            "LayoutFileError",
            "LockError",
            "LockHeld",
            "NoFreeSlot",
            "NotRunning",
            "PassedSocketError",
            "PoolExhausted",
            "PortPoolError",
            "Refusal",
            "ResourceLimit",
            "ServiceExited",
            "ShieldTripped",
            "SlotHolder",
            "SlotUnavailable",
            "StartError",
            "StateDirError",
            "StopFailed",
            "UnknownService",
            "UsageError",
        ),
        "portpool.errors",
    ),
    **dict.fromkeys(
        (
            "Instance",
            "current_instance",
            "get_service_port_pool",
            "init_instance_manager",
            "start_instance",
        ),
        "portpool.instance",
    ),
    **dict.fromkeys(
        ("Layout", "Service", "default_layout", "load_layout", "resolve_layout"),
        "portpool.layout",
    ),
    **dict.fromkeys(("PortLock", "PortRecord", "PortStatus", "inspect_port"), "portpool.lock"),
    **dict.fromkeys(("Lease", "acquire", "bind_listen"), "portpool.pool"),
    "list_instances": "portpool.records",
    "StateDir": "portpool.statedir",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups skip this function
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
    return sorted({*globals(), *__all__})


__all__ = [
    "AlreadyHeldHere",
    "CommandNotFound",
    "DetachFailed",
    "Instance",
    "Interrupted",
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
