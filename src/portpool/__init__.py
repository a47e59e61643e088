"""portpool: exclusive, predictable ports for every instance of a multi-service app.

This module is the public API: every name in ``__all__``, and nothing else, is kept
stable. The implementation modules (``portpool.lock``, ``portpool.pool``, ...) are
private; ``PortLock``, ``PortRecord``, ``PortStatus``, ``inspect_port`` and
``bind_listen`` live there for portpool itself and its tests. A user who wants a port
calls ``acquire`` (a ``Lease``) or ``start_instance`` (an ``Instance``), and reads who
holds what with ``list_instances`` and ``examine_layout``.
``init_instance_manager`` and ``get_service_port_pool`` are the compatibility layer of
the original system's entry points.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing alone costs more than the rest of this file,
# and every service's exec shim used to import this package. Type checkers treat any name
# TYPE_CHECKING as true. The public names load on first use (PEP 562), so ``import
# portpool`` alone costs almost nothing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from portpool._compat import (
        current_instance,
        get_service_port_pool,
        init_instance_manager,
    )
    from portpool._detach import (
        Detached,
        start_detached,
    )
    from portpool._doctor import (
        DoctorReport,
        PortVerdict,
        examine_layout,
    )
    from portpool._find import (
        find_instance,
        format_env,
        instance_env,
        service_port,
    )
    from portpool._gc import (
        GcReport,
        gc,
    )
    from portpool._host_warnings import (
        layout_warnings,
    )
    from portpool._logs import (
        follow_log,
        log_path,
    )
    from portpool._occupants import (
        Occupant,
    )
    from portpool._outcome import (
        Outcome,
    )
    from portpool._run import (
        run_command,
    )
    from portpool._stop import (
        Stopped,
        stop_instances,
    )
    from portpool._up import (
        run_up,
    )
    from portpool.diagnosis import (
        PortDiagnosis,
        diagnose,
    )
    from portpool.errors import (
        AlreadyHeldHere,
        CommandNotFound,
        DetachFailed,
        Interrupted,
        InvalidArgument,
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
        RefusalReason,
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
        start_instance,
    )
    from portpool.layout import (
        Layout,
        Service,
        default_layout,
        load_layout,
        resolve_layout,
    )
    from portpool.pool import (
        Lease,
        acquire,
    )
    from portpool.records import (
        InstanceInfo,
        ServiceInfo,
        iter_instances,
        list_instances,
    )
    from portpool.shield import (
        LeaseReport,
    )
    from portpool.statedir import (
        StateDir,
    )

    # Set by __getattr__ on first use; declared here, or type checkers read it as
    # __getattr__'s return type, object.
    __version__: str

del TYPE_CHECKING  # not a public name

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("Detached", "start_detached"), "portpool._detach"),
    **dict.fromkeys(
        ("find_instance", "format_env", "instance_env", "service_port"), "portpool._find"
    ),
    **dict.fromkeys(("follow_log", "log_path"), "portpool._logs"),
    **dict.fromkeys(("Outcome",), "portpool._outcome"),
    **dict.fromkeys(("run_command",), "portpool._run"),
    **dict.fromkeys(("Stopped", "stop_instances"), "portpool._stop"),
    **dict.fromkeys(("run_up",), "portpool._up"),
    **dict.fromkeys(
        ("layout_warnings",),
        "portpool._host_warnings",
    ),
    **dict.fromkeys(
        (
            "DoctorReport",
            "PortVerdict",
            "examine_layout",
        ),
        "portpool._doctor",
    ),
    **dict.fromkeys(
        ("Occupant",),
        "portpool._occupants",
    ),
    **dict.fromkeys(
        ("PortDiagnosis", "diagnose"),
        "portpool.diagnosis",
    ),
    **dict.fromkeys(
        (
            "AlreadyHeldHere",
            "CommandNotFound",
            "DetachFailed",
            "Interrupted",
            "InvalidArgument",
            "InvalidPort",
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
            "RefusalReason",
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
            "current_instance",
            "get_service_port_pool",
            "init_instance_manager",
        ),
        "portpool._compat",
    ),
    **dict.fromkeys(
        (
            "GcReport",
            "gc",
        ),
        "portpool._gc",
    ),
    **dict.fromkeys(
        (
            "Instance",
            "start_instance",
        ),
        "portpool.instance",
    ),
    **dict.fromkeys(
        (
            "Layout",
            "Service",
            "default_layout",
            "load_layout",
            "resolve_layout",
        ),
        "portpool.layout",
    ),
    **dict.fromkeys(
        (
            "Lease",
            "acquire",
        ),
        "portpool.pool",
    ),
    **dict.fromkeys(
        (
            "InstanceInfo",
            "ServiceInfo",
            "iter_instances",
            "list_instances",
        ),
        "portpool.records",
    ),
    **dict.fromkeys(
        ("LeaseReport",),
        "portpool.shield",
    ),
    **dict.fromkeys(
        ("StateDir",),
        "portpool.statedir",
    ),
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
    "Detached",
    "DoctorReport",
    "GcReport",
    "Instance",
    "InstanceInfo",
    "Interrupted",
    "InvalidArgument",
    "InvalidPort",
    "Layout",
    "LayoutError",
    "LayoutFileError",
    "Lease",
    "LeaseReport",
    "LockError",
    "LockHeld",
    "NoFreeSlot",
    "NotRunning",
    "Occupant",
    "Outcome",
    "PassedSocketError",
    "PoolExhausted",
    "PortDiagnosis",
    "PortPoolError",
    "PortVerdict",
    "Refusal",
    "RefusalReason",
    "ResourceLimit",
    "Service",
    "ServiceExited",
    "ServiceInfo",
    "ShieldTripped",
    "SlotHolder",
    "SlotUnavailable",
    "StartError",
    "StateDir",
    "StateDirError",
    "StopFailed",
    "Stopped",
    "UnknownService",
    "UsageError",
    "__version__",
    "acquire",
    "current_instance",
    "default_layout",
    "diagnose",
    "examine_layout",
    "find_instance",
    "follow_log",
    "format_env",
    "gc",
    "get_service_port_pool",
    "init_instance_manager",
    "instance_env",
    "iter_instances",
    "layout_warnings",
    "list_instances",
    "load_layout",
    "log_path",
    "resolve_layout",
    "run_command",
    "run_up",
    "service_port",
    "start_detached",
    "start_instance",
    "stop_instances",
]
