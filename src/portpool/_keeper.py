"""One supervised service's life under ``portpool up``: start, readiness, restart.

A keeper runs in its own thread: it waits until every service it depends on has been
ready once, starts the service, waits for its readiness probe, and, when the service
exits, restarts it by its ``restart`` policy with backoff (``portpool._restart``: only
runs that exit without making progress count toward the crash-loop limit). The
listening socket belongs to ``up`` for the instance's life and is passed again to each
new process, so the port never changes and connections made while the service was
down wait in the accept queue for the next process instead of being refused.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from portpool._dataclass import dataclass
from portpool._launch import describe_status
from portpool._readiness import ReadinessProbe
from portpool._restart import (
    NONE_PROGRESS_S,
    RESTART_BURST,
    RESTART_WINDOW_S,
    RestartTracker,
    backoff_s,
    made_progress,
)
from portpool.errors import CommandNotFound, ResourceLimit
from portpool.layout import Service

__all__ = ["SERVICE_STATES", "Failure", "ServiceKeeper", "describe_failure"]

SERVICE_STATES = ("starting", "ready", "restarting", "exited")
_PROBE_INTERVAL_S = 0.05
_FIRST_PROBE_INTERVAL_S = 0.005


@dataclass(frozen=True)
class Failure:
    """Why a keeper stopped the instance: ``kind`` is ``exited`` (restart policy said
    no), ``early`` (exited before ready), ``gave-up`` (crash loop), ``not-ready``
    (timeout) or ``cannot-start``; ``returncode`` is the last one, if any."""

    service: str
    kind: str
    returncode: int | None = None
    detail: str = ""
    limit: ResourceLimit | None = None  # cannot-start: out of file descriptors


def describe_failure(failure: Failure) -> str:
    """The one-line message for a keeper's ``Failure`` (the instance stops, exit 5)."""
    name = failure.service
    status = "" if failure.returncode is None else describe_status(failure.returncode)
    if failure.kind == "exited":
        return f"service {name!r} exited on its own ({status})"
    if failure.kind == "early":
        return f"service {name!r} exited before it was ready ({status})"
    if failure.kind == "gave-up":
        return (
            f"service {name!r} gave up: more than {RESTART_BURST} restarts within "
            f"{RESTART_WINDOW_S:g} s, {failure.detail or 'none of them ready'} (last: {status})"
        )
    if failure.kind == "not-ready":
        return f"service {name!r} was not ready in time ({failure.detail})"
    return f"service {name!r} could not start: {failure.detail}"


SpawnFn = Callable[[Service, ReadinessProbe], subprocess.Popen[bytes]]
StopFn = Callable[[str], None]


class ServiceKeeper:
    """Keeps one service running; see the module docstring.

    ``spawn(service, probe)`` starts one process (its output is fed to the probe);
    ``stop(name)`` stops the service's current process (and its tree);
    ``make_probe()`` gives a fresh probe per start; ``on_change(keeper)`` is called
    after every state change; ``on_ready(keeper, seconds)`` when a start became ready;
    ``on_failure(failure)`` when the instance must stop; ``on_restart(keeper,
    returncode, delay_s)`` when the service exited and will be started again after
    ``delay_s`` seconds. ``done`` is set when the instance is stopping.
    ``stop_leftovers(name)`` stops what an exited process left running, before the
    service is started again.

    ``restarts`` counts the restarts after an exit (the policy's); ``planned_restarts``
    those of a rolling restart, which stop the process on purpose and so leave
    ``last_exit_status`` (the last failure) alone. ``start_reason`` says why the current
    process started: "start", "restart" or "rolling".
    """

    def __init__(
        self,
        service: Service,
        port: int,
        *,
        spawn: SpawnFn,
        stop: StopFn,
        make_probe: Callable[[], ReadinessProbe],
        on_change: Callable[[ServiceKeeper], None],
        on_ready: Callable[[ServiceKeeper, float], None],
        on_failure: Callable[[Failure], None],
        done: threading.Event,
        depends_on: Sequence[ServiceKeeper] = (),
        on_restart: Callable[[ServiceKeeper, int, float], None] | None = None,
        stop_leftovers: StopFn | None = None,
    ) -> None:
        self.service = service
        self.name = service.name
        self.port = port
        self._spawn = spawn
        self._stop = stop
        self._make_probe = make_probe
        self._on_change = on_change
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._on_restart = on_restart
        self._stop_leftovers = stop_leftovers
        self._done = done
        self._depends_on = tuple(depends_on)
        self.tracker = RestartTracker(service.restart)
        self.state = "starting"  # also while it waits for what it depends on
        self.pid: int | None = None
        self.last_exit_status: int | None = None  # the shell's view: 128+N for signal N
        self.start_problem: str | None = None  # why the last restart could not exec
        self.started_at: float | None = None  # wall clock of the current process's start
        self.ready_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.planned_restarts = 0
        self._ready_kind = service.ready.partition(":")[0]  # tcp, http, log, none
        self.start_reason = "start"
        self.ever_ready = threading.Event()
        self._cond = threading.Condition()
        self._ready_count = 0
        self._expected_exit = False  # a rolling restart stops the process on purpose

    @property
    def restarts(self) -> int:
        return self.tracker.count

    def snapshot(self) -> dict[str, object]:
        """The state fields of the instance record (JSON-ready)."""
        snap: dict[str, object] = {
            "state": self.state,
            "restarts": self.restarts,
            "planned_restarts": self.planned_restarts,
            "last_exit_status": self.last_exit_status,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
        }
        if self.pid is None:
            # No process now (waiting, restarting, exited): the record must not name
            # a dead pid (or, by default, up's own).
            snap["pid"] = None
        return snap

    def _set(self, state: str) -> None:
        with self._cond:
            self.state = state
            if state == "ready":
                self._ready_count += 1
            self._cond.notify_all()
        self._on_change(self)

    # -- the thread

    def run(self) -> None:
        """The keeper thread's body: returns when the instance stops or fails."""
        for dep in self._depends_on:
            while not dep.ever_ready.wait(0.1):
                if self._done.is_set():
                    return
        while not self._done.is_set():
            result = self._run_once()
            if result is None or self._done.is_set():
                return
            returncode, progressed = result
            self._clear_process()
            if self._stop_leftovers is not None:
                # Before the next start: what the old process left would serve beside it.
                self._stop_leftovers(self.name)
                if self._done.is_set():
                    return  # the instance began to stop meanwhile: nothing to restart
            if self._expected_exit:
                self._expected_exit = False
                self.planned_restarts += 1
                self.start_reason = "rolling"
                self._set("restarting")
                continue
            exited_at = time.monotonic()
            decision = self.tracker.on_exit(returncode, exited_at, progressed=progressed)
            if not decision.restart:
                self._set("exited")
                kind = "gave-up" if decision.give_up else "exited"
                # ready = "none" is ready at once: a run made progress only by lasting.
                short = (
                    f"none of them ran {NONE_PROGRESS_S:g} s" if self._ready_kind == "none" else ""
                )
                self._on_failure(Failure(self.name, kind, returncode, short))
                return
            self.start_reason = "restart"
            self._set("restarting")  # writes the record: counted in the backoff
            if self._on_restart is not None:
                self._on_restart(self, returncode, decision.delay_s)
            if self._done.wait(max(0.0, exited_at + decision.delay_s - time.monotonic())):
                return

    def _clear_process(self) -> None:
        with self._cond:
            self.proc = None
            self.pid = None
            self.started_at = None
            self.ready_at = None

    def _run_once(self) -> tuple[int, bool] | None:
        """Start the service and wait for it to exit: its return code and whether the
        run made progress (``made_progress``), or None when the instance stops or this
        start failed (the failure is reported)."""
        probe = self._make_probe()
        try:
            begun = time.monotonic()
            self.started_at = time.time()
            self.ready_at = None
            try:
                proc = self._spawn(self.service, probe)
            except Exception as e:  # any reason a process could not start
                if self._done.is_set():
                    return None  # the instance is stopping: not a failure of this service
                if isinstance(e, CommandNotFound) and self.start_reason != "start":
                    # A restart the kernel would not exec for a moment (the program being
                    # rewritten: ETXTBSY, ENOENT) is a run that exited 126 or 127, as a
                    # shell says, for the restart policy to retry or give up on.
                    self.last_exit_status = e.exit_code
                    self.start_problem = e.problem
                    return e.exit_code, False
                self._set("exited")
                limit = e if isinstance(e, ResourceLimit) else None
                self._on_failure(Failure(self.name, "cannot-start", None, str(e), limit))
                return None
            self.start_problem = None
            with self._cond:
                self.proc = proc
                self.pid = proc.pid
            # A slow http answer is awaited no longer than the process lives.
            probe.running = lambda: proc.poll() is None and not self._done.is_set()
            self._set("starting")
            outcome = self._await_ready(proc, probe, begun)
            if outcome != "ready":
                # Never leave this thread while the process runs: the parent-death
                # signal (Linux) follows the thread that started it, and would SIGTERM
                # a service that the instance's stop is about to stop gracefully.
                returncode = proc.wait()
                if outcome == "exited" and not self._done.is_set():
                    if not self._expected_exit:
                        self.last_exit_status = _shell_status(returncode)
                    # Ready and gone between two checks (a fast service): progress.
                    was_ready = probe.proved_before_exit()
                    if self.ever_ready.is_set() or self._expected_exit or was_ready:
                        # A restart that exited before we saw it ready: the policy decides.
                        ran_s = time.monotonic() - begun
                        return returncode, made_progress(self._ready_kind, was_ready, ran_s)
                    self._set("exited")
                    self._on_failure(Failure(self.name, "early", returncode))
                return None
            self.ready_at = time.time()
            # The "ready" line, the record, then what lets "is up" be printed: whoever
            # read "is up" (up --detach) finds every service ready in the record.
            self._on_ready(self, time.monotonic() - begun)
            self._set("ready")
            self.ever_ready.set()
        finally:
            probe.close()
        returncode = proc.wait()
        if not self._expected_exit:  # a rolling restart's SIGTERM is not a failure
            self.last_exit_status = _shell_status(returncode)
        return returncode, made_progress(self._ready_kind, True, time.monotonic() - begun)

    def _await_ready(
        self, proc: subprocess.Popen[bytes], probe: ReadinessProbe, begun: float
    ) -> str:
        """``ready``, ``exited`` (before it was ready), ``timeout`` (reported) or
        ``stopping``."""
        deadline = begun + self.service.ready_timeout_s
        for attempt in itertools.count():
            if self._done.is_set():
                break
            if proc.poll() is not None:
                return "exited"
            try:
                if probe.check(deadline - time.monotonic()):
                    return "ready"
            except Exception as e:  # a probe's own bug must stop the instance, not hang it
                self._set("exited")
                detail = f"the readiness check failed: {type(e).__name__}: {e}"
                self._on_failure(Failure(self.name, "not-ready", None, detail))
                return "timeout"
            if time.monotonic() >= deadline:
                self._set("exited")
                # The keys to change, not only what was missing at the end.
                svc = self.service
                detail = f"ready = {svc.ready!r}, ready_timeout_s = {svc.ready_timeout_s:g}: "
                self._on_failure(Failure(self.name, "not-ready", None, detail + probe.last_problem))
                return "timeout"
            # Soon at first (a small service is ready within tens of milliseconds, and
            # each service that depends on it waits for this), then every 50 ms: at
            # most 20 tries a second after the first 75 ms (tcp on a passed socket
            # connects once per start; its later tries ask the kernel). The wait ends
            # early when the service answers the probe connection.
            probe.wait(backoff_s(_FIRST_PROBE_INTERVAL_S, _PROBE_INTERVAL_S, attempt), self._done)
        return "stopping"

    # -- rolling restart

    def restart_now(self, timeout_s: float) -> bool:
        """Stop the current process on purpose and wait until a new one is ready
        (rolling restart, same socket). False if that did not happen in ``timeout_s``."""
        with self._cond:
            before = self._ready_count
            if self.proc is None or self.state != "ready":
                return False
            self._expected_exit = True
        self._stop(self.name)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._ready_count == before and not self._done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))
        return self._ready_count > before

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until the service is ready (one restarting by its
        policy gets ready again). False if it is not by then, or the instance stops."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.state != "ready" and not self._done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))
            return self.state == "ready" and not self._done.is_set()


def _shell_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode
