"""``portpool up``: every service of a layout, held until a signal, a failure or a shield trip.

``run_up`` acquires an instance, starts its services through a ``ServiceSupervisor``
(``portpool._services``), turns each stop signal into the run's end (``kill -HUP``
into a rolling restart), and on the way out stops every process and releases
everything. A service's failure ends the run with ``ServiceExited`` (exit code 5).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from portpool._handover import handed_over
from portpool._launch import DEFAULT_GRACE_S, check_grace, descriptors_named
from portpool._outcome import Outcome
from portpool._output import STOPPING_SAY_WAIT_S
from portpool._platform import ReceivedSignal, controlling_terminal_alive, passed_signals
from portpool._programs import check_commands

__all__ = ["run_up"]


if TYPE_CHECKING:
    from portpool.instance import Instance
    from portpool.layout import Layout


def _stop_with(signum: int) -> int:
    # A hangup means the terminal is gone: stop services, do not make them reload.
    return signal.SIGTERM if signum == getattr(signal, "SIGHUP", -1) else signum


def _descriptors_needed(layout: Layout) -> int:
    """About how many fds ``up`` holds: the instance's, and per started service its
    output pipe, and a start's pipes for a moment."""
    return layout.descriptors_needed + 3 * sum(1 for s in layout.services if s.command)


def run_up(
    layout: Layout,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    number: int | None = None,
    out: IO[str] | None = None,
    on_up: Callable[[Instance, dict[str, int]], None] | None = None,
    announce: Callable[[Instance], None] | None = None,
    whole_tree: bool = False,
) -> Outcome:
    """``portpool up``: start an instance of ``layout`` and every service that has a
    command, each in its own process group, in dependency order (a service starts once
    what it depends on is ready); restart them by their ``restart`` policy on the same
    sockets; hold them until a signal, a service's failure or a shield trip, then stop
    every process they started and release everything.

    Main thread only (takes over the stop signals for the call). A stop signal is
    passed to the services once (SIGINT stays SIGINT), then ``grace_s``, then SIGKILL;
    USR1/USR2 and the other signals of ``passed_signals`` (WINCH, ALRM, ...) are passed
    on without stopping; SIGHUP sent by a process (``kill -HUP``)
    restarts every service in dependency order on the same sockets
    (one more is queued while one runs or services start), while a terminal's hangup
    stops. ``announce(instance)`` runs as soon as the instance is acquired, before any
    service starts (so its ports are said also when a start then fails); ``on_up`` runs
    once every service is ready; ``number`` pins the instance number. Returns the
    Outcome: code 0 after SIGTERM; ``signum`` set when the caller should die of that
    signal (SIGINT, SIGQUIT, a terminal's SIGHUP); ``lingering`` ports something still
    held after the stop. Raises, after stopping everything and releasing, ShieldTripped
    (exit code 4) when a lease or the slot stopped being ours, ServiceExited (exit code
    5) when a service exited and was not restarted, gave up after too many restarts
    without making progress, could not start, or was not ready in time; raises
    LayoutError (a command cannot be executed; nothing started), UsageError (not
    called from the main thread, ``grace_s`` not 0 or more seconds), TypeError
    (``layout`` no Layout), ResourceLimit (out of file descriptors, with about
    how many the layout needs), Interrupted,
    StartError, StateDirError.

    ``whole_tree``: this process starts nothing but the services (the ``portpool``
    command): on Linux it becomes a child subreaper, so what a service started through
    a double fork or ``setsid`` stays in its tree and is stopped with it, and every
    child of this process counts as the services'. False (the default, for a program
    calling the library, which may have children of its own): only the services and
    their descendants count; no child of the caller is ever signalled or reaped, and
    the process's subreaper flag is left alone.
    """
    from portpool._platform import become_subreaper
    from portpool._relay import SignalScope
    from portpool._services import ServiceSupervisor  # its keepers and probes: up only
    from portpool.errors import ServiceExited
    from portpool.instance import start_instance
    from portpool.layout import require_layout

    grace_s = check_grace(grace_s)
    check_commands(require_layout(layout))
    stop_signal: list[int] = []
    relayed_only = {getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2") if hasattr(signal, n)}
    relayed_only.update(passed_signals())  # WINCH, ALRM, ...: passed on, as USR1
    hangup = getattr(signal, "SIGHUP", None)
    resize = getattr(signal, "SIGWINCH", None)
    # A closed terminal reaches us as the kernel's SIGHUP, or as a shell passing its own
    # on (an ordinary signal from the shell's pid): the terminal tells the two apart.
    had_terminal = controlling_terminal_alive()
    saying_up = threading.Lock()  # "is up" and "stopping on ...": one, then the other
    with descriptors_named(_descriptors_needed(layout)), SignalScope() as scope:
        subreaper = whole_tree and become_subreaper()
        instance = start_instance(layout, number=number, heartbeat=False)
        try:
            if announce is not None:
                announce(instance)
            scope.block()
            scope.check()
            supervisor = ServiceSupervisor(
                instance, grace_s=grace_s, out=out, subreaper=subreaper, adopt=whole_tree
            )
            instance.on_release(supervisor.stop)

            def on_signal(received: ReceivedSignal) -> None:
                signum = received.signum
                if signum in relayed_only:
                    # A terminal resized: the services are not in it, and nginx or httpd
                    # take SIGWINCH for "stop your workers gracefully". kill -WINCH passes.
                    resized = signum == resize and (
                        received.from_kernel or not received.sender_known
                    )
                    if not resized:
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
                    with saying_up:  # never "is up" after this line
                        # Said now, not once all is stopped: a service may take its grace.
                        # Not waited for: an output blocked by a reader that does not
                        # read (a full pipe, Ctrl-S) kept SIGTERM and `stop` from acting.
                        supervisor.say(f"portpool: stopping on {name}", wait_s=STOPPING_SAY_WAIT_S)
                        code = 0 if signum == signal.SIGTERM else 128 + signum
                        kept = None if signum == signal.SIGTERM else signum
                        supervisor.finish(Outcome(code, f"stopping on {name}", kept))

            scope.relay(on_signal)
            supervisor.start_services(should_stop=lambda: supervisor.finishing)
            if not supervisor.finishing:
                instance.start_heartbeat()
                instance.start_shield(on_lost=supervisor.shield_lost, own_pids=supervisor.own_pids)
                # A stop asked for as the last service got ready: "stopping on SIGTERM"
                # was followed by "is up" (and up --detach read it as up).
                ready = supervisor.wait_ready()  # not under the lock: a stop must get in
                if ready and handed_over(layout, instance.leases.values()):
                    # A port handed over by number can be taken on an address its service
                    # did not bind (localhost's other loopback): "is up" was said, then
                    # the shield's next check stopped the instance. Checked before it.
                    instance.verify_all(trip=True)
                with saying_up:
                    if ready and not supervisor.finishing:
                        if on_up is not None:
                            pids = {n: k.pid for n, k in supervisor.keepers.items() if k.pid}
                            on_up(instance, pids)
                        supervisor.is_up.set()
            outcome = supervisor.wait()
            supervisor.stop(stop_signal[0] if stop_signal else signal.SIGTERM)
            outcome.lingering = supervisor.lingering(grace_s)
        finally:
            instance.release()
    outcome.raise_if_tripped()
    failure = outcome.failure
    if failure is not None and failure.limit is not None:
        raise failure.limit.for_need(_descriptors_needed(layout)) from None
    if failure is not None:
        raise ServiceExited(
            failure.service,
            failure.returncode,
            outcome.message,
            reason=failure.kind,
            lingering=outcome.lingering,
        )
    return outcome
