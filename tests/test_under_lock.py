"""tools/under_lock.py: the Makefile's builds of .venv run once, however many `make`
runs ask at the same moment (the README's second `make run`, in a fresh clone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "under_lock.py"
# The build stand-in: records that it ran, says it started, takes a while, then makes
# the stamp (argv[3]) as its last step, as the Makefile's builds do.
BUILD = (
    "import os, sys, time\n"
    "with open(sys.argv[1], 'a') as f: f.write(f'{os.getpid()}\\n')\n"
    "print('started', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "open(sys.argv[3], 'a').close(); os.utime(sys.argv[3])\n"
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no lock without fcntl")


def _under_lock(tmp: Path, *build: str, stdout: int | None = None) -> subprocess.Popen[str]:
    paths = [str(tmp / name) for name in ("v.lock", "stamp", "src")]
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *paths, "--", *build],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def _build(tmp: Path, seconds: str) -> list[str]:
    return [sys.executable, "-c", BUILD, str(tmp / "runs"), seconds, str(tmp / "stamp")]


def _runs(tmp: Path) -> list[str]:
    log = tmp / "runs"
    return log.read_text().split() if log.exists() else []


def test_builds_asked_for_at_once_run_once(tmp_path: Path) -> None:
    (tmp_path / "src").write_text("source")
    for _ in range(3):  # a round of racing builds; each round's stamp starts stale
        (tmp_path / "stamp").unlink(missing_ok=True)
        (tmp_path / "runs").unlink(missing_ok=True)
        build = _build(tmp_path, "0.3")
        procs = [_under_lock(tmp_path, *build) for _ in range(6)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors
        assert len(_runs(tmp_path)) == 1, errors
        assert (tmp_path / "stamp").exists()
        assert sum("built by another make meanwhile" in e for e in errors) == 5, errors


def test_a_waiting_build_says_what_it_waits_for(tmp_path: Path) -> None:
    (tmp_path / "src").write_text("source")
    build = _build(tmp_path, "1")
    first = _under_lock(tmp_path, *build, stdout=subprocess.PIPE)
    assert first.stdout is not None
    assert first.stdout.readline() == "started\n"  # it holds the lock now
    second = _under_lock(tmp_path, *build)
    err = second.communicate(timeout=60)[1]
    first.communicate(timeout=60)
    assert f"Waiting for another build that holds {tmp_path / 'v.lock'}" in err
    assert len(_runs(tmp_path)) == 1


def test_the_lock_lasts_as_long_as_the_build_and_no_longer(tmp_path: Path) -> None:
    """Killed midway (kill -9, or a SIGTERM to make, which reaches it), the wrapper
    left its build running with the lock free, and a second build ran beside it. The
    build inherits the lock; once the build is gone too, the next one runs."""
    (tmp_path / "src").write_text("source")
    first = _under_lock(tmp_path, *_build(tmp_path, "30"), stdout=subprocess.PIPE)
    assert first.stdout is not None
    assert first.stdout.readline() == "started\n"
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    orphan = int(_runs(tmp_path)[0])  # the build, still running
    second = _under_lock(tmp_path, *_build(tmp_path, "0"))
    assert second.stderr is not None
    line = second.stderr.readline()
    assert line.startswith("Waiting for another build"), line
    time.sleep(0.5)
    assert second.poll() is None  # held by the orphaned build
    os.kill(orphan, signal.SIGKILL)
    first.communicate(timeout=30)
    assert second.wait(timeout=20) == 0
    assert len(_runs(tmp_path)) == 2  # no stamp from the killed one: built again
    assert (tmp_path / "stamp").exists()


def test_a_failed_build_is_not_taken_for_done_and_gives_its_status(tmp_path: Path) -> None:
    (tmp_path / "src").write_text("source")
    failing = _under_lock(tmp_path, sys.executable, "-c", "raise SystemExit(7)")
    assert failing.wait(timeout=60) == 7
    assert not (tmp_path / "stamp").exists()
    killed = _under_lock(tmp_path, sys.executable, "-c", "import os; os.kill(os.getpid(), 9)")
    assert killed.wait(timeout=60) == 128 + signal.SIGKILL  # as a shell reports it


def test_a_stamp_older_than_a_source_is_built_again(tmp_path: Path) -> None:
    (tmp_path / "src").write_text("source")
    build = _build(tmp_path, "0")
    assert _under_lock(tmp_path, *build).wait(timeout=60) == 0
    assert _under_lock(tmp_path, *build).wait(timeout=60) == 0  # fresh: not run
    assert len(_runs(tmp_path)) == 1
    later = (tmp_path / "stamp").stat().st_mtime + 10
    os.utime(tmp_path / "src", (later, later))  # pyproject.toml edited after the build
    assert _under_lock(tmp_path, *build).wait(timeout=60) == 0
    assert len(_runs(tmp_path)) == 2


def test_a_command_line_without_a_command_is_a_usage_error(tmp_path: Path) -> None:
    for args in (["lock", "stamp"], ["lock", "--", "true"], ["lock", "stamp", "--"]):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
        )
        assert result.returncode == 2
        assert result.stderr.startswith("usage: under_lock.py")
