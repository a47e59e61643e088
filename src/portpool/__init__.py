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

from portpool.diagnosis import DoctorReport, Occupant, PortDiagnosis, PortVerdict, examine_layout
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
from portpool.pool import Lease, acquire
from portpool.records import GcReport, InstanceInfo, ServiceInfo, gc, list_instances
from portpool.shield import LeaseReport
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
    "DoctorReport",
    "GcReport",
    "Instance",
    "InstanceInfo",
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
    "PassedSocketError",
    "PoolExhausted",
    "PortDiagnosis",
    "PortPoolError",
    "PortVerdict",
    "Refusal",
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
    "UnknownService",
    "UsageError",
    "__version__",
    "acquire",
    "current_instance",
    "default_layout",
    "examine_layout",
    "gc",
    "get_service_port_pool",
    "init_instance_manager",
    "list_instances",
    "load_layout",
    "resolve_layout",
    "start_instance",
]
