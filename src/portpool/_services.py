"""``up``'s services under one Supervisor: a keeper per service, started in dependency order.

``ServiceSupervisor`` adds to ``portpool._processes.Supervisor`` what only ``up`` needs:
a keeper thread per service (``portpool._keeper``: start, readiness, restart policy),
the "ready" and "restarting" lines, the services' states in the instance record, and
rolling restarts (``kill -HUP``), one at a time with at most one more queued.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING

from portpool._handover import handed_over
from portpool._keeper import Failure, ServiceKeeper, describe_failure
from portpool._launch import (
    DEFAULT_GRACE_S,
    base_environment,
    describe_status,
    grace_over_words,
)
from portpool._order import start_order
from portpool._outcome import Outcome
from portpool._output import STOPPING_SAY_WAIT_S, write_line
from portpool._platform import ancestors, environment_of, has_children, resume_stopped
from portpool._processes import Supervisor
from portpool._readiness import ReadinessProbe
from portpool.errors import ServiceExited

__all__ = ["ServiceSupervisor"]

if TYPE_CHECKING:
    from portpool.instance import Instance
    from portpool.layout import Layout, Service


class ServiceSupervisor(Supervisor):
    """The Supervisor of ``up``: every service of ``instance`` that has a command, each
    kept by a ``ServiceKeeper`` (see ``start_services``); ``grace_s`` and ``out`` as for
    ``Supervisor``. A keeper's failure finishes the run with an ``Outcome`` of code 5
    that carries the ``Failure``."""

    def __init__(
        self,
        instance: Instance,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        out: IO[str] | None = None,
        subreaper: bool = False,
        adopt: bool = False,
    ) -> None:
        # The keepers decide what a service's exit means (restart, or exit 5); with
        # ``adopt`` every child of ours is ours (the portpool command's ``up``, a child
        # subreaper that starts nothing else).
        super().__init__(
            instance,
            grace_s=grace_s,
            out=out,
            on_exit=lambda name, rc: None,
            adopt=adopt,
            subreaper=subreaper,
        )
        self.keepers: dict[str, ServiceKeeper] = {}
        self._width = 0
        self._common: dict[str, str] = {}
        self._rolling = threading.Lock()
        self._recording = threading.Lock()
        # SIGHUP: one rolling-restart worker at a time, and at most one more queued.
        self._hup_lock = threading.Lock()
        self._hup_running = False
        self._hup_pending = False
        self._hup_begun = False  # the worker's restart began (it no longer waits for ready)
        self.is_up = threading.Event()  # "is up" was said: a rolling restart may begin

    def start_services(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, int]:
        """Start a keeper thread (``portpool._keeper``) for every service of the instance
        that has a ``command``: each starts its service, in its own process group, once
        what it depends on is ready, waits for its readiness and restarts it by its
        ``restart`` policy on the same socket. Returns service -> pid of those started
        already; ``wait_ready`` waits for the rest. Nothing starts once ``should_stop()``.
        """
        if should_stop():
            return {}
        layout = self.instance.layout
        services = {
            s.name: s for s in layout.services if s.command and s.name in self.instance.leases
        }
        self._width = max((len(name) for name in services), default=0)
        self._common = {"PORTPOOL_SUPERVISOR_PID": str(os.getpid())}
        if "PORTPOOL_HOME" not in os.environ:
            self._common["PORTPOOL_HOME"] = self.instance.state.path
        graph = {n: _started_dependencies(layout, n, services) for n in services}
        for name in start_order(graph):
            svc = services[name]
            if svc.socket == "port":
                # The child binds the port itself; our lock keeps portpool users off.
                self.instance.leases[name].close_socket()
            self.keepers[name] = ServiceKeeper(
                svc,
                self.instance.leases[name].port,
                spawn=self._spawn_service,
                stop=self.stop_service,
                make_probe=functools.partial(self._probe, svc),
                on_change=self._record_states,
                on_ready=self._print_ready,
                on_failure=self._failed,
                done=self._done,
                depends_on=[self.keepers[d] for d in graph[name]],
                on_restart=self._print_restarting,
                stop_leftovers=self.before_restart,
            )
        self._record_states(None)
        for name, keeper in self.keepers.items():
            thread = threading.Thread(target=keeper.run, name=f"portpool-keep-{name}", daemon=True)
            thread.start()
        return {name: k.pid for name, k in self.keepers.items() if k.pid is not None}

    def _probe(self, svc: Service) -> ReadinessProbe:
        lease = self.instance.leases[svc.name]
        listening = lease.socket if svc.socket == "fd" else None
        host = listening.getsockname()[0] if listening is not None else self.instance.layout.host
        return ReadinessProbe(svc.ready, host, lease.port, listening)

    def _spawn_service(self, svc: Service, probe: ReadinessProbe) -> subprocess.Popen[bytes]:
        assert svc.command is not None
        lease = self.instance.leases[svc.name]
        env = base_environment({**self.instance.env(svc.name), **self._common})
        sockets = [(lease.fileno(), svc.name)] if svc.socket == "fd" else []
        return self.start_process(
            svc.name,
            svc.command,
            env,
            sockets=sockets,
            width=self._width,
            on_line=probe.feed_line,
            on_partial=probe.feed_partial,
        )

    def before_restart(self, name: str) -> None:
        """What a restart of service ``name`` needs once its process exited: its socket
        listening again if the process shut it down (``Lease.listen_again``; if it cannot,
        the shield checks at once), then ``stop_leftovers``. Raises nothing."""
        lease = self.instance.leases.get(name)
        if lease is not None:
            try:
                lease.listen_again()
            except OSError as e:  # the restart then fails, and says why
                why = e.strerror or e
                self._say(f"portpool: service {name!r}: its socket cannot listen again ({why})")
                # Someone else listens on the port: the shield's check says who, now.
                self.instance.verify_all(trip=True)
        self.stop_leftovers(name)

    def stop_leftovers(self, name: str) -> None:
        """Stop what the exited process of service ``name`` left running, before it is
        started again: the orphans we adopted as a subreaper that carry its
        ``PORTPOOL_SERVICE`` and our ``PORTPOOL_SUPERVISOR_PID``, with their trees
        (SIGTERM, ``grace_s``, SIGKILL). Each restart left the previous process's
        double-forked or ``setsid`` children running, answering on the same socket
        with old code. Only with ``adopt`` (elsewhere orphans are not ours to find);
        a process that cleared its environment is not found. Raises nothing."""
        if not self.adopt or not has_children():
            return
        import psutil

        found: dict[int, psutil.Process] = {}
        try:
            # Never one inherited through exec, nor what it started (``_adopted``).
            orphans = self._adopted(psutil.Process().children())
        except psutil.Error:
            return
        for orphan in orphans:
            with contextlib.suppress(psutil.Error):
                env = orphan.environ()
                if env.get("PORTPOOL_SERVICE") != name:
                    continue
                if env.get("PORTPOOL_SUPERVISOR_PID") != str(os.getpid()):
                    continue
                found[orphan.pid] = orphan
                found.update((c.pid, c) for c in orphan.children(recursive=True))
        if not found:
            return
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        resume_stopped(found.values())
        _, alive = psutil.wait_procs(list(found.values()), timeout=self.grace_s)
        if alive:  # said, as a stop's SIGKILL is
            self.grace_over(signal.SIGTERM, [p.pid for p in alive])
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10.0)

    def _record_states(self, _keeper: ServiceKeeper | None) -> None:
        # One snapshot and its write at a time: two keepers changing state together
        # could write an older snapshot last ("starting" after "ready").
        with self._recording:
            pids = {name: k.pid for name, k in self.keepers.items() if k.pid is not None}
            states = {name: k.snapshot() for name, k in self.keepers.items()}
            self.instance.set_service_states(states, pids)

    def _say(self, line: str, wait_s: float | None = None) -> None:
        write_line(self.out, self._print_lock, line, self.reader_gone, wait_s)

    def say(self, line: str, wait_s: float | None = None) -> None:
        """Write ``line`` (one line of text, no newline) to ``out`` among the services'
        lines, as up's own "portpool: ..." lines are; with ``wait_s`` (seconds), lost if
        the output is blocked that long (a stop must not wait for a reader). Raises
        nothing."""
        self._say(line, wait_s)

    def grace_over(self, signum: int, pids: list[int]) -> None:
        """Say which services (and other processes of their trees) are SIGKILLed for
        still running ``grace_s`` after ``signum``: a Ctrl-C went unanswered for the
        whole grace period, and the kill then went unmentioned. Raises nothing."""
        services = {k.pid: name for name, k in self.keepers.items() if k.pid is not None}
        named = [f"service {services[p]!r} (pid {p})" for p in pids if p in services]
        named += [self._leftover(p, services) for p in pids if p not in services]
        words = grace_over_words(self.grace_s, signum, named, " (--grace)")
        # Not waited for: a blocked console kept the SIGKILL from coming.
        self._say(f"portpool: {words}", STOPPING_SAY_WAIT_S)

    def _leftover(self, pid: int, services: Mapping[int, str]) -> str:
        """``pid`` (not a service's own process) and the service whose tree it is in:
        by its ancestry, else by the PORTPOOL_SERVICE its environment kept (an orphan).
        A bare "SIGKILL to pid 9898" left the user to find which service left it."""
        line = [pid, *ancestors(pid)]
        name = next((services[p] for p in line if p in services), None)
        if name is None:
            env = environment_of(pid) or {}
            if env.get("PORTPOOL_SUPERVISOR_PID") == str(os.getpid()):
                name = env.get("PORTPOOL_SERVICE")
        return f"pid {pid}" if name is None else f"pid {pid} (of service {name!r})"

    def _print_ready(self, keeper: ServiceKeeper, seconds: float) -> None:
        again = {
            "restart": f" (restart {keeper.restarts})",
            "rolling": " (rolling restart)",  # planned: not counted as a failure
        }.get(keeper.start_reason, "")
        self._say(f"portpool: {keeper.name} ready on port {keeper.port} in {seconds:.2f} s{again}")

    def _print_restarting(self, keeper: ServiceKeeper, returncode: int, delay_s: float) -> None:
        ended = (
            f"could not be started again ({keeper.start_problem})"
            if keeper.start_problem
            else f"exited ({describe_status(returncode)})"
        )
        self._say(f"portpool: service {keeper.name!r} {ended}; restarting in {delay_s:g} s")

    def wait_ready(self) -> bool:
        """Block until every service was ready once (True, even if a stop was asked
        for meanwhile) or the run ends before (False)."""
        for keeper in self.keepers.values():
            while not keeper.ever_ready.wait(0.2):
                if self._done.is_set() and not keeper.ever_ready.is_set():
                    return False
        return True

    def rolling_restart(self) -> list[str]:
        """Restart every service in dependency order, each on its same socket, waiting
        until it is ready again before the next (one that is not ready at its turn,
        restarting by its policy, until it is; if it is not in time, the rest are left
        as they are); returns those restarted. A call while one runs returns [] at once
        (``request_rolling_restart`` queues)."""
        if not self._rolling.acquire(blocking=False):
            return []
        try:
            done = []
            if self.keepers and not self._done.is_set():
                self._say(f"portpool: rolling restart of {', '.join(self.keepers)}")
            for name, keeper in self.keepers.items():
                if self._done.is_set():
                    break
                # Its stop and that of what it left (stop_leftovers) may each take a grace.
                budget = keeper.service.ready_timeout_s + 2 * self.grace_s
                deadline = time.monotonic() + budget
                # One not ready (restarting by its policy) is waited for: it was passed
                # over, and what depends on it was restarted onto a dead dependency.
                if not keeper.restart_now(budget) and not keeper.wait_ready(
                    deadline - time.monotonic()
                ):
                    if not self._done.is_set():
                        self._say(
                            f"portpool: rolling restart stopped at {name}: not ready within "
                            f"{budget:g} s (the services after it were not restarted)"
                        )
                    break
                done.append(name)
            return done
        finally:
            self._rolling.release()

    def request_rolling_restart(self) -> None:
        """``rolling_restart`` in a thread (for a signal callback), once every service
        was ready. A request while one waits for that is the same restart (it has not
        begun: it picks up whatever changed); one while a rolling restart runs queues at
        most one more after it. Each is said on the console. Dropping them silently left
        a SIGHUP sent during start or during a restart without effect; two during start
        ran two restarts."""
        with self._hup_lock:
            if self._hup_running:
                if self._hup_pending or not self._hup_begun:
                    self._say("portpool: SIGHUP: a rolling restart is already queued")
                else:
                    self._hup_pending = True
                    self._say("portpool: SIGHUP: rolling restart queued (one is running)")
                return
            self._hup_running = True
            if not all(k.ever_ready.is_set() for k in self.keepers.values()):
                self._say("portpool: SIGHUP: rolling restart once every service is ready")
        threading.Thread(target=self._rolling_worker, name="portpool-rolling", daemon=True).start()

    def _rolling_worker(self) -> None:
        try:
            while not self.is_up.wait(0.2):
                if self._done.is_set():
                    return
            with self._hup_lock:
                self._hup_begun = True
            while not self._done.is_set():
                self.rolling_restart()
                with self._hup_lock:
                    if not self._hup_pending:
                        self._hup_running = self._hup_begun = False
                        return
                    self._hup_pending = False
        finally:
            with self._hup_lock:
                self._hup_running = self._hup_pending = self._hup_begun = False

    def _failed(self, failure: Failure) -> None:
        if handed_over(self.instance.layout, self.instance.leases.values()):
            # A foreign program can bind a port handed over by number before its service
            # does: the service then fails ("exited before it was ready"), and the shield
            # named that program only at its next check. Checked now, the trip says who.
            self.instance.verify_all(trip=True, on_lost=self.shield_lost, own_pids=self.own_pids)
        self.finish(Outcome(ServiceExited.exit_code, describe_failure(failure), failure=failure))


def _started_dependencies(
    layout: Layout, name: str, started: Mapping[str, Service]
) -> tuple[str, ...]:
    """What ``name`` waits for: the services it depends on that ``up`` starts, and,
    through one that it does not start (no command: nothing to wait for), what that
    one depends on. Dropping the one without a command dropped its own dependencies
    too: with api -> proxy (no command) -> db, api started before db was ready."""
    by_name = {s.name: s for s in layout.services}
    found: list[str] = []
    seen: set[str] = set()
    todo = list(by_name[name].depends_on)
    while todo:  # the layout has no cycles: this ends
        dep = todo.pop(0)
        if dep in seen or dep not in by_name:
            continue
        seen.add(dep)
        if dep in started:
            found.append(dep)
        else:
            todo.extend(by_name[dep].depends_on)
    return tuple(found)
