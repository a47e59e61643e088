"""The reference app: ``portpool up`` (default layout) to all six services answering,
the memory of the whole instance, and where the start-up time goes.

Each repetition starts ``portpool up`` in a temporary state dir, reads the ports it
prints, and polls every service's ``GET /health`` until each answers naming itself;
then it sums the RSS (and USS, the pages only that process holds) of ``up`` and its
children, and stops it with SIGTERM.

Where the time goes: a bare python start is the floor; beside it, the wall time of a
python that imports exactly what each kind of service imports (the MCP SDK dominates),
and the heaviest modules of the MCP import by ``python -X importtime``.

Run: ``python -m benchmarks.bench_services`` (``--quick`` for 2 repetitions).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import Row, Section, print_section

PY = sys.executable
PORTPOOL = str(Path(PY).with_name("portpool"))
READY_TIMEOUT_S = 120.0
SERVICE_LINE = re.compile(r"^\s+([a-z][a-z0-9-]*)\s+(\d+)\s+(\d+|-)\s*$")

# What each kind of reference service imports before it serves (see portpool/services).
IMPORTS = {
    "MCP service (x4)": "portpool.services.mcp_server, mcp.server.mcpserver, uvicorn, "
    "portpool.integrations.asgi",
    "conversational": "portpool.services.conversational, websockets.asyncio.server",
    "api-server": "portpool.services.api_server, starlette.applications, httpx, uvicorn, "
    "portpool.integrations.asgi, portpool.instance",
}

PYTHON_ROW = "python -c pass"


def imports_row(kind: str) -> str:
    """The name of the row timing a python that imports what ``kind`` imports."""
    return f"python + imports of {kind}"


def service_floor(name: str) -> str:
    """The row a reference service's time to answering is a ratio to: a python that
    imports what that kind of service imports (its own start-up, outside portpool)."""
    kind = name if name in ("conversational", "api-server") else "MCP service (x4)"
    return imports_row(kind)


def _wall_ms(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    return (time.perf_counter() - t0) * 1000


def _healthy(port: int, name: str) -> bool:
    import httpx

    try:
        body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(body, dict) and body.get("service") == name


def _read_ports(proc: subprocess.Popen[str], deadline: float) -> dict[str, int]:
    """The service table ``portpool up`` prints once its services are started."""
    assert proc.stdout is not None
    ports: dict[str, int] = {}
    while time.monotonic() < deadline and len(ports) < 6:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"portpool up exited early with {proc.wait()}")
        match = SERVICE_LINE.match(line)
        if match:
            ports[match.group(1)] = int(match.group(2))
    return ports


def _instance_memory(pid: int) -> tuple[float, float, dict[str, float]]:
    """RSS and USS (MB) of ``pid`` and its children, and RSS per child command."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = uss = 0.0
    per_service: dict[str, float] = {}
    for proc in procs:
        try:
            info = proc.memory_full_info()
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        rss += info.rss / 2**20
        uss += info.uss / 2**20
        if proc.pid != pid and cmd:
            per_service[cmd[-1]] = info.rss / 2**20
    return rss, uss, per_service


def _one_up(
    home: str, stop_ms: list[float], table_ms: list[float], announce_ms: list[float]
) -> tuple[float, dict[str, float], float, float, dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT"))}
    env["PORTPOOL_HOME"] = home
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [PORTPOOL, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert proc.stderr is not None
        # "portpool: instance N of APP: name=port ...": the slot and every lease are held,
        # no service started yet. What follows on stderr is a few lines: left unread.
        for line in proc.stderr:
            if line.startswith("portpool: instance "):
                announce_ms.append((time.perf_counter() - t0) * 1000)
                break
        ports = _read_ports(proc, deadline)
        table_ms.append((time.perf_counter() - t0) * 1000)  # printed once all are ready
        ready_ms: dict[str, float] = {}
        while len(ready_ms) < len(ports) and time.monotonic() < deadline:
            for name, port in ports.items():
                if name not in ready_ms and _healthy(port, name):
                    ready_ms[name] = (time.perf_counter() - t0) * 1000
            time.sleep(0.01)
        if len(ready_ms) < len(ports):
            raise RuntimeError(f"not all services answered: {sorted(ready_ms)} of {ports}")
        all_ms = max(ready_ms.values())
        time.sleep(0.5)  # let lazy start-up work settle before measuring memory
        rss, uss, per_service = _instance_memory(proc.pid)
        return all_ms, ready_ms, rss, uss, per_service
    finally:
        t_stop = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)  # `up` returns once every service has exited
            stop_ms.append((time.perf_counter() - t_stop) * 1000)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _import_cost_by_package(modules: str, top: int = 6) -> list[str]:
    """The packages whose own module code costs most to import (self times summed)."""
    result = subprocess.run(
        [PY, "-X", "importtime", "-c", f"import {modules}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    by_package: dict[str, float] = {}
    for line in result.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].split(":")[-1].strip().isdigit():
            package = parts[2].strip().split(".")[0]
            self_us = int(parts[0].split(":")[-1])
            by_package[package] = by_package.get(package, 0.0) + self_us / 1000
    heaviest = sorted(by_package.items(), key=lambda item: item[1], reverse=True)[:top]
    return [f"{name} {ms:.0f} ms" for name, ms in heaviest]


def run(quick: bool = False) -> Section:
    """Start-up time and memory of the reference app, and its import costs."""
    reps = 2 if quick else 5
    # No section floor: the rows mix times and memory. Each time is a ratio to its own
    # floor: python's start, or what the service's kind imports (its own start-up).
    section = Section("reference app: portpool up to six services answering")
    python = [_wall_ms([PY, "-c", "pass"]) for _ in range(reps * 2)]
    section.rows.append(Row(PYTHON_ROW, python, unit="ms", floor=PYTHON_ROW))
    for kind, modules in IMPORTS.items():
        samples = [_wall_ms([PY, "-c", f"import {modules}"]) for _ in range(reps)]
        section.rows.append(Row(imports_row(kind), samples, unit="ms", floor=PYTHON_ROW))

    totals: list[float] = []
    per_service: dict[str, list[float]] = {}
    rss: list[float] = []
    uss: list[float] = []
    rss_by_service: dict[str, list[float]] = {}
    stop_ms: list[float] = []
    table_ms: list[float] = []
    announce_ms: list[float] = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            all_ms, ready_ms, rss_mb, uss_mb, services_rss = _one_up(
                os.path.join(tmp, "state"), stop_ms, table_ms, announce_ms
            )
        totals.append(all_ms)
        for name, ms in ready_ms.items():
            per_service.setdefault(name, []).append(ms)
        rss.append(rss_mb)
        uss.append(uss_mb)
        for name, mb in services_rss.items():
            rss_by_service.setdefault(name, []).append(mb)
    section.rows.append(
        Row(
            "up -> its ports announced",
            announce_ms,
            unit="ms",
            note="portpool's own part: python, click, imports, the instance",
            floor=PYTHON_ROW,
        )
    )
    section.rows.append(
        Row("up -> its table printed", table_ms, unit="ms", note="once all six are ready")
    )
    section.rows.append(
        Row("up -> all six answering /health", totals, unit="ms", note="from Popen of `up`")
    )
    for name, samples in per_service.items():
        section.rows.append(
            Row(
                f"up -> {name} answering",
                samples,
                unit="ms",
                note="ratio to a python importing what it imports",
                floor=service_floor(name),
            )
        )
    section.rows.append(
        Row("SIGTERM to up -> up exited", stop_ms, unit="ms", note="all six services stopped")
    )
    section.rows.append(Row("instance RSS (up + 6 services)", rss, unit="MB", note="sum of RSS"))
    section.rows.append(
        Row("instance USS (up + 6 services)", uss, unit="MB", note="pages no other process has")
    )
    for name, samples in rss_by_service.items():
        section.rows.append(Row(f"RSS of {name}", samples, unit="MB"))

    section.notes.append(
        "import time of an MCP service by package (own code, -X importtime): "
        + ", ".join(_import_cost_by_package(IMPORTS["MCP service (x4)"]))
    )
    section.notes.append(explain_ready(section))
    section.notes.append(
        f"{reps} repetitions of `portpool up` (default layout, fresh state dir each); "
        f"{os.cpu_count()} CPUs shared by the six services starting at once"
    )
    section.extra["repetitions"] = reps
    return section


def explain_ready(section: Section) -> str:
    """Each service's time to ready beside what its own imports cost alone, and the
    CPU-bound estimate: the six services' imports summed, shared by the CPUs."""
    by = {r.name: r.median for r in section.rows}
    kind_of = {"conversational": "conversational", "api-server": "api-server"}
    parts = []
    imports_sum = 0.0
    for name in (
        "mcp-universal",
        "ollama-mcp",
        "groq-api",
        "sandra-ia",
        "conversational",
        "api-server",
    ):
        floor = by[f"python + imports of {kind_of.get(name, 'MCP service (x4)')}"]
        imports_sum += floor
        parts.append(
            f"{name} {by[f'up -> {name} answering']:.0f} ms (its imports alone {floor:.0f} ms)"
        )
    cpus = os.cpu_count() or 1
    return (
        "Per service, launch to answering: " + ", ".join(parts) + f". The six import "
        f"{imports_sum:.0f} ms of python in all; on {cpus} CPUs that is at least "
        f"{imports_sum / cpus:.0f} ms, against {by['up -> all six answering /health']:.0f} "
        f"ms measured. portpool's own part, launch to its ports announced (python start, "
        f"click, its imports, the instance), before any service starts: "
        f"{by['up -> its ports announced']:.0f} ms; then six spawns."
    )


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv[1:]))
