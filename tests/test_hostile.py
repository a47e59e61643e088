"""Hostile and careless inputs: every reader is total, nothing is changed unasked.

Each test is one fault found by trying portpool as an attacker (another user, or a
bug with our uid) and as a careless user would: lock tables matched by inode alone,
file names with Unicode digits, record text that reaches the terminal, special files
as layouts, a user-given state dir, quadratic validation, intervals that break threads,
running out of file descriptors, a full stdout, and a cleaner racing a start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import find_free_block
from tests.helpers import (
    PORTPOOL,
    mounted_tmpfs,
    portpool,
    read_line,
    status_json,
    wait_for,
    write_layout,
)

import portpool as portpool_lib
from portpool.statedir import StateDir

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc/locks")

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def two_tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two fresh tmpfs mounts: tmpfs numbers inodes per mount from 1, so they collide."""
    with mounted_tmpfs(tmp_path / "a", "4m") as a, mounted_tmpfs(tmp_path / "b", "4m") as b:
        yield a, b


def _kill_run_leaving_record(config: Path, env: dict[str, str]) -> None:
    """A `portpool run` killed -9 by its own command: its record stays, its locks go."""
    done = subprocess.run(
        [*PORTPOOL, "run", "--config", str(config), "--", "sh", "-c", "kill -9 $PPID"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == -9, done.stderr


# ---------------------------------------------------------------- 1. device and inode


@linux_only
def test_a_lock_on_another_filesystem_with_the_same_inode_never_makes_the_dead_alive(
    two_tmpfs: tuple[Path, Path], tmp_path: Path, port_base: int
) -> None:
    state_fs, other_fs = two_tmpfs
    env = {**os.environ, "PORTPOOL_HOME": str(state_fs / "state")}
    config = write_layout(tmp_path / "portpool.toml", port_base)
    _kill_run_leaving_record(config, env)
    slot = state_fs / "state" / "apps" / "testapp" / "instances" / "1.lock"
    target = slot.stat().st_ino
    twin = None
    for i in range(4000):  # bounded: tmpfs hands out small inode numbers in order
        path = other_fs / f"f{i}"
        path.touch()
        if path.stat().st_ino == target:
            twin = path
            break
    if twin is None:
        pytest.skip(f"no file with inode {target} on the second tmpfs")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(twin)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert read_line(holder) == "locked\n"
        status = subprocess.run(
            [*PORTPOOL, "status", "--json", "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        (instance,) = json.loads(status.stdout)["instances"]
        assert instance["alive"] is False
        gc = subprocess.run(
            [*PORTPOOL, "gc"], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert gc.returncode == 0, gc.stderr
        assert "removed record of dead instance testapp/1" in gc.stdout
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- 2. Unicode digits in names


def _private_dirs(path: Path) -> None:
    """``path`` and its missing parents, 0700 like portpool makes them."""
    if not path.exists():
        _private_dirs(path.parent)
        path.mkdir(mode=0o700)


@pytest.fixture
def instances(home: Path) -> Path:
    """testapp's directory of instance records in ``home``, made as portpool makes it."""
    path = home / "apps" / "testapp" / "instances"
    _private_dirs(path)
    return path


def _record(services: list[dict[str, object]]) -> str:
    now = time.time()
    doc = {"v": 1, "pid": 1, "start_token": "x", "started_at": now, "heartbeat_at": now}
    return json.dumps({**doc, "services": services})


def test_unicode_digit_file_names_never_crash_a_command(
    home: Path, instances: Path, tmp_path: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    _private_dirs(home / "ports")
    for name in ("².json", "³.lock", "٣.json", "07.json", "1.json.", "9" * 40 + ".lock"):
        (instances / name).write_text("{}")
        (home / "ports" / name).write_text("{}")
    (instances / "4.json").write_text(_record([]))  # a dead instance gc should remove
    for args in (["status"], ["status", "--json"], ["layout"], ["doctor"]):
        done = portpool(*args, "--config", str(config))
        assert done.returncode == 0, (args, done.stderr)
    assert [i["number"] for i in status_json(config)["instances"]] == [4]
    gc = portpool("gc")
    assert gc.returncode == 0, gc.stderr
    assert "removed record of dead instance testapp/4" in gc.stdout
    assert (instances / "².json").exists() and (home / "ports" / "³.lock").exists()
    run = portpool("run", "--config", str(config), "--", sys.executable, "-c", "pass")
    assert run.returncode == 0, run.stderr


def test_gc_skips_what_it_cannot_remove_and_still_reports_what_it_did(instances: Path) -> None:
    (instances / "2.json").mkdir()  # a directory where a record belongs
    (instances / "3.json").write_text(_record([]))
    gc = portpool("gc")
    assert gc.returncode == 1
    assert "removed record of dead instance testapp/3" in gc.stdout
    assert "gc skipped" in gc.stderr and "2.json" in gc.stderr
    assert "Traceback" not in gc.stderr
    assert (instances / "2.json").is_dir() and not (instances / "3.json").exists()


# ---------------------------------------------------------------- 3. record text on a terminal


def test_record_text_is_escaped_for_the_terminal_and_json_stays_valid(
    instances: Path, tmp_path: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    # No layout has such a name, so the record is refused (`env` once printed the name
    # into lines a shell sources); the refusal quotes it, escaped, in status and JSON.
    names = ["\ud800lone", "\x1b[31mred\x1b[0m", "bidi\u202etxt", "new\nline"]
    shown = ["\\ud800lone", "\\x1b[31mred\\x1b[0m", "bidi\\u202etxt", "new\\nline"]
    for name, escaped in zip(names, shown, strict=True):
        (instances / "1.json").write_text(_record([{"name": name, "pool": [1], "port": 1}]))
        done = subprocess.run(
            [*PORTPOOL, "status", "--config", str(config)],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode("utf-8")  # valid UTF-8: no raw surrogate
        assert "\x1b" not in out and "\u202e" not in out
        assert "invalid name" in out and escaped in out, out
        assert len(out.splitlines()) == 3  # header lines and one row: no injected lines
        [info] = status_json(config)["instances"]
        assert info["readable"] is False and "invalid name" in info["problem"]


def test_a_full_stdout_is_one_line_of_error(home: Path, tmp_path: Path, port_base: int) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    config = write_layout(tmp_path / "portpool.toml", port_base)
    for args in (["status"], ["status", "--json"], ["layout"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [*PORTPOOL, *args, "--config", str(config)],
                stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
            )  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            "portpool: error: cannot write to standard output: No space left on device"
        ]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGPIPE is POSIX")
def test_json_cut_short_by_its_reader_dies_of_sigpipe_as_text_output_does(tmp_path: Path) -> None:
    """`portpool layout --json | head -c 10` over a large layout: the reader goes away
    in the middle of the one big write, which the OS then reports as a short write, not
    an error. Ignoring the count, the command exited 0 with its output cut short; text
    output dies of SIGPIPE there, as a pipeline's writer does."""
    lines = ['app = "wide"', "max_instances = 500"]
    for i in range(40):
        lines += [f"[services.s{i:02d}]", f"base = {20000 + i}", "size = 1", "stride = 40"]
    config = tmp_path / "wide.toml"
    config.write_text("\n".join(lines) + "\n")
    for extra in ([], ["--json"]):
        argv = [*PORTPOOL, "layout", "--config", str(config), *extra]
        whole = subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout
        assert len(whole) > 1 << 17  # more than a pipe holds
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(10) == whole[:10]
        proc.stdout.close()  # the reader goes away
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == -signal.SIGPIPE, (extra, err)
        proc.stderr.close()


# ---------------------------------------------------------------- 4. special files as layouts


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # A bounded wait: a FIFO once made every command block forever.
    return subprocess.run(
        [*PORTPOOL, *args], capture_output=True, text=True, timeout=30, cwd=cwd, check=False
    )


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
def test_special_files_given_as_config_are_a_one_line_usage_error(
    home: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "layout.fifo"
    os.mkfifo(fifo)
    # A socket cannot even be opened: it said "cannot be read: No such device or address".
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "layout.sock"))
    unix.close()
    kinds = (("/dev/zero", "a character device"), (str(fifo), "a FIFO"))
    for path, kind in (*kinds, (str(tmp_path / "layout.sock"), "a socket")):
        for command in ("status", "layout", "up"):
            done = _cli(command, "--config", path)
            assert done.returncode == 2, (path, command, done.stderr)
            assert (
                done.stderr
                == f"portpool: error: {path}: is {kind}, not a regular file; give a TOML file\n"
            )
    assert not home.exists()  # refused before anything was created


def test_a_newline_in_a_path_never_splits_an_error_line(tmp_path: Path) -> None:
    """A --config path or PORTPOOL_HOME with a newline and an escape: the message was
    split in two at the newline (each part escaped on its own), the ESC shown as \\x1b."""
    name = "x\ny\x1b[31m.toml"
    done = _cli("layout", "--config", str(tmp_path / name))
    assert done.returncode == 2
    assert done.stderr == (
        f"portpool: error: {tmp_path}/x\\ny\\x1b[31m.toml: cannot be read: No such file or "
        "directory\n"
    )
    home = tmp_path / "h\nx"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    done = subprocess.run(
        [*PORTPOOL, "status"], capture_output=True, text=True, timeout=30, check=False,
        env=dict(os.environ, PORTPOOL_HOME=str(home)),
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"portpool: error: state dir {tmp_path}/h\\nx: is readable by ")
    assert line.endswith(f"(e.g. PORTPOOL_HOME={tmp_path}/h\\nx/portpool)")


@pytest.mark.skipif(shutil.which("bash") is None, reason="pastes the hint into bash")
def test_up_detach_shows_a_path_with_a_newline_on_its_own_lines_and_pasteable(
    tmp_path: Path, port_base: int
) -> None:
    """up --detach printed its --config path and the log path raw: a newline split its
    "logs:" and "stop:" hints, and the terminal ate their escape sequences, so the
    pasteable command named a file that does not exist."""
    where = tmp_path / "we\nird\x1b[31m"
    where.mkdir()
    config = where / "ok.toml"
    config.write_text(f'app = "nl"\n[services.a]\nbase = {port_base}\nsize = 1\n')
    home = tmp_path / "h\nx"
    env = dict(os.environ, PORTPOOL_HOME=str(home))
    done = subprocess.run(
        [*PORTPOOL, "up", "--detach", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert not any("\x1b" in line for line in lines), lines
        (stop,) = [line for line in lines if line.startswith("stop: ")]
        assert stop.startswith("stop: portpool stop 1 --config $'"), stop
        (logs,) = [line for line in lines if line.startswith("logs: ")]
        assert f"({tmp_path}/h\\nx/apps/nl/logs/1.log)" in logs, logs
        # Pasted into bash, the hint names the very file.
        word = stop.removeprefix("stop: portpool stop 1 --config ")
        said = subprocess.run(
            ["bash", "-c", f"printf %s {word}"], capture_output=True, text=True, check=True
        )
        assert said.stdout == str(config)
    finally:
        subprocess.run(
            [*PORTPOOL, "stop", "--all", "--config", str(config)],
            capture_output=True, timeout=60, check=False, env=env,
        )  # fmt: skip


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs are POSIX")
@pytest.mark.parametrize(
    "kind", ["fifo", "directory", "dangling symlink", "device symlink", "socket"]
)
def test_an_unusable_local_layout_is_an_error_never_the_default(
    home: Path, tmp_path: Path, kind: str
) -> None:
    local = tmp_path / "portpool.toml"
    if kind == "fifo":
        os.mkfifo(local)
    elif kind == "directory":
        local.mkdir()
    elif kind == "dangling symlink":
        local.symlink_to(tmp_path / "gone.toml")
    elif kind == "socket":
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(local))
        unix.close()
    else:
        local.symlink_to("/dev/null")
    # Every command: gc checked only a --config, and cleaned on beside such a file.
    commands = [
        ["status"], ["layout"], ["up"], ["doctor"], ["gc"], ["env"], ["port", "web"],
        ["stop"], ["logs"], ["run", "--", "true"],
    ]  # fmt: skip
    for command in commands:
        done = _cli(*command, cwd=tmp_path)
        assert done.returncode == 2, (kind, command, done.stdout, done.stderr)
        assert done.stderr.startswith("portpool: error: portpool.toml: ")
        assert len(done.stderr.splitlines()) == 1
        assert "qwen-valencia" not in done.stdout  # the built-in layout was not used


# ---------------------------------------------------------------- 7. a shield thread that dies


def test_a_shield_whose_thread_dies_trips_instead_of_going_silent(state: StateDir) -> None:
    from portpool.pool import acquire
    from portpool.shield import Shield

    base = find_free_block(2)
    lease = acquire(state, [base, base + 1])
    fired: list[str] = []
    done = threading.Event()

    def on_lost(lease: object, reason: str) -> None:
        fired.append(reason)
        done.set()

    # 1e10 s cannot be waited for (OverflowError): the thread dies at its first wait.
    shield = Shield([lease], interval_s=1e10, on_lost=on_lost)
    try:
        shield.start()
        assert done.wait(30)
    finally:
        shield.stop(timeout=5)
        lease.release()
    assert len(fired) == 1
    assert fired[0].startswith("the shield stopped working: OverflowError: ")


# ---------------------------------------------------------------- 5. a user-given state dir


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_a_user_given_state_dir_is_never_re_permissioned(tmp_path: Path, port_base: int) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    given = tmp_path / "home-like"
    given.mkdir()
    given.chmod(0o755)
    (given / "notes.txt").write_text("mine")
    env = {**os.environ, "PORTPOOL_HOME": str(given)}
    for args in (["status"], ["doctor"], ["gc"], ["run", "--", sys.executable, "-c", "pass"]):
        done = subprocess.run(
            [*PORTPOOL, *args[:1], "--config", str(config), *args[1:]],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 1, (args, done.stderr)
        assert "readable by group or others (mode 755)" in done.stderr
        assert f"PORTPOOL_HOME={given / 'portpool'}" in done.stderr
        assert len(done.stderr.splitlines()) == 1
    assert stat.S_IMODE(given.stat().st_mode) == 0o755
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]


def test_read_only_commands_create_nothing(tmp_path: Path, port_base: int) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    missing = tmp_path / "not-yet" / "state"
    env = {**os.environ, "PORTPOOL_HOME": str(missing)}
    for args in (["status"], ["status", "--json"], ["layout"], ["doctor"]):
        done = subprocess.run(
            [*PORTPOOL, *args, "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)
    assert not (tmp_path / "not-yet").exists()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    env["PORTPOOL_HOME"] = str(private)
    for args in (["status"], ["doctor"]):
        done = subprocess.run(
            [*PORTPOOL, *args, "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)
    assert list(private.iterdir()) == []


# ---------------------------------------------------------------- 8. out of file descriptors


@pytest.mark.skipif(os.name != "posix", reason="ulimit -n is POSIX")
def test_out_of_descriptors_is_a_resource_limit_naming_the_need(home: Path, tmp_path: Path) -> None:
    import resource

    count = 40
    base = find_free_block(count)
    lines = ['app = "many"', "max_instances = 1"]
    for i in range(count):
        lines += [f"[services.s{i}]", f"base = {base + i}", "size = 1", "stride = 100"]
    config = tmp_path / "many.toml"
    config.write_text("\n".join(lines) + "\n")

    def low_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))

    done = subprocess.run(
        [*PORTPOOL, "run", "--config", str(config), "--", sys.executable, "-c", "pass"],
        capture_output=True, text=True, timeout=60, preexec_fn=low_limit, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        "portpool: error: out of open files (the limit is 48); this layout needs about "
        f"{3 * count + 16}: raise the limit (e.g. ulimit -n 1024) or start fewer services\n"
    )
    # Nothing is left held, and a normal limit starts it.
    ok = portpool("run", "--config", str(config), "--", sys.executable, "-c", "pass")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("limit", [60, 120])
def test_up_out_of_descriptors_is_a_resource_limit_naming_its_need(
    home: Path, tmp_path: Path, limit: int
) -> None:
    # 60: the instance itself cannot be had; 120: it can, the services' starts cannot
    # (that read "service 's09' could not start: [Errno 24]", exit 5, or a traceback).
    import resource

    count = 30
    base = find_free_block(count)
    lines = ['app = "many-up"', "max_instances = 1"]
    for i in range(count):
        lines += [f"[services.s{i:02d}]", f"base = {base + i}", "size = 1", "stride = 100"]
        lines += ['command = ["sleep", "60"]', 'ready = "none"']
    config = tmp_path / "many.toml"
    config.write_text("\n".join(lines) + "\n")

    def low_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    done = subprocess.run(
        [*PORTPOOL, "up", "-q", "--config", str(config)],
        capture_output=True, text=True, timeout=60, preexec_fn=low_limit, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"portpool: error: out of open files (the limit is {limit}); this layout needs about "
        f"{3 * count + 16 + 3 * count}: raise the limit (e.g. ulimit -n 1024) or start fewer "
        "services"
    )
    status = portpool("status", "--json", "--config", str(config))
    assert '"instances":[]' in status.stdout, status.stdout  # nothing left held


def test_out_of_descriptors_anywhere_in_run_or_up_names_the_need() -> None:
    # An import that met EMFILE after the services started ended in "the limit is N"
    # without the count (or, before, a traceback).
    import errno

    from portpool._launch import descriptors_named
    from portpool.errors import ResourceLimit

    with pytest.raises(ResourceLimit) as raised, descriptors_named(196):
        raise OSError(errno.EMFILE, "Too many open files", "portpool/shield.py")
    assert raised.value.needed == 196
    assert raised.value.exit_code == 1
    with pytest.raises(ResourceLimit) as raised, descriptors_named(196):
        raise ResourceLimit("open files", 60, 106, "raise the limit")
    assert raised.value.needed == 196
    with pytest.raises(PermissionError), descriptors_named(196):
        raise PermissionError(errno.EACCES, "not this one")


# ---------------------------------------------------------------- 9. a cleaner racing a start

DIE_HOLDING = """
import os, sys
from portpool.pool import acquire
from portpool.statedir import StateDir
acquire(StateDir.open(), [int(sys.argv[1])])
os._exit(0)  # dies holding: its record stays, the kernel frees its lock
"""

CLEAN_SLOWLY = """
import sys, time
from portpool._heldlock import HeldLock
from portpool.statedir import StateDir
ports = StateDir.open().ports()
held = HeldLock.acquire(ports, sys.argv[1] + ".lock")  # what gc does to a dead holder's files
print("held", flush=True)
time.sleep(0.02)
ports.unlink(sys.argv[1] + ".json")
held.remove_and_release()
"""


def test_a_cleaner_holding_a_dead_holders_lock_never_pushes_a_start_off_its_port(
    state: StateDir,
) -> None:
    from portpool.pool import acquire

    base = find_free_block(2)
    subprocess.run([sys.executable, "-c", DIE_HOLDING, str(base)], check=True, timeout=60)
    assert state.ports() and Path(state.path, "ports", f"{base}.json").exists()
    cleaner = subprocess.Popen(
        [sys.executable, "-c", CLEAN_SLOWLY, str(base)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert read_line(cleaner) == "held\n"
        lease = acquire(state, [base, base + 1])  # while the cleaner holds the first port
        try:
            assert lease.port == base
        finally:
            lease.release()
    finally:
        cleaner.wait(30)
    assert cleaner.returncode == 0


@contextlib.contextmanager
def _port_lock_held_elsewhere(home: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """A child process holding ``port``'s lock file (made here, no record) while inside."""
    _private_dirs(home / "ports")
    lock = home / "ports" / f"{port}.lock"
    lock.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert read_line(holder) == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@linux_only
def test_doctor_escapes_port_record_text(home: Path, tmp_path: Path, port_base: int) -> None:
    from portpool._record import PortRecord, encode_record

    config = write_layout(tmp_path / "portpool.toml", port_base)
    record = PortRecord(
        port_base, 1, "tok", "boot", "\x1b]0;owned\x07", 1, "\x1b[2J", "127.0.0.1", 1.0, 2.0
    )
    with _port_lock_held_elsewhere(home, port_base):
        (home / "ports" / f"{port_base}.json").write_bytes(encode_record(record))
        done = portpool("doctor", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "\\x1b[2J" in done.stdout


@linux_only
def test_doctor_never_names_a_live_process_a_port_record_names_but_that_holds_no_lock(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """A record edited to name another running process (its pid, start token and boot
    id): doctor said "held by instance 1 of testapp (pid <that process>, ...)", which a
    user would then go after, while the kernel said another process held the lock."""
    from portpool._platform import identity_of
    from portpool._record import PortRecord, encode_record

    config = write_layout(tmp_path / "portpool.toml", port_base)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        seen = wait_for(lambda: identity_of(bystander.pid), timeout=10)
        with _port_lock_held_elsewhere(home, port_base) as holder:
            record = PortRecord(
                port_base, bystander.pid, seen.start_token, seen.boot_id,
                "testapp", 1, "alpha", "127.0.0.1", 1.0, 2.0,
            )  # fmt: skip
            (home / "ports" / f"{port_base}.json").write_bytes(encode_record(record))
            done = portpool("doctor", "--config", str(config))
            diagnosis = portpool_lib.diagnose(port_base, "127.0.0.1")
    finally:
        bystander.kill()
        bystander.wait()
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if f" {port_base}  " in x)
    assert f"held by pid {holder.pid} (python" in line, line
    assert f"record names pid {bystander.pid}, which does not hold the port's lock" in line
    assert f"{port_base}.json" in line  # which file says so
    assert "instance 1 of testapp" not in line, line
    assert diagnosis.held is not None and diagnosis.held.startswith(f"held by pid {holder.pid} ")


@linux_only
def test_a_port_record_naming_its_holders_pid_with_another_start_time_says_so(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """doctor said "held by pid P (python); its record still names the previous holder,
    ... (pid P ...), which no longer runs": one pid, running and not running."""
    from portpool._record import PortRecord, encode_record

    config = write_layout(tmp_path / "portpool.toml", port_base)
    with _port_lock_held_elsewhere(home, port_base) as holder:
        record = PortRecord(
            port_base, holder.pid, "not-its-token", "boot", "testapp", 1, "alpha", "", 1.0, 2.0
        )
        (home / "ports" / f"{port_base}.json").write_bytes(encode_record(record))
        done = portpool("doctor", "--config", str(config))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if f" {port_base}  " in x)
    assert f"held by pid {holder.pid} (python" in line, line
    assert "which no longer runs" not in line, line
    assert f"(pid {holder.pid}, service alpha) with another start time" in line, line
