"""Instance start-up in-process, and ``portpool status --json`` as a whole process.

1. ``start_instance`` of the default layout (slot + 6 leases + record, the stale-record
   sweep and the heartbeat thread included, as ``up`` does it), then its release.
   Target: start under 1 ms median. The layout is shifted to free ports in
   20000-29999, clear of a running app's own and of the ephemeral range (the report
   says where).
2. ``python -m portpool.cli status --json`` with 10 live instances held by this
   process, against ``python -c pass`` and ``python -c "import portpool.cli"``.
   Target: within 2x of the import line (= python start-up + the CLI's import cost).
3. The same command with 1,000 instance records of a 50-service layout: the first ones
   live instances held here, the rest records left by dead instances (a record and an
   unlocked lock file, as a kill -9 leaves them), written from a real record as
   template. Target: under 300 ms.

If a target is missed, the section's notes say where the time goes (``-X importtime``
and cProfile of the slow command).

Run: ``python -m benchmarks.bench_instance`` (``--quick`` for fewer samples).
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import io
import json
import os
import pstats
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks._common import Row, Section, bindable, print_section

if TYPE_CHECKING:
    from portpool.instance import Instance
    from portpool.layout import Layout
    from portpool.statedir import StateDir

PY = sys.executable
STATUS = "portpool status --json"


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for timed child processes: byte-code caching on, as for an
    installed package, but cached in a private directory (never beside the sources,
    where a stale cache could hide someone's edit)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault(
        "PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), f"portpool-bench-{os.getuid()}")
    )
    env.update(extra)
    return env


def _layout_ports_free(layout: Layout, instances: int) -> bool:
    return all(
        bindable(port)
        for n in range(1, instances + 1)
        for pool in layout.pools(n).values()
        for port in pool
    )


def choose_layout(instances: int = 10) -> tuple[Layout, str]:
    """The default layout, shifted to where its first ``instances`` instances' ports are
    all free in 20000-29999, with a description. Never its own ports (6000-9xxx): a
    user's running app uses them, and the benchmark bound them under it. Never the
    ephemeral range either (32768-60999 on Linux): the shift once went to 40000-41999,
    where an outgoing connection took a port another benchmark bound without fallback."""
    from portpool.layout import default_layout

    layout = default_layout()
    top = max(p for pool in layout.pools(instances).values() for p in pool)
    first = layout.services[0].base
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(50):
        offset = 20000 - first + 10 * rng.randrange(0, (29999 - top - (20000 - first)) // 10)
        shifted = layout.with_changes(
            services=tuple(dataclasses.replace(s, base=s.base + offset) for s in layout.services)
        )
        if _layout_ports_free(shifted, instances):
            return shifted, (
                f"the default layout shifted by +{offset} (from {first + offset}): its own ports "
                "are a running app's, and the shift stays below the ephemeral range"
            )
    raise RuntimeError("no free spot for the default layout in 20000-29999")


def layout_toml(layout: object) -> str:
    """A layout file describing ``layout`` (services without commands)."""
    from portpool.layout import Layout

    assert isinstance(layout, Layout)
    lines = [
        f"app = {json.dumps(layout.app)}",
        f"host = {json.dumps(layout.host)}",
        f"heartbeat_interval = {layout.heartbeat_interval_s}",
        f"shield_interval = {layout.shield_interval_s}",
        f"max_instances = {layout.max_instances}",
    ]
    for s in layout.services:
        lines += ["", f"[services.{s.name}]", f"base = {s.base}", f"size = {s.size}"]
        lines.append(f"stride = {s.stride}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def temp_home() -> Iterator[Path]:
    """A fresh private state dir path (PORTPOOL_HOME) for one measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "state"


# ---------------------------------------------------------------- 1. start in-process


def instance_rows(layout: object, n: int) -> list[Row]:
    """Per-call times of start_instance (as ``up`` calls it, and bare) and release."""
    from portpool.instance import start_instance
    from portpool.layout import Layout
    from portpool.statedir import StateDir

    assert isinstance(layout, Layout)
    starts: list[float] = []
    releases: list[float] = []
    bare: list[float] = []
    with temp_home() as home:
        state = StateDir.open(str(home))
        try:
            for i in range(n + 50):
                t0 = time.perf_counter_ns()
                inst = start_instance(layout, state=state)
                t1 = time.perf_counter_ns()
                inst.release()
                t2 = time.perf_counter_ns()
                if i >= 50:  # warm-up
                    starts.append((t1 - t0) / 1000)
                    releases.append((t2 - t1) / 1000)
            for i in range(n + 50):
                t0 = time.perf_counter_ns()
                inst = start_instance(layout, state=state, heartbeat=False, clean=False)
                t1 = time.perf_counter_ns()
                inst.release()
                if i >= 50:
                    bare.append((t1 - t0) / 1000)
        finally:
            state.close()
    services = len(layout.services)
    return [
        Row(
            "start_instance (as `up`: sweep + slot + leases + record + heartbeat thread)",
            starts,
            note=f"{services} services; target < 1000 us median",
        ),
        Row(
            "start_instance, no sweep, no heartbeat thread",
            bare,
            note="slot + leases + record only",
        ),
        Row("Instance.release()", releases, note="leases, slot, record removed"),
    ]


def encoder_row(start: Row, services: int, n: int) -> tuple[Row, str]:
    """Per-call time of encoding a port record, and its share of an instance's start.

    Every lease writes one record when taken, so a start encodes ``services`` of them.
    This is the figure behind the rule that the encoder stays plain ``json.dumps``: a
    faster encoder can save at most this share of the start.
    """
    from portpool._record import PortRecord, encode_record

    samples = []
    now = time.time()
    for i in range(n + 50):
        # A new record each call, as each lease's first write is (nothing to reuse).
        record = PortRecord(
            6000 + i % 1000,
            4_000_000 + i,
            str(1000 + i),
            "b" * 36,
            "app",
            1,
            "api",
            "::1",
            now,
            now,
        )
        t0 = time.perf_counter_ns()
        encode_record(record)
        if i >= 50:
            samples.append((time.perf_counter_ns() - t0) / 1000)
    row = Row("encode_record (a port record, plain json.dumps)", samples, note="per call")
    share = 100 * services * row.median / start.median
    note = (
        f"Port records: {services} encodes per start = {services * row.median:.0f} us, "
        f"{share:.1f}% of start_instance's median (a speed trick must be worth >= 10%)."
    )
    return row, note


# ---------------------------------------------------------------- 2, 3. status processes


def time_process(argv: Sequence[str], env: dict[str, str], cwd: str) -> float:
    """Wall time of one run of ``argv`` in milliseconds; raises if it fails."""
    return run_process(argv, env, cwd)[0]


def run_process(argv: Sequence[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run of ``argv``, in milliseconds;
    raises if it fails. CPU time is the steadier figure on a shared machine: waiting
    for a core counts in the wall time only."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter_ns()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=60, check=False)
    elapsed = (time.perf_counter_ns() - t0) / 1e6
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[2:]} failed: {done.stderr.decode(errors='replace')[-400:]}")
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    return elapsed, cpu


def status_argv(config: str | None) -> list[str]:
    argv = [PY, "-m", "portpool.cli", "status", "--json"]
    return [*argv, "--config", config] if config else argv


def check_status(env: dict[str, str], cwd: str, config: str | None, expect: int) -> dict[str, int]:
    """Run status once and check it lists ``expect`` instances; counts by liveness."""
    done = subprocess.run(
        status_argv(config), env=env, cwd=cwd, capture_output=True, timeout=60, check=True
    )
    doc = json.loads(done.stdout)
    instances = doc["instances"]
    if len(instances) != expect:
        raise RuntimeError(f"status listed {len(instances)} instances, expected {expect}")
    alive = sum(1 for i in instances if i["alive"])
    return {"instances": len(instances), "alive": alive}


def where_time_goes(argv: Sequence[str], env: dict[str, str], cwd: str) -> list[str]:
    """The slowest imports (-X importtime) and functions (cProfile) of one run."""
    notes = []
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=60,
        check=False,
    )
    imports: list[tuple[int, str]] = []
    for line in done.stderr.decode(errors="replace").splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            if len(name) - len(name.lstrip()) <= 2:  # top-level imports only
                imports.append((int(parts[1]), name.strip()))
    imports.sort(reverse=True)
    total = sum(us for us, _ in imports)
    notes.append(
        f"imports: {total / 1000:.0f} ms in all; slowest: "
        + ", ".join(f"{name} {us / 1000:.1f} ms" for us, name in imports[:6])
    )
    with tempfile.NamedTemporaryFile(suffix=".prof", delete=False) as f:
        prof = f.name
    try:
        subprocess.run(
            [argv[0], "-m", "cProfile", "-o", prof, *argv[1:]],
            env=env,
            cwd=cwd,
            capture_output=True,
            timeout=120,
            check=False,
        )
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        rows = []
        for func, (_, _, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
            filename, _, name = func
            if "portpool" in filename and "cli.py" not in filename:
                rows.append((ct, tt, f"{Path(filename).name}:{name}"))
        rows.sort(reverse=True)
        notes.append(
            "cProfile, cumulative in portpool (excluding the CLI wrapper): "
            + ", ".join(f"{name} {ct * 1000:.0f} ms" for ct, _, name in rows[:6])
        )
    finally:
        os.unlink(prof)
    return notes


@dataclasses.dataclass
class StatusRun:
    """Where ``status`` is timed: its layout file (None: the default), environment and
    working directory, the state dir, and the instances this process holds there."""

    config: str | None
    env: dict[str, str]
    cwd: str
    state: StateDir
    held: list[Instance]


@contextlib.contextmanager
def status_run(layout: object, config_name: str | None) -> Iterator[StatusRun]:
    """A temporary home and working directory (with ``layout`` written to
    ``config_name`` unless None); the instances put in ``held`` are released at the end."""
    from portpool.statedir import StateDir

    with temp_home() as home, tempfile.TemporaryDirectory() as cwd:
        config = None
        if config_name is not None:
            config = os.path.join(cwd, config_name)
            Path(config).write_text(layout_toml(layout))
        state = StateDir.open(str(home))
        run = StatusRun(config, bench_env(PORTPOOL_HOME=str(home)), cwd, state, [])
        try:
            yield run
        finally:
            for inst in run.held:
                inst.release()
            state.close()


def status_rows(layout: object, repeats: int) -> tuple[list[Row], list[str], dict[str, object]]:
    """status --json with 10 live instances vs python -c pass and the CLI import."""
    from portpool.instance import start_instance
    from portpool.layout import Layout, default_layout

    assert isinstance(layout, Layout)
    notes: list[str] = []
    config_name = None if layout == default_layout() else "portpool.toml"
    with status_run(layout, config_name) as run:
        config, env, cwd, state = run.config, run.env, run.cwd, run.state
        for _ in range(10):
            run.held.append(start_instance(layout, state=state))
        seen = check_status(env, cwd, config, expect=10)
        commands = {
            "python -c pass": [PY, "-c", "pass"],
            'python -c "import portpool.cli"': [PY, "-c", "import portpool.cli"],
            f"{STATUS} (10 live instances)": status_argv(config),
        }
        samples: dict[str, list[float]] = {k: [] for k in commands}
        for argv in commands.values():
            time_process(argv, env, cwd)  # warm-up: fills the byte-code cache
        for _ in range(repeats):
            for name, argv in commands.items():  # interleaved: noise hits all alike
                samples[name].append(time_process(argv, env, cwd))
        rows = [
            Row(k, v, unit="ms", note="whole process", floor="python -c pass")
            for k, v in samples.items()
        ]
        status_ms = rows[2].median
        budget_ms = 2 * rows[1].median
        ok = status_ms <= budget_ms
        notes.append(
            f"status --json, 10 live instances: {status_ms:.0f} ms median = "
            f"{status_ms / rows[1].median:.2f}x the CLI import line (target <= 2x: "
            f"{'met' if ok else 'MISSED'}); {status_ms / rows[0].median:.2f}x python -c pass"
        )
        if not ok:
            notes.extend(where_time_goes(status_argv(config), env, cwd))
    return rows, notes, {"status_10": seen}


def big_layout(instances: int = 1000, services: int = 50, base: int = 10000) -> object:
    """A synthetic layout: ``services`` one-port services, ``instances`` instances."""
    from portpool.layout import parse_layout

    doc: dict[str, object] = {
        "app": "big",
        "max_instances": instances,
        "services": {
            f"s{i:02d}": {"base": base + i, "size": 1, "stride": services} for i in range(services)
        },
    }
    return parse_layout(doc, "<synthetic>")


def write_dead_records(
    directory: object, template: dict[str, object], layout: object, numbers: range
) -> None:
    """Records and unlocked lock files as dead instances leave them, from a real record."""
    from portpool._platform import DirHandle
    from portpool.layout import Layout

    assert isinstance(directory, DirHandle)
    assert isinstance(layout, Layout)
    dead = subprocess.Popen(["true"])  # a real pid that no longer runs
    dead.wait()
    t = time.time() - 3600
    for n in numbers:
        record = dict(template)
        record.update(number=n, pid=dead.pid, started_at=t, heartbeat_at=t + 60)
        record["services"] = [
            {"name": name, "pool": pool, "port": pool[0], "pid": dead.pid}
            for name, pool in layout.pools(n).items()
        ]
        for name, data in (
            (f"{n}.json", json.dumps(record, separators=(",", ":")).encode()),
            (f"{n}.lock", b""),
        ):
            fd = directory.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


BESIDE = "beside the 1,000 records"
# Its own name: the section also has the python -c pass of the 10-instance run.
BIG_FLOOR = f"python -c pass ({BESIDE})"


def big_status_rows(hold: int, repeats: int) -> tuple[list[Row], list[str], dict[str, object]]:
    """status --json over 1,000 records of a 50-service layout, ``hold`` of them live."""
    from portpool.errors import PoolExhausted
    from portpool.instance import start_instance
    from portpool.layout import Layout

    layout = big_layout()
    assert isinstance(layout, Layout)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = hold * (2 * len(layout.services) + 4) + 256
    if soft < need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    hold = min(hold, max(1, (max(soft, min(need, hard)) - 256) // (2 * len(layout.services) + 4)))
    notes: list[str] = []
    with status_run(layout, "big.toml") as run:
        config, env, cwd, state, held = run.config, run.env, run.cwd, run.state, run.held
        assert config is not None
        t0 = time.perf_counter()
        for _ in range(hold):
            try:
                held.append(start_instance(layout, state=state, heartbeat=False))
            except PoolExhausted:
                break  # a port of the next instance is busy here: hold fewer
        hold_s = time.perf_counter() - t0
        directory = state.instances(layout.app)
        fd = directory.open_file("1.json", os.O_RDONLY)
        try:
            template = json.loads(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
        write_dead_records(directory, template, layout, range(len(held) + 1, 1001))
        seen = check_status(env, cwd, config, expect=1000)  # also the warm-up
        commands = {
            f"{STATUS} (1,000 records, {seen['alive']} live)": status_argv(config),
            "portpool status (text, 1,000 records)": [
                a for a in status_argv(config) if a != "--json"
            ],
            BIG_FLOOR: [PY, "-c", "pass"],
            'python -c "import click"': [PY, "-c", "import click"],
            f"python -S -c pass ({BESIDE})": [PY, "-S", "-c", "pass"],
        }
        walls: dict[str, list[float]] = {k: [] for k in commands}
        cpus: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(repeats):  # interleaved with the floors: load hits all alike
            for name, argv in commands.items():
                wall, cpu = run_process(argv, env, cwd)
                walls[name].append(wall)
                cpus[name].append(cpu)
        rows = []
        for name in commands:  # ratios to python -c pass of this run: wall to wall, CPU to CPU
            rows.append(
                Row(name, walls[name], unit="ms", note="whole process, wall", floor=BIG_FLOOR)
            )
            rows.append(
                Row(
                    f"{name}, CPU",
                    cpus[name],
                    unit="ms",
                    note="user + system",
                    floor=f"{BIG_FLOOR}, CPU",
                )
            )
        row, cpu_row, base, base_cpu = rows[0], rows[1], rows[4], rows[5]
        ok = row.median < 300
        click_ms = statistics.median(walls['python -c "import click"'])
        notes.append(
            f"status --json over 1,000 records ({seen['alive']} live instances with "
            f"{len(layout.services)} leases each, held by this process; the rest dead): "
            f"{row.median:.0f} ms median wall (target < 300 ms: {'met' if ok else 'MISSED'}) "
            f"= {row.median / base.median:.1f}x python -c pass in the same run "
            f"({base.median:.0f} ms; python + import click {click_ms:.0f} ms); CPU "
            f"{cpu_row.median:.0f} ms = {cpu_row.median / base_cpu.median:.1f}x python -c "
            f"pass's {base_cpu.median:.0f} ms (wall minus CPU is waiting for a core); "
            f"holding the live ones took {hold_s:.2f} s"
        )
        notes.append(
            f"Of the {row.median:.0f} ms, outside portpool: python's start {base.median:.0f} "
            f"ms and click's import {click_ms - base.median:.0f} ms more; portpool's own part "
            f"(its imports, reading and checking 1,000 records of {len(layout.services)} "
            f"services, encoding the output) {row.median - click_ms:.0f} ms"
            + ("." if ok else f", {row.median - 300:.0f} ms over the target: portpool's.")
        )
        notes.append(
            f"text status over the same records: {rows[2].median:.0f} ms wall, CPU "
            f"{rows[3].median:.0f} ms ({STATUS}: {cpu_row.median:.0f} ms)"
        )
        if not ok:
            notes.extend(where_time_goes(status_argv(config), env, cwd))
    return rows, notes, {"status_1000": seen}


# ---------------------------------------------------------------- the section


def run(quick: bool = False) -> Section:
    """Instance start-up in-process and status as a whole process, small and at scale."""
    n, repeats, hold = (200, 5, 20) if quick else (2000, 20, 100)
    layout, which = choose_layout()
    section = Section("instance start-up and status")
    section.rows.extend(instance_rows(layout, n))
    start = section.rows[0]
    section.notes.append(
        f"Layout: {which}. start_instance {start.median:.0f} us median "
        f"(target < 1000 us: {'met' if start.median < 1000 else 'MISSED'}), "
        f"{n} samples after 50 warm-up starts, temporary state dir."
    )
    row, note = encoder_row(start, len(layout.services), n)
    section.rows.append(row)
    section.notes.append(note)
    rows, notes, extra = status_rows(layout, repeats)
    section.rows.extend(rows)
    section.notes.extend(notes)
    section.extra.update(extra)
    rows, notes, extra = big_status_rows(hold, max(3, repeats // 2))
    section.rows.extend(rows)
    section.notes.extend(notes)
    section.extra.update(extra)
    section.extra["layout"] = which
    if start.median >= 1000:
        section.notes.extend(profile_start(layout))
    return section


def profile_start(layout: object) -> list[str]:
    """Where start_instance spends its time (cProfile of 200 start+release cycles)."""
    from portpool.instance import start_instance
    from portpool.layout import Layout
    from portpool.statedir import StateDir

    assert isinstance(layout, Layout)
    with temp_home() as home:
        state = StateDir.open(str(home))
        profiler = cProfile.Profile()
        try:
            profiler.enable()
            for _ in range(200):
                start_instance(layout, state=state).release()
            profiler.disable()
        finally:
            state.close()
    stats = pstats.Stats(profiler)
    rows = []
    for func, (_, _, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, f"{Path(func[0]).name}:{func[2]}"))
    rows.sort(reverse=True)
    return [
        "start_instance, own time per start (cProfile): "
        + ", ".join(f"{name} {tt / 200 * 1e6:.0f} us" for tt, name in rows[:8])
    ]


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
