"""One port's kernel lock and its metadata record: ownership, hostile files, torn reads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import fork_while_held, in_forked_child

from portpool._heldlock import HeldLock
from portpool._portstatus import inspect_port
from portpool._record import (
    LAST_WALL_CLOCK,
    RECORD_SIZE,
    PortRecord,
    decode_record,
    encode_record,
    read_port_record,
)
from portpool.errors import AlreadyHeldHere, LockHeld, StateDirError
from portpool.lock import PortLock
from portpool.pool import Lease, acquire
from portpool.statedir import StateDir

# A process that takes a port's lock (and record) and holds it until killed.
HOLDER = r"""
import sys, time
from portpool.lock import PortLock
from portpool.statedir import StateDir
from tests.helpers import fork_while_held, in_forked_child
lock = PortLock.acquire(StateDir.open(), int(sys.argv[1]))
lock.write_record(app="other", instance=7, service="holder", host="127.0.0.1")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(home: Path, port_base: int):
    """Another process holding ``port_base``'s lock; killed at teardown."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(port_base)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def ports_of(state: StateDir) -> Path:
    """The state dir's ports/ directory, created on first use like acquire does."""
    state.ports()
    return Path(state.path) / "ports"


def _write(lock: PortLock, service: str = "svc") -> PortRecord:
    return lock.write_record(app="app", instance=1, service=service, host="127.0.0.1")


# ---------------------------------------------------------------- ownership


def test_acquire_write_inspect_release(state: StateDir, port_base: int):
    lock = PortLock.acquire(state, port_base)
    assert inspect_port(state, port_base).state == "held-unreadable"  # locked, no record yet
    record = _write(lock)
    status = inspect_port(state, port_base)
    assert status.state == "held"
    assert status.record == record
    assert record.pid == os.getpid()
    assert lock.problem() is None
    lock.release()
    lock.release()  # twice is safe
    assert inspect_port(state, port_base).is_free
    assert read_port_record(state.ports(), port_base) is None  # erased before unlocking


def test_second_acquire_in_one_process_is_already_held_here(state: StateDir, port_base: int):
    lock = PortLock.acquire(state, port_base)
    with pytest.raises(AlreadyHeldHere) as info:
        PortLock.acquire(state, port_base)
    assert f"{port_base}.lock" in info.value.path
    # The same state dir opened a second time is the same lock, not a deadlock either.
    other = StateDir.open(state.path)
    try:
        with pytest.raises(AlreadyHeldHere):
            PortLock.acquire(other, port_base)
    finally:
        other.close()
    lock.release()
    PortLock.acquire(state, port_base).release()


def test_lock_held_by_another_process_names_it(state: StateDir, port_base: int, holder):
    with pytest.raises(LockHeld) as info:
        PortLock.acquire(state, port_base)
    status = info.value.holder
    assert status.state == "held"
    assert status.record.pid == holder.pid
    assert status.record.service == "holder"


def test_kill_9_frees_the_lock_at_once(state: StateDir, port_base: int, holder):
    assert inspect_port(state, port_base).record.pid == holder.pid
    holder.kill()
    holder.wait()
    # The dead holder's record is still on disk, but the kernel lock decides: free.
    assert read_port_record(state.ports(), port_base).pid == holder.pid
    assert inspect_port(state, port_base).is_free
    lock = PortLock.acquire(state, port_base)  # no timeout, no stale threshold
    assert _write(lock).pid == os.getpid()
    lock.release()


def test_unlinked_lock_file_is_detected(state: StateDir, port_base: int):
    lock = PortLock.acquire(state, port_base)
    _write(lock)
    os.unlink(ports_of(state) / f"{port_base}.lock")
    assert "deleted" in (lock.problem() or "")
    assert "deleted" in (lock.lock.problem() or "")
    lock.release()


def test_replaced_lock_file_is_detected_and_new_holders_record_survives(
    state: StateDir, port_base: int
):
    """Someone replaces our lock file: a new holder is refused while our record names
    us (it took the port and wrote over our record); once that record is gone too, a
    new holder locks the new file, and our release spares its record."""
    lock = PortLock.acquire(state, port_base)
    _write(lock)
    path = ports_of(state) / f"{port_base}.lock"
    os.unlink(path)
    path.touch()
    assert "replaced" in (lock.problem() or "")
    if sys.platform == "linux":  # where a removed file's flock can be read
        tries = subprocess.run(
            [sys.executable, "-c", HOLDER, str(port_base)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert tries.returncode == 1 and "removed or replaced under it" in tries.stderr
    (ports_of(state) / f"{port_base}.json").unlink()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(port_base)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        lock.release()
        record = read_port_record(state.ports(), port_base)
        assert record is not None
        assert record.pid == proc.pid
        assert inspect_port(state, port_base).record.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_rewritten_metadata_is_detected(state: StateDir, port_base: int):
    lock = PortLock.acquire(state, port_base)
    _write(lock)
    other = PortRecord(port_base, 1, "x", "y", "app", 1, "svc", "127.0.0.1", 1.0, 1.0)
    (ports_of(state) / f"{port_base}.json").write_bytes(encode_record(other))
    assert "pid 1" in (lock.problem() or "")
    lock.release()


def test_heartbeat_rewrites_only_heartbeat(state: StateDir, port_base: int):
    lock = PortLock.acquire(state, port_base)
    first = _write(lock)
    lock.heartbeat(now=first.acquired_at + 30)
    seen = read_port_record(state.ports(), port_base)
    assert seen is not None
    assert seen.heartbeat_at == first.acquired_at + 30
    assert seen.acquired_at == first.acquired_at
    assert (seen.pid, seen.service) == (first.pid, first.service)
    lock.release()


def test_held_lock_remove_and_release(state: StateDir):
    directory = state.subdir("misc")
    held = HeldLock.acquire(directory, "x.lock")
    assert held.problem() is None
    with pytest.raises(AlreadyHeldHere):
        HeldLock.acquire(directory, "x.lock")
    held.remove_and_release()
    assert not (Path(state.path) / "misc" / "x.lock").exists()
    HeldLock.acquire(directory, "x.lock").release()


# ---------------------------------------------------------------- fork


def test_forked_child_release_keeps_parents_lock(state: StateDir, port_base: int):
    lease = acquire(state, [port_base], app="app", instance=1, service="svc")

    def child() -> bool:
        lease.release()  # only the child's copies
        try:
            acquire(state, [port_base])
        except Exception as e:
            return type(e).__name__ == "PoolExhausted"
        return False

    assert in_forked_child(child) == 0
    status = inspect_port(state, port_base)
    assert status.state == "held"
    assert status.record.pid == os.getpid()
    assert lease.lock.problem() is None
    lease.release()
    assert inspect_port(state, port_base).is_free


def test_forked_child_release_never_waits_for_a_parent_threads_mutex(
    state: StateDir, port_base: int
) -> None:
    """A fork while another thread of the parent was inside the lease's heartbeat (its
    mutex held): the child's release() waited for that mutex forever."""
    lease = acquire(state, [port_base], app="app", instance=1, service="svc")

    def child() -> bool:
        lease.release()
        return lease.lock.meta_fd == -1

    assert fork_while_held(lease.lock._mutex, child) == 0  # where a heartbeat's write holds it
    assert inspect_port(state, port_base).record.pid == os.getpid()  # still the parent's
    lease.release()
    assert inspect_port(state, port_base).is_free


def test_forked_child_heartbeat_leaves_the_parents_record_alone(state: StateDir, port_base: int):
    """A child's lease.heartbeat() refreshed the parent's record through the inherited
    metadata fd: a write in the parent's name, which the instance's heartbeat never does."""
    lease = acquire(state, [port_base], app="app", instance=1, service="svc")
    path = ports_of(state) / f"{port_base}.json"
    before = path.read_bytes()

    def child() -> bool:
        time.sleep(0.01)  # a heartbeat_at that differs from the parent's
        lease.heartbeat()
        return True

    assert in_forked_child(child) == 0
    assert path.read_bytes() == before
    lease.heartbeat()  # the parent's own still writes
    assert path.read_bytes() != before
    lease.release()


def test_forked_child_cannot_share_a_released_locks_files(state: StateDir, port_base: int):
    """A lock released before a fork must not let a child and its parent both win."""
    PortLock.acquire(state, port_base).release()
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            lock = PortLock.acquire(state, port_base)
            os.write(w, b"x")
            os.read(go_r, 1)
            lock.release()
            code = 0
        finally:
            os._exit(code)
    assert os.read(r, 1) == b"x"
    try:
        with pytest.raises(LockHeld):
            PortLock.acquire(state, port_base)
    finally:
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (r, w, go_r, go_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    PortLock.acquire(state, port_base).release()


# ---------------------------------------------------------------- hostile files


def test_symlink_at_lock_path_is_not_followed(state: StateDir, port_base: int, tmp_path: Path):
    target = tmp_path / "victim"
    target.write_text("precious")
    before = target.stat()
    link = ports_of(state) / f"{port_base}.lock"
    link.symlink_to(target)
    with pytest.raises(StateDirError) as info:
        PortLock.acquire(state, port_base)
    assert f"{port_base}.lock" in info.value.path
    assert target.read_text() == "precious"
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    # The pool skips it with the reason and takes the next port.
    with acquire(state, [port_base, port_base + 1]) as lease:
        assert lease.port == port_base + 1
        assert lease.refusals[0].port == port_base
        assert lease.refusals[0].reason == "error"


def test_symlink_at_metadata_path_is_not_followed(state: StateDir, port_base: int, tmp_path: Path):
    target = tmp_path / "victim"
    target.write_text("precious")
    link = ports_of(state) / f"{port_base}.json"
    link.symlink_to(target)
    assert inspect_port(state, port_base).is_free
    with pytest.raises(ValueError, match=r"^record is a symbolic link, not a record$"):
        read_port_record(state.ports(), port_base)
    with acquire(state, [port_base], app="app", service="svc") as lease:
        assert lease.port == port_base
        assert inspect_port(state, port_base).record.service == "svc"
    assert target.read_text() == "precious"
    assert not link.is_symlink()


def test_hard_link_at_metadata_path_is_not_written(state: StateDir, port_base: int, tmp_path: Path):
    target = Path(state.path) / "victim"  # same filesystem, so a hard link is possible
    target.write_text("precious")
    os.link(target, ports_of(state) / f"{port_base}.json")
    with acquire(state, [port_base], app="app", service="svc"):
        pass
    assert target.read_text() == "precious"


def test_fifo_at_metadata_path_does_not_hang(state: StateDir, port_base: int, holder):
    path = ports_of(state) / f"{port_base + 1}.json"
    os.mkfifo(path)
    # Held port with a FIFO for a record: unreadable, not a hang, never free.
    assert inspect_port(state, port_base + 1).is_free  # not locked: free, record ignored
    with pytest.raises(ValueError, match="not a regular file"):
        read_port_record(state.ports(), port_base + 1)
    with acquire(state, [port_base, port_base + 1], service="svc") as lease:
        assert lease.port == port_base + 1
    assert path.is_file()


def test_directory_at_metadata_path_is_an_error_refusal(state: StateDir, port_base: int):
    (ports_of(state) / f"{port_base}.json").mkdir()
    (ports_of(state) / f"{port_base}.json" / "keep").touch()
    with acquire(state, [port_base, port_base + 1]) as lease:
        assert lease.port == port_base + 1
        assert lease.refusals[0].reason == "error"
    assert inspect_port(state, port_base).is_free


BAD_RECORDS = {
    "empty": b"",
    "truncated": None,  # filled in from a real record below
    "binary": bytes(range(256)) * 4,
    "huge": b"{" * (4 * 1024 * 1024),
    "spaces-and-nuls": b" \0" * 600,
    "json-without-crc": b'{"v":1,"port":1}',
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_broken_metadata_of_a_held_port_never_reads_free(
    state: StateDir, port_base: int, holder, kind: str
):
    good = (ports_of(state) / f"{port_base}.json").read_bytes()
    text = good.rstrip(b" ")
    data = BAD_RECORDS[kind] if kind != "truncated" else text[: len(text) // 2]
    (ports_of(state) / f"{port_base}.json").write_bytes(data)
    status = inspect_port(state, port_base)
    assert status.state == "held-unreadable"
    assert not status.is_free
    with pytest.raises(LockHeld):
        PortLock.acquire(state, port_base)
    with acquire(state, [port_base, port_base + 1]) as lease:
        assert lease.port == port_base + 1
        assert lease.refusals[0].reason == "held"
    assert holder.poll() is None


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_broken_metadata_of_a_free_port_is_replaced(state: StateDir, port_base: int, kind: str):
    data = BAD_RECORDS[kind] or b'{"v":1,"po'
    (ports_of(state) / f"{port_base}.json").write_bytes(data)
    assert inspect_port(state, port_base).is_free
    with acquire(state, [port_base], service="svc") as lease:
        assert inspect_port(state, port_base).record.service == "svc"
        assert lease.lock.problem() is None
    assert (ports_of(state) / f"{port_base}.json").stat().st_size == RECORD_SIZE


def test_record_naming_a_live_unrelated_pid_does_not_hold_the_port(state: StateDir, port_base: int):
    me = read_live_identity(os.getppid())
    stale = PortRecord(port_base, me[0], me[1], me[2], "other", 3, "svc", "127.0.0.1", 1.0, 1.0)
    (ports_of(state) / f"{port_base}.json").write_bytes(encode_record(stale))
    assert inspect_port(state, port_base).is_free  # only the kernel lock holds a port
    with acquire(state, [port_base], service="mine") as lease:
        assert lease.record.pid == os.getpid()
        assert inspect_port(state, port_base).record.service == "mine"


def read_live_identity(pid: int) -> tuple[int, str, str]:
    from portpool._platform import identity_of

    ident = identity_of(pid)
    assert ident is not None
    return ident.pid, ident.start_token, ident.boot_id


# ---------------------------------------------------------------- records


def test_huge_numbers_are_value_errors():
    fields = PortRecord(1, 1, "t", "b", "a", 1, "s", "h", 1.0, 1.0).to_dict()
    for name in ("acquired_at", "heartbeat_at"):
        text = json.dumps({**fields, name: 10**400}, separators=(",", ":")).encode()
        with pytest.raises(ValueError, match=name):
            decode_record(text + b"\n#%08x\n" % zlib.crc32(text))


def test_record_that_could_not_be_read_back_is_refused(state: StateDir, port_base: int):
    from portpool.errors import LockError

    record = PortRecord(port_base, 42, "1.5", "boot", "app", 2, "s" * 257, "::1", 1.0, 1.0)
    with pytest.raises(LockError, match="service"):
        encode_record(record)


def test_encoding_is_exactly_compact_json(state: StateDir, port_base: int):
    record = PortRecord(port_base, 42, "1.5", "boot", "app", 2, "svc", "::1", 1.25, 2.5)
    data = encode_record(record)
    assert len(data) == RECORD_SIZE
    # The whole file is one JSON object (json.load, jq): the record, then its checksum.
    text = json.dumps(record.to_dict(), separators=(",", ":")).encode()
    assert json.loads(data) == {**record.to_dict(), "crc": f"{zlib.crc32(text):08x}"}
    assert data.split(b"\n", 1)[0] == text[:-1] + b',"crc":"%08x"}' % zlib.crc32(text)
    assert decode_record(data) == record
    assert decode_record(b" " * RECORD_SIZE) is None
    # A record as written before (a JSON line, then a "#<crc>" line) still reads.
    assert decode_record((text + b"\n#%08x\n" % zlib.crc32(text)).ljust(RECORD_SIZE)) == record
    # Reformatted by a tool (json.dumps' spaces): it read "record has no checksum".
    pretty = json.dumps(json.loads(data)).encode()
    with pytest.raises(ValueError, match=r"^record was rewritten: its checksum is not as"):
        decode_record(pretty)
    with pytest.raises(ValueError, match=r"^record has no checksum$"):
        decode_record(text)


_names = st.text(max_size=40)
_records = st.builds(
    PortRecord,
    port=st.integers(1, 65535),
    pid=st.integers(0, 2**31 - 1),
    start_token=_names,
    boot_id=_names,
    app=_names,
    instance=st.integers(0, 2**31 - 1),
    service=_names,
    host=_names,
    acquired_at=st.floats(0, LAST_WALL_CLOCK),
    heartbeat_at=st.floats(0, LAST_WALL_CLOCK),
)


@given(_records)
def test_records_round_trip(record: PortRecord):
    assert decode_record(encode_record(record)) == record


@given(_records, st.sampled_from(["acquired_at", "heartbeat_at"]), st.sampled_from([-1e300, 1e11]))
def test_a_record_time_that_is_no_time_of_day_is_refused(
    record: PortRecord, field: str, value: float
) -> None:
    """Times are seconds since 1970: -1e300 was read as a valid one."""
    bad = dataclasses.replace(record, **{field: value})
    with pytest.raises(ValueError, match=f"record field '{field}' is no time of day"):
        decode_record(encode_record(bad))


@given(st.binary(max_size=RECORD_SIZE + 64))
def test_decode_arbitrary_bytes_only_value_error(data: bytes):
    try:
        result = decode_record(data)
    except ValueError:
        return
    assert result is None or isinstance(result, PortRecord)


@given(_records, st.data())
def test_damaged_record_never_decodes_to_another_record(record: PortRecord, data: st.DataObject):
    good = encode_record(record)
    end = len(good.rstrip(b" "))
    at = data.draw(st.integers(0, end - 1))
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        bit = data.draw(st.integers(0, 7))
        damaged = good[:at] + bytes([good[at] ^ (1 << bit)]) + good[at + 1 :]
    elif how == "truncate":
        damaged = good[:at]
    else:
        other = encode_record(data.draw(_records))
        damaged = good[:at] + other[at:]
    try:
        seen = decode_record(damaged)
    except ValueError:
        return
    assert seen in (None, record) or (how == "splice" and seen == decode_record(other))


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


@given(
    st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(
            PortRecord(1, 1, "", "", "", 1, "", "", 0, 0).to_dict(), _json_values
        ),
    )
)
def test_decode_checksummed_json_with_any_field_values(fields: dict[str, object]):
    """A record with a valid checksum but hostile values: a record or ValueError only."""
    text = json.dumps(fields, separators=(",", ":")).encode()
    data = text + b"\n#%08x\n" % zlib.crc32(text)
    if len(data) > RECORD_SIZE:
        data = data[:RECORD_SIZE]
    try:
        result = decode_record(data)
    except ValueError:
        return
    assert result is None or isinstance(result, PortRecord)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3 * RECORD_SIZE))
def test_read_port_record_of_arbitrary_file(state: StateDir, data: bytes):
    (ports_of(state) / "1.json").write_bytes(data)
    try:
        result = read_port_record(state.ports(), 1)
    except ValueError:
        return
    assert result is None or isinstance(result, PortRecord)


# ---------------------------------------------------------------- torn reads

READER = r"""
import json, os, sys, time
from portpool._record import decode_record, read_port_record, RECORD_SIZE
from portpool.statedir import StateDir
from tests.helpers import fork_while_held, in_forked_child
ports = StateDir.open().ports()
port, n = int(sys.argv[1]), int(sys.argv[2])
raw_fd = os.open(f"{port}.json", os.O_RDONLY, dir_fd=ports.fd)
seen = {}
errors = 0
for i in range(n):
    try:
        if i % 2:  # the library's read (retries a torn read a few times)
            r = read_port_record(ports, port)
        else:  # one raw read, no retry: a torn read must be a ValueError, never a record
            r = decode_record(os.pread(raw_fd, RECORD_SIZE + 1, 0))
    except ValueError:
        errors += 1
        continue
    key = "none" if r is None else f"{r.service}|{r.app}|{r.instance}"
    seen[key] = seen.get(key, 0) + 1
print(json.dumps({"seen": seen, "errors": errors}))
"""


def test_readers_never_see_a_torn_record(state: StateDir, port_base: int):
    """A writer rewrites the record in place in a tight loop, alternating two very
    different records; a reader process (true parallelism) only ever decodes one of them."""
    lock = PortLock.acquire(state, port_base)
    variants = [("s" * 250, "long-app", 11), ("b", "x", 2)]
    lock.write_record(app="x", instance=2, service="b", host="127.0.0.1")
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        i = 0
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            service, app, instance = variants[i % 2]
            lock.write_record(app=app, instance=instance, service=service, host="::1")
            i += 1
        writes[0] = i

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        out = subprocess.run(
            [sys.executable, "-c", READER, str(port_base), "20000"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        stop.set()
        thread.join()
        lock.release()
    result = json.loads(out)
    allowed = {f"{s}|{a}|{n}" for s, a, n in variants}
    assert set(result["seen"]) <= allowed, result
    assert all(result["seen"].get(v, 0) > 0 for v in allowed), result  # both were seen
    assert writes[0] > 100


def test_releasing_one_lease_from_several_threads_at_once_raises_nothing(
    state: StateDir, port_base: int
) -> None:
    # Each thread read the lock's fd before any had cleared it: the second close raised
    # EBADF out of release() ("raises nothing"), or closed a file another thread had
    # just opened under the same number.
    errors: list[BaseException] = []
    for _ in range(100):
        lease = acquire(state, [port_base], service="web")
        start = threading.Barrier(4)

        def release(lease: Lease = lease, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                lease.release()
            except BaseException as e:  # any error is the finding
                errors.append(e)

        threads = [threading.Thread(target=release) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        seen = inspect_port(state, port_base)
        assert seen.is_free and seen.record is None


def test_a_heartbeat_never_writes_over_a_record_another_process_wrote(
    state: StateDir, home: Path, port_base: int
) -> None:
    # The heartbeat rewrote the whole file from memory: a record another process had
    # written over ours was "healed" before the shield's next check, which then never
    # tripped (`up` ran on, its port's record once taken over).
    from portpool.errors import LockError

    with acquire(state, [port_base], service="web") as lease:
        path = home / "ports" / f"{port_base}.json"
        path.write_text("not a record")
        with pytest.raises(LockError, match="no longer the record this process wrote"):
            lease.heartbeat()
        assert path.read_text() == "not a record"
        assert "unreadable" in (lease.lock.problem() or "")
    assert path.read_text() == "not a record"  # release leaves evidence alone too


def test_heartbeats_of_an_untouched_record_keep_refreshing_it(
    state: StateDir, port_base: int
) -> None:
    with acquire(state, [port_base], service="web") as lease:
        assert lease.record is not None
        first = lease.record.acquired_at
        lease.lock.heartbeat(now=first + 5)
        lease.lock.heartbeat(now=first + 10)
        seen = inspect_port(state, port_base).record
        assert seen is not None and seen.heartbeat_at == first + 10
        assert lease.lock.problem() is None


def _release_in_unsearchable_dirs(home: str, port: int) -> str:
    """In this process: take a lease and an instance, make their directories
    unsearchable, release both, and say what happened (one word per step)."""
    from portpool.instance import start_instance
    from portpool.layout import Layout, Service

    state = StateDir.open(home)
    lease = acquire(state, [port])
    layout = Layout(app="unsearchable", services=(Service("web", base=port + 1, size=1),))
    inst = start_instance(layout, state=state, heartbeat=False, clean=False)
    dirs = [os.path.join(home, "ports"), os.path.join(home, "apps", "unsearchable", "instances")]
    for path in dirs:
        os.chmod(path, 0)
    said = []
    for release in (lease.release, inst.release):
        try:
            release()
            said.append("released")
        except OSError as e:
            said.append(type(e).__name__)
    for path in dirs:
        os.chmod(path, 0o700)
    again = acquire(state, [port])  # raised "held by this process already"
    again.release()
    said.append("again" if lease.lock.lock.fd == inst.slot.fd == -1 else "fds-left")
    return " ".join(said)


def test_release_raises_nothing_and_unlocks_when_its_directory_became_unsearchable(
    port_base: int,
) -> None:
    # The check "is the path still our file?" raised EACCES out of release() ("raises
    # nothing"), before the unlock: the lease's and the slot's locks stayed held.
    # Root is never refused a directory, so the child gives up root first.
    home = tempfile.mkdtemp()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                # Once as root first: every module it needs is imported while the
                # interpreter's own files are still readable.
                warm = tempfile.mkdtemp()
                _release_in_unsearchable_dirs(warm, port_base)
                shutil.rmtree(warm)
                os.chown(home, 65534, 65534)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            os.write(write_end, _release_in_unsearchable_dirs(home, port_base).encode())
        except BaseException as e:
            os.write(write_end, repr(e).encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as said:
        words = said.read()
    os.waitpid(pid, 0)
    shutil.rmtree(home, ignore_errors=True)
    assert words == "released released again"
