"""The commands users type, as whole processes, beside the floor measured in the same run.

Every row is one whole process from fork to exit, its median over many runs; the runs
of all rows are interleaved so that a burst of load on a shared machine hits every row
alike, and the report compares ratios, never absolute times:

- floors: ``python -c pass`` (the floor of the ratios), ``python -S -c pass`` (without
  site-packages), ``true`` (the bare command ``run`` starts),
  ``python -c "import click"`` (the CLI's library alone: outside portpool), and a click
  group running one no-op command with status's options (click's import and its work
  per call, e.g. gettext look-ups: what no click command goes below); the floors of
  portpool's own imports (click's, status's, run's) treat the collector as the
  ``portpool`` command does (off while importing, then frozen), so that what is left
  of a command beyond them is its work;
- ``python -c "import portpool"`` and ``portpool --help``;
- ``portpool status`` and ``status --json`` with 3 live instances held by this process,
  beside a process that only imports what ``status`` imports (portpool's import share);
- ``portpool run --config one-service.toml -- true``, beside a process that only
  imports what ``run`` imports, and one that only imports the standard library's
  modules those load (their share of the imports);
- ``status`` and ``run`` started as ``python -c "from portpool.cli import main; main()"``,
  without the console script's freeze of the cyclic collector (what that trick is worth);
- ``true`` started in-process as ``run`` starts its command (``_launch.spawn``: fork,
  the steps in the child, exec) beside a plain ``subprocess.Popen`` of it, per call: what
  one program start costs portpool.

Targets (from the issue): ``run -- true`` <= 3.5x ``python -c pass``; ``status`` <= 3x.
The notes split each figure into the part outside portpool (interpreter start, click's
import and its work per command, the bare command) and portpool's own part. CPU time (user +
system, the kernel's accounting of each child) is reported beside wall time, because
on a loaded machine it is the steadier of the two.

Run: ``python -m benchmarks.bench_cli`` (``--quick`` for fewer runs).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks._common import (
    ProcessTimes,
    Row,
    Section,
    find_free_block,
    leftover,
    portpool_command,
    print_section,
    time_whole_process,
    wait_exit,
)
from benchmarks.bench_instance import bench_env

PY = sys.executable
FLOOR = "python -c pass"
CLICK = 'python -c "import click"'
CLICK_COMMAND = "click floor: a group running one no-op command with status's options"
STATUS_IMPORTS = "status's imports only (portpool.cli, layout, records, statedir, tomllib)"
# As the console script treats the collector: off while importing, then frozen.
FROZEN = "import gc\ngc.disable()\n{imports}\ngc.freeze()\ngc.enable()\n"
CLICK_FROZEN = "import click, the collector off, then frozen (as the portpool command does)"
# A click group as small as click allows, parsing what `portpool status --config F` parses.
CLICK_COMMAND_CODE = (
    FROZEN.format(imports="import click")
    + """\
@click.group()
def cli(): pass
@cli.command()
@click.option("--config", "-c", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def status(config, as_json): pass
try:
    cli(["status", "--config", "few.toml"], prog_name="portpool")
finally:
    gc.freeze()
"""
)
START = "true started as run starts it (spawn, in-process, to its exit)"
POPEN = "true started by subprocess.Popen (in-process, to its exit)"
RUN_IMPORTS = "run's imports only (portpool.cli, _run, instance, shield, supervisor, logging)"
RUN_MODULES = (
    "portpool.cli, portpool._run, portpool.instance, portpool.shield, portpool._processes,"
    " portpool._relay, logging"
)
RUN_STDLIB = "the standard library's modules of run's imports only (beyond click's)"
# The CLI without the console script's entry point (and its freeze of the collector).
NO_FREEZE = "import sys\nsys.argv[0] = 'portpool'\nfrom portpool.cli import main\nmain()"
STATUS_NO_FREEZE = "portpool status (3 live instances), collector not frozen"
RUN_NO_FREEZE = "portpool run ... -- true, collector not frozen"
BARE = "true (the bare command)"
STATUS = "portpool status (3 live instances)"
RUN = "portpool run --config one-service.toml -- true"
RUN_TARGET = 3.5
STATUS_TARGET = 3.0


def write_layouts(directory: Path) -> tuple[Path, Path]:
    """``one-service.toml`` (for run) and a three-service layout (for status), on one
    free block: ports are keyed by number for the whole state dir, so the two layouts'
    pools must not meet. Below the ephemeral range: a pool of one port has no fallback."""
    base = find_free_block(33)
    one = directory / "one-service.toml"
    one.write_text(f'app = "bench-cli-run"\n\n[services.web]\nbase = {base}\nsize = 3\n')
    lines = ['app = "bench-cli"', "max_instances = 3"]
    for i, name in enumerate(("api", "web", "worker")):
        lines += ["", f"[services.{name}]", f"base = {base + 3 + i}", "size = 1", "stride = 10"]
    few = directory / "few.toml"
    few.write_text("\n".join(lines) + "\n")
    return one, few


def measure(
    commands: dict[str, list[str]], runs: int, env: dict[str, str], cwd: str
) -> dict[str, ProcessTimes]:
    """Each command once as warm-up (fills the byte-code cache), then ``runs`` rounds."""
    times = {name: ProcessTimes() for name in commands}
    for argv in commands.values():
        time_whole_process(argv, env, cwd)
    for _ in range(runs):
        for name, argv in commands.items():
            time_whole_process(argv, env, cwd, times[name])
    return times


def run(quick: bool = False) -> Section:
    """Whole-process times of import, --help, status and run, with floors and ratios."""
    from portpool.instance import start_instance
    from portpool.layout import load_layout
    from portpool.statedir import StateDir

    runs = 7 if quick else 30
    pp = portpool_command()
    section = Section("the CLI as whole processes (ratios to python -c pass)", floor=FLOOR)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        one, few = write_layouts(directory)
        home = directory / "state"
        env = bench_env(PORTPOOL_HOME=str(home))
        true = shutil.which("true") or "/bin/true"
        commands = {
            FLOOR: [PY, "-c", "pass"],
            "python -S -c pass": [PY, "-S", "-c", "pass"],
            BARE: [true],
            CLICK: [PY, "-c", "import click"],
            CLICK_COMMAND: [PY, "-c", CLICK_COMMAND_CODE],
            CLICK_FROZEN: [PY, "-c", FROZEN.format(imports="import click")],
            STATUS_IMPORTS: [
                PY,
                "-c",
                FROZEN.format(
                    imports="import portpool.cli, portpool.layout, portpool.records,"
                    " portpool.statedir, tomllib"
                ),
            ],
            'python -c "import portpool"': [PY, "-c", "import portpool"],
            "portpool --help": [*pp, "--help"],
            STATUS: [*pp, "status", "--config", str(few)],
            "portpool status --json (3 live instances)": [
                *pp,
                "status",
                "--json",
                "--config",
                str(few),
            ],
            RUN: [*pp, "run", "--config", str(one), "--", true],
            RUN_IMPORTS: [
                PY,
                "-c",
                FROZEN.format(imports=f"import {RUN_MODULES}"),
            ],
            RUN_STDLIB: [PY, "-c", FROZEN.format(imports=f"import {stdlib_of_run(env)}")],
            STATUS_NO_FREEZE: [PY, "-c", NO_FREEZE, "status", "--config", str(few)],
            RUN_NO_FREEZE: [PY, "-c", NO_FREEZE, "run", "--config", str(one), "--", true],
        }
        state = StateDir.open(str(home))
        layout = load_layout(str(few))
        held = []
        try:
            for _ in range(3):
                held.append(start_instance(layout, state=state, heartbeat=False))
            times = measure(commands, runs, env, tmp)
            times.update(start_cost([true], env, runs))
            locks = lock_table_cost()
        finally:
            for instance in held:
                instance.release()
            state.close()
    for name, t in times.items():
        note = "per call, wall" if name in (START, POPEN) else "whole process, wall"
        section.rows.append(Row(name, t.wall_ms, unit="ms", note=note))
    wall = {name: statistics.median(t.wall_ms) for name, t in times.items()}
    cpu = {name: statistics.median(t.cpu_ms) for name, t in times.items()}
    section.extra["cpu_ms_median"] = cpu
    section.extra["runs"] = runs
    section.notes += explain(wall, cpu)
    if locks is not None:
        section.extra["lock_table"] = {"entries": locks[0], "first_read_ms": locks[1]}
        section.notes.append(
            f"The kernel's lock table (/proc/locks, {locks[0]} entries now): its first read "
            f"in a process took {locks[1]:.1f} ms (median of fresh processes), waiting for an "
            "RCU grace period while every flock() on the host waits too. status, run and up "
            "no longer read it while each instance's own process vouches for its lock "
            "(fdinfo), nor does logs --follow; status of a dead instance, stop, doctor, gc and "
            "the diagnosis of a refused port still do."
        )
    return section


def stdlib_of_run(env: dict[str, str]) -> str:
    """``import click, <the top-level standard-library modules that run's imports load
    beyond click's>``, found by importing them in a child (so that the floor follows
    the code)."""
    import json
    import subprocess

    code = (
        "import json, sys\nimport click\nbefore = set(sys.modules)\n"
        f"import {RUN_MODULES}\n"
        "print(json.dumps(sorted(m for m in set(sys.modules) - before\n"
        "    if '.' not in m and not m.startswith(('_', 'portpool')))))"
    )
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, check=True)
    return ", ".join(["click", *json.loads(done.stdout)])


def start_cost(argv: list[str], env: dict[str, str], runs: int) -> dict[str, ProcessTimes]:
    """``argv`` started as ``run`` starts its command (``_launch.spawn``) and by a plain
    ``subprocess.Popen``, interleaved, each to its exit: wall per call, and the child's
    CPU time (the kernel's accounting of the reaped child: what the child does before
    its exec counts, the fork in this process does not)."""
    import resource
    import subprocess
    import time

    from portpool._launch import spawn

    starts: dict[str, Callable[[], subprocess.Popen[bytes]]] = {
        START: lambda: spawn(argv, env, watch_parent=True),
        POPEN: lambda: subprocess.Popen(argv, env=env),
    }
    times = {name: ProcessTimes() for name in starts}
    for i in range(runs + 1):  # the first round is a warm-up
        for name, start in starts.items():
            # getrusage, not os.times: its children's times count in 10 ms ticks.
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter_ns()
            wait_exit(start())
            wall = (time.perf_counter_ns() - t0) / 1e6
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if i:
                times[name].wall_ms.append(wall)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                times[name].cpu_ms.append(cpu * 1000)
    return times


def lock_table_cost(runs: int = 5) -> tuple[int, float] | None:
    """(entries, median ms) of a read of the kernel's lock table by a fresh process when
    nobody read it for a while (the state a user's command meets), or None where the
    OS does not list its locks. The cost is an RCU grace period, not the entries: a
    read shortly after another one (tens of ms) is fast, so the runs are spaced."""
    import subprocess
    import time

    if not os.path.exists("/proc/locks"):
        return None
    code = (
        "import time\nt = time.perf_counter()\nopen('/proc/locks', 'rb').read()\n"
        "print((time.perf_counter() - t) * 1000)"
    )
    times = []
    for _ in range(runs):
        time.sleep(0.5)
        done = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(done.stdout))
    with open("/proc/locks", encoding="ascii", errors="replace") as f:
        entries = sum(1 for _ in f)
    return entries, statistics.median(times)


def split_status(ms: dict[str, float], kind: str) -> list[str]:
    """``status``'s figure (wall or CPU ``kind``) split into the part outside portpool
    (python, click's import, click's work per command) and portpool's own part
    (importing its modules, the command's work)."""
    floor, click, status = ms[FLOOR], ms[CLICK_FROZEN], ms[STATUS]
    command = ms[CLICK_COMMAND]
    own, own_imports = status - command, ms[STATUS_IMPORTS] - click
    return [
        f"{kind}: outside portpool, of status's {status:.0f} ms: python start {floor:.0f} ms; "
        f"click's import {click - floor:.0f} ms more (as the command imports it; "
        f"{ms[CLICK] - floor:.0f} ms with the collector running); click running a no-op "
        f"command with status's options {command - click:.0f} ms more: {command:.0f} ms in "
        f"all ({command / floor:.2f}x python -c pass), below which no click command goes. "
        f"portpool's own part: {own:.0f} ms (status - the click floor), of which importing "
        f"its modules {own_imports:.0f} ms (the imports-only process - import click, both "
        f"as the command imports them) and the command's work "
        f"{max(0.0, own - own_imports):.0f} ms (reading the layout file and the records, "
        "asking each live instance's process about its lock, printing; a difference of "
        "medians, so a few ms of it are noise, and 0 means within it)."
    ]


def split_run(ms: dict[str, float], kind: str) -> list[str]:
    """``run``'s figure split as ``split_status`` splits status's: outside portpool
    (python, click, the bare command), and portpool's own (imports, launcher, the rest)."""
    command, run_ms, bare = ms[CLICK_COMMAND], ms[RUN], ms[BARE]
    own = run_ms - command - bare
    imports = ms[RUN_IMPORTS] - ms[CLICK_FROZEN]
    stdlib = ms[RUN_STDLIB] - ms[CLICK_FROZEN]
    start = max(0.0, ms[START] - ms[POPEN])
    rest = own - imports - start
    return [
        f"{kind}: of run's {run_ms:.0f} ms, outside portpool: the click floor "
        f"{command:.0f} ms (python, click's import and work) and the bare `true` "
        f"{bare:.1f} ms; portpool's own {own:.0f} ms ({own / ms[FLOOR]:.2f}x python -c "
        f"pass): importing its modules {imports:.0f} ms (the imports-only process - import "
        f"click, both with the collector as the command has it; {stdlib:.0f} ms of it the "
        "standard library's modules they load, e.g. socket, subprocess, logging, json, "
        f"tomllib, hashlib, shutil, ctypes, and {imports - stdlib:.0f} ms portpool's own "
        "modules), starting the command "
        f"{start:.1f} ms more than a plain subprocess.Popen, and for the rest (layout, slot, "
        f"lease, threads, release, exit) {leftover(rest)}."
    ]


def remainder(ms: dict[str, float], name: str, target: float) -> str:
    """Whether what ``name`` takes above its target is outside portpool: the target
    leaves ``(target - 1) x python -c pass`` above python's start; click (its import and
    its work per command, above python's start) and the bare command are outside
    portpool, so the remainder is theirs when portpool's own part fits in that room."""
    floor, bare = ms[FLOOR], ms[BARE] if name == RUN else 0.0
    over = ms[name] - target * floor
    click = ms[CLICK_COMMAND] - floor
    own = ms[name] - ms[CLICK_COMMAND] - bare
    room = (target - 1) * floor
    if own <= room:
        return (
            f"`{name}` is {over:.0f} ms above its target, all of it outside portpool: "
            f"click takes {click:.0f} ms above python's start, and portpool's own part "
            f"({own:.0f} ms) fits in the {room:.0f} ms the target leaves above python's start."
        )
    return (
        f"`{name}` is {over:.0f} ms above its target; click takes {click:.0f} ms above "
        f"python's start (outside portpool), and portpool's own part ({own:.0f} ms) is "
        f"{own - room:.0f} ms over the {room:.0f} ms the target leaves above python's "
        "start: that much of the remainder is portpool's."
    )


def explain(wall: dict[str, float], cpu: dict[str, float]) -> list[str]:
    """Targets met or missed, and each figure split into what is outside portpool and
    what is portpool's own."""
    floor = wall[FLOOR]
    notes = []
    for name, target in ((RUN, RUN_TARGET), (STATUS, STATUS_TARGET)):
        ratio = wall[name] / floor
        verdict = "met" if ratio <= target else "MISSED"
        notes.append(
            f"`{name}`: {wall[name]:.0f} ms = {ratio:.2f}x python -c pass ({floor:.0f} ms); "
            f"target <= {target}x: {verdict}; CPU time {cpu[name]:.0f} ms = "
            f"{cpu[name] / cpu[FLOOR]:.2f}x."
        )
        if ratio > target:
            notes.append(remainder(wall, name, target))
    notes += split_status(wall, "wall") + split_status(cpu, "CPU time")
    notes += split_run(wall, "wall") + split_run(cpu, "CPU time")
    for plain, frozen in ((STATUS_NO_FREEZE, STATUS), (RUN_NO_FREEZE, RUN)):
        saved = wall[plain] - wall[frozen]
        notes.append(
            f"The console script's freeze of the cyclic collector (nothing imported is "
            f"walked again, at exit either) saves {saved:.0f} ms of `{frozen}` "
            f"({saved / wall[plain]:.0%} of {wall[plain]:.0f} ms without it)."
        )
    notes.append(
        f"A program's start as run starts it, {wall[START]:.1f} ms to `true`'s exit (a plain "
        f"subprocess.Popen: {wall[POPEN]:.1f} ms): fork, then in the child the sockets put at "
        "fd 3 with LISTEN_PID the command's own pid, the parent-death signal, default "
        "signals, exec. It replaced an exec shim, a second python per start (~0.9x python "
        "-c pass)."
    )
    notes.append(
        "CPU-time ratios to python -c pass: "
        + ", ".join(f"{name} {value / cpu[FLOOR]:.2f}x" for name, value in cpu.items())
    )
    return notes


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
