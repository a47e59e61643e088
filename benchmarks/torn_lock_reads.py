"""Does a read of /proc/locks leave out a lock held the whole time? (Linux)

    python -m benchmarks.torn_lock_reads [--churners 8] [--files 50] [--reads 3000]
                                         [--seconds 15] [--pause 0.002]

A child holds one flock for the whole run, after 200 locks older than it (so it is not
last in the kernel's list). Churner processes keep taking a batch of flocks on their own
files, holding them up to ``--pause`` seconds and dropping them all, so the table is
several pages long and changing. The reader then reads the table ``--reads`` times (at
most ``--seconds``) each way and counts the reads that do not list the held lock:

- ``text``: line by line from a text file, as portpool read it before;
- ``big``: ``os.read`` of 1 MiB until EOF (the kernel still returns one page a call);
- ``union2``: two ``text`` reads, a lock listed by either counting as listed;
- ``portpool``: ``locked_inodes()`` (an incomplete table, where portpool asks the file
  itself, is counted apart as "cannot tell").
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable

Key = tuple[int, int]


def _keys(text: str) -> set[Key]:
    out = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK":
            major, minor, ino = fields[5].split(":")
            out.add((os.makedev(int(major, 16), int(minor, 16)), int(ino)))
    return out


def read_text() -> set[Key] | None:
    keys: set[Key] = set()
    with open("/proc/locks", encoding="ascii", errors="replace") as f:
        for line in f:
            keys |= _keys(line)
    return keys


def read_big() -> set[Key] | None:
    fd = os.open("/proc/locks", os.O_RDONLY)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _keys(b"".join(chunks).decode("ascii", "replace"))


def read_union2() -> set[Key] | None:
    return (read_text() or set()) | (read_text() or set())


def read_portpool() -> set[Key] | None:
    from portpool._platform import locked_inodes

    table = locked_inodes()
    # An incomplete table (locks kept changing) answers "cannot tell" for what it lacks.
    return None if table is None or not table.complete else set(table)


WAYS: dict[str, Callable[[], set[Key] | None]] = {
    "text": read_text,
    "big": read_big,
    "union2": read_union2,
    "portpool": read_portpool,
}


def _churn(paths: list[str], pause_s: float, stop_at: float) -> None:
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
    rng = random.Random(os.getpid())
    while time.monotonic() < stop_at:
        batch = fds[: rng.randint(1, len(fds))]
        for fd in batch:
            fcntl.flock(fd, fcntl.LOCK_EX)
        time.sleep(rng.random() * pause_s)
        for fd in batch:
            fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(rng.random() * pause_s)
    os._exit(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--churners", type=int, default=8)
    p.add_argument("--files", type=int, default=50, help="files each churner locks")
    p.add_argument("--reads", type=int, default=3000, help="reads per way")
    p.add_argument("--seconds", type=float, default=15.0, help="at most, per way")
    p.add_argument("--pause", type=float, default=0.002, help="longest hold and gap, s")
    p.add_argument("--ways", default=",".join(WAYS))
    args = p.parse_args()
    if not sys.platform.startswith("linux"):
        print("Linux only: /proc/locks", file=sys.stderr)
        return 2
    ways = args.ways.split(",")
    with tempfile.TemporaryDirectory(prefix="torn-") as tmp:
        older = [os.open(os.path.join(tmp, f"old{i}"), os.O_RDWR | os.O_CREAT) for i in range(200)]
        for fd in older:
            fcntl.flock(fd, fcntl.LOCK_EX)
        stop_at = time.monotonic() + args.seconds * len(ways) + 10
        pids = []
        for c in range(args.churners):
            paths = [os.path.join(tmp, f"c{c}-{i}") for i in range(args.files)]
            pid = os.fork()
            if pid == 0:
                _churn(paths, args.pause, stop_at)
            pids.append(pid)
        held = os.open(os.path.join(tmp, "held"), os.O_RDWR | os.O_CREAT)
        st = os.fstat(held)
        key = (st.st_dev, st.st_ino)
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        holder = os.fork()
        if holder == 0:
            os.close(release_w)
            fcntl.flock(held, fcntl.LOCK_EX)
            os.write(ready_w, b"!")
            os.close(ready_w)
            os.read(release_r, 1)  # until the reader closes its end
            os._exit(0)
        os.close(held)
        os.close(ready_w)
        os.close(release_r)
        try:
            assert os.read(ready_r, 1) == b"!"
            time.sleep(0.5)
            for way in ways:
                read = WAYS[way]
                reads = missed = unknown = 0
                sizes = []
                started = time.monotonic()
                while reads < args.reads and time.monotonic() < started + args.seconds:
                    keys = read()
                    reads += 1
                    if keys is None:
                        unknown += 1
                        continue
                    sizes.append(len(keys))
                    missed += key not in keys
                ms = 1000 * (time.monotonic() - started) / max(reads, 1)
                print(
                    f"{way:9s} reads {reads:5d}  missed the held lock {missed:4d}"
                    f" ({100 * missed / max(reads, 1):5.2f}%)  cannot tell {unknown:4d}"
                    f"  locks listed ~{sum(sizes) // max(len(sizes), 1)}  {ms:.2f} ms/read",
                    flush=True,
                )
            # The holder held the lock throughout: it still waits for the pipe to close.
            assert os.waitpid(holder, os.WNOHANG) == (0, 0)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(release_w)
            os.waitpid(holder, 0)
            for fd in older:
                os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
