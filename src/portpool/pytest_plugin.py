"""The pytest plugin: exclusive ports, and an instance per xdist worker, as fixtures.

Registered by the package's ``pytest11`` entry point, so installing portpool is all it
takes. Every fixture is inert until a test asks for it: a suite that never does pays
only for two options and for fixing the state dir's path. The ports come from one range
shared by every test, xdist worker and concurrent pytest run on this host, through
portpool's kernel lock per port, which dies with its holder (a worker killed with
``kill -9`` frees its ports at once).

A probed-and-released port (``unused_tcp_port``, ``portpicker``) is nobody's a moment
later: two workers can be handed the same one, and a port an earlier test's server
closed first sits in TIME_WAIT, refusing a server that does not set ``SO_REUSEADDR``.
Here the port stays locked until the test's teardown, and is only handed out after a
bind without ``SO_REUSEADDR`` on the wildcard address of both families succeeded.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from portpool._pytest_source import _PortSource

if TYPE_CHECKING:  # the rest of portpool is imported when a fixture is first used
    from portpool.instance import Instance
    from portpool.layout import Layout
    from portpool.pool import Lease
    from portpool.statedir import StateDir

DEFAULT_TOP = 29999  # the default range ends here, or below the ephemeral range
DEFAULT_SIZE = 10000
MIN_SIZE = 100  # fewer ports is no range to default to or suggest

_RANGE_HELP = (
    "ports the portpool_port fixtures draw from, LOW-HIGH (default: 20000-29999, "
    "or up to 10000 ports below, else above, this host's ephemeral range)"
)
# How to narrow the ephemeral range back to each OS's default (for the advice).
_NARROW = {
    "linux": "sudo sysctl -w net.ipv4.ip_local_port_range='32768 60999'",
    "darwin": "sudo sysctl -w net.inet.ip.portrange.first=49152",
    "win32": "netsh int ipv4 set dynamicport tcp start=49152 num=16384 (as administrator)",
}
_LAYOUT_HELP = (
    "layout file of portpool_instance (default: portpool.toml in the rootdir, "
    "else portpool's default layout)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("portpool", "exclusive ports for tests (portpool)")
    group.addoption("--portpool-port-range", dest="portpool_port_range", help=_RANGE_HELP)
    group.addoption("--portpool-layout", dest="portpool_layout", help=_LAYOUT_HELP)
    parser.addini("portpool_port_range", _RANGE_HELP)
    parser.addini("portpool_layout", _LAYOUT_HELP)


_source_key = pytest.StashKey["_PortSource"]()
_state_path_key = pytest.StashKey[str]()
_state_key = pytest.StashKey["StateDir"]()
_state_error_key = pytest.StashKey[Exception]()  # why PORTPOOL_HOME was refused
_layout_key = pytest.StashKey["Layout"]()
_WORKER_STATE_PATH = "portpool_state_dir"  # the controller's state dir, in workerinput


class PortpoolWarning(pytest.PytestWarning):
    """A setting of the portpool plugin that works, but not as well as it could."""


def pytest_configure(config: pytest.Config) -> None:
    # The state dir is where exclusivity lives: every process of this run must lock
    # ports in the same one. It is fixed now, from the environment pytest started with
    # (xdist workers take the controller's), never from a test's: one that set
    # XDG_RUNTIME_DIR or PORTPOOL_HOME, or changed directory under a relative
    # PORTPOOL_HOME, before its first port once moved its worker to another state dir,
    # where it was handed a port another worker held. It is opened on first use only.
    workerinput = getattr(config, "workerinput", None)
    path = None if workerinput is None else workerinput.get(_WORKER_STATE_PATH)
    if not path:
        from portpool.errors import StateDirError
        from portpool.statedir import default_path

        try:
            path = default_path()
        except StateDirError as e:  # an empty or relative PORTPOOL_HOME
            # Said by each test that asks for a port: a run that asks for none is not
            # portpool's (it failed every pytest run of the environment, exit 4).
            config.stash[_state_error_key] = e
    if path:
        config.stash[_state_path_key] = os.path.abspath(str(path))
    # A range or layout the user chose is checked now, before any test runs: a typo or
    # an overlap with the ephemeral range is a usage error. The defaults are worked out
    # on first use, so a suite that never asks for a port never fails because of them.
    if _range_setting(config) is not None:
        port_range(config)
    if _layout_setting(config) is not None:
        layout = _load_layout(config)
        config.stash[_layout_key] = layout
        overlap = _layout_overlap(config, layout)
        if overlap and workerinput is None:  # once, by the controller, not by every worker
            config.issue_config_time_warning(PortpoolWarning(overlap), stacklevel=2)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without xdist
def pytest_configure_node(node: Any) -> None:
    # None: the controller's PORTPOOL_HOME was refused; the worker finds it so too.
    node.workerinput[_WORKER_STATE_PATH] = node.config.stash.get(_state_path_key, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_state_key, None)
    if state is not None:
        state.close()
        del config.stash[_state_key]


def _state(config: pytest.Config) -> StateDir:
    """This run's state dir (fixed at configure time), opened on first use. Fails the
    test (see ``_environment_errors``) when portpool refuses it."""
    state = config.stash.get(_state_key, None)
    if state is None:
        from portpool.statedir import StateDir

        with _environment_errors():
            refused = config.stash.get(_state_error_key, None)
            if refused is not None:
                raise refused
            state = StateDir.open(config.stash[_state_path_key])
        config.stash[_state_key] = state
    return state


@contextlib.contextmanager
def _environment_errors() -> Iterator[None]:
    """Turn a state dir portpool refuses, or an OS limit, into one line for the test.

    Both are the environment's fault and the same for every test: each test that asked
    for a port said so under a screenful of traceback through the plugin and statedir.
    """
    from portpool.errors import ResourceLimit, StateDirError

    try:
        yield
    except (StateDirError, ResourceLimit) as e:
        raise pytest.fail.Exception(f"portpool: {e}", pytrace=False) from None


# ---------------------------------------------------------------- the layout


def _layout_setting(config: pytest.Config) -> tuple[str, str, str] | None:
    """``(where, value, base directory)`` of the layout the user chose, or None."""
    given = config.getoption("portpool_layout", None)
    if given:
        return "--portpool-layout", str(given), str(config.invocation_params.dir)
    ini = config.getini("portpool_layout")
    if ini:
        base = config.inipath.parent if config.inipath else config.rootpath
        return "portpool_layout (ini)", str(ini).strip(), str(base)
    return None


def _load_layout(config: pytest.Config) -> Layout:
    """The layout of ``portpool_instance``. Raises pytest.UsageError for a layout the
    user chose that cannot be used; LayoutError for a bad ``portpool.toml`` found by
    default (only when a test asks for the instance)."""
    from portpool.errors import LayoutError
    from portpool.layout import resolve_layout

    setting = _layout_setting(config)
    if setting is None:
        return resolve_layout(None, str(config.rootpath))
    where, value, base = setting
    try:
        return resolve_layout(value, base)
    except LayoutError as e:
        raise pytest.UsageError(f"portpool: {where} = {value!r}: {e}") from e


def _layout_overlap(config: pytest.Config, layout: Layout) -> str | None:
    """A warning if ``layout``'s pools share ports with the port fixtures' range.

    Exclusivity still holds (both take ports through the same locks), so this is a
    warning, not an error: but a test holding such a port blocks that service's pool
    for ``portpool_instance``, which then fails to start in that slot, and many suites
    never use one of the two.
    """
    try:
        low, high = port_range(config)
    except pytest.UsageError:
        return None  # no default range on this host: reported if a port is asked for
    shared = sorted(
        {
            port
            for number in range(1, layout.max_instances + 1)
            for service in layout.services
            for port in service.pool(number)
            if low <= port <= high
        }
    )
    if not shared:
        return None
    few = ", ".join(str(p) for p in shared[:5]) + (", ..." if len(shared) > 5 else "")
    one = len(shared) == 1  # "a test holding one of them" for one port
    return (
        f"portpool: the pools of layout {layout.source} (instances 1-{layout.max_instances})"
        f" share {len(shared)} port{'' if one else 's'} ({few}) with the "
        f"portpool_port range {low}-{high}: a test holding {'it' if one else 'one of them'} "
        "blocks that pool for portpool_instance; move the layout's base ports or set "
        f"--portpool-port-range / portpool_port_range apart from {'it' if one else 'them'}"
    )


# ---------------------------------------------------------------- the range


def _range_setting(config: pytest.Config) -> tuple[str, str] | None:
    given = config.getoption("portpool_port_range", None)
    if given:
        return "--portpool-port-range", str(given)
    ini = config.getini("portpool_port_range")
    if ini:
        return "portpool_port_range (ini)", str(ini).strip()
    return None


def _ephemeral() -> tuple[int, int] | None:
    from portpool._platform import ephemeral_port_range

    return ephemeral_port_range()


def parse_port_range(text: str, where: str = "--portpool-port-range") -> tuple[int, int]:
    """``"20000-29999"`` as ``(20000, 29999)``, checked against this host's ephemeral range.

    Raises pytest.UsageError for a malformed range, one outside 1..65535, or one that
    overlaps the ephemeral range: an outgoing connection of any program may take those
    ports at any moment, which is the flake this plugin exists to remove.
    """
    # ASCII digits only: int() also takes "٢٠٠٠٠", "+20000" and "20_000".
    match = re.fullmatch(r"\s*([0-9]{1,5})\s*(?:-|\.\.)\s*([0-9]{1,5})\s*", text)
    low, high = (int(match[1]), int(match[2])) if match else (0, 0)
    if not 1 <= low <= high <= 65535:
        raise pytest.UsageError(
            f"portpool: {where} = {text!r}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535, "
            "e.g. 20000-29999"
        )
    ephemeral = _ephemeral()
    if ephemeral is not None and low <= ephemeral[1] and ephemeral[0] <= high:
        raise pytest.UsageError(
            f"portpool: {where} = {low}-{high} overlaps this host's ephemeral port range "
            f"{ephemeral[0]}-{ephemeral[1]}: any outgoing connection may take those ports "
            f"while a test holds them; {range_advice(ephemeral)}"
        )
    return low, high


def default_range(ephemeral: tuple[int, int] | None) -> tuple[int, int] | None:
    """The default range beside the ephemeral range ``(first, last)`` (None: unknown):
    20000-29999 where that does not overlap it, else up to 10000 ports ending below it,
    else starting above it, all within
    1024..65535; None when neither side leaves ``MIN_SIZE`` ports. Raises nothing."""
    default = (DEFAULT_TOP - DEFAULT_SIZE + 1, DEFAULT_TOP)
    if ephemeral is None or ephemeral[1] < default[0] or ephemeral[0] > default[1]:
        return default  # a range below 20000 moved it below itself: 1024-4999 for 5000-5100
    end = min(DEFAULT_TOP, ephemeral[0] - 1)
    below = (max(1024, end - DEFAULT_SIZE + 1), end)
    start = max(1024, ephemeral[1] + 1)
    above = (start, min(65535, start + DEFAULT_SIZE - 1))
    for low, high in (below, above):
        if high - low + 1 >= MIN_SIZE:
            return low, high
    return None


def range_advice(ephemeral: tuple[int, int]) -> str:
    """What to do instead of a range that overlaps the ephemeral range ``(first, last)``:
    a range outside it, or, where none is left, how to make room. Raises nothing."""
    room = default_range(ephemeral)
    if room is not None:
        return f"choose a range outside it, e.g. {room[0]}-{room[1]}"
    # A suggestion past 65535 ("65536-65535") was the plugin's answer to 1024-65535.
    privileged = (
        f", or, for tests allowed to bind ports below 1024 (root), choose a range within "
        f"1-{min(1023, ephemeral[0] - 1)}"
        if ephemeral[0] > 1
        else ""
    )
    how = _NARROW.get(sys.platform, "with the OS's settings")
    return (
        f"no {MIN_SIZE} ports within 1024-65535 are outside it; narrow it, e.g. {how}, "
        f"and run pytest again{privileged}"
    )


def port_range(config: pytest.Config) -> tuple[int, int]:
    """The range of this session: the option, the ini value, else ``default_range``.
    Raises pytest.UsageError for a range the user set that is refused, or when no
    default is left beside this host's ephemeral range."""
    __tracebackhide__ = True  # pytest: the error says it all, not this function's code
    setting = _range_setting(config)
    if setting is not None:
        return parse_port_range(setting[1], setting[0])
    ephemeral = _ephemeral()
    room = default_range(ephemeral)
    if room is None:
        assert ephemeral is not None  # an unknown ephemeral range has the default
        raise pytest.UsageError(
            f"portpool: this host's ephemeral port range {ephemeral[0]}-{ephemeral[1]} "
            f"leaves no default range for portpool_port: {range_advice(ephemeral)}"
        )
    return room


def _start_offset(config: pytest.Config, size: int) -> int:
    """Where this process starts in the range: the run's offset plus its worker's share."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # no xdist: a random offset keeps concurrent runs apart
        return int.from_bytes(os.urandom(4), "big") % size
    run = zlib.crc32(str(workerinput.get("testrunuid", "")).encode())
    worker = str(workerinput.get("workerid", "gw0"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(1, int(workerinput.get("workercount", 1)))
    return run % size + index * (size // count)


def _source(config: pytest.Config) -> _PortSource:
    __tracebackhide__ = True
    source = config.stash.get(_source_key, None)
    if source is None:
        low, high = port_range(config)
        start = _start_offset(config, high - low + 1)
        source = _PortSource(low, high, start, lambda: _state(config))
        config.stash[_source_key] = source
    return source


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def portpool_port_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], int]]:
    """``() -> int``: each call a new port, held until this test's teardown.

    Each port is locked for this test alone (across xdist workers and concurrent runs)
    and bindable at hand-over by a server that does not set SO_REUSEADDR. A call raises
    PoolExhausted, naming the holders, when no port of the range is left, and
    pytest.UsageError when this host leaves no default range; it fails the test with one
    line when portpool refuses the state dir or the OS is out of file descriptors.
    """
    __tracebackhide__ = True
    source = _source(request.config)
    leases: list[Lease] = []

    def take() -> int:
        __tracebackhide__ = True  # the error says it all; our frames are noise in a report
        with _environment_errors():
            lease = source.take(free_of_sockets=True)
        leases.append(lease)
        return lease.port

    yield take
    for lease in leases:
        lease.release()


@pytest.fixture
def portpool_port(portpool_port_factory: Callable[[], int]) -> int:
    """A TCP port held for this test alone until its teardown; nothing is bound on it, and
    a server binds it without SO_REUSEADDR (no TIME_WAIT left by an earlier test).
    Raises what a ``portpool_port_factory`` call raises."""
    __tracebackhide__ = True
    return portpool_port_factory()


@pytest.fixture
def portpool_lease(request: pytest.FixtureRequest) -> Iterator[Lease]:
    """A portpool Lease on 127.0.0.1: the lock and the bound, listening socket itself,
    for servers that take a socket (``sock=``, an fd): no window between check and use.
    Raises PoolExhausted when no port of the range is left; fails the test as
    ``portpool_port_factory`` does."""
    __tracebackhide__ = True
    with _environment_errors():
        lease = _source(request.config).take(free_of_sockets=False)
    yield lease
    lease.release()


@pytest.fixture(scope="session")
def portpool_instance(request: pytest.FixtureRequest) -> Iterator[Instance]:
    """An Instance of the project's layout for this session (one per xdist worker: each
    takes its own instance slot), with its services' leases and sockets.

    The layout is ``--portpool-layout``, else the ``portpool_layout`` ini option (relative
    to the ini file; both checked at start-up), else ``portpool.toml`` in the rootdir,
    else the default layout. Raises LayoutError, NoFreeSlot or PoolExhausted; fails the
    tests as ``portpool_port_factory`` does.
    """
    __tracebackhide__ = True
    from portpool.errors import PortPoolError
    from portpool.instance import start_instance

    config = request.config
    try:
        layout = config.stash.get(_layout_key, None)
        if layout is None:
            layout = _load_layout(config)
            overlap = _layout_overlap(config, layout)
            if overlap:  # at the layout file, the cause: it pointed into pytest's own code
                where = layout.source if os.path.isfile(layout.source) else __file__
                warnings.warn_explicit(PortpoolWarning(overlap), PortpoolWarning, where, 1)
        # The slot is start_instance's choice, never pinned here: whatever it does about a
        # slot a foreign program blocks (take the next one) applies to workers too.
        with _environment_errors():
            instance = start_instance(layout, state=_state(config))
    except PortPoolError as e:
        # The error and its words (who holds what): the report printed the source of
        # acquire() and the frames of instance and _slots above them, for every test.
        raise e.with_traceback(None) from None
    yield instance
    instance.release()
