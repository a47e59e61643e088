"""The original system's entry points: ``init_instance_manager`` and its pool look-up.

A compatibility layer: ``init_instance_manager()`` starts this process's one instance
(once, at start-up, before anything binds) and ``get_service_port_pool(service)``
answers from that instance's layout. New code calls ``portpool.start_instance``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from portpool._heldlock import ForkSafeRLock
from portpool.errors import PortPoolError, UsageError
from portpool.instance import Instance, start_instance
from portpool.layout import Layout, resolve_layout

__all__ = [
    "current_instance",
    "get_service_port_pool",
    "init_instance_manager",
]


_current: Instance | None = None
_current_mutex = ForkSafeRLock()  # a forked child's call never waits for a parent thread


def init_instance_manager(
    layout: Layout | str | os.PathLike[str] | None = None,
    *,
    services: Sequence[str] | None = None,
    shield: bool = True,
    number: int | None = None,
) -> Instance:
    """Start this process's instance once, at start-up, before anything binds a port.

    ``layout`` is a Layout, a layout file path (str or Path), or None (``./portpool.toml``, else the
    default layout). Later calls return the same instance. The leases' sockets are
    ready to serve: pass them to your server (see ``portpool.integrations``).
    ``number`` pins the instance number (see ``start_instance``); ``services`` limits
    the leases to those service names (one name may be given as a str); ``shield``
    starts the shield, which ends the process with exit code 4 when a lease stops being
    ours. Call ``release()`` on the instance (or use it in a ``with`` block) to give
    everything back before exiting.
    Compatibility layer: the original system's entry point; new code calls
    ``start_instance``. Raises UsageError when this process already runs an instance
    and the call asks for another layout, services or number (it used to return the
    first instance silently; a shield asked for now is started); else what
    ``start_instance`` raises (NoFreeSlot, PoolExhausted, SlotUnavailable, UsageError,
    LayoutError, StateDirError).
    """
    global _current
    if isinstance(services, str):  # one name, as start_instance takes it (not its letters)
        services = [services]
    with _current_mutex:
        running = _running()
        if running is not None:
            _check_same(running, layout, services, number)
            # Asked for now: it runs from here on (a running shield stays). In a forked
            # child the instance is the parent's to shield: it raised NotRunning there.
            if shield and not running._in_forked_child:
                running.start_shield()
            return running
        resolved = layout if isinstance(layout, Layout) else resolve_layout(layout)
        instance = start_instance(resolved, services=services, number=number)
        if shield:
            instance.start_shield()
        _current = instance
        return instance


def _running() -> Instance | None:
    """The instance ``init_instance_manager`` started, unless it was released since."""
    return _current if _current is not None and not _current._released else None


def _check_same(
    current: Instance,
    layout: Layout | str | os.PathLike[str] | None,
    services: Sequence[str] | None,
    number: int | None,
) -> None:
    """A repeated ``init_instance_manager`` call may only ask for what already runs."""
    problems = []
    if layout is not None:
        wanted = layout if isinstance(layout, Layout) else resolve_layout(layout)
        if not wanted.same_as(current.layout):
            problems.append(f"another layout ({wanted.source}, app {wanted.app!r})")
    # As start_instance reads them: an empty list is every service of the layout.
    wanted_services = set(services or [s.name for s in current.layout.services])
    if services is not None and wanted_services != set(current.leases):
        problems.append(f"services {sorted(wanted_services)}")
    if number is not None and number != current.number:
        problems.append(f"instance {number}")
    if problems:
        raise UsageError(
            f"this process already runs instance {current.number} of "
            f"{current.layout.app!r} ({current.layout.source}); init_instance_manager "
            f"was called again with {' and '.join(problems)}: release() it first"
        )


def current_instance() -> Instance | None:
    """The last instance ``init_instance_manager`` started in this process (it may
    have been released since), or None if it never ran. Raises nothing."""
    return _current


def get_service_port_pool(service: str, instance: int | None = None) -> list[int]:
    """The pool of ``service`` (a service name) for ``instance`` (an instance number,
    default: this process's instance): its port numbers, in the order tried.

    The layout is the running instance's (from ``init_instance_manager``), else
    ``./portpool.toml`` or the default layout. Compatibility layer: the original
    system's entry point. Raises UnknownService for a service the layout lacks,
    UsageError for an ``instance`` outside 1..max_instances, PortPoolError when no
    ``instance`` is given and no instance of ``init_instance_manager`` runs in this
    process (never started, or released).
    """
    running = _running()
    if instance is not None:
        # The running instance's layout, not whatever ./portpool.toml says now.
        layout = running.layout if running is not None else resolve_layout(None)
        layout.check_number(instance, "instance")  # a Python argument, not --instance
        return layout.pool(service, instance)
    if running is None:
        raise PortPoolError(
            "no instance runs in this process: call init_instance_manager() first "
            "(again after release()), or pass the instance number"
        )
    return running.pool(service)
