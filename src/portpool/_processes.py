"""The Supervisor: the processes started for one instance, each with its whole tree.

One place starts a process with its sockets (``Supervisor.start_process``), one wait
loop ends a run (``wait``), and one place stops every process with its whole tree
(``stop``). ``Outcome`` is why a supervised run ended. The commands built on it are
``portpool._run`` (``run``) and ``portpool._up`` with ``portpool._services`` (``up``).

Rule 7: we only signal processes we started, directly or through them: a service's
process group while its leader is not reaped (so the group id cannot be reused), its
``Popen`` (which refuses a reaped child), and descendants through ``psutil`` handles
(which check the process start time). On Linux ``run``/``up`` is a child subreaper, so
a service's double-forked or ``setsid`` children re-parent to us and stay stoppable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING

from portpool._launch import (
    DEFAULT_GRACE_S,
    describe_status,
    grace_over_words,
    held_ports,
    new_pipe,
    spawn,
)
from portpool._lineage import Lineage, running
from portpool._outcome import Outcome
from portpool._output import pump_lines
from portpool._platform import (
    enlarge_pipe,
    has_children,
    process_group,
    process_name,
    reap_adopted,
    resume_stopped,
    signal_group,
)
from portpool._restart import backoff_s
from portpool.errors import PortPoolError, ServiceExited, ShieldTripped

__all__ = ["Supervisor"]

if TYPE_CHECKING:
    import psutil

    from portpool.instance import Instance
    from portpool.pool import Lease

log = logging.getLogger("portpool.run")

_TICK_S = 0.5
_START_WAIT_S = 10.0  # stop's wait for the starts under way
_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)


class Supervisor:
    """Processes started for one instance, each with its whole tree.

    ``on_exit(name, returncode)`` is called (on a waiter thread) when a process exits
    while no stop was requested; it returns the ``Outcome`` that ends ``wait()``, or
    None to keep waiting. With ``adopt`` every child of this process counts as ours,
    to stop and to reap (the ``portpool`` command, a child subreaper that starts nothing
    else); without it, only the descendants of the processes started here: a program
    calling the library has children of its own.
    """

    def __init__(
        self,
        instance: Instance,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        out: IO[str] | None = None,
        on_exit: Callable[[str, int], Outcome | None] | None = None,
        adopt: bool = False,
        subreaper: bool = False,
    ) -> None:
        self.instance = instance
        self.adopt = adopt  # every child of this process is ours (run/up as subreaper)
        # The kernel made us a subreaper: all we start stays a descendant of ours.
        self.subreaper = subreaper
        # Which of our children are ours (``adopt``): not those we inherited through
        # exec (`sh -c 'sidecar & exec portpool up'`), nor what they start.
        self._lineage = Lineage(adopt)
        # Recorded with the services' pids, for doctor to judge listeners as we do.
        instance.inherited_pids = tuple(p.pid for p in self._lineage.inherited)
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.on_exit = on_exit or self._exited_on_its_own
        self._groups: set[str] = set()  # names whose process leads its own group
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._stopping = False
        self._all_gone = False  # a stop ended with every process of ours gone
        self._print_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Starting and stopping exclude each other (a restart begun while the instance
        # stops left a service behind): none begins once stopping, and a stop waits for
        # the starts under way (side by side, each waiting for its exec) to be counted.
        self._spawn_lock = threading.Lock()
        self._spawned = threading.Condition(self._spawn_lock)
        self._spawning = 0  # starts under way: forked or forking, not in ``children`` yet

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
        inherit_fds: Sequence[int] = (),
        on_partial: Callable[[str], None] | None = None,
        before_fork: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` as ``name`` with ``sockets`` at fds 3.., the parent-death
        signal set and (``own_group``) in its own process group. With ``capture`` its
        output is printed with a ``name |`` prefix (each line also given to ``on_line``,
        and the start of a line not ended yet to ``on_partial``);
        else it inherits our stdio. ``inherit_fds`` keep their numbers, ``before_fork``
        is called right before the fork (see ``spawn``).
        Raises StartError, ResourceLimit (out of file descriptors), or PortPoolError
        once stopping."""
        keep: list[int] = []
        read_fd = write_fd = -1
        if capture:
            read_fd, write_fd = new_pipe()
            enlarge_pipe(write_fd)
            keep = [read_fd]  # the service holds a reader too: writes never hit EPIPE
        try:
            with self._spawn_lock:
                if self._stopping:
                    raise PortPoolError(f"not starting {name!r}: the instance is stopping")
                self._spawning += 1
            proc: subprocess.Popen[bytes] | None = None
            try:
                # Not under the lock: up's six services started one after another, the
                # last ~100 ms after the first on two CPUs (benchmarks/bench_up.py).
                proc = spawn(
                    command,
                    env,
                    sockets=sockets,
                    watch_parent=True,
                    own_group=own_group,
                    keep_fds=keep,
                    inherit_fds=inherit_fds,
                    stdin=subprocess.DEVNULL if capture else None,
                    stdout=write_fd if capture else None,
                    stderr=write_fd if capture else None,
                    before_fork=before_fork,
                )
            finally:
                with self._spawn_lock:
                    self._spawning -= 1
                    if proc is not None:
                        self.children[name] = proc
                        self._lineage.mark(env)
                        self.instance.adoption_marks = self._lineage.marks
                        if own_group:
                            self._groups.add(name)
                    self._spawned.notify_all()
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
                kwargs={
                    "on_line": on_line,
                    "on_broken": self.reader_gone,
                    "on_partial": on_partial,
                },
                name=f"portpool-out-{name}",
                daemon=True,
            )
            pump.start()
            with self._spawn_lock:  # only the pumps still copying: restarts must not grow up
                self._threads = [t for t in self._threads if t.is_alive()] + [pump]
        waiter = threading.Thread(
            target=self._watch, args=(name, proc), name=f"portpool-wait-{name}", daemon=True
        )
        waiter.start()
        return proc

    def own_pids(self) -> list[int]:
        """Pids of our processes still running (the shield's "ours" for a port; it
        counts their descendants itself, when it needs to). With ``adopt``, every child
        of this process: a service's daemonized server, adopted by us as a subreaper and
        stopped with us, tripped the shield as "foreign" while ``doctor`` said ours."""
        pids = [p.pid for p in self._started() if p.returncode is None]
        if self.adopt and has_children():
            import psutil

            with contextlib.suppress(psutil.Error):
                adopted = self._adopted(psutil.Process().children())
                pids += [c.pid for c in adopted if c.pid not in pids]
        return pids

    def _adopted(self, children: Sequence[psutil.Process]) -> list[psutil.Process]:
        """Those of ``children`` (this process's) that are ours and not started here
        (``Lineage.adopted``)."""
        return self._lineage.adopted(children, {p.pid for p in self._started()})

    def _started(self) -> list[subprocess.Popen[bytes]]:
        # A copy, made in one step: a keeper's thread may add a start meanwhile.
        return list(self.children.values())

    # -- waiting

    def _exited_on_its_own(self, name: str, returncode: int) -> Outcome:
        status = describe_status(returncode)
        return Outcome(ServiceExited.exit_code, f"service {name!r} exited on its own ({status})")

    def _watch(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        returncode = proc.wait()
        if not self._stopping:
            outcome = self.on_exit(name, returncode)
            if outcome is not None:
                self.finish(outcome)

    def reader_gone(self) -> None:
        """Our output's reader went away (``up | head -2``): stop as a pipeline's writer
        does, of SIGPIPE. Writing services' lines into the void, up ran on unseen."""
        pipe = getattr(signal, "SIGPIPE", None)
        code = 128 + pipe if pipe is not None else 1
        self.finish(Outcome(code, "the reader of its output went away", pipe))

    def finish(self, outcome: Outcome) -> None:
        """Ask the supervisor to stop with ``outcome`` (the first request wins)."""
        if self._outcome is None:
            self._outcome = outcome
        self._done.set()

    def shield_lost(self, lease: Lease | None, reason: str) -> None:
        """The shield's ``on_lost``: stop with exit code 4, the trip (its reason and the
        lease's port, None for the slot) kept in the outcome as ``tripped``."""
        trip = ShieldTripped(reason, lease.port if lease is not None else None)
        self.finish(Outcome(trip.exit_code, str(trip), tripped=trip))

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
        if not self.adopt:
            return  # a child we did not start is the calling program's: its status too
        # Not while a child is being started (by a keeper's thread): it is not in
        # ``children`` yet, and reaping it would leave its Popen a returncode of 0.
        with self._spawn_lock:
            if self._spawning:
                return  # the next tick reaps
            reap_adopted({p.pid for p in self.children.values() if p.returncode is None})
        self._lineage.note()

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
        and with ``adopt`` every other child of ours (orphans adopted as a subreaper)
        but those we had before we started anything, and what they started."""
        if self.adopt and not has_children():
            return []  # no child at all: every descendant would be one (subreaper)
        import psutil

        found: dict[int, psutil.Process] = {}
        roots: list[psutil.Process] = []
        for started in self.children.values():
            if started.poll() is None:
                with contextlib.suppress(psutil.Error):
                    roots.append(psutil.Process(started.pid))
        if self.adopt:
            with contextlib.suppress(psutil.Error):
                for adopted in self._adopted(psutil.Process().children()):
                    found[adopted.pid] = adopted
                    roots.append(adopted)
        for root in roots:
            with contextlib.suppress(psutil.Error):
                found.update((c.pid, c) for c in root.children(recursive=True))
        for pid in {p.pid for p in self.children.values()}:
            found.pop(pid, None)  # signalled through their Popen
        return list(found.values())

    def _resume_stopped(
        self, started: Sequence[subprocess.Popen[bytes]], *, with_descendants: bool = False
    ) -> None:
        """``resume_stopped`` for the processes of ``started`` not reaped yet (the
        check keeps their pids from being reused), and their descendants if asked."""
        if sys.platform == "win32" or not any(p.poll() is None for p in started):
            return
        import psutil

        found: list[psutil.Process] = []
        for popen in started:
            if popen.poll() is None:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(popen.pid)
                    found.append(proc)
                    if with_descendants:
                        found += proc.children(recursive=True)
        resume_stopped(found)

    def resume_stopped(self, names: Sequence[str]) -> None:
        """SIGCONT to each named process and its descendants that is stopped (SIGSTOP,
        Ctrl-Z), after a stop signal was passed to it: stopped, it acts on none, and
        ``portpool stop`` of a suspended ``run``'s command timed out. Raises nothing."""
        procs = [self.children[name] for name in names if name in self.children]
        self._resume_stopped(procs, with_descendants=True)

    def stop_service(self, name: str) -> None:
        """Stop the process group of service ``name`` (SIGTERM, ``grace_s``, SIGKILL)
        and reap it: a rolling restart's stop of one service."""
        proc = self.children.get(name)
        if proc is None or proc.poll() is not None:
            return
        self.send(signal.SIGTERM, [name])
        self._resume_stopped([proc], with_descendants=True)
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self.grace_over(signal.SIGTERM, [proc.pid])  # said, as a stop's SIGKILL is
            self.send(_SIGKILL, [name])
            proc.wait()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every process we started, with its whole tree: ``signum`` once to each
        group and to each descendant outside those groups (also to one forked while
        stopping), up to ``grace_s`` to exit, then SIGKILL for what is left. Returns
        when all of it is gone. Once a stop saw all of it gone, a later call (the
        instance's release after ``run``/``up`` stopped) returns at once: nothing can
        become ours again, and each call scanned every process of the host twice."""
        with self._spawn_lock:
            self._stopping = True
            self._done.set()  # keepers stop restarting
            # A start under way returns once its program runs (or failed to), counted in
            # ``children``. Bounded: an exec hung on a dead mount (the scan finds it).
            self._spawned.wait_for(lambda: self._spawning == 0, timeout=_START_WAIT_S)
            if self._all_gone:
                return
        groups = {p.pid for n, p in self.children.items() if n in self._groups and p.poll() is None}
        self.send(signum)
        signalled: set[tuple[int, float]] = set()
        deadline = time.monotonic() + self.grace_s
        kill = gone = False
        quiet = 0  # scans in a row that found nothing of ours left
        for step in range(100_000):  # bounded; ends at the deadline or when all are gone
            self._reap()
            # Before the scan: a process reaped by then had its orphans re-parented to
            # us already, so the scan finds them. A process that exits during the scan
            # hands its children to us unseen: only a second empty scan says all gone
            # (a service's orphan started while stopping outlived up, 1 run in 5).
            exited = all(p.poll() is not None for p in self.children.values())
            alive = [p for p in self._tree() if running(p)]
            if not kill:
                # After the stop signal (sent to the groups above, to the rest below).
                self._resume_stopped(list(self.children.values()))
            if alive:
                import psutil  # loaded by _tree, which found them (none: not loaded at all)
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
            if alive and not kill:
                resume_stopped(alive)
            quiet = quiet + 1 if not alive and exited else 0
            if quiet and self.adopt and not has_children():
                quiet = 2  # a subreaper with no child at all has no descendant left
            if quiet >= 2:
                gone = True
                break
            if not kill and time.monotonic() >= deadline:
                kill = True
                started = [c.pid for c in self.children.values() if c.poll() is None]
                if started or alive:  # with a grace of 0 s all may be gone: no warning
                    self.grace_over(signum, started + [p.pid for p in alive])
                self.send(_SIGKILL)
                deadline = time.monotonic() + 10.0
            elif kill and time.monotonic() >= deadline:
                break  # unkillable (uninterruptible sleep): give up waiting, not hang
            time.sleep(backoff_s(0.002, 0.05, step))  # most services exit within ms
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        self._reap()
        for thread in self._threads:
            thread.join(timeout=2)
        self._all_gone = gone

    def grace_over(self, signum: int, pids: list[int]) -> None:
        """Warn of stop's SIGKILL to ``pids`` still running ``grace_s`` after ``signum``."""
        named = [f"pid {p} ({process_name(p) or '?'})" for p in pids]
        log.warning("%s", grace_over_words(self.grace_s, signum, named))

    def lingering(self, timeout_s: float) -> list[str]:
        """Ports of the instance still listened on by a process other than us, waited
        for up to ``timeout_s``: "port P is still held by pid X (name)"; [] when free.
        Closes the leases' sockets first (the locks stay until release)."""
        inodes = set()  # ours wherever they went (a service may hand one out of our tree)
        for lease in self.instance.leases.values():
            inode = lease.socket_inode
            if inode is not None:
                inodes.add(inode)
            lease.close_socket()
        deadline = time.monotonic() + timeout_s
        while True:
            held = held_ports(
                self.instance,
                descendants_only=self.subreaper,
                lease_inodes=inodes,
                roots=self.own_pids,
            )
            if not held or time.monotonic() >= deadline:
                return held
            time.sleep(0.05)
