"""Restart on a kept socket: from a service's death to the next request answered.

One trivial service (a few lines of Python that answers each request line with its pid,
and exits with status 1 after answering "die") is restarted two ways:

- **socket kept**: ``portpool up`` with ``restart = "on-failure"``. ``up`` holds the
  listening socket, so the client's next connection is accepted by the kernel at once
  and waits in the queue until the new process accepts it: no refusal, no retry.
- **rebind**: a restart loop as process-compose or a shell ``while`` loop does it: the
  service binds the port itself; after it exits, the loop waits the same 0.1 s and
  starts it again. Until the new process listens, connections are refused, so the
  client retries every 10 ms (its best case; real clients back off for longer).

Each sample is one death: the time from sending "die" to the answer of the next
request, and how many connections were refused in between. Only the first restart of
each ``up`` is timed, so every sample has the same 0.1 s backoff (later restarts of a
crash loop wait 0.2, 0.4, ... s).

Run: ``python -m benchmarks.bench_restart`` (``--quick`` for 3 repetitions).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import Row, Section, find_free_block, print_section
from benchmarks.bench_instance import bench_env
from benchmarks.bench_up import LAUNCH_ROW, spawn_ms

PY = sys.executable
BACKOFF_S = 0.1
TIMEOUT_S = 60.0

# Serves on fd 3 (kept socket) or binds $PORT itself (rebind); "die" -> answer, exit 1.
SERVICE_CODE = """\
import os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if os.environ.get("LISTEN_FDS"):
    server = socket.socket(fileno=3)
else:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(os.environ["PORT"])))
    server.listen(128)
while True:
    conn, _ = server.accept()
    line = conn.makefile().readline().strip()
    if line:
        conn.sendall(f"{os.getpid()}\\n".encode())
    conn.close()
    if line == "die":
        sys.exit(1)
"""

# The restart loop of a process manager that does not keep sockets.
LOOP_CODE = """\
import subprocess, sys, time
while True:
    subprocess.run(sys.argv[2:])
    time.sleep(float(sys.argv[1]))
"""


def free_port() -> int:
    """Two free ports (``port``, ``port + 1``) below the ephemeral range: the rebinding
    loop binds its fixed port again and again."""
    return find_free_block(size=2)


def ask(port: int, line: str, *, retry: bool) -> tuple[int, int]:
    """Send ``line`` over a fresh connection; (answering pid, refused connections)."""
    refused = 0
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as conn:
                conn.sendall(line.encode() + b"\n")
                answer = conn.makefile().readline().strip()
            if answer:
                return int(answer), refused
        except ConnectionError:
            pass
        if not retry or time.monotonic() > deadline:
            raise RuntimeError(f"no answer on port {port} after {refused} refusals")
        refused += 1
        time.sleep(0.01)


def one_death(port: int) -> tuple[float, int]:
    """Kill the service through its own "die" and time the next answer (s, refusals)."""
    before, _ = ask(port, "hello", retry=True)
    t0 = time.perf_counter()
    ask(port, "die", retry=False)
    after, refused = ask(port, "hello", retry=True)
    elapsed = time.perf_counter() - t0
    if after == before:
        raise RuntimeError("the service did not restart")
    return elapsed, refused


def kept_socket(directory: Path, port: int, repeats: int) -> tuple[list[float], list[int]]:
    """``portpool up`` with restart = "on-failure": one death per ``up``."""
    script = directory / "service.py"
    config = directory / "portpool.toml"
    config.write_text(
        'app = "benchrestart"\n[services.svc]\n'
        f"base = {port}\nsize = 1\ncommand = {json.dumps([PY, str(script)])}\n"
        'restart = "on-failure"\n'
    )
    times, refusals = [], []
    for i in range(repeats + 1):  # the first one fills the byte-code cache
        env = bench_env(PORTPOOL_HOME=str(directory / f"state{i}"))
        up = subprocess.Popen(
            [PY, "-m", "portpool.cli", "up", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            assert up.stdout is not None
            for line in up.stdout:
                if line.rstrip().endswith("is up"):
                    break
            else:
                raise RuntimeError("portpool up ended before it was up")
            elapsed, refused = one_death(port)
            if i:
                times.append(elapsed * 1000)
                refusals.append(refused)
        finally:
            up.send_signal(signal.SIGTERM)
            up.communicate(timeout=TIMEOUT_S)
    return times, refusals


def rebind(directory: Path, port: int, repeats: int) -> tuple[list[float], list[int]]:
    """A restart loop whose service binds the port itself."""
    script = directory / "service.py"
    loop = directory / "loop.py"
    loop.write_text(LOOP_CODE)
    env = bench_env(PORT=str(port))
    env.pop("LISTEN_FDS", None)
    proc = subprocess.Popen(
        [PY, str(loop), str(BACKOFF_S), PY, str(script)], env=env, start_new_session=True
    )
    times, refusals = [], []
    try:
        for i in range(repeats + 1):
            elapsed, refused = one_death(port)
            if i:
                times.append(elapsed * 1000)
                refusals.append(refused)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the loop and its current service: ours
        proc.wait(timeout=TIMEOUT_S)
    return times, refusals


def run(quick: bool = False) -> Section:
    """Death-to-next-answer with the socket kept, beside a restart that rebinds."""
    repeats = 3 if quick else 10
    section = Section("restart: a service's death to the next request answered")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "service.py").write_text(SERVICE_CODE)
        port = free_port()
        kept, kept_refused = kept_socket(directory, port, repeats)
        loop, loop_refused = rebind(directory, port + 1, repeats)
        section.rows += [
            Row(
                LAUNCH_ROW,
                spawn_ms([PY, "-c", "pass"], max(3, repeats)),
                unit="ms",
                note="the restarted service's own start-up floor",
            ),
            Row(
                "socket kept (portpool up, on-failure)",
                kept,
                unit="ms",
                note=f"0.1 s backoff; refused connections: {sum(kept_refused)}",
            ),
            Row(
                "rebind (restart loop, client retries every 10 ms)",
                loop,
                unit="ms",
                note=f"0.1 s backoff; refused connections: {sum(loop_refused)}",
            ),
        ]
        section.floor = LAUNCH_ROW
    section.extra = {
        "kept_refused": kept_refused,
        "rebind_refused": loop_refused,
        "backoff_s": BACKOFF_S,
    }
    by = {r.name: r.median for r in section.rows}
    work = (
        "the start (fork; in the child the socket placed at fd 3 and SIGTERM asked for on "
        "up's death; exec) and the state written to the instance record"
    )
    kept_ms = by["socket kept (portpool up, on-failure)"]
    loop_ms = by["rebind (restart loop, client retries every 10 ms)"]
    section.notes += [
        f"With the socket kept the next request is answered {kept_ms:.0f} ms after the "
        f"death ({BACKOFF_S * 1000:.0f} ms backoff + the start + the service's start-up) "
        f"and no connection is refused ({sum(kept_refused)} in {len(kept)} restarts).",
        f"Rebinding answers after {loop_ms:.0f} ms, but only because this client retried: "
        f"{sum(loop_refused)} connections were refused in {len(loop)} restarts, each one an "
        "error for a client that does not retry.",
        f"The kept socket's {kept_ms - loop_ms:.0f} ms more: {work}."
        if kept_ms > loop_ms
        else f"The kept socket was {loop_ms - kept_ms:.0f} ms faster here, within the noise:"
        f" it does more ({work}).",
    ]
    return section


if __name__ == "__main__":
    print_section(run(quick="--quick" in sys.argv))
