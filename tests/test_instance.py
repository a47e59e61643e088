"""Instances: slots, acquire-all, records, heartbeat, cleanup (library and CLI)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.helpers import (
    HOLD,
    fork_while_held,
    in_forked_child,
    portpool,
    read_line,
    start,
    status_json,
    wait_for,
    write_layout,
)

from portpool._compat import get_service_port_pool, init_instance_manager
from portpool._gc import gc
from portpool._platform import OpenFiles, locked_inodes
from portpool._portstatus import inspect_port
from portpool.errors import (
    NoFreeSlot,
    NotRunning,
    PoolExhausted,
    PortPoolError,
    SlotUnavailable,
    UnknownService,
    UsageError,
)
from portpool.instance import start_instance
from portpool.layout import load_layout
from portpool.records import iter_instances, list_instances, read_instance
from portpool.statedir import StateDir


@pytest.fixture
def layout_file(tmp_path: Path, port_base: int) -> Path:
    return write_layout(tmp_path / "portpool.toml", port_base)


def test_instances_get_lowest_free_slot_and_ports_a_stride_apart(
    layout_file: Path, state: StateDir
) -> None:
    layout = load_layout(str(layout_file))
    with start_instance(layout, state=state) as one, start_instance(layout, state=state) as two:
        assert (one.number, two.number) == (1, 2)
        for name in ("alpha", "beta"):
            assert two.port(name) - one.port(name) == 10
            assert one.port(name) == layout.pool(name, 1)[0]
        infos = list_instances(layout.app, state)
        assert [(i.number, i.alive, i.pid) for i in infos] == [(1, True, os.getpid())] * 1 + [
            (2, True, os.getpid())
        ]
        assert {s.name: s.port for s in infos[0].services} == one.ports
    # Released: slots and ports are free again, records gone.
    assert list_instances(layout.app, state) == []
    assert inspect_port(state, layout.pool("alpha", 1)[0], None).is_free
    with start_instance(layout, state=state) as again:
        assert again.number == 1


def test_iter_instances_reads_each_slot_when_asked_and_lists_as_list_instances(
    layout_file: Path, state: StateDir, home: Path
) -> None:
    layout = load_layout(str(layout_file))
    # No heartbeat: nothing rewrites a record while the test does.
    with (
        start_instance(layout, state=state, heartbeat=False) as one,
        start_instance(layout, state=state, heartbeat=False) as two,
    ):
        listed = list_instances(layout.app, state)
        assert list(iter_instances(layout.app, state)) == listed
        assert [i.number for i in listed] == [one.number, two.number]
        # Without a state dir: this user's (PORTPOOL_HOME), opened at the first next.
        assert [i.number for i in iter_instances(layout.app)] == [1, 2]
        records = Path(state.instances(layout.app).path)
        saved = (records / "2.json").read_bytes()
        try:
            infos = iter_instances(layout.app, state)
            assert next(infos).number == 1
            # Slot 2 is read only now: what its record holds now is what comes.
            (records / "2.json").write_bytes(b"{not json")
            second = next(infos)
            assert (second.number, second.alive, second.readable) == (2, True, False)
            assert second.problem == (
                f"record unreadable: record is not valid JSON ({records / '2.json'})"
            )
            assert next(infos, None) is None
        finally:
            (records / "2.json").write_bytes(saved)
    assert list(iter_instances(layout.app, state)) == []
    assert list(iter_instances("never-used", state)) == []


def test_pool_exhausted_releases_everything(layout_file: Path, state: StateDir) -> None:
    layout = load_layout(str(layout_file))
    foreign = []
    for port in layout.pool("beta", 1):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
        foreign.append(s)
    try:
        with pytest.raises(PoolExhausted) as info:
            start_instance(layout, state=state, number=1)  # pinned: no skipping to 2
        assert info.value.service == "beta"
        assert [r.port for r in info.value.refusals] == layout.pool("beta", 1)
        assert all(r.reason == "in use" for r in info.value.refusals)
        assert all(f"pid {os.getpid()}" in r.detail for r in info.value.refusals)
        # All or nothing: alpha's port and the slot were given back.
        assert inspect_port(state, layout.pool("alpha", 1)[0]).is_free
        assert list_instances(layout.app, state) == []
    finally:
        for s in foreign:
            s.close()


def test_an_instance_names_a_service_the_layout_lacks_as_the_layout_does(
    layout_file: Path, state: StateDir
) -> None:
    # inst.port("zz") and inst.env("zz") raised a bare KeyError, the layout's calls
    # UnknownService; a service of the layout not leased here is still a KeyError.
    layout = load_layout(str(layout_file))
    with start_instance(layout, state=state, services=["alpha"]) as inst:
        for call in (inst.port, inst.env):
            with pytest.raises(
                UnknownService, match=r"no such service .zz. in this layout; it has: alpha, beta"
            ):
                call("zz")
            with pytest.raises(KeyError):
                call("beta")
        assert inst.env("alpha")["PORT"] == str(inst.port("alpha"))
    # And an empty pool's message ends where it ends (it had a trailing newline).
    assert str(PoolExhausted([], [])) == "no free port in pool []"


def test_no_free_slot_lists_the_holders(tmp_path: Path, port_base: int, state: StateDir) -> None:
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, max_instances=2)))
    with start_instance(layout, state=state), start_instance(layout, state=state):
        with pytest.raises(NoFreeSlot) as info:
            start_instance(layout, state=state)
        assert [h.number for h in info.value.holders] == [1, 2]
        assert all(h.pid == os.getpid() for h in info.value.holders)
        assert f"pid {os.getpid()}" in str(info.value)
        assert "(all 2 are held; max_instances = 2 in the layout)" in str(info.value)


def test_no_free_slot_of_a_one_instance_layout_says_why(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    # Pools of size 2 and stride 1 overlap from instance 2 on: one instance fits.
    path = tmp_path / "one.toml"
    path.write_text(f'app = "one"\n[services.web]\nbase = {port_base}\nsize = 2\nstride = 1\n')
    layout = load_layout(str(path))
    with start_instance(layout, state=state), pytest.raises(NoFreeSlot) as info:
        start_instance(layout, state=state)
    text = str(info.value)
    assert "(its only slot is held; the layout admits 1 instance: instance 2's web pool" in text


def test_heartbeat_refreshes_record(tmp_path: Path, port_base: int, state: StateDir) -> None:
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, heartbeat=0.1)))
    with start_instance(layout, state=state) as inst:
        first = list_instances(layout.app, state)[0].heartbeat_at
        assert first is not None
        wait_for(lambda: (list_instances(layout.app, state)[0].heartbeat_at or 0) > first, 10)
        record = inspect_port(state, inst.port("alpha")).record
        assert record is not None
        assert record.heartbeat_at > record.acquired_at


def test_service_pool_entry_points(tmp_path: Path, port_base: int, monkeypatch) -> None:
    layout_path = write_layout(tmp_path / "portpool.toml", port_base)
    monkeypatch.chdir(tmp_path)
    instance = init_instance_manager(shield=False)
    try:
        assert init_instance_manager() is instance  # once per process
        assert get_service_port_pool("beta") == load_layout(str(layout_path)).pool("beta", 1)
        assert get_service_port_pool("beta", instance=3) == [port_base + 22, port_base + 23]
    finally:
        instance.release()


def test_the_entry_points_keep_to_the_running_instance(
    tmp_path: Path, port_base: int, monkeypatch
) -> None:
    # A second init_instance_manager with another layout silently returned the first
    # instance; get_service_port_pool(s, instance=n) re-read ./portpool.toml.
    first = write_layout(tmp_path / "first.toml", port_base)
    other = write_layout(tmp_path / "other.toml", port_base + 500)
    monkeypatch.chdir(tmp_path)
    instance = init_instance_manager(str(first), shield=False)
    try:
        assert init_instance_manager(str(first)) is instance  # the same ask: the same one
        (tmp_path / "portpool.toml").write_text(other.read_text())  # changed meanwhile
        expected = load_layout(str(first)).pool("beta", 2)
        assert get_service_port_pool("beta", instance=2) == expected
        for kwargs in ({"layout": str(other)}, {"number": instance.number + 1},
                       {"services": ["alpha"]}):  # fmt: skip
            with pytest.raises(UsageError, match="already runs instance"):
                init_instance_manager(shield=False, **kwargs)  # type: ignore[arg-type]
        # An empty list is every service, as start_instance reads it: it was "another".
        assert init_instance_manager(str(first), services=[], shield=False) is instance
        # One file spelled two ways is one layout (Layout equality includes its source).
        assert init_instance_manager("first.toml", shield=False) is instance  # cwd-relative
        with pytest.raises(UsageError, match=r"1\.\.10"):  # a bare ValueError before
            get_service_port_pool("beta", instance=0)
        with pytest.raises(UsageError, match=r"1\.\.10"):  # a pool no instance can have
            get_service_port_pool("beta", instance=11)
    finally:
        instance.release()
    # Released: the pools are not this process's any more (they were still answered).
    with pytest.raises(PortPoolError, match="no instance runs in this process"):
        get_service_port_pool("beta")
    # One service named as a str, as start_instance takes it: the second call asked
    # for the services "a", "l", "p", "h", "a" and was refused.
    instance = init_instance_manager(str(first), services="alpha", shield=False)
    try:
        assert list(instance.leases) == ["alpha"]
        assert init_instance_manager(str(first), services="alpha", shield=False) is instance
    finally:
        instance.release()


@pytest.mark.parametrize("parents_shield", [False, True], ids=["unshielded", "shielded"])
def test_init_instance_manager_in_a_forked_child_returns_the_same_instance(
    tmp_path: Path, port_base: int, parents_shield: bool
) -> None:
    # "Later calls return the same instance": in a forked child the call asked the
    # parent's instance for a shield and raised NotRunning.
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base)))
    instance = init_instance_manager(layout, shield=parents_shield)
    try:
        assert in_forked_child(lambda: init_instance_manager(layout) is instance) == 0
        assert all(report.ok for report in instance.verify_all())  # still the parent's
    finally:
        instance.release()


def test_a_service_named_twice_takes_one_lease(tmp_path: Path, port_base: int, state: StateDir):
    # The second name took a second lease that release() never freed: its port stayed
    # "held (by this process already)" until the process exited.
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base)))
    pool = layout.pool("alpha", 1)
    with start_instance(layout, services=["alpha", "alpha"], state=state) as instance:
        assert instance.ports == {"alpha": pool[0]}
    from portpool.pool import acquire

    with acquire(state, pool) as lease:  # every port of the pool is free again
        assert lease.port == pool[0]


def _run_holders(layout: Path, release: Path, count: int) -> list[subprocess.Popen[str]]:
    return [
        start("run", "--config", str(layout), "--", sys.executable, "-c", HOLD, str(release))
        for _ in range(count)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_sixteen_racing_starts_get_ten_distinct_numbers(
    tmp_path: Path, port_base: int, home: Path, round_: int
) -> None:
    layout = write_layout(tmp_path / "p.toml", port_base)
    release = tmp_path / "release"
    procs = _run_holders(layout, release, 16)
    try:
        numbers: dict[int, subprocess.Popen[str]] = {}
        refused = 0
        for proc in procs:
            try:
                line = read_line(proc, timeout=60)
            except AssertionError:
                line = ""
            if line.strip():
                numbers.setdefault(int(line), proc)
                assert numbers[int(line)] is proc, f"instance {line} given twice"
            else:
                assert proc.wait(timeout=60) == 3
                assert proc.stderr is not None
                assert "no free instance slot" in proc.stderr.read()
                refused += 1
        assert sorted(numbers) == list(range(1, 11))
        assert refused == 6
        # kill -9 of instances 3 and 7: the next two starts get exactly 3 and 7.
        for n in (3, 7):
            numbers[n].kill()
            numbers[n].wait()
        late = _run_holders(layout, release, 2)
        procs += late
        assert sorted(int(read_line(p)) for p in late) == [3, 7]
    finally:
        release.touch()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_dead_instance_is_cleaned_by_gc_and_by_next_start(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    layout = write_layout(tmp_path / "p.toml", port_base)
    release = tmp_path / "release"
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", HOLD, str(release))
    try:
        assert read_line(proc).strip() == "1"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        doc = status_json(layout)
        assert [(i["number"], i["alive"]) for i in doc["instances"]] == [(1, False)]
        done = portpool("gc")
        assert done.returncode == 0, done.stderr
        assert "testapp/1" in done.stdout
        assert status_json(layout)["instances"] == []
    finally:
        release.touch()
    with StateDir.open(str(home)) as state:
        assert gc(state).instances == []


def test_an_instance_that_stops_cleanly_while_status_reads_it_is_not_shown_dead(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """status reads a record, then asks its lock; a clean stop in between (record
    removed, then slot unlocked) must not show a dead instance that never died."""
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base)))
    instance = start_instance(layout, state=state, heartbeat=False)
    stopped: list[int] = []

    class StopsWhenAsked(OpenFiles):
        """Asked whether the record's process holds the slot: it stops cleanly first."""

        def holds_flock(self, pid: int, path: str, device: int, inode: int) -> bool:
            if not stopped:
                stopped.append(instance.number)
                instance.release()
            return super().holds_flock(pid, path, device, inode)

    directory = state.instances(layout.app)
    # As list_instances asks: the kernel's lock table where the process cannot vouch.
    info = read_instance(directory, instance.number, locked_inodes, StopsWhenAsked())
    assert stopped == [instance.number]  # the record was read before the stop
    assert (info.alive, info.problem) == (False, "no record")
    assert list_instances(layout.app, state) == []


def test_status_survives_a_corrupt_record(tmp_path: Path, port_base: int, home: Path) -> None:
    # Slow heartbeat and shield: the holder must neither rewrite the record we corrupt nor
    # (rightly) trip on it before status has looked.
    layout = write_layout(tmp_path / "p.toml", port_base, heartbeat=600, shield=600)
    release = tmp_path / "release"
    procs = _run_holders(layout, release, 2)
    try:
        assert sorted(int(read_line(p)) for p in procs) == [1, 2]

        def settled() -> bool:  # `run` records its child's pid once; wait for that write
            found = status_json(layout)["instances"]
            return len(found) == 2 and all(
                s["pid"] != i["pid"] for i in found for s in i["services"]
            )

        wait_for(settled, 20)
        (home / "apps" / "testapp" / "instances" / "2.json").write_bytes(b"\x00garbage{")
        doc = status_json(layout)
        by_number = {i["number"]: i for i in doc["instances"]}
        assert by_number[1]["readable"] and by_number[1]["alive"]
        assert by_number[2]["alive"] is True
        assert by_number[2]["readable"] is False
        assert "record unreadable" in by_number[2]["problem"]
        human = portpool("status", "--config", str(layout))
        assert human.returncode == 0
        assert "record unreadable" in human.stdout
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=30)


def test_status_json_shape(tmp_path: Path, port_base: int, home: Path) -> None:
    layout = write_layout(tmp_path / "p.toml", port_base)
    release = tmp_path / "release"
    proc = start("run", "--config", str(layout), "--", sys.executable, "-c", HOLD, str(release))
    try:
        assert read_line(proc).strip() == "1"
        doc = status_json(layout)
        assert doc["app"] == "testapp"
        assert doc["state_dir"] == str(home)
        (inst,) = doc["instances"]
        assert inst["number"] == 1 and inst["alive"] is True and inst["pid"] == proc.pid
        assert 0 <= inst["heartbeat_age_s"] < 60
        services = {s["name"]: s for s in inst["services"]}
        assert services["alpha"]["port"] == port_base
        assert services["alpha"]["pool"] == [port_base, port_base + 1]
        assert services["beta"]["port"] == port_base + 2
        assert isinstance(services["beta"]["pid"], int)
        json.dumps(doc)
    finally:
        release.touch()
        proc.wait(timeout=30)
    wait_for(lambda: status_json(layout)["instances"] == [], 10)
    time.sleep(0)


def test_record_service_entries_are_exactly_name_pool_port_pid() -> None:
    # status --json prints these entries as they are: whatever a record holds, each has
    # exactly these five keys (refusals: why earlier pool ports were skipped), with only
    # valid values.
    from portpool.records import _parse_services

    written = {"name": "api", "pool": [9000, 9001], "port": 9001, "pid": 4242}
    hostile = [
        {**written, "extra": "x" * 1000},
        {**written, "name": "web", "pid": -1},
        {"name": "bare", "pool": []},
    ]
    entries = _parse_services([dict(written), *hostile[1:]])
    assert entries[0] == {**written, "refusals": []}
    for entry in [*entries, *_parse_services(hostile[:1])]:
        assert list(entry) == ["name", "pool", "port", "pid", "refusals"]
    assert (entries[1]["port"], entries[1]["pid"]) == (9001, None)
    assert entries[2] == {"name": "bare", "pool": [], "port": None, "pid": None, "refusals": []}
    for bad in (
        [{**written, "port": 70000}],  # a port is one of its pool's, or none
        [{**written, "port": 9002}],
        [{**written, "port": "9001"}],
        [written, written],  # a service named twice
        [{"name": "x", "pool": [0]}],
        [{"name": "x", "pool": [True]}],
        [{"name": "x", "pool": [9000, 65536]}],
        [{"name": "x", "pool": [9000.0]}],
        [{"name": "x", "pool": "9000"}],
        [{"pool": []}],
        [{"name": "n" * 65, "pool": []}],  # no layout has it: names become env names
        [{"name": "a'b", "pool": []}],
    ):
        with pytest.raises(ValueError):
            _parse_services(bad)


def test_instance_module_is_only_the_running_instance() -> None:
    # It re-exported records and cleanup names "for compatibility": one name, one home.
    import portpool
    import portpool.instance

    assert portpool.instance.__all__ == ["Instance", "start_instance"]
    assert portpool.instance.Instance is portpool.Instance  # its body is in _instance
    for moved in ("list_instances", "read_instance", "gc", "GcReport", "InstanceInfo"):
        assert not hasattr(portpool.instance, moved)
    for public in ("gc", "GcReport", "list_instances", "init_instance_manager"):
        assert public in portpool.__all__
        assert getattr(portpool, public) is not None


def test_the_slot_holder_replaces_a_symlink_at_its_record_path_and_never_follows_it(
    layout_file: Path, state: StateDir, home: Path, tmp_path: Path
) -> None:
    """The README's promise: holding the slot's lock, the instance owns its record path;
    a directory there it cannot replace, and says so."""
    instances = home / "apps" / "testapp" / "instances"
    instances.mkdir(parents=True, mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me")
    (instances / "1.json").symlink_to(target)
    layout = load_layout(str(layout_file))
    with start_instance(layout, state=state) as instance:
        assert instance.number == 1
        record = instances / "1.json"
        assert not record.is_symlink()
        assert json.loads(record.read_text())["number"] == 1
    assert target.read_text() == "keep me"
    (instances / "1.json").unlink(missing_ok=True)
    (instances / "1.json").mkdir()
    # Refused before any port is taken (it was once the record's write failing).
    with pytest.raises(SlotUnavailable, match=r"1\.json: is a directory, not a record"):
        start_instance(layout, state=state, number=1)


def test_a_forked_child_never_rewrites_or_stops_its_parents_instance(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    # A child forked with the instance in memory (multiprocessing's fork, a prefork
    # server) once wrote the record under its own pid on heartbeat(), so the parent's
    # shield tripped: "record rewritten by another process".
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, heartbeat=30)))
    ran_in = tmp_path / "callback-ran-in"
    with start_instance(layout, state=state, heartbeat=False) as inst:
        inst.on_release(lambda: ran_in.write_text(str(os.getpid())))
        pid = os.fork()
        if pid == 0:  # the child: what a worker holding the object might call
            code = 0
            try:
                inst.heartbeat()
                inst.set_service_pids({"alpha": os.getpid()})
                inst.write_record()
                inst.release()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not ran_in.exists()  # the parent's callbacks are the parent's
        (info,) = list_instances(layout.app, state)
        assert info.pid == os.getpid()
        assert {s.name: s.pid for s in info.services} == {"alpha": os.getpid(), "beta": os.getpid()}
        assert all(report.ok for report in inst.verify_all()), inst.verify_all()
    assert ran_in.read_text() == str(os.getpid())


def test_a_forked_childs_release_never_waits_for_a_parent_threads_instance_mutex(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    # Forked while the heartbeat thread wrote the record (the instance's mutex held),
    # the child's release() waited for that copied mutex forever; the fix for the
    # lease's own mutex did not reach the instance's.
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, heartbeat=30)))
    with start_instance(layout, state=state, heartbeat=False) as inst:

        def child() -> bool:
            inst.release()
            return True

        # inst._mutex: where write_record (the heartbeat's) holds it
        assert fork_while_held(inst._mutex, child) == 0
        assert all(report.ok for report in inst.verify_all()), inst.verify_all()


def test_start_shield_on_a_released_instance_raises_instead_of_ending_the_process(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    # It used to start a shield over released leases, which tripped at its first check
    # and, by default, ended the whole process with exit code 4.
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, shield=0.05)))
    inst = start_instance(layout, state=state, heartbeat=False)
    inst.release()
    with pytest.raises(NotRunning, match="was released"):
        inst.start_shield(on_lost=lambda lease, reason: None)
    assert inst._shield is None


@pytest.mark.parametrize("parents_shield", [False, True], ids=["parent-unshielded", "shielded"])
def test_start_shield_in_a_forked_child_raises_instead_of_tripping(
    tmp_path: Path, port_base: int, state: StateDir, parents_shield: bool
) -> None:
    # With the parent's shield on (init_instance_manager's default), the child's call
    # saw it and returned quietly, where the README promises NotRunning.
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, shield=0.05)))
    with start_instance(layout, state=state, heartbeat=False) as inst:
        if parents_shield:
            inst.start_shield(on_lost=lambda lease, reason: None)
        pid = os.fork()
        if pid == 0:
            try:
                inst.start_shield()
                code = 3  # a shield runs over locks this child does not hold
            except NotRunning:
                code = 0
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert all(report.ok for report in inst.verify_all())


def test_one_service_name_given_as_a_str_is_that_service(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    # A str is a Sequence[str] to the type checker: "alpha" was read as the services
    # "a", "l", "p", "h", "a" and refused with "services.a: no such service".
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base)))
    with start_instance(layout, services="alpha", state=state, heartbeat=False) as inst:
        assert list(inst.ports) == ["alpha"]


def test_a_heartbeat_leaves_an_instance_record_another_process_wrote_for_the_shield(
    tmp_path: Path, port_base: int, state: StateDir, home: Path
) -> None:
    # heartbeat() rewrote the record from memory: one another process had written over
    # ours was healed before the shield's next check, which then saw nothing wrong.
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base)))
    with start_instance(layout, state=state, heartbeat=False) as inst:
        path = home / "apps" / layout.app / "instances" / f"{inst.number}.json"
        taken = json.loads(path.read_text())
        taken["pid"] = 1
        path.write_text(json.dumps(taken))
        inst.heartbeat()
        inst.set_service_pids({"alpha": os.getpid()})
        assert json.loads(path.read_text())["pid"] == 1
        (report,) = [r for r in inst.verify_all() if r.kind == "instance"]
        assert not report.ok and "rewritten by another process" in report.problems[0]
    assert json.loads(path.read_text())["pid"] == 1  # release erases only its own


def test_an_instance_refuses_pickling_and_copying_with_what_to_pass_instead(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """As a Lease: spawn and forkserver failed with "cannot pickle '_thread.lock'
    object", and copy.copy made a second owner whose release() freed the ports."""
    import copy
    import pickle
    from multiprocessing.reduction import ForkingPickler

    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base)))
    with start_instance(layout, state=state, heartbeat=False) as inst:
        for dumps in (pickle.dumps, ForkingPickler.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match=r"Instance \(testapp 1\) cannot be pickled"):
                dumps(inst)
        assert all(report.ok for report in inst.verify_all())


def test_status_shows_a_service_without_a_port_as_a_dash(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    # A record may name no port for a service (port null, or none): --json said null,
    # text status printed Python's "alpha=None".
    layout = write_layout(tmp_path / "p.toml", port_base)
    assert portpool("run", "--config", str(layout), "--", "true").returncode == 0  # the dirs
    dead = subprocess.Popen(["true"])
    dead.wait()
    t = time.time() - 60
    record = {"v": 1, "pid": dead.pid, "started_at": t, "heartbeat_at": t, "services": [
        {"name": "alpha", "pool": [port_base], "port": None, "pid": None, "state": "ready"},
        {"name": "beta", "pool": [port_base + 10], "pid": None},
    ]}  # fmt: skip
    instances = home / "apps" / "testapp" / "instances"
    (instances / "1.json").write_text(json.dumps(record))
    (instances / "1.lock").touch()
    services = status_json(layout)["instances"][0]["services"]
    assert [(s["name"], s["port"]) for s in services] == [("alpha", None), ("beta", None)]
    text = portpool("status", "--config", str(layout))
    assert text.returncode == 0, text.stderr
    assert "alpha=- (was ready)  beta=-" in text.stdout, text.stdout
    assert "None" not in text.stdout


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_starting_and_releasing_instances_in_a_loop_leaks_no_descriptor(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """start_instance without a state dir opened one (4 directory descriptors) that
    release never closed: a process starting and releasing instances in a loop ran out
    of descriptors ("out of open files") after a few thousand."""
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, max_instances=1)))

    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    start_instance(layout, heartbeat=False).release()  # modules and caches settled
    before = count()
    for _ in range(20):
        start_instance(layout, heartbeat=False).release()
        with start_instance(layout):  # with its heartbeat thread
            pass
        init_instance_manager(layout, shield=False).release()
    held = start_instance(layout, heartbeat=False)
    for _ in range(20):  # a start that fails closes what it opened too
        with pytest.raises(NoFreeSlot):
            start_instance(layout, heartbeat=False)
    held.release()
    assert count() == before


def test_an_instance_outlives_the_with_block_of_its_state_dir(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """Closed under a running instance, the state dir could not be examined: its shield
    tripped (exit 4 by default), and its release left the record to be read as a live
    holder's ("still runs but does not hold 1.lock"). It now stays open until the last
    instance or lease held in it is released, and closes then."""
    layout = load_layout(str(write_layout(tmp_path / "p.toml", port_base, shield=0.05)))
    lost: list[str] = []
    with StateDir.open() as state:
        instance = start_instance(layout, state=state)
        instance.start_shield(on_lost=lambda lease, reason: lost.append(reason))
    time.sleep(0.5)  # ten shield checks
    assert lost == [] and all(report.ok for report in instance.verify_all())
    instance.heartbeat()  # its record can still be written
    instance.release()
    assert state.root is not None and state.root.fd == -1  # closed with the last user
    assert not (home / "apps" / "testapp" / "instances" / "1.json").exists()
    with StateDir.open() as state:
        assert gc(state).problems == []


def test_a_release_interrupted_by_ctrl_c_is_finished_by_the_next_call(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """A KeyboardInterrupt in the middle of release() (here from its first callback)
    left the slot locked and the record in place, and a second release() returned at
    once: the slot stayed taken until the process ended."""
    layout = load_layout(write_layout(tmp_path / "l.toml", port_base))
    instance = start_instance(layout, state=state, heartbeat=False)
    calls: list[str] = []

    def interrupted_once() -> None:
        calls.append("first")
        if len(calls) == 1:
            raise KeyboardInterrupt

    instance.on_release(interrupted_once)
    instance.on_release(lambda: calls.append("second"))
    with pytest.raises(KeyboardInterrupt):
        instance.release()
    instance.release()
    assert calls == ["first", "first", "second"]  # the interrupted one to its end, each once
    assert not (Path(state.path) / "apps" / layout.app / "instances" / "1.json").exists()
    again = start_instance(layout, state=state, number=1, heartbeat=False)  # slot 1 is free
    assert again.ports == instance.ports  # and so are its ports
    again.release()


def test_a_release_in_a_thread_an_on_release_callback_joins_never_deadlocks(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """A worker whose ``finally`` releases the instance, stopped and joined by an
    ``on_release`` callback: a second release() that waited for the first one hung."""
    layout = load_layout(write_layout(tmp_path / "l.toml", port_base))
    instance = start_instance(layout, state=state, heartbeat=False)
    stop = threading.Event()

    def worker() -> None:
        try:
            stop.wait(30)
        finally:
            instance.release()  # while the main thread's release joins this thread

    thread = threading.Thread(target=worker)
    thread.start()
    instance.on_release(lambda: (stop.set(), thread.join(30)))
    done = threading.Thread(target=instance.release, daemon=True)
    done.start()
    done.join(30)
    assert not done.is_alive() and not thread.is_alive()
    start_instance(layout, state=state, number=instance.number, heartbeat=False).release()


# Ctrl-C at a random moment of a start or a release, then release() again, many times.
INTERRUPTED_CYCLES = """
import random, signal, sys, threading, time
import portpool
from portpool.layout import load_layout

layout = load_layout(sys.argv[1])
interrupts = 0
for cycle in range(int(sys.argv[2])):
    instance = None
    timer = threading.Timer(random.uniform(0, 0.004), signal.raise_signal, (signal.SIGINT,))
    try:
        timer.start()
        instance = portpool.start_instance(layout)
        instance.release()
        timer.join()
        time.sleep(0.001)  # a late interrupt lands here, at the latest
    except KeyboardInterrupt:
        interrupts += 1
    timer.join()
    if instance is not None:
        instance.release()  # finishes what an interrupt cut short
    check = portpool.start_instance(layout, number=1, heartbeat=False)
    assert check.number == 1, cycle
    check.release()
print("interrupts", interrupts, flush=True)
"""


def test_ctrl_c_at_random_moments_of_start_and_release_never_keeps_the_slot(
    tmp_path: Path, port_base: int, home: Path
) -> None:
    """A SIGINT within a few ms of start_instance(): after each cycle, with release()
    called again when the instance was returned, slot 1 and its ports are free (a
    start of number 1 takes them). Before, 3 runs of ~40 cycles each kept a slot; a
    check made between taking the slot and returning it kept one in ~1,000."""
    layout = write_layout(tmp_path / "l.toml", port_base)
    script = tmp_path / "cycles.py"
    script.write_text(INTERRUPTED_CYCLES)
    done = subprocess.run(
        [sys.executable, str(script), str(layout), "1000"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    interrupts = int(done.stdout.split()[-1])
    assert interrupts >= 50, done.stdout  # the interrupts did land, in many places


def test_list_instances_given_a_layout_says_to_pass_its_app(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """list_instances(layout) raised "expected string or bytes-like object, got
    'Layout'" from deep in a name check."""
    layout = load_layout(write_layout(tmp_path / "l.toml", port_base))
    with pytest.raises(TypeError, match=r"not a Layout: pass layout\.app"):
        list_instances(layout, state)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="app's name"):
        next(iter_instances(None, state))  # type: ignore[arg-type]


def test_start_instance_given_a_path_or_a_path_for_state_says_what_it_wants(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """start_instance("portpool.toml") and state="/tmp" raised AttributeError ('str'
    object has no attribute 'services') from deep inside."""
    path = write_layout(tmp_path / "l.toml", port_base)
    with pytest.raises(TypeError, match=r"layout must be a Layout \(load_layout\(path\)"):
        start_instance(str(path), state=state)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"state must be a StateDir \(StateDir\.open\(\)\)"):
        start_instance(load_layout(path), state=str(tmp_path))  # type: ignore[arg-type]
    assert list_instances("testapp", state) == []


def test_release_after_a_thread_start_cut_short_frees_everything(
    tmp_path: Path, port_base: int, state: StateDir
) -> None:
    """A Ctrl-C while Thread.start() waited for the heartbeat's or the shield's thread
    left a thread object not started yet; release() then raised RuntimeError ("cannot
    join thread before it is started") before the slot was freed, on every call. The
    state such an interrupt leaves is set up here directly: a thread never started."""
    layout = load_layout(write_layout(tmp_path / "l.toml", port_base))
    instance = start_instance(layout, state=state, heartbeat=False)
    instance._heartbeat_thread = threading.Thread(target=lambda: None)  # never started
    instance.release()
    again = start_instance(layout, state=state, number=instance.number, heartbeat=False)
    assert again.ports == instance.ports
    again.release()
