"""The shield: every interval, check that each lease of an instance is still ours.

Each check asks, per lease, whether its lock, record, socket and port are still ours
(``_lease_checks``), and then whether the instance's slot is (``instance_check``).
The first failure is a trip: ``on_lost`` is called once and the shield stops. The
original shield only re-read its own lock file and reacted by deleting files, which
cascaded into the other holder's failure; this one looks at the port too and leaves
the reaction to the caller. This module runs the checks: in a thread or an asyncio
task, with retries, and stops or trips exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from portpool._dataclass import dataclass
from portpool._lease_checks import Watch, lease_problems, watch
from portpool._snapshot import Snapshot
from portpool._threads import join_thread

if TYPE_CHECKING:
    import asyncio

    from portpool.pool import Lease

__all__ = ["LeaseReport", "Shield"]

log = logging.getLogger("portpool.shield")

# A check that finds a problem (or cannot run) is repeated with fresh kernel reads
# before it counts: a read racing a heartbeat write or a child re-binding is no trip.
_RETRY_DELAYS_S = (0.01, 0.05)


@dataclass(frozen=True)
class LeaseReport:
    """What one check found for one lease (or, with ``kind="instance"``, the slot)."""

    service: str
    port: int
    ok: bool
    problems: tuple[str, ...]  # human-readable reasons, empty when ok
    kind: Literal["lease", "instance"] = "lease"

    def __str__(self) -> str:
        what = "instance" if self.kind == "instance" else f"{self.service} port {self.port}"
        return f"{what}: {'ok' if self.ok else '; '.join(self.problems)}"


class Shield:
    """Watches the leases of one instance and trips once when one stops being ours.

    ``on_lost(lease, reason)`` is called once, on the first trip (``lease`` is None for
    an instance-level problem), in the shield's thread (or, with ``run_async``, in the
    event loop's thread); its exceptions are logged, never raised. A stopped shield
    never fires. The shield never trips because of the heartbeat's age.
    """

    def __init__(
        self,
        leases: Sequence[Lease],
        *,
        interval_s: float,
        on_lost: Callable[[Lease | None, str], None],
        instance_check: Callable[[], str | None] | None = None,
        own_pids: Callable[[], Iterable[int]] | None = None,
        name: str = "portpool-shield",
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"shield interval must be positive, not {interval_s!r}")
        self.interval_s = float(interval_s)
        self.name = name
        self._on_lost = on_lost
        self._instance_check = instance_check
        self._own_pids = own_pids
        self._watches: list[Watch] = [watch(lease) for lease in leases]
        self._state = threading.Lock()  # orders a trip against stop()
        self._check_mutex = threading.Lock()  # one check at a time: the caches are shared
        self._stop_event = threading.Event()
        self._stopped = False
        self._tripped: str | None = None
        self._checks_completed = 0  # by the loop; tests prove "no trip" meant "checked"
        self._running = False
        self._thread: threading.Thread | None = None
        self._async_wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    # ------------------------------------------------------------ public surface

    @property
    def tripped(self) -> str | None:
        """The reason of the trip, once tripped; None before (and after a plain stop)."""
        return self._tripped

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def checks_completed(self) -> int:
        """How many checks the shield's loop (thread or task) has run to the end, found
        trouble or not; ``check_once`` calls are not counted. "No trip for a while"
        means nothing until this has grown: a loaded machine may run no check at all."""
        return self._checks_completed

    def start(self) -> None:
        """Check every ``interval_s`` from a daemon thread. Raises RuntimeError if the
        shield already runs or was stopped."""
        self._claim()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop checking. Once this returns the shield never fires, even if a check was
        in flight (a trip already decided before it may still be finishing ``on_lost``).
        Waits up to ``timeout`` for the thread, unless called from the shield's own
        thread (e.g. by ``on_lost``). Idempotent."""
        with self._state:
            self._stopped = True
        self._stop_event.set()
        wake = self._async_wake
        if wake is not None:
            loop, event = wake
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(event.set)
        join_thread(self._thread, timeout)

    def check_once(self) -> list[LeaseReport]:
        """Run every check now, retrying transient failures, and report per lease (plus
        one ``kind="instance"`` report when there is an ``instance_check``). Never trips."""
        return self._check(abort=lambda: False)

    def check_now(self) -> list[LeaseReport]:
        """``check_once``, then a trip on what it found, as the loop's next check would:
        for a caller that saw a sign of trouble between checks (``up``'s socket could not
        listen again: a foreign program listens on the port, and each restart was handed
        the dead socket until the next check, 10 s by default). ``on_lost`` then runs in
        the caller's thread; nothing fires once stopped."""
        try:
            reports = self.check_once()
        except Exception:  # as in the loop: a bug in a check must not end the caller
            log.exception("%s: a check failed unexpectedly", self.name)
            return []
        found = self._trip_of(reports)
        if found is not None:
            self._fire(*found)
        return reports

    async def run_async(self) -> None:
        """The shield's loop as an asyncio task: checks run in the loop's default
        executor, ``on_lost`` in the loop's thread. Cancelling the task stops the shield.
        Raises RuntimeError if the shield already runs or was stopped."""
        import asyncio

        self._claim()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._async_wake = (loop, wake)
        try:
            next_at = time.monotonic() + self.interval_s
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, next_at - time.monotonic()))
                if self._stop_event.is_set():
                    return
                found = await loop.run_in_executor(None, self._find_trip)
                if found is not None:
                    self._fire(*found)
                    return
                next_at = self._next_time(next_at)
        finally:
            self._async_wake = None
            with self._state:
                self._stopped = True
            self._stop_event.set()

    # ------------------------------------------------------------ the loop

    def _claim(self) -> None:
        with self._state:
            if self._stopped:
                raise RuntimeError(f"{self.name} was stopped; create a new shield")
            if self._running:
                raise RuntimeError(f"{self.name} is already running")
            self._running = True

    def _next_time(self, previous: float) -> float:
        # Keep a steady rhythm; after an overrun (a slow /proc scan) wait a full interval.
        now = time.monotonic()
        nxt = previous + self.interval_s
        return nxt if nxt > now else now + self.interval_s

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # e.g. an interval too large to wait for (OverflowError)
            # A shield whose thread died is off: that is a trip, never a silent end.
            log.exception("%s: the shield's thread failed", self.name)
            self._fire(None, f"the shield stopped working: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop_event.wait(max(0.0, next_at - time.monotonic())):
            try:
                found = self._find_trip()
            except Exception:  # a bug in a check must not silently end the shield
                log.exception("%s: a check failed unexpectedly", self.name)
                found = None
            if found is not None:
                self._fire(*found)
                return
            next_at = self._next_time(next_at)

    def _find_trip(self) -> tuple[Lease | None, str] | None:
        """The first failure of one check, as (lease, reason), or None."""
        reports = self._check(abort=self._stop_event.is_set)
        if self._stop_event.is_set():
            return None  # a check interrupted by stop() proves nothing
        self._checks_completed += 1
        return self._trip_of(reports)

    def _trip_of(self, reports: list[LeaseReport]) -> tuple[Lease | None, str] | None:
        for watched, report in zip(self._watches, reports, strict=False):
            if not report.ok:
                reason = "; ".join(report.problems)
                if watched.lease.service:
                    reason = f"service {watched.lease.service!r}: {reason}"
                return watched.lease, reason
        if len(reports) > len(self._watches) and not reports[-1].ok:
            return None, "; ".join(reports[-1].problems)
        return None

    def _fire(self, lease: Lease | None, reason: str) -> None:
        with self._state:
            if self._stopped:
                return  # stop() won the race: a stopped shield never fires
            self._stopped = True
            self._tripped = reason
        self._stop_event.set()
        # Reported once, by on_lost's owner (the CLI prints it; Instance's default logs it):
        # logging here too printed every trip three times.
        log.debug("%s tripped: %s", self.name, reason)
        try:
            self._on_lost(lease, reason)
        except Exception:
            log.exception("%s: on_lost failed after the trip: %s", self.name, reason)

    # ------------------------------------------------------------ the checks

    def _check(self, abort: Callable[[], bool]) -> list[LeaseReport]:
        with self._check_mutex:
            snapshot = Snapshot(self._own_pids)
            reports: list[LeaseReport] = []
            for watched in self._watches:
                if abort():
                    break
                lease = watched.lease
                problems = self._retrying(
                    functools.partial(lease_problems, watched, snapshot), snapshot, abort
                )
                reports.append(LeaseReport(lease.service, lease.port, not problems, problems))
            instance_check = self._instance_check
            if instance_check is not None and not abort():

                def check_instance() -> list[str]:
                    problem = instance_check()
                    return [] if problem is None else [problem]

                problems = self._retrying(check_instance, snapshot, abort)
                reports.append(LeaseReport("", 0, not problems, problems, "instance"))
            return reports

    @staticmethod
    def _retrying(
        check: Callable[[], list[str]], snapshot: Snapshot, abort: Callable[[], bool]
    ) -> tuple[str, ...]:
        """Problems that ``check`` finds on every attempt; errors count only if they last."""
        problems: list[str] = []
        for attempt in range(len(_RETRY_DELAYS_S) + 1):
            if attempt:
                time.sleep(_RETRY_DELAYS_S[attempt - 1])
                if abort():
                    return ()
                snapshot.refresh()
            try:
                problems = check()
            except Exception as e:  # OSError mostly; anything else is retried the same way
                log.debug("check failed, retrying: %r", e)
                problems = [f"could not be checked: {e}"]
            if not problems:
                return ()
        return tuple(problems)
