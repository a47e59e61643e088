"""Starting and stopping service processes, for ``portpool up`` and ``portpool run``.

Rule 7: we only ever signal processes we started ourselves, through their ``Popen``
objects, which refuse to signal a child that was already reaped (so a recycled pid is
never hit). Stopping is SIGTERM, a grace period, then SIGKILL, own children only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from portpool.errors import PortPoolError
from portpool.instance import Instance

DEFAULT_GRACE_S = 5.0
_INHERITED = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")


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
        shim = [sys.executable, "-m", "portpool._spawn"]
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


def _pump(name: str, width: int, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    prefix = f"{name:<{width}} | "
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


class Supervisor:
    """Runs the services of one instance that have a ``command`` in the layout."""

    def __init__(
        self, instance: Instance, *, grace_s: float = DEFAULT_GRACE_S, out: IO[str] | None = None
    ) -> None:
        self.instance = instance
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._stopping = False
        self._print_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> dict[str, int]:
        """Start every service with a command; returns service -> pid."""
        layout = self.instance.layout
        services = [s for s in layout.services if s.command and s.name in self.instance.leases]
        width = max((len(s.name) for s in services), default=0)
        common = {"PORTPOOL_SUPERVISOR_PID": str(os.getpid())}
        if "PORTPOOL_HOME" not in os.environ:
            common["PORTPOOL_HOME"] = self.instance.state.path
        try:
            for svc in services:
                assert svc.command is not None
                lease = self.instance.leases[svc.name]
                env = base_environment({**self.instance.env(svc.name), **common})
                sockets = [(lease.fileno(), svc.name)] if svc.socket == "fd" else []
                if svc.socket == "port":
                    # The child binds the port itself; our lock keeps portpool users off.
                    lease.close_socket()
                proc = spawn(
                    svc.command,
                    env,
                    sockets=sockets,
                    watch_parent=True,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                self.children[svc.name] = proc
                assert proc.stdout is not None
                pump = threading.Thread(
                    target=_pump,
                    args=(svc.name, width, proc.stdout, self.out, self._print_lock),
                    name=f"portpool-out-{svc.name}",
                    daemon=True,
                )
                pump.start()
                self._threads.append(pump)
        except BaseException:
            stop_children(self.children, self.grace_s)
            raise
        for name, proc in self.children.items():
            waiter = threading.Thread(
                target=self._watch, args=(name, proc), name=f"portpool-wait-{name}", daemon=True
            )
            waiter.start()
        pids = {name: proc.pid for name, proc in self.children.items()}
        self.instance.set_service_pids(pids)
        return pids

    def own_pids(self) -> list[int]:
        return [p.pid for p in self.children.values() if p.returncode is None]

    def _watch(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        returncode = proc.wait()
        if not self._stopping:
            self.finish(
                Outcome(5, f"service {name!r} exited on its own ({describe_status(returncode)})")
            )

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
        self._stopping = True
        stop_children(self.children, self.grace_s)
        for thread in self._threads:
            thread.join(timeout=2)
