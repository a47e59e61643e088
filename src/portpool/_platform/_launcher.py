"""Starting a program on Linux without the Python exec shim.

``os.posix_spawn`` places the passed fds at 3.. and starts the child with an empty
signal mask (the only way to do both without running Python in a forked child, which
is unsafe while the supervisor runs threads); util-linux's ``setpriv`` sets the
parent-death signal and ``/bin/sh`` sets ``LISTEN_PID`` to its own pid, which the exec
keeps. About 2 ms of CPU a start where the shim's interpreter took about 12
(``benchmarks/bench_cli.py``). Where a part is missing (another OS, a ``setpriv``
without ``--pdeathsig``, no ``/bin/sh``) ``spawn_placed`` returns None and the caller
runs the shim.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

_SH = "/bin/sh"
# Fixed places, not $PATH: whatever a user's PATH holds, only the system's copy runs here.
_SETPRIV = ("/usr/bin/setpriv", "/bin/setpriv")
# $1: the pid that must still be our parent once the death signal is set (empty: none),
# as the kernel sends nothing for a parent that died before; $2: non-empty to set
# LISTEN_PID (the exec keeps the pid); then the command.
_EXEC_SCRIPT = (
    '[ -z "$1" ] || [ "$PPID" = "$1" ] || exit 1\n'
    '[ -z "$2" ] || { LISTEN_PID=$$; export LISTEN_PID; }\n'
    "shift 2\n"
    'exec "$@"\n'
)
# Python ignores these and an exec keeps SIG_IGN: the child gets their default back.
# (Other ignored signals were ignored by our caller and stay so, as after a shell.)
_PYTHON_IGNORED = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n))

StdSpec = int | IO[bytes] | None


@functools.cache
def _setpriv() -> str | None:
    """The system's setpriv if it can set the parent-death signal (util-linux 2.33+)."""
    for path in _SETPRIV:
        if os.access(path, os.X_OK):
            try:
                done = subprocess.run(
                    [path, "--help"], capture_output=True, timeout=10, check=False
                )
            except (OSError, subprocess.SubprocessError):
                return None
            return path if b"--pdeathsig" in done.stdout else None
    return None


def _open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # closed meanwhile by another thread
        return False


if sys.platform.startswith("linux"):

    def file_actions(
        stdio: Sequence[tuple[int, int]], placed: Sequence[int], kept: Sequence[int]
    ) -> list[tuple[int, ...]]:
        """``posix_spawn`` file actions: each ``(source, target)`` of ``stdio`` and each of
        ``placed`` (at 3, 4, ...) at its number, ``kept`` open at some number above them,
        and every other fd we inherited as inheritable closed (as Popen's ``close_fds``).
        Every source is first copied above every open fd: a source may sit on a target."""
        sources = [fd for fd, _ in stdio] + list(placed) + list(kept)
        current = _open_fds()
        top = max([*current, *sources, 2 + len(placed)]) + 1
        temps = list(range(top, top + len(sources)))
        targets = [std for _, std in stdio] + list(range(3, 3 + len(placed)))
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, fd, temp) for fd, temp in zip(sources, temps, strict=True)
        ]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in current if fd > 2 and _inheritable(fd)]
        actions += [(os.POSIX_SPAWN_DUP2, t, fd) for t, fd in zip(temps, targets, strict=False)]
        actions += [(os.POSIX_SPAWN_CLOSE, temp) for temp in temps[: len(targets)]]
        return actions

    class _PosixSpawned(subprocess.Popen[bytes]):
        """A Popen whose child ``os.posix_spawn`` starts; after the start, all Popen's."""

        def __init__(
            self,
            argv: list[str],
            env: dict[str, str],
            *,
            placed: Sequence[int],
            kept: Sequence[int],
            own_group: bool,
            stdin: StdSpec,
            stdout: StdSpec,
            stderr: StdSpec,
        ) -> None:
            self._placed = list(placed)
            self._kept = list(kept)
            self._own_group = own_group
            super().__init__(
                argv, env=env, close_fds=False, stdin=stdin, stdout=stdout, stderr=stderr
            )

        # Popen's own hook for starting the child (its POSIX signature since 3.11; the
        # tail, which later versions may extend, is not used here).
        def _execute_child(  # noqa: PLR0917  # Popen calls it with these, by position
            self,
            args: list[str],
            executable: Any,
            preexec_fn: Any,
            close_fds: Any,
            pass_fds: Any,
            cwd: Any,
            env: dict[str, str],
            startupinfo: Any,
            creationflags: Any,
            shell: Any,
            p2cread: int,
            p2cwrite: int,
            c2pread: int,
            c2pwrite: int,
            errread: int,
            errwrite: int,
            *rest: Any,
        ) -> None:
            sys.audit("subprocess.Popen", args[0], args, None, env)
            stdio = [(fd, std) for fd, std in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
            actions = file_actions(
                [(fd, std) for fd, std in stdio if fd != -1], self._placed, self._kept
            )
            group: dict[str, Any] = {"setpgroup": 0} if self._own_group else {}
            self.pid = os.posix_spawn(
                args[0],
                args,
                env,
                file_actions=actions,
                setsigmask=(),  # given, even empty, it is set: the child blocks nothing
                setsigdef=_PYTHON_IGNORED,
                **group,
            )
            self._child_created = True
            # Popen's own closing of the child's ends of its pipes (and of /dev/null).
            self._close_pipe_fds(  # type: ignore[attr-defined]  # private, since 3.7
                p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite
            )


def native_argv(
    command: Sequence[str], *, parent: int | None = None, listen_pid: bool = False
) -> list[str] | None:
    """What ``spawn_placed`` runs for ``command`` (setpriv with ``parent``, then sh), or
    None where it cannot run here: not Linux, no ``setpriv`` with ``--pdeathsig`` while
    ``parent`` is given, no ``/bin/sh``, or a program whose name starts with ``-``. Its
    fds and signal mask are ``spawn_placed``'s."""
    if not sys.platform.startswith("linux") or not os.access(_SH, os.X_OK):
        return None
    if command and command[0].startswith("-"):
        return None  # bash's exec (where /bin/sh is bash) would take it for an option
    prefix: list[str] = []
    if parent is not None:
        setpriv = _setpriv()
        if setpriv is None:
            return None
        prefix = [setpriv, "--pdeathsig", "TERM", "--"]
    flags = ["" if parent is None else str(parent), "1" if listen_pid else ""]
    return [*prefix, _SH, "-c", _EXEC_SCRIPT, "sh", *flags, *command]


def spawn_placed(
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    placed: Sequence[int] = (),
    kept: Sequence[int] = (),
    parent: int | None = None,
    listen_pid: bool = False,
    own_group: bool = False,
    stdin: StdSpec = None,
    stdout: StdSpec = None,
    stderr: StdSpec = None,
) -> subprocess.Popen[bytes] | None:
    """Start ``command`` with ``placed`` fds at 3, 4, ..., ``kept`` fds open, an empty
    signal mask and default dispositions (but for what our caller ignored), ``LISTEN_PID``
    its own pid (``listen_pid``), SIGTERM when ``parent`` dies (Linux's parent-death
    signal; it exits 1 at once if ``parent`` is gone already), in a new process group
    (``own_group``); ``env`` is its whole environment.

    Returns None where this cannot be done here (not Linux, no ``setpriv`` with
    ``--pdeathsig`` while ``parent`` is given, no ``/bin/sh``, or the start failed,
    e.g. no fd number was left for the copies): the caller then uses the exec shim.
    """
    argv = native_argv(command, parent=parent, listen_pid=listen_pid)
    if argv is not None and sys.platform.startswith("linux"):
        try:
            return _PosixSpawned(
                argv,
                dict(env),
                placed=placed,
                kept=kept,
                own_group=own_group,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
            )
        except OSError:
            return None
    return None
