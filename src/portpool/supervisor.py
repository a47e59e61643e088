"""Starting and stopping service processes, for ``portpool up`` and ``portpool run``.

Rule 7: we only ever signal processes we started ourselves, through their ``Popen``
objects, which refuse to signal a child that was already reaped (so a recycled pid is
never hit). Stopping is SIGTERM, a grace period, then SIGKILL, own children only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from portpool._keeper import Failure, ServiceKeeper
from portpool._order import start_order
from portpool._readiness import ReadinessProbe
from portpool._restart import RESTART_BURST, RESTART_WINDOW_S
from portpool.errors import PortPoolError
from portpool.instance import Instance
from portpool.layout import Service

DEFAULT_GRACE_S = 5.0
_INHERITED = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")
_SPAWN_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spawn.py")


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


def base_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment without inherited socket-activation variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env.update(extra)
    return env


def find_program(command: Sequence[str]) -> str | None:
    """None if ``command[0]`` can be executed, else why not (checked before anything
    starts, so a typo in a layout is an error, not a service that dies at once)."""
    if not command:
        return "the command is empty"
    program = command[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        return None if os.access(program, os.X_OK) else f"{program!r} is not an executable file"
    return None if shutil.which(program) else f"{program!r} was not found on PATH"


def spawn(
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    sockets: Sequence[tuple[int, str]] = (),
    watch_parent: bool = False,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command``; with ``sockets`` [(fd, name)] they arrive at fds 3.. by the
    systemd protocol. ``watch_parent`` makes the child get SIGTERM if we die (Linux),
    so a kill -9 of portpool never leaves a command running without its leases."""
    if not command:
        raise PortPoolError("empty command")
    argv = list(command)
    if sockets or watch_parent:
        # The file, without site: `-m portpool._spawn` would import the whole package
        # first, ~0.1 s more before every service start and restart.
        shim = [sys.executable, "-S", _SPAWN_SHIM]
        for fd, name in sockets:
            shim += ["--fd", f"{fd}:{name}"]
        if watch_parent:
            shim += ["--parent", str(os.getpid())]
        argv = [*shim, "--", *argv]
    try:
        return subprocess.Popen(
            argv,
            env=dict(env),
            pass_fds=[fd for fd, _ in sockets],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )
    except OSError as e:
        raise PortPoolError(f"cannot start {command[0]!r}: {e.strerror or e}") from e


def stop_children(
    children: Mapping[str, subprocess.Popen[bytes]], grace_s: float = DEFAULT_GRACE_S
) -> None:
    """SIGTERM each running child, wait up to ``grace_s``, then SIGKILL those left."""
    for proc in children.values():
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in children.values():
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()


@dataclass
class Outcome:
    """Why a supervised run ended, and the exit code it maps to."""

    code: int
    message: str = ""


def _pump(
    name: str,
    width: int,
    stream: IO[bytes],
    out: IO[str],
    lock: threading.Lock,
    *,
    on_line: Callable[[str], None] | None = None,
) -> None:
    prefix = f"{name:<{width}} | "
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if on_line is not None:
            on_line(line)
        with lock:
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


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
            f"{RESTART_WINDOW_S:g} s (last: {status})"
        )
    if failure.kind == "not-ready":
        return f"service {name!r} was not ready in time ({failure.detail})"
    return f"service {name!r} could not start: {failure.detail}"


class Supervisor:
    """Runs the services of one instance that have a ``command`` in the layout: starts
    them in dependency order, waits for each one's readiness, restarts them by their
    ``restart`` policy on the same listening socket (``portpool._keeper``)."""

    def __init__(
        self, instance: Instance, *, grace_s: float = DEFAULT_GRACE_S, out: IO[str] | None = None
    ) -> None:
        self.instance = instance
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.keepers: dict[str, ServiceKeeper] = {}
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._stopping = False
        self._print_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._width = 0
        self._common: dict[str, str] = {}
        self._rolling = threading.Lock()
        # Spawning and stopping exclude each other: a restart that begins while the
        # instance stops would leave a service behind.
        self._spawn_lock = threading.Lock()
        self._spawned: list[subprocess.Popen[bytes]] = []

    @property
    def children(self) -> dict[str, subprocess.Popen[bytes]]:
        """The current process of each service that was started."""
        return {name: k.proc for name, k in self.keepers.items() if k.proc is not None}

    def start(self) -> dict[str, int]:
        """Start a keeper thread per service with a command, in dependency order; each
        starts its service once what it depends on is ready. Returns service -> pid for
        those already started (see ``wait_ready``)."""
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
            lease = self.instance.leases[name]
            if svc.socket == "port":
                # The child binds the port itself; our lock keeps portpool users off.
                lease.close_socket()
            self.keepers[name] = ServiceKeeper(
                svc,
                lease.port,
                spawn=self._spawn_service,
                stop=self._stop_one,
                make_probe=functools.partial(self._probe, svc),
                on_change=self._record_states,
                on_ready=self._print_ready,
                on_failure=lambda failure: self.finish(Outcome(5, describe_failure(failure))),
                done=self._done,
                depends_on=[self.keepers[d] for d in graph[name]],
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
        with self._spawn_lock:
            if self._stopping:
                raise PortPoolError("the instance is stopping")
            proc = spawn(
                svc.command,
                env,
                sockets=sockets,
                watch_parent=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            self._spawned = [p for p in self._spawned if p.returncode is None]
            self._spawned.append(proc)
        assert proc.stdout is not None
        pump = threading.Thread(
            target=_pump,
            args=(svc.name, self._width, proc.stdout, self.out, self._print_lock),
            kwargs={"on_line": probe.feed_line},
            name=f"portpool-out-{svc.name}",
            daemon=True,
        )
        pump.start()
        self._threads.append(pump)
        return proc

    def _stop_one(self, proc: subprocess.Popen[bytes]) -> None:
        stop_children({"service": proc}, self.grace_s)

    def _record_states(self, _keeper: ServiceKeeper | None) -> None:
        pids = {name: k.pid for name, k in self.keepers.items() if k.pid is not None}
        states = {name: k.snapshot() for name, k in self.keepers.items()}
        self.instance.set_service_states(states, pids)

    def _print_ready(self, keeper: ServiceKeeper, seconds: float) -> None:
        again = f" (restart {keeper.restarts})" if keeper.restarts else ""
        with self._print_lock:
            self.out.write(
                f"portpool: {keeper.name} ready on port {keeper.port} in {seconds:.2f} s{again}\n"
            )
            self.out.flush()

    def wait_ready(self) -> bool:
        """Block until every service was ready once (True) or the run ends (False)."""
        for keeper in self.keepers.values():
            while not keeper.ever_ready.wait(0.2):
                if self._done.is_set():
                    return False
        return not self._done.is_set()

    def own_pids(self) -> list[int]:
        return [p.pid for p in self.children.values() if p.returncode is None]

    def rolling_restart(self) -> list[str]:
        """Restart every ready service in dependency order, each on its same socket,
        waiting for each to be ready again before the next; returns those restarted.
        A second request while one runs is ignored."""
        if not self._rolling.acquire(blocking=False):
            return []
        try:
            done = []
            for name, keeper in self.keepers.items():
                if self._done.is_set():
                    break
                timeout = keeper.service.ready_timeout_s + self.grace_s
                if keeper.restart_now(timeout):
                    done.append(name)
            return done
        finally:
            self._rolling.release()

    def request_rolling_restart(self) -> None:
        """Start ``rolling_restart`` in a thread (safe to call from a signal handler)."""
        threading.Thread(target=self.rolling_restart, name="portpool-rolling", daemon=True).start()

    def finish(self, outcome: Outcome) -> None:
        """Ask the supervisor to stop with ``outcome`` (the first request wins)."""
        if self._outcome is None:
            self._outcome = outcome
        self._done.set()

    def wait(self) -> Outcome:
        """Block until a stop is requested (signal, service exit, shield trip)."""
        while not self._done.wait(0.5):
            pass
        return self._outcome or Outcome(0)

    def stop(self) -> None:
        """Stop own children (SIGTERM, grace, SIGKILL) and let their output drain."""
        with self._spawn_lock:
            self._stopping = True
            self._done.set()
        running = [p for p in self._spawned if p.poll() is None]
        stop_children({str(p.pid): p for p in running}, self.grace_s)
        for thread in self._threads:
            thread.join(timeout=2)
