"""Helpers of the supervisor: starting one process, who still holds a port.

Part of the supervisor layer (run, up and their processes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from typing import IO, TYPE_CHECKING

from portpool.errors import CommandNotFound, InvalidArgument, PortPoolError

if TYPE_CHECKING:
    from portpool.instance import Instance

DEFAULT_GRACE_S = 5.0
# What portpool itself gives a program: an inherited value (from an outer `up`, or an
# `eval "$(portpool env --export)"` of another app) would name ports this instance does
# not hold, so a program sees only its own instance's.
_OURS = frozenset(
    {
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
        "PORT",
        "PORTPOOL_APP",
        "PORTPOOL_INSTANCE",
        "PORTPOOL_SERVICE",
        "PORTPOOL_SERVICES",
        "PORTPOOL_SUPERVISOR_PID",
    }
)
_OURS_PREFIX = "PORTPOOL_PORT_"


@contextlib.contextmanager
def descriptors_named(needed: int) -> Iterator[None]:
    """Out of file descriptors anywhere inside (a start, a pipe, an import) raises
    ResourceLimit saying about ``needed`` fds, as the README promises; a bare EMFILE
    ended in a traceback or a message without the count."""
    from portpool.errors import ResourceLimit
    from portpool.statedir import out_of_descriptors

    try:
        yield
    except ResourceLimit as e:
        raise e.for_need(needed) from e.__cause__
    except OSError as e:
        limit = out_of_descriptors(e)
        if limit is None:
            raise
        raise limit.for_need(needed) from e


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int) -> str:
    """The text "exit status N" or "killed by SIGNAME" for a ``Popen.returncode``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


def check_grace(grace_s: float) -> float:
    """``grace_s`` as a float if it is a number of seconds, 0 or more (not a bool), else
    InvalidArgument: a str or None ran the command, then failed as it stopped it."""
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not grace_s >= 0:
        raise InvalidArgument("grace_s", grace_s, "must be a number of seconds, 0 or more")
    return float(grace_s)


def grace_over_words(grace_s: float, signum: int, killed: Sequence[str], option: str = "") -> str:
    """What ``up`` and ``run`` say when a stop's grace is over: "still running 5 s after
    SIGTERM (--grace): SIGKILL to pid 12 (sleep)", ``option`` naming the setting."""
    name = signal.Signals(signum).name if signum in signal.valid_signals() else signum
    whom = ", ".join(killed) or "what is left"
    return f"still running {grace_s:g} s after {name}{option}: SIGKILL to {whom}"


def base_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment without the variables portpool gives (inherited socket-activation,
    ``PORT`` and ``PORTPOOL_*`` values but ``PORTPOOL_HOME``), plus ``extra`` (name ->
    value). Raises nothing."""
    env = {k: v for k, v in os.environ.items() if k not in _OURS and not k.startswith(_OURS_PREFIX)}
    env.update(extra)
    return env


def spawn(
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    sockets: Sequence[tuple[int, str]] = (),
    watch_parent: bool = False,
    own_group: bool = False,
    keep_fds: Sequence[int] = (),
    inherit_fds: Sequence[int] = (),
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    before_fork: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command``; with ``sockets`` [(fd, name)] they arrive at fds 3.. by the
    systemd protocol, with ``LISTEN_PID`` the command's own pid. ``before_fork`` is
    called right before the fork (``run`` takes the signals the command cannot have).

    ``watch_parent``: the command gets SIGTERM if we die (Linux), so a kill -9 of
    portpool never leaves it running without its leases. ``own_group``: it leads a new
    process group. ``keep_fds`` stay open in the command (a reader of its own output
    pipe, so its writes never fail once we are gone). ``inherit_fds`` reach the command
    at their own numbers, as after ``exec`` (what ``run`` was started with), but for
    those at a socket's number, which the socket replaces. The command starts with default
    signal dispositions and an empty signal mask, whatever ours are. Raises
    ResourceLimit out of file descriptors, else CommandNotFound if it cannot be started.
    """
    if not command:
        raise PortPoolError("empty command")
    targets = range(3, 3 + len(sockets))
    inherited = [fd for fd in inherit_fds if fd not in targets] if sys.platform != "win32" else []
    setup = report = None
    if sys.platform != "win32":
        try:
            from portpool._spawn import ChildSetup  # POSIX only
        except OSError as e:
            # The first start imports it, and an import opens its file: out of
            # descriptors, up of 12 services stopped with exit 5 naming _spawn.py.
            raise _not_started(command, e) from e

        report, report_w = new_pipe()
        setup = ChildSetup(
            command,
            env,
            sockets=sockets,
            keep=keep_fds,
            inherited=inherited,
            parent=os.getpid() if watch_parent else None,
            report=report_w,
        )
    # From the fork to the exec the child is a copy of us: a signal reaching it there ran
    # our Python handler in the copy (at-fork callbacks run Python before the
    # ``preexec_fn``). Blocked in this thread, signals wait in the child for its default
    # dispositions, and here for the next instruction after the start.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals()) if setup else None
    try:
        if before_fork is not None:
            before_fork()
        proc = subprocess.Popen(
            list(command),
            env=dict(env),
            pass_fds=[*(fd for fd, _ in sockets), *keep_fds, *inherited],
            process_group=0 if own_group and sys.platform != "win32" else None,
            preexec_fn=setup,  # noqa: PLW1509  # safe: see portpool._spawn
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )
    except BaseException as e:
        # Refused before the fork too (a NUL byte: ValueError), where it leaked this fd.
        if report is not None:
            os.close(report)
        if isinstance(e, OSError):
            raise _not_started(command, e) from e
        raise
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if setup is not None:
            os.close(setup.report)
    if report is not None:
        with open(report, "rb") as reader:  # empty once the program runs: exec closed it
            reported = reader.read().decode(errors="replace")
        if reported:
            proc.wait()
            number, _, why = reported.partition(" ")
            raise _not_started(command, OSError(int(number), why))
    return proc


def new_pipe() -> tuple[int, int]:
    """A close-on-exec pipe (read fd, write fd). Raises ResourceLimit out of file
    descriptors, else OSError."""
    try:
        return os.pipe()
    except OSError as e:
        from portpool.statedir import out_of_descriptors

        raise out_of_descriptors(e) or e from e


def _not_started(command: Sequence[str], e: OSError) -> PortPoolError:
    """ResourceLimit out of file descriptors, else CommandNotFound: what the kernel refused
    (arguments or environment too large, E2BIG; a file it cannot execute) cannot be
    executed: 127 for no such file, else 126, as a shell (and ``env``) says."""
    from portpool.statedir import out_of_descriptors

    limit = out_of_descriptors(e)
    if limit is not None:
        return limit
    missing = e.errno == errno.ENOENT
    problem = f"{command[0]!r}: {e.strerror or e}"
    if e.errno == errno.ENOEXEC:  # "Exec format error" alone named no cause
        problem += (
            ": neither a program nor a script that names its interpreter in a first '#!' "
            "line (such as '#!/usr/bin/env python3'); or start it through its interpreter"
        )
    return CommandNotFound(command[0], problem, found=not missing)


def held_ports(
    instance: Instance,
    *,
    descendants_only: bool = False,
    lease_inodes: Set[int] = frozenset(),
    roots: Callable[[], Iterable[int]] | None = None,
) -> list[str]:
    """Ports of ``instance`` listened on, on an address the lease covers (``_addresses``'s
    rule), by a process other than us, for people: "port P is still held by pid X
    (name)". Call it once our own lease sockets are closed: a process holding a copy
    of one keeps it listening.

    ``descendants_only`` (a subreaper, to which whatever we started stays a
    descendant): only those count, and whoever holds one of our ``lease_inodes`` (a
    socket handed out of the tree); a foreign program was not ours to wait for (the
    stop waited its grace period, then named it as if it were). ``roots()`` gives the
    processes whose descendants count (default: us; a child we inherited through exec
    and what it started are not ours)."""
    from portpool._addresses import covered_scopes, meets
    from portpool._platform import descends_from, owners_of_inode, process_name, tcp_sockets

    try:
        # The one rule of the pool, doctor and the shield: a daemon on [::] under host
        # localhost, or on 127.0.0.1 under 0.0.0.0, was "free" for want of the spelling.
        scopes = covered_scopes(instance.layout.host)
    except OSError:
        scopes = None  # a name that no longer resolves: every address may be its
    held: list[str] = []
    me = os.getpid()
    own: set[int] | None = None

    def _descends(pid: int) -> bool:
        nonlocal own
        if roots is None:
            return descends_from(pid, {me})
        if own is None:
            own = set(roots())
        return pid in own or descends_from(pid, own)

    for lease in instance.leases.values():
        for listener in tcp_sockets(lease.port, listening_only=True):
            if scopes is not None and not meets(listener, scopes):
                continue  # a foreign program elsewhere: the shield's business, not ours
            pids = [listener.pid] if listener.pid else owners_of_inode(listener.inode or 0)
            ours = not descendants_only or listener.inode in lease_inodes
            for pid in pids:
                if pid != me and (ours or _descends(pid)):
                    name = process_name(pid) or "?"
                    held.append(f"port {lease.port} is still held by pid {pid} ({name})")
    return held
