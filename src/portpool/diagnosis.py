"""One port's diagnosis for a host: what occupies it, and whether ``acquire`` gets it.

The pool's refusals and ``doctor`` judge a port through this module, so they never
disagree (they did: ``doctor`` called a port free that ``run`` refused). It answers:

- which TCP sockets use the port on an address the host's lease covers: listening, only
  bound, connected with the port as local port, in TIME_WAIT (``_addresses.occupies``);
  with ``IPV6_V6ONLY`` and the pids and program names where the OS tells (``_occupants``);
- whether our own bind would succeed (the kernel's word: a probe bind, as ``acquire``
  does, since whether a connection's socket blocks a bind depends on its SO_REUSEADDR,
  which no table shows), and whether a server that does not set SO_REUSEADDR would.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

from portpool._addresses import (
    DEFAULT_BACKLOG,
    bind_all,
    bound_wider,
    check_port,
    covered_scopes,
    meets,
)
from portpool._dataclass import dataclass, field
from portpool._occupants import (
    BOUND_WIDER,
    Occupant,
    occupants_text,
    plain_bind_note,
    with_owners,
)
from portpool._platform import SocketOwners, TcpSocket, tcp_sockets
from portpool.errors import Refusal
from portpool.layout import normalize_host

if TYPE_CHECKING:
    from portpool.statedir import StateDir


@dataclass(frozen=True)
class PortDiagnosis:
    """What occupies ``port`` for ``host``.

    ``occupants``: the sockets on an address the host covers. ``bind_error``: the errno
    our bind got (None: it would succeed, or was not tried). ``plain_bind_blocked``: a
    server that does not set SO_REUSEADDR could not bind it now (TIME_WAIT), None if
    not probed.
    """

    port: int
    host: str
    occupants: tuple[Occupant, ...] = ()
    bind_error: int | None = None
    bind_message: str = ""
    plain_bind_blocked: bool | None = None
    probed: bool = field(default=False, compare=False)
    # The occupants are connections on no covered address, named because the kernel
    # refused a bind (ours, or the plain one) and no socket on a covered address is
    # listed (``_addresses.bound_wider``).
    inferred: bool = False
    # Who holds the port's portpool lock (as ``status`` words it); then never probed.
    held: str | None = None

    @property
    def bindable(self) -> bool:
        """Whether ``acquire``'s bind would succeed (no ``bind_error``, no portpool lock
        held on it). Raises nothing."""
        return self.bind_error is None and self.held is None

    def describe_occupants(self) -> str:
        """The occupants' ``describe()``, listeners first, joined by "; ", the first few
        named and the rest counted (``_occupants.occupants_text``); a placeholder when the
        OS names none. Raises nothing."""
        if not self.occupants:
            return "a process the OS does not name"
        return occupants_text(self.occupants)

    def refusal(self) -> Refusal | None:
        """Why ``acquire`` refuses the port, or None if it can have it. Its text is the
        same whether the pool met the error itself or ``doctor`` probed for it.
        Raises nothing."""
        err, port, host = self.bind_error, self.port, self.host
        if self.held is not None:
            return Refusal(port, "held", self.held)
        if err is None:
            return None
        if err == errno.EADDRINUSE:
            detail = f"used by {self.describe_occupants()}"
            return Refusal(port, "in use", detail + (BOUND_WIDER if self.inferred else ""))
        if err in (errno.EACCES, errno.EPERM):
            return Refusal(port, "permission denied", f"binding {host}:{port}: {self.bind_message}")
        if err == errno.EADDRNOTAVAIL:
            return Refusal(port, "unavailable", f"{host} is not an address of this host")
        if err == errno.EAFNOSUPPORT:
            # A kernel without IPv6 (ipv6.disable=1): no port, no slot does better.
            return Refusal(port, "unavailable", f"{host}: this host has no IPv6")
        return Refusal(port, "error", f"binding {host}:{port}: {self.bind_message}")

    def notes(self) -> list[str]:
        """What a free port still has on it that a user may trip over: a list of lines,
        empty for a port that is not bindable. Raises nothing."""
        if not self.bindable:
            return []
        if not self.plain_bind_blocked:
            return []
        return [plain_bind_note(self.occupants, inferred=self.inferred)]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: port (int), host, ``bindable``, the refusal's text (or None),
        ``plain_bind_blocked`` and the ``occupants`` (dicts). Raises nothing."""
        refusal = self.refusal()
        return {
            "port": self.port,
            "host": self.host,
            "bindable": self.bindable,
            "refusal": None if refusal is None else str(refusal),
            "plain_bind_blocked": self.plain_bind_blocked,
            "occupants": [o.to_dict() for o in self.occupants],
            "inferred": self.inferred,
            "held": self.held,
        }


def _probe(host: str, port: int, *, reuse: bool) -> OSError | None:
    try:
        for sock in bind_all(host, port, DEFAULT_BACKLOG, reuse=reuse):
            sock.close()
    except OSError as e:
        return e
    return None


def diagnose(port: int, host: str, *, state: StateDir | None = None) -> PortDiagnosis:
    """What occupies ``port`` for a lease on ``host``, and who, as ``doctor`` says it:
    the sockets on it, and whether ``acquire`` would get it (``bindable``).

    A port whose portpool lock is held in ``state`` (default: the state dir
    ``PORTPOOL_HOME`` names, never created here) is ``held`` and never probed: the
    probe's bind for a moment made the holder's own bind of its port fail (a test
    server starting on a ``portpool_port``). Else the port is bound for a moment
    exactly as ``acquire`` would, and once more without SO_REUSEADDR.
    Raises InvalidPort (a ValueError) for a value that is not a port, TypeError for a
    ``host`` that is not a str, OSError if ``host`` does not resolve, StateDirError for
    an unusable state dir.
    """
    check_port(port)
    if not isinstance(host, str):  # None raised AttributeError from deep in the names
        raise TypeError(f"host must be a str (an IP address or a name), not {host!r}")
    from portpool._portstatus import inspect_port
    from portpool.statedir import StateDir

    opened = state or StateDir.open(create=False)
    try:
        seen = inspect_port(opened, port)
    finally:
        if state is None:
            opened.close()
    if not seen.is_free:
        found = diagnose_port(port, host, probe=False)
        return dataclasses.replace(found, held=seen.describe())
    return diagnose_port(port, host)


def diagnose_port(
    port: int,
    host: str,
    *,
    bind_error: OSError | None = None,
    probe: bool = True,
    sockets: Sequence[TcpSocket] | None = None,
    owners: SocketOwners | None = None,
) -> PortDiagnosis:
    """``diagnose`` without asking about portpool's lock: for the pool (a refused bind)
    and ``doctor``, which know whether it is held.

    ``bind_error``: the error a real bind just got (the pool's case: no probe then).
    Otherwise ``probe`` binds the port for a moment exactly as ``acquire`` would, and
    once more without SO_REUSEADDR, then closes it (never while a portpool lock holds
    the port: the caller checks). ``sockets``: one ``tcp_sockets()`` read to reuse for
    many ports; ``owners``: one ``SocketOwners`` (who has each socket open) likewise.
    Raises InvalidPort (a ValueError) for a value that is not a port, as ``acquire``
    does (port 0 read as free: the probe bound a random port), OSError if ``host``
    does not resolve.
    """
    check_port(port)
    host = normalize_host(host)
    # Resolved once, first: an unresolvable name raised only when a socket used the port.
    covered = covered_scopes(host)
    seen = tcp_sockets(port) if sockets is None else [s for s in sockets if s.port == port]
    scan = owners or SocketOwners()
    occupants = tuple(with_owners((s for s in seen if meets(s, covered)), scan))
    plain_blocked = None
    if bind_error is None and probe:
        bind_error = _probe(host, port, reuse=True)
        if bind_error is None:
            plain_blocked = _probe(host, port, reuse=False) is not None
    # Refused, with no socket on a covered address to name (the plain bind: no
    # connection or TIME_WAIT there): the one the table lists by another address.
    # doctor's note read "a socket the OS does not list" for the one it lists.
    inferred = False
    refused = bind_error.errno == errno.EADDRINUSE if bind_error is not None else plain_blocked
    named = occupants if bind_error is not None else [o for o in occupants if not o.listening]
    if refused and not named:
        wider = tuple(with_owners((s for s in seen if bound_wider(s, covered)), scan))
        occupants, inferred = occupants + wider, bool(wider)
    if bind_error is None:
        return PortDiagnosis(port, host, occupants, None, "", plain_blocked, probe, inferred)
    message = bind_error.strerror or str(bind_error)
    return PortDiagnosis(
        port, host, occupants, bind_error.errno, message, plain_blocked, probe, inferred
    )
