"""Broken state on disk as the control commands (`status`, `gc`, `env`, `logs`) meet it.

Each test is one fault found by damaging a state dir under a running or dead instance:
what the command says must be true, it keeps what it can, and it never turns damage
into an action (a command run, a log hidden, a report of removed files lost).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import (
    EXHAUST_DESCRIPTORS,
    HOLD,
    PORTPOOL,
    portpool,
    read_line,
    start,
    status_json,
    write_layout,
)

from portpool._heldlock import HeldLock
from portpool._jsonfile import write_atomic
from portpool._platform import current_identity, identity_of, try_lock
from portpool._record import PortRecord, encode_record
from portpool.errors import StateDirError
from portpool.instance import Instance, start_instance
from portpool.layout import load_layout
from portpool.statedir import StateDir


@pytest.fixture
def layout_file(tmp_path: Path, port_base: int) -> Path:
    # Heartbeat and shield far apart: the test's damage stays until the command reads it.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    return write_layout(checkout / "portpool.toml", port_base, heartbeat=3600, shield=3600)


@pytest.fixture
def running(layout_file: Path, state: StateDir) -> Iterator[Instance]:
    """Instance 1 of the layout, started for the layout file's directory."""
    layout = load_layout(str(layout_file))
    with start_instance(layout, state=state, directory=str(layout_file.parent)) as inst:
        yield inst


def _rewrite_record(state: StateDir, number: int, change: dict[str, object]) -> None:
    directory = state.instances("testapp")
    path = Path(directory.path) / f"{number}.json"
    record = json.loads(path.read_text())
    record.update(change)
    write_atomic(directory, f"{number}.json", json.dumps(record).encode())


# ---------------------------------------------------------------- record fields reach output


@pytest.mark.parametrize("forged", ["pool", "name", "port record", "deleted"])
def test_port_and_env_print_only_ports_the_instance_holds_as_leases(
    running: Instance, layout_file: Path, state: StateDir, home: Path, forged: str
) -> None:
    """A hand-edited record of a running instance: ``pool = [22], port = 22`` for alpha
    had ``port alpha`` print 22 and ``env`` export it, or alpha renamed to a service the
    layout lacks had ``env`` export PORTPOOL_PORT_EVIL, while ``doctor`` named alpha's
    real lease. The ports' own locks and records vouch for a record's ports now, each
    for its own service: beta's ``port`` is still printed."""
    alpha, beta = running.ports["alpha"], running.ports["beta"]
    services = json.loads((Path(state.instances("testapp").path) / "1.json").read_text())
    entries = services["services"]
    first = next(e for e in entries if e["name"] == "alpha")
    if forged == "pool":
        first.update(pool=[22], port=22)
        why = "names port 22 for 'alpha', and its lock is not held"
    elif forged == "name":
        first.update(name="evil")
        why = f"names port {alpha} for 'evil', and its own record names instance 1 of testapp"
    elif forged == "deleted":  # env exited 0 without alpha, port said "--service?"
        entries.remove(first)
        why = f"names no port for 'alpha', whose lease is port {alpha} (its lock held, its own"
    else:  # alpha's own port record: its lock is held, not "not held" as it read
        record = home / "ports" / f"{alpha}.json"
        record.unlink()
        record.mkdir()
        why = f"names port {alpha} for 'alpha', and its lock is held but its own record is"
    _rewrite_record(state, 1, {"services": entries})
    env = portpool("env", "--config", str(layout_file))
    alpha_port = portpool("port", "alpha", "--config", str(layout_file))
    for done in (env, alpha_port):
        assert done.returncode == 1 and done.stdout == "", done.stdout
        assert "instance 1 of testapp runs but its record is not its leases'" in done.stderr
        assert why in done.stderr or forged == "name", done.stderr
    if forged == "name":  # the record names no alpha, whose lease it still holds
        assert f"names no port for 'alpha', whose lease is port {alpha}" in alpha_port.stderr
    assert portpool("port", "beta", "--config", str(layout_file)).stdout.strip() == str(beta)
    if forged == "port record":
        return
    running.write_record()  # the instance's own record again: its port again
    assert portpool("port", "alpha", "--config", str(layout_file)).stdout.strip() == str(alpha)


def test_a_service_name_in_a_record_never_reaches_env_lines_that_a_shell_runs(
    running: Instance, layout_file: Path, state: StateDir, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    services = json.loads((Path(state.instances("testapp").path) / "1.json").read_text())
    evil = {"name": "x\nEVIL=1'$(touch ran)'", "pool": [1], "port": 1}  # run in tmp_path
    _rewrite_record(state, 1, {"services": [*services["services"], evil]})

    done = portpool("env", "--config", str(layout_file))
    if done.returncode == 0:  # the old code printed it: sourcing it must then run nothing
        env_file = tmp_path / "instance.env"
        env_file.write_text(done.stdout)
        sh = ["sh", "-c", f'set -a; . "{env_file}"']
        subprocess.run(sh, cwd=tmp_path, timeout=30, check=False)
    assert not marker.exists(), done.stdout
    assert done.returncode == 1, done.stdout
    assert "invalid name" in done.stderr and "x\\nEVIL" in done.stderr, done.stderr
    # status says the same of it, and still lists the slot as running.
    [info] = status_json(layout_file)["instances"]
    assert info["alive"] is True and "invalid name" in info["problem"]


def _services_of_record(state: StateDir) -> list[dict[str, object]]:
    record = json.loads((Path(state.instances("testapp").path) / "1.json").read_text())
    services: list[dict[str, object]] = record["services"]
    return services


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        # port 22 is not in alpha's pool: `port` printed it, and a script talked to sshd
        ({"port": 22}, "port 22 is not in its pool"),
        ({"port": "x"}, "invalid port"),  # read as "no port": `env` dropped the service
        ({"port": 70000}, "invalid port"),
        ({"port": True}, "invalid port"),
    ],
)
def test_a_service_entry_whose_port_is_not_one_of_its_pool_is_unreadable(
    running: Instance,
    layout_file: Path,
    state: StateDir,
    damage: dict[str, object],
    problem: str,
) -> None:
    services = _services_of_record(state)
    services[0].update(damage)
    _rewrite_record(state, 1, {"services": services})

    port = portpool("port", "alpha", "--config", str(layout_file))
    assert port.returncode == 1 and port.stdout == "", port.stdout
    assert problem in port.stderr, port.stderr
    env = portpool("env", "--config", str(layout_file))
    assert env.returncode == 1 and "PORTPOOL_PORT" not in env.stdout, env.stdout
    [info] = status_json(layout_file)["instances"]
    assert info["alive"] is True and info["readable"] is False, info
    assert problem in info["problem"], info


def test_a_service_named_twice_in_a_record_is_unreadable(
    running: Instance, layout_file: Path, state: StateDir
) -> None:
    services = _services_of_record(state)
    _rewrite_record(state, 1, {"services": services + services})

    env = portpool("env", "--config", str(layout_file))
    # It printed PORTPOOL_SERVICES=alpha,beta,alpha,beta.
    assert env.returncode == 1 and "PORTPOOL_SERVICES" not in env.stdout, env.stdout
    [info] = status_json(layout_file)["instances"]
    assert info["readable"] is False and "'alpha' twice" in info["problem"], info


@pytest.mark.parametrize(("number", "named"), [(2, "2"), ("1", "a str"), (None, "a NoneType")])
def test_a_record_naming_another_instance_number_is_unreadable(
    running: Instance, layout_file: Path, state: StateDir, number: object, named: str
) -> None:
    # A record copied from slot 2 (or edited) into slot 1 read as slot 1's instance.
    _rewrite_record(state, 1, {"number": number})
    [info] = status_json(layout_file)["instances"]
    assert info["alive"] is True and info["readable"] is False, info
    assert info["problem"].startswith(f"record unreadable: record names instance {named}, not 1 ")
    assert info["problem"].endswith("/instances/1.json)"), info
    _rewrite_record(state, 1, {"number": 1})
    [info] = status_json(layout_file)["instances"]
    assert info["readable"] is True, info


@pytest.mark.parametrize("pid", [1, 2**31 - 1])  # another process; none at all
def test_a_record_naming_a_process_that_does_not_run_is_not_the_slots(
    running: Instance, layout_file: Path, state: StateDir, pid: int
) -> None:
    # The slot's holder runs; its record names another process. status showed pid 1 as
    # the instance's (alive, ports and all), and `port` printed the record's port.
    _rewrite_record(state, 1, {"pid": pid})

    [info] = status_json(layout_file)["instances"]
    assert info["alive"] is True and info["readable"] is False, info
    # Pid 1 runs: "the record names 1, which is not running" was false.
    names = (
        "pid 1, another process, with another start time"
        if pid == 1
        else f"pid {pid}, which is not running"
    )
    problem = (
        f"record does not match the process holding the slot (pid {os.getpid()} holds it, "
        f"the record names {names})"
    )
    assert problem in info["problem"] and info["pid"] is None, info
    assert info["problem"].endswith("/instances/1.json)"), info  # which file says so
    text = portpool("status", "--config", str(layout_file))
    assert problem in text.stdout, text.stdout
    port = portpool("port", "alpha", "--config", str(layout_file))
    assert port.returncode == 1 and port.stdout == "", port.stdout
    assert problem in port.stderr, port.stderr
    # Naming its holder again, the record is the instance's once more.
    _rewrite_record(state, 1, {"pid": os.getpid()})
    [info] = status_json(layout_file)["instances"]
    assert info["readable"] is True and info["pid"] == os.getpid(), info


def test_a_record_naming_a_running_process_that_does_not_hold_the_slot_is_not_the_slots(
    running: Instance, layout_file: Path, state: StateDir
) -> None:
    # Another live process, its start token copied in too: status showed it as the
    # instance's process (alive, ports and all), and port and env printed the ports,
    # while stop (which asks who holds the lock) refused the record.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        seen = identity_of(other.pid)
        assert seen is not None
        _rewrite_record(state, 1, {"pid": other.pid, "start_token": seen.start_token})
        problem = (
            f"record does not match the process holding the slot (pid {os.getpid()} holds "
            f"it, the record names pid {other.pid}, a running process that does not hold it)"
        )
        [info] = status_json(layout_file)["instances"]
        assert info["alive"] is True and info["readable"] is False, info
        assert problem in info["problem"] and info["pid"] is None, info
        for command in (["port", "alpha"], ["env"], ["stop", "--timeout", "1"]):
            done = portpool(*command, "--config", str(layout_file))
            assert done.returncode == 1 and done.stdout == "", (command, done.stdout)
            assert f"the record names pid {other.pid}" in done.stderr, (command, done.stderr)
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="pid namespaces are Linux's")
def test_an_instance_in_a_pid_namespace_of_its_own_is_still_read_from_outside(
    layout_file: Path, home: Path
) -> None:
    # A container sharing the state dir: its record names its pid in there (1), not the
    # one the lock table lists here. That is its holder, not a record to refuse.
    unshare = ["unshare", "-rpf", "--mount-proc", "--kill-child=SIGTERM"]
    if subprocess.run([*unshare, "true"], capture_output=True, check=False).returncode:
        pytest.skip("no unprivileged pid namespace here (unshare -rpf --mount-proc)")
    run = [sys.executable, "-m", "portpool.cli", "run", "-c", str(layout_file), "--"]
    proc = subprocess.Popen([*unshare, *run, "sleep", "60"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "instance 1" in proc.stderr.readline()
        [info] = status_json(layout_file)["instances"]
        assert info["alive"] is True and info["readable"] is True, info
        assert info["pid"] == 1 and info["pid"] != proc.pid, info
        port = portpool("port", "alpha", "--config", str(layout_file))
        assert port.returncode == 0 and port.stdout.strip().isdigit(), port.stderr
    finally:
        proc.kill()  # unshare waits out SIGTERM; its --kill-child sends run SIGTERM
        proc.communicate(timeout=30)


def test_a_holders_record_text_never_splits_or_colours_a_warning(
    state: StateDir, tmp_path: Path, port_base: int
) -> None:
    # The port's lock held here, its record naming labels a bug (or anyone sharing our
    # uid) could write: `run` warned "got port P+1, not P: held by instance 3 of evil",
    # then "app" on a line of its own, with BEL and a bidi override raw.
    config = write_layout(tmp_path / "portpool.toml", port_base, services={"alpha": {}})
    ports = state.ports()
    lock = ports.open_file(f"{port_base}.lock", os.O_RDWR | os.O_CREAT)
    record = ports.open_file(f"{port_base}.json", os.O_WRONLY | os.O_CREAT)
    try:
        assert try_lock(lock)
        me = current_identity()
        now = time.time()
        labels = ("evil\napp\x07", "svc\u202e\x1b[31m")
        held = PortRecord(port_base, me.pid, me.start_token, me.boot_id, *labels[:1], 3,
                          labels[1], "127.0.0.1", now, now)  # fmt: skip
        os.write(record, encode_record(held))
        done = portpool("run", "--config", str(config), "--", "true")
    finally:
        os.close(record)
        os.close(lock)
    assert done.returncode == 0, done.stderr
    [note] = [line for line in done.stderr.splitlines() if "got port" in line]
    assert (
        f"not {port_base}: port {port_base}: held by instance 3 of evil\\napp\\x07 (pid {me.pid},"
        in note
    )
    assert "service svc\\u202e\\x1b[31m)" in note
    assert not any(c in done.stderr for c in "\x07\x1b\u202e"), done.stderr


def test_a_record_directory_never_starts_a_line_of_an_error(
    layout_file: Path, state: StateDir
) -> None:
    # Several run, none for this checkout: the error lists each one's directory, which
    # is the record's text; "/b\nportpool: ..." printed a line that portpool never said.
    layout = load_layout(str(layout_file))
    with (
        start_instance(layout, state=state, directory="/a"),
        start_instance(layout, state=state, directory="/b"),
    ):
        _rewrite_record(state, 2, {"dir": "/b\nportpool: all is well \x1b[32m"})
        done = portpool("port", "alpha", "--config", str(layout_file))
        pinned = portpool("run", "--instance", "2", "--config", str(layout_file), "--", "true")
        stop = portpool("stop", "--config", str(layout_file))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert "instance 2 (pid " in done.stderr
    # Each names its own way to pick one: stop has no --instance (it takes N), and said so.
    assert "; pick one with --instance: instance 1 (pid " in done.stderr, done.stderr
    assert stop.returncode == 1, stop.stderr
    assert "; pick one with its number (portpool stop N): instance 1 (pid " in stop.stderr
    assert "/b\\nportpool: all is well \\x1b[32m)" in done.stderr, done.stderr
    # Taking that slot by number: "it is running (pid P, started for <the record's dir>)".
    assert pinned.returncode == 3, pinned.stderr
    assert pinned.stderr.count("\n") == 1, pinned.stderr
    assert "started for /b\\nportpool: all is well \\x1b[32m)" in pinned.stderr


# ---------------------------------------------------------------- instance numbers


def test_a_running_instance_beyond_a_lowered_max_is_reachable_by_its_number(
    running: Instance, layout_file: Path, state: StateDir, tmp_path: Path, port_base: int
) -> None:
    # Instance 3 started; then the layout's max_instances went down to 2. status lists
    # it, but `port --instance 3` was a usage error (exit 2): it could not be addressed.
    with start_instance(load_layout(str(layout_file)), state=state, number=3) as third:
        smaller = write_layout(tmp_path / "smaller.toml", port_base, max_instances=2)
        assert [i["number"] for i in status_json(smaller)["instances"]] == [1, 3]
        found = portpool("port", "alpha", "--instance", "3", "--config", str(smaller))
        assert found.returncode == 0, found.stderr
        assert found.stdout.strip() == str(third.ports["alpha"])
        env = portpool("env", "--instance", "3", "--config", str(smaller))
        assert "PORTPOOL_INSTANCE=3\n" in env.stdout, env.stderr
        # A number beyond it that does not run is still a usage error.
        for args in (["port", "alpha", "--instance", "4"], ["logs", "--instance", "4"]):
            refused = portpool(*args, "--config", str(smaller))
            assert refused.returncode == 2, refused.stderr
            assert "--instance must be 1..2 for app 'testapp', not 4" in refused.stderr


# ---------------------------------------------------------------- a slot nobody can take


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_a_special_file_at_a_slot_lock_reads_the_same_to_every_command(
    running: Instance, layout_file: Path, home: Path, kind: str
) -> None:
    lock = home / "apps" / "testapp" / "instances" / "3.lock"
    {"symlink": lambda: lock.symlink_to("/nonexistent"), "directory": lock.mkdir,
     "fifo": lambda: os.mkfifo(lock)}[kind]()  # fmt: skip
    # A probe cannot open it: `stop 3` and `port --instance 3` said "is starting (no
    # record yet)" while `status` listed nothing (no lock table lists it).
    # logs said only "is not running and has no log", naming nothing of the slot.
    for args in (["stop", "3"], ["port", "alpha", "--instance", "3"], ["logs", "-i", "3"]):
        done = portpool(*args, "--config", str(layout_file))
        assert done.returncode == 1, done.stderr
        assert "starting" not in done.stderr, done.stderr
        assert "not running" in done.stderr and "3.lock: is a" in done.stderr, done.stderr
    by_number = {i["number"]: i for i in status_json(layout_file)["instances"]}
    assert by_number[1]["alive"] is True  # the running one is untouched, still the one
    assert by_number[3]["alive"] is False and "3.lock: is a" in by_number[3]["problem"]
    assert portpool("port", "alpha", "--config", str(layout_file)).stdout.strip() == str(
        running.ports["alpha"]
    )
    assert lock.is_symlink() or lock.is_dir() or lock.is_fifo()  # left for the user


def test_a_start_takes_the_next_slot_past_one_nobody_can_take(
    state: StateDir, tmp_path: Path, port_base: int
) -> None:
    # A symlink at 1.lock ended every start of the app with an error, slot 2 free; the
    # DESIGN: "take the lowest free instance slot".
    config = write_layout(tmp_path / "portpool.toml", port_base, max_instances=2)
    instances = Path(state.instances("testapp").path)
    (instances / "1.lock").symlink_to("/nonexistent")
    command = ["sh", "-c", "echo $PORTPOOL_INSTANCE"]
    done = portpool("run", "--config", str(config), "--", *command)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\n"
    assert "instance slot 1 of testapp skipped" in done.stderr
    # One text from run, a pinned run and doctor: doctor gave the bare "1.lock is ...".
    why = (
        f"state dir {instances / '1.lock'}: is a symbolic link, not a lock file portpool "
        "made; never followed (remove it)"
    )
    assert why in done.stderr, done.stderr
    # Pinned to it, the start is refused, naming it, with the code of a slot that is not
    # free (3, as unpinned when every slot is like it; it was 1, a state dir error); the
    # symlink is left as found.
    pinned = portpool("run", "--instance", "1", "--config", str(config), "--", "true")
    assert pinned.returncode == 3 and "is a symbolic link" in pinned.stderr
    assert f"instance 1 of 'testapp' cannot be had: its slot is unusable: {why}" in pinned.stderr
    assert (instances / "1.lock").is_symlink()
    # doctor called the slot's ports free and said nothing of the slot.
    said = f"instance 1: slot unusable, every start skips it: {why}"
    assert said in portpool("doctor", "--config", str(config)).stdout
    doc = json.loads(portpool("doctor", "--json", "--config", str(config)).stdout)
    assert any(line.startswith(said) for line in doc["summary"]), doc["summary"]
    # Every slot so: no free slot (3), not "all 2 are held".
    (instances / "2.lock").unlink(missing_ok=True)
    (instances / "2.lock").symlink_to("/nonexistent")
    none = portpool("run", "--config", str(config), "--", "true")
    assert none.returncode == 3, none.stderr
    assert "(all 2 are held or unusable;" in none.stderr, none.stderr


def test_a_hard_linked_slot_lock_is_unusable_not_a_phantom_instance(
    running: Instance, layout_file: Path, home: Path
) -> None:
    # 2.lock, a second name of running instance 1's lock file: instance 1 holding it
    # made slot 2 read "starting (no record yet)" to stop and port, and alive in status.
    instances = home / "apps" / "testapp" / "instances"
    os.link(instances / "1.lock", instances / "2.lock")
    for args in (["stop", "2"], ["port", "alpha", "--instance", "2"]):
        done = portpool(*args, "--config", str(layout_file))
        assert done.returncode == 1, done.stderr
        assert "starting" not in done.stderr, done.stderr
        assert f"{instances / '2.lock'}: is a file with 2 hard links" in done.stderr, done.stderr
    # Pinned to it: not "it is running" (it read so), its slot is unusable (exit 3).
    pinned = portpool("run", "--instance", "2", "--config", str(layout_file), "--", "true")
    assert pinned.returncode == 3, pinned.stderr
    assert (
        "instance 2 of 'testapp' cannot be had: its slot is unusable: state dir "
        f"{instances / '2.lock'}: is a file with 2 hard links, not a lock file portpool made "
        "(remove it)" in pinned.stderr
    )
    assert "running" not in pinned.stderr, pinned.stderr
    by_number = {i["number"]: i for i in status_json(layout_file)["instances"]}
    assert by_number[1]["alive"] is True  # the running one is untouched
    assert by_number[2]["alive"] is False
    assert by_number[2]["problem"] == (
        f"slot unusable: state dir {instances / '2.lock'}: is a file with 2 hard links, not a "
        "lock file portpool made (remove it)"
    )
    # A start skips it, saying so (it passed it without a word, as a held slot); gc names
    # it (it said nothing) and removes neither name.
    command = ["sh", "-c", "echo $PORTPOOL_INSTANCE"]
    done = portpool("run", "--config", str(layout_file), "--", *command)
    assert done.returncode == 0 and done.stdout == "3\n", done.stderr
    why = by_number[2]["problem"].removeprefix("slot unusable: ")
    assert f"instance slot 2 of testapp skipped: {why}" in done.stderr, done.stderr
    assert "slot 1 of" not in done.stderr, done.stderr  # the running one's is simply held
    cleaned = portpool("gc")
    assert cleaned.returncode == 1, cleaned.stderr
    assert f"{instances / '2.lock'}: is a file with 2 hard links, not the lock file of slot" in (
        cleaned.stderr
    )
    assert "1.lock" not in cleaned.stderr, cleaned.stderr
    assert (instances / "1.lock").stat().st_nlink == 2
    # Free, two names of one lock are refused by name, never taken as one slot.
    (instances / "4.lock").touch()
    os.link(instances / "4.lock", instances / "5.lock")
    pinned = portpool("run", "--instance", "5", "--config", str(layout_file), "--", "true")
    assert pinned.returncode == 3, pinned.stderr
    assert "5.lock: is a file with 2 hard links, not a lock file" in pinned.stderr
    # gc names both (it skipped them without a word), and removes neither.
    gc = portpool("gc")
    assert gc.returncode == 1, gc.stderr
    for n in (4, 5):
        assert f"{n}.lock: is a file with 2 hard links, not the lock file of slot" in gc.stderr
    assert (instances / "5.lock").stat().st_nlink == 2


def test_a_start_takes_the_next_slot_past_one_whose_record_path_is_a_directory(
    state: StateDir, layout_file: Path
) -> None:
    # A directory at 1.json ended every start after its leases were taken ("cannot
    # write 1.json: Is a directory"), slot 2 free; status said "record unreadable" and
    # stop 1 "not running", where a special file at 1.lock reads "slot unusable".
    instances = Path(state.instances("testapp").path)
    (instances / "1.json").mkdir()
    command = ["sh", "-c", "echo $PORTPOOL_INSTANCE"]
    done = portpool("run", "--config", str(layout_file), "--", *command)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\n"
    assert "instance slot 1 of testapp skipped" in done.stderr
    why = (
        f"state dir {instances / '1.json'}: is a directory, not a record portpool wrote (remove it)"
    )
    assert why in done.stderr, done.stderr
    (info,) = status_json(layout_file)["instances"]
    assert info["number"] == 1 and info["alive"] is False
    assert info["problem"] == f"slot unusable: {why}", info
    stop = portpool("stop", "1", "--config", str(layout_file))
    assert stop.returncode == 1 and why in stop.stderr, stop.stderr
    doctor = portpool("doctor", "--config", str(layout_file)).stdout
    assert f"instance 1: slot unusable, every start skips it: {why}" in doctor, doctor
    # Pinned to it, the start is refused, naming it; the directory is left as found.
    pinned = portpool("run", "--instance", "1", "--config", str(layout_file), "--", "true")
    assert pinned.returncode == 3 and "1.json" in pinned.stderr, pinned.stderr
    assert f"its slot is unusable: {why}" in pinned.stderr, pinned.stderr
    unpinned = portpool("run", "--config", str(layout_file), "--", "true")  # 2 is free
    assert unpinned.returncode == 0, unpinned.stderr
    assert (instances / "1.json").is_dir()


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_taking_a_lock_names_what_is_at_its_path(state: StateDir, kind: str) -> None:
    # "cannot open lock file: Too many levels of symbolic links" for one symlink.
    directory = state.ports()
    lock = Path(directory.path) / "6000.lock"
    {"symlink": lambda: lock.symlink_to("/nonexistent"), "directory": lock.mkdir,
     "fifo": lambda: os.mkfifo(lock)}[kind]()  # fmt: skip
    with pytest.raises(StateDirError) as refused:
        HeldLock.acquire(directory, "6000.lock")
    what = {"symlink": "a symbolic link", "directory": "a directory", "fifo": "a FIFO"}[kind]
    assert str(refused.value) == (
        f"state dir {lock}: is {what}, not a lock file portpool made; never followed (remove it)"
    )


def test_a_slot_that_cannot_be_examined_is_an_error_naming_it_in_text_and_json(
    running: Instance, layout_file: Path, state: StateDir
) -> None:
    """An instances dir we may list but not search (mode 600): every command reading a
    slot printed a PermissionError traceback, and status --json "cannot write to
    standard output" and no JSON at all (the records are read while it is written)."""
    directory = Path(state.instances("testapp").path)
    as_user: list[str] = []
    if os.geteuid() == 0:  # root passes any mode: without its two overrides, as a user
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux) to drop its overrides")
        as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    said = f"state dir {directory}/1.lock: cannot be examined: Permission denied"

    def command(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user, *PORTPOOL, *args], capture_output=True, text=True, timeout=60, check=False
        )

    directory.chmod(0o600)
    try:
        for args in (
            ["status"],
            ["status", "--json"],
            ["stop", "--all", "--json"],
            ["stop", "1", "--json"],  # one slot, read by read_instance alone
            ["env", "--instance", "1"],
        ):
            done = command([*args, "--config", str(layout_file)])
            assert (done.returncode, done.stderr) == (1, f"portpool: error: {said}\n"), args
            if "--json" in args:
                assert json.loads(done.stdout) == {"error": said, "exit_code": 1}, args
            else:
                assert done.stdout == "", args
        # gc goes on with the other apps and the ports, naming the slot it could not
        # examine once ("gc skipped app testapp: [Errno 13] Permission denied: '1.lock'").
        problem = f"{directory}/1.lock: cannot be examined: Permission denied"
        for args in (["gc"], ["gc", "--json"]):
            done = command(args)
            assert done.returncode == 1, (args, done.stderr)
            if "--json" in args:
                assert json.loads(done.stdout)["problems"] == [problem], done.stdout
            else:
                assert done.stderr == f"portpool: error: gc skipped {problem}\n", done.stderr
    finally:
        directory.chmod(0o700)
    assert running.problem() is None  # nothing was done to it, stop --all included


# ---------------------------------------------------------------- logs


def _sleeper_layout(tmp_path: Path, port_base: int) -> Path:
    """One service that sleeps, ready at once; no heartbeat or shield rewrites the
    record while a test damages it."""
    sleeper = {"command": ["sleep", "600"], "ready": "none", "socket": "port"}
    return write_layout(
        tmp_path / "portpool.toml", port_base, services={"alpha": sleeper}, heartbeat=3600,
        shield=3600,
    )  # fmt: skip


def test_logs_of_a_running_detached_instance_whose_record_is_damaged(
    tmp_path: Path, home: Path, port_base: int
) -> None:
    config = _sleeper_layout(tmp_path, port_base)
    done = portpool("up", "--detach", "--config", str(config), timeout=60)
    assert done.returncode == 0, done.stderr
    record = home / "apps" / "testapp" / "instances" / "1.json"
    good = record.read_bytes()
    try:
        record.write_text("{")  # damaged: says neither its pid nor its start token
        shown = portpool("logs", "--instance", "1", "--config", str(config))
        # It was started with --detach, and its up still runs: its log is shown.
        assert shown.returncode == 0, shown.stderr
        assert "instance 1 of testapp is up" in shown.stdout
        # An owner file naming another live process (this one) is not the slot's holder.
        me = current_identity()
        owner = home / "apps" / "testapp" / "logs" / "1.owner.json"
        owner.write_text(json.dumps({"pid": me.pid, "start_token": me.start_token}))
        other = portpool("logs", "--instance", "1", "--config", str(config))
        assert other.returncode == 1 and "has no log" in other.stderr, other.stderr
    finally:
        record.write_bytes(good)  # stop refuses an instance whose record it cannot read
        stopped = portpool("stop", "--all", "--config", str(config))
        assert stopped.returncode == 0, stopped.stderr


@pytest.mark.parametrize("blocked", ["1.log", "1.owner.json"])
def test_up_detach_with_a_directory_at_its_log_path_says_where_the_log_is(
    tmp_path: Path, state: StateDir, port_base: int, blocked: str
) -> None:
    # A directory at 1.log ended `up --detach` in an IsADirectoryError traceback (exit 1)
    # over a running instance, whose log `logs` then called absent ("not started with
    # --detach"); one at 1.owner.json, in a StateDirError after it was up.
    config = _sleeper_layout(tmp_path, port_base)
    logs = Path(state.subdir("apps", "testapp", "logs").path)
    (logs / blocked).mkdir()
    done = portpool("up", "--detach", "--config", str(config), timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        assert "instance 1 of testapp is up" in done.stdout
        assert f"the log cannot be put at {logs / '1.log'} (" in done.stderr, done.stderr
        [starting] = [p for p in logs.iterdir() if p.name.startswith(".starting-")]
        # Where its log really is, and a command that shows it: `portpool logs
        # --instance 1`, which it named, refuses what holds 1.log's place (below).
        assert f"logs: tail -f {starting}\n" in done.stdout, done.stdout
        assert "portpool logs" not in done.stdout
        assert "instance 1 of testapp is up" in starting.read_text()
        shown = portpool("logs", "--instance", "1", "--config", str(config))
        assert shown.returncode == 1, shown.stderr
        assert f"{logs / blocked}: is a directory" in shown.stderr, shown.stderr
        assert "--detach" not in shown.stderr
    finally:
        stopped = portpool("stop", "--all", "--config", str(config))
        assert stopped.returncode == 0, stopped.stderr
    assert (logs / blocked).is_dir()  # left for the user


# ---------------------------------------------------------------- gc


def _kill_run_leaving_record(config: Path) -> None:
    """A `portpool run` killed -9 by its own command: its record stays, its locks go."""
    done = portpool("run", "--config", str(config), "--", "sh", "-c", "kill -9 $PPID")
    assert done.returncode == -9, done.stderr


def test_gc_says_what_it_removed_when_the_ports_dir_is_refused(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    _kill_run_leaving_record(config)
    record = home / "apps" / "testapp" / "instances" / "1.json"
    assert record.exists()
    (home / "ports").rename(home / "ports.away")
    (home / "ports").symlink_to(home / "ports.away")

    done = portpool("gc", "--json")
    # The dead instance's record went, and the report says so, with why ports were skipped.
    assert not record.exists()
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["instances"] == ["testapp/1"]
    assert "apps/testapp/instances/1.json" in report["files"]
    [problem] = report["problems"]
    assert str(home / "ports") in problem and "symbolic link" in problem
    assert (home / "ports.away").is_dir() and (home / "ports").is_symlink()  # not followed


def test_gc_never_removes_the_records_of_a_live_holder_whose_lock_file_went(
    running: Instance, layout_file: Path, home: Path
) -> None:
    # With 1.lock and the port's lock file removed by hand, gc said "removed record of
    # dead instance testapp/1" of a running instance (pid and start token checked) and
    # removed its port record too: status then listed nothing while it ran.
    record = home / "apps" / "testapp" / "instances" / "1.json"
    port_record = home / "ports" / f"{running.ports['alpha']}.json"
    (home / "apps" / "testapp" / "instances" / "1.lock").unlink()
    (home / "ports" / f"{running.ports['alpha']}.lock").unlink()
    done = portpool("gc", "--json")
    report = json.loads(done.stdout)
    assert report["instances"] == [] and report["ports"] == [], report
    assert record.exists() and port_record.exists()
    assert done.returncode == 1 and len(report["problems"]) == 2, report
    for problem in report["problems"]:
        assert f"its holder (pid {os.getpid()}) still runs" in problem, problem
    (info,) = status_json(layout_file)["instances"]
    assert info["readable"] is True and info["pid"] == os.getpid()


def test_gc_removes_a_dead_writers_temporary_files_in_every_dir_of_the_app(
    state: StateDir,
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    dirs = {
        sub: Path(state.subdir("apps", "testapp", sub).path)
        for sub in ("instances", "checkouts", "logs")
    }
    for where in dirs.values():
        (where / f".x.json.{dead.pid}.1.tmp").write_text("{")
        (where / f".x.json.{os.getpid()}.1.tmp").write_text("{")  # its writer runs: kept

    done = portpool("gc", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for sub, where in dirs.items():
        assert f"apps/testapp/{sub}/.x.json.{dead.pid}.1.tmp" in report["files"]
        assert sorted(p.name for p in where.iterdir()) == [f".x.json.{os.getpid()}.1.tmp"]


def test_a_record_with_a_number_too_long_to_read_is_unreadable_json(
    state: StateDir, layout_file: Path
) -> None:
    # Python refuses integers over 4,300 digits with a plain ValueError, whose advice
    # ("use sys.set_int_max_str_digits()") reached the user as the record's problem.
    directory = Path(state.instances("testapp").path)
    (directory / "7.json").write_text('{"v": 1, "pid": 1' + "0" * 5000 + "}")
    [info] = status_json(layout_file)["instances"]
    assert (info["number"], info["alive"]) == (7, False)
    assert info["problem"] == (
        f"record unreadable: record is not valid JSON ({directory / '7.json'})"
    )


OUT_OF_FDS_RECORD = (
    """
import json, logging, os, resource, sys
from portpool._jsonfile import read_json_file
from portpool.errors import ResourceLimit
from portpool.instance import start_instance
from portpool.layout import load_layout

warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("portpool").addHandler(Keep())
inst = start_instance(load_layout(sys.argv[1]), heartbeat=False)
directory = inst.state.instances(inst.app)
"""
    + EXHAUST_DESCRIPTORS
    + """
try:
    read_json_file(directory, f"{inst.number}.json")
    read = "read"
except ResourceLimit as e:
    read = "ResourceLimit: " + str(e)
except ValueError as e:
    read = "ValueError: " + str(e)
inst.set_service_pids({"web": os.getpid()})
for fd in held:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (_soft, _hard))
inst.release()
print(json.dumps({"read": read, "warnings": warnings}))
"""
)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_NOFILE is POSIX")
def test_out_of_descriptors_never_makes_an_instance_disown_its_own_record(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """With no descriptor left, reading the instance's own record failed as "cannot be
    opened", which the instance took for a record rewritten by another process: "cannot
    record service pids: instance record 1.json cannot be opened: Too many open files;
    left as found" (up with twelve services at ulimit -n 50, two runs in three)."""
    config = write_layout(tmp_path / "one.toml", port_base, services={"web": {}})
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_FDS_RECORD, str(config)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seen = json.loads(done.stdout)
    assert seen["read"].startswith("ResourceLimit: out of open files"), seen
    assert seen["warnings"], seen  # the record write failed, and said so
    for warning in seen["warnings"]:
        assert "out of open files" in warning and "left as found" not in warning, warning


def test_gc_takes_a_port_locked_after_its_read_of_the_lock_table_for_held(
    state: StateDir, port_base: int
) -> None:
    # gc reads the kernel's lock table once, then judges every port by it: a port a
    # starting instance locked in between read as free, its record as a live holder's,
    # and gc said "its holder still runs but does not hold <port>.lock" and exited 1
    # (twice in 25 s of `run` and `gc` racing).
    from portpool._gc import GcReport, _clean_port
    from portpool._platform import locked_inodes
    from portpool.pool import acquire

    acquire(state, [port_base + 1]).release()  # makes ports/
    before = locked_inodes()
    with acquire(state, [port_base]) as lease:
        ports = state.find("ports")
        assert ports is not None
        report = GcReport()
        _clean_port(ports, f"{port_base}.lock", before, report)
        assert report.problems == [] and report.files == [], report
        record = json.loads(Path(ports.path, f"{port_base}.json").read_text())
        assert record["pid"] == os.getpid() and lease.port == port_base


def test_gc_takes_a_port_released_and_acquired_again_between_its_reads_for_held(
    state: StateDir, port_base: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gc read the record (a live holder's), found the lock free (it was released just
    # then), and read the record again: now the next holder's, written after it locked,
    # so after gc asked. "its holder still runs but does not hold <port>.lock", exit 1
    # (5 gc runs in 150 beside two processes starting and releasing). The interleaving
    # is forced here, at the moment gc asks the lock again.
    import portpool._gc as gc_mod
    from portpool._platform import locked_inodes
    from portpool.pool import acquire

    acquire(state, [port_base + 1]).release()  # makes ports/
    before = locked_inodes()
    first = acquire(state, [port_base])
    held: list[object] = []
    asked = gc_mod._held_now

    def released_and_taken_again(*args: object, **kwargs: object) -> bool:
        first.release()
        free = asked(*args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.01)  # another acquired_at
        held.append(acquire(state, [port_base]))  # locks, then writes its record
        return free

    monkeypatch.setattr(gc_mod, "_held_now", released_and_taken_again)
    ports = state.find("ports")
    assert ports is not None
    report = gc_mod.GcReport()
    gc_mod._clean_port(ports, f"{port_base}.lock", before, report)
    assert held, "the interleaving was not reached"
    assert report.problems == [] and report.files == [], report
    held[0].release()  # type: ignore[attr-defined]


def test_gc_takes_a_slot_released_and_taken_again_between_its_reads_for_held(
    tmp_path: Path, port_base: int, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for a port: the instance record read, the slot released and taken again (by
    # the same process, a loop of start_instance/release) before gc read the record
    # again. gc said "its holder (pid ...) still runs but does not hold 1.lock".
    import portpool._gc as gc_mod

    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, max_instances=1)))
    first = start_instance(layout, state=state, heartbeat=False)
    held: list[Instance] = []
    real_is_held, asked = gc_mod.is_held, gc_mod._held_now

    def released_first(directory: object, name: str, *args: object, **kw: object) -> bool:
        if name == "1.lock" and not held:
            first.release()
        return real_is_held(directory, name, *args, **kw)  # type: ignore[arg-type]

    def taken_again(*args: object, **kwargs: object) -> bool:
        free = asked(*args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.01)  # another started_at
        held.append(start_instance(layout, state=state, heartbeat=False, clean=False))
        return free

    monkeypatch.setattr(gc_mod, "is_held", released_first)
    monkeypatch.setattr(gc_mod, "_held_now", taken_again)
    report = gc_mod.clean_app(state, layout.app)
    assert held, "the interleaving was not reached"
    assert report.problems == [] and report.instances == [], report
    held[0].release()


def test_gc_racing_instances_that_start_and_die_removes_only_dead_holders_metadata(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # gc looped while `run -- true` started and stopped instances and others were killed
    # with -9: twice in 25 s gc said a live holder "still runs but does not hold" its lock
    # (it had locked since gc read the kernel's table) and exited 1. Bounded in time.
    import threading

    layout = write_layout(tmp_path / "p.toml", port_base, max_instances=2, heartbeat=0.05)
    config = ("--config", str(layout))
    deadline = time.monotonic() + 8
    codes: list[int] = []

    def starts(command: list[str]) -> None:
        while time.monotonic() < deadline:
            codes.append(portpool("run", *config, "--", *command).returncode)

    threads = [
        threading.Thread(target=starts, args=(["true"],)),
        threading.Thread(target=starts, args=(["sh", "-c", "sleep 0.1"],)),
        threading.Thread(target=starts, args=(["sh", "-c", "kill -9 $PPID"],)),
    ]
    for t in threads:
        t.start()
    reports = []
    try:
        while time.monotonic() < deadline:
            done = portpool("gc", "--json")
            reports.append((done.returncode, json.loads(done.stdout)))
    finally:
        for t in threads:
            t.join(timeout=120)
    # The race happened: instances ran, some were killed, and gc removed what they left.
    assert codes.count(0) >= 2 and codes.count(-9) >= 1, codes
    assert any(r["instances"] for _, r in reports), reports
    assert [(rc, r["problems"]) for rc, r in reports if rc or r["problems"]] == []
    assert set(codes) <= {0, -9, 3}, codes  # 3: both slots busy at that moment
    # Nothing runs now: one more gc leaves no record of anyone, and says so again after.
    portpool("gc")
    assert status_json(layout)["instances"] == []
    again = json.loads(portpool("gc", "--json").stdout)
    assert again["files"] == [] and again["problems"] == [], again


# As root, the command runs without the right to ignore file modes, as any other user.
AS_ANY_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if hasattr(os, "geteuid") and os.geteuid() == 0
    else []
)
SHOW_PORT = "import os; print(os.environ['PORTPOOL_INSTANCE'], os.environ['PORTPOOL_PORT_ALPHA'])"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.skipif(
    bool(AS_ANY_USER) and shutil.which("setpriv") is None, reason="root without setpriv"
)
@pytest.mark.parametrize("mode", [0o400, 0o200, 0o000], ids=oct)
def test_a_lock_file_its_user_cannot_write_is_still_a_lock(
    tmp_path: Path, port_base: int, home: Path, mode: int
) -> None:
    """A lock file not readable and writable by its user (chmod 400) was "cannot open
    lock file: Permission denied (remove what is there)" while an instance held it:
    removing it stopped that instance. flock needs neither."""
    config = write_layout(tmp_path / "portpool.toml", port_base, max_instances=2, shield=60)
    release = tmp_path / "release"
    hold = start("run", "-q", "-c", str(config), "--", sys.executable, "-c", HOLD, str(release))
    show = [*AS_ANY_USER, *PORTPOOL, "run", "--config", str(config), "--"]
    show += [sys.executable, "-c", SHOW_PORT]
    try:
        assert read_line(hold) == "1\n"  # it holds instance 1
        for name in ("apps/testapp/instances/1.lock", f"ports/{port_base}.lock"):
            (home / name).chmod(mode)
        beside = subprocess.run(show, capture_output=True, text=True, timeout=60, check=False)
        assert beside.returncode == 0, beside.stderr
        assert beside.stdout == f"2 {port_base + 10}\n"
        assert "cannot open" not in beside.stderr, beside.stderr  # slot 1 is simply held
        assert hold.poll() is None
    finally:
        release.touch()
        hold.wait(timeout=30)
    if mode == 0o000:
        return  # free and unopenable: "remove what is there" is the right advice then
    # Free now, its port's lock file still as it was: taken as any lock file is.
    assert (home / f"ports/{port_base}.lock").stat().st_mode & 0o777 == mode
    after = subprocess.run(show, capture_output=True, text=True, timeout=60, check=False)
    assert after.returncode == 0, after.stderr
    assert after.stdout == f"1 {port_base}\n"


@pytest.mark.skipif(sys.platform != "linux", reason="a process's removed files: /proc")
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_an_instance_whose_slot_lock_file_was_removed_keeps_its_number(
    tmp_path: Path, port_base: int, home: Path, how: str
) -> None:
    """Its lock file removed by hand, a running instance read as not running to status,
    stop, port and env (gc said its holder still ran), and a start took its number:
    two instances 1 until its shield's next check. Its checkout's stop then stopped
    another checkout's instance, as "the only running one"."""
    config = write_layout(tmp_path / "portpool.toml", port_base, max_instances=2, shield=60)
    release = tmp_path / "release"
    hold = start("run", "-q", "-c", str(config), "--", sys.executable, "-c", HOLD, str(release))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    other_config = write_layout(elsewhere / "portpool.toml", port_base, max_instances=2)
    other = None
    try:
        assert read_line(hold) == "1\n"  # it holds instance 1
        lock = home / "apps/testapp/instances/1.lock"
        if how == "removed":
            lock.unlink()
        else:  # a copy put in its place (restored, synced): as free as a new file
            (lock.parent / "copy").write_bytes(lock.read_bytes())
            (lock.parent / "copy").replace(lock)
        lost = (
            f"runs without its slot lock: pid {hold.pid} runs on, its 1.lock removed or "
            "replaced (an up or run stops at its shield's next check)"
        )
        [listed] = status_json(config)["instances"]
        assert (listed["alive"], listed["pid"], listed["problem"]) == (False, hold.pid, lost)
        assert f"({lost})" in portpool("status", "--config", str(config)).stdout
        pinned = portpool("run", "--instance", "1", "--config", str(config), "--", "true")
        assert pinned.returncode == 3, pinned.stderr
        assert f"instance 1 of 'testapp' cannot be had: it {lost}" in pinned.stderr
        # Another checkout's start skips it, and runs as instance 2.
        args = ["run", "-q", "-c", str(other_config), "--", sys.executable, "-c", HOLD]
        other = start(*args, str(release), cwd=elsewhere)
        assert read_line(other) == "2\n"
        for args, error in (
            (["stop", "1"], f"instance 1 of testapp {lost}"),
            (["stop"], f"instance 1 of testapp {lost}"),  # not the other checkout's 2
            (["port", "alpha"], f"instance 1 of testapp {lost}"),
        ):
            done = portpool(*args, "--config", str(config))
            assert done.returncode == 1, args
            assert done.stderr.startswith(f"portpool: error: {error}"), (args, done.stderr)
            assert other.poll() is None, args
        full = portpool("run", "--config", str(config), "--", "true")
        assert full.returncode == 3, full.stderr
        assert f"instance slot 1 of testapp skipped: it {lost}" in full.stderr
        assert f"instance 1: pid {hold.pid}, heartbeat " in full.stderr
        assert f"; {lost}" in full.stderr  # the list of holders says it too
        # --all stops the other checkout's instance, and refuses this one.
        done = portpool("stop", "--all", "--config", str(config))
        assert done.returncode == 1
        assert f"instance 1: it {lost}: not signalling anything" in done.stderr
        assert other.wait(timeout=30) is not None
        assert hold.poll() is None  # nothing was signalled
    finally:
        release.touch()
        hold.wait(timeout=30)
        if other is not None:
            other.wait(timeout=30)


EXECS_AFTER_START = """
import os, sys
from portpool.instance import start_instance
from portpool.layout import load_layout
instance = start_instance(load_layout(sys.argv[1]), heartbeat=False)
print(instance.number, flush=True)
os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"])
"""


def test_a_program_that_let_its_slot_go_by_exec_does_not_keep_the_number(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """exec closes the lock's descriptor: the slot is free, its lock file still there,
    while the process (same pid and start token) runs on. Its number is anyone's, as a
    released instance's is: not "runs without its slot lock"."""
    config = write_layout(tmp_path / "portpool.toml", port_base, max_instances=2, shield=60)
    execs = subprocess.Popen(
        [sys.executable, "-c", EXECS_AFTER_START, str(config)], stdout=subprocess.PIPE, text=True
    )
    show = [sys.executable, "-c", "import os; print(os.environ['PORTPOOL_INSTANCE'])"]
    pinned = [*PORTPOOL, "run", "--instance", "1", "-c", str(config), "--", *show]
    try:
        assert read_line(execs) == "1\n"
        done = subprocess.run(pinned, capture_output=True, text=True, timeout=60, check=False)
        deadline = time.monotonic() + 30
        while done.returncode == 3 and time.monotonic() < deadline:  # until the exec is done
            time.sleep(0.05)
            done = subprocess.run(pinned, capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        assert "without its slot lock" not in done.stderr
    finally:
        execs.kill()
        execs.wait()


RELEASES_ON_GO = """
import os, sys, time
from portpool.instance import start_instance
from portpool.layout import load_layout
instance = start_instance(load_layout(sys.argv[1]), heartbeat=False)
print(instance.number, flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
instance.release()  # as its shield's on_lost would, its lock file gone
print("released", flush=True)
time.sleep(60)
"""


def test_a_program_that_released_its_instance_after_losing_the_lock_file_frees_its_number(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """Released with its lock file gone, an instance keeps its record (not provably its
    own any more); while its program ran on, its number read as lock-lost and blocked."""
    config = write_layout(tmp_path / "portpool.toml", port_base, max_instances=2, shield=60)
    go = tmp_path / "go"
    program = subprocess.Popen(
        [sys.executable, "-c", RELEASES_ON_GO, str(config), str(go)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert read_line(program) == "1\n"
        (home / "apps/testapp/instances/1.lock").unlink()
        go.touch()
        assert read_line(program) == "released\n"
        show = [sys.executable, "-c", "import os; print(os.environ['PORTPOOL_INSTANCE'])"]
        done = portpool("run", "--instance", "1", "-c", str(config), "--", *show)
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    finally:
        program.kill()
        program.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="a removed file's flock is read in /proc")
def test_a_port_whose_lock_file_was_removed_under_its_holder_is_still_held(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """A port's lock file removed under its live holder (by hand, a cleaner of /tmp):
    doctor said "free", another app's start took the port and wrote over the holder's
    record ({} once it ended), while gc said its holder still ran. Until the holder's
    shield trips, the port stays its own."""
    from portpool.pool import acquire

    config = write_layout(tmp_path / "portpool.toml", port_base, app="otherapp",
                          services={"x": {"base": port_base, "size": 1}})  # fmt: skip
    config.write_text(config.read_text().replace("size = 2", "size = 1"))
    with acquire(state, [port_base], app="testapp", instance=1, service="a") as lease:
        lease.close_socket()  # handed over by number, as `socket = "port"`: no bind refuses
        (Path(state.path) / "ports" / f"{port_base}.lock").unlink()
        held = f"held by instance 1 of testapp (pid {os.getpid()}, service a), its "
        held += f"{port_base}.lock removed or replaced under it"
        run = portpool("run", "--instance", "1", "--config", str(config), "--", "true")
        assert run.returncode == 3, run.stderr
        assert held in run.stderr, run.stderr
        doctor = portpool("doctor", "--config", str(config))
        assert held in doctor.stdout, doctor.stdout
        record = (Path(state.path) / "ports" / f"{port_base}.json").read_bytes()
        assert record == encode_record(lease.record)  # never written over
