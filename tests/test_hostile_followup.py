"""Follow-ups to the hostile-input work: what a second look at each kind still broke.

Real files, real processes and a temporary PORTPOOL_HOME, like the rest of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import PORTPOOL, portpool, status_json, write_layout

# ---------------------------------------------------------------- out of descriptors


def assert_out_of_files_said_in_one_line(argv: list[str], limits: range) -> None:
    """Run ``argv`` under each descriptor limit: every failure exits 1 with one line of
    error naming the limit (before it at most run's line naming the instance, when the
    limit was reached starting the command), and at least one limit fails."""
    import resource

    failed = 0
    for limit in limits:

        def low_limit(limit: int = limit) -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, preexec_fn=low_limit, check=False
        )
        if done.returncode == 0:
            continue
        failed += 1
        assert done.returncode == 1, (limit, done.stderr)
        *before, error = done.stderr.splitlines()
        assert error.startswith(
            f"portpool: error: out of open files (the limit is {limit}); this layout needs "
        ), (limit, done.stderr)
        assert all(line.startswith("portpool: instance 1 of ") for line in before), before
        assert len(before) <= 1, (limit, done.stderr)
    assert failed, "no limit was low enough to run out: the test proved nothing"


@pytest.mark.skipif(os.name != "posix", reason="ulimit -n is POSIX")
def test_every_low_descriptor_limit_is_one_line_of_error_never_a_traceback(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """With almost no descriptor left, the error path once had to load ``resource`` (a
    shared object: one more descriptor) and ended in an ImportError traceback."""
    config = write_layout(tmp_path / "one.toml", port_base, services={"web": {}})
    argv = [*PORTPOOL, "run", "--config", str(config), "--", sys.executable, "-c", "pass"]
    assert_out_of_files_said_in_one_line(argv, range(9, 15))


@pytest.mark.skipif(os.name != "posix", reason="ulimit -n is POSIX")
def test_out_of_descriptors_writing_a_record_is_the_resource_limit_too(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """Twelve services with --fds: at some limits the descriptors ran out while the
    instance's record was written, and that read "state dir ...: cannot write 1.json:
    Too many open files", as if the state dir were at fault."""
    services = {f"s{i}": {"size": 1} for i in range(12)}
    config = write_layout(tmp_path / "twelve.toml", port_base, services=services, stride=20)
    argv = [*PORTPOOL, "run", "-q", "--fds", "--config", str(config), "--", "true"]
    assert_out_of_files_said_in_one_line(argv, range(30, 56))


@pytest.mark.skipif(os.name != "posix", reason="ulimit -n is POSIX")
def test_a_detached_up_that_could_not_be_started_leaves_no_log(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """``up --detach`` whose own start of the background up failed for descriptors left
    an empty ``.starting-<pid>.log`` that nothing names (nor does gc remove it)."""
    import resource

    config = write_layout(
        tmp_path / "one.toml",
        port_base,
        services={"web": {"command": [sys.executable, "-c", "import time; time.sleep(60)"]}},
    )
    refused = 0
    for limit in range(5, 13):

        def low_limit(limit: int = limit) -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        done = subprocess.run(
            [*PORTPOOL, "up", "--detach", "--quiet", "--config", str(config)],
            capture_output=True, text=True, timeout=60, preexec_fn=low_limit, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            portpool("stop", "--all", "--config", str(config))
            continue
        logs = home / "apps" / "testapp" / "logs"
        left = sorted(logs.glob(".starting-*")) if logs.exists() else []
        if "(log: " in done.stderr:  # the background up ran and failed: its log is named
            for log in left:
                log.unlink()
            continue
        refused += "out of open files" in done.stderr
        assert left == [], (limit, left, done.stderr)
    assert refused, "no limit stopped the start itself: the test proved nothing"


# ---------------------------------------------------------------- layout checks in bounded memory


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_AS is POSIX")
def test_many_services_sharing_one_huge_pool_are_rejected_in_bounded_memory(
    home: Path, tmp_path: Path
) -> None:
    """1,000 services sharing one 64,000-port pool: the checks once expanded every pool
    to its ports (64 million of them, 2.7 GB) and ended in a MemoryError traceback."""
    import resource

    lines = ['app = "big"', "max_instances = 1"]
    for i in range(1000):
        lines += [f"[services.s{i}]", "base = 1025", "size = 64000", "stride = 1"]
    config = tmp_path / "big.toml"
    config.write_text("\n".join(lines) + "\n")

    def one_gib() -> None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = 1 << 30
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    for command in (["layout"], ["run"]):
        args = [*PORTPOOL, *command, "--config", str(config)]
        if command == ["run"]:
            args += ["--", sys.executable, "-c", "pass"]
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=120, preexec_fn=one_gib, check=False
        )
        assert done.returncode == 1, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
        out = done.stdout + done.stderr
        assert "in instance 1, s1's pool 1025..65024 and s0's pool 1025..65024 share" in out
        # The first overlaps in full, then how many more: a bounded report.
        assert "... and 499480 more overlaps" in out
        assert len(out.splitlines()) <= 25, out


# ---------------------------------------------------------------- special files and gc


def _private_dirs(path: Path) -> None:
    """``path`` and its missing parents, 0700 like portpool makes them."""
    if not path.exists():
        _private_dirs(path.parent)
        path.mkdir(mode=0o700)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_gc_names_every_special_file_and_removes_or_follows_none(
    home: Path, tmp_path: Path
) -> None:
    """Broken lock paths (a directory, a FIFO, a symlink) were skipped without a word
    ("gc: 0 files removed", exit 0) while they block their port or slot; special files
    at record paths were removed and reported as records of dead instances."""
    instances = home / "apps" / "testapp" / "instances"
    _private_dirs(instances)
    _private_dirs(home / "ports")
    ports = home / "ports"
    target = tmp_path / "precious"
    target.write_text("keep me")
    (ports / "31100.lock").mkdir()
    os.mkfifo(ports / "31110.lock")
    (ports / "31101.lock").symlink_to(target)
    (ports / "31102.lock").symlink_to(tmp_path / "dangling")
    os.mkfifo(ports / "31555.json")
    (ports / "31556.json").symlink_to(target)
    (instances / "2.lock").mkdir()
    os.mkfifo(instances / "7.json")
    (instances / "9.json").symlink_to(target)
    (instances / "3.json").write_text('{"v": 1}')  # a real (unreadable) record: removed
    odd = {
        ports / "31100.lock": ("a directory", "lock file", "port 31100"),
        ports / "31110.lock": ("a FIFO", "lock file", "port 31110"),
        ports / "31101.lock": ("a symbolic link", "lock file", "port 31101"),
        ports / "31102.lock": ("a symbolic link", "lock file", "port 31102"),
        ports / "31555.json": ("a FIFO", "record", "port 31555"),
        ports / "31556.json": ("a symbolic link", "record", "port 31556"),
        instances / "2.lock": ("a directory", "lock file", "slot testapp/2"),
        instances / "7.json": ("a FIFO", "record", "slot testapp/7"),
        instances / "9.json": ("a symbolic link", "record", "slot testapp/9"),
    }
    gc = subprocess.run([*PORTPOOL, "gc"], capture_output=True, text=True, timeout=60, check=False)
    assert gc.returncode == 1, gc.stderr
    assert "Traceback" not in gc.stderr
    assert gc.stdout.splitlines()[:3] == [
        "removed record of dead instance testapp/3",
        "gc: 1 files removed",
        "  apps/testapp/instances/3.json",
    ], gc.stdout
    errors = gc.stderr.splitlines()
    assert len(errors) == len(odd), gc.stderr
    for path, (kind, what, of) in odd.items():
        line = (
            f"portpool: error: gc skipped {path}: is {kind}, not the {what} of {of}; "
            "left alone (portpool removes only files it makes): remove it by hand"
        )
        assert line in errors, (line, gc.stderr)
        assert os.path.lexists(path), path
    assert target.read_text() == "keep me"
    # The JSON report says the same (its exit status is the CLI's business).
    report = subprocess.run(
        [*PORTPOOL, "gc", "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert len(json.loads(report.stdout)["problems"]) == len(odd), report.stdout


def test_status_says_a_symlinked_record_is_a_symlink(home: Path, tmp_path: Path) -> None:
    """It once said "record cannot be opened: Too many levels of symbolic links"."""
    instances = home / "apps" / "testapp" / "instances"
    _private_dirs(instances)
    (instances / "9.json").symlink_to(tmp_path / "anything")
    config = write_layout(tmp_path / "portpool.toml", 31000)
    done = subprocess.run(
        [*PORTPOOL, "status", "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (info,) = json.loads(done.stdout)["instances"]
    assert info["problem"] == (
        f"record unreadable: 9.json is a symbolic link, not a record ({instances / '9.json'})"
    )


# ---------------------------------------------------------------- PORTPOOL_HOME edge values


@pytest.mark.parametrize("value", ["", "state", "./state"])
def test_an_empty_or_relative_portpool_home_is_an_error_naming_it(
    tmp_path: Path, port_base: int, value: str
) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    env = {**os.environ, "PORTPOOL_HOME": value}
    given = ["--config", str(config)]
    for args in (["status", *given], ["gc"], ["run", *given, "--", sys.executable, "-c", "pass"]):
        done = subprocess.run(
            [*PORTPOOL, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.startswith(f"portpool: error: state dir PORTPOOL_HOME={value!r}: is "), (
            done.stderr
        )
        assert done.stderr.count("\n") == 1, done.stderr
        assert "absolute path" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["portpool.toml"]


# ---------------------------------------------------------------- the state dir's subdirectories


def _run_true(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTPOOL, "run", "--config", str(config), "--", sys.executable, "-c", "pass"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_an_unusable_ports_directory_is_an_error_never_an_exhausted_pool(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """A ports directory writable by others was refused port by port: "instance 1
    skipped: every port of its pool is taken by others", then "no free port", exit 3;
    and its advice named a new PORTPOOL_HOME inside the state dir."""
    config = write_layout(tmp_path / "portpool.toml", port_base, max_instances=2)
    ports = home / "ports"
    _private_dirs(ports)
    ports.chmod(0o777)
    done = _run_true(config)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(
        f"portpool: error: state dir {ports}: is writable by group or others (mode 777); "
    ), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"PORTPOOL_HOME={home}" not in done.stderr  # no new home inside this one
    ports.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    ports.symlink_to(elsewhere)
    done = _run_true(config)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"portpool: error: state dir {ports}: is a symbolic link; refusing to follow it\n"
    )
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_an_entry_in_place_of_a_subdirectory_is_named_with_what_it_is(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """A symlink at ``apps`` was reported as "apps/<app>/instances: cannot be used: Not
    a directory": a path that does not exist, and a symlink to a directory is one."""
    config = write_layout(tmp_path / "portpool.toml", port_base)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    apps = home / "apps"
    instances = apps / "testapp" / "instances"

    def expect(entry: Path, problem: str) -> None:
        for args in (["status", "--config", str(config)], ["gc"]):
            seen = subprocess.run(
                [*PORTPOOL, *args], capture_output=True, text=True, timeout=60, check=False
            )
            assert seen.returncode == 1, (args, seen.stderr)
            assert f"state dir {entry}: {problem}\n" in seen.stderr, (args, seen.stderr)
        done = _run_true(config)
        assert done.returncode == 1, done.stderr
        assert done.stderr == f"portpool: error: state dir {entry}: {problem}\n"

    home.mkdir(mode=0o700, exist_ok=True)
    apps.symlink_to(elsewhere)
    expect(apps, "is a symbolic link; refusing to follow it")
    assert list(elsewhere.iterdir()) == []
    apps.unlink()
    _private_dirs(instances.parent)
    instances.write_text("")
    expect(instances, "is a regular file, not a directory")
    instances.unlink()
    os.mkfifo(instances)
    expect(instances, "is a FIFO, not a directory")


def _immutable(path: Path) -> bool:
    """Make ``path`` immutable (chattr +i: root, on a filesystem with the flag)."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    return done.returncode == 0


def _mutable(*paths: Path) -> None:
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


def test_gc_names_a_file_it_cannot_remove_and_keeps_its_pair_whole(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """gc skipped an immutable lock file without a word (exit 0), and for a record it
    could not unlink named the lock file instead, which it had removed, unlisted."""
    config = write_layout(tmp_path / "l.toml", port_base)
    assert portpool("run", "-q", "-c", str(config), "--", "true").returncode == 0
    ports = home / "ports"
    first, second = port_base, port_base + 2  # alpha's and beta's ports of instance 1
    lock, record = ports / f"{first}.lock", ports / f"{second}.json"
    assert lock.exists() and record.exists()
    if shutil.which("chattr") is None or not _immutable(lock):
        pytest.skip("needs chattr +i (root, on a filesystem with the immutable flag)")
    try:
        if not _immutable(record):
            pytest.skip("needs chattr +i on a second file")
        gc = portpool("gc")
        assert gc.returncode == 1, gc.stdout + gc.stderr
        assert f"{lock}: cannot be locked to remove it" in gc.stderr, gc.stderr
        assert f"{record}: cannot be removed: Operation not permitted" in gc.stderr
        # The pair of the record it could not remove stays whole, lock file and all.
        assert (ports / f"{second}.lock").exists() and record.exists()
        assert f"ports/{second}.lock" not in gc.stdout
    finally:
        _mutable(lock, record)
    again = portpool("gc")
    assert again.returncode == 0, again.stderr
    assert not record.exists() and not lock.exists()


@pytest.mark.skipif(os.name != "posix", reason="sh, exec and symlinks as on POSIX")
def test_up_detach_that_cannot_create_its_log_says_so_without_a_traceback(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """A directory or a symbolic link at ``logs/.starting-<pid>.log`` (the pid is the
    one ``exec`` keeps), as a read-only state dir: ``up --detach`` ended in a Python
    traceback, where ``up`` and ``run`` name the state dir's path and why."""
    config = write_layout(
        tmp_path / "one.toml",
        port_base,
        services={"web": {"command": [sys.executable, "-c", "import time; time.sleep(60)"]}},
    )
    logs = home / "apps" / "testapp" / "logs"
    for made in (home, logs.parent.parent, logs.parent, logs):  # private, as portpool's
        made.mkdir(exist_ok=True)
        made.chmod(0o700)
    for place, why in (
        ("mkdir", "is a directory, not a log portpool wrote; remove it"),
        (f"ln -s {tmp_path / 'x'}", "is a symbolic link, not a log portpool wrote; remove it"),
    ):
        up = " ".join([*PORTPOOL, "up", "--detach", "--config", str(config)])
        script = f'{place} "{logs}/.starting-$$.log" && exec {up}'
        done = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith(f"portpool: error: state dir {logs}/.starting-"), line
        assert line.endswith(f".log: {why}"), line
        assert status_json(config)["instances"] == []  # nothing was started
    assert not (tmp_path / "x").exists()  # the link was not followed


def test_a_detached_up_that_left_an_empty_log_is_said_to_have_left_one() -> None:
    """On a full disk the background up could not write its error to its log: the
    caller read "exited with status 1 before it was up" and an empty log's tail."""
    from portpool.errors import DetachFailed

    full = str(DetachFailed(1, "/s/logs/.starting-9.log", ""))
    assert full.endswith(
        "(its log is empty: it could not write even its error there, as on a full disk; "
        "`portpool up` in the foreground shows it)"
    )
    assert str(DetachFailed(-9, "/s/logs/.starting-9.log", "\n")).endswith("(its log is empty)")
    said = str(DetachFailed(3, "/s/logs/.starting-9.log", "no free instance slot"))
    assert said.endswith("\nno free instance slot")
