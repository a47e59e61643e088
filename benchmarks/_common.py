"""Shared measuring helpers for the benchmarks.

Every benchmark module exposes ``run(quick: bool = False) -> Section`` and can be run
alone (``python -m benchmarks.bench_acquire``); ``python -m benchmarks`` runs them all
into one report. Figures are medians and p99s of many samples, with ratios to the
floor measured in the same run, never absolute thresholds.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess


@dataclass
class Row:
    """One measured thing: per-call times in microseconds (or another ``unit``)."""

    name: str
    samples: list[float]
    unit: str = "us"
    note: str = ""
    # The row this one is a ratio to, when not the section's floor (a section whose
    # rows have different floors: wall time beside wall time, CPU beside CPU).
    floor: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def p99(self) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass
class Section:
    """A benchmark's result: rows, the name of the floor row for ratios, and notes."""

    title: str
    rows: list[Row] = field(default_factory=list)
    floor: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def ratio(self, row: Row) -> float | None:
        floor = row.floor or self.floor
        base = next((r for r in self.rows if r.name == floor), None)
        if base is None or not base.median:
            return None
        return row.median / base.median

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| what | median | p99 | ratio to floor | note |")
        lines.append("| --- | ---: | ---: | ---: | --- |")
        for r in self.rows:
            ratio = self.ratio(r)
            ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
            lines.append(
                f"| {r.name} | {r.median:.1f} {r.unit} | {r.p99:.1f} {r.unit} "
                f"| {ratio_text} | {r.note} |"
            )
        lines.append("")
        lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, object]:
        return {
            "title": self.title,
            "floor": self.floor,
            "rows": [
                {**asdict(r), "median": r.median, "p99": r.p99, "ratio": self.ratio(r)}
                for r in self.rows
            ],
            "notes": self.notes,
            "extra": self.extra,
        }


def leftover(ms: float) -> str:
    """``N ms`` for what is left of a whole once its parts are taken away, or "none
    measurable" when the parts (medians of separate runs, each with its noise) add up
    to the whole or more: it read "-3 ms for the rest"."""
    return f"{ms:.0f} ms" if round(ms) > 0 else "none measurable (the parts add up to it)"


def time_calls(fn: Callable[[], object], n: int, warmup: int = 50) -> list[float]:
    """Microseconds per call of ``fn``, one sample per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


@dataclass
class ProcessTimes:
    """Wall and CPU (user + system) milliseconds of each run of one whole process."""

    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def time_whole_process(
    argv: list[str], env: dict[str, str], cwd: str | None = None, into: ProcessTimes | None = None
) -> ProcessTimes:
    """Run ``argv`` once to completion, output discarded; add its wall and CPU times
    (from the kernel's accounting of that child) to ``into``. Raises RuntimeError if it
    fails, with the end of its stderr."""
    import subprocess

    into = into if into is not None else ProcessTimes()
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    err = proc.stderr.read()  # small; read before waiting so a full pipe cannot block it
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{argv} exited {proc.returncode}: {err.decode(errors='replace')[-400:]}"
        )
    into.wall_ms.append(elapsed_ms)
    into.cpu_ms.append((usage.ru_utime + usage.ru_stime) * 1000)
    return into


def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """``proc``'s exit code, waited for in one blocking call (not ``Popen.wait(timeout)``,
    which polls with sleeps doubling to 50 ms: a 20 ms process was seen at 31 ms, and a
    service start read 17 ms slower than python's own). A watchdog kills it after
    ``timeout_s`` seconds; RuntimeError then."""
    import threading

    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    if killed.is_set():
        raise RuntimeError(f"{proc.args!r} still ran after {timeout_s} s: killed")
    return code


def portpool_command() -> list[str]:
    """The installed ``portpool`` script beside this python (what users type), else
    ``python -m portpool.cli``."""
    script = Path(sys.executable).with_name("portpool")
    return [str(script)] if script.exists() else [sys.executable, "-m", "portpool.cli"]


def machine() -> str:
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )


def print_section(section: Section) -> None:
    print(f"machine: {machine()}\n")
    print(section.to_markdown())
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(section.to_json(), indent=2))


def bindable(port: int, host: str = "127.0.0.1", *, reuse_addr: bool = True) -> bool:
    """True if ``host:port`` can be bound right now; with ``reuse_addr`` (SO_REUSEADDR)
    TIME_WAIT leftovers do not count."""
    import socket

    s = socket.socket()
    try:
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError:
        return False
    finally:
        s.close()
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel gives for port 0 on ``host`` now (not held: only a number)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


def bind_listen_close(port: int, host: str = "127.0.0.1") -> None:
    """Bind ``host:port`` with SO_REUSEADDR, listen and close: the floor every way of
    getting a port is compared with."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.close()


def find_free_block(
    size: int = 20,
    low: int = 20000,
    high: int = 30000,
    *,
    host: str = "127.0.0.1",
    reuse_addr: bool = False,
) -> int:
    """The first port of ``size`` consecutive ports in ``low``..``high`` that bind on
    ``host`` right now; RuntimeError after 300 random tries.

    Stay below the ephemeral range, so outgoing connections do not wander into the
    block. ``reuse_addr``: test with SO_REUSEADDR (a port in TIME_WAIT counts as free,
    as it does for a server that sets it). The one block search of tests and benchmarks.
    """
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(300):
        base = rng.randrange(low, high - size)
        if all(bindable(p, host, reuse_addr=reuse_addr) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} free consecutive ports in {low}..{high}")


@dataclass(frozen=True)
class ProcLock:
    """One line of Linux's ``/proc/locks``: a lock held, or (``waiting``) waited for."""

    kind: str  # FLOCK, POSIX, OFDLCK, ...
    pid: int
    dev: int
    ino: int
    waiting: bool


def read_proc_locks() -> list[ProcLock]:
    """Every lock the kernel lists in ``/proc/locks`` (Linux only; OSError elsewhere).

    A waiter's line carries "->" after its number; the device is hex major:minor. The
    one parser of that file outside portpool (tests and benchmarks read the kernel
    themselves, independently of portpool's own reader).
    """
    out: list[ProcLock] = []
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            waiting = len(fields) > 1 and fields[1] == "->"
            if waiting:
                del fields[1]
            if len(fields) < 6:
                continue
            try:
                major, minor, ino = fields[5].split(":")
                dev = os.makedev(int(major, 16), int(minor, 16))
                out.append(ProcLock(fields[1], int(fields[4]), dev, int(ino), waiting))
            except ValueError:
                continue
    return out
