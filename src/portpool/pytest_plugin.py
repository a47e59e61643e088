"""The pytest plugin: exclusive ports, and an instance per xdist worker, as fixtures.

Registered by the package's ``pytest11`` entry point, so installing portpool is all it
takes. Every fixture is inert until a test asks for it: a suite that never does pays
only for two options. The ports come from one range shared by every test, xdist worker
and concurrent pytest run on this host, through portpool's kernel lock per port, which
dies with its holder (a worker killed with ``kill -9`` frees its ports at once).

A probed-and-released port (``unused_tcp_port``, ``portpicker``) is nobody's a moment
later: two workers can be handed the same one, and a port an earlier test's server
closed first sits in TIME_WAIT, refusing a server that does not set ``SO_REUSEADDR``.
Here the port stays locked until the test's teardown, and is only handed out after a
bind without ``SO_REUSEADDR`` on the wildcard address of both families succeeded.
"""

from __future__ import annotations

import errno
import os
import socket
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # portpool itself is imported when a fixture is first used
    from portpool import Instance, Lease, PoolExhausted, Refusal, StateDir

HOST = "127.0.0.1"
DEFAULT_TOP = 29999  # the default range ends here, or below the ephemeral range
DEFAULT_SIZE = 10000
_CHUNK = 16  # ports handed to one acquire() call: its per-call checks cost per port
_SERVICE = "pytest"
_SHOWN_REFUSALS = 12

_RANGE_HELP = (
    "ports the portpool_port fixtures draw from, LOW-HIGH (default: 20000-29999, "
    "or the 10000 ports below this host's ephemeral range)"
)
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


def pytest_configure(config: pytest.Config) -> None:
    # A range the user chose is checked now, before any test runs: a typo or an overlap
    # with the ephemeral range is a usage error. The default is computed on first use, so
    # a suite that never asks for a port never fails because of this plugin.
    if _range_setting(config) is not None:
        port_range(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    source = config.stash.get(_source_key, None)
    if source is not None:
        source.close()


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
    low_text, sep, high_text = text.replace("..", "-").partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        low = high = 0
        sep = ""
    if not sep or not 1 <= low <= high <= 65535:
        raise pytest.UsageError(
            f"portpool: {where} = {text!r}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535, "
            "e.g. 20000-29999"
        )
    ephemeral = _ephemeral()
    if ephemeral is not None and low <= ephemeral[1] and ephemeral[0] <= high:
        raise pytest.UsageError(
            f"portpool: {where} = {low}-{high} overlaps this host's ephemeral port range "
            f"{ephemeral[0]}-{ephemeral[1]}: any outgoing connection may take those ports "
            f"while a test holds them; choose a range outside it, e.g. "
            f"{_suggest(ephemeral)}"
        )
    return low, high


def _suggest(ephemeral: tuple[int, int]) -> str:
    high = min(DEFAULT_TOP, ephemeral[0] - 1)
    low = max(1024, high - DEFAULT_SIZE + 1)
    if high >= low:
        return f"{low}-{high}"
    return f"{ephemeral[1] + 1}-{min(65535, ephemeral[1] + DEFAULT_SIZE)}"


def port_range(config: pytest.Config) -> tuple[int, int]:
    """The range of this session: the option, the ini value, else the default (the 10000
    ports up to 29999, lowered to end below the ephemeral range). Raises pytest.UsageError."""
    setting = _range_setting(config)
    if setting is not None:
        return parse_port_range(setting[1], setting[0])
    ephemeral = _ephemeral()
    high = DEFAULT_TOP if ephemeral is None else min(DEFAULT_TOP, ephemeral[0] - 1)
    low = max(1024, high - DEFAULT_SIZE + 1)
    if high - low < 99:
        raise pytest.UsageError(
            f"portpool: this host's ephemeral port range {ephemeral} leaves no default range "
            "for portpool_port below it: set --portpool-port-range or the "
            "portpool_port_range ini option"
        )
    return low, high


# ---------------------------------------------------------------- handing out ports


def _bindable_without_reuse(port: int) -> OSError | None:
    """None if a server that does not set SO_REUSEADDR can bind ``port`` on any address.

    The kernel refuses such a bind while any socket uses the port: a listener, a
    connection, or a TIME_WAIT left when an earlier test's server closed first. Binding
    the dual-stack wildcard asks about both families and every address at once.
    """
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here: the IPv4 wildcard is the whole question
        try:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((address, port))
            return None
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue
            return e
        finally:
            probe.close()
    return None


class _PortSource:
    """This process's cursor over the shared range, and the state dir it locks ports in.

    Each xdist worker starts at its own share of the range (and each run at its own
    offset), so workers and concurrent runs rarely try the same port; the cursor only
    moves forward, so a port comes back only after the whole range was handed out.
    """

    def __init__(self, low: int, high: int, start: int, state: StateDir | None = None) -> None:
        self.low = low
        self.size = high - low + 1
        self.cursor = start % self.size
        self._state = state  # opened on first use: PORTPOOL_HOME, else the user's

    @property
    def state(self) -> StateDir:
        if self._state is None:
            from portpool import StateDir

            self._state = StateDir.open()
        return self._state

    def close(self) -> None:
        if self._state is not None:
            self._state.close()
            self._state = None

    def _candidates(self, count: int) -> list[int]:
        return [self.low + (self.cursor + i) % self.size for i in range(count)]

    def take(self, *, free_of_sockets: bool) -> Lease:
        """The next port nobody holds, as a Lease with its listening socket.

        With ``free_of_sockets`` the socket is closed (the lock kept) and the port is
        handed out only if a bind without SO_REUSEADDR succeeds. Raises PoolExhausted
        naming every holder when no port of the range is left.
        """
        from portpool import PoolExhausted, Refusal, acquire

        refusals: list[Refusal] = []
        tried = 0
        while tried < self.size:
            chunk = self._candidates(min(_CHUNK, self.size - tried))
            try:
                lease = acquire(self.state, chunk, host=HOST, service=_SERVICE)
            except PoolExhausted as e:
                refusals.extend(e.refusals)
                tried += len(chunk)
                self.cursor = (self.cursor + len(chunk)) % self.size
                continue
            refusals.extend(lease.refusals)
            used = chunk.index(lease.port) + 1
            tried += used
            self.cursor = (self.cursor + used) % self.size
            if not free_of_sockets:
                return lease
            lease.close_socket()
            problem = _bindable_without_reuse(lease.port)
            if problem is None:
                return lease
            lease.release()
            refusals.append(Refusal(lease.port, "in use", _socket_detail(problem)))
        raise self._exhausted(refusals)

    def _exhausted(self, refusals: list[Refusal]) -> PoolExhausted:
        from portpool import PoolExhausted

        high = self.low + self.size - 1
        error = PoolExhausted(range(self.low, high + 1), _named(refusals), _SERVICE)
        held = [r for r in error.refusals if r.reason == "held"]
        others = [r for r in error.refusals if r.reason != "held"]
        lines = [f"  {r}" for r in others[:_SHOWN_REFUSALS]]
        if len(others) > _SHOWN_REFUSALS:
            lines.append(f"  ... and {len(others) - _SHOWN_REFUSALS} more")
        if held:
            lines.append(
                f"  {len(held)} held by other portpool users (tests of this or another run), "
                f"e.g. {held[0]}"
            )
        error.args = (
            f"portpool: no free port in {self.low}-{high} "
            f"({self.size} port{'s' if self.size > 1 else ''}): "
            "widen --portpool-port-range or free the ports below\n" + "\n".join(lines),
        )
        return error


def _socket_detail(error: OSError) -> str:
    return f"a socket still uses it, binding without SO_REUSEADDR: {error.strerror or error}"


def _named(refusals: list[Refusal]) -> list[Refusal]:
    """The refusals, each socket-blocked port described from the kernel's socket table
    (who listens, which connection or TIME_WAIT uses it): only read when all failed."""
    blocked = {r.port for r in refusals if r.reason == "in use"}
    if not blocked:
        return refusals
    import dataclasses

    import psutil

    seen: dict[int, list[str]] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return refusals
    for c in connections:
        if not c.laddr or c.laddr.port not in blocked:
            continue
        who = ""
        if c.pid is not None:
            try:
                who = f" by pid {c.pid} ({psutil.Process(c.pid).name()})"
            except psutil.Error:
                who = f" by pid {c.pid}"
        peer = f" -> {c.raddr.ip}:{c.raddr.port}" if c.raddr else ""
        seen.setdefault(c.laddr.port, []).append(
            f"{c.status} {c.laddr.ip}:{c.laddr.port}{peer}{who}"
        )
    out = []
    for r in refusals:
        sockets = seen.get(r.port)
        if r.reason == "in use" and sockets:
            detail = f"{r.detail}; socket table: {'; '.join(sorted(set(sockets)))}"
            out.append(dataclasses.replace(r, detail=detail))
        else:
            out.append(r)
    return out


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
    source = config.stash.get(_source_key, None)
    if source is None:
        low, high = port_range(config)
        source = _PortSource(low, high, _start_offset(config, high - low + 1))
        config.stash[_source_key] = source
    return source


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def portpool_port_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], int]]:
    """``() -> int``: each call a new port, held until this test's teardown.

    Each port is locked for this test alone (across xdist workers and concurrent runs)
    and bindable at hand-over by a server that does not set SO_REUSEADDR.
    """
    source = _source(request.config)
    leases: list[Lease] = []

    def take() -> int:
        lease = source.take(free_of_sockets=True)
        leases.append(lease)
        return lease.port

    yield take
    for lease in leases:
        lease.release()


@pytest.fixture
def portpool_port(portpool_port_factory: Callable[[], int]) -> int:
    """A TCP port held for this test alone until its teardown; nothing is bound on it, and
    a server binds it without SO_REUSEADDR (no TIME_WAIT left by an earlier test)."""
    return portpool_port_factory()


@pytest.fixture
def portpool_lease(request: pytest.FixtureRequest) -> Iterator[Lease]:
    """A portpool Lease on 127.0.0.1: the lock and the bound, listening socket itself,
    for servers that take a socket (``sock=``, an fd): no window between check and use."""
    lease = _source(request.config).take(free_of_sockets=False)
    yield lease
    lease.release()


@pytest.fixture(scope="session")
def portpool_instance(request: pytest.FixtureRequest) -> Iterator[Instance]:
    """An Instance of the project's layout for this session (one per xdist worker: each
    takes its own instance slot), with its services' leases and sockets.

    The layout is ``--portpool-layout``, else the ``portpool_layout`` ini option (relative
    to the ini file), else ``portpool.toml`` in the rootdir, else the default layout.
    Raises LayoutError, NoFreeSlot or PoolExhausted.
    """
    from portpool import resolve_layout, start_instance

    config = request.config
    given = config.getoption("portpool_layout", None)
    if given:
        layout = resolve_layout(str(given), str(config.invocation_params.dir))
    elif config.getini("portpool_layout"):
        base = config.inipath.parent if config.inipath else config.rootpath
        layout = resolve_layout(str(config.getini("portpool_layout")), str(base))
    else:
        layout = resolve_layout(None, str(config.rootpath))
    instance = start_instance(layout)
    yield instance
    instance.release()
