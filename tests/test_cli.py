"""The command line: layout, doctor, gc, errors and exit codes, help and README."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from tests.helpers import (
    HOLD,
    PORTPOOL,
    occupy,
    portpool,
    read_line,
    release,
    start,
    status_json,
    wait_for,
    write_layout,
)

from portpool.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_layout_of_the_default_app(tmp_path: Path, home: Path) -> None:
    done = portpool("layout", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "max instances: 10" in done.stdout
    assert "instance 10:" in done.stdout
    assert "instance 11:" not in done.stdout
    assert re.search(r"6000.*unsafe", done.stdout)


def test_overlapping_layout_is_refused(tmp_path: Path, home: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'app = "x"\n[services.one]\nbase = 25000\nsize = 5\n'
        "[services.two]\nbase = 25003\nsize = 2\n"
    )
    done = portpool("layout", "--config", str(bad))
    assert done.returncode == 1
    assert "one" in done.stderr
    assert "two" in done.stderr
    assert "25003" in done.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('app = "x"\n[services.one]\nbase = 25000\nsize = \n', "line"),
        ('app = "x"\ncolour = 1\n[services.one]\nbase = 25000\nsize = 2\n', "colour"),
        ('app = "x"\n[services.one]\nbase = "25000"\nsize = 2\n', "services.one.base"),
    ],
    ids=["syntax", "unknown-key", "wrong-type"],
)
def test_broken_layout_fails_before_any_lock(
    tmp_path: Path, home: Path, text: str, key: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    for args in (["layout"], ["run", "--", sys.executable, "-c", "pass"], ["up"], ["status"]):
        done = portpool(args[0], "--config", str(bad), *args[1:])
        assert done.returncode == 1, (args, done.stderr)
        assert str(bad) in done.stderr
        assert key in done.stderr
    locks = list(home.rglob("*.lock")) if home.exists() else []
    assert locks == []


def test_doctor_names_holders_and_foreign_processes(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    layout = write_layout(tmp_path / "p.toml", port_base, max_instances=2)
    foreign = occupy("listen", "127.0.0.1", port_base + 1)
    done_file = tmp_path / "release"
    holder = start("run", "--config", str(layout), "--", sys.executable, "-c", HOLD, str(done_file))
    try:
        assert read_line(holder).strip() == "1"
        done = portpool("doctor", "--config", str(layout), "--all")
        assert done.returncode == 0, done.stderr
        lines = {int(m.group(1)): m.group(2) for m in re.finditer(r" (\d+)  (.*)", done.stdout)}
        assert lines[port_base].startswith("held by instance 1 of testapp")
        assert f"pid {foreign.pid}" in lines[port_base + 1]
        assert "python" in lines[port_base + 1]
        assert lines[port_base + 12] == "free"
        # By default only what is not free, and a count of the rest.
        done = portpool("doctor", "--config", str(layout))
        shown = {int(m.group(1)) for m in re.finditer(r" (\d+)  ", done.stdout)}
        assert shown == {port_base, port_base + 1, port_base + 2}  # alpha 2 ports + beta 1
        assert "5 free, 2 held by portpool, 1 used by foreign processes" in done.stdout
        assert "instance 2:" not in done.stdout
        # One service only; JSON.
        done = portpool("doctor", "alpha", "--config", str(layout), "--json")
        doc = json.loads(done.stdout)
        assert {r["service"] for r in doc["ports"]} == {"alpha"}
        assert doc["counts"] == {"free": 2, "held": 1, "foreign": 1}
        states = {r["port"]: r["kind"] for r in doc["ports"]}
        assert states[port_base + 1] == "foreign"
        # --json follows the same filter as the text (free ports only with --all);
        # the counts are always complete.
        assert "free" not in states.values()
        assert set(states) == {port_base, port_base + 1}
        done = portpool("doctor", "alpha", "--config", str(layout), "--json", "--all")
        doc = json.loads(done.stdout)
        assert {r["port"]: r["kind"] for r in doc["ports"]}[port_base + 10] == "free"
        assert len(doc["ports"]) == 4
        assert doc["counts"] == {"free": 2, "held": 1, "foreign": 1}
        assert portpool("doctor", "gamma", "--config", str(layout)).returncode == 2
        assert foreign.poll() is None  # doctor kills nothing
    finally:
        done_file.touch()
        holder.wait(timeout=30)
        release(foreign)


def test_usage_errors_exit_2(home: Path) -> None:
    assert portpool("run").returncode == 2
    assert portpool("frobnicate").returncode == 2
    assert portpool("status", "--no-such-flag").returncode == 2
    # run's options end at its command: an unknown one was taken for the program (127).
    for args in (["--bogus", "--", "true"], ["-q", "--bogus", "true"]):
        done = portpool("run", *args)
        assert done.returncode == 2, done.stderr
        assert "no such option: --bogus" in done.stderr


def test_a_closed_stdout_is_an_error_not_a_silent_success(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    # `portpool status >&-` printed nothing and exited 0 (the state dir became fd 1).
    # A layout on a free block: the default's ports may be in TIME_WAIT from anything on
    # this machine, and run would print a note about it.
    config = str(write_layout(tmp_path / "portpool.toml", port_base))
    for args in (["status", "--config", config], ["layout", "--config", config]):
        done = subprocess.run(
            ["sh", "-c", 'exec "$0" "$@" >&-', *PORTPOOL, *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert done.stderr == "portpool: error: standard output is closed\n"
    # run prints nothing on stdout: its command runs, with /dev/null as its stdout.
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', *PORTPOOL, "run", "-q", "--config", config, "--",
         sys.executable,
         "-c", "import os, sys; sys.stderr.write(os.readlink('/proc/self/fd/1') + '\\n')"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "/dev/null\n")


def test_unsafe_state_dir_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    monkeypatch.setenv("PORTPOOL_HOME", str(link))
    done = portpool("status")
    assert done.returncode == 1
    assert str(link) in done.stderr
    assert "symbolic link" in done.stderr


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert isinstance(cli, click.Group)
    for name, command in cli.commands.items():
        assert command.help, f"{name} has no help text"
        assert f"portpool {name}" in readme, f"README does not document `portpool {name}`"
        done = portpool(name, "--help")
        assert done.returncode == 0
        assert done.stdout.strip()


def test_foreign_socket_fixture_is_loopback_only() -> None:
    # Guard for the suite: helpers bind loopback addresses only.
    s = socket.create_server(("127.0.0.1", 0))
    try:
        assert s.getsockname()[0] == "127.0.0.1"
    finally:
        s.close()


def test_gc_json_fails_like_gc_when_it_skipped_entries(home: Path) -> None:
    # A directory where a port's lock file belongs is left and named; with --json too
    # the command then exits 1 (it exited 0).
    assert portpool("run", "--", sys.executable, "-c", "pass").returncode == 0
    (home / "ports" / "31100.lock").mkdir()
    plain = portpool("gc")
    done = portpool("gc", "--json")
    assert (plain.returncode, done.returncode) == (1, 1), (plain.stderr, done.stderr)
    report = json.loads(done.stdout)
    assert any("31100.lock" in p for p in report["problems"])
    # And the error object every failing command's --json has (the README), beside it.
    assert report["exit_code"] == 1, report
    assert report["error"] == "gc skipped " + "; ".join(report["problems"]), report
    # Named on stderr with --json too (the README: "names on stderr (exit 1) any entry
    # it had to skip"); stderr was empty.
    assert done.stderr == plain.stderr and "portpool: error: gc skipped " in done.stderr


def test_gc_creates_nothing(home: Path) -> None:
    # Like status and doctor: gc of a state dir that is not there made it, and an app
    # directory holding only logs got an empty instances directory.
    for args in (["gc"], ["gc", "--json"]):
        done = portpool(*args)
        assert done.returncode == 0, done.stderr
        assert not home.exists(), args
    (home / "apps" / "someapp" / "logs").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    (home / "apps").chmod(0o700)
    (home / "apps" / "someapp").chmod(0o700)
    done = portpool("gc")
    assert (done.returncode, done.stdout) == (0, "gc: 0 files removed\n"), done.stderr
    found = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert found == ["apps", "apps/someapp", "apps/someapp/logs"]


def test_layout_and_gc_json(tmp_path: Path, port_base: int, home: Path) -> None:
    layout = write_layout(tmp_path / "p.toml", port_base, max_instances=3)
    doc = json.loads(portpool("layout", "--config", str(layout), "--json").stdout)
    assert doc["app"] == "testapp"
    assert doc["max_instances"] == 3
    assert [s["name"] for s in doc["services"]] == ["alpha", "beta"]
    assert doc["instances"][2] == {
        "number": 3,
        "pools": {
            "alpha": [port_base + 20, port_base + 21],
            "beta": [port_base + 22, port_base + 23],
        },
    }
    done = portpool("gc", "--json")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {
        "instances",
        "ports",
        "released",
        "temp_files",
        "files",
        "problems",
    }


# Every exit code the README documents, each produced for real.


def test_every_documented_exit_code(tmp_path: Path, port_base: int, home: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    for text in ("| 0 | ok", "| 1 | error", "| 2 | usage", "| 3 | nothing started",
                 "| 4 | the shield tripped", "| 5 | a service exited"):  # fmt: skip
        assert text in readme, text
    layout = write_layout(tmp_path / "p.toml", port_base, max_instances=1)
    cfg = ["--config", str(layout)]
    # 0 and 1
    assert portpool("layout", *cfg).returncode == 0
    assert portpool("stop", *cfg).returncode == 1
    # 2: an unknown option or command, a missing or unreadable --config, an unknown service
    assert portpool("status", "--no-such-flag").returncode == 2
    # run's options end at its command: an unknown one was taken for the program (127).
    for args in (["--bogus", "--", "true"], ["-q", "--bogus", "true"]):
        done = portpool("run", *args)
        assert done.returncode == 2, done.stderr
        assert "no such option: --bogus" in done.stderr
    assert portpool("frobnicate").returncode == 2
    missing = portpool("status", "--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert "missing.toml: cannot be read" in missing.stderr
    assert portpool("layout", "--config", str(tmp_path)).returncode == 2  # a directory
    for args in (["layout"], ["status"], ["up"], ["run", "-q", "--", "true"]):
        empty = portpool(args[0], "--config", "", *args[1:])  # `--config "$UNSET"`
        assert (empty.returncode, empty.stderr) == (
            2,
            "portpool: error: --config '': is empty: give the layout file's path\n",
        ), args
    unknown = portpool("run", *cfg, "--service", "gamma", "--", "true")
    assert unknown.returncode == 2
    assert "no such service" in unknown.stderr
    # 3: nothing started (the only slot is taken)
    release = tmp_path / "release"
    holder = start("run", *cfg, "--", sys.executable, "-c", HOLD, str(release))
    try:
        assert read_line(holder).strip() == "1"
        assert portpool("run", *cfg, "--", "true").returncode == 3
        # 4: the shield tripped (the instance's slot lock file was deleted under it)
        (home / "apps" / "testapp" / "instances" / "1.lock").unlink()
        assert holder.wait(timeout=30) == 4
    finally:
        release.touch()
        if holder.poll() is None:
            holder.wait(timeout=30)
    # 5: a service exited on its own
    five = write_layout(
        tmp_path / "five.toml",
        port_base,
        services={"web": {"command": [sys.executable, "-c", "import time; time.sleep(0.3)"]}},
    )
    assert portpool("up", "--config", str(five)).returncode == 5
    # run: the command's status, 127 for a missing command, 128+N for a signal
    assert portpool("run", *cfg, "--", sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    assert portpool("run", *cfg, "--", "no-such-command-here").returncode == 127
    killed = portpool("run", *cfg, "--", sys.executable, "-c",
                      "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    assert killed.returncode in (128 + signal.SIGKILL, -signal.SIGKILL)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    # A dry run against a venv path that does not exist: make prints every step.
    def steps(target: str) -> str:
        done = subprocess.run(
            ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout

    run = steps("run")
    assert "-e '.[services]'" in run
    assert "dev" not in run
    assert "--quiet" not in run  # pip's progress stays visible
    assert "portpool up" in run
    test = steps("test")
    assert "-e '.[services,dev]'" in test
    assert "pytest" in test


@pytest.mark.skipif(sys.platform == "win32", reason="a removed working directory is POSIX's")
def test_a_removed_working_directory_is_named_not_a_traceback(
    tmp_path: Path, home: Path, port_base: int
) -> None:
    # A shell left in a directory that was then removed (a finished worktree, a temp dir).
    config = write_layout(tmp_path / "portpool.toml", port_base)
    gone = tmp_path / "gone"
    cases = [
        ["run", "-q", "--", "true"],  # the built-in layout: numbered for the directory
        ["port", "api-server"],
        ["env"],
        ["up", "--detach", "--config", "portpool.toml"],  # a path relative to it
    ]
    for args in cases:
        gone.mkdir()
        in_gone = ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone)]
        done = subprocess.run(
            [*in_gone, *PORTPOOL, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        assert "the current directory no longer exists" in done.stderr, (args, done.stderr)
    # A layout named by its absolute path needs no working directory: up runs detached.
    gone.mkdir()
    args = ["up", "--detach", "-q", "--config", str(config)]
    done = subprocess.run(
        [*in_gone, *PORTPOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )
    try:
        assert done.returncode == 0, done.stderr
    finally:
        stopped = portpool("stop", "--all", "--config", str(config))
    assert stopped.returncode == 0, stopped.stderr


def test_a_program_named_like_an_option_runs_after_double_dash(
    tmp_path: Path, home: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "run.toml", port_base)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "-dashprog"
    program.write_text('#!/bin/sh\necho "dashprog $*"\n')
    program.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = portpool("run", "-q", "-c", str(config), "--", "-dashprog", "a b", env=env)
    assert (done.returncode, done.stdout) == (0, "dashprog a b\n"), done.stderr
    # Without --, it is an option run does not know.
    done = portpool("run", "-q", "-c", str(config), "-dashprog", env=env)
    assert done.returncode == 2
    assert "no such option: -d" in done.stderr  # click reads -dashprog as -d -a ...
    # An unknown option before -- stays one, also when spelled like the program.
    done = portpool("run", "-q", "-c", str(config), "-x", "--", "-dashprog", env=env)
    assert done.returncode == 2
    assert "no such option: -x" in done.stderr
    done = portpool("run", "-q", "-c", str(config), "--bogus", "--", "--bogus", env=env)
    assert done.returncode == 2
    assert "no such option: --bogus" in done.stderr


@contextlib.contextmanager
def _instance_1_held_by_run(
    tmp_path: Path, port_base: int
) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A two-service layout's instance 1, held by `portpool run` of a sleeper; released
    (and the run reaped) on leaving."""
    layout = write_layout(tmp_path / "p.toml", port_base)
    done_file = tmp_path / "release"
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", HOLD, str(done_file))
    try:
        assert read_line(proc).strip() == "1"
        yield layout, proc
    finally:
        done_file.touch()
        proc.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="reads a zombie's state in /proc")
def test_gc_right_after_a_kill_9_takes_the_unreaped_holder_for_dead(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # Killed, a holder is a zombie until its parent reaps it (here: until we wait; a
    # detached up's parent, init, took 1.5 s on a loaded machine). Its locks are free at
    # once, yet gc said "its holder still runs but does not hold 1.lock" and exited 1.
    with _instance_1_held_by_run(tmp_path, port_base) as (layout, proc):
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: [i["alive"] for i in status_json(layout)["instances"]] == [False])
        with open(f"/proc/{proc.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # not reaped yet
        done = portpool("gc")
        assert done.returncode == 0, done.stderr
        assert "removed record of dead instance testapp/1" in done.stdout
        assert status_json(layout)["instances"] == []


def test_the_records_on_disk_are_json_naming_their_holder(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # DESIGN's "State on disk": ports/<port>.json says who holds the port. It held a JSON
    # line, then a "#crc" line and padding: json.load and jq refused the file.
    with _instance_1_held_by_run(tmp_path, port_base) as (_, proc):
        instance = json.loads((home / "apps" / "testapp" / "instances" / "1.json").read_text())
        assert instance["pid"] == proc.pid
        ports = {s["name"]: s["port"] for s in instance["services"]}
        assert ports == {"alpha": port_base, "beta": port_base + 2}
        for service, port in ports.items():
            record = json.loads((home / "ports" / f"{port}.json").read_text())
            assert (record["pid"], record["app"], record["instance"], record["service"]) == (
                proc.pid,
                "testapp",
                1,
                service,
            )
            assert record["start_token"] == instance["start_token"]
            assert record["acquired_at"] <= record["heartbeat_at"]
    # Released, the records left for reuse are JSON too, and name nobody.
    left = sorted((home / "ports").glob("*.json"))
    assert left
    assert all(json.loads(path.read_text()) == {} for path in left)


def test_python_dash_m_portpool_is_the_command(tmp_path: Path, home: Path) -> None:
    # `python -m portpool` (this interpreter's portpool, as with pip) failed: "'portpool'
    # is a package and cannot be directly executed".
    done = subprocess.run(
        [sys.executable, "-m", "portpool", "layout"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == portpool("layout", cwd=tmp_path).stdout
    bad = subprocess.run(
        [sys.executable, "-m", "portpool", "status", "--bogus"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "Usage: portpool status" in bad.stderr


def test_an_unknown_service_on_the_command_line_is_not_called_a_key_of_the_file(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """`portpool port nope` said "p.toml: services.nope: no such service", the form of
    an error at a key of the layout file: the user looked for a [services.nope] table
    that was never there. It names the service the command line asked for."""
    config = write_layout(tmp_path / "p.toml", port_base)
    for args in (["port", "nope"], ["run", "-s", "nope", "--", "true"], ["logs", "nope"]):
        done = portpool(*args[:1], "--config", str(config), *args[1:])
        said = f"{config}: no such service 'nope' in this layout; it has: alpha, beta"
        assert (done.returncode, done.stderr) == (2, f"portpool: error: {said}\n"), args
    # A control character is escaped once (it read 'we\\x1bb', escaped twice).
    done = portpool("port", "we\x1bb", "--config", str(config))
    assert "no such service 'we\\x1bb' in this layout" in done.stderr, done.stderr


def test_status_says_why_a_service_skipped_ports_as_doctor_and_run_say_it(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A foreign server on the first port of a pool: run took the next one and said why,
    # `status --json` kept the refusal, but `status` printed only "web=P+1": the reason
    # the service is not on its usual port was in no text a person reads later.
    layout = write_layout(tmp_path / "p.toml", port_base, services={"web": {}}, max_instances=1)
    foreign = occupy("listen", "127.0.0.1", port_base)
    held = start("run", "--config", str(layout), "--", "sleep", "60")
    try:
        wait_for(lambda: status_json(layout)["instances"], timeout=30)
        (service,) = status_json(layout)["instances"][0]["services"]
        assert service["port"] == port_base + 1
        (refusal,) = service["refusals"]
        assert refusal["port"] == port_base and f"pid {foreign.pid} (python" in refusal["detail"]
        text = portpool("status", "--config", str(layout)).stdout
        said = f"web skipped {port_base}: {refusal['reason']} ({refusal['detail']})"
        assert said in text, text
        doctor = portpool("doctor", "--config", str(layout)).stdout
        assert f"{refusal['reason']} ({refusal['detail']})" in doctor, doctor
    finally:
        held.terminate()
        held.communicate(timeout=30)
        release(foreign)
