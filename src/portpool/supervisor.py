"""Running commands and services on an instance: ``portpool run`` and ``portpool up``.

``run_command()`` and ``run_up()`` are the library calls behind the two commands; the
``Supervisor`` they share has one place that starts a process with its sockets
(``start_process``), one place that stops a process's whole tree (``stop``) and one
wait loop (``wait``).

Rule 7: we only signal processes we started, directly or through them: a service's
process group while its leader is not reaped (so the group id cannot be reused), its
``Popen`` (which refuses a reaped child), and descendants through ``psutil`` handles
(which check the process start time). On Linux ``run``/``up`` is a child subreaper, so
a service's double-forked or ``setsid`` children re-parent to us and stay stoppable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from portpool._keeper import ServiceKeeper, describe_failure
from portpool._launch import (
    DEFAULT_GRACE_S,
    base_environment,
    describe_status,
    exit_status,
    find_program,
    held_ports,
    pump_lines,
    spawn,
)
from portpool._platform import (
    ReceivedSignal,
    controlling_terminal_alive,
    enlarge_pipe,
    in_terminal_foreground,
    process_group,
    reap_adopted,
    signal_group,
)
from portpool._readiness import ReadinessProbe
from portpool.errors import PortPoolError

__all__ = [
    "DEFAULT_GRACE_S",
    "Outcome",
    "Supervisor",
    "base_environment",
    "describe_failure",
    "describe_status",
    "exit_status",
    "find_program",
    "run_command",
    "run_up",
    "spawn",
]

if TYPE_CHECKING:
    import psutil

    from portpool.instance import Instance
    from portpool.layout import Layout, Service

_TICK_S = 0.5
_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)


@dataclass
class Outcome:
    """Why a supervised run ended: the exit code it maps to, a message, and the signal
    the caller should die of after releasing (None: exit with ``code``)."""

    code: int
    message: str = ""
    signum: int | None = None
    returncode: int | None = None  # ``run``: the command's Popen returncode
    lingering: list[str] = field(default_factory=list)  # ports still held, for people


class Supervisor:
    """Processes started for one instance, each with its whole tree.

    ``on_exit(name, returncode)`` is called (on a waiter thread) when a process exits
    while no stop was requested; it returns the ``Outcome`` that ends ``wait()``, or
    None to keep waiting. With ``adopt`` every child of this process counts as ours
    (``run``/``up``, child subreapers that start nothing else); without it, only the
    descendants of the processes started here.
    """

    def __init__(
        self,
        instance: Instance,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        out: IO[str] | None = None,
        on_exit: Callable[[str, int], Outcome | None] | None = None,
        adopt: bool = False,
    ) -> None:
        self.instance = instance
        self.adopt = adopt  # every child of this process is ours (run/up as subreaper)
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.on_exit = on_exit or self._exited_on_its_own
        self._groups: set[str] = set()  # names whose process leads its own group
        self._tracked: dict[int, psutil.Process] = {}
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._stopping = False
        self._print_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.keepers: dict[str, ServiceKeeper] = {}  # up's services (portpool._keeper)
        self._width = 0
        self._common: dict[str, str] = {}
        self._rolling = threading.Lock()
        # SIGHUP: one rolling-restart worker at a time, and at most one more queued.
        self._hup_lock = threading.Lock()
        self._hup_running = False
        self._hup_pending = False
        self.is_up = threading.Event()  # "is up" was said: a rolling restart may begin
        # Starting and stopping exclude each other: a restart that begins while the
        # instance stops would leave a service behind.
        self._spawn_lock = threading.Lock()

    # -- starting

    def start_process(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        sockets: Sequence[tuple[int, str]] = (),
        own_group: bool = True,
        capture: bool = True,
        width: int = 0,
        on_line: Callable[[str], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` as ``name`` with ``sockets`` at fds 3.., the parent-death
        signal set and (``own_group``) in its own process group. With ``capture`` its
        output is printed with a ``name |`` prefix (each line also given to ``on_line``);
        else it inherits our stdio. Raises StartError, or PortPoolError once stopping."""
        keep: list[int] = []
        read_fd = write_fd = -1
        if capture:
            read_fd, write_fd = os.pipe()
            enlarge_pipe(write_fd)
            keep = [read_fd]  # the service holds a reader too: writes never hit EPIPE
        try:
            with self._spawn_lock:
                if self._stopping:
                    raise PortPoolError(f"not starting {name!r}: the instance is stopping")
                proc = spawn(
                    command,
                    env,
                    sockets=sockets,
                    watch_parent=True,
                    own_group=own_group,
                    keep_fds=keep,
                    stdin=subprocess.DEVNULL if capture else None,
                    stdout=write_fd if capture else None,
                    stderr=write_fd if capture else None,
                )
                self.children[name] = proc
                if own_group:
                    self._groups.add(name)
        except BaseException:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        if capture:
            os.close(write_fd)
            pump = threading.Thread(
                target=pump_lines,
                args=(name, width, os.fdopen(read_fd, "rb"), self.out, self._print_lock),
                kwargs={"on_line": on_line},
                name=f"portpool-out-{name}",
                daemon=True,
            )
            pump.start()
            self._threads.append(pump)
        waiter = threading.Thread(
            target=self._watch, args=(name, proc), name=f"portpool-wait-{name}", daemon=True
        )
        waiter.start()
        return proc

    def start_services(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, int]:
        """Start a keeper thread (``portpool._keeper``) for every service of the instance
        that has a ``command``: each starts its service, in its own process group, once
        what it depends on is ready, waits for its readiness and restarts it by its
        ``restart`` policy on the same socket. Returns service -> pid of those started
        already; ``wait_ready`` waits for the rest. Nothing starts once ``should_stop()``.
        """
        from portpool._order import start_order

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
        # A dependency without a command has nothing to wait for.
        graph = {n: tuple(d for d in s.depends_on if d in services) for n, s in services.items()}
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
                on_failure=lambda failure: self.finish(Outcome(5, describe_failure(failure))),
                done=self._done,
                depends_on=[self.keepers[d] for d in graph[name]],
                on_restart=self._print_restarting,
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
            svc.name, svc.command, env, sockets=sockets, width=self._width, on_line=probe.feed_line
        )

    def _record_states(self, _keeper: ServiceKeeper | None) -> None:
        pids = {name: k.pid for name, k in self.keepers.items() if k.pid is not None}
        states = {name: k.snapshot() for name, k in self.keepers.items()}
        self.instance.set_service_states(states, pids)

    def _say(self, line: str) -> None:
        with self._print_lock, contextlib.suppress(OSError, ValueError):
            self.out.write(line + "\n")
            self.out.flush()

    def _print_ready(self, keeper: ServiceKeeper, seconds: float) -> None:
        again = {
            "restart": f" (restart {keeper.restarts})",
            "rolling": " (rolling restart)",  # planned: not counted as a failure
        }.get(keeper.start_reason, "")
        self._say(f"portpool: {keeper.name} ready on port {keeper.port} in {seconds:.2f} s{again}")

    def _print_restarting(self, keeper: ServiceKeeper, returncode: int, delay_s: float) -> None:
        self._say(
            f"portpool: service {keeper.name!r} exited ({describe_status(returncode)}); "
            f"restarting in {delay_s:g} s"
        )

    def wait_ready(self) -> bool:
        """Block until every service was ready once (True, even if a stop was asked
        for meanwhile) or the run ends before (False)."""
        for keeper in self.keepers.values():
            while not keeper.ever_ready.wait(0.2):
                if self._done.is_set() and not keeper.ever_ready.is_set():
                    return False
        return True

    def rolling_restart(self) -> list[str]:
        """Restart every ready service in dependency order, each on its same socket,
        waiting until it is ready again before the next; returns those restarted. A
        call while one runs returns [] at once (``request_rolling_restart`` queues)."""
        if not self._rolling.acquire(blocking=False):
            return []
        try:
            done = []
            if self.keepers and not self._done.is_set():
                self._say(f"portpool: rolling restart of {', '.join(self.keepers)}")
            for name, keeper in self.keepers.items():
                if self._done.is_set():
                    break
                if keeper.restart_now(keeper.service.ready_timeout_s + self.grace_s):
                    done.append(name)
            return done
        finally:
            self._rolling.release()

    def request_rolling_restart(self) -> None:
        """``rolling_restart`` in a thread (for a signal callback), once every service
        was ready. A request while services start or a rolling restart runs is queued:
        at most one more runs after the current one (more requests meanwhile add
        nothing; each is said on the console). Dropping them silently left a SIGHUP
        sent during start or during a restart without effect."""
        with self._hup_lock:
            if self._hup_running:
                if self._hup_pending:
                    self._say("portpool: SIGHUP: a rolling restart is already queued")
                else:
                    self._hup_pending = True
                    self._say(
                        "portpool: SIGHUP: rolling restart queued (services are "
                        "starting or restarting)"
                    )
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
            while not self._done.is_set():
                self.rolling_restart()
                with self._hup_lock:
                    if not self._hup_pending:
                        self._hup_running = False
                        return
                    self._hup_pending = False
        finally:
            with self._hup_lock:
                self._hup_running = False
                self._hup_pending = False

    def own_pids(self) -> list[int]:
        """Pids of our processes still running (the shield's "ours" for a port; it
        counts their descendants itself, when it needs to)."""
        return [p.pid for p in self.children.values() if p.returncode is None]

    # -- waiting

    def _exited_on_its_own(self, name: str, returncode: int) -> Outcome:
        return Outcome(5, f"service {name!r} exited on its own ({describe_status(returncode)})")

    def _watch(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        returncode = proc.wait()
        if not self._stopping:
            outcome = self.on_exit(name, returncode)
            if outcome is not None:
                self.finish(outcome)

    def finish(self, outcome: Outcome) -> None:
        """Ask the supervisor to stop with ``outcome`` (the first request wins)."""
        if self._outcome is None:
            self._outcome = outcome
        self._done.set()

    @property
    def finishing(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Outcome:
        """Block until a stop is requested (signal, exit, shield trip), reaping orphans
        adopted meanwhile."""
        while not self._done.wait(_TICK_S):
            self._reap()
        return self._outcome or Outcome(0)

    def _reap(self) -> None:
        reap_adopted({p.pid for p in self.children.values() if p.returncode is None})

    # -- stopping

    def send(self, signum: int, names: Sequence[str] | None = None) -> None:
        """Send ``signum`` once to each named process (all when None): to its whole
        group when it leads one, else to the process alone."""
        for name in names if names is not None else list(self.children):
            proc = self.children[name]
            if proc.poll() is not None:
                continue
            if name in self._groups:
                # The leader is not reaped (poll above): the group id is still its own.
                signal_group(proc.pid, signum)
            else:
                with contextlib.suppress(OSError):
                    proc.send_signal(signum)

    def _tree(self) -> list[psutil.Process]:
        """Every living process we started through our children: their descendants,
        and with ``adopt`` every other child of ours (orphans adopted as a subreaper)."""
        import psutil

        mine = {p.pid for p in self.children.values()}
        found: dict[int, psutil.Process] = {}
        try:
            if self.adopt:
                roots = [psutil.Process()]
            else:
                roots = [psutil.Process(p.pid) for p in self.children.values() if p.poll() is None]
            for root in roots:
                for child in root.children(recursive=True):
                    if child.pid not in mine:
                        found[child.pid] = child
        except psutil.Error:
            pass
        return list(found.values())

    def stop_service(self, name: str) -> None:
        """Stop the process group of service ``name`` (SIGTERM, ``grace_s``, SIGKILL)
        and reap it: a rolling restart's stop of one service."""
        proc = self.children.get(name)
        if proc is None or proc.poll() is not None:
            return
        self.send(signal.SIGTERM, [name])
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self.send(_SIGKILL, [name])
            proc.wait()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every process we started, with its whole tree: ``signum`` once to each
        group and to each descendant outside those groups (also to one forked while
        stopping), up to ``grace_s`` to exit, then SIGKILL for what is left. Returns
        when all of it is gone."""
        import psutil

        with self._spawn_lock:
            self._stopping = True
            self._done.set()  # keepers stop restarting
        groups = {p.pid for n, p in self.children.items() if n in self._groups and p.poll() is None}
        self.send(signum)
        signalled: set[tuple[int, float]] = set()
        deadline = time.monotonic() + self.grace_s
        kill = False
        for step in range(100_000):  # bounded; ends at the deadline or when all are gone
            self._reap()
            alive = [p for p in self._tree() if _running(p)]
            for proc in alive:
                try:
                    key = (proc.pid, proc.create_time())
                    if kill:
                        proc.kill()
                    elif key not in signalled and process_group(proc.pid) not in groups:
                        # Members of a signalled group got it already: once is enough.
                        proc.send_signal(signum)
                    signalled.add(key)
                except psutil.Error:
                    continue
            if not alive and all(p.poll() is not None for p in self.children.values()):
                break
            if not kill and time.monotonic() >= deadline:
                kill = True
                self.send(_SIGKILL)
                deadline = time.monotonic() + 10.0
            elif kill and time.monotonic() >= deadline:
                break  # unkillable (uninterruptible sleep): give up waiting, not hang
            time.sleep(min(0.05, 0.002 * 2**step))  # most services exit within milliseconds
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        self._reap()
        for thread in self._threads:
            thread.join(timeout=2)

    def lingering(self, timeout_s: float) -> list[str]:
        """Ports of the instance still listened on by a process other than us, waited
        for up to ``timeout_s``: "port P is still held by pid X (name)"; [] when free.
        Closes the leases' sockets first (the locks stay until release)."""
        for lease in self.instance.leases.values():
            lease.close_socket()
        deadline = time.monotonic() + timeout_s
        while True:
            held = held_ports(self.instance)
            if not held or time.monotonic() >= deadline:
                return held
            time.sleep(0.05)


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def relay_to(supervisor: Supervisor, name: str, shared_group: bool) -> Callable[[Any], None]:
    """The signal callback of ``run``: pass each signal to the command once. A signal
    the kernel sent to our whole group (a terminal's Ctrl-C) reached it already."""

    terminal_keys = {getattr(signal, n, None) for n in ("SIGINT", "SIGQUIT")}

    def relay(received: ReceivedSignal) -> None:
        if shared_group and received.from_kernel:
            return
        if shared_group and not received.sender_known and received.signum in terminal_keys:
            return  # no siginfo here (macOS): take Ctrl-C / Ctrl-\ for the terminal's
        supervisor.send(received.signum, [name])

    return relay


def _stop_with(signum: int) -> int:
    # A hangup means the terminal is gone: stop services, do not make them reload.
    return signal.SIGTERM if signum == getattr(signal, "SIGHUP", -1) else signum


def run_command(
    layout: Layout,
    command: Sequence[str],
    *,
    services: Sequence[str] | None = None,
    fds: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    number: int | None = None,
    announce: Callable[[Instance], None] | None = None,
) -> Outcome:
    """``portpool run``: start an instance of ``layout`` with ``services`` (all when
    None), run ``command`` with its environment (and with ``fds`` its sockets at fds
    3..), and when it exits stop whatever it left running and release everything.

    Main thread only: the stop signals are taken over for the call and relayed to the
    command once each. ``number`` pins the instance number (see ``start_instance``).
    ``announce(instance)`` runs before the command starts. Returns
    the Outcome: ``code`` the command's exit status, ``signum`` the signal it died of
    (the caller should then die of it too), ``lingering`` ports something still held.
    Raises CommandNotFound (nothing started), Interrupted (a signal arrived before the
    command started; all released), ShieldTripped (after stopping the command),
    StartError, LayoutError, StateDirError.
    """
    from portpool._platform import become_subreaper
    from portpool._relay import SignalScope
    from portpool.errors import CommandNotFound, ShieldTripped
    from portpool.instance import start_instance

    problem = find_program(command)
    if problem is not None:
        raise CommandNotFound(command[0], problem)

    def exited(name: str, returncode: int) -> Outcome:
        signum = -returncode if returncode < 0 else None
        return Outcome(exit_status(returncode), signum=signum, returncode=returncode)

    with SignalScope() as scope:
        become_subreaper()
        # No heartbeat thread yet: every thread must start after the signals are blocked.
        instance = start_instance(layout, services=services or None, number=number, heartbeat=False)
        try:
            names = list(instance.leases)
            env = base_environment(instance.env(names[0] if len(names) == 1 else None))
            sockets = [(lease.fileno(), n) for n, lease in instance.leases.items()] if fds else []
            if not fds:
                for lease in instance.leases.values():
                    lease.close_socket()  # the lock stays: no portpool user can take the port
            if announce is not None:
                announce(instance)
            scope.block()
            scope.check()
            # In a terminal's foreground group the command stays in ours, as after
            # `exec`: it keeps the terminal, and the shell that called us gets Ctrl-C too.
            shared = in_terminal_foreground()
            supervisor = Supervisor(instance, grace_s=grace_s, on_exit=exited, adopt=True)
            instance.on_release(supervisor.stop)
            proc = supervisor.start_process(
                "command", command, env, sockets=sockets, own_group=not shared, capture=False
            )
            scope.relay(relay_to(supervisor, "command", shared))
            instance.set_service_pids(dict.fromkeys(names, proc.pid))
            instance.start_heartbeat()
            instance.start_shield(
                on_lost=lambda lease, reason: supervisor.finish(Outcome(4, reason)),
                own_pids=supervisor.own_pids,
            )
            outcome = supervisor.wait()
            supervisor.stop()
            outcome.lingering = supervisor.lingering(grace_s)
        finally:
            instance.release()
    if outcome.code == ShieldTripped.exit_code and outcome.returncode is None:
        raise ShieldTripped(outcome.message)
    return outcome


def run_up(
    layout: Layout,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    number: int | None = None,
    out: IO[str] | None = None,
    on_up: Callable[[Instance, dict[str, int]], None] | None = None,
    announce: Callable[[Instance], None] | None = None,
) -> Outcome:
    """``portpool up``: start an instance of ``layout`` and every service that has a
    command, each in its own process group, in dependency order (a service starts once
    what it depends on is ready); restart them by their ``restart`` policy on the same
    sockets; hold them until a signal, a service's failure or a shield trip, then stop
    every process they started and release everything.

    Main thread only (takes over the stop signals for the call). A stop signal is
    passed to the services once (SIGINT stays SIGINT), then ``grace_s``, then SIGKILL;
    USR1/USR2 are passed on without stopping; SIGHUP sent by a process (``kill -HUP``)
    restarts every service in dependency order on the same sockets
    (``Supervisor.rolling_restart``; one more is queued while one runs or services
    start), while a terminal's hangup stops. ``announce(instance)`` runs as soon as the
    instance is acquired, before any service starts (so its ports are said also when a
    start then fails); ``on_up`` runs once every service is ready; ``number`` pins the
    instance number. Returns the Outcome: code 0 after SIGTERM, 4 shield tripped, 5 a
    service exited and was not restarted, gave up after too many restarts without making
    progress (``portpool._restart``), or was not ready in time; ``signum`` set when the
    caller should die of that signal (SIGINT, SIGQUIT, a terminal's SIGHUP).
    Raises LayoutError (a command cannot be executed; nothing started), Interrupted,
    StartError, StateDirError.
    """
    from portpool._platform import become_subreaper
    from portpool._relay import SignalScope
    from portpool.errors import LayoutError
    from portpool.instance import start_instance

    for service in layout.services:
        problem = service.command and find_program(service.command)
        if problem:
            raise LayoutError(layout.source, f"services.{service.name}.command", problem)
    stop_signal: list[int] = []
    relayed_only = {getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2") if hasattr(signal, n)}
    hangup = getattr(signal, "SIGHUP", None)
    # A closed terminal reaches us as the kernel's SIGHUP, or as a shell passing its own
    # on (an ordinary signal from the shell's pid): the terminal tells the two apart.
    had_terminal = controlling_terminal_alive()
    with SignalScope() as scope:
        become_subreaper()
        instance = start_instance(layout, number=number, heartbeat=False)
        try:
            if announce is not None:
                announce(instance)
            scope.block()
            scope.check()
            # The keepers decide what a service's exit means (restart, or exit 5).
            supervisor = Supervisor(
                instance, grace_s=grace_s, out=out, adopt=True, on_exit=lambda n, rc: None
            )
            instance.on_release(supervisor.stop)

            def on_signal(received: ReceivedSignal) -> None:
                signum = received.signum
                if signum in relayed_only:
                    supervisor.send(signum)
                elif (
                    signum == hangup
                    and not received.from_kernel
                    and not supervisor.finishing
                    and not (had_terminal and not controlling_terminal_alive())
                ):
                    # kill -HUP: a rolling restart. A terminal's hangup stops.
                    supervisor.request_rolling_restart()
                elif supervisor.finishing:
                    supervisor.send(_stop_with(signum))  # asked again: passed on once more
                else:
                    stop_signal.append(_stop_with(signum))
                    name = signal.Signals(signum).name
                    if signum == signal.SIGTERM:
                        supervisor.finish(Outcome(0, f"stopping on {name}"))
                    else:
                        supervisor.finish(Outcome(128 + signum, f"stopping on {name}", signum))

            scope.relay(on_signal)
            supervisor.start_services(should_stop=lambda: supervisor.finishing)
            if not supervisor.finishing:
                instance.start_heartbeat()
                instance.start_shield(
                    on_lost=lambda lease, reason: supervisor.finish(
                        Outcome(4, f"shield tripped: {reason}")
                    ),
                    own_pids=supervisor.own_pids,
                )
                if supervisor.wait_ready():
                    if on_up is not None:
                        pids = {n: k.pid for n, k in supervisor.keepers.items() if k.pid}
                        on_up(instance, pids)
                    supervisor.is_up.set()
            outcome = supervisor.wait()
            supervisor.stop(stop_signal[0] if stop_signal else signal.SIGTERM)
            outcome.lingering = supervisor.lingering(grace_s)
        finally:
            instance.release()
    return outcome
