"""Real pytest sessions started as subprocesses: the directory, environment and command
of one, and the load of two concurrent ``pytest -n 4`` sessions whose tests serve on the
port a fixture gave them (measured by ``bench_pytest``, asserted by the plugin's tests).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

# Each test binds its port WITHOUT SO_REUSEADDR and serves one HTTP request on it; the
# server closes first, so every port it used is left in TIME_WAIT, as a real server's is.
# Each worker logs "OK port start end run i" or "BINDFAIL port errno" to its own file
# (and leaves an empty "started-RUN-WORKER" file for the barrier).
SERVE = """
import os, socket, time
import pytest

LOG = os.environ["SERVE_LOG_DIR"]
RUN = os.environ["SERVE_RUN"]
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")

_PASSED = []


def _barrier():
    # No test serves before a test of the other session has begun (at most 60 s), so
    # the two sessions overlap even when one starts late on a loaded machine.
    if _PASSED:
        return
    open(os.path.join(LOG, f"started-{{RUN}}-{{WORKER}}"), "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        name.startswith("started-") and not name.startswith(f"started-{{RUN}}-")
        for name in os.listdir(LOG)
    ):
        time.sleep(0.01)
    _PASSED.append(True)


@pytest.mark.parametrize("i", range({count}))
def test_serve(i, {fixture}):
    port = {fixture}
    _barrier()
    start = time.monotonic()
    path = os.path.join(LOG, f"{{RUN}}-{{WORKER}}.log")
    server = socket.socket()
    try:
        server.bind(("127.0.0.1", port))
    except OSError as e:
        with open(path, "a") as f:
            f.write(f"BINDFAIL {{port}} {{e.errno}}\\n")
        {on_bind_failure}
    server.listen()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    conn, _ = server.accept()
    assert conn.recv(1024).startswith(b"GET / ")
    conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nok")
    conn.close()
    server.close()
    reply = client.recv(1024)
    client.close()
    assert reply.endswith(b"ok")
    end = time.monotonic()
    with open(path, "a") as f:
        f.write(f"OK {{port}} {{start!r}} {{end!r}} {{RUN}} {{i}}\\n")
"""


def serve_tests(count: int, fixture: str, *, fail_on_bind_error: bool) -> str:
    """A test module of ``count`` tests serving on the port ``fixture`` gives; a failed
    bind fails the test with ``fail_on_bind_error``, else is only logged (and counted)."""
    on_failure = "raise" if fail_on_bind_error else "return"
    return SERVE.format(count=count, fixture=fixture, on_bind_failure=on_failure)


def session_dir(root: Path, name: str, test_text: str, ini: str = "", conftest: str = "") -> Path:
    """``root/name`` holding a ``pytest.ini`` (``[pytest]`` then ``ini``), the test module
    ``test_text`` and, if given, a ``conftest.py``."""
    where = root / name
    where.mkdir()
    (where / "pytest.ini").write_text("[pytest]\n" + ini)
    (where / "test_inner.py").write_text(test_text)
    if conftest:
        (where / "conftest.py").write_text(conftest)
    return where


def session_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without pytest's and portpool's variables (the outer session's),
    with ``PORTPOOL_HOME=home`` and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PORTPOOL_"))}
    env.update(PORTPOOL_HOME=str(home), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def pytest_cmd(*args: str) -> list[str]:
    """The command of a quiet pytest session without a cache, then ``args``."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def run_serving_sessions(
    root: Path, test_text: str, ini: str, *, conftest: str = "", timeout_s: float
) -> tuple[list[tuple[int, str]], list[list[str]]]:
    """Run two ``pytest -n 4`` sessions of ``test_text`` (``serve_tests``) at once, in
    ``root/a`` and ``root/b``, sharing the state dir ``root/state``.

    Returns each session's (exit status, output) and the tests' log lines, split into
    words. Raises subprocess.TimeoutExpired after ``timeout_s`` seconds for one session.
    """
    logs = root / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[str]] = []
    try:
        for run in ("a", "b"):
            where = session_dir(root, run, test_text, ini, conftest)
            procs.append(
                subprocess.Popen(
                    pytest_cmd("-n", "4"),
                    cwd=where,
                    env=session_env(root / "state", SERVE_LOG_DIR=str(logs), SERVE_RUN=run),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:  # a session that timed out is not left running
            if p.poll() is None:
                p.kill()
                p.wait()
    done = [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]
    lines = [line.split() for f in sorted(logs.iterdir()) for line in f.read_text().splitlines()]
    return done, lines


def count_log(lines: list[list[str]]) -> tuple[int, int, int, int]:
    """(served, bind failures, overlaps, distinct ports) from the tests' log lines."""
    served = [(int(x[1]), float(x[2]), float(x[3])) for x in lines if x[0] == "OK"]
    failures = sum(1 for x in lines if x[0] == "BINDFAIL")
    by_port: dict[int, list[tuple[float, float]]] = {}
    for port, start, end in served:
        by_port.setdefault(port, []).append((start, end))
    overlaps = 0
    for uses in by_port.values():
        uses.sort()
        overlaps += sum(1 for (_, e1), (s2, _) in itertools.pairwise(uses) if s2 < e1)
    return len(served), failures, overlaps, len(by_port)
