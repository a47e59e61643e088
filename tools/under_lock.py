"""Run a build step once, however many ``make`` runs ask for it at the same moment.

Usage: ``python3 tools/under_lock.py LOCK STAMP [SOURCE ...] -- COMMAND [ARG ...]``

Takes an exclusive lock on the file LOCK, waiting for it (and saying so) while another
build holds it. Then, if STAMP exists and is newer than every SOURCE, another build did
the work while this one waited: exit 0 without running COMMAND. Otherwise run COMMAND,
which makes STAMP when it succeeds (the stamp is the build's own last step, so that
``make -n`` prints it rather than this script making it). Exits with COMMAND's status.

Why: the README says to run ``make run`` again in a second terminal for instance 2. In
a fresh clone the first one is still building ``.venv``, and two builds of one venv at
once broke it (one pip removed files the other was installing). The lock dies with
its holders (this process and the build, which inherits it), so a build killed midway
never blocks the next one, and no build outlives the lock.

Uses only the standard library: it runs before ``.venv`` exists. Where ``fcntl`` is
missing (Windows), it runs COMMAND without a lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

USAGE = "usage: under_lock.py LOCK STAMP [SOURCE ...] -- COMMAND [ARG ...]"


def _is_fresh(stamp: Path, sources: list[Path]) -> bool:
    """True if ``stamp`` exists and is newer than every source that exists."""
    try:
        built = stamp.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(built > source.stat().st_mtime_ns for source in sources if source.exists())


def _lock(path: Path) -> IO[str]:
    """Hold an exclusive lock on ``path`` until the returned file is closed or the
    process ends, waiting for it if another build holds it."""
    handle = path.open("a")
    try:
        import fcntl
    except ImportError:  # Windows: no make recipes there take this path
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"Waiting for another build that holds {path}...", file=sys.stderr, flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def main(argv: list[str]) -> int:
    """Run as the module docstring says; 2 for a command line it cannot read."""
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    split = argv.index("--")
    paths, command = argv[:split], argv[split + 1 :]
    if len(paths) < 2 or not command:
        print(USAGE, file=sys.stderr)
        return 2
    lock, stamp, sources = Path(paths[0]), Path(paths[1]), [Path(p) for p in paths[2:]]
    try:
        with _lock(lock) as held:
            if _is_fresh(stamp, sources):
                print(f"{stamp} was built by another make meanwhile", file=sys.stderr)
                return 0
            # The build inherits the lock: it stays held while any part of the build
            # runs, also when this process is gone (a SIGTERM to make, a kill -9).
            inherit = [held.fileno()] if os.name == "posix" else []
            code = subprocess.call(command, pass_fds=inherit)
    except KeyboardInterrupt:
        return 130
    return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
