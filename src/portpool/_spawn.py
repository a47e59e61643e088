"""Exec shim for commands and services: place passed sockets at fds 3.., then exec.

Run by file path, never as ``-m portpool._spawn``, so that it imports no part of the
package (only ``os``, ``_signal``, ``fcntl`` and, on Linux, ``ctypes``)::

    python -I -S .../portpool/_spawn.py [--fd FD:NAME]... [--keep FD] [--parent PID] -- CMD...

Why it exists: the systemd protocol wants the sockets at fds 3, 4, ... and
``LISTEN_PID`` set to the service's own pid, which only the child can know, and on
Linux the parent-death signal must be set by the child itself; ``preexec_fn`` could do
both but is unsafe while the supervisor runs threads.

It is started with the supervisor's stop signals blocked, so a Ctrl-C while this
interpreter starts stays pending (no traceback, no "Could not import runpy module").
Before the exec it restores what Python changed (SIGPIPE and SIGXFSZ ignored, a SIGINT
handler) to the default and unblocks every signal: a signal that was pending then ends
this process by its default action, as it would have ended the command, and the
command starts with default dispositions and an empty signal mask.
"""

from __future__ import annotations

import os
import sys

try:
    # The signal module's C core, without its enum wrappers: importing ``signal``
    # (enum, functools, collections) cost ~5 ms of CPU per service start, a third of
    # this interpreter's whole start. Its functions are the same, with plain ints.
    import _signal as signal  # type: ignore[import-not-found]  # no stub: same API
except ImportError:  # an interpreter without the C module
    import signal

assert sys.platform != "win32", "sockets by fd and signal masks need POSIX"

# Python installs a handler or SIG_IGN for these; an exec keeps SIG_IGN, so reset them.
_PYTHON_CHANGED = ("SIGINT", "SIGPIPE", "SIGXFSZ", "SIGXFZ")
_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(parent: int) -> bool:
    """SIGTERM us when ``parent`` dies (Linux); False if it already died."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    # The parent may have died before prctl took effect: then nobody supervises us.
    return os.getppid() == parent


def _place(fds: list[int], keep: list[int]) -> None:
    """Move ``fds`` to 3, 4, ... and ``keep`` above them, all inheritable."""
    top = 3 + len(fds)
    import fcntl

    # Copy every source above the targets first: a source may sit on a target number.
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in fds + keep]
    for i, temp in enumerate(temps[: len(fds)]):
        os.dup2(temp, 3 + i, inheritable=True)
    for temp in temps[len(fds) :]:
        os.set_inheritable(temp, True)
    for stale in {fd for fd in fds + keep if fd >= top} | set(temps[: len(fds)]):
        os.close(stale)


def _reset_signals() -> None:
    for name in _PYTHON_CHANGED:
        number = getattr(signal, name, None)
        # SIGINT ignored here was ignored by the caller (Python leaves an inherited
        # SIG_IGN alone, and portpool never ignores it): it stays so, as after a shell.
        if number is not None and not (
            name == "SIGINT" and signal.getsignal(number) == signal.SIG_IGN
        ):
            signal.signal(number, signal.SIG_DFL)
    # Pending signals are delivered here, with their default action: we die as the
    # command would have, quietly.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def main(argv: list[str]) -> int:
    fds: list[int] = []
    names: list[str] = []
    keep: list[int] = []
    parent: int | None = None
    args = list(argv)
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--fd" and args:
            fd_text, _, name = args.pop(0).partition(":")
            fds.append(int(fd_text))
            names.append(name)
        elif opt == "--keep" and args:
            keep.append(int(args.pop(0)))
        elif opt == "--parent" and args:
            parent = int(args.pop(0))
        else:
            os.write(2, f"portpool spawn: bad argument {opt!r}\n".encode())
            return 2
    command = args[1:]
    if not command:
        os.write(2, b"portpool spawn: no command after --\n")
        return 2
    if parent is not None and not _set_parent_death_signal(parent):
        return 1
    env = dict(os.environ)
    if fds or keep:
        _place(fds, keep)
    if fds:
        env["LISTEN_FDS"] = str(len(fds))
        env["LISTEN_FDNAMES"] = ":".join(names)
        env["LISTEN_PID"] = str(os.getpid())
    _reset_signals()
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        os.write(2, f"portpool: cannot start {command[0]!r}: {e.strerror}\n".encode())
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
