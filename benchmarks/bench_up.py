"""``portpool up``: time to all services answering, and from SIGTERM to all locks free.

A test layout of six trivial services (a few lines of Python serving the socket
passed at fd 3: accept, write "ok", close) on a free block below the ephemeral range
(an outgoing connection's port cannot take one of the floor's fixed ports), in a
temporary state dir. Each repetition launches ``portpool up --config F`` (the
installed script, as users type it), polls each service's port until it answers "ok"
(connect alone would succeed as soon as portpool listens, before the service runs),
then sends SIGTERM and watches the kernel's lock table (/proc/locks) until none of the
instance's lock files is held.

The floor, interleaved with the launches: the same six commands started side by side
without portpool (each binds its own port, from ``$PORT``), to all six answering;
target: ``up`` within the floor + 50 ms. CPU time beside it: of ``up`` and its
services from launch to exit after SIGTERM, and of the six commands alone from start
to exit after SIGTERM (the kernel's accounting of each reaped process).

Where the time goes is measured beside it: python start-up, importing the CLI, one
service's start as ``up`` starts it (``_launch.spawn``: fork, the socket placed at fd 3
in the child, exec), and ``start_instance`` in-process.

Run: ``python -m benchmarks.bench_up`` (``--quick`` for 3 repetitions).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import (
    Row,
    Section,
    find_free_block,
    leftover,
    portpool_command,
    print_section,
    wait_exit,
)
from benchmarks.bench_instance import bench_env

PY = sys.executable
SERVICES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
READY_TIMEOUT_S = 60.0
LAUNCH_ROW = "python -c pass started as up starts a service (socket at fd 3)"
FLOOR_ROW = "six commands side by side, no portpool -> all answer"
CPU_FLOOR_ROW = "six commands side by side: CPU, start to exit"
PYTHON_ROW = "python -c pass"
CLICK_ROW = "python + import click, as the portpool command imports it"
# Imported as the portpool command imports: the collector off, then frozen.
AS_THE_COMMAND = "import gc\ngc.disable()\n{}\ngc.freeze()\ngc.enable()\n"
UP_IMPORTS = AS_THE_COMMAND.format(
    "import logging, portpool.cli, portpool.instance, portpool._up, portpool._services,"
    " portpool.shield"
)

# The socket passed at fd 3 under portpool; without it (the floor), its own on $PORT.
SERVICE_CODE = """\
import os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if os.environ.get("LISTEN_FDS"):
    server = socket.socket(fileno=3)
else:
    server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
while True:
    conn, _ = server.accept()
    conn.sendall(b"ok\\n")
    conn.close()
"""


def choose_base() -> int:
    """A base whose six 3-port pools (60 ports) are all bindable now, below the
    ephemeral range: the floor's commands bind their fixed ports without a fallback, and
    a CI run once lost one in 41000-41999 to an outgoing connection's ephemeral port."""
    return find_free_block(size=10 * len(SERVICES))


def _after(ms: float) -> str:
    """``N ms after`` for a difference of medians, which noise may make zero or negative
    (it read "-0 ms after")."""
    return "as" if round(ms) <= 0 else f"{ms:.0f} ms after"


def write_layout(directory: Path, base: int) -> Path:
    """The six-service layout file and its service program, in ``directory``."""
    program = directory / "service.py"
    program.write_text(SERVICE_CODE)
    lines = ['app = "bench-up"', "max_instances = 1"]
    for i, name in enumerate(SERVICES):
        lines += [
            "",
            f"[services.{name}]",
            f"base = {base + 10 * i}",
            "size = 3",
            f"command = [{PY!r}, {str(program)!r}]".replace("'", '"'),
        ]
    path = directory / "portpool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def answers(port: int) -> bool:
    """True when a service on ``port`` accepts and writes its "ok"."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            return conn.recv(3) == b"ok\n"
    except OSError:
        return False


def held_lock_inodes(state: Path) -> set[tuple[int, int]]:
    """(device, inode) of the state dir's lock files that the kernel says are locked now."""
    from portpool._platform import locked_inodes

    locked = locked_inodes()
    if locked is None:
        raise RuntimeError("this benchmark reads /proc/locks (Linux only)")
    files = set()
    for sub in ("ports", "apps/bench-up/instances"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(state / sub):
                if entry.name.endswith(".lock"):
                    st = entry.stat(follow_symlinks=False)
                    files.add((st.st_dev, st.st_ino))
    return files & set(locked)


def one_up(config: Path, state: Path, ports: list[int]) -> dict[str, float]:
    """One launch: seconds to the table, to all answering, SIGTERM to locks free/exit."""
    env = bench_env(PORTPOOL_HOME=str(state))
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*portpool_command(), "up", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def drain() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append((time.perf_counter(), raw.decode(errors="replace")))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        waiting = set(ports)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = "".join(text for _, text in lines)[-600:]
                raise RuntimeError(f"up did not get ready (exit {proc.returncode}): {out}")
            waiting = {p for p in waiting if not answers(p)}
            if waiting:
                time.sleep(0.002)
        t_ready = time.perf_counter()
        # up says "is up" once its own readiness probes passed: after the services answer.
        while not any(" is up" in text for _, text in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not say it is up (exit {proc.returncode})")
            time.sleep(0.002)
        if not held_lock_inodes(state):
            raise RuntimeError("up is ready but /proc/locks shows none of its locks")
        t_term = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while held_lock_inodes(state):
            if time.monotonic() > deadline:
                raise RuntimeError("locks still held a minute after SIGTERM")
            time.sleep(0.001)
        t_free = time.perf_counter()
        code, cpu_s = wait_with_cpu(proc, READY_TIMEOUT_S)
        t_exit = time.perf_counter()
        if code != 0:
            raise RuntimeError(f"up exited {code} after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, stuck: don't leave it behind
            proc.wait()
        reader.join(timeout=5)
    t_table = next((t for t, text in lines if " is up" in text), float("nan"))
    return {
        "table": t_table - t0,
        "ready": t_ready - t0,
        "locks_free": t_free - t_term,
        "exited": t_exit - t_term,
        "cpu": cpu_s,
    }


def wait_with_cpu(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float]:
    """Reap ``proc`` (within ``timeout_s``, else RuntimeError): its exit code and the
    CPU seconds it and the children it reaped used, per the kernel (``wait4``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {proc.pid} still running {timeout_s:.0f} s after SIGTERM")
        time.sleep(0.001)


def side_by_side(program: Path, ports: list[int]) -> tuple[float, float]:
    """The floor: the same six commands started side by side without portpool (each
    binds its own port): seconds from the first start to all six answering, and the CPU
    seconds of the six from start to exit after SIGTERM."""
    env = bench_env()
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        for port in ports:
            procs.append(subprocess.Popen([PY, str(program)], env={**env, "PORT": str(port)}))
        waiting = set(ports)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the six services alone did not all answer")
            waiting = {p for p in waiting if not answers(p)}
            if waiting:
                time.sleep(0.002)
        ready = time.perf_counter() - t0
        for proc in procs:
            proc.terminate()
        return ready, sum(wait_with_cpu(proc, 10)[1] for proc in procs)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()  # our own child, stuck or left by an error above
                proc.wait()


def time_process_ms(argv: list[str], runs: int) -> list[float]:
    samples = []
    env = bench_env()
    subprocess.run(argv, check=True, capture_output=True, timeout=60, env=env)  # warm-up
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        subprocess.run(argv, check=True, capture_output=True, timeout=60, env=env)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def spawn_ms(argv: list[str], runs: int) -> list[float]:
    """``argv`` started as ``up`` starts a service (``_launch.spawn`` with a listening
    socket at fd 3 and the parent-death signal), to its exit, per call in this process."""
    from portpool._launch import spawn

    samples = []
    env = bench_env()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        for i in range(runs + 1):  # the first is a warm-up
            t0 = time.perf_counter_ns()
            proc = spawn(
                argv,
                env,
                sockets=[(sock.fileno(), "bench")],
                watch_parent=True,
                stdout=subprocess.DEVNULL,
            )
            wait_exit(proc)
            if i:
                samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def start_instance_ms(config: Path, runs: int) -> list[float]:
    """start_instance + release of the test layout in this process, per call."""
    from portpool.instance import start_instance
    from portpool.layout import load_layout
    from portpool.statedir import StateDir

    layout = load_layout(str(config))
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.open(os.path.join(tmp, "state"))
        try:
            for _ in range(runs + 5):
                t0 = time.perf_counter_ns()
                inst = start_instance(layout, state=state)
                samples.append((time.perf_counter_ns() - t0) / 1e6)
                inst.release()
        finally:
            state.close()
    return samples[5:]


def run(quick: bool = False) -> Section:
    """Time-to-ready and SIGTERM-to-free of `portpool up`, and where the time goes."""
    repeats = 3 if quick else 10
    section = Section("portpool up: six services, start and stop")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        base = choose_base()
        config = write_layout(directory, base)
        ports = [base + 10 * i for i in range(len(SERVICES))]
        results = []
        floor_ms = []
        floor_cpu_ms = []
        one_up(config, directory / "warm-up", ports)  # fills the byte-code cache
        side_by_side(directory / "service.py", ports)
        for i in range(repeats):  # interleaved: a burst of load hits both alike
            results.append(one_up(config, directory / f"state{i}", ports))
            ready_s, cpu_s = side_by_side(directory / "service.py", ports)
            floor_ms.append(ready_s * 1000)
            floor_cpu_ms.append(cpu_s * 1000)
        ms = {k: [r[k] * 1000 for r in results] for k in results[0]}
        section.rows += [
            Row(
                FLOOR_ROW,
                floor_ms,
                unit="ms",
                note="the floor of `up` (each binds its own port)",
                floor=FLOOR_ROW,
            ),
            Row(
                CPU_FLOOR_ROW,
                floor_cpu_ms,
                unit="ms",
                note="the CPU floor of `up`",
                floor=CPU_FLOOR_ROW,
            ),
            Row(
                "up and its six services: CPU, launch to exit",
                ms["cpu"],
                unit="ms",
                note="after SIGTERM once all answered; ratio to the CPU floor",
                floor=CPU_FLOOR_ROW,
            ),
            Row(
                "launch -> up prints its table",
                ms["table"],
                unit="ms",
                note="slot, leases, spawn",
                floor=FLOOR_ROW,
            ),
            Row(
                "launch -> all six answer",
                ms["ready"],
                unit="ms",
                note="time to ready; ratio to the six commands alone",
                floor=FLOOR_ROW,
            ),
            Row("SIGTERM -> all locks free", ms["locks_free"], unit="ms", note="per /proc/locks"),
            Row("SIGTERM -> up exited", ms["exited"], unit="ms", note="children stopped"),
        ]
        runs = max(3, repeats)
        section.rows += [
            Row(PYTHON_ROW, time_process_ms([PY, "-c", "pass"], runs), unit="ms", floor=PYTHON_ROW),
            Row(
                "python -S -c pass",
                time_process_ms([PY, "-S", "-c", "pass"], runs),
                unit="ms",
                note="python without site-packages",
                floor=PYTHON_ROW,
            ),
            Row(
                CLICK_ROW,
                time_process_ms([PY, "-c", AS_THE_COMMAND.format("import click")], runs),
                unit="ms",
                note="the CLI's library alone, imported as the command does: outside portpool",
                floor=PYTHON_ROW,
            ),
            Row(
                "python + the modules `up` imports",
                time_process_ms([PY, "-c", UP_IMPORTS], runs),
                unit="ms",
                note="up's own start-up floor (click, the CLI, instance, supervisor, shield), "
                "imported as the command does",
                floor=PYTHON_ROW,
            ),
            Row(
                LAUNCH_ROW,
                spawn_ms([PY, "-c", "pass"], runs * 3),
                unit="ms",
                note="each service's start-up floor: portpool's part is what it adds to python",
                floor=PYTHON_ROW,
            ),
            Row(
                "start_instance in-process",
                start_instance_ms(config, runs * 5),
                unit="ms",
                note="slot + 6 leases + record",
            ),
        ]
    by = {r.name: r.median for r in section.rows}
    ready = by["launch -> all six answer"]
    table = by["launch -> up prints its table"]
    cli = by["python + the modules `up` imports"]
    launch_ms = by[LAUNCH_ROW]
    floor = by[FLOOR_ROW]
    cpu = by["up and its six services: CPU, launch to exit"]
    cpu_floor = by[CPU_FLOOR_ROW]
    section.notes.append(
        f"CPU: up and its services {cpu:.0f} ms from launch to exit, the six commands "
        f"alone {cpu_floor:.0f} ms ({cpu / cpu_floor:.2f}x): portpool's own CPU is "
        f"{cpu - cpu_floor:.0f} ms per start and stop (its interpreter and imports, six "
        "starts, probes, shield and stop)."
    )
    verdict = "met" if ready - floor <= 50 else "MISSED"
    section.notes.append(
        f"`up` to all six answering: {ready:.0f} ms = the same six commands alone "
        f"({floor:.0f} ms) + {ready - floor:.0f} ms (target floor + 50 ms: {verdict}); "
        f"{ready / floor:.2f}x the floor."
    )
    python = by[PYTHON_ROW]
    click = by[CLICK_ROW]
    if ready - floor > 50:
        # Outside portpool beyond the floor: up's own interpreter start and click's import.
        own = ready - floor - click
        share = (
            "all of it outside portpool: portpool's own part fits in the 50 ms"
            if own <= 50
            else f"portpool's own part is {own - 50:.0f} ms over the 50 ms"
        )
        section.notes.append(
            f"`up` is {ready - floor - 50:.0f} ms above its target; up's interpreter start "
            f"({python:.0f} ms) and click's import ({click - python:.0f} ms) are outside "
            f"portpool, which leaves portpool's own part {own:.0f} ms: {share}."
        )
    start_own = max(0.0, launch_ms - python)  # what a start adds to the program's own
    spread = start_own * len(SERVICES) / (os.cpu_count() or 1)
    rest = ready - floor - (cli - python) - by["start_instance in-process"] - spread
    section.notes.append(
        f"Where the {ready - floor:.0f} ms above the floor go: up's own start "
        f"{cli - python:.0f} ms (the modules it imports beyond python's start, of which "
        f"click alone is {click - python:.0f} ms: outside portpool), "
        f"{by['start_instance in-process']:.1f} ms acquiring the instance, "
        f"starting a service {start_own:.1f} ms more than python alone (~{spread:.1f} ms for "
        f"six on {os.cpu_count()} CPUs: fork, the socket put at fd 3 with LISTEN_PID the "
        f"service's own pid and the parent-death signal set in the child, exec), and "
        f"left for threads, spawns, probes, and up's start sharing the CPUs with the "
        f"services': {leftover(rest)}. up "
        f"prints its table {_after(table - ready)} all answer (its readiness probes)."
    )
    section.notes.append(
        f"Stop: locks free {by['SIGTERM -> all locks free']:.0f} ms after SIGTERM (children "
        "get SIGTERM, exit, are reaped, then leases and slot are released); "
        f"{repeats} launches, ports {base}..{base + 52}, state dir fresh per launch."
    )
    section.extra["repeats"] = repeats
    return section


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
