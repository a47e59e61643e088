"""The pytest plugin: cost per ``portpool_port`` beside the peers' pick, and one load.

Part 1 times, in one process, what each fixture does for a test besides pytest's own
fixture machinery (the same for every fixture): the raw floor (socket, bind, listen,
close); the plugin's ``portpool_port`` work (lock the next port of the range, bind and
listen, write the record, close the socket keeping the lock, check a bind without
SO_REUSEADDR would succeed; at teardown erase the record and unlock); its
``portpool_lease`` work (the same without the check, the socket kept); pytest-asyncio's
``unused_tcp_port`` pick (bind port 0, read the number, close); and
``portpicker.pick_unused_port()``.

Part 2 is the load of the plugin's own test: two concurrent ``pytest -n 4`` sessions of
the same N tests, each test binding the port its fixture gave WITHOUT SO_REUSEADDR and
serving one HTTP request on it (the server closes first, leaving TIME_WAIT as a real
server does), run once with ``portpool_port``, once with pytest-asyncio's real
``unused_tcp_port`` fixture, once with a fixture returning
``portpicker.pick_unused_port()``. Counted: bind failures, and overlaps (one port in
use by two tests at the same time).

Run: ``python -m benchmarks.bench_pytest`` (``--quick`` for fewer samples and tests).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks._common import (
    Row,
    Section,
    bind_listen_close,
    find_free_block,
    print_section,
    time_calls,
)
from benchmarks._sessions import count_log, run_serving_sessions, serve_tests

HOST = "127.0.0.1"
FLOOR = "bind+listen+close (floor)"
PORTPOOL_PORT = "portpool_port (take + release)"
TARGET_US = 100.0

# fixture used by the test -> extra conftest text it needs
KINDS = {
    "portpool_port": "",
    "unused_tcp_port": "",  # pytest-asyncio's own fixture
    "portpicker_port": (
        "import portpicker, pytest\n\n"
        "@pytest.fixture\n"
        "def portpicker_port():\n"
        "    return portpicker.pick_unused_port()\n"
    ),
}

# ---------------------------------------------------------------- part 1: cost per pick


def free_block(size: int, low: int = 10000, high: int = 19999) -> int:
    """The first of ``size`` consecutive loopback ports bindable now (below the ephemeral
    range, and apart from the blocks the test suite picks)."""
    return find_free_block(size, low, high, host=HOST, reuse_addr=True)


def per_call_rows(quick: bool) -> list[Row]:
    import portpicker
    from pytest_asyncio.plugin import _unused_port

    from portpool import StateDir
    from portpool._pytest_source import _PortSource

    n = 300 if quick else 3000
    port = free_block(1)
    rows = [Row(FLOOR, time_calls(lambda: bind_listen_close(port, HOST), n), note="raw socket")]
    # Each call takes the next port of the range, as in a session. The first use of a
    # port on a host creates its lock and record files; later runs reopen them.
    size = n + 60
    base = free_block(size)
    with tempfile.TemporaryDirectory() as tmp:
        source = _PortSource(base, base + size - 1, 0, StateDir.open(os.path.join(tmp, "s")))

        def take_port() -> None:
            source.take(free_of_sockets=True).release()

        def take_lease() -> None:
            source.take(free_of_sockets=False).release()

        try:
            first = time_calls(take_port, n)
            source.cursor = 0
            rows.append(
                Row(
                    PORTPOOL_PORT,
                    time_calls(take_port, n),
                    note="lock, bind, listen, record, close, check bind w/o SO_REUSEADDR; "
                    "erase, unlock (the port's files exist: a range used before)",
                )
            )
            rows.append(
                Row(
                    f"{PORTPOOL_PORT}, first use of each port",
                    first,
                    note="the same, creating the port's lock and record files",
                )
            )
            source.cursor = 0
            rows.append(
                Row(
                    "portpool_lease (take + release)",
                    time_calls(take_lease, n),
                    note="the same, the listening socket kept instead of the check",
                )
            )
        finally:
            source.close()
    rows.append(
        Row(
            "unused_tcp_port (pytest-asyncio)",
            time_calls(lambda: _unused_port(socket.SOCK_STREAM), n),
            note="bind port 0, read it, close: no hold",
        )
    )
    rows.append(
        Row(
            "portpicker.pick_unused_port()",
            time_calls(portpicker.pick_unused_port, n),
            note="binds TCP and UDP on port 0, closes; no hold",
        )
    )
    return rows


# ---------------------------------------------------------------- part 2: the load


@dataclass
class LoadResult:
    """Two concurrent ``pytest -n 4`` sessions of ``tests`` serving tests each."""

    fixture: str
    tests: int
    served: int
    bind_failures: int
    overlaps: int
    distinct_ports: int
    seconds: float


def load(fixture: str, tests: int) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        low = free_block(3 * tests)
        ini = "asyncio_default_fixture_loop_scope = function\n"
        ini += f"portpool_port_range = {low}-{low + 3 * tests - 1}\n"
        text = serve_tests(tests, fixture, fail_on_bind_error=False)
        t0 = time.perf_counter()
        done, lines = run_serving_sessions(
            Path(tmp), text, ini, conftest=KINDS[fixture], timeout_s=600
        )
        seconds = time.perf_counter() - t0
    for status, out in done:
        if status != 0:
            raise RuntimeError(f"{fixture}: a session failed:\n{out[-2000:]}")
    served, failures, overlaps, distinct = count_log(lines)
    return LoadResult(fixture, tests, served, failures, overlaps, distinct, seconds)


def load_table(results: list[LoadResult]) -> str:
    lines = [
        "Concurrent load: two `pytest -n 4` sessions at once, each test binds its port "
        "without SO_REUSEADDR and serves one request:",
        "",
        "| fixture | tests | served | bind failures | overlaps | distinct ports | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.fixture} | {2 * r.tests} | {r.served} | {r.bind_failures} | {r.overlaps} "
            f"| {r.distinct_ports} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the section


def run(quick: bool = False) -> Section:
    """Cost per pick of each fixture, then the same concurrent load with each."""
    section = Section("pytest fixtures: portpool_port against unused_tcp_port", floor=FLOOR)
    section.rows.extend(per_call_rows(quick))
    tests = 100 if quick else 300
    results = [load(fixture, tests) for fixture in KINDS]
    section.extra["load"] = [asdict(r) for r in results]
    pp = next(r for r in section.rows if r.name == PORTPOOL_PORT)
    verdict = "met" if pp.median < TARGET_US else "MISSED"
    section.notes.append(
        f"portpool_port median {pp.median:.1f} us: target < {TARGET_US:.0f} us {verdict} "
        f"(state dir {tempfile.gettempdir()}, as PORTPOOL_HOME there; the user's default is "
        "$XDG_RUNTIME_DIR, a tmpfs, where file creation is cheaper)."
    )
    honest = []
    for row in section.rows:
        if row.name == FLOOR or row.name.startswith("portpool") or row.median >= pp.median:
            continue
        honest.append(
            f"{PORTPOOL_PORT} ({pp.median:.0f} us) is {pp.median / row.median:.1f}x "
            f"{row.name} ({row.median:.0f} us): it locks the port for the test until "
            "teardown and proves a server without SO_REUSEADDR can bind it; the pick "
            "probes and lets go, so nothing stops another worker, run or TIME_WAIT."
        )
    section.extra["honest"] = honest
    section.notes.append(load_table(results))
    return section


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv))
