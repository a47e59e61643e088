"""Starting an instance: a slot's leases taken all or nothing, and its record.

An instance number is a slot ``apps/<app>/instances/<n>.lock`` held by a kernel lock for
the instance's life; which number an instance gets is ``portpool._slots``'s concern,
and what a running instance does (``Instance``) ``portpool._instance``'s.
Reading records is ``portpool.records``'s, removing dead instances' ``portpool._gc``'s,
and the original system's entry points (``init_instance_manager``) ``portpool._compat``'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

from portpool import pool as pool_mod
from portpool._gc import clean_app
from portpool._heldlock import HeldLock
from portpool._instance import Instance
from portpool._slots import checkout_dir, fill_slot, previous_number, remember_number
from portpool.errors import PoolExhausted, PortPoolError, ResourceLimit
from portpool.layout import Layout, require_layout, resolve_layout
from portpool.pool import Lease
from portpool.statedir import StateDir

__all__ = ["Instance", "start_instance"]

log = logging.getLogger("portpool.instance")


def start_instance(
    layout: Layout | None = None,
    *,
    services: Sequence[str] | None = None,
    state: StateDir | None = None,
    heartbeat: bool = True,
    clean: bool = True,
    number: int | None = None,
    directory: str | None = None,
) -> Instance:
    """Take a free slot and a lease from every service's pool, all or nothing.

    The slot is ``number`` if given (SlotUnavailable if it runs or is unusable, UsageError
    if it is outside 1..max), else the number the last instance for ``directory`` (default:
    ``checkout_dir(layout)``) had if it is free, else the lowest free one. A slot where
    one service's whole pool is taken (foreign programs, other apps' leases) is skipped
    (a warning says which and why), and the number taken past it is not remembered for
    ``directory``. ``services`` (service names) limits the leases to
    those services (all when None or empty); a single name may be given as a str.
    Raises NoFreeSlot, PoolExhausted or SlotUnavailable (nothing is held afterwards),
    UnknownService for a name the layout lacks, UsageError for a ``number`` outside
    1..max_instances, LayoutError, StateDirError, ResourceLimit, and TypeError for a
    ``layout`` that is no Layout (a path: ``load_layout(path)`` reads it) or a ``state``
    that is no StateDir (each raised AttributeError from deep inside).
    """
    if layout is not None:
        require_layout(layout)
    if state is not None and not isinstance(state, StateDir):
        raise TypeError(f"state must be a StateDir (StateDir.open()), not {state!r}")
    layout = layout or resolve_layout(None)
    if isinstance(services, str):  # a str is a Sequence[str]: its letters were names
        services = [services]
    # Each once: a name given twice took a second lease that release() never freed.
    names = list(dict.fromkeys(services)) if services else [s.name for s in layout.services]
    for name in names:
        layout.service(name)  # unknown names fail before anything is locked
    owned = state is None
    state = state or StateDir.open()
    try:
        directory = directory or checkout_dir(layout)
        if clean:
            with contextlib.suppress(OSError, PortPoolError):
                clean_app(state, layout.app)
        # A pinned number is not a preference, yet the remembered one still decides
        # whether this start may take over the checkout's number (not while it runs).
        remembered = previous_number(state, layout, directory)
        preferred = remembered if number is None else None
        instance, _, skipped = fill_slot(
            state,
            layout,
            lambda taken, slot: _acquire_all(
                state, layout, taken, slot, names, directory=directory
            ),
            number=number,
            preferred=preferred,
        )
    except BaseException:
        if owned:
            state.close()
        raise
    state.keep_open()  # until release: a state dir closed under it tripped its shield
    instance.skipped = skipped
    instance._owns_state = owned
    try:
        if not skipped:  # a fallback past blocked slots kept the checkout off its own
            remember_number(
                state, layout.app, directory, instance.number, remembered, pinned=number is not None
            )
        if heartbeat:
            instance.start_heartbeat()
    except BaseException:
        instance.release()  # a Ctrl-C here left an instance no caller could release
        raise
    return instance


def _acquire_all(
    state: StateDir,
    layout: Layout,
    number: int,
    slot: HeldLock,
    names: Sequence[str],
    *,
    directory: str,
) -> Instance:
    """A lease from each service's pool in slot ``number`` and the record, or none."""
    leases: dict[str, Lease] = {}
    try:
        for name in names:
            leases[name] = pool_mod.acquire(
                state,
                layout.pool(name, number),
                host=layout.host,
                app=layout.app,
                instance=number,
                service=name,
            )
        instance = Instance(state, layout, number, slot, leases)
        instance.directory = directory
        instance.write_record()
        return instance
    except BaseException as e:
        _undo([*(lease.release for lease in leases.values()), slot.remove_and_release])
        if isinstance(e, PoolExhausted):
            e.args = (f"instance {number}: {e}",)
        if isinstance(e, ResourceLimit) and e.needed is None:
            raise e.for_need(layout.descriptors_needed) from e
        raise


def _undo(steps: Sequence[Callable[[], None]]) -> None:
    """Run every one of ``steps`` (each safe to repeat), even when a Ctrl-C lands in one:
    a second interrupt while a first was cleaned up stopped the clean-up part-way, and
    the slot and ports stayed held with no Instance to release them. An interrupted step
    runs again (up to 3 times); the first interrupt is raised once all ran."""
    interrupted: BaseException | None = None
    for step in steps:
        for _ in range(3):
            try:
                step()
                break
            except BaseException as e:
                interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted
