"""Signals of ``run`` and ``up``: interrupt the start-up, then relay each signal once.

Part of the supervisor layer. ``SignalScope`` takes over the stop signals of the
process for the duration of ``run``/``up`` (main thread only) and puts them back after:

- while starting, the first signal raises ``Interrupted`` in the main thread, so
  whatever was acquired is released and nothing starts (a Ctrl-C typed while the pool
  was searched used to be replayed to the command, which then ran to its end);
- from ``relay()`` on, a thread reads each signal with its sender and hands it to a
  callback once. A signal the kernel sent (a terminal's Ctrl-C reaches its whole
  foreground process group) is flagged, so the callback can skip a command that got it
  already. The same signal from the same sender within ``DUPLICATE_S`` of the first
  is one request: ``timeout`` signals its child and then its whole group; but for
  real-time signals, which the kernel queues, so each one sent counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import NoReturn

from portpool._platform import (
    GroupWitness,
    ReceivedSignal,
    SignalInbox,
    ignored_by_default,
    passed_signals,
    stop_signals,
)
from portpool.errors import Interrupted, UsageError

# timeout's two sends are microseconds apart; a person's or a script's are not (0.25 s
# dropped `kill -USR1` sent every 0.1 s, and a window that moved with each copy dropped
# every one after the first).
DUPLICATE_S = 0.05
# The first real-time signal: these are queued, each one sent is delivered.
_REAL_TIME = int(getattr(signal, "SIGRTMIN", 1 << 16))


class SignalScope:
    """Own the stop signals (INT, TERM, HUP, QUIT, USR1, USR2) and the other signals
    passed on (``passed_signals``: WINCH, ALRM, ...) for one ``run``/``up``, and
    SIGCHLD's default action where the caller ignored it. While starting, a signal
    whose default action does nothing (WINCH: a terminal resized) is dropped, as it
    would be by a command not started yet; any other one interrupts.

    Use as a context manager in the main thread, before any other thread starts: the
    signals are blocked for reading with their sender, and threads inherit the block.
    """

    active: SignalScope | None = None  # the one in use (main thread only: one at a time)

    def __init__(self) -> None:
        # A signal the caller ignored (`nohup`, `cmd &` in a script) stays ignored, for us
        # and, through exec, for every program we start: as a shell leaves it.
        self.signals = [s for s in stop_signals() if signal.getsignal(s) is not signal.SIG_IGN]
        # The others only where the caller has no handler of its own: a program calling
        # the library may time itself with SIGALRM (pytest-timeout does).
        self.signals += [s for s in passed_signals() if signal.getsignal(s) is signal.SIG_DFL]
        self._inbox = SignalInbox(self.signals)
        self._old: dict[int, object] = {}
        self._interrupted: int | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._last: dict[tuple[int, int], float] = {}

    def __enter__(self) -> SignalScope:
        if threading.current_thread() is not threading.main_thread():
            # Python lets only the main thread set handlers: say so, not "ValueError".
            raise UsageError(
                "run_command and run_up take over the stop signals: call them from the main thread"
            )
        for signum in self.signals:
            self._old[signum] = signal.getsignal(signum)
            signal.signal(signum, self._interrupt)
        SignalScope.active = self
        chld = getattr(signal, "SIGCHLD", None)
        if chld is not None and signal.getsignal(chld) is signal.SIG_IGN:
            # Ignored, the kernel reaps our children itself and every exit status reads
            # as 0 (`run` exited 0 for a command that exited 3): default while we run,
            # for us and for the programs we start.
            self._old[chld] = signal.SIG_IGN
            signal.signal(chld, signal.SIG_DFL)
        return self

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        # Raise once: a second signal must not break the clean-up of the first.
        if self._interrupted is None and not ignored_by_default(signum):
            self._interrupted = signum
            # Never inside the import machinery: CPython prints and drops what its
            # callbacks raise ("Exception ignored in ... _get_module_lock", a traceback
            # on a Ctrl-C), and a raise mid-import can leave a module half made. Kept
            # for ``check``, which raises it before the command starts.
            if frame is None or not frame.f_code.co_filename.startswith("<frozen importlib"):
                raise Interrupted(signum)

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop signal arrived and was not read yet (call
        with the signals blocked, right before starting the command)."""
        for _ in range(len(self.signals) + 1):  # bounded: each signal is pending once
            if self._interrupted is not None:
                break
            received = self._inbox.take(0)
            if received is None:
                break
            if not ignored_by_default(received.signum):
                self._interrupted = received.signum
        if self._interrupted is not None:
            raise Interrupted(self._interrupted)

    def take_pending(self) -> list[ReceivedSignal]:
        """Every signal that arrived and was not read yet, in order, taken (call with the
        signals blocked). Raises nothing."""
        taken: list[ReceivedSignal] = []
        for _ in range(4 * (len(self.signals) + 1)):  # bounded: each is pending once
            received = self._inbox.take(0)
            if received is None:
                break
            taken.append(received)
        return taken

    def block(self) -> None:
        """Block the signals from now on in this thread and the threads it starts; they
        stay pending for ``check()`` or ``relay()``."""
        self._inbox.block()
        # Signals that arrive on threads started before the block are queued, not raised.
        self._inbox.install()

    def relay(
        self,
        callback: Callable[[ReceivedSignal], None],
        witness: GroupWitness | None = None,
        idle: tuple[Callable[[], None], float] | None = None,
        early: Sequence[ReceivedSignal] = (),
    ) -> None:
        """From now on hand every signal to ``callback`` (on a thread), duplicates
        dropped. With a ``witness``, each one is marked ``to_group`` when it was sent
        to our whole group (the witness is asked of every one, duplicates too, so none
        stays pending for it). ``idle``: (a function, seconds) called on the same thread
        whenever no signal came for that long, so that what it does comes after every
        signal already received (job control: a command resumed only after the
        SIGTERM that came with the SIGCONT was passed on). ``early``: signals taken
        (``take_pending``) before the command existed, handed first and marked
        ``before_command``: the command cannot have had them (the witness's copy is
        taken), even a terminal's Ctrl-C."""
        wait_s = 0.2 if idle is None else idle[1]

        def loop() -> None:
            self._inbox.prepare_reader()
            for before in early:
                if witness is not None:
                    witness.saw(before.signum)
                if not self._duplicate(before):
                    callback(dataclasses.replace(before, before_command=True))
            while not self._closing.is_set():
                received = self._inbox.take(wait_s)
                if received is None and idle is not None:
                    # Once more, at once: continued after a stop, the wait can return
                    # nothing though a signal waits (`kill %1`: SIGTERM, then SIGCONT),
                    # and the idle step resumed the command before it got its SIGTERM.
                    received = self._inbox.take(0)
                if received is None:
                    if idle is not None and not self._closing.is_set():
                        idle[0]()
                    continue
                if witness is not None and witness.saw(received.signum):
                    received = dataclasses.replace(received, to_group=True)
                if not self._duplicate(received):
                    callback(received)

        self._thread = threading.Thread(target=loop, name="portpool-signals", daemon=True)
        self._thread.start()

    def _duplicate(self, received: ReceivedSignal) -> bool:
        if received.sender is None or received.signum >= _REAL_TIME:
            return False  # the kernel queues each real-time signal sent: none is a copy
        key = (received.signum, received.sender)
        now = time.monotonic()
        first = self._last.get(key)
        if first is not None and now - first < DUPLICATE_S:
            return True  # measured from the first of the burst, not the last copy
        self._last[key] = now
        return False

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        SignalScope.active = None
        self._closing.set()
        if self._thread is not None:
            self._inbox.wake(self._thread.ident)
            self._thread.join(timeout=2)
        # Back to the old handlers first, then unblock: a signal still pending then
        # meets the handler the caller had (for the CLI: the default action).
        for signum, old in self._old.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        self._inbox.unblock()


def die_of(signum: int) -> NoReturn:
    """End this process by ``signum`` with its default action, as the command did, so
    a calling shell, ``make`` or ``xargs`` stops too (Cracauer's "proper handling of
    SIGINT"); exit 128+N where the signal does not end a process by default."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if sys.platform != "win32":
        import resource

        # SIGQUIT's or SIGSEGV's default action dumps core: not of portpool, which is fine.
        with contextlib.suppress(OSError, ValueError):
            hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
            resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
        if signum != signal.SIGKILL:  # SIGKILL's action cannot be set, nor blocked
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        # Still alive: a signal whose default is not to end the process.
    os._exit(128 + signum)


def _scope_signals() -> list[int]:
    # Every signal a SignalScope may turn into Interrupted: SIGALRM's was not held.
    return [*stop_signals(), *passed_signals()]


def hold_stop_signals() -> set[int | signal.Signals] | None:
    """Block the signals a SignalScope acts on in this thread (POSIX): one that comes
    stays pending until ``let_signals_in``. Returns the mask to restore, None where there
    are no masks."""
    if sys.platform == "win32":
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _scope_signals())


def let_held_signals_in() -> None:
    """Unblock what ``hold_stop_signals`` blocked, in a process started while they were
    held (it inherited the mask). Nothing off POSIX."""
    if sys.platform != "win32":
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _scope_signals())


def raise_if_interrupted() -> None:
    """Raise Interrupted if this process's SignalScope took a stop signal it could not
    raise then (it came during an import), for a caller that never calls ``check``:
    ``up --detach`` went on and printed "is up" after a Ctrl-C, and ignored the next."""
    scope = SignalScope.active
    if scope is not None and scope._interrupted is not None:
        raise Interrupted(scope._interrupted)


def let_signals_in(mask: set[int | signal.Signals] | None) -> None:
    """Restore ``mask``: a stop signal held meanwhile is acted on now (a SignalScope's
    handler raises Interrupted here). Nothing for None."""
    if mask is not None and sys.platform != "win32":
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
