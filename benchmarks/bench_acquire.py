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
import socket
import sys
import tempfile

from benchmarks._common import Row, Section, print_section, time_calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _floor(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.close()


def run(quick: bool = False) -> Section:
    """Median and p99 of floor, portpool acquire+release, portpicker pick."""
    import portpicker

    from portpool.pool import acquire
    from portpool.statedir import StateDir

    n = 500 if quick else 5000
    section = Section("acquire + release of one port", floor="bind+listen+close (floor)")
    port = _free_port()
    section.rows.append(
        Row("bind+listen+close (floor)", time_calls(lambda: _floor(port), n), note="raw socket")
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.open(os.path.join(tmp, "state"))
        try:

            def portpool_cycle() -> None:
                acquire(state, [port], app="bench", instance=1, service="svc").release()

            section.rows.append(
                Row(
                    "portpool acquire+release",
                    time_calls(portpool_cycle, n),
                    note="1-port pool: lock, bind, listen, record; close, erase, unlock",
                )
            )
        finally:
            state.close()

    def pick() -> None:
        portpicker.pick_unused_port()

    section.rows.append(
        Row(
            "portpicker.pick_unused_port()",
            time_calls(pick, n),
            note="no exclusivity: free when picked, anyone's after",
        )
    )
    pp = next(r for r in section.rows if r.name.startswith("portpool"))
    pk = next(r for r in section.rows if r.name.startswith("portpicker"))
    ratio = section.ratio(pp)
    section.notes.append(
        f"portpool vs portpicker: {pp.median / pk.median:.2f}x of its median "
        "(target: <= 1x); vs floor: "
        + (f"{ratio:.2f}x" if ratio is not None else "n/a")
        + " (target: <= 3x)"
    )
    section.notes.append(f"{n} samples each, after 50 warm-up calls; one process, no contention")
    section.extra["samples"] = n
    return section


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
