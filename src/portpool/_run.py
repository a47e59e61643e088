"""``portpool run``: one command on a fresh instance, its signals relayed, its exit status returned.

``run_command`` acquires an instance, starts the command with the instance's
environment (and with ``fds`` its sockets at fds 3..), relays each stop signal to it
once, stops whatever it left running when it exits and releases everything. The
command's exit status, or the signal it died of, is the caller's to pass on.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from portpool._job import JOB_POLL_S, JobWatch
from portpool._launch import (
    DEFAULT_GRACE_S,
    base_environment,
    check_grace,
    descriptors_named,
    exit_status,
)
from portpool._outcome import Outcome
from portpool._platform import (
    GroupWitness,
    ReceivedSignal,
    controlling_terminal_alive,
    in_terminal_foreground,
    is_session_leader,
    process_group,
    signal_group,
)
from portpool._processes import Supervisor
from portpool._programs import unexecutable

__all__ = ["relay_to", "run_command"]

if TYPE_CHECKING:
    from portpool.instance import Instance
    from portpool.layout import Layout


# Standard signals are not queued: the kernel merges one sent while another is pending.
_SIGRTMIN = getattr(signal, "SIGRTMIN", 1 << 30)  # realtime ones are queued: never merged
_MERGE_S = 0.02  # `timeout`'s two are microseconds apart; a sender meaning two waits longer


def relay_to(supervisor: Supervisor, name: str, shared_group: bool) -> Callable[[Any], None]:
    """The signal callback of ``run``: pass each signal to the command once. A signal
    the kernel sent to our whole group (a terminal's Ctrl-C) reached it already, and
    so did one a process sent to the group (``kill 0`` in a script: ``to_group``)."""

    terminal_keys = {getattr(signal, n, None) for n in ("SIGINT", "SIGQUIT")}
    ending = {getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")}
    hangup = getattr(signal, "SIGHUP", None)
    # A terminal's hangup goes to the session's leader alone: leading it (ssh -t, tmux,
    # xterm -e), we are the only one to hear it, and the command kept running.
    alone = {hangup} if is_session_leader() else set()
    # Else the shell that leads it passes its hangup on to its job, our whole group: the
    # command got that one too (a window closed on `run` gave it two). The terminal
    # tells it from a `kill -HUP`, as for `up`.
    had_terminal = shared_group and controlling_terminal_alive()
    last_sent: dict[int, tuple[int, float]] = {}  # signum -> (sender, monotonic time)

    def repeated(received: ReceivedSignal) -> bool:
        """The same standard signal from the same process a moment after the last one:
        one the kernel would have merged into it, as it merges a pending one. `timeout`
        signals its child, then its own group (ours): the command got two, 1 run in 4."""
        sender, now = received.sender, time.monotonic()
        if sender is None or received.from_kernel or received.signum >= _SIGRTMIN:
            return False
        before = last_sent.get(received.signum)
        last_sent[received.signum] = (sender, now)
        return before is not None and before[0] == sender and now - before[1] < _MERGE_S

    def group_left_for() -> int | None:
        """The command's process group once it left ours (``timeout``, ``setsid``, a
        program's own setpgid), else None: a signal sent to our group no longer reaches
        it, and a Ctrl-C that reached our group alone was lost (it ran on to its end)."""
        proc = supervisor.children.get(name)
        group = None if proc is None else process_group(proc.pid)
        return None if group in (None, process_group(os.getpid())) else group

    def relay(received: ReceivedSignal) -> None:
        if received.before_command:
            # Typed or sent before the command existed: it got none (a Ctrl-C typed
            # as it started was lost, 1 in 20).
            supervisor.send(received.signum, [name])
            return
        left = group_left_for() if shared_group else None
        shared = shared_group and left is None
        if shared and received.from_kernel and received.signum not in alone:
            return
        if shared and received.to_group:
            return  # sent to our whole group by a process: the command got it too
        if (
            received.signum == hangup
            and hangup not in alone
            and had_terminal
            and not controlling_terminal_alive()
        ):
            return
        if shared and not received.sender_known and received.signum in terminal_keys:
            return  # no siginfo here (macOS): take Ctrl-C / Ctrl-\ for the terminal's
        if repeated(received):
            return
        proc = supervisor.children.get(name)
        meant_for_group = received.from_kernel or received.to_group
        if left is not None and meant_for_group and proc is not None and proc.pid == left:
            # A Ctrl-C to the group the command leads now, as the terminal sends it: to
            # the command alone, `setsid sh -c 'prog; echo'` ran prog to its end.
            if proc.poll() is None:  # not reaped: the group id is still its own
                signal_group(left, received.signum)
        else:
            # Outside a terminal, to the command's process group: `timeout`, a CI runner
            # or systemd signal the group of what they started, and so reach a bare
            # command's children; sent to the command alone, `sh -c 'prog; echo'` ran
            # prog to its end.
            supervisor.send(received.signum, [name])
        if received.signum in ending:
            # As `stop` resumes the process it signals: were the command exec'd, it
            # would be that process (transparency), and it acts on nothing while stopped.
            supervisor.resume_stopped([name])

    return relay


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def run_command(
    layout: Layout,
    command: Sequence[str],
    *,
    services: Sequence[str] | None = None,
    fds: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    number: int | None = None,
    announce: Callable[[Instance], None] | None = None,
    whole_tree: bool = False,
    pass_fds: Sequence[int] = (),
) -> Outcome:
    """``portpool run``: start an instance of ``layout`` with ``services`` (all when
    None), run ``command`` with its environment (and with ``fds`` its sockets at fds
    3..), and when it exits stop whatever it left running and release everything.

    Main thread only: the stop signals are taken over for the call and relayed to the
    command once each. ``number`` pins the instance number (see ``start_instance``).
    ``announce(instance)`` runs before the command starts. Returns
    the Outcome: ``code`` the command's exit status, ``signum`` the signal it died of
    (the caller should then die of it too), ``lingering`` ports something still held.
    Raises UsageError (``command`` not a non-empty list of strings, ``grace_s`` not 0
    or more seconds, a ``pass_fds`` entry that is no open descriptor above 2, or not
    called from the main thread), TypeError (``layout`` no Layout), CommandNotFound
    (nothing started; exit_code 127 or 126), Interrupted (a signal arrived before the
    command started; all released), ShieldTripped (after stopping the command),
    StartError, LayoutError, StateDirError.

    ``whole_tree``: this process starts nothing but what this call starts (the
    ``portpool`` command): on Linux it becomes a child subreaper, so what the command
    started through a double fork or ``setsid`` stays in its tree and is stopped with
    it, and every child of this process counts as the command's. False (the default,
    for a program calling the library, which may have children of its own): what the
    command left running is found among its descendants; no child of the caller is
    ever signalled or reaped, and the process's subreaper flag is left alone. With
    ``whole_tree``, a background job of a terminal (``portpool run ... &``) whose
    command is stopped by job control (it read the terminal, Ctrl-Z) stops by the same
    signal, and hands the terminal to the command when brought to the foreground.

    ``pass_fds``: file descriptors of this process (above 2) that the command gets at
    the same numbers, as after ``exec`` (``portpool run`` passes what it was started
    with: a shell's ``<(...)`` or ``5>file``, make's jobserver); with ``fds`` one at a
    socket's number (3..) is replaced by the socket.
    """
    from portpool._platform import become_subreaper
    from portpool._relay import SignalScope
    from portpool.errors import InvalidArgument, UsageError
    from portpool.instance import start_instance
    from portpool.layout import require_layout

    require_layout(layout)
    if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
        raise UsageError(f"the command is a list of strings (program, arguments), not {command!r}")
    grace_s = check_grace(grace_s)
    for fd in pass_fds:
        # A closed one failed as "cannot execute" the command (exit_code 126).
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 3 or not _is_open(fd):
            raise InvalidArgument("pass_fds", fd, "not an open file descriptor above 2")
    refused = unexecutable(command)
    if refused is not None:
        raise refused

    def exited(name: str, returncode: int) -> Outcome:
        signum = -returncode if returncode < 0 else None
        return Outcome(exit_status(returncode), signum=signum, returncode=returncode)

    with descriptors_named(layout.descriptors_needed), SignalScope() as scope:
        subreaper = whole_tree and become_subreaper()
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
            supervisor = Supervisor(
                instance, grace_s=grace_s, on_exit=exited, adopt=whole_tree, subreaper=subreaper
            )
            witnesses: list[GroupWitness | JobWatch] = []

            def close_witness() -> None:
                # Before the stop, which would wait for it (its signals stay blocked),
                # and the terminal back to our group before anything is printed.
                for w in witnesses:
                    w.close()

            instance.on_release(close_witness)
            instance.on_release(supervisor.stop)
            # The witness before the command, after the Supervisor (which would take it
            # for a child inherited through exec). Started after the command, it missed
            # a group's signal sent in its first milliseconds (`kill 0` at a script's
            # start), which the command had: passed on, the command got it twice.
            witness = GroupWitness.start(scope.signals) if shared else None
            witnesses += [witness] if witness is not None else []
            # Once more as late as can be: what came before (and while the witness
            # started) stops us, as a Ctrl-C before the command does.
            scope.check()
            # What comes from here to the fork is passed on: the command had none of it
            # (dropped as its own, a Ctrl-C typed as it started was lost, 1 in 20).
            early: list[ReceivedSignal] = []
            proc = supervisor.start_process(
                "command",
                command,
                env,
                sockets=sockets,
                own_group=not shared,
                capture=False,
                inherit_fds=pass_fds,
                before_fork=lambda: early.extend(scope.take_pending()),
            )
            job = None
            if whole_tree and not shared and controlling_terminal_alive():
                # A background job of a terminal (`run ... &`): keep it one with the
                # command's group, which a read of the terminal or Ctrl-Z stops alone.
                # Only the portpool command: a calling program is not ours to stop.
                job = JobWatch(proc)
                witnesses.append(job)
            idle = None if job is None else (job.step, JOB_POLL_S)
            scope.relay(relay_to(supervisor, "command", shared), witness, idle, early)
            instance.set_service_pids(dict.fromkeys(names, proc.pid))
            instance.start_heartbeat()
            instance.start_shield(on_lost=supervisor.shield_lost, own_pids=supervisor.own_pids)
            outcome = supervisor.wait()
            close_witness()
            supervisor.stop()
            outcome.lingering = supervisor.lingering(grace_s)
        finally:
            instance.release()
    outcome.raise_if_tripped()
    return outcome
