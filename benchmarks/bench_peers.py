"""portpool against its peers: cost per call, and who hands one port to two racers.

Part 1 times one call of each, side by side in the same run: the raw floor (socket,
bind 127.0.0.1, listen, close), portpool (acquire+release of a 1-port pool in a
temporary state dir), ``portpicker.pick_unused_port()``, ``ephemeral_port_reserve.
reserve()`` and ``port_for.select_random()``, each called as its README shows.

Part 2 is the same race for each: N processes start each round at one barrier and
each wants a port of the same P-port pool, then holds what it got until every racer
has tried. portpool racers call ``pool.acquire``. Peer racers use the peer as its
README says and then bind the port the way a server does (SO_REUSEADDR, as
http.server, asyncio and most servers set it on POSIX) right after the pick, the
kindest timing for them:

- portpicker: the first port of the pool ``is_port_free()`` says is free;
- ephemeral_port_reserve: ``reserve(ip, port)`` for each pool port until it returns
  that port (it falls back to a random port when the one asked for is busy);
- port_for: ``select_random(ports=pool)`` (README: ``get_port({4001, 4003, 4005})``).

A second race gives each peer no pool at all (its default call, any port), which is
how the peers are mostly used: collisions are rarer there, but no two starts get the
same port, so services cannot find each other by number.

A double allocation is a racer that was told a port another racer of the same round
was also told, or whose bind then failed because someone else had the port.

Run: ``python -m benchmarks.bench_peers`` (``--quick`` for fewer samples and rounds).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks._common import (
    Row,
    Section,
    bind_listen_close,
    find_free_block,
    free_port,
    print_section,
    time_calls,
)

HOST = "127.0.0.1"
FLOOR = "bind+listen+close (floor)"
PORTPOOL = "portpool acquire+release"
PEERS = ("portpicker", "ephemeral_port_reserve", "port_for")
BARRIER_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- helpers


def free_block(size: int, low: int = 30000, high: int = 32700) -> list[int]:
    """``size`` consecutive loopback ports that are bindable now (below the ephemeral
    range, so no outgoing connection lands on them mid-race)."""
    base = find_free_block(size, low, high, host=HOST, reuse_addr=True)
    return list(range(base, base + size))


def _server_bind(port: int) -> socket.socket | None:
    """Bind and listen like a typical server would (SO_REUSEADDR); None if refused."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        s.listen(16)
    except OSError:
        s.close()
        return None
    return s


def _budgeted(fn: Callable[[], object], n: int, budget_s: float) -> list[float]:
    """``time_calls`` with the sample count cut so one row takes about ``budget_s``."""
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    per_call = (time.perf_counter() - t0) / 5
    count = max(30, min(n, int(budget_s / max(per_call, 1e-7))))
    return time_calls(fn, count, warmup=min(50, count // 5))


# ---------------------------------------------------------------- part 1: cost per call


def per_call_rows(quick: bool) -> list[Row]:
    """Median/p99 per call of the floor, portpool and each peer, in one process."""
    import ephemeral_port_reserve
    import port_for
    import portpicker

    from portpool.pool import acquire
    from portpool.statedir import StateDir

    n = 300 if quick else 3000
    budget_s = 1.0 if quick else 6.0
    rows = []
    port = free_port(HOST)
    rows.append(
        Row(FLOOR, _budgeted(lambda: bind_listen_close(port), n, budget_s), note="raw socket")
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.open(os.path.join(tmp, "state"))
        try:

            def cycle() -> None:
                acquire(state, [port], app="bench", instance=1, service="svc").release()

            rows.append(
                Row(
                    PORTPOOL,
                    _budgeted(cycle, n, budget_s),
                    note="1-port pool: lock, bind, listen, record; close, erase, unlock",
                )
            )
        finally:
            state.close()
    rows.append(
        Row(
            "portpicker.pick_unused_port()",
            _budgeted(portpicker.pick_unused_port, n, budget_s),
            note="binds TCP and UDP on port 0, closes; no hold",
        )
    )
    rows.append(
        Row(
            "ephemeral_port_reserve.reserve()",
            _budgeted(ephemeral_port_reserve.reserve, n, budget_s),
            note="bind, listen, connect, accept: leaves the port in TIME_WAIT",
        )
    )
    rows.append(
        Row(
            "port_for.select_random()",
            _budgeted(port_for.select_random, n, budget_s),
            note="builds its set of 'good' ports, then connect+bind probes",
        )
    )
    return rows


# ---------------------------------------------------------------- part 2: the race


@dataclass(frozen=True)
class Attempt:
    """What one racer got in one round: the port it was told (None: refused/exhausted),
    and whether binding that port then succeeded."""

    round: int
    racer: int
    port: int | None
    bound: bool
    error: str | None = None  # the peer raised instead of giving a port


def _pick_portpicker(pool: list[int] | None) -> int | None:
    import portpicker

    if pool is None:
        return int(portpicker.pick_unused_port())
    for port in pool:
        if portpicker.is_port_free(port):
            return port
    return None


def _pick_reserve(pool: list[int] | None) -> int | None:
    import ephemeral_port_reserve

    if pool is None:
        return int(ephemeral_port_reserve.reserve(HOST))
    for port in pool:
        got = int(ephemeral_port_reserve.reserve(HOST, port))
        if got == port:
            return port
    return None  # it handed out a random port instead: not the pool's, so refused


def _pick_port_for(pool: list[int] | None) -> int | None:
    import port_for

    try:
        if pool is None:
            return int(port_for.select_random())
        return int(port_for.select_random(ports=set(pool)))
    except port_for.PortForException:
        return None


_PICKERS: dict[str, Callable[[list[int] | None], int | None]] = {
    "portpicker": _pick_portpicker,
    "ephemeral_port_reserve": _pick_reserve,
    "port_for": _pick_port_for,
}


@dataclass(frozen=True)
class RaceSpec:
    """What every racer of one race is told: who it plays, the pool, how many rounds."""

    kind: str
    pool: list[int] | None
    rounds: int
    state_path: str


def _racer(spec: RaceSpec, index: int, barrier: Any, results: Any) -> None:
    """One racing process: per round, wait for all, try once, hold, wait, release."""
    kind, pool, rounds = spec.kind, spec.pool, spec.rounds
    attempts: list[Attempt] = []
    state = None
    if kind == "portpool":
        from portpool.errors import PoolExhausted
        from portpool.pool import acquire
        from portpool.statedir import StateDir

        state = StateDir.open(spec.state_path)
    try:
        for r in range(rounds):
            barrier.wait(BARRIER_TIMEOUT_S)
            held: Any = None
            if kind == "portpool":
                assert state is not None
                assert pool is not None
                try:
                    held = acquire(state, pool, app="race", instance=1, service="svc")
                    attempts.append(Attempt(r, index, held.port, True))
                except PoolExhausted:
                    attempts.append(Attempt(r, index, None, False))
            else:
                try:
                    port = _PICKERS[kind](pool)
                except Exception as e:  # the peer itself failed under contention
                    attempts.append(Attempt(r, index, None, False, f"{type(e).__name__}: {e}"))
                else:
                    if port is not None:
                        held = _server_bind(port)
                    attempts.append(Attempt(r, index, port, held is not None))
            barrier.wait(BARRIER_TIMEOUT_S)  # everyone has tried; winners hold now
            if held is not None:
                (held.release if kind == "portpool" else held.close)()
            barrier.wait(BARRIER_TIMEOUT_S)  # everyone released: next round starts clean
    except BaseException as e:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, f"{type(e).__name__}: {e}"))
        return
    finally:
        if state is not None:
            state.close()
    results.put((index, attempts))


@dataclass
class RaceResult:
    """Counts of one race: rounds, ports handed out, and double allocations."""

    kind: str
    pooled: bool
    racers: int
    rounds: int
    told: int = 0  # racers told a port
    bound: int = 0  # racers that then held it
    shared: int = 0  # racers told a port another racer of the round was also told
    bind_failed: int = 0  # racers told a port they then could not bind
    double_allocations: int = 0  # racers hit by either of the above
    distinct_ports: int = 0
    peer_errors: int = 0  # calls of the peer that raised
    first_error: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def count(kind: str, pooled: bool, racers: int, rounds: int, attempts: list[Attempt]) -> RaceResult:
    """Double allocations per round from every racer's attempts."""
    result = RaceResult(kind, pooled, racers, rounds)
    by_round: dict[int, list[Attempt]] = {}
    for a in attempts:
        by_round.setdefault(a.round, []).append(a)
    ports: set[int] = set()
    for group in by_round.values():
        told = Counter(a.port for a in group if a.port is not None)
        for a in group:
            if a.error is not None:
                result.peer_errors += 1
                result.first_error = result.first_error or a.error
            if a.port is None:
                continue
            ports.add(a.port)
            result.told += 1
            result.bound += a.bound
            shared = told[a.port] > 1
            result.shared += shared
            result.bind_failed += not a.bound
            result.double_allocations += shared or not a.bound
    result.distinct_ports = len(ports)
    return result


def race(kind: str, pool: list[int] | None, racers: int, rounds: int) -> RaceResult:
    """Run ``racers`` processes for ``rounds`` rounds and count double allocations."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
    barrier = ctx.Barrier(racers)
    results = ctx.Queue()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = RaceSpec(kind, pool, rounds, os.path.join(tmp, "state"))
        procs = [
            ctx.Process(target=_racer, args=(spec, i, barrier, results), daemon=True)
            for i in range(racers)
        ]
        if kind == "portpool":
            from portpool.statedir import StateDir

            StateDir.open(os.path.join(tmp, "state")).close()  # created once, not raced
        for p in procs:
            p.start()
        attempts: list[Attempt] = []
        errors = []
        deadline = time.monotonic() + BARRIER_TIMEOUT_S + rounds * 2.0
        for _ in procs:
            _, got = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if isinstance(got, str):
                errors.append(got)
            else:
                attempts.extend(got)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        # The racer that failed first aborted the barrier: report it, not the others.
        errors.sort(key=lambda e: e.startswith("BrokenBarrierError"))
        raise RuntimeError(f"{kind} racers failed: {errors[0]}")
    result = count(kind, pool is not None, racers, rounds, attempts)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- the section


def run(quick: bool = False) -> Section:
    """Per-call cost of portpool and each peer, then the same race for each."""
    racers, pool_size, rounds = (16, 3, 10) if quick else (16, 3, 50)
    section = Section("portpool against its peers", floor=FLOOR)
    section.rows.extend(per_call_rows(quick))

    races: list[RaceResult] = []
    block = free_block(pool_size * (1 + len(PEERS)))
    pools = {
        kind: block[i * pool_size : (i + 1) * pool_size]
        for i, kind in enumerate(("portpool", *PEERS))
    }
    races.append(race("portpool", pools["portpool"], racers, rounds))
    for kind in PEERS:
        races.append(race(kind, pools[kind], racers, rounds))
    for kind in PEERS:
        races.append(race(kind, None, racers, rounds))

    pp = next(r for r in section.rows if r.name == PORTPOOL)
    section.extra["race"] = {
        "racers": racers,
        "pool_size": pool_size,
        "rounds": rounds,
        "results": [r.to_dict() for r in races],
    }
    honest = []
    ratios: dict[str, float] = {}
    for row in section.rows:
        if row.name in (FLOOR, PORTPOOL):
            continue
        peer = row.name.split(".")[0]
        ratios[peer] = pp.median / row.median
        if row.median < pp.median:
            honest.append(
                f"portpool acquire+release ({pp.median:.0f} us) is "
                f"{pp.median / row.median:.1f}x slower than {row.name} ({row.median:.0f} us): "
                "it takes a kernel lock on a file, checks the file is still the one locked, "
                "writes and erases a metadata record, and holds a listening socket; "
                f"{peer} picks a port and lets it go, which is why it cannot "
                "promise the port to anyone."
            )
    section.extra["honest"] = honest
    section.extra["ratios"] = ratios
    section.notes.append(race_table(races))
    section.notes.append(
        f"Race: {racers} processes x a {pool_size}-port pool x {rounds} rounds; each round "
        "starts at one barrier, winners hold until all have tried. 'pool' = all racers want "
        "the same pool; 'any port' = the peer's default call. Peers bind right after the "
        "pick (SO_REUSEADDR, like most servers), the kindest timing for them."
    )
    section.notes.append(
        "portpool's median over each peer's: "
        + ", ".join(f"{k} {v:.3g}x" for k, v in ratios.items())
    )
    return section


def race_table(races: list[RaceResult]) -> str:
    """The race counts as a Markdown table (one line per race)."""
    lines = [
        "Double allocations in the race:",
        "",
        "| who | pool | told a port | held it | shared with another racer "
        "| bind failed | double allocations | distinct ports | peer errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in races:
        lines.append(
            f"| {r.kind} | {'pool' if r.pooled else 'any port'} | {r.told} | {r.bound} "
            f"| {r.shared} | {r.bind_failed} | **{r.double_allocations}** | {r.distinct_ports} "
            f"| {r.peer_errors} |"
        )
    errors = [f"{r.kind}: {r.first_error}" for r in races if r.first_error]
    if errors:
        lines += ["", "Peer errors (the call raised; counted as no port): " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
