"""Reaching instances from outside: the same number per checkout, skipped and pinned
slots, port/env, stop (and what it refuses to signal), up --detach and logs."""

from __future__ import annotations

import gc
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests.helpers import (
    HOLD,
    PORTPOOL,
    is_listening,
    kill_if_running,
    occupy,
    pid_alive,
    portpool,
    read_line,
    releasing,
    start,
    status_json,
    wait_for,
    write_layout,
)

import portpool as portpool_lib
from portpool._heldlock import HeldLock
from portpool._jsonfile import write_atomic
from portpool._platform import current_identity
from portpool._portstatus import inspect_port
from portpool._slots import remember_number
from portpool.errors import PoolExhausted, SlotUnavailable, StopFailed
from portpool.instance import start_instance
from portpool.layout import Service, default_layout, load_layout
from portpool.records import list_instances
from portpool.statedir import StateDir


@pytest.fixture
def layout_file(tmp_path: Path, port_base: int) -> Path:
    return write_layout(tmp_path / "portpool.toml", port_base)


def _hold(layout: Path, release: Path, *extra: str, cwd: Path | None = None):
    """A `run` holding an instance of ``layout`` until ``release`` exists, and its number,
    once its record is whole: it names the command's pid only after the command started,
    and a test that rewrote (or deleted) the record before that saw it written over."""
    proc = start(
        "run", "--config", str(layout), *extra, "--", sys.executable, "-c", HOLD, str(release),
        cwd=cwd,
    )  # fmt: skip
    number = int(read_line(proc))

    def recorded() -> bool:
        shown = portpool("status", "--json", "--config", str(layout), cwd=cwd)
        assert shown.returncode == 0, shown.stderr
        listed = [i for i in json.loads(shown.stdout)["instances"] if i["number"] == number]
        return bool(listed) and all(s["pid"] != proc.pid for s in listed[0]["services"])

    wait_for(recorded, timeout=30)
    return proc, number


# ---------------------------------------------------------------- numbers


def test_same_checkout_gets_its_previous_number(layout_file: Path, state: StateDir) -> None:
    layout = load_layout(str(layout_file))
    with (
        start_instance(layout, state=state, directory="/checkouts/a") as a,
        start_instance(layout, state=state, directory="/checkouts/b") as b,
    ):
        assert (a.number, b.number) == (1, 2)
    # b alone first: it gets 2 again, not the lowest free (1); then a gets 1.
    with start_instance(layout, state=state, directory="/checkouts/b") as b:
        assert b.number == 2
        with start_instance(layout, state=state, directory="/checkouts/a") as a:
            assert a.number == 1
            infos = {i.number: i.directory for i in list_instances(layout.app, state)}
            assert infos == {1: "/checkouts/a", 2: "/checkouts/b"}
        # A second copy of b's checkout does not move b's number.
        with start_instance(layout, state=state, directory="/checkouts/b") as b2:
            assert b2.number == 1
    with start_instance(layout, state=state, directory="/checkouts/b") as b:
        assert b.number == 2
    # Taken by someone else: the lowest free one.
    with (
        start_instance(layout, state=state, directory="/checkouts/c", number=2),
        start_instance(layout, state=state, directory="/checkouts/b") as b,
    ):
        assert b.number == 1


def test_a_copy_that_ended_does_not_move_the_checkouts_number(
    layout_file: Path, state: StateDir
) -> None:
    # Eight parallel runs in one checkout: one that took 2 because the checkout's 1 was
    # busy remembered 2 whenever the run on 1 had ended by then (the checkout drifted
    # 1, 3, 2, 4 over rounds, and its next `up` took another number's ports).
    layout = load_layout(str(layout_file))
    with start_instance(layout, state=state, directory="/c") as first:
        assert first.number == 1
    checkout = Path(state.path) / "apps" / layout.app / "checkouts"
    (kept,) = checkout.iterdir()
    remember_number(state, layout.app, "/c", 2, 1, pinned=False)  # 1 has ended
    assert json.loads(kept.read_text())["number"] == 1
    with start_instance(layout, state=state, directory="/d", number=1):
        remember_number(state, layout.app, "/c", 2, 1, pinned=False)  # another's has it
    assert json.loads(kept.read_text())["number"] == 2
    remember_number(state, layout.app, "/c", 3, 2, pinned=True)  # pinned: chosen
    assert json.loads(kept.read_text())["number"] == 3


def test_parallel_runs_in_one_checkout_keep_its_number(layout_file: Path, home: Path) -> None:
    first = portpool("run", "--config", str(layout_file), "--", "true")
    assert first.returncode == 0, first.stderr
    (kept,) = (home / "apps" / "testapp" / "checkouts").iterdir()
    for round_ in range(5):
        jobs = [
            start("run", "-q", "--config", str(layout_file), "--", "sleep", f"0.{(round_ + i) % 4}")
            for i in range(6)
        ]
        ended = [(job.communicate(timeout=60)[1], job.returncode) for job in jobs]
        assert [code for _, code in ended] == [0] * 6, ended
        assert json.loads(kept.read_text())["number"] == 1, round_


def test_of_two_copies_for_one_checkout_the_first_is_the_checkouts(
    layout_file: Path, state: StateDir
) -> None:
    # As the README says: `port`, `env`, `logs` and `stop` without a number mean the
    # copy whose number the checkout keeps, the first; a second copy never moves it.
    layout = load_layout(str(layout_file))
    with (
        start_instance(layout, state=state, number=2) as first,
        start_instance(layout, state=state) as second,
    ):
        assert second.number == 1  # the lower number, yet not the checkout's
        for command in (["port", "alpha"], ["env"]):
            done = portpool(*command, "--config", str(layout_file))
            assert done.returncode == 0, done.stderr
            assert str(first.port("alpha")) in done.stdout, (command, done.stdout)


def test_a_second_copy_pinned_to_a_number_does_not_take_the_checkouts_number(
    layout_file: Path, tmp_path: Path, home: Path
) -> None:
    # `run --instance 3` beside the checkout's running instance 1 was remembered as the
    # checkout's: `port` gave the second copy's port and `stop` stopped it, not the first.
    release = tmp_path / "release"
    procs = []
    try:
        first, n1 = _hold(layout_file, release)
        procs.append(first)
        second, n3 = _hold(layout_file, release, "--instance", "3")
        procs.append(second)
        assert (n1, n3) == (1, 3)
        port = portpool("port", "alpha", "--config", str(layout_file))
        assert port.returncode == 0, port.stderr
        infos = json.loads(portpool("status", "--json", "--config", str(layout_file)).stdout)
        ports = {i["number"]: i["services"][0]["port"] for i in infos["instances"]}
        assert int(port.stdout) == ports[1], (port.stdout, ports)
        stopped = portpool("stop", "--config", str(layout_file))
        assert stopped.returncode == 0, stopped.stderr
        assert "instance 1 of" in stopped.stdout + stopped.stderr
        assert first.wait(timeout=30) != 0  # stopped, not released by the file
        assert second.poll() is None
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=30)
    # Pinned while nothing of the checkout ran, a number is the checkout's from then on.
    release.unlink()
    pinned, n = _hold(layout_file, release, "--instance", "3")
    release.touch()
    pinned.wait(timeout=30)
    release.unlink()
    again, n_again = _hold(layout_file, release)
    release.touch()
    again.wait(timeout=30)
    assert (n, n_again) == (3, 3)


def test_checkout_is_the_layout_files_directory_and_status_shows_it(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    one = tmp_path / "one"
    two = tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        write_layout(d / "portpool.toml", port_base)
    release = tmp_path / "release"
    procs = []
    try:
        p2, n2 = _hold(two / "portpool.toml", release)
        p1, n1 = _hold(Path("portpool.toml"), release, cwd=one)
        procs += [p1, p2]
        assert (n2, n1) == (1, 2)
        done = portpool("status", "--json", "--config", str(one / "portpool.toml"))
        dirs = {i["number"]: i["dir"] for i in json.loads(done.stdout)["instances"]}
        assert dirs == {1: str(two.resolve()), 2: str(one.resolve())}
        text = portpool("status", "--config", str(one / "portpool.toml")).stdout
        assert f"dir {one.resolve()}" in text
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=30)
    # Started again in the other order, each checkout gets its own number back.
    release.unlink()
    procs = []
    try:
        p1, n1 = _hold(one / "portpool.toml", release)
        p2, n2 = _hold(two / "portpool.toml", release)
        procs += [p1, p2]
        assert (n1, n2) == (2, 1)
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=30)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need a privilege on Windows")
def test_checkouts_sharing_a_symlinked_layout_file_are_each_their_own(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Worktrees that link one shared portpool.toml: the checkout was the link's target's
    # directory, the same for all, so `port`/`stop` in one worktree reached another's.
    shared = write_layout(tmp_path / "shared.toml", port_base)
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        (d / "portpool.toml").symlink_to(shared)
    release = tmp_path / "release"
    procs = []
    try:
        p1, n1 = _hold(Path("portpool.toml"), release, cwd=one)
        procs.append(p1)
        p2, n2 = _hold(Path("portpool.toml"), release, cwd=two)
        procs.append(p2)
        assert (n1, n2) == (1, 2)
        dirs = {i["number"]: i["dir"] for i in status_json(shared)["instances"]}
        assert dirs == {1: str(one.resolve()), 2: str(two.resolve())}
        for d, n in ((one, n1), (two, n2)):
            done = portpool("env", cwd=d)
            assert done.returncode == 0, done.stderr
            assert f"PORTPOOL_INSTANCE={n}\n" in done.stdout
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=30)


def test_a_command_under_run_asking_for_its_port_gets_its_own_instances(
    layout_file: Path, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test script under `portpool run` asked `portpool port beta`: it got this
    # checkout's other instance (1), whose services it then talked to, or stopped.
    layout = load_layout(str(layout_file))
    release = tmp_path / "release"
    first, number = _hold(layout_file, release)
    try:
        assert number == 1
        cli, config = shlex.join(PORTPOOL), shlex.join(["--config", str(layout_file)])
        script = f"{cli} port beta {config}; {cli} env {config} | grep INSTANCE"
        done = portpool("run", "--config", str(layout_file), "--", "sh", "-c", script)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [str(layout.pool("beta", 2)[0]), "PORTPOOL_INSTANCE=2"]
        # Under another app's run inside it too: its environment names that app.
        other = write_layout(tmp_path / "other.toml", layout.pool("alpha", 1)[0] + 4, app="other")
        inner = shlex.join([*PORTPOOL, "run", "-q", "--config", str(other), "--", "sh", "-c"])
        nested = f"{inner} '{cli} port beta {config}'"
        done = portpool("run", "-q", "--config", str(layout_file), "--", "sh", "-c", nested)
        assert done.stdout == f"{layout.pool('beta', 2)[0]}\n", done.stderr
        # The nearest one: `run` in `run` of the same app (instance 3 in 2).
        inner = shlex.join([*PORTPOOL, "run", "-q", "--config", str(layout_file), "--"])
        nested = f"{inner} sh -c '{cli} port beta {config}'"
        done = portpool("run", "-q", "--config", str(layout_file), "--", "sh", "-c", nested)
        assert done.stdout == f"{layout.pool('beta', 3)[0]}\n", done.stderr
        # `stop` stops its own run (which dies of the SIGTERM it passed on), not instance 1.
        script = f"{cli} stop {config}; sleep 30"
        done = portpool("run", "--config", str(layout_file), "--", "sh", "-c", script)
        assert done.returncode == -signal.SIGTERM, done.stderr
        assert first.poll() is None
        # Named by an environment that no running instance's process gave (a stale
        # `eval "$(portpool env --export)"`): this checkout's instance, as before.
        monkeypatch.setenv("PORTPOOL_APP", layout.app)
        for stale in ("2", "1x", "0", "99999999999999999999"):
            monkeypatch.setenv("PORTPOOL_INSTANCE", stale)
            shown = portpool("port", "beta", "--config", str(layout_file))
            assert shown.stdout == f"{layout.pool('beta', 1)[0]}\n", shown.stderr
    finally:
        release.touch()
        first.wait(timeout=30)


def test_slot_blocked_by_foreign_programs_is_skipped(
    layout_file: Path, state: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    layout = load_layout(str(layout_file))
    foreign = [socket.create_server(("127.0.0.1", p)) for p in layout.pool("beta", 1)]
    try:
        with caplog.at_level(logging.WARNING, logger="portpool.instance"):
            inst = start_instance(layout, state=state, directory="/x")
        with inst:
            assert inst.number == 2
            assert [n for n, _ in inst.skipped] == [1]
            assert "beta" in inst.skipped[0][1]
            assert "instance 1 of testapp skipped" in caplog.text
            assert f"port {layout.pool('beta', 1)[0]}: in use" in caplog.text
            # Slot 1 and alpha's port in it were given back.
            assert inspect_port(state, layout.pool("alpha", 1)[0]).is_free
        # Pinned: no skipping.
        with pytest.raises(PoolExhausted) as info:
            start_instance(layout, state=state, number=1)
        assert info.value.exit_code == 3
        # The command line says it too, on stderr; the command's stdout stays clean.
        done = portpool("run", "--config", str(layout_file), "--", sys.executable, "-c",
                        "import os; print(os.environ['PORTPOOL_INSTANCE'])")  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "2\n"), done.stderr
        assert "instance 1 of testapp skipped: service 'beta': every port" in done.stderr
        assert f"pid {os.getpid()}" in done.stderr  # who blocks it
        # A one-port pool: "its only port is refused", not "every port of its pool".
        one = layout.with_changes(
            services=(layout.services[0], Service("beta", layout.pool("beta", 1)[0], 1, 10)),
        )
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="portpool.instance"),
            start_instance(one, state=state, directory="/y") as inst,  # no number kept
        ):
            assert inst.number == 2
        assert "skipped: service 'beta': its only port is refused (port " in caplog.text
    finally:
        for s in foreign:
            s.close()


def test_a_number_taken_past_a_blocked_slot_is_not_the_checkouts_from_then_on(
    layout_file: Path, home: Path
) -> None:
    # A start that found slot 1's pool held by a foreign program took 2, and 2 became
    # the checkout's number: once the program was gone, every start still took 2.
    layout = load_layout(str(layout_file))
    show = [sys.executable, "-c", "import os; print(os.environ['PORTPOOL_INSTANCE'])"]

    def number(blocked: bool = False) -> str:
        ports = layout.pool("beta", 1) if blocked else []  # held by a foreign program
        foreign = [socket.create_server(("127.0.0.1", p)) for p in ports]
        try:
            done = portpool("run", "--config", str(layout_file), "--", *show)
        finally:
            for s in foreign:
                s.close()
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert number() == "1\n"  # the checkout's number from now on
    assert number(blocked=True) == "2\n"
    assert number() == "1\n"
    # With no number kept yet, a start past a blocked slot keeps none either.
    checkouts = home / "apps" / layout.app / "checkouts"
    shutil.rmtree(checkouts)
    assert number(blocked=True) == "2\n"
    assert not list(checkouts.iterdir())
    assert number() == "1\n"


def test_every_slot_blocked_reports_the_pool(tmp_path: Path, port_base: int, state) -> None:
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, max_instances=2)))
    ports = layout.pool("beta", 1) + layout.pool("beta", 2)
    foreign = [socket.create_server(("127.0.0.1", p)) for p in ports]
    try:
        with pytest.raises(PoolExhausted) as info:
            start_instance(layout, state=state)
        assert info.value.service == "beta"
        assert list_instances(layout.app, state) == []
    finally:
        for s in foreign:
            s.close()


def test_pinned_number_fails_if_running(layout_file: Path, home: Path, tmp_path: Path) -> None:
    release = tmp_path / "release"
    proc, n = _hold(layout_file, release, "--instance", "3")
    try:
        assert n == 3
        done = portpool("run", "--config", str(layout_file), "-i", "3", "--", "true")
        assert done.returncode == 3
        assert "instance 3 of 'testapp' cannot be had" in done.stderr
        assert f"pid {proc.pid}" in done.stderr
        done = portpool("run", "--config", str(layout_file), "-i", "11", "--", "true")
        assert done.returncode == 2
        with pytest.raises(SlotUnavailable):
            start_instance(load_layout(str(layout_file)), number=3)
    finally:
        release.touch()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- port and env


def test_port_and_env_of_the_running_instances(tmp_path: Path, port_base: int, home: Path) -> None:
    here = tmp_path / "here"
    there = tmp_path / "there"
    for d in (here, there):
        d.mkdir()
        write_layout(d / "portpool.toml", port_base)
    cfg = str(here / "portpool.toml")
    done = portpool("port", "alpha", "--config", cfg)
    assert (done.returncode, done.stdout) == (1, "")
    assert "no instance of testapp is running" in done.stderr
    release = tmp_path / "release"
    p1, _ = _hold(there / "portpool.toml", release)
    try:
        # Not this checkout's, but the only one running.
        done = portpool("port", "beta", "--config", cfg)
        assert done.stdout == f"{port_base + 2}\n", done.stderr
        p2, _ = _hold(here / "portpool.toml", release)
        try:
            assert portpool("port", "beta", cwd=here).stdout == f"{port_base + 12}\n"
            assert portpool("port", "beta", "-i", "1", cwd=here).stdout == f"{port_base + 2}\n"
            doc = json.loads(portpool("port", "alpha", "--json", cwd=here).stdout)
            assert doc == {"app": "testapp", "instance": 2, "service": "alpha",
                           "port": port_base + 10}  # fmt: skip
            # Two running, neither for this directory: an error listing both.
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            write_layout(elsewhere / "portpool.toml", port_base)
            done = portpool("port", "beta", cwd=elsewhere)
            assert done.returncode == 1
            assert "instance 1" in done.stderr
            assert "instance 2" in done.stderr
            assert portpool("port", "gamma", cwd=here).returncode == 2
            assert portpool("port", "beta", "-i", "5", cwd=here).returncode == 1

            lines = portpool("env", cwd=here).stdout.splitlines()
            env = dict(line.split("=", 1) for line in lines)
            assert env == {
                "PORTPOOL_APP": "testapp",
                "PORTPOOL_INSTANCE": "2",
                "PORTPOOL_PORT_ALPHA": str(port_base + 10),
                "PORTPOOL_PORT_BETA": str(port_base + 12),
                "PORTPOOL_SERVICES": "alpha,beta",
            }
            exported = portpool("env", "--export", "-i", "1", cwd=here).stdout
            shell = subprocess.run(
                ["sh", "-c", f'{exported}\necho "$PORTPOOL_INSTANCE $PORTPOOL_PORT_BETA"'],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert shell.stdout == f"1 {port_base + 2}\n"
        finally:
            release.touch()
            p2.wait(timeout=30)
    finally:
        release.touch()
        p1.wait(timeout=30)


# ---------------------------------------------------------------- stop


def test_stop_ends_the_holder_and_waits_for_its_ports(
    layout_file: Path, port_base: int, home: Path, tmp_path: Path
) -> None:
    release = tmp_path / "never"
    procs = [_hold(layout_file, release)[0] for _ in range(3)]
    try:
        done = portpool("stop", "2", "--config", str(layout_file), "--json")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["stopped"] == [{"number": 2, "pid": procs[1].pid,
                                   "ports": [port_base + 10, port_base + 12]}]  # fmt: skip
        # Returned only once the ports were free: the run is gone, its locks too.
        assert procs[1].wait(timeout=5) == -signal.SIGTERM  # run dies of its command's signal
        with StateDir.open() as state:
            assert inspect_port(state, port_base + 10).is_free
        assert procs[0].poll() is None
        assert procs[2].poll() is None
        again = portpool("stop", "2", "--config", str(layout_file))
        assert again.returncode == 1
        assert "instance 2 of testapp is not running" in again.stderr
        done = portpool("stop", "--all", "--config", str(layout_file))
        assert done.returncode == 0, done.stderr
        assert "instance 1 of testapp stopped" in done.stdout
        assert "instance 3 of testapp stopped" in done.stdout
        assert procs[0].wait(timeout=5) == procs[2].wait(timeout=5) == -signal.SIGTERM
        assert portpool("stop", "--all", "--config", str(layout_file)).returncode == 1
        assert portpool("stop", "1", "--all", "--config", str(layout_file)).returncode == 2
    finally:
        for p in procs:
            kill_if_running(p)


# Takes slot 1 the moment it is free (bounded), says so, holds it until argv[2] exists.
RETAKE_SLOT = """
import os, sys, time
from portpool.errors import SlotUnavailable
from portpool.instance import start_instance
from portpool.layout import load_layout
layout = load_layout(sys.argv[1])
print("trying", flush=True)
deadline = time.monotonic() + 30
while True:
    try:
        instance = start_instance(layout, number=1, heartbeat=False)
        break
    except SlotUnavailable:
        if time.monotonic() > deadline:
            raise
print("took", os.getpid(), flush=True)
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline + 30:
    time.sleep(0.05)
instance.release()
"""


def test_stop_is_done_when_a_start_takes_the_slot_its_holder_let_go(
    layout_file: Path, home: Path, tmp_path: Path
) -> None:
    """A start that took slot N as soon as its holder let go (a restart loop, a pinned
    --instance N) made `stop N` wait to its timeout, then fail naming the pid it had
    stopped, long gone, as still holding the instance."""
    release = tmp_path / "release"
    first, _ = _hold(layout_file, release, "--instance", "1")
    retaker = subprocess.Popen(
        [sys.executable, "-c", RETAKE_SLOT, str(layout_file), str(release)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(retaker) == "trying\n"
        done = portpool("stop", "1", "--timeout", "10", "--config", str(layout_file))
        assert done.returncode == 0, done.stderr
        assert f"instance 1 of testapp stopped (pid {first.pid})" in done.stdout
        assert first.wait(timeout=5) == -signal.SIGTERM
        assert read_line(retaker).startswith("took ")  # the slot was taken again
    finally:
        release.touch()
        kill_if_running(first)
        retaker.wait(timeout=30)


def test_stop_reaches_a_running_instance_beyond_a_lowered_max(
    layout_file: Path, port_base: int, home: Path, tmp_path: Path
) -> None:
    # Instance 3 runs; the layout's max_instances then went down to 2: status lists it
    # and port/env reach it, but `stop 3` was a usage error (exit 2).
    release = tmp_path / "never"
    third, _ = _hold(layout_file, release, "--instance", "3")
    try:
        smaller = write_layout(tmp_path / "smaller.toml", port_base, max_instances=2)
        done = portpool("stop", "3", "--config", str(smaller))
        assert done.returncode == 0, done.stderr
        assert "instance 3 of testapp stopped" in done.stdout
        assert third.wait(timeout=5) == -signal.SIGTERM
        refused = portpool("stop", "3", "--config", str(smaller))
        assert refused.returncode == 2, refused.stderr  # no longer runs: out of range
    finally:
        kill_if_running(third)


def test_stop_times_out_without_killing(layout_file: Path, home: Path, tmp_path: Path) -> None:
    release = tmp_path / "release"
    stubborn = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print(os.environ['PORTPOOL_INSTANCE'], flush=True)\n"
        "deadline = time.time() + 60\n"
        "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
    )
    proc = start("run", "--config", str(layout_file), "--", sys.executable, "-c", stubborn,
                 str(release))  # fmt: skip
    try:
        assert read_line(proc).strip() == "1"
        done = portpool("stop", "--config", str(layout_file), "--timeout", "0.5")
        assert done.returncode == 1
        assert "still holds the instance" in done.stderr
        assert proc.poll() is None  # asked, never killed
    finally:
        release.touch()
        proc.wait(timeout=30)


@pytest.mark.parametrize("suspended", ["run", "command"])
def test_stop_of_a_suspended_holder_lets_it_act_on_the_sigterm(
    layout_file: Path, home: Path, tmp_path: Path, suspended: str
) -> None:
    """A `run` stopped by SIGSTOP (a debugger, `kill -STOP`) acts on no signal but
    SIGKILL and SIGCONT: `stop` sent it SIGTERM and waited until its timeout, "still
    holds the instance". As `kill %1` in a shell does, `stop` sends a suspended
    holder SIGCONT after the SIGTERM (it is the verified holder, nothing else).
    Its command suspended instead: `run` passed the SIGTERM on, and the command sat on
    it until `stop` timed out; `run` resumes it, as `stop` would were it exec'd."""
    import psutil

    proc, _ = _hold(layout_file, tmp_path / "never")
    try:
        (command,) = psutil.Process(proc.pid).children()
        target = proc.pid if suspended == "run" else command.pid
        os.kill(target, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(target).status() == psutil.STATUS_STOPPED)
        done = portpool("stop", "1", "--config", str(layout_file), "--timeout", "30")
        assert done.returncode == 0, done.stderr
        assert proc.wait(timeout=30) == -signal.SIGTERM  # run dies of its command's signal
    finally:
        kill_if_running(proc)


def test_stop_does_not_wait_for_a_foreign_listener_the_lease_does_not_cover(
    layout_file: Path, port_base: int, home: Path, tmp_path: Path
) -> None:
    """A foreign server on [::1]:P beside an instance on 127.0.0.1:P is not the
    instance's: `stop` returned only after its timeout, exit 1, though the run was gone."""
    from portpool._addresses import has_ipv6_loopback

    if not has_ipv6_loopback():
        pytest.skip("this host has no ::1")
    with releasing() as occupants:
        occupants.append(occupy("listen", "::1", port_base, "1"))
        proc, number = _hold(layout_file, tmp_path / "never")
        try:
            assert number == 1
            done = portpool("stop", "--config", str(layout_file), "--timeout", "5", "--json")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["stopped"][0]["ports"][0] == port_base
            assert proc.wait(timeout=5) == -signal.SIGTERM
            assert occupants[0].poll() is None  # never touched: it still listens
        finally:
            kill_if_running(proc)


def test_stop_does_not_wait_for_a_foreign_listener_that_appears_while_stopping(
    layout_file: Path, port_base: int, home: Path, tmp_path: Path
) -> None:
    """A foreign server started on [::1]:P after `stop` signalled (while the instance
    was stopping) was taken for one of its services: `stop` timed out, exit 1."""
    from portpool._addresses import has_ipv6_loopback

    if not has_ipv6_loopback():
        pytest.skip("this host has no ::1")
    termed, go = tmp_path / "termed", tmp_path / "go"
    slow = (
        "import os, signal, sys, time\n"
        "def bye(*_):\n"
        "    open(sys.argv[1], 'w').close()\n"
        "    deadline = time.time() + 30\n"
        "    while not os.path.exists(sys.argv[2]) and time.time() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print(os.environ['PORTPOOL_INSTANCE'], flush=True)\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    proc = start("run", "--config", str(layout_file), "--", sys.executable, "-c", slow,
                 str(termed), str(go))  # fmt: skip
    with releasing() as occupants:
        try:
            assert read_line(proc).strip() == "1"
            stopper = start("stop", "--config", str(layout_file), "--timeout", "10")
            wait_for(termed.exists)  # signalled; the instance is stopping
            occupants.append(occupy("listen", "::1", port_base, "1"))
            go.touch()
            assert stopper.wait(timeout=30) == 0, stopper.communicate()
            assert proc.wait(timeout=10) == 0
            assert occupants[0].poll() is None  # never touched: it still listens
        finally:
            go.touch()
            kill_if_running(proc)


def _fake_holder(state: StateDir, app: str, number: int, pid: int, token: str) -> HeldLock:
    """Take slot ``number`` in this process and write a record naming ``pid``."""
    directory = state.instances(app)
    held = HeldLock.acquire(directory, f"{number}.lock")
    me = current_identity()
    record = {"v": 1, "app": app, "number": number, "pid": pid, "start_token": token,
              "boot_id": me.boot_id, "started_at": time.time(), "heartbeat_at": time.time(),
              "services": []}  # fmt: skip
    write_atomic(directory, f"{number}.json", json.dumps(record).encode())
    return held


def test_stop_never_signals_a_process_that_is_not_the_lock_holder(
    layout_file: Path, state: StateDir
) -> None:
    layout = load_layout(str(layout_file))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The record names the bystander, but the slot lock is ours: refuse.
        from portpool._platform import identity_of

        ident = identity_of(bystander.pid)
        assert ident is not None
        held = _fake_holder(state, layout.app, 1, bystander.pid, ident.start_token)
        try:
            done = portpool("stop", "1", "--config", str(layout_file))
            assert done.returncode == 1
            # In status's words: that process runs, but does not hold the slot.
            assert (
                f"(pid {os.getpid()} holds it, the record names pid {bystander.pid}, a running "
                "process that does not hold it)"
            ) in done.stderr
            assert bystander.poll() is None
        finally:
            held.remove_and_release()
        # The record names the lock holder's pid with another start token (a reused
        # pid): refuse. We are that holder, and we are still alive to check.
        held = _fake_holder(state, layout.app, 2, os.getpid(), "12345.000")
        try:
            from portpool import stop_instances

            with pytest.raises(StopFailed) as info:
                stop_instances(layout, 2, state=state, timeout_s=1)
            reused = "with another start time (an earlier process of that pid, or a record"
            assert reused in str(info.value), info.value
        finally:
            held.remove_and_release()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_stop_all_stops_the_others_when_one_record_does_not_match_its_holder(
    layout_file: Path, state: StateDir, tmp_path: Path, as_json: bool
) -> None:
    """`stop --all` with slot 1's record naming another process than its lock holder:
    the refusal came before instance 2 was even asked, so one forged or stale record
    kept every other instance running. As for an unreadable record, the others are
    stopped, and the refused one is reported after, untouched (exit 1); the output
    names the ones stopped (it printed only the error)."""
    layout = load_layout(str(layout_file))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    held = None
    second = None
    try:
        from portpool._platform import identity_of

        ident = identity_of(bystander.pid)
        assert ident is not None
        held = _fake_holder(state, layout.app, 1, bystander.pid, ident.start_token)
        second, number = _hold(layout_file, tmp_path / "never", "--instance", "2")
        assert number == 2
        json_flag = ["--json"] if as_json else []
        done = portpool("stop", "--all", *json_flag, "--config", str(layout_file))
        assert done.returncode == 1, done.stderr
        assert (
            f"(pid {os.getpid()} holds it, the record names pid {bystander.pid}, a running "
            "process that does not hold it)"
        ) in done.stderr
        assert second.wait(timeout=30) == -signal.SIGTERM  # stopped before the report
        if as_json:
            report = json.loads(done.stdout)
            assert report["app"] == layout.app and report["exit_code"] == 1
            assert [(s["number"], s["pid"]) for s in report["stopped"]] == [(2, second.pid)]
            assert "record names" in report["error"]
        else:
            line = f"portpool: instance 2 of {layout.app} stopped (pid {second.pid})"
            assert done.stdout.splitlines() == [line]
        assert bystander.poll() is None
    finally:
        if held is not None:
            held.remove_and_release()
        if second is not None:
            kill_if_running(second)
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_stop_all_reports_the_ones_it_stopped_when_an_earlier_one_outlasts_the_timeout(
    layout_file: Path, tmp_path: Path, as_json: bool
) -> None:
    """Instance 1 ignoring SIGTERM past --timeout: `stop --all` gave only its error, while
    it had stopped instance 2 (said only when the slow one came last)."""
    release = tmp_path / "release"
    stubborn = start(
        "run", "--config", str(layout_file), "--", sys.executable, "-c",
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + HOLD, str(release),
    )  # fmt: skip
    second = None
    try:
        assert read_line(stubborn) == "1\n"
        second, number = _hold(layout_file, tmp_path / "never")
        assert number == 2
        json_flag = ["--json"] if as_json else []
        done = portpool("stop", "--all", "--timeout", "1", *json_flag, "--config", str(layout_file))
        assert done.returncode == 1, done.stderr
        assert "instance 1: pid" in done.stderr and "after 1 s" in done.stderr, done.stderr
        assert second.wait(timeout=30) == -signal.SIGTERM
        if as_json:
            report = json.loads(done.stdout)
            assert [(s["number"], s["pid"]) for s in report["stopped"]] == [(2, second.pid)]
            assert report["exit_code"] == 1 and "after 1 s" in report["error"]
        else:
            line = f"portpool: instance 2 of testapp stopped (pid {second.pid})"
            assert done.stdout.splitlines() == [line]
    finally:
        release.touch()
        assert stubborn.wait(timeout=30) is not None
        if second is not None:
            kill_if_running(second)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_stop_names_what_holds_the_ports_when_the_signalled_holder_is_gone(
    layout_file: Path, tmp_path: Path, reaped: bool
) -> None:
    # The run got SIGTERM, then a kill -9 while its command (which ignores SIGTERM)
    # held the ports: stop said "pid <run> ... still holds ... (try again)", of a pid
    # long gone, while the orphan it did not name held the ports.
    layout = load_layout(str(layout_file))
    release, got = tmp_path / "release", tmp_path / "got"
    note = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *_: open(sys.argv[2], 'w'))\n"
    argv = ["run", "--fds", "--config", str(layout_file), "--"]
    run = start(*argv, sys.executable, "-c", note + HOLD, str(release), str(got))
    orphan: int | None = None
    try:
        assert int(read_line(run)) == 1
        (command,) = psutil.Process(run.pid).children()
        orphan = command.pid
        stop = start("stop", "--timeout", "3", "--config", str(layout_file))
        wait_for(got.exists, 30)  # stop's SIGTERM, passed on by run: now it dies
        run.kill()
        if reaped:
            run.wait(timeout=30)  # as its shell would; a parent that does not leaves a zombie
        _, said = stop.communicate(timeout=60)
        assert stop.returncode == 1, said
        port = layout.pool("alpha", 1)[0]
        assert f"pid {run.pid} got SIGTERM and is gone, but what it started still holds" in said
        assert f"port {port} by pid {orphan}" in said, said
        assert "try again" not in said
    finally:
        release.touch()
        kill_if_running(run)
        if orphan is not None:
            wait_for(lambda: not pid_alive(orphan), 30)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_stop_all_names_every_instance_that_outlasts_the_timeout(
    layout_file: Path, tmp_path: Path, as_json: bool
) -> None:
    """Two instances ignoring SIGTERM past --timeout: `stop --all` named only the first,
    so the user learned of instance 2 only by running stop again."""
    release = tmp_path / "release"
    ignore = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + HOLD
    stubborn = [
        start("run", "--config", str(layout_file), "--", sys.executable, "-c", ignore, str(release))
        for _ in range(2)
    ]
    try:
        assert sorted(int(read_line(p)) for p in stubborn) == [1, 2]
        json_flag = ["--json"] if as_json else []
        done = portpool("stop", "--all", "--timeout", "1", *json_flag, "--config", str(layout_file))
        assert done.returncode == 1, done.stderr
        said = done.stderr.splitlines()
        assert said[0].startswith("portpool: error: instance 1: pid "), done.stderr
        assert said[1].startswith("instance 2: pid "), done.stderr
        assert all("still holds the instance or its ports after 1 s" in s for s in said), said
        if as_json:
            report = json.loads(done.stdout)
            assert report["stopped"] == [] and report["exit_code"] == 1
            lines = [s.removeprefix("portpool: error: ") for s in said]
            assert report["error"].split("\n") == lines
    finally:
        release.touch()
        for proc in stubborn:
            assert proc.wait(timeout=30) is not None


# ---------------------------------------------------------------- up --detach and logs


def _service_layout(tmp_path: Path, base: int, command: list[str]) -> Path:
    return write_layout(
        tmp_path / "portpool.toml",
        base,
        # No readiness probe: its connection would be one more line in the logs read here.
        services={n: {"command": command, "ready": "none"} for n in ("web", "worker")},
    )


SERVE = (
    "import os, socket, sys, time\n"
    "s = socket.socket(fileno=3)\n"
    "print('hello from', os.environ['PORTPOOL_SERVICE'], os.environ['PORT'], flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    print('got a connection', flush=True)\n"
    "    c.close()\n"
)


def test_up_detach_logs_and_stop(tmp_path: Path, port_base: int, home: Path) -> None:
    layout = _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "instance 1 of testapp is up" in done.stdout
    assert f"web              {port_base}" in done.stdout
    up_pid = int(done.stdout.split("(pid ")[1].split(")")[0])
    follower = None
    try:
        assert pid_alive(up_pid)
        log = wait_for(lambda: "hello from worker" in portpool("logs", cwd=tmp_path).stdout
                       and portpool("logs", cwd=tmp_path).stdout)  # fmt: skip
        assert f"web    | hello from web {port_base}" in log
        assert "instance 1 of testapp is up" in log
        web_only = portpool("logs", "web", "-i", "1", cwd=tmp_path).stdout.splitlines()
        assert web_only == [f"web    | hello from web {port_base}"]
        assert portpool("logs", "nope", cwd=tmp_path).returncode == 2
        follower = start("logs", "-f", "web", cwd=tmp_path)
        assert read_line(follower).startswith("web    | hello from web")
        socket.create_connection(("127.0.0.1", port_base)).close()  # it serves, detached
        assert read_line(follower) == "web    | got a connection\n"
        stopped = portpool("stop", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        # -f ends with the instance.
        assert follower.wait(timeout=10) == 0
        assert not is_listening(port_base)  # stop returned once its ports were free
        wait_for(lambda: not pid_alive(up_pid), timeout=10)
        # The log stays for reading after the instance stopped.
        assert "stopped; its ports are free" in portpool("logs", "-i", "1", cwd=tmp_path).stdout
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        if pid_alive(up_pid):
            portpool("stop", "--all", cwd=tmp_path)
    assert layout.exists()


def test_logs_print_a_services_lines_as_it_wrote_them_piped_or_not(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """As up's console shows them: piped, click dropped the colour codes of a line but
    kept its other escapes (a terminal title, a bell), neither raw nor escaped."""
    line = "\x1b[31mred\x1b[0m \x1b]0;title\x07 done"
    code = f"import sys, time\nprint({line!r}, flush=True)\ntime.sleep(60)\n"
    _service_layout(tmp_path, port_base, [sys.executable, "-c", code])
    done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        log = wait_for(lambda: "done" in (out := portpool("logs", "web", cwd=tmp_path).stdout)
                       and out)  # fmt: skip
        assert log == f"web    | {line}\n", log
        path = home / "apps" / "testapp" / "logs" / "1.log"
        assert f"web    | {line}\n" in path.read_text()
    finally:
        assert portpool("stop", cwd=tmp_path).returncode == 0


def test_up_detach_with_a_config_prints_commands_that_reach_its_instance(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`up -d --config project/p.toml` printed "stop: portpool stop 1", which, run where
    it was printed, read the built-in layout: "instance 1 of qwen-valencia is not
    running". The printed commands name the layout as the command line did."""
    project = tmp_path / "my project"
    project.mkdir()
    config = _service_layout(project, port_base, [sys.executable, "-c", SERVE])
    given = os.path.relpath(config, tmp_path)
    done = portpool("up", "--detach", "--config", given, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": port" in line)

        def as_printed(line: str) -> subprocess.CompletedProcess[str]:
            command = line.partition("   (")[0].replace("portpool", shlex.join(PORTPOOL), 1)
            return subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        logs = as_printed(lines["logs"])
        assert logs.returncode == 0, logs.stderr
        stop = as_printed(lines["stop"])
        assert stop.returncode == 0, stop.stderr
        assert lines["stop"] == "portpool stop 1 --config 'my project/portpool.toml'"
    finally:
        portpool("stop", "--all", "--config", str(config))


def test_a_signal_while_up_detach_waits_stops_the_background_up(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A Ctrl-C (or kill) of `up --detach` before "is up" ended the waiting process
    alone: the background up went on starting, and nothing told the user."""
    import psutil

    slow = "import time; print('started', flush=True); time.sleep(60)"
    write_layout(tmp_path / "portpool.toml", port_base, services={
        "web": {"command": [sys.executable, "-c", slow], "ready": "log:never printed"},
    })  # fmt: skip
    detach = start("up", "--detach", cwd=tmp_path)
    background = wait_for(psutil.Process(detach.pid).children, timeout=30)[0]
    try:
        log = home / "apps" / "testapp" / "logs" / f".starting-{detach.pid}.log"
        wait_for(lambda: log.exists() and "web | started" in log.read_text(), timeout=30)
        detach.send_signal(signal.SIGINT)
        assert detach.wait(timeout=30) == -signal.SIGINT  # dies of it, as a shell job
        assert not background.is_running() or background.status() == psutil.STATUS_ZOMBIE
        assert status_json(tmp_path / "portpool.toml")["instances"] == []
        assert not is_listening(port_base)
    finally:
        kill_if_running(detach)
        if background.is_running():  # the fault: it went on starting
            background.terminate()
            background.wait(timeout=30)


@pytest.mark.parametrize("where", ["reading its record", "placing its log", "announcing it"])
def test_a_signal_before_up_detach_said_is_up_stops_it_and_after_keeps_it(
    tmp_path: Path,
    port_base: int,
    home: Path,
    state: StateDir,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """A SIGTERM to `up --detach` once its log said "is up", as it read the record or
    moved the log: it exited 143 having printed nothing, and the instance ran on (1 run
    in 68); in the log's move it was taken for why the log stayed, and the command
    exited 0 with a warning. The signal is raised at each of those steps: before "is
    up" is said it stops the background up; while it is said (``announce``) it is held
    until the line is out, and then leaves the instance running."""
    from portpool import _detach
    from portpool._relay import SignalScope

    layout = load_layout(_service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE]))
    monkeypatch.chdir(tmp_path)
    said: list[int] = []

    def signalled(real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            signal.raise_signal(signal.SIGTERM)  # the scope's handler raises Interrupted
            return real(*args)

        return step

    announce = None
    if where == "reading its record":
        monkeypatch.setattr(_detach, "read_instance", signalled(_detach.read_instance))
    elif where == "placing its log":
        monkeypatch.setattr(_detach, "set_log_owner", signalled(_detach.set_log_owner))
    else:
        announce = signalled(lambda started: said.append(started.number))
    with pytest.raises(portpool_lib.Interrupted), SignalScope():
        portpool_lib.start_detached(layout, state=state, quiet=True, announce=announce)
    alive = [i.number for i in list_instances("testapp", state) if i.alive]
    try:
        assert alive == said  # [1] once said, else none
        logs = home / "apps" / "testapp" / "logs"
        assert not [p.name for p in logs.iterdir() if p.name.endswith(".tmp")]  # none half-written
    finally:
        if alive:
            portpool_lib.stop_instances(layout, every=True, state=state)


def _up_detach_signalled(
    tmp_path: Path, home: Path, when: str, delay_s: float, signum: int
) -> tuple[str, int]:
    """`up --detach` sent ``signum`` ``delay_s`` after ``when``: its starting log appears
    (it is starting the background up), or its "is up" line is read. Its output and exit
    status."""
    detach = start("up", "--detach", cwd=tmp_path)
    logs = home / "apps" / "testapp" / "logs"
    try:
        if when == "log":
            wait_for((logs / f".starting-{detach.pid}.log").exists, 30, interval=0.0005)
            out = ""
        else:
            out = read_line(detach)
            assert " is up " in out, out
        time.sleep(delay_s)
        detach.send_signal(signum)
        rest, _err = detach.communicate(timeout=60)
    finally:
        kill_if_running(detach)
    return out + rest, detach.returncode


@pytest.mark.parametrize(
    ("when", "signum"),
    [("log", signal.SIGTERM), ("is up", signal.SIGTERM), ("log", signal.SIGALRM)],
)
def test_up_detach_leaves_an_instance_running_only_when_it_said_is_up(
    tmp_path: Path, port_base: int, home: Path, when: str, signum: int
) -> None:
    """Signals at the moments that broke it: a few ms after the background up was
    started (the signal raised inside Popen, after the fork: 1 run in 3 left it running
    and said nothing), and right as "is up" was read (1 run in 2 stopped the instance it
    had just said was up). SIGALRM interrupts too, and was not held at first."""
    config = _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    for run in range(12):
        out, code = _up_detach_signalled(tmp_path, home, when, (run % 4) * 0.002, signum)
        running = [i for i in status_json(config)["instances"] if i["alive"]]
        said = " is up (pid " in out
        assert code in (0, -signum), (run, code, out)
        assert bool(running) == said, (run, out, running)
        if running:
            assert portpool("stop", "--all", cwd=tmp_path).returncode == 0


def test_up_detach_whose_reader_left_after_is_up_keeps_the_instance(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`portpool up --detach | head -1` printed "is up", then the next line met a closed
    pipe, and that stopped the instance it had said was up (7 runs in 60)."""
    config = _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    script = f"{shlex.join(PORTPOOL)} up --detach | head -1; echo status ${{PIPESTATUS[0]}}"
    for run in range(15):
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        running = [i for i in status_json(config)["instances"] if i["alive"]]
        assert " is up (pid " in done.stdout, (run, done.stdout, done.stderr)
        assert running, (run, done.stdout, done.stderr)  # said up: it is
        assert done.stdout.rstrip().endswith(("status 0", "status 141")), done.stdout
        assert portpool("stop", "--all", cwd=tmp_path).returncode == 0


def test_a_stop_signal_taken_during_an_import_still_stops_up_detach(
    tmp_path: Path, port_base: int, home: Path, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGINT that came while a module was imported (the scope records it, raising
    there would leave the module half made) was never raised: `up --detach` printed "is
    up" and exited 0, and every later Ctrl-C was ignored. The scope here has one
    recorded, as its handler leaves it."""
    from portpool._relay import SignalScope

    layout = load_layout(_service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE]))
    monkeypatch.chdir(tmp_path)
    said: list[int] = []
    with SignalScope() as scope:
        scope._interrupted = signal.SIGINT  # what _interrupt records then
        with pytest.raises(portpool_lib.Interrupted):
            portpool_lib.start_detached(layout, state=state, announce=lambda d: said.append(1))
    assert said == [] and not any(i.alive for i in list_instances("testapp", state))


def test_start_detached_starts_the_layout_it_is_given(
    tmp_path: Path, port_base: int, home: Path, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start_detached ran `up` with whatever ./portpool.toml named, then waited for the
    # given layout's app: it failed after 10 s and left the other app running.
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])  # testapp, in cwd
    (tmp_path / "other").mkdir()
    serve = {"command": [sys.executable, "-c", SERVE], "ready": "none"}
    other = write_layout(tmp_path / "other" / "o.toml", port_base + 10, app="otherapp",
                         services={"solo": serve})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    layout = load_layout(str(other))
    started = portpool_lib.start_detached(layout, state=state, quiet=True)
    try:
        assert started.ports == {"solo": port_base + 10}
        assert not any(i.alive for i in list_instances("testapp", state))
        assert not any(n.startswith("portpool: instance") for n in started.notes)  # quiet
        # The library checks an instance number as the CLI does (exit 2, not "not running").
        with pytest.raises(portpool_lib.UsageError) as bad:
            portpool_lib.service_port(layout, "solo", 99, state=state)
        assert bad.value.exit_code == 2
    finally:
        portpool_lib.stop_instances(layout, started.number, state=state)
    # A layout its file does not hold cannot be read again by the background up.
    for changed in (layout.with_changes(max_instances=1), default_layout().with_changes(app="x")):
        with pytest.raises(portpool_lib.UsageError, match="detached up reads its layout"):
            portpool_lib.start_detached(changed, state=state)


@pytest.mark.parametrize("damage", ["lock removed", "record unreadable"])
def test_a_command_under_a_run_that_lost_its_slot_is_refused_not_sent_elsewhere(
    tmp_path: Path, port_base: int, home: Path, damage: str
) -> None:
    # Its run's slot lock file removed (or its record broken): `port` gave, and `stop`
    # stopped, this checkout's other instance. (No shield check meanwhile: it would
    # stop the run for the removed lock file, as it should.)
    layout_file = write_layout(tmp_path / "portpool.toml", port_base, heartbeat=600, shield=600)
    release = tmp_path / "release"
    first, number = _hold(layout_file, release)
    try:
        assert number == 1
        slot = home / "apps" / "testapp" / "instances" / "$PORTPOOL_INSTANCE"
        harm = f"rm {slot}.lock" if damage == "lock removed" else f"echo '{{' > {slot}.json"
        cli, config = shlex.join(PORTPOOL), shlex.join(["--config", str(layout_file)])
        script = f"{harm}; {cli} port alpha {config}; {cli} stop --timeout 2 {config}; echo $?"
        done = portpool("run", "-q", "--config", str(layout_file), "--", "sh", "-c", script)
        assert done.stdout == "1\n", done.stderr  # port refused (1), then stop too
        assert done.stderr.count("instance 2 of testapp, whose run or up started") == 2
        assert first.poll() is None  # instance 1 was never signalled
    finally:
        release.touch()
        first.wait(timeout=30)


def test_logs_under_a_run_is_of_that_runs_instance_not_of_a_stopped_one(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A script under checkout b's run asked for checkout a's logs (`--config a/...`):
    # it was shown a's stopped instance's log, while `port` gave its own instance's.
    a, b = tmp_path / "a", tmp_path / "b"
    for checkout in (a, b):
        checkout.mkdir()
        _service_layout(checkout, port_base, [sys.executable, "-c", SERVE])
    assert portpool("up", "--detach", "-q", cwd=a).returncode == 0
    assert portpool("stop", cwd=a).returncode == 0
    assert "hello from" in portpool("logs", cwd=a).stdout  # a's, stopped
    logs = shlex.join([*PORTPOOL, "logs", "--config", str(a / "portpool.toml")])
    done = portpool("run", "-q", "--instance", "2", "--", "sh", "-c", logs, cwd=b)
    assert done.returncode == 1, done.stdout
    assert "has no log (it was not started with --detach)" in done.stderr


def test_start_detached_keeps_and_reaps_the_background_up_it_started(
    tmp_path: Path, port_base: int, home: Path, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It dropped the Popen of the background up while that ran: "subprocess N is still
    # running" (ResourceWarning) in the caller, an error under -W error::ResourceWarning.
    layout = load_layout(str(_service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])))
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = portpool_lib.start_detached(layout, state=state, quiet=True)
        try:
            gc.collect()
        finally:
            portpool_lib.stop_instances(layout, started.number, state=state)
        # Reaped once it ended, not left a zombie of this process.
        wait_for(lambda: not os.path.exists(f"/proc/{started.pid}"), timeout=30)
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_start_detached_finds_a_program_on_a_relative_path_entry_from_its_cwd(
    tmp_path: Path, port_base: int, home: Path, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The background up and its services run in ``cwd``, where PATH's "bin" names
    # checkout/bin; the check before it started looked in the caller's directory and
    # refused, as a layout error, a command that would have run.
    checkout = tmp_path / "checkout"
    (checkout / "bin").mkdir(parents=True)
    tool = checkout / "bin" / "tool-in-checkout"
    tool.write_text("#!/bin/sh\nexec sleep 60\n")
    tool.chmod(0o755)
    layout = load_layout(
        str(
            write_layout(
                checkout / "portpool.toml",
                port_base,
                services={"solo": {"command": ["tool-in-checkout"], "ready": "none"}},
            )
        )
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("PATH", f"bin{os.pathsep}{os.environ['PATH']}")
    started = portpool_lib.start_detached(layout, state=state, quiet=True, cwd=str(checkout))
    try:
        assert list(started.ports) == ["solo"]
    finally:
        portpool_lib.stop_instances(layout, started.number, state=state)


def test_up_detach_quiet_prints_no_instance_line(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    done = portpool("up", "--detach", "-q", cwd=tmp_path, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        assert "instance 1 of testapp is up" in done.stdout
        assert "portpool: instance 1 of testapp:" not in done.stderr  # `up -q` says no ports
    finally:
        portpool("stop", "--all", cwd=tmp_path)


def test_up_detach_exits_with_the_background_ups_status(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    layout = write_layout(
        tmp_path / "portpool.toml",
        port_base,
        max_instances=1,
        services={"web": {"command": [sys.executable, "-c", SERVE]}},
    )
    release = tmp_path / "release"
    holder, _ = _hold(layout, release)
    try:
        done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
        assert done.returncode == 3, done.stderr
        assert "exited with status 3 before it was up" in done.stderr
        assert "no free instance slot" in done.stderr  # the log's tail
    finally:
        release.touch()
        holder.wait(timeout=30)


def test_logs_of_an_attached_instance_say_why_there_are_none(
    layout_file: Path, home: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    proc, _ = _hold(layout_file, release)
    try:
        done = portpool("logs", "--config", str(layout_file))
        assert done.returncode == 1
        assert "instance 1 of testapp has no log (it was not started with --detach)" in done.stderr
    finally:
        release.touch()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- what a new user met


def test_logs_belong_to_the_up_that_wrote_them(tmp_path: Path, port_base: int, home: Path) -> None:
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert portpool("stop", "1", cwd=tmp_path).returncode == 0
    # The same checkout starts attached on the same number: the detached one's log is
    # not this instance's, and -f must not wait on it.
    release = tmp_path / "release"
    proc, number = _hold(tmp_path / "portpool.toml", release, cwd=tmp_path)
    try:
        assert number == 1
        for args in (["logs"], ["logs", "-i", "1"], ["logs", "-f"], ["logs", "web", "-f"]):
            done = portpool(*args, cwd=tmp_path, timeout=20)
            assert done.returncode == 1, (args, done.stdout)
            assert done.stdout == ""
            msg = "instance 1 of testapp has no log (it was not started with --detach)"
            assert msg in done.stderr, args
    finally:
        release.touch()
        proc.wait(timeout=30)
    # Stopped again: the last detached instance's log is there to read.
    assert "hello from web" in portpool("logs", "-i", "1", cwd=tmp_path).stdout


def test_a_log_of_long_lines_reads_whole(tmp_path: Path, port_base: int, home: Path) -> None:
    """Lines longer than one read (64 KiB) come out whole, each once, filtered by their
    service's prefix, the last one without its newline too (a long line was read in
    quadratic time: 16 MB took 2.1 s, 32 MB 7.3 s)."""
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert portpool("stop", "1", cwd=tmp_path).returncode == 0
    long_web, long_worker = "web | " + "w" * (3 << 20), "worker | " + "k" * 200_000
    lines = [long_web, "web | short", long_worker, "web | é" * 40_000, "web | last"]
    log = home / "apps" / "testapp" / "logs" / "1.log"
    log.write_bytes("\n".join(lines).encode())  # the last line has no newline
    everything = portpool("logs", "-i", "1", cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.splitlines() == lines
    web = portpool("logs", "web", "-i", "1", cwd=tmp_path)
    assert web.stdout.splitlines() == [line for line in lines if line.startswith("web |")]


def test_a_log_that_is_a_symlink_or_a_directory_is_named_never_followed(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`logs` ended in an OSError traceback ("Too many levels of symbolic links", "Is a
    directory") where a symlink or a directory stood at the log's path."""
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    log = home / "apps" / "testapp" / "logs" / "1.log"
    log.unlink()  # running, its log removed: not "it was not started with --detach"
    removed = portpool("logs", cwd=tmp_path)
    assert (removed.returncode, removed.stderr) == (
        1,
        f"portpool: error: the log of instance 1 ({log}) was removed\n",
    )
    assert portpool("stop", "1", cwd=tmp_path).returncode == 0
    secret = tmp_path / "secret"
    secret.write_text("not a log\n")

    def symlink() -> None:
        log.symlink_to(secret)

    for kind, make in (("a symbolic link", symlink), ("a directory", log.mkdir)):
        make()
        for args in (["logs"], ["logs", "-f"], ["logs", "web", "-i", "1"]):
            seen = portpool(*args, cwd=tmp_path, timeout=20)
            assert (seen.returncode, seen.stdout) == (1, ""), (args, seen.stderr)
            assert seen.stderr == (
                f"portpool: error: state dir {log}: is {kind}, not a log portpool wrote; "
                "remove it\n"
            ), args
        if log.is_symlink():
            log.unlink()
    assert secret.read_text() == "not a log\n"


def _detaching(cwd: Path) -> tuple[subprocess.Popen[str], int]:
    """`up --detach` started and stopped (SIGSTOP) as soon as its background up exists:
    the test decides what happens to that up before the detach looks again."""
    import psutil

    detach = start("up", "--detach", cwd=cwd)
    parent = psutil.Process(detach.pid)
    child = wait_for(parent.children, timeout=30)[0]
    detach.send_signal(signal.SIGSTOP)
    return detach, child.pid


def _finish(detach: subprocess.Popen[str]) -> tuple[int, str, str]:
    detach.send_signal(signal.SIGCONT)
    out, err = detach.communicate(timeout=60)
    return detach.returncode, out, err


def test_up_detach_reports_a_background_up_killed_by_a_signal(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    detach, up_pid = _detaching(tmp_path)
    try:
        os.kill(up_pid, signal.SIGKILL)
    finally:
        code, out, err = _finish(detach)
    assert code == 128 + signal.SIGKILL, err
    assert "killed by SIGKILL" in err
    assert "status -9" not in err
    assert "web" not in out  # no ports of an instance that is gone


def test_up_detach_stopped_by_portpool_stop_before_it_is_up_exits_1(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # The background up stopped by SIGTERM exits 0; the detach must still fail (as the
    # README says: 1, not the 0 of a success), naming what happened.
    write_layout(
        tmp_path / "portpool.toml",
        port_base,
        services={"web": {"command": [sys.executable, "-c", "import time; time.sleep(60)"],
                          "ready": "tcp", "ready_timeout_s": 60}},
    )  # fmt: skip
    detach = start("up", "--detach", cwd=tmp_path)
    try:
        wait_for(lambda: any(i["alive"] for i in status_json(tmp_path / "portpool.toml")
                             ["instances"]), timeout=30)  # fmt: skip
        done = portpool("stop", "--timeout", "30", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        _, err = detach.communicate(timeout=60)
    finally:
        kill_if_running(detach)
    assert detach.returncode == 1, err
    assert "the detached up exited with status 0 before it was up" in err, err


def test_up_detach_does_not_list_ports_of_an_up_that_stopped_at_once(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    detach, up_pid = _detaching(tmp_path)
    try:
        # It says "is up" while the detach is not looking, then stops before it looks.
        log = home / "apps" / "testapp" / "logs" / f".starting-{detach.pid}.log"
        wait_for(lambda: log.exists() and "is up" in log.read_text(), timeout=30)
        os.kill(up_pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(up_pid) or _zombie(up_pid), timeout=30)
    finally:
        code, out, err = _finish(detach)
    assert code != 0
    assert "right after it was up" in err
    assert "web" not in out and "worker" not in out


def _zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_up_detach_relays_the_skip_warning(tmp_path: Path, port_base: int, home: Path) -> None:
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SERVE])
    # A foreign program holds every port of worker's pool in slot 1.
    foreign = [socket.create_server(("127.0.0.1", p)) for p in (port_base + 2, port_base + 3)]
    try:
        done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "instance 2 of testapp is up" in done.stdout
        assert "instance 1 of testapp skipped" in done.stderr
        assert "is up" not in done.stderr  # only what came before it
    finally:
        for s in foreign:
            s.close()
        portpool("stop", "--all", cwd=tmp_path)


def test_stop_says_what_is_wrong_with_the_record(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Slow heartbeat and shield: the edited record stays, and the run outlives it.
    layout_file = write_layout(tmp_path / "portpool.toml", port_base, heartbeat=60, shield=60)
    release = tmp_path / "release"
    proc, number = _hold(layout_file, release)
    record = home / "apps" / "testapp" / "instances" / f"{number}.json"
    original = json.loads(record.read_text())
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        # The record names another pid; the run is alive and holds the slot lock.
        record.write_text(json.dumps({**original, "pid": dead.pid}))
        done = portpool("stop", str(number), "--config", str(layout_file))
        assert done.returncode == 1
        assert (
            f"record does not match the process holding the slot (pid {proc.pid} holds "
            f"it, the record names pid {dead.pid}, which is not running) ({record}): "
            "not signalling anything"
        ) in done.stderr
        # A pid that is not a whole number: unreadable, not "starting".
        record.write_text(json.dumps({**original, "pid": "12x"}))
        held = f"; pid {proc.pid} holds its slot" if sys.platform == "linux" else ""
        for args in ([str(number)], ["--all"]):
            done = portpool("stop", *args, "--config", str(layout_file))
            assert done.returncode == 1, args
            assert "its record is unreadable: record has no valid pid" in done.stderr, args
            assert f"not signalling anything{held}\n" in done.stderr, args
            assert "starting" not in done.stderr
        # Without --instance, too: "no instance of testapp is running" sent users to start
        # another while this one held its slot.
        record.write_text('{"v": 1,')
        for args in (["stop"], ["port", "alpha"], ["env"], ["logs"]):
            done = portpool(*args, "--config", str(layout_file))
            assert (done.returncode, done.stdout) == (1, ""), args
            assert done.stderr == (
                "portpool: error: no instance of testapp can be used: instance 1 runs but "
                f"its record is unreadable: record is not valid JSON ({record})\n"
            ), args
        # With a number, too: the error names the file, not only "record unreadable", and
        # the process that holds the slot (the user had no way to find it).
        done = portpool("stop", str(number), "--config", str(layout_file))
        assert done.stderr == (
            f"portpool: error: instance {number}: its record is unreadable: record is not "
            f"valid JSON ({record}): not signalling anything{held}\n"
        )
        assert proc.poll() is None  # nothing was signalled
    finally:
        release.touch()
        proc.wait(timeout=30)


def test_a_record_deleted_under_a_running_instance_names_its_holder(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """With its record deleted, an instance read "starting (no record yet)" for good,
    naming no process; `stop --all` left it out and said no instance was running."""
    layout_file = write_layout(tmp_path / "portpool.toml", port_base, heartbeat=60, shield=60)
    release = tmp_path / "release"
    proc, number = _hold(layout_file, release)
    (home / "apps" / "testapp" / "instances" / f"{number}.json").unlink()
    starting = (
        f"starting, or its record was deleted (no record; pid {proc.pid} holds its slot)"
        if sys.platform == "linux"
        else "starting (no record yet)"
    )
    try:
        done = portpool("status", "--json", "--config", str(layout_file))
        [listed] = json.loads(done.stdout)["instances"]
        assert (listed["alive"], listed["problem"]) == (True, starting)
        for args, error in (
            (["stop", str(number)], f"instance {number} of testapp is {starting}"),
            (["stop", "--all"], f"instance {number}: it is {starting}: not signalling anything"),
            (["stop"], f"no instance of testapp can be used: instance {number} is {starting}"),
            (["port", "alpha"], f"no instance of testapp can be used: instance 1 is {starting}"),
        ):
            done = portpool(*args, "--config", str(layout_file))
            assert (done.returncode, done.stdout) == (1, ""), args
            assert done.stderr == f"portpool: error: {error}\n", args
        assert proc.poll() is None  # nothing was signalled
    finally:
        release.touch()
        proc.wait(timeout=30)


def test_an_unreadable_record_is_never_passed_over_for_another_checkouts_instance(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """This checkout's record unreadable, another checkout's instance running: "the
    only running one" rule picked the other, and `stop` stopped it."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    procs = []
    release = tmp_path / "release"
    try:
        for where in (mine, other):
            where.mkdir()
            config = write_layout(where / "portpool.toml", port_base, heartbeat=60, shield=60)
            procs.append(_hold(config, release, cwd=where))
        assert [number for _, number in procs] == [1, 2]
        record = home / "apps" / "testapp" / "instances" / "1.json"
        for text, why in (('{"v": 1,', "is not valid JSON"), ("null", "is null, not a record")):
            record.write_text(text)  # `null` once read as no record yet: "starting"
            for args in (["stop"], ["port", "alpha"], ["env"]):
                done = portpool(*args, cwd=mine)
                assert (done.returncode, done.stdout) == (1, ""), (args, done.stdout)
                assert "2 instances of testapp are running" in done.stderr, args
                assert (
                    f"instance 1 runs but its record is unreadable: record {why}" in done.stderr
                ), args
        assert all(proc.poll() is None for proc, _ in procs)  # nothing was stopped
    finally:
        release.touch()
        for proc, _ in procs:
            proc.wait(timeout=30)


def test_read_only_commands_create_no_state_dir(layout_file: Path, home: Path) -> None:
    assert not home.exists()
    for args in (["port", "alpha"], ["env"], ["logs"], ["logs", "-i", "1"], ["stop"],
                 ["stop", "1"], ["stop", "--all"], ["port", "alpha", "-i", "2"]):  # fmt: skip
        done = portpool(*args, "--config", str(layout_file))
        assert done.returncode == 1, (args, done.stderr)
        assert "is running" in done.stderr or "not running" in done.stderr, args
        assert not home.exists(), args


def test_json_commands_print_errors_as_json(layout_file: Path, home: Path) -> None:
    for args, code in ((["port", "alpha"], 1), (["stop", "3"], 1), (["port", "nope"], 2),
                       (["stop", "--all"], 1), (["layout"], 2)):  # fmt: skip
        config = str(layout_file) if args != ["layout"] else str(home / "missing.toml")
        done = portpool(*args, "--json", "--config", config)
        assert done.returncode == code, (args, done.stderr)
        doc = json.loads(done.stdout)
        assert doc["exit_code"] == code
        assert doc["error"] in done.stderr  # the same message, once on each stream
        assert len(done.stderr.splitlines()) == 1
    # A usage error the command finds itself (click's own message on stderr).
    done = portpool("stop", "1", "--all", "--json", "--config", str(layout_file))
    assert done.returncode == 2
    assert json.loads(done.stdout) == {
        "error": "give an instance NUMBER or --all, not both",
        "exit_code": 2,
    }
    # Numbers out of range, 0 as 99: click's range types printed usage text and no JSON.
    for args, error in (
        (["port", "alpha", "-i", "0"], "--instance must be 1..10 for app 'testapp', not 0"),
        (["port", "alpha", "-i", "99"], "--instance must be 1..10 for app 'testapp', not 99"),
        (["port", "alpha", "-i", "-1"], "--instance must be 1..10 for app 'testapp', not -1"),
        (["stop", "0"], "NUMBER must be 1..10 for app 'testapp', not 0"),
        (["stop", "--timeout", "-1"], "--timeout must be 0 or more seconds, not -1.0"),
        (["stop", "--timeout", "nan"], "--timeout must be 0 or more seconds, not nan"),
    ):
        done = portpool(*args, "--json", "--config", str(layout_file))
        assert done.returncode == 2, (args, done.stderr)
        assert json.loads(done.stdout) == {"error": error, "exit_code": 2}, args
        assert error in done.stderr, args
    done = portpool("up", "--grace", "-1", "--config", str(layout_file))
    assert done.returncode == 2
    assert "--grace must be 0 or more seconds, not -1.0" in done.stderr
    for args in (["up"], ["up", "--detach"], ["run", "--", "true"]):  # one wording for all
        done = portpool(args[0], "-i", "0", "--config", str(layout_file), *args[1:])
        assert done.returncode == 2, args
        assert done.stderr == (
            "portpool: error: --instance must be 1..10 for app 'testapp', not 0\n"
        ), args


def test_a_command_line_click_cannot_parse_is_json_too(layout_file: Path, home: Path) -> None:
    # An unknown option, a missing argument, a flag given a value: click's own usage
    # text on stderr as before, and for --json the same message as JSON on stdout.
    for args, error in (
        (["status", "--bogus"], "No such option '--bogus'."),
        (["stop", "-1"], "No such option '-1'."),
        (["port"], "Missing argument 'SERVICE'."),
        (["doctor", "--all=3"], "Option '--all' does not take a value."),
        (["layout", "--config"], "Option '--config' requires an argument."),
    ):
        done = portpool(*args[:1], "--json", *args[1:])
        assert done.returncode == 2, (args, done.stderr)
        assert json.loads(done.stdout) == {"error": error, "exit_code": 2}, args
        assert f"Error: {error}" in done.stderr, args
        plain = portpool(*args)  # without --json, stdout stays empty
        assert (plain.returncode, plain.stdout) == (2, ""), args
    # --json given a value is --json too: its error printed no JSON.
    for args in (["status", "--json=yes"], ["gc", "--json=1"], ["port", "alpha", "--json="]):
        done = portpool(*args)
        assert done.returncode == 2, (args, done.stderr)
        error = "Option '--json' does not take a value."
        assert json.loads(done.stdout) == {"error": error, "exit_code": 2}, args
    assert not home.exists()


def test_slot_blocked_by_another_apps_leases_is_skipped(
    layout_file: Path, home: Path, tmp_path: Path
) -> None:
    # Another app sharing the state dir holds one of beta's slot-1 ports, a foreign
    # program the other: the start ended with exit 3 while slot 2 was free.
    layout = load_layout(str(layout_file))
    first, second = layout.pool("beta", 1)
    other = write_layout(tmp_path / "o.toml", first, app="otherapp", services={"web": {"size": 1}})
    release = tmp_path / "release"
    holder, _ = _hold(other, release)
    foreign = socket.create_server(("127.0.0.1", second))
    try:
        done = portpool("run", "--config", str(layout_file), "--", sys.executable, "-c",
                        "import os; print(os.environ['PORTPOOL_INSTANCE'], "
                        "os.environ['PORTPOOL_PORT_BETA'])")  # fmt: skip
        assert done.returncode == 0, done.stderr
        number, port = done.stdout.split()
        assert number == "2" and int(port) in layout.pool("beta", 2)
        assert "instance 1 of testapp skipped: service 'beta': every port" in done.stderr
        assert f"port {first}: held by instance 1 of otherapp" in done.stderr, done.stderr
    finally:
        foreign.close()
        release.touch()
        holder.wait(timeout=30)
    assert holder.returncode == 0  # the other app's instance ran on, untouched


def test_a_command_whose_reader_is_gone_dies_of_sigpipe(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`portpool logs -f | head`, `portpool layout | head -1`: click turned the broken
    pipe into exit 1; a pipeline's writer dies of SIGPIPE, quietly (as up and run do)."""
    tick = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)\n"
    _service_layout(tmp_path, port_base, [sys.executable, "-c", tick])
    done = portpool("up", "--detach", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        follower = start("logs", "-f", "web", cwd=tmp_path)
        assert follower.stdout is not None and follower.stderr is not None
        assert read_line(follower).endswith("| tick\n")
        follower.stdout.close()  # the reader is gone; the next tick is written to no one
        try:
            assert follower.wait(timeout=30) == -signal.SIGPIPE
        finally:
            kill_if_running(follower)
        assert follower.stderr.read() == ""
        follower.stderr.close()
        # A reader gone before the first line: every command that prints on stdout.
        for args in (["logs"], ["status"], ["status", "--json"], ["layout"], ["env"],
                     ["port", "web"], ["doctor", "--all"]):  # fmt: skip
            read_end, write_end = os.pipe()
            os.close(read_end)
            try:
                proc = subprocess.run([*PORTPOOL, *args], stdout=write_end, stderr=subprocess.PIPE,
                                      text=True, cwd=tmp_path, timeout=60, check=False)  # fmt: skip
            finally:
                os.close(write_end)
            assert (proc.returncode, proc.stderr) == (-signal.SIGPIPE, ""), args
    finally:
        assert portpool("stop", cwd=tmp_path).returncode == 0


def _to_gone_reader(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*PORTPOOL, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, timeout=60, check=False)  # fmt: skip
    finally:
        os.close(write_end)


def test_help_version_and_json_errors_to_a_gone_reader_die_of_sigpipe(
    tmp_path: Path, layout_file: Path, home: Path
) -> None:
    """`portpool --help | head -1` exited 1 (click's own handling), and an error's JSON
    to a gone reader exited 1 without the error's message on stderr."""
    for args in (["--help"], ["--version"], ["status", "--help"], ["stop", "-h"]):
        proc = _to_gone_reader(*args, cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (-signal.SIGPIPE, ""), args
    proc = _to_gone_reader("port", "--json", "nosuch", cwd=tmp_path)
    assert proc.returncode == -signal.SIGPIPE
    assert "portpool: error: " in proc.stderr and "nosuch" in proc.stderr
    proc = _to_gone_reader("stop", "--json", cwd=tmp_path)
    assert proc.returncode == -signal.SIGPIPE
    assert "is running" in proc.stderr
    proc = _to_gone_reader("status", "--json", "--bogus", cwd=tmp_path)
    assert proc.returncode == -signal.SIGPIPE
    assert "No such option '--bogus'" in proc.stderr


def test_a_usage_error_to_a_gone_reader_dies_of_sigpipe(tmp_path: Path, home: Path) -> None:
    """``status --bogus 2>&1 | head -1``: click shows a usage error after its own EPIPE
    handling, and the write's failure exited 1, where every other output dies of SIGPIPE
    (and a reader there is 2)."""
    for args in (["status", "--bogus"], ["status", "--json", "--bogus"], ["nosuch"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run([*PORTPOOL, *args], stdout=write_end, stderr=write_end,
                                  cwd=tmp_path, timeout=60, check=False)  # fmt: skip
        finally:
            os.close(write_end)
        assert proc.returncode == -signal.SIGPIPE, args
        assert portpool(*args, cwd=tmp_path).returncode == 2, args


def test_up_detach_returns_after_the_record_says_every_service_is_ready(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Six services ready at about the same time: a keeper's record write could land
    # after "is up" (status then said "starting"), or an older snapshot after a newer.
    names = ("a", "b", "c", "d", "e", "f")
    command = [sys.executable, "-c", SERVE]
    write_layout(
        tmp_path / "portpool.toml",
        port_base,
        services={n: {"command": command, "ready": "tcp", "size": 1} for n in names},
        heartbeat=60,  # no heartbeat rewrites the record while status reads it
    )
    for _ in range(5):
        done = portpool("up", "--detach", "--quiet", cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.stderr
        try:
            # Read at once (status would start a python first, and hide the race).
            record = json.loads((home / "apps/testapp/instances/1.json").read_text())
            states = {s["name"]: s.get("state") for s in record["services"]}
            assert states == dict.fromkeys(names, "ready")
        finally:
            assert portpool("stop", cwd=tmp_path).returncode == 0


SHOW_ENV = (
    "import json, os, socket\n"
    "s = socket.socket(fileno=3)\n"
    "names = ('PYTHONUNBUFFERED', 'PYTHONIOENCODING', 'CALLER_VAR')\n"
    "print('env', json.dumps({n: os.environ.get(n) for n in names}), flush=True)\n"
    "while True:\n"
    "    s.accept()[0].close()\n"
)


@pytest.mark.parametrize("unbuffered", [None, "", "0"])
def test_up_detach_gives_its_services_the_callers_environment_unchanged(
    tmp_path: Path, port_base: int, home: Path, unbuffered: str | None
) -> None:
    # The background up was started with PYTHONUNBUFFERED=1 in its environment (for its
    # own output), which every service then got: a service ran otherwise detached
    # than in the foreground, and a caller's own value was overwritten.
    _service_layout(tmp_path, port_base, [sys.executable, "-c", SHOW_ENV])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["CALLER_VAR"] = "a b=c"
    if unbuffered is not None:
        env["PYTHONUNBUFFERED"] = unbuffered
    done = portpool("up", "--detach", cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        log = wait_for(
            lambda: (out := portpool("logs", "web", cwd=tmp_path).stdout).count("env ") and out
        )
        seen = json.loads(log.split("| env ", 1)[1].splitlines()[0])
        expected = {
            "PYTHONUNBUFFERED": unbuffered,
            "PYTHONIOENCODING": os.environ.get("PYTHONIOENCODING"),
            "CALLER_VAR": "a b=c",
        }
        assert seen == expected
    finally:
        assert portpool("stop", cwd=tmp_path).returncode == 0


def test_up_detach_searches_each_piece_of_the_log_once() -> None:
    # Each piece of the background up's log was searched again with all before it:
    # services that printed 30 MB before they were ready kept up --detach waiting a
    # minute after "is up". Now the search starts at the last line not ended yet.
    from portpool._detach import _UpLineFinder

    finder = _UpLineFinder()
    assert finder.feed(b"svc | " + b"y" * 100 + b"\n" * 1000) is None
    assert finder.scan_from == len(finder.seen)  # nothing of it is searched again
    assert finder.feed(b"svc | a line not ended") is None
    assert finder.scan_from == 106 + 1000  # its start
    assert finder.feed(b" yet\nportpool: instance 3 of app is") is None
    found = finder.feed(b" up\n  svc  9000\n")
    assert found is not None and found.group(1) == b"3"
    # A service's line that reads like up's is never taken for it.
    other = _UpLineFinder()
    assert other.feed(b"svc | portpool: instance 4 of app is up\n") is None
