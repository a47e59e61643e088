"""Exec shim for supervised services: place passed sockets at fds 3.., then exec.

Run as ``python -m portpool._spawn [--fd FD:NAME]... [--parent PID] -- CMD ARGS...``.
It exists because the systemd protocol wants the sockets at fds 3, 4, ... and
``LISTEN_PID`` set to the service's own pid, which only the child can know; doing it
here avoids ``preexec_fn``, which is unsafe while the supervisor runs threads.
On Linux it also asks the kernel to SIGTERM the service when the supervisor dies, so a
kill -9 of ``portpool up`` does not leave services serving forever.
"""

from __future__ import annotations

import os
import signal
import sys


def _set_parent_death_signal(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        sys.exit(1)


def main(argv: list[str]) -> int:
    fds: list[tuple[int, str]] = []
    parent: int | None = None
    args = list(argv)
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--fd" and args:
            fd_text, _, name = args.pop(0).partition(":")
            fds.append((int(fd_text), name))
        elif opt == "--parent" and args:
            parent = int(args.pop(0))
        else:
            print(f"portpool._spawn: bad argument {opt!r}", file=sys.stderr)
            return 2
    command = args[1:]
    if not command:
        print("portpool._spawn: no command after --", file=sys.stderr)
        return 2
    if parent is not None:
        _set_parent_death_signal(parent)
    if fds:
        if sys.platform == "win32":
            print("portpool._spawn: passing sockets by fd needs POSIX", file=sys.stderr)
            return 2
        import fcntl

        # Copy the sources above the targets first: a source may sit on a target number.
        top = 3 + len(fds)
        temps = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd, _ in fds]
        for i, temp in enumerate(temps):
            os.dup2(temp, 3 + i, inheritable=True)
        for stale in {fd for fd, _ in fds if fd >= top} | set(temps):
            os.close(stale)
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_FDNAMES"] = ":".join(name for _, name in fds)
        os.environ["LISTEN_PID"] = str(os.getpid())
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"portpool: cannot start {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
