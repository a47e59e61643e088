"""Process primitives for supervisors: subreaper, process groups, signals with senders.

Only what ``run`` and ``up`` need to be transparent to signals and to stop every
process they started: a child subreaper (Linux), signalling a whole process group,
reaping adopted orphans, and receiving signals together with who sent them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Container, Iterable
from types import FrameType
from typing import TYPE_CHECKING

from portpool._dataclass import dataclass

if TYPE_CHECKING:
    import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_F_SETPIPE_SZ = 1031
# si_code of a signal the kernel sent: a terminal's Ctrl-C, Ctrl-\, hangup, SIGWINCH.
_SI_KERNEL = 0x80
_SIGCONT: int | None = getattr(signal, "SIGCONT", None)  # none on Windows


@dataclass(frozen=True)
class ReceivedSignal:
    """One signal received: its number, the sending pid (None where unknown) and whether
    the kernel sent it (a terminal signals its whole foreground process group)."""

    signum: int
    sender: int | None = None
    from_kernel: bool = False
    sender_known: bool = True  # False where the OS gave no siginfo (handlers only)
    to_group: bool = False  # a process sent it to our whole group (``GroupWitness``)
    # It came before the command existed: whoever sent it, the command did not get it.
    before_command: bool = False


def _prctl() -> Callable[..., int] | None:
    """The C library's ``prctl`` (Linux), or None where there is none."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to us instead of init (Linux
    ``PR_SET_CHILD_SUBREAPER``), so a service's double-forked or ``setsid`` children
    stay ours to stop. False where the OS has no such thing."""
    prctl = _prctl()
    return prctl is not None and int(prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def is_subreaper() -> bool:
    """Whether this process adopts its orphaned descendants (``become_subreaper`` took).
    False where the OS has no such thing or will not say."""
    prctl = _prctl()
    if prctl is None:
        return False
    import ctypes

    flag = ctypes.c_int(0)
    return int(prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)) == 0 and flag.value != 0


def parent_death_setter() -> Callable[[int], bool] | None:
    """A function ``set(signum) -> ok`` that asks the kernel to send the calling process
    ``signum`` when the thread that forked it ends (Linux ``PR_SET_PDEATHSIG``), or None
    where the OS has no such thing. Bound here, before a fork, so that the forked child
    calls it without loading a library (a dlopen there could wait on a lock)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def set_signal(signum: int) -> bool:
        return int(prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0

    return set_signal


def open_fds() -> list[int]:
    """The calling process's open file descriptors, from ``/proc/self/fd`` (Linux) or
    ``/dev/fd`` (macOS, BSD); where neither lists them, every number below the
    descriptor limit (capped at 65,536: a loop over a limit of millions takes seconds)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(listing))
        except (OSError, ValueError):
            continue
    from portpool._platform import open_files_limit

    soft = open_files_limit() or 65536
    return list(range(min(soft, 65536)))


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False if the group is gone.

    Callers pass only a group whose leader they started and have not reaped yet, so
    the group id cannot have been reused by someone else's group.
    """
    if sys.platform == "win32":
        return False
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def process_group(pid: int) -> int | None:
    """The process group of ``pid``, None if it is gone (or unknown on Windows)."""
    if sys.platform == "win32":
        return None
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def stopped_by(pid: int) -> int | None:
    """The job-control signal (SIGTSTP, SIGTTIN, SIGTTOU) that ``pid``, a child of ours
    not reaped yet, is stopped by now; None if it runs, is gone or was stopped by
    another signal. The stop is left to be waited for by others (WNOWAIT)."""
    if sys.platform == "win32" or not hasattr(os, "waitid"):
        return None
    try:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_code != os.CLD_STOPPED:
        return None
    job_stops = {signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
    return info.si_status if info.si_status in job_stops else None


def reap_adopted(keep: Container[int]) -> list[int]:
    """Reap exited children whose pid is not in ``keep`` (orphans adopted as a
    subreaper); children in ``keep`` are left for their ``Popen`` to reap. Returns the
    reaped pids."""
    if sys.platform == "win32" or not hasattr(os, "waitid"):
        return []
    reaped: list[int] = []
    for _ in range(1000):  # bounded: each round reaps one exited child
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        if info is None or info.si_pid in keep:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)
    return reaped


def resume_stopped(procs: Iterable[psutil.Process]) -> None:
    """SIGCONT to each of ``procs`` that is stopped (SIGSTOP, SIGTSTP), after it was
    sent its stop signal, as systemd does: a stopped process acts on no signal but
    SIGKILL, so it sat through the grace period, its SIGTERM handler never run, and
    was killed. A process being traced is left to its debugger. Raises nothing."""
    if _SIGCONT is None:
        return
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(_SIGCONT)  # psutil checks it is still the same process


def has_children() -> bool:
    """Whether this process has a child, running or exited and not yet reaped; True
    where the OS cannot say. One system call, nothing reaped (``WNOWAIT``): a child
    subreaper without children has no living descendant either, so ``run`` and ``up``
    skip a scan of every process of the host (and loading psutil) when all are gone."""
    if sys.platform == "win32" or not hasattr(os, "waitid"):
        return True
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Best effort: give the pipe at ``fd`` a ``size``-byte buffer (Linux)."""
    if sys.platform == "linux":
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, size)


def stop_signals() -> list[int]:
    """The signals ``run`` and ``up`` take over and relay: INT, TERM, HUP, QUIT, USR1,
    USR2 (those the OS has)."""
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    return [int(getattr(signal, n)) for n in names if hasattr(signal, n)]


def passed_signals() -> list[int]:
    """The other signals ``run`` and ``up`` take over and pass on, as after ``exec``:
    WINCH, ALRM, VTALRM, PROF, IO, PWR and the real-time ones (those the OS has). Left
    to their default action, ``kill -ALRM`` ended portpool without releasing (its
    record stayed, the command got SIGTERM instead) and ``kill -WINCH`` was dropped.
    Not SIGURG (it wakes our reader thread), nor what the kernel sends a process for
    its own doing (SIGSEGV, SIGPIPE, SIGXCPU, ...) or job control."""
    names = ("SIGWINCH", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR")
    found = [int(getattr(signal, n)) for n in names if hasattr(signal, n)]
    low, high = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
    if low is not None and high is not None:
        found += range(int(low), int(high) + 1)
    return list(dict.fromkeys(found))


def ignored_by_default(signum: int) -> bool:
    """Whether ``signum``'s default action is to do nothing (SIGWINCH, SIGURG, SIGCHLD,
    SIGCONT): such a signal never interrupts a start-up."""
    names = ("SIGWINCH", "SIGURG", "SIGCHLD", "SIGCONT")
    return signum in {int(getattr(signal, n)) for n in names if hasattr(signal, n)}


class SignalInbox:
    """Signals received by the process, with their sender where the OS tells.

    Where ``sigtimedwait`` exists, ``block()`` blocks the signals in the calling thread
    (and so in every thread it starts later) and ``take()`` reads them with their
    ``siginfo``. Elsewhere Python handlers queue them, without a sender. Handlers are
    queueing handlers in both cases, for threads that were started before ``block()``.
    """

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = list(signals)
        self._queue: queue.SimpleQueue[ReceivedSignal | None] = queue.SimpleQueue()
        self._blocked = False
        # SIGURG (ignored by default) wakes a reader thread early, by pthread_kill.
        self._wake = getattr(signal, "SIGURG", None)

    def _queue_it(self, signum: int, frame: FrameType | None) -> None:
        self._queue.put(ReceivedSignal(signum, sender_known=False))

    def install(self) -> None:
        """Queue each signal from now on (main thread only)."""
        for signum in self.signals:
            signal.signal(signum, self._queue_it)

    def block(self) -> None:
        """Block the signals in this thread (and threads started later), where they can
        be read with their sender."""
        if sys.platform != "win32" and hasattr(signal, "sigtimedwait"):
            signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
            self._blocked = True

    def unblock(self) -> None:
        if self._blocked and sys.platform != "win32":
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
            self._blocked = False

    def prepare_reader(self) -> None:
        """Call first in the thread that will ``take()``: lets ``wake()`` reach it."""
        if self._blocked and self._wake is not None and sys.platform != "win32":
            signal.pthread_sigmask(signal.SIG_BLOCK, [self._wake])

    def wake(self, reader: int | None) -> None:
        """Make a ``take()`` running in thread ``reader`` (an ident) return None now."""
        self._queue.put(None)
        if sys.platform != "win32" and self._blocked and reader and self._wake is not None:
            with contextlib.suppress(OSError, ProcessLookupError):
                signal.pthread_kill(reader, self._wake)

    def pending(self) -> list[int]:
        """Signals sent to us and not yet read."""
        if self._blocked and sys.platform != "win32":
            return sorted(int(s) for s in signal.sigpending() if int(s) in self.signals)
        return []

    def take(self, timeout_s: float) -> ReceivedSignal | None:
        """The next signal, or None after ``timeout_s``."""
        with contextlib.suppress(queue.Empty):
            return self._queue.get_nowait()
        if self._blocked and sys.platform != "win32" and hasattr(signal, "sigtimedwait"):
            wake = [self._wake] if self._wake is not None else []
            info = signal.sigtimedwait([*self.signals, *wake], timeout_s)
            # A wake-up, or (after a SIGSTOP/SIGCONT) the uninitialised siginfo that
            # CPython 3.11 can return: nothing to report.
            if info is None or info.si_signo not in self.signals:
                return None
            kernel = info.si_code == _SI_KERNEL
            return ReceivedSignal(info.si_signo, None if kernel else info.si_pid, kernel)
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None


_WITNESS_WAIT_S = 2.0
# The witness: keeps the signals in argv blocked (as inherited) and, for each byte N
# read from stdin, answers b"1" if signal N was pending for it (taking one) or b"0".
_WITNESS = """
import os, signal, sys
wanted = [int(s) for s in sys.argv[1:]]
signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
while True:
    asked = os.read(0, 1)
    if not asked:
        break
    got = asked[0] in wanted and signal.sigtimedwait([asked[0]], 0) is not None
    os.write(1, b"1" if got else b"0")
"""


class GroupWitness:
    """A small process in our process group that tells whether a signal we received
    was sent to the whole group (``kill 0`` by a script, a shell passing a hangup to
    its job) or to us alone (``kill PID``): the kernel queues a group's signal to every
    member in the same call, so the witness has it pending by the time we read ours.

    For ``run`` sharing its group with the command: a group's signal reached the
    command already, and passing it on gave it two. Start it with the signals blocked
    in the calling thread (it inherits the block, so none ends it before it runs).
    Linux and other systems with ``sigtimedwait``; ``start()`` returns None elsewhere
    or when it cannot start.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._lock = threading.Lock()

    @classmethod
    def start(cls, signals: Iterable[int]) -> GroupWitness | None:
        """Start a witness of ``signals`` in our group; None where it cannot be."""
        if sys.platform == "win32" or not hasattr(signal, "sigtimedwait"):
            return None
        argv = [sys.executable, "-I", "-S", "-c", _WITNESS, *(str(int(s)) for s in signals)]
        # Popen may vfork: a Ctrl-Z reaching the child before its exec stopped it, and us
        # with it, for good (run hung in vfork, the shell never saw the job stop). The
        # terminal's stop signals wait, blocked, until the child runs the witness.
        stops = {getattr(signal, n) for n in ("SIGTSTP", "SIGTTIN", "SIGTTOU")}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd="/", env={}
            )
        except OSError:
            return None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def saw(self, signum: int) -> bool | None:
        """Whether the witness got ``signum`` too (one is taken from its pending
        signals): True, sent to the group; False, to us alone; None when it cannot
        tell (gone). Call for every signal received, so none stays pending for it."""
        import select

        if not 0 < signum < 256:
            return None
        with self._lock:
            stdin, stdout = self._proc.stdin, self._proc.stdout
            if stdin is None or stdout is None or stdin.closed:
                return None
            try:
                stdin.write(bytes([signum]))
                # Stopped alone (kill -STOP) it must not hold up every signal after.
                if not select.select([stdout], [], [], _WITNESS_WAIT_S)[0]:
                    self._broken()
                    return None
                answer = stdout.read(1)
            except (OSError, ValueError):
                return None
        return {b"1": True, b"0": False}.get(answer)

    def _broken(self) -> None:
        # A late answer would be taken for the next question's: ask no more.
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        """End the witness and reap it. Killed, not asked: still starting, it made a
        quick ``run`` wait for its start-up (it is ours, and not reaped yet)."""
        with self._lock:
            self._broken()
        with contextlib.suppress(OSError):
            self._proc.kill()
        self._proc.wait()
