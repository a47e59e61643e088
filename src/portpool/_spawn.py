"""A started program's last steps in the forked child: sockets at fds 3.., exec.

``ChildSetup`` runs as ``subprocess.Popen``'s ``preexec_fn`` and never returns: it
places the sockets at fds 3, 4, ... (the systemd protocol), sets ``LISTEN_PID`` to the
child's own pid (only the child knows it, so it execs the program itself, with the
environment exactly as given), asks for SIGTERM when its parent dies (Linux), restores
default signal dispositions and an empty signal mask, and closes what it must not pass.
It replaced an exec shim, a second python per program start (~10 ms, a tenth of ``run``).

Why a ``preexec_fn`` is safe here although the supervisor runs threads (the warning in
subprocess's documentation): a child forked from a threaded process deadlocks only on a
lock that another thread held at the fork. This code takes none: after the fork the
interpreter re-creates its own locks (GIL, import) and the child makes system calls
(dup, fcntl, close, prctl through a function bound before the fork, sigaction,
sigprocmask, execve) and allocates memory (malloc is reset by the C library's fork);
it imports nothing, logs nothing and never writes ``environ``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from portpool._platform import open_fds, parent_death_setter
from portpool.errors import CommandNotFound

assert sys.platform != "win32", "sockets by fd and signal masks need POSIX"

_NOT_FOUND = CommandNotFound.exit_code  # 127
_NOT_EXECUTABLE = 126


class ChildSetup:
    """The ``preexec_fn`` that starts ``command`` with ``env`` (name -> value).

    ``sockets`` [(fd, name)] arrive at fds 3.. with ``LISTEN_FDS``, ``LISTEN_FDNAMES``
    and ``LISTEN_PID``; ``keep`` fds stay open above them (at other numbers);
    ``inherited`` fds keep their numbers; every other fd above 2 is closed.
    ``parent``: a pid; the child asks for SIGTERM when its parent dies and exits 1 at
    once if the parent is not ``parent`` any more (it died before the request took).
    ``report``: the write end of a pipe (close-on-exec) on which a failed exec is
    reported as ``<errno> <why>`` before the child exits 127; the pipe closes
    unwritten when the program starts (``spawn`` reads it, as Popen reads its own).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        sockets: Sequence[tuple[int, str]] = (),
        keep: Sequence[int] = (),
        inherited: Sequence[int] = (),
        parent: int | None = None,
        report: int,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.fds = [fd for fd, _ in sockets]
        self.names = [name for _, name in sockets]
        self.keep = list(keep)
        self.inherited = set(inherited)
        self.parent = parent
        self.report = report
        # os.execvpe's search runs Python that may take a lock (the warnings module's,
        # from Python 3.14): the candidates are found here and the child only execve()s.
        self.candidates = exec_candidates(self.command[0], self.env)
        # Bound now: the child must not load a library (see the module's docstring).
        self._set_parent_death: Callable[[int], bool] | None = (
            parent_death_setter() if parent is not None else None
        )

    def __call__(self) -> NoReturn:
        report = self.report
        try:
            self._close_unpassed()
            # Above the sockets' numbers first, or placing them could close it.
            report = fcntl.fcntl(self.report, fcntl.F_DUPFD_CLOEXEC, 3 + len(self.fds))
            self._prepare()
            self._exec()
        except OSError as e:
            number, why = e.errno or 0, e.strerror or str(e)
        except BaseException as e:  # nothing may return into subprocess's child code
            number, why = 0, str(e) or type(e).__name__
        with contextlib.suppress(OSError):
            os.write(report, f"{number} {why}".encode(errors="replace"))
        # As a shell's: 127 for no such file, 126 for one the kernel would not execute.
        os._exit(_NOT_FOUND if number == errno.ENOENT else _NOT_EXECUTABLE)

    def _exec(self) -> NoReturn:
        """execve() each candidate as execvp does: the first error that is not "no such
        file" is the one raised, else the last."""
        first: OSError | None = None
        last: OSError = FileNotFoundError(2, "No such file or directory")
        for path in self.candidates:
            try:
                os.execve(path, self.command, self.env)
            except (FileNotFoundError, NotADirectoryError) as e:
                last = e
            except OSError as e:
                last = e
                first = first or e
        raise first or last

    def _prepare(self) -> None:
        if self.parent is not None:
            if self._set_parent_death is not None:
                self._set_parent_death(signal.SIGTERM)
            # The parent may have died before the request took: nobody supervises us.
            if os.getppid() != self.parent:
                os._exit(1)
        self._place()
        if self.fds:
            self.env["LISTEN_FDS"] = str(len(self.fds))
            self.env["LISTEN_FDNAMES"] = ":".join(self.names)
            self.env["LISTEN_PID"] = str(os.getpid())
        _default_signals()

    def _place(self) -> None:
        """Move the sockets to 3, 4, ... and ``keep`` above them, all inheritable."""
        top = 3 + len(self.fds)
        # Copy every source above the targets first: a source may sit on a target number.
        temps = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in self.fds + self.keep]
        for i, temp in enumerate(temps[: len(self.fds)]):
            os.dup2(temp, 3 + i, inheritable=True)
            # Blocking, as when first handed over: O_NONBLOCK belongs to the socket, and
            # a previous run's event loop left it set, so a restart's accept() failed.
            os.set_blocking(3 + i, True)
        for temp in temps[len(self.fds) :]:
            os.set_inheritable(temp, True)
        for stale in {fd for fd in self.fds + self.keep if fd >= top} | set(temps[: len(self.fds)]):
            os.close(stale)

    def _close_unpassed(self) -> None:
        """Close every fd above 2 the program is not given, close-on-exec or not (what
        Popen's ``close_fds`` does after a ``preexec_fn``, which never returns here),
        before anything is copied: the forked child holds all of its parent's fds, and
        ``run --fds`` of N services needed N more than the limit its error asked for."""
        passed = {self.report, *self.fds, *self.keep, *self.inherited}
        for fd in open_fds():
            if fd > 2 and fd not in passed:
                with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                    os.close(fd)


def exec_candidates(program: str, env: Mapping[str, str]) -> list[bytes]:
    """The paths ``os.execvpe(program, ..., env)`` would try, in order: ``program``
    itself when it names a directory, else it in each directory of ``env``'s PATH (the
    default path without one; an empty entry is the working directory)."""
    if os.path.dirname(program):
        return [os.fsencode(program)]
    entries = env.get("PATH", os.defpath).split(os.pathsep)
    return [os.fsencode(os.path.join(entry, program)) for entry in entries]


def _default_signals() -> None:
    """Handled signals back to their default action, then an empty mask: a signal that
    was pending (blocked by the supervisor while it started us) ends this child by its
    default action, as it would have ended the program. What is ignored stays ignored,
    as after ``exec`` (the caller's ``nohup``); Popen already restored SIGPIPE and SIGXFSZ."""
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
