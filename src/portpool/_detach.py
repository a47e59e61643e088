"""Starting ``portpool up`` detached (``up --detach``): in its own session, its output
in a log, returning once its verified record shows it up.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from portpool._dataclass import dataclass, field
from portpool._launch import DEFAULT_GRACE_S, check_grace
from portpool._layout_load import absolute_path, layout_path, working_directory
from portpool._logs import STARTING_LOG, drop_log_owner, logs_dir, set_log_owner
from portpool._platform import (
    DirHandle,
    ProcessIdentity,
    current_identity,
    detached_options,
    identity_of,
)
from portpool._programs import check_commands
from portpool._relay import (
    hold_stop_signals,
    let_held_signals_in,
    let_signals_in,
    raise_if_interrupted,
)
from portpool.errors import DetachFailed, Interrupted, PortPoolError, StateDirError, UsageError
from portpool.layout import Layout, require_layout
from portpool.records import read_instance
from portpool.statedir import StateDir, check_name, special_entry, write_error

if TYPE_CHECKING:
    from portpool.instance import Instance

__all__ = ["Detached", "adopt_starting_log", "claim_starting_log", "start_detached"]

_POLL_S = 0.05


@dataclass(frozen=True)
class Detached:
    """An instance started by ``start_detached``: number, ``up``'s pid, ports (from its
    verified record), log, and the lines ``up`` printed about itself before it was up
    (warnings such as a skipped slot). ``log_placed``: False when the log stayed at
    its starting name (a note says why), where ``portpool logs`` does not look."""

    number: int
    pid: int
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    log_placed: bool = True


# The line `up` prints once every service is ready: "portpool: instance N of APP is up".
# Anchored at "portpool: " so that a service's own output ("name | ...") never matches.
_UP_LINE = re.compile(rb"(?m)^portpool: instance (\d+)\b[^\n]*\bis up\b")
_OWN_LINE = re.compile(rb"(?m)^portpool: [^\n]*")
_TAIL_LINES = 20
_STOP_WAIT_S = 10.0

# The background up: `portpool up`, once it has claimed its log (state dir, app, log
# name: argv[1:4]). Claimed by itself, not by `up --detach` once it knows its pid: a
# kill -9 of `up --detach` in between left an instance whose log `logs` never found.
# One line: a Windows command line keeps it whole.
_BACKGROUND_UP = (
    "import sys; from portpool._detach import claim_starting_log; "
    "claim_starting_log(*sys.argv[1:4]); del sys.argv[1:4]; "
    "from portpool.cli import main; main()"
)


class _Claim:
    """The starting log this process, a background ``up``, claimed: where it is, which
    file it is (its stdout's), and its ``up --detach`` (None if already gone)."""

    def __init__(self, state_path: str, app: str, log: str, client: ProcessIdentity | None) -> None:
        self.state_path, self.app, self.log, self.client = state_path, app, log, client
        self.file: tuple[int, int] | None = None
        with contextlib.suppress(OSError):
            st = os.fstat(1)
            self.file = (st.st_dev, st.st_ino)
        self.hooked = False  # its move at the instance's release is registered
        self.settled = False  # moved, or tried and said why not: never again
        self.lock = threading.Lock()  # the release may run in another thread


# Set once, by _BACKGROUND_UP before `up` runs, in a process that runs nothing else:
# that `up` must know it writes a detached log, and `up` has no option for it.
_claim: _Claim | None = None


def claim_starting_log(state_path: str, app: str, log: str) -> None:
    """Record that ``log`` (``.starting-<pid>.log`` in ``app``'s logs of the state dir
    at ``state_path``) is written by this process, the background ``up`` of ``up
    --detach``, before it takes a slot: from its record on, ``portpool logs`` finds the
    instance's log while it starts, and if ``up --detach`` dies before it is up.
    Raises nothing: what went wrong is said as a warning on stderr (the log itself,
    which ``up --detach`` relays), and the up goes on."""
    global _claim
    let_held_signals_in()  # held by `up --detach` as it started us
    try:
        named = STARTING_LOG.fullmatch(log)
        if not named:
            raise UsageError(f"not a starting log's name: {log!r}")
        # The `up --detach` waiting for us (its pid is in the log's name) is our parent,
        # unless it died already and we were given another.
        client_pid = int(named.group(1))
        client = identity_of(client_pid) if os.getppid() == client_pid else None
        _claim = _Claim(state_path, app, log, client)
        me = current_identity()
        with StateDir.open(state_path) as state:
            set_log_owner(logs_dir(state, check_name("app", app)), log, me.pid, me.start_token)
    except (OSError, PortPoolError) as e:
        _warn(f"`portpool logs` cannot show this instance until it is up: {e}")


def _warn(problem: str) -> None:
    print(f"portpool: warning: {problem}", file=sys.stderr, flush=True)


def adopt_starting_log(instance: Instance) -> None:
    """In the background ``up`` of ``up --detach`` (in any other process: nothing), once
    that ``up --detach`` is gone, put the log at ``<n>.log`` of ``instance`` itself: now,
    and when the instance is released (before its slot is free: ``stop`` then ``logs``
    must find it). Called once the instance has its number, and again once it is up.
    While ``up --detach`` runs, it moves the log at "is up", or names it in its error.
    Raises nothing: what kept the log where it is is said as a warning on stderr."""
    claim = _claim
    if claim is None:
        return
    number, directory = instance.number, instance.directory
    if not claim.hooked:
        claim.hooked = True
        instance.on_release(lambda: _adopt(claim, number, directory))
    _adopt(claim, number, directory)


def _client_waits(client: ProcessIdentity | None) -> bool:
    """Whether the ``up --detach`` that started us still runs. Once it exits we have
    another parent (POSIX, even before it is reaped); on Windows, whose parent pid
    stays, its identity says."""
    if client is None or os.getppid() != client.pid:
        return False
    now = identity_of(client.pid)
    return now is not None and now.start_token == client.start_token


def _adopt(claim: _Claim, number: int, directory: str | None) -> None:
    with claim.lock:
        if claim.settled or _client_waits(claim.client):
            return
        claim.settled = True
        problem = None
        try:
            with StateDir.open(claim.state_path) as state:
                logs = logs_dir(state, claim.app)
                here = logs.stat_entry(claim.log)
                if here is None:
                    # Moved by `up --detach` before it died: its claim may be left.
                    drop_log_owner(logs, claim.log)
                elif claim.file is None or (here.st_dev, here.st_ino) == claim.file:
                    # Not another file by its name: a later `up --detach` given that pid.
                    me = current_identity()
                    up = (me.pid, me.start_token)
                    problem = _place_log(logs, number, claim.log, up, directory)
        except (OSError, PortPoolError) as e:
            where = os.path.join(claim.state_path, "apps", claim.app, "logs")
            problem = _log_stays(where, number, claim.log, e)
        if problem:
            _warn(problem)


def _outcome(returncode: int | None) -> str:
    from portpool._launch import describe_status  # one wording for a child's end

    if returncode is None:
        return "stopped"
    if returncode < 0:
        return f"was {describe_status(returncode)}"
    return f"exited with status {returncode}"


def _read_all(directory: DirHandle, name: str) -> bytes:
    fd = directory.open_file(name, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _UpLineFinder:
    """The log of a background ``up`` as it grows, and where in it ``up`` said "is up".
    Each piece is searched from the start of the line it continues, never the whole
    log again: services that printed 30 MB before they were ready kept `up --detach`
    searching for a minute after they were (quadratic in the log's size)."""

    def __init__(self) -> None:
        self.seen = bytearray()
        self.scan_from = 0  # the start of the last line not ended yet

    def feed(self, chunk: bytes) -> re.Match[bytes] | None:
        """Add ``chunk``; the "is up" line's match once it is there, else None."""
        self.seen += chunk
        # "^" matches right after a newline at a search's start position too.
        found = _UP_LINE.search(self.seen, self.scan_from)
        self.scan_from = self.seen.rfind(b"\n", self.scan_from) + 1 or self.scan_from
        return found


def _tail(seen: bytes | bytearray) -> str:
    return b"\n".join(seen.splitlines()[-_TAIL_LINES:]).decode(errors="replace")


def _layout_args(layout: Layout, cwd: str | None) -> list[str]:
    """``--config FILE`` naming ``layout`` for an ``up`` run in ``cwd`` (default: ours),
    which reads its layout from a file: the one it came from, or none for the built-in
    layout. Needs our working directory only for the built-in layout or a relative path
    (UsageError if it was removed)."""
    from portpool.layout import default_layout, load_layout

    if layout.source == default_layout().source:
        if layout != default_layout():
            raise UsageError(
                "a detached up reads its layout from a file, and this one was built in "
                "Python: save it as TOML and pass load_layout(path)"
            )
        cwd = working_directory() if cwd is None else cwd
        found = layout_path(None, cwd)
        if found is not None:
            raise UsageError(
                f"a detached up in {cwd} would use {found}, not the built-in layout: "
                "pass cwd= a directory without a portpool.toml"
            )
        return []
    path = absolute_path(layout.source)
    if not load_layout(path).same_as(layout):
        raise UsageError(
            f"{layout.source} no longer holds this layout (changed since it was loaded, or "
            "changed in Python): a detached up reads its layout from that file"
        )
    return ["--config", path]


def start_detached(
    layout: Layout,
    *,
    state: StateDir,
    number: int | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    quiet: bool = False,
    cwd: str | None = None,
    announce: Callable[[Detached], None] | None = None,
) -> Detached:
    """Start ``portpool up`` of ``layout`` in the background, in its own session, its
    output (the services' prefixed lines and its own) going to ``log_path(...)``;
    return once it says the instance is up and its record (pid, start token, lock)
    shows it running.

    ``layout`` must be the one its file holds (``load_layout``), or the built-in one:
    the background ``up`` reads it again. ``number`` pins the instance number,
    ``grace_s`` (seconds) is the stop grace before SIGKILL, ``quiet`` leaves out the
    line naming the instance and its ports, ``cwd`` (default: the current directory)
    is the checkout the instance is numbered for. ``announce(detached)`` runs once it
    is up, before this returns: what it raises (a stop signal's Interrupted while it
    says so) stops the background up, as before it was up. Raises UsageError (a
    ``number`` outside 1..max_instances, a layout no file holds, ``grace_s`` not 0 or
    more seconds), TypeError (``layout`` no Layout), LayoutError (a service's command
    cannot be executed; nothing started), DetachFailed with its exit status (128+N if
    killed by signal N) and the log's tail if it exits first, or if it stopped right
    after it said it was up; Interrupted (the background up stopped) for a stop signal
    in a ``SignalScope`` before it is up or while ``announce`` runs.
    """
    require_layout(layout).check_number(number)
    grace_s = check_grace(grace_s)
    check_commands(layout, cwd)  # here, not only in the background up's log
    up_args = ["--grace", repr(grace_s), *_layout_args(layout, cwd)]
    if number is not None:
        up_args += ["--instance", str(number)]
    if quiet:
        up_args.append("--quiet")
    logs = logs_dir(state, layout.app)
    starting = f".starting-{os.getpid()}.log"
    background_up = [sys.executable, "-u", "-c", _BACKGROUND_UP, state.path, layout.app]
    background_up += [starting, "up", *up_args]
    try:
        fd = logs.open_file(starting, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    except OSError as e:  # a traceback: read-only, a directory or a link at its name
        path = os.path.join(logs.path, starting)
        with contextlib.suppress(OSError):
            kind = special_entry(logs, starting)  # a link read "Too many levels of ..."
            if kind:
                raise StateDirError(path, f"is {kind}, not a log portpool wrote; remove it") from e
        raise write_error(path, "cannot create the log", e) from e
    # Held while it starts: a stop signal's Interrupted raised inside Popen, after the
    # fork, left the background up running with nobody knowing its pid (1 run in 3 of a
    # SIGTERM a few ms in). The background up lets them in first thing.
    mask = hold_stop_signals()
    try:
        # Its own output unbuffered by -u, not PYTHONUNBUFFERED=1 in its environment:
        # every service inherited that, and ran otherwise than in the foreground.
        proc = subprocess.Popen(
            background_up,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd=cwd,
            **detached_options(),
        )
    except BaseException:
        # Nothing was started, nothing will write to it: an empty log nothing names.
        with contextlib.suppress(OSError):
            logs.unlink(starting)
        let_signals_in(mask)
        raise
    finally:
        os.close(fd)
    try:
        # A stop signal anywhere until it is said up stops it (Interrupted): raised once
        # it was up, it left a running instance behind a command that printed nothing.
        let_signals_in(mask)
        started = _wait_until_up(state, layout.app, logs, starting, proc)
        if announce is not None:
            # Said with the signals held: one that comes once the line is out must not
            # stop what it said is up (it did, 1 run in 2 of a SIGTERM sent on the line).
            mask = hold_stop_signals()
            raise_if_interrupted()  # one that came before, during an import
            announce(started)
    except BaseException as e:
        if not isinstance(e, DetachFailed) and proc.poll() is None:
            proc.terminate()
            proc.wait()
        if proc.poll() is not None:
            drop_log_owner(logs, starting)  # its up is gone: the log stays, for the error
        let_signals_in(mask)
        raise
    let_signals_in(mask)  # a signal that came while it was said: the caller's, up kept
    # Kept and reaped when it ends: dropped while it ran, the Popen warned "subprocess N
    # is still running" (ResourceWarning) in a program that called this.
    threading.Thread(target=proc.wait, name="portpool-detached-up", daemon=True).start()
    return started


def _wait_until_up(
    state: StateDir,
    app: str,
    logs: DirHandle,
    starting: str,
    proc: subprocess.Popen[bytes],
) -> Detached:
    """Read the log ``starting`` until ``proc`` (the background up) says it is up, and
    return what it started. Raises DetachFailed if it exits first, or stops right after."""
    # Its identity now, while it surely runs: the record must name this very process.
    identity = identity_of(proc.pid)
    reader = logs.open_file(starting, os.O_RDONLY)
    finder = _UpLineFinder()
    seen = finder.seen
    try:
        while True:
            chunk = os.read(reader, 1 << 16)
            found = finder.feed(chunk)
            if found:
                number = int(found.group(1))
                break
            if not chunk:
                if proc.poll() is not None:
                    rest = os.read(reader, 1 << 20)
                    if rest:
                        finder.feed(rest)
                        continue
                    raise DetachFailed(
                        proc.returncode,
                        os.path.join(logs.path, starting),
                        _tail(seen),
                        _outcome(proc.returncode),
                    )
                raise_if_interrupted()  # a stop signal that came during an import
                time.sleep(_POLL_S)
    finally:
        os.close(reader)
    notes = tuple(
        m.group().decode(errors="replace") for m in _OWN_LINE.finditer(seen, 0, found.start())
    )
    info = read_instance(state.instances(app), number)
    if not (
        identity is not None
        and info.alive
        and info.readable
        and info.pid == proc.pid
        and info.start_token == identity.start_token
    ):
        # It said "is up" and stopped at once: its ports are not held, do not list them.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_WAIT_S)
        raise DetachFailed(
            proc.returncode,
            os.path.join(logs.path, starting),
            _tail(_read_all(logs, starting)),
            _outcome(proc.returncode),
            when="right after it was up",
        )
    up = (proc.pid, identity.start_token)
    problem = _place_log(logs, number, starting, up, info.directory)
    log = f"{number}.log" if problem is None else starting
    notes += (f"portpool: warning: {problem}",) if problem else ()
    ports = {s.name: s.port for s in info.services if s.port is not None}
    return Detached(number, proc.pid, os.path.join(logs.path, log), ports, notes, problem is None)


def _place_log(
    logs: DirHandle, number: int, starting: str, up: tuple[int, str], directory: str | None
) -> str | None:
    """Move the log ``starting`` to ``<number>.log``, tied to its ``up`` (pid, start
    token) and the instance's checkout ``directory``; None, or what kept it where it is
    (tied to its up there still). The instance has its number by then, and may be up:
    a directory at that path ended `up --detach` in a traceback over a running instance
    whose log `logs` called absent ("not started with --detach"). In this order, so
    that `logs` finds it at every step."""
    final = f"{number}.log"
    blocked: Exception | None = None
    try:
        with contextlib.suppress(FileNotFoundError):
            logs.unlink(final)  # the previous owner's: never shown under the new one
    except OSError as e:
        blocked = e  # still owned below: `logs` then names what is in the way
    try:
        set_log_owner(logs, final, *up, directory)
        if blocked is None:
            logs.rename(starting, final)
    except (OSError, PortPoolError) as e:
        if isinstance(e, Interrupted):  # a stop signal: not a reason the log stays
            raise
        blocked = blocked or e
    if blocked is None:
        drop_log_owner(logs, starting)
        return None
    return _log_stays(logs.path, number, starting, blocked)


def _log_stays(logs_path: str, number: int, starting: str, why: Exception) -> str:
    """What kept the log ``starting`` from ``<number>.log`` in ``logs_path``, and where
    it stays."""
    said = why.strerror if isinstance(why, OSError) and why.strerror else why
    where, stays = os.path.join(logs_path, f"{number}.log"), os.path.join(logs_path, starting)
    return f"the log cannot be put at {where} ({said}); it stays at {stays}"
