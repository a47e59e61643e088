"""Acquire+release of a port, against the physical floor and against portpicker.

The floor is what any exclusive reservation must do at least: create a socket, bind it
on 127.0.0.1, listen, close. portpool adds a kernel lock, an identity check of the lock
file, and one in-place metadata write and erase. ``portpicker.pick_unused_port()`` is
the popular "find a free port" answer; it gives no exclusivity at all (the port is free
when picked and anyone's a moment later), so it is a speed reference, not a peer.

Run: ``python -m benchmarks.bench_acquire`` (``--quick`` for fewer samples).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable

from benchmarks._common import Row, Section, bind_listen_close, free_port, print_section


def _interleaved(fns: list[Callable[[], object]], n: int, warmup: int = 50) -> list[list[float]]:
    """Microseconds per call of each fn, sampled in turn (a, b, c, a, b, c, ...).

    On a shared machine the load changes from second to second; taking the samples in
    turn exposes every contender to the same conditions, so their ratios stay fair.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter_ns
    for _ in range(n):
        for fn, out in zip(fns, samples, strict=True):
            t0 = clock()
            fn()
            out.append((clock() - t0) / 1000)
    return samples


def run(quick: bool = False) -> Section:
    """Median and p99 of floor, portpool acquire+release, portpicker pick."""
    import portpicker

    from portpool.pool import acquire
    from portpool.statedir import StateDir

    n = 500 if quick else 5000
    section = Section("acquire + release of one port", floor="bind+listen+close (floor)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.open(os.path.join(tmp, "state"))
        try:

            def portpool_cycle() -> None:
                acquire(state, [port], app="bench", instance=1, service="svc").release()

            floor, pp, pick = _interleaved(
                [lambda: bind_listen_close(port), portpool_cycle, portpicker.pick_unused_port], n
            )
        finally:
            state.close()
    section.rows += [
        Row("bind+listen+close (floor)", floor, note="raw socket"),
        Row(
            "portpool acquire+release",
            pp,
            note="1-port pool: lock, bind, listen, record; close, erase, unlock",
        ),
        Row(
            "portpicker.pick_unused_port()",
            pick,
            note="no exclusivity: free when picked, anyone's after",
        ),
    ]
    pp_row, pick_row = section.rows[1], section.rows[2]
    ratio = section.ratio(pp_row)
    section.notes.append(
        f"portpool vs portpicker: {pp_row.median / pick_row.median:.2f}x of its median "
        "(target: <= 1x); vs floor: "
        + (f"{ratio:.2f}x" if ratio is not None else "n/a")
        + " (target: <= 3x)"
    )
    section.notes.append(
        f"{n} samples each, taken in turn after 50 warm-up rounds; one process, no contention"
    )
    section.extra["samples"] = n
    return section


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
