"""The exception tree: one base, context as attributes, messages that say what to do."""

from __future__ import annotations
import __future__

import inspect
import types
import typing

import pytest

import portpool
from portpool import errors
from portpool._portstatus import PortStatus
from portpool._record import PortRecord
from portpool.errors import (
    AlreadyHeldHere,
    LayoutError,
    LockError,
    LockHeld,
    NoFreeSlot,
    PassedSocketError,
    PoolExhausted,
    PortPoolError,
    Refusal,
    ServiceExited,
    ShieldTripped,
    SlotHolder,
    StartError,
    StateDirError,
)

EXCEPTIONS = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
]


def test_every_error_is_a_portpool_error_and_drawn_in_the_tree():
    assert len(EXCEPTIONS) >= 12
    doc = errors.__doc__ or ""
    for cls in EXCEPTIONS:
        assert issubclass(cls, PortPoolError)
        assert cls.__name__ in doc, f"{cls.__name__} missing from the tree in errors.py"
        assert cls.__doc__


def test_every_error_is_exported():
    for cls in EXCEPTIONS:
        assert getattr(portpool, cls.__name__) is cls
        assert cls.__name__ in portpool.__all__


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StateDirError("/s", "bad"), 1),
        (PoolExhausted([1], []), 3),
        (NoFreeSlot("app", []), 3),
        (ShieldTripped("lost"), 4),
        (ServiceExited("api", 2), 5),
    ],
)
def test_exit_codes(error: PortPoolError, code: int):
    assert error.exit_code == code


def test_state_dir_error_names_path_and_problem():
    e = StateDirError("/run/x", "is a symbolic link")
    assert (e.path, e.problem) == ("/run/x", "is a symbolic link")
    assert str(e) == "state dir /run/x: is a symbolic link"


def test_layout_error_keeps_every_problem():
    single = LayoutError("f.toml", "services.api.base", "must be a port")
    assert single.errors == ["f.toml: services.api.base: must be a port"]
    many = LayoutError("f.toml", "x", "y", errors=["one", "two"])
    assert str(many) == "one\ntwo"


def test_lock_errors():
    record = PortRecord(1, 7, "token", "boot", "app", 1, "api", "127.0.0.1", 0.0, 0.0)
    status = PortStatus(1, "held", record)
    held = LockHeld("/s/ports/1.lock", status)
    assert isinstance(held, LockError)
    assert (held.path, held.holder) == ("/s/ports/1.lock", status)
    # The holder in words, never its repr
    assert str(held) == f"/s/ports/1.lock is {status.describe()}"
    assert "pid 7" in str(held) and "PortStatus" not in str(held)
    assert str(LockHeld("/p")) == "/p is held by another process"
    # Gone by the time it was looked at: the lock was still held a moment before.
    assert str(LockHeld("/p", PortStatus(1, "free"))) == "/p is held by another process"
    here = AlreadyHeldHere("/p")
    assert isinstance(here, LockError)
    assert "release it first" in str(here)


def test_refusal_reasons_are_the_strings_status_json_and_the_dashboard_show():
    assert typing.get_args(errors.RefusalReason) == (
        "held",
        "in use",
        "permission denied",
        "unavailable",
        "error",
        "free now",
    )
    assert typing.get_type_hints(Refusal)["reason"] == errors.RefusalReason


def test_pool_exhausted_carries_refusals_in_pool_order():
    refusals = [
        Refusal(6000, "held", "instance 1 of app (pid 5, service api)"),
        Refusal(6001, "in use", "used by a foreign process: pid 9 (nginx) on 0.0.0.0"),
    ]
    e = PoolExhausted((6000, 6001), refusals, service="api")
    assert isinstance(e, StartError)
    assert e.pool == [6000, 6001]
    assert e.refusals == refusals
    assert e.service == "api"
    text = str(e)
    assert text.startswith("service 'api': no free port in pool [6000, 6001]")
    assert "port 6001: in use (used by a foreign process: pid 9 (nginx) on 0.0.0.0)" in text
    assert str(refusals[0]) == "port 6000: held (instance 1 of app (pid 5, service api))"


def test_no_free_slot_lists_holders():
    holders = [SlotHolder(1, 10, "pid 10, alive"), SlotHolder(2, None, "record unreadable")]
    e = NoFreeSlot("app", holders)
    assert e.holders == holders
    assert "all 2 are held" in str(e)
    assert "instance 2: record unreadable" in str(e)


def test_other_errors_carry_context():
    tripped = ShieldTripped("port 6000 taken", port=6000)
    assert (tripped.reason, tripped.port) == ("port 6000 taken", 6000)
    exited = ServiceExited("api", 3)
    assert (exited.service, exited.returncode) == ("api", 3)
    passed = PassedSocketError("LISTEN_PID is not ours")
    assert passed.problem == "LISTEN_PID is not ours"


def test_public_api_is_exported_sorted_and_complete():
    names = portpool.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(portpool, name) is not None
    # Every error class and the main entry points are reachable from the package.
    for cls in EXCEPTIONS:
        assert cls.__name__ in names, f"portpool does not export {cls.__name__}"
    for name in ("acquire", "start_instance", "init_instance_manager", "get_service_port_pool"):
        assert name in names


def test_all_is_sorted_and_exactly_the_public_names():
    """httpx's rule: ``__all__`` is sorted and equals the package's public names."""
    for name in portpool.__all__:
        getattr(portpool, name)  # a lazily imported name appears once asked for
    public = {
        name
        for name, value in vars(portpool).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and value is not __future__.annotations
    }
    assert portpool.__all__ == sorted(portpool.__all__)
    assert set(portpool.__all__) - {"__version__"} == public


def test_internals_are_not_exported_and_received_types_are():
    for name in ("PortLock", "PortRecord", "PortStatus", "inspect_port", "bind_listen"):
        assert name not in portpool.__all__
        assert not hasattr(portpool, name)
    # Types a user receives from an exported call are exported too.
    for name in ("InstanceInfo", "ServiceInfo", "GcReport", "LeaseReport", "DoctorReport"):
        assert name in portpool.__all__


def test_no_free_slot_of_one_slot_says_its_only_slot_and_why():
    e = NoFreeSlot("app", [SlotHolder(1, 10, "pid 10")], limit="max_instances = 1 in the layout")
    assert "(its only slot is held; max_instances = 1 in the layout)" in str(e)
    assert e.limit == "max_instances = 1 in the layout"


def _one_of_each() -> list[PortPoolError]:
    """An instance of every error class, built as the code that raises it builds it."""
    held = PortStatus(7000, "free")
    samples: list[PortPoolError] = [
        PortPoolError("plain"),
        StateDirError("/s", "bad"),
        LayoutError("f.toml", "services.a.base", "must be a port"),
        errors.LayoutFileError("f.toml", "is a FIFO, not a regular file"),
        errors.UnknownService("f.toml", "services.x", "no such service 'x'"),
        errors.ResourceLimit("open files", 10, 20, "raise the limit"),
        LockError("lost"),
        LockHeld("/s/ports/7000.lock", held),
        AlreadyHeldHere("/s/ports/7000.lock"),
        StartError("cannot start"),
        PoolExhausted([7000, 7001], [Refusal(7000, "held", "by pid 1")], "api"),
        NoFreeSlot("app", [SlotHolder(1, 10, "a reason")]),
        ShieldTripped("port 7000 lost", 7000, lingering=["port 7000 ..."]),
        ServiceExited("api", -9, reason="gave-up"),
        errors.CommandNotFound("prog", "'prog' was not found on PATH"),
        PassedSocketError("fd 3 is not a socket"),
        errors.UsageError("bad usage"),
        errors.InvalidPort(0),
        errors.InvalidArgument("host", "", "cannot be resolved"),
        errors.NotRunning("app", "not running", [1, 2]),
        errors.SlotUnavailable("app", 1, "it runs"),
        errors.StopFailed.of([errors.StopFailed(1, "timed out"), errors.StopFailed(2, "no")]),
        errors.DetachFailed(-9, "/s/logs/1.log", "the tail"),
        errors.Interrupted(2),
    ]
    return samples


def test_every_error_pickles_and_copies_as_it_is():
    """Their __init__ takes other arguments than their message: pickling (what
    multiprocessing does with a worker's exception) and copy.copy raised TypeError for
    most, and InvalidPort, ShieldTripped, LockHeld and AlreadyHeldHere came back with
    their message doubled ("shield tripped: shield tripped: ...")."""
    import copy
    import pickle

    samples = _one_of_each()
    assert {type(e) for e in samples} == set(EXCEPTIONS)  # a new class needs a sample
    for error in samples:
        for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(again) is type(error)
            assert (str(again), again.args, again.exit_code) == (
                str(error),
                error.args,
                error.exit_code,
            ), error
            assert vars(again).keys() == vars(error).keys(), error


def _exhausted_in_a_worker(home: str, port: int) -> None:
    import os

    from portpool.pool import acquire
    from portpool.statedir import StateDir

    os.environ["PORTPOOL_HOME"] = home
    with StateDir.open() as state, acquire(state, [port]):
        acquire(state, [port], service="api")  # held by this very process: refused


def test_an_error_raised_in_a_multiprocessing_worker_reaches_the_parent(tmp_path, port_base):
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(_exhausted_in_a_worker, str(tmp_path / "state"), port_base)
        with pytest.raises(PoolExhausted) as info:
            future.result(timeout=60)  # was BrokenProcessPool
    assert info.value.exit_code == 3 and info.value.service == "api"
    assert [(r.port, r.reason) for r in info.value.refusals] == [(port_base, "held")]
