"""Fixtures shared by every test: a private PORTPOOL_HOME, free port blocks, and module
state reset between tests. ``find_free_block`` (from ``benchmarks._common``) is
re-exported here for the tests that import it from this module."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks._common import find_free_block

from portpool import _addresses, _compat, _heldlock, layout
from portpool.integrations import fds
from portpool.pool import Lease, acquire
from portpool.statedir import StateDir

# A test run started as a background job of a non-interactive shell (`make test &` in a
# script) inherits SIGINT and SIGQUIT ignored, and every program it starts would too:
# the Ctrl-C tests would then test "a signal the caller ignored stays ignored" instead.
# Give the run what a terminal's shell gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if hasattr(signal, "SIGQUIT") and signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

# Caches of host facts and pure functions: cleared after every test, so no test sees a
# value an earlier one computed under other conditions (another PORTPOOL_HOME, a
# monkeypatched environment).
_CACHES = (
    layout.default_layout,
    _addresses.has_ipv6_loopback,
    _addresses.bind_targets,
    _addresses.covered_scopes,
    _addresses.parse_address,
)


@pytest.fixture(autouse=True)
def _reset_module_state() -> Iterator[None]:
    """Give every test the module-level state it would have in a fresh process.

    What a test leaves behind is undone after it: locks still in this process's registry
    (released, or the next test to take that port would fail as AlreadyHeldHere), the
    instance ``init_instance_manager`` started, the LISTEN_FDS sockets taken, and the
    caches. What existed before the test (a module-scoped fixture's instance) is kept.
    """
    held_before = set(_heldlock._held)
    current_before = _compat._current
    received_before = fds._received
    yield
    for key, lock in list(_heldlock._held.items()):
        if key not in held_before:
            lock.release()
    if _compat._current is not current_before:
        leaked = _compat._current
        if leaked is not None and not leaked._released:
            leaked.release()
        _compat._current = current_before
    fds._received = received_before
    for cache in _CACHES:
        cache.cache_clear()


@pytest.fixture(autouse=True)
def _private_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private PORTPOOL_HOME for a test that names none (nor a module's fixture).

    Without it, a test that asked for no ``home`` used this user's state dir, shared with
    the other xdist worker: its instance of "testapp" took slot 2 there, not 1.
    """
    if "PORTPOOL_HOME" not in os.environ:
        path = tmp_path_factory.mktemp("home") / "state"
        monkeypatch.setenv("PORTPOOL_HOME", str(path))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state dir path, exported as PORTPOOL_HOME for this test and its children."""
    path = tmp_path / "state"
    monkeypatch.setenv("PORTPOOL_HOME", str(path))
    return path


@pytest.fixture
def state(home: Path) -> Iterator[StateDir]:
    """The opened state dir of ``home``."""
    opened = StateDir.open(str(home))
    yield opened
    opened.close()


@pytest.fixture
def port_base() -> int:
    """The first of 20 consecutive free loopback ports, for this test's pools."""
    return find_free_block()


@pytest.fixture
def lease(state: StateDir, port_base: int) -> Iterator[Lease]:
    """Three loopback ports from ``port_base`` held for service web, released after."""
    with acquire(state, [port_base, port_base + 1, port_base + 2], service="web") as held:
        yield held


@pytest.fixture
def python() -> str:
    return sys.executable
