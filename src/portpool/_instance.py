"""The ``Instance`` class: a running instance's slot and leases, its record, heartbeat
and shield, and its release.

``portpool.instance`` starts one (``start_instance``: a slot's leases taken all or
nothing) and is where users import both from; this module holds what an instance does
once it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from portpool._heldlock import ForkSafeRLock, HeldLock
from portpool._jsonfile import write_atomic
from portpool._platform import current_identity
from portpool._slots import own_slot_problem
from portpool._threads import join_thread
from portpool.errors import LockError, NotRunning, PortPoolError, ShieldTripped
from portpool.layout import Layout
from portpool.pool import Lease, not_transferable
from portpool.statedir import StateDir

if TYPE_CHECKING:
    from portpool.shield import LeaseReport

__all__ = ["Instance"]

log = logging.getLogger("portpool.instance")


class Instance:
    """A running instance: its slot, its leases, its record, heartbeat and shield.

    Create with ``start_instance()``. Release with ``release()`` or a ``with`` block.
    """

    def __init__(
        self, state: StateDir, layout: Layout, number: int, slot: HeldLock, leases: dict[str, Lease]
    ) -> None:
        self.state = state
        self.layout = layout
        self.number = number
        self.slot = slot
        self.leases = leases
        self.service_pids: dict[str, int] = {}
        self.directory: str | None = None  # the checkout it was started for
        self.skipped: list[tuple[int, str]] = []  # slots passed over: (number, why)
        self.service_states: dict[str, Mapping[str, Any]] = {}  # set by the supervisor
        # Children inherited through the exec that started up/run, and the marks an
        # orphan must then carry to be the instance's (set by the supervisor): doctor
        # reads them here, to judge listeners as the shield does.
        self.inherited_pids: tuple[int, ...] = ()
        self.adoption_marks: dict[str, str] = {}
        self.started_at = time.time()
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._shield: Any = None
        self._mutex = ForkSafeRLock()  # a child's copy never waits for a parent's thread
        self._released = False
        self._recorded = False  # after our first record, we only ever write over ours
        self._on_release: list[Callable[[], None]] = []
        self._owns_state = False  # start_instance opened it: release closes it
        self._state_let_go = False
        self._release_done = False  # every step of release() ran
        self._releaser: int | None = None  # the thread in release(), if any

    @property
    def app(self) -> str:
        """The layout's app name. Raises nothing."""
        return self.layout.app

    def port(self, service: str) -> int:
        """The port (int) leased to ``service``. Raises UnknownService for a name the
        layout lacks (it was a bare KeyError), KeyError for one not leased here."""
        return self.leases[self.layout.service(service).name].port

    @property
    def ports(self) -> dict[str, int]:
        """Each leased service's name -> its port (int). Raises nothing."""
        return {name: lease.port for name, lease in self.leases.items()}

    def pool(self, service: str) -> list[int]:
        """The ordered ports (int) of ``service``'s pool in this instance. Raises
        UnknownService for a service the layout lacks."""
        return self.layout.pool(service, self.number)

    def env(self, service: str | None = None) -> dict[str, str]:
        """The environment (name -> value, all str) a service of this instance is given
        (DESIGN.md); with ``service``, also its ``PORT`` and ``PORTPOOL_SERVICE``. Raises
        UnknownService for a name the layout lacks, KeyError for one not leased here."""
        env = {"PORTPOOL_APP": self.app, "PORTPOOL_INSTANCE": str(self.number)}
        names = []
        for svc in self.layout.services:
            if svc.name in self.leases:
                env[svc.env_name] = str(self.leases[svc.name].port)
                names.append(svc.name)
        # The exact names: PORTPOOL_PORT_<SERVICE> folds "-" and "_" together.
        env["PORTPOOL_SERVICES"] = ",".join(names)
        if service is not None:
            env["PORT"] = str(self.leases[self.layout.service(service).name].port)
            env["PORTPOOL_SERVICE"] = service
        return env

    # -- record

    def _record(self) -> dict[str, Any]:
        me = current_identity()
        return {
            "v": 1,
            "app": self.app,
            "number": self.number,
            "pid": me.pid,
            "start_token": me.start_token,
            "boot_id": me.boot_id,
            "host": self.layout.host,
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
            "dir": self.directory,
            **(
                {"inherited": list(self.inherited_pids), "marks": dict(self.adoption_marks)}
                if self.inherited_pids
                else {}
            ),
            "services": [
                {
                    "name": name,
                    "pool": self.pool(name),
                    "port": lease.port,
                    "pid": self.service_pids.get(name, me.pid),
                    # Why earlier ports of the pool were skipped (status, dashboard).
                    "refusals": [
                        {"port": r.port, "reason": r.reason, "detail": r.detail}
                        for r in lease.refusals
                    ],
                    **self.service_states.get(name, {}),
                }
                for name, lease in self.leases.items()
            ],
        }

    @property
    def _in_forked_child(self) -> bool:
        """True in a process forked from the one that started this instance: there the
        slot, the leases and the record are the parent's (the fork hook closed our
        copies of the locks), so nothing may be written or stopped in their name."""
        return not self.slot.is_owner_process

    def write_record(self) -> None:
        """Write this instance's record (``<n>.json``) now; nothing once released or in
        a forked child (the record names the parent: a child's pid in it tripped the
        parent's shield). Raises StateDirError if the record cannot be written,
        LockError when the slot or the record is no longer ours (the files are left as
        found for the shield to report: a heartbeat that rewrote them hid a takeover)."""
        if self._in_forked_child:
            return
        with self._mutex:
            if self._released:
                return
            # Built under the mutex, or an older record could be written last.
            data = json.dumps(self._record(), separators=(",", ":")).encode()
            if self._recorded:
                try:
                    problem = self._own_files_problem()
                except OSError:  # cannot tell: the write below says what is wrong
                    problem = None
                if problem is not None:
                    raise LockError(f"{problem}; left as found")
            write_atomic(self.state.instances(self.app), f"{self.number}.json", data)
            self._recorded = True

    def set_service_pids(self, pids: Mapping[str, int]) -> None:
        """Record which process (pid) serves each service (for ``status`` and the
        dashboard). Raises nothing: a failed record write is logged."""
        self.service_pids.update(pids)
        try:
            self.write_record()
        except PortPoolError as e:
            # As for the heartbeat: the shield, not a record write, judges ownership.
            log.warning("instance %d: cannot record service pids: %s", self.number, e)

    def set_service_states(
        self, states: Mapping[str, Mapping[str, Any]], pids: Mapping[str, int]
    ) -> None:
        """Record each supervised service's state (``state``, ``restarts``, ...) and pid,
        for ``status`` and the dashboard. Raises nothing: a failed write is logged."""
        with self._mutex:
            self.service_states.update(states)
        self.set_service_pids(pids)

    def problem(self) -> str | None:
        """None while the slot lock, the record and the state dir's path are still ours,
        else what went wrong. Raises StateDirError if the instances directory cannot be
        opened, OSError if the slot's lock file cannot be examined (an unreadable record
        is a problem, not an error)."""
        # The state dir's path last: its lock files move with it, so they see nothing.
        return self._own_files_problem() or self.state.problem()

    def _own_files_problem(self) -> str | None:
        """Whether the slot's lock and record, as our handles see them, are still ours:
        then they are ours to remove, even in a state dir moved away."""
        return own_slot_problem(self.state, self.app, self.number, self.slot)

    # -- heartbeat

    def heartbeat(self) -> None:
        """Refresh every lease's and the record's ``heartbeat_at`` now; nothing in a
        forked child. Raises nothing: a full disk must not kill a healthy instance."""
        if self._in_forked_child:
            return
        for lease in list(self.leases.values()):
            with contextlib.suppress(PortPoolError, OSError):
                lease.heartbeat()
        try:
            self.write_record()
        except PortPoolError as e:
            # A full disk must not kill a healthy instance; the shield judges ownership.
            log.warning("heartbeat of instance %d: %s", self.number, e)

    def start_heartbeat(self) -> None:
        """Start the thread calling ``heartbeat()`` every ``heartbeat_interval_s`` s; a
        second call does nothing. Raises RuntimeError if the thread cannot start."""
        if self._heartbeat_thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.layout.heartbeat_interval_s):
                self.heartbeat()

        self._heartbeat_thread = threading.Thread(
            target=loop, name=f"portpool-heartbeat-{self.number}", daemon=True
        )
        self._heartbeat_thread.start()

    # -- shield

    def start_shield(
        self,
        on_lost: Callable[[Lease | None, str], None] | None = None,
        own_pids: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        """Watch every lease and the slot; on a trip call ``on_lost`` (default: shut down
        this instance and exit the process with code 4). A second call does nothing.
        ``own_pids()`` gives the pids whose processes, and their descendants, serve the
        instance's ports (default: this process and the pids of ``set_service_pids``):
        a listener of theirs on a lease's port is the instance's own, never a trip.
        Raises NotRunning once the instance was released, or in a forked child (a shield
        over leases that are not held tripped at its first check and ended the process
        with code 4), RuntimeError if the shield's thread cannot start."""
        from portpool.shield import Shield

        def tripped(lease: Lease | None, reason: str) -> None:
            self.lost_reason = reason
            if on_lost is None:  # else the caller reports it: once, not three times
                log.critical("instance %d of %s lost: %s", self.number, self.app, reason)
            (on_lost or self._default_on_lost)(lease, reason)

        with self._mutex:  # against a concurrent release(): it stops what started here
            # Before "already on": a forked child saw its parent's shield and returned.
            if self._released or self._in_forked_child:
                why = "was released" if self._released else "belongs to the parent process"
                raise NotRunning(
                    self.app, f"instance {self.number} of {self.app!r} {why}; nothing to shield"
                )
            if self._shield is not None:
                return
            self._shield = Shield(
                list(self.leases.values()),
                interval_s=self.layout.shield_interval_s,
                on_lost=tripped,
                instance_check=self.problem,
                own_pids=own_pids or self._own_pids,
                name=f"portpool-shield-{self.number}",
            )
            self._shield.start()

    def _own_pids(self) -> list[int]:
        # This process too: a worker it starts on a `socket = "port"` lease (README's
        # worker.py) was a foreign listener, and the default trip ended the program.
        return [os.getpid(), *self.service_pids.values()]

    def _default_on_lost(self, lease: Lease | None, reason: str) -> None:
        self.release()
        logging.shutdown()
        os._exit(ShieldTripped.exit_code)

    def verify_all(
        self,
        *,
        trip: bool = False,
        on_lost: Callable[[Lease | None, str], None] | None = None,
        own_pids: Callable[[], Iterable[int]] | None = None,
    ) -> list[LeaseReport]:
        """Run the shield's checks now: one LeaseReport per lease, one for the slot
        (``kind="instance"``). ``trip``: a running shield trips on what they find
        (``Shield.check_now``, with its own ``on_lost``); with none running, the first
        problem is passed to ``on_lost(lease, reason)`` as a trip would be, if given.
        ``own_pids``: as for ``start_shield``, where no shield runs. Raises nothing for a
        lost lease: its report says so."""
        from portpool.shield import Shield

        if self._shield is not None:
            return self._shield.check_now() if trip else self._shield.check_once()  # type: ignore[no-any-return]
        shield = Shield(
            list(self.leases.values()),
            interval_s=self.layout.shield_interval_s,
            on_lost=on_lost or (lambda lease, reason: None),
            instance_check=self.problem,
            own_pids=own_pids or self._own_pids,
        )
        return shield.check_now() if trip else shield.check_once()

    # -- stopping

    def on_release(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` first thing in ``release()`` (e.g. stop supervised services).
        Raises nothing; ``release()`` logs what the callback raises."""
        self._on_release.append(callback)

    def release(self) -> None:
        """Stop heartbeat and shield, release every lease and the slot, remove our record.

        Only what is still ours is erased: a lock or record taken over by someone else
        is left alone. Safe to call twice and from any thread: a call while another
        thread releases returns at once, leaving the release to it (waiting for it
        deadlocked an ``on_release`` callback that joins the caller's thread). A
        callback's error is logged, not raised; when the instances directory cannot be
        checked (it became unsafe or unreadable) the slot is unlocked and its files are
        left. Raises nothing: an exception here used to leave the slot locked after the
        leases went.
        In a forked child it only closes the child's copies of the sockets and locks:
        the ``on_release`` callbacks and the files stay the parent's.
        """
        # Done only once every step ran: a Ctrl-C (KeyboardInterrupt) midway, even as
        # the mutex below was let go, left the slot locked for good, and a second call
        # returned at once. The next call from this thread finishes the job (each step
        # repeats safely); one from another thread leaves it to the releasing one.
        me = threading.get_ident()
        with self._mutex:
            if self._release_done or self._releaser not in (None, me):
                return
            self._released = True
            self._releaser = me
        self._release()
        self._release_done = True
        self._releaser = None

    def _release(self) -> None:
        if self._in_forked_child:
            for lease in self.leases.values():
                lease.release()  # the child's copies only (see PortLock.release)
            self.slot.release()
            self._close_state()
            return
        self._stop.set()
        if self._shield is not None:
            self._shield.stop()
        while self._on_release:  # each to its end once; one interrupted runs again
            try:
                self._on_release[0]()
            except Exception:
                log.exception("while stopping instance %d", self.number)
            del self._on_release[0]
        for lease in self.leases.values():
            lease.release()
        try:
            ours = self.slot.is_owner_process and self._own_files_problem() is None
        except (PortPoolError, OSError):  # an unusable instances dir: unlock, erase nothing
            ours = False
        if ours:
            with contextlib.suppress(OSError):
                self.state.instances(self.app).unlink(f"{self.number}.json")
            self.slot.remove_and_release()
        else:
            self.slot.release()
        join_thread(self._heartbeat_thread, timeout=5)
        self._close_state()

    def _close_state(self) -> None:
        """Let the state dir close (``StateDir.keep_open``), and close the one
        start_instance opened for this instance (4 descriptors each: a process that
        started and released instances in a loop ran out of them), unless a heartbeat
        that outlived its join could still use it."""
        beating = self._heartbeat_thread is not None and self._heartbeat_thread.is_alive()
        if (beating and not self._in_forked_child) or self._state_let_go:
            return
        # Once, even when a second release() finishes an interrupted one: a second
        # let_close() would close a state dir still in use by other leases.
        self._state_let_go = True
        self.state.let_close()
        if self._owns_state:
            self.state.close()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self) -> str | tuple[object, ...]:
        # As a Lease's; besides, copy.copy made a second owner that released the ports.
        raise not_transferable(f"Instance ({self.app} {self.number})")

    def __repr__(self) -> str:
        return f"Instance(app={self.app!r}, number={self.number}, ports={self.ports})"
