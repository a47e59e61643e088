"""Fault injection: full disk, read-only and deleted state dirs, clock steps, SIGSTOP.

Each fault is real: a small tmpfs filled to the last byte, a read-only remount, an
``rm -rf`` under a running instance, a stopped process. After each one the instance
either fails with a clear error or keeps working, and nobody else is harmed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import (
    held_lock_files,
    kill_if_running,
    mounted_tmpfs,
    portpool,
    start,
    status_json,
    wait_for,
    write_layout,
)

from portpool.errors import PoolExhausted, PortPoolError
from portpool.instance import start_instance
from portpool.layout import load_layout
from portpool.pool import acquire
from portpool.records import list_instances
from portpool.statedir import StateDir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux faults")

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for this test (root only; skipped where mounting is denied)."""
    with mounted_tmpfs(tmp_path / "mnt", "64k") as mnt:
        yield mnt


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * 4096
        for _ in range(10_000):  # bounded: the tmpfs is 64 KiB
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]  # fill the last partial page too
    finally:
        os.close(fd)
    return filler


def _run_prints_instance(config: Path, env: dict[str, str]) -> str:
    code = "import os; print(os.environ['PORTPOOL_INSTANCE'])"
    done = portpool("run", "--config", str(config), "--", sys.executable, "-c", code, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _running_command(config: Path, run_pid: int) -> bool:
    """Whether the instance of ``portpool run`` (pid ``run_pid``) has started its command."""
    for inst in status_json(config)["instances"]:
        if inst["pid"] == run_pid and all(s["pid"] != run_pid for s in inst["services"]):
            return True
    return False


# ---------------------------------------------------------------- full disk


def test_full_disk_fails_clearly_and_leaves_nothing_that_blocks(
    tmpfs: Path, tmp_path: Path, port_base: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmpfs / "state"
    monkeypatch.setenv("PORTPOOL_HOME", str(home))
    layout = load_layout(str(write_layout(tmp_path / "l.toml", port_base)))
    with StateDir.open(str(home)) as state:
        state.ports()
        state.instances(layout.app)  # the directories exist; now the disk fills up
        filler = _fill(tmpfs)
        with pytest.raises(PortPoolError) as caught:
            start_instance(layout, state=state, heartbeat=False)
        assert str(home) in str(caught.value)
        assert "No space left" in str(caught.value)
        # All or nothing: no lock is left held, no half-written record names a holder.
        assert held_lock_files(home) == []
        assert list_instances(layout.app, state) == []
    filler.unlink()
    env = dict(os.environ)
    assert _run_prints_instance(tmp_path / "l.toml", env) == "1"


def test_full_disk_after_earlier_use_is_no_worse(
    tmpfs: Path, tmp_path: Path, port_base: int
) -> None:
    """Record files kept from an earlier run are rewritten in place; the new instance record
    cannot be written: a clear error, then a normal start once space is back."""
    home = tmpfs / "state"
    layout = load_layout(str(write_layout(tmp_path / "l.toml", port_base)))
    with StateDir.open(str(home)) as state:
        start_instance(layout, state=state, heartbeat=False).release()
        filler = _fill(tmpfs)
        with pytest.raises(PortPoolError) as caught:
            start_instance(layout, state=state, heartbeat=False)
        assert str(home) in str(caught.value)
        assert held_lock_files(home) == []
        filler.unlink()
        with start_instance(layout, state=state, heartbeat=False) as inst:
            assert inst.number == 1
            assert inst.ports == {"alpha": port_base, "beta": port_base + 2}


# ---------------------------------------------------------------- read-only state dir


def test_read_only_state_dir_fails_with_exit_1_naming_the_path(
    tmpfs: Path, tmp_path: Path, port_base: int
) -> None:
    home = tmpfs / "state"
    config = write_layout(tmp_path / "l.toml", port_base)
    env = {**os.environ, "PORTPOOL_HOME": str(home)}
    assert _run_prints_instance(config, env) == "1"  # creates every file once
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    done = portpool("run", "--config", str(config), "--", "true", env=env)
    assert done.returncode == 1, done.stderr
    assert str(home) in done.stderr
    assert "Read-only" in done.stderr
    assert "Traceback" not in done.stderr
    # Readers still work on a read-only state dir.
    assert portpool("status", "--config", str(config), env=env).returncode == 0
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert _run_prints_instance(config, env) == "1"


# ---------------------------------------------------------------- state dir deleted


def test_state_dir_deleted_trips_the_shield_and_harms_nobody(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "l.toml", port_base, heartbeat=0.1, shield=0.2)
    first = start("run", "--config", str(config), "--", *SLEEPER)
    try:
        wait_for(lambda: _running_command(config, first.pid))
        shutil.rmtree(home)
        # Someone starts afresh in the recreated state dir while the first still runs.
        second = start("run", "--config", str(config), "--", *SLEEPER)
        try:
            first.wait(timeout=30)
            _, err = first.communicate(timeout=10)
            assert first.returncode == 4, err
            assert "shield tripped" in err
            assert "deleted" in err or "replaced" in err
            # The newcomer was not harmed by the first one's shutdown: still running,
            # still listed with its ports, its locks still held.
            time.sleep(1.0)  # several shield intervals of the second instance
            assert second.poll() is None
            status = status_json(config)
            (only,) = status["instances"]
            assert only["alive"] is True
            assert only["pid"] == second.pid
            assert {s["port"] for s in only["services"]} == {port_base, port_base + 2}
            assert len(held_lock_files(home)) == 3
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
        assert second.returncode != 4
    finally:
        kill_if_running(first)


# ---------------------------------------------------------------- clock steps

CLOCK_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    from portpool.instance import start_instance
    from portpool.layout import load_layout

    real = time.time
    offset = [0.0]
    time.time = lambda: real() + offset[0]  # what the library reads for heartbeats

    layout = load_layout(sys.argv[1])
    inst = start_instance(layout)
    tripped = []
    inst.start_shield(on_lost=lambda lease, reason: tripped.append(reason))
    print("started", inst.number, flush=True)
    steps = [3600.0, -3600.0, 0.0, -86400.0, 7200.0, 0.0]
    for i in range(36):  # 36 steps of 0.1 s: many heartbeats and shield checks each way
        offset[0] = steps[i % len(steps)]
        time.sleep(0.1)
    offset[0] = 0.0
    time.sleep(0.5)
    print("tripped" if tripped else "ok", tripped, flush=True)
    inst.release()
    """
)


def test_clock_steps_never_trip_nor_make_the_instance_look_dead(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "l.toml", port_base, heartbeat=0.05, shield=0.1)
    child = subprocess.Popen(
        [sys.executable, "-c", CLOCK_CHILD, str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["started", "1"]
        seen = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and child.poll() is None:
            status = status_json(config)
            if child.poll() is not None:
                break  # it may have released between our look and now
            (inst,) = status["instances"]
            assert inst["alive"] is True
            assert inst["pid"] == child.pid
            age = inst["heartbeat_age_s"]
            assert age is None or age >= 0
            # gc judges by locks, never by heartbeat age: the live instance survives it.
            assert portpool("gc").returncode == 0
            seen += 1
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert out.split()[0] == "ok", out
        assert seen >= 2
    finally:
        kill_if_running(child)


# ---------------------------------------------------------------- SIGSTOP


def test_sigstopped_holder_keeps_its_ports_and_slot_and_stays_healthy(
    home: Path, tmp_path: Path, port_base: int, state: StateDir
) -> None:
    config = write_layout(tmp_path / "l.toml", port_base, heartbeat=0.1, shield=0.2)
    first = start("run", "--config", str(config), "--", *SLEEPER)
    try:
        wait_for(lambda: _running_command(config, first.pid))
        first.send_signal(signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            code = "import os, json; print(json.dumps(dict(os.environ)))"
            newcomer = portpool("run", "--config", str(config), "--", sys.executable, "-c", code)
            assert newcomer.returncode == 0, newcomer.stderr
            env = json.loads(newcomer.stdout)
            assert env["PORTPOOL_INSTANCE"] == "2"
            assert env["PORTPOOL_PORT_ALPHA"] == str(port_base + 10)
            for port in (port_base, port_base + 2):
                with pytest.raises(PoolExhausted) as caught:
                    acquire(state, [port])
                assert caught.value.refusals[0].reason == "held"
                assert str(first.pid) in caught.value.refusals[0].detail
            # Stopped for many heartbeats and shield intervals: still alive, never dead.
            checks = 0
            while checks < 3 or time.monotonic() - stopped_at < 2.0:
                instances = {i["number"]: i for i in status_json(config)["instances"]}
                assert instances[1]["alive"] is True
                assert instances[1]["pid"] == first.pid
                checks += 1
                time.sleep(0.2)
            assert instances[1]["heartbeat_age_s"] >= 1.0
        finally:
            first.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # five shield intervals after waking up
        assert first.poll() is None
        (inst,) = status_json(config)["instances"]
        assert inst["alive"] is True
        assert inst["heartbeat_age_s"] < 1.0  # heartbeats resumed
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=30)
        assert first.returncode != 4
        assert "shield tripped" not in err
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait(timeout=10)
