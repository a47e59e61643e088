"""The shield's cost: one check per lease, and the CPU of a shield left running.

The floor is the kernel reads one check cannot avoid, shared by all leases: the flock
table (``/proc/locks``) and the listening sockets (sock_diag). For reference, parsing
``/proc/net/tcp`` and ``tcp6`` instead walks the kernel's whole connection hash: on a
host with a large hash that alone is several milliseconds.

A check per lease adds: stat of the lock path, open+read+close of the record, and
three socket calls (getsockname, SO_ACCEPTCONN, fstat for the inode).

Run: ``python -m benchmarks.bench_shield`` (``--quick`` for fewer samples, shorter run).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from benchmarks._common import Row, Section, find_free_block, print_section, time_calls


def _free_block(size: int) -> int:
    """First port of ``size`` consecutive ports that bind on 127.0.0.1 now."""
    return find_free_block(size, 23000, 24000)


def _thread_cpu_s(native_id: int | None) -> float | None:
    """CPU seconds of one thread of this process, where the OS says.

    Linux's schedstat counts nanoseconds; psutil's per-thread times count clock ticks
    (10 ms), too coarse for a thread that works ~2 ms a second.
    """
    import psutil

    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return None


def run(quick: bool = False) -> Section:
    """Per-lease check cost (1 and 20 leases) and the running shield's CPU share."""
    from portpool._platform import listeners, locked_inodes
    from portpool._platform._net import _proc_net_listeners
    from portpool.pool import acquire
    from portpool.shield import Shield
    from portpool.statedir import StateDir

    n_one, n_twenty = (300, 100) if quick else (3000, 600)
    cpu_window_s = 6.0 if quick else 30.0
    section = Section("shield: one check, and CPU while running", floor="kernel reads (floor)")

    def floor() -> None:
        locked_inodes()
        listeners()

    section.rows.append(
        Row(
            "kernel reads (floor)",
            time_calls(floor, n_one),
            note="/proc/locks + sock_diag listeners, once per check",
        )
    )
    section.rows.append(
        Row(
            "/proc/net/tcp+tcp6 parse (reference)",
            time_calls(lambda: _proc_net_listeners(None), max(50, n_twenty // 4), warmup=5),
            note="what sock_diag replaces",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.open(os.path.join(tmp, "state"))
        base = _free_block(20)
        leases = [
            acquire(state, [base + i], app="bench", instance=1, service=f"svc-{i}")
            for i in range(20)
        ]
        try:
            one = Shield(leases[:1], interval_s=1, on_lost=lambda lease, reason: None)
            twenty = Shield(leases, interval_s=1, on_lost=lambda lease, reason: None)
            assert all(r.ok for r in twenty.check_once()), "benchmark leases must be healthy"
            section.rows.append(
                Row("check, 1 lease", time_calls(one.check_once, n_one), note="per lease")
            )
            whole = time_calls(twenty.check_once, n_twenty)
            section.rows.append(Row("check, 20 leases (whole check)", whole))
            section.rows.append(
                Row("check, 20 leases (per lease)", [s / 20 for s in whole], note="per lease")
            )

            trips: list[str] = []
            shield = Shield(leases, interval_s=1.0, on_lost=lambda lease, r: trips.append(r))
            cpu0 = time.process_time()
            wall0 = time.monotonic()
            shield.start()
            thread = shield._thread
            native_id = thread.native_id if thread is not None else None
            time.sleep(cpu_window_s)
            thread_cpu = _thread_cpu_s(native_id)
            cpu = time.process_time() - cpu0
            wall = time.monotonic() - wall0
            shield.stop(timeout=5)
        finally:
            for lease in leases:
                lease.release()
            state.close()

    share = 100 * cpu / wall
    thread_share = None if thread_cpu is None else 100 * thread_cpu / wall
    per_lease = next(r for r in section.rows if r.name == "check, 20 leases (per lease)")
    single = next(r for r in section.rows if r.name == "check, 1 lease")
    section.notes.append(
        f"one check per lease: {single.median:.0f} us alone, {per_lease.median:.0f} us "
        f"among 20 (target < 1000 us)"
    )
    thread_text = "n/a" if thread_share is None else f"{thread_share:.3f}%"
    section.notes.append(
        f"CPU with 20 leases at a 1 s interval over {wall:.0f} s: shield thread "
        f"{thread_text}, whole process {share:.3f}% while the main thread sleeps "
        f"(target < 0.5%)"
    )
    section.notes.append(f"trips during the CPU run: {len(trips)} (must be 0)")
    section.extra.update(
        {
            "process_cpu_percent": share,
            "thread_cpu_percent": thread_share,
            "wall_s": wall,
            "trips": len(trips),
        }
    )
    return section


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv))
