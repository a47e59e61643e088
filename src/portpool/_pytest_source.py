"""The port source of the pytest plugin: one process's cursor over the shared range.

Kept apart from ``pytest_plugin`` (the hooks and fixtures) so each stays small; it
imports the rest of portpool only when a port is asked for, as the plugin does.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portpool._platform import SocketOwners, TcpSocket
    from portpool.errors import PoolExhausted, Refusal
    from portpool.pool import Lease
    from portpool.statedir import StateDir

HOST = "127.0.0.1"
_CHUNK = 16  # ports handed to one acquire() call: its per-call checks cost per port
_SERVICE = "pytest"
_SHOWN_REFUSALS = 12


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

    def __init__(
        self, low: int, high: int, start: int, state: StateDir | Callable[[], StateDir]
    ) -> None:
        self.low = low
        self.size = high - low + 1
        self.cursor = start % self.size
        self._state = state  # a StateDir this source owns, or how to get the run's

    @property
    def state(self) -> StateDir:
        return self._state() if callable(self._state) else self._state

    def close(self) -> None:
        """Close the state dir if it was handed over (not the run's, which
        pytest_unconfigure closes)."""
        if not callable(self._state):
            self._state.close()

    def _candidates(self, count: int) -> list[int]:
        return [self.low + (self.cursor + i) % self.size for i in range(count)]

    def take(self, *, free_of_sockets: bool) -> Lease:
        """The next port nobody holds, as a Lease with its listening socket.

        With ``free_of_sockets`` the socket is closed (the lock kept) and the port is
        handed out only if a bind without SO_REUSEADDR succeeds. Raises PoolExhausted
        naming every holder when no port of the range is left.
        """
        __tracebackhide__ = True  # pytest: report the error, not this function's code
        from portpool.errors import PoolExhausted, Refusal
        from portpool.pool import acquire

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
        from portpool.errors import PoolExhausted

        high = self.low + self.size - 1
        mine, held, others = _diagnosed(self.state, sorted({r.port for r in refusals}))
        error = PoolExhausted(range(self.low, high + 1), others + held + mine, _SERVICE)
        lines = [f"  {r}" for r in others[:_SHOWN_REFUSALS]]
        if len(others) > _SHOWN_REFUSALS:
            lines.append(f"  ... and {len(others) - _SHOWN_REFUSALS} more")
        if mine:
            lines.append(
                f"  {len(mine)} held by this test process itself (pid {os.getpid()}: "
                f"tests of this run still holding {'it' if len(mine) == 1 else 'them'}), "
                f"e.g. port {mine[0].port}"
            )
        if held:
            lines.append(
                f"  {len(held)} held by other portpool users (other xdist workers or pytest "
                f"runs, other programs), e.g. {held[0]}"
            )
        error.args = (
            f"portpool: no free port in {self.low}-{high} "
            f"({self.size} port{'s' if self.size > 1 else ''}): "
            "widen --portpool-port-range or free the ports below\n" + "\n".join(lines),
        )
        return error


def _socket_detail(error: OSError) -> str:
    return f"a socket still uses it, binding without SO_REUSEADDR: {error.strerror or error}"


def _diagnosed(
    state: StateDir, ports: list[int]
) -> tuple[list[Refusal], list[Refusal], list[Refusal]]:
    """Each refused port as the rest of portpool describes it (``doctor``, ``acquire``):
    ``(held by this process, held by other portpool users, the rest)``. Read only when
    the whole range failed: one read of the lock and socket tables for all."""
    from portpool._doctor import classify_port
    from portpool._platform import SocketOwners, locked_inodes, tcp_sockets
    from portpool._portstatus import inspect_port
    from portpool.errors import Refusal

    locked = locked_inodes()
    sockets = tcp_sockets()
    owners = SocketOwners()  # who has each socket open: one scan for every port
    mine: list[Refusal] = []
    held: list[Refusal] = []
    others: list[Refusal] = []
    for port in ports:
        seen = inspect_port(state, port, locked)
        if seen.record is not None and seen.record.pid == os.getpid():
            mine.append(Refusal(port, "held", seen.describe()))
            continue
        refusal, notes, _ = classify_port(
            state, port, HOST, locked=locked, sockets=sockets, owners=owners
        )
        if refusal is not None:
            (held if refusal.reason == "held" else others).append(refusal)
        elif notes:  # free for portpool's own bind, not for a server without SO_REUSEADDR
            others.append(Refusal(port, "in use", "; ".join(notes)))
        else:
            others.append(_on_other_addresses(port, sockets, owners))
    return mine, held, others


def _on_other_addresses(port: int, sockets: list[TcpSocket], owners: SocketOwners) -> Refusal:
    """Why a port free on 127.0.0.1 was refused: the hand-over check binds the wildcard
    of both families, which a socket on another address (``::1``, a LAN address) blocks."""
    from portpool.diagnosis import diagnose_port
    from portpool.errors import Refusal

    try:
        found = diagnose_port(port, "::", sockets=sockets, owners=owners)
    except OSError:  # no IPv6 here
        found = None
    if found is not None:
        refusal = found.refusal()
        if refusal is not None:
            return refusal
        if found.notes():
            return Refusal(port, "in use", "; ".join(found.notes()))
    return Refusal(port, "free now", "it was freed while this test looked for a port")
