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
from typing import TYPE_CHECKING, NamedTuple

from portpool._addresses import (
    DEFAULT_BACKLOG,
    bind_all,
    bound_wider,
    check_port,
    covered_scopes,
    endpoint,
    meets,
    occupies,
)
from portpool._dataclass import dataclass, field
from portpool._occupants import (
    BOUND_WIDER,
    Occupant,
    Owner,
    foreign_listeners,
    intruder_note,
    occupants_text,
    plain_bind_note,
    with_owners,
)
from portpool._platform import (
    LockTable,
    SocketOwners,
    TcpSocket,
    is_alive,
    locked_inodes,
    tcp_sockets,
)
from portpool._portstatus import PortStatus, inspect_port, instance_processes, lock_holder
from portpool._record import PortRecord
from portpool.errors import Refusal, StateDirError
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
    # What else listens where a user may trip over it, in doctor's words: a foreign
    # listener on a held port (its shield stops the instance), a listener on the other
    # loopback the host does not cover (``diagnose`` only; the pool leaves it empty).
    listener_notes: tuple[str, ...] = ()

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
            why = f"binding {endpoint(host, port)}: {self.bind_message}"
            return Refusal(port, "permission denied", why)
        if err == errno.EADDRNOTAVAIL:
            return Refusal(port, "unavailable", f"{host} is not an address of this host")
        if err == errno.EAFNOSUPPORT:
            # A kernel without IPv6 (ipv6.disable=1): no port, no slot does better.
            return Refusal(port, "unavailable", f"{host}: this host has no IPv6")
        return Refusal(port, "error", f"binding {endpoint(host, port)}: {self.bind_message}")

    def notes(self) -> list[str]:
        """What the port still has on it that a user may trip over, as ``doctor`` says
        it: a list of lines (a plain bind kept off a free port, ``listener_notes``).
        Raises nothing."""
        plain = self.bindable and self.plain_bind_blocked
        note = [plain_bind_note(self.occupants, inferred=self.inferred)] if plain else []
        return note + list(self.listener_notes)

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


def probe_bind(host: str, port: int, *, reuse: bool) -> OSError | None:
    """The error a bind of ``port`` on every address ``host`` covers gets now, as
    ``acquire`` binds (``reuse``: with SO_REUSEADDR) or as a plain server does; None
    when every bind worked (each socket closed at once). ``host``: an IP address or
    name, in any spelling. Raises nothing: a name that does not resolve is its OSError."""
    try:
        for sock in bind_all(normalize_host(host), port, DEFAULT_BACKLOG, reuse=reuse):
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
    exactly as ``acquire`` would, and once more without SO_REUSEADDR. ``notes()`` are
    doctor's notes of the port: a plain bind kept off it, a foreign listener its
    holder's shield stops the instance for, a listener on the other loopback.
    Raises InvalidPort (a ValueError) for a value that is not a port, TypeError for a
    ``host`` that is not a str, OSError if ``host`` does not resolve, StateDirError for
    an unusable state dir.
    """
    check_port(port)
    if not isinstance(host, str):  # None raised AttributeError from deep in the names
        raise TypeError(f"host must be a str (an IP address or a name), not {host!r}")
    from portpool.statedir import StateDir

    opened = state or StateDir.open(create=False)
    try:
        locked = locked_inodes()
        seen = inspect_port(opened, port, locked)
        holder = None if seen.is_free else port_holder(opened, seen, host, locked)
    finally:
        if state is None:
            opened.close()
    sockets, owners = tcp_sockets(port), SocketOwners()  # one read of each for all below
    elsewhere = elsewhere_notes(port, host, sockets, holder)
    if holder is None:
        found = diagnose_port(port, host, sockets=sockets, owners=owners)
        return dataclasses.replace(found, listener_notes=elsewhere)
    # doctor's notes of a held port: they were left out here (README: diagnose is doctor).
    found = diagnose_port(port, host, probe=False, sockets=sockets, owners=owners)
    judged = (
        found  # by the holder's host, as its shield judges: most often the caller's
        if normalize_host(holder.host) == found.host
        else diagnose_port(port, holder.host, probe=False, sockets=sockets, owners=owners)
    )
    notes = intruder_notes(judged.occupants, holder) + elsewhere
    return dataclasses.replace(found, held=seen.describe(), listener_notes=notes)


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
        bind_error = probe_bind(host, port, reuse=True)
        if bind_error is None:
            plain_blocked = probe_bind(host, port, reuse=False) is not None
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


class PortHolder(NamedTuple):
    """The host a held port's lease covers, and whose listeners count as its holder's
    own (``owner``, as its shield counts them; None when the holder is unknown)."""

    host: str
    owner: Owner | None = None


def intruder_notes(occupants: Sequence[Occupant], holder: PortHolder) -> tuple[str, ...]:
    """One note per listener among ``occupants`` (of a held port, by the host its lease
    covers) that is not its ``holder``'s: the shield's rule. Raises nothing."""
    return tuple(intruder_note(o) for o in foreign_listeners(occupants, holder.owner))


def _owner(state: StateDir, record: PortRecord) -> Owner:
    """The live holder of ``record`` and its instance's processes (``Owner``), with the
    marks its shield judges orphans by, as its record gives them (the environment of a
    service that cleared its own proves nothing)."""
    found = instance_processes(state, record)
    return Owner(record.pid, found.services, found.inherited, found.marks)


def port_holder(
    state: StateDir, seen: PortStatus, host: str, locked: LockTable | None
) -> PortHolder:
    """The pid holding a held port and the host its lease covers (what its shield judges
    by). Both come from its record only while the process it names still runs: a holder
    killed with -9 leaves its record until the lock's next holder writes its own, and
    doctor took that dead process for the holder (its host, its pid), naming the new
    holder's own socket as a foreign listener "the shield stops". Else the pid is the
    one the kernel's lock table names (a record not written yet, damaged, or a dead
    holder's), if that process has the port's lock file open with the lock (a pid the
    table names may have been reused), and the host is ``host``. Raises nothing."""
    record = seen.record
    if record is None or not is_alive(record.identity):
        pid = _lock_table_holder(state, seen.port, locked)
        return PortHolder(host, None if pid is None else Owner(pid))
    return PortHolder(_covered_host(record.host, host), _owner(state, record))


def _lock_table_holder(state: StateDir, port: int, locked: LockTable | None) -> int | None:
    """The pid the kernel's lock table names for ``port``'s lock file, if that process
    holds the lock on it; None if unknown. Raises nothing."""
    try:
        directory = state.find("ports")
    except (OSError, StateDirError):
        return None
    return None if directory is None else lock_holder(directory, f"{port}.lock", locked)


def _covered_host(recorded: str, host: str) -> str:
    """``recorded`` (a live holder's lease host), else ``host`` when it is empty or no
    longer resolves. A layout on localhost named a foreign [::1]:P listener as one "the
    shield stops" beside another app's lease on 127.0.0.1, whose shield never does."""
    if not recorded:
        return host
    try:
        covered_scopes(recorded)
    except OSError:  # a name that no longer resolves: judge by ``host``
        return host
    return recorded


# Hosts that cover one loopback only: `localhost` clients may reach the other one first.
_ONE_LOOPBACK = ("127.0.0.1", "::1", "0.0.0.0")


def other_loopback_notes(
    port: int, host: str, sockets: Sequence[TcpSocket], holder: Owner | None = None
) -> tuple[str, ...]:
    """One note per listener on ``port`` at the loopback ``host`` does not cover (``[::1]``
    beside 127.0.0.1): no refusal and no trip, since the lease's clients by address never
    reach it, but a client of ``localhost:<port>`` that tries it first (browsers, Node)
    gets that program instead of the service. ``doctor`` called such a port plainly free
    or held. The listeners of ``holder`` (the port's holder, as ``Owner``) are
    left out: a ``socket = "port"`` service may bind ``::1`` itself. Raises nothing."""
    host = normalize_host(host)
    if host not in _ONE_LOOPBACK:
        return ()
    found = [
        s
        for s in sockets
        if s.port == port
        and s.state == "listen"
        and occupies(s, "localhost")
        and not occupies(s, host)
    ]
    # The wider host that covers it: localhost would shrink 0.0.0.0 to the loopbacks.
    fix = (
        'host = "::" holds every address of both families'
        if host == "0.0.0.0"
        else 'host = "localhost" holds both loopbacks'
    )
    return tuple(
        f"{o.who()} listens on {o.place()}, which host {host} does not cover: a client of "
        f"localhost:{port} that tries it first reaches that program ({fix})"
        for o in foreign_listeners(with_owners(found), holder)
    )


def elsewhere_notes(
    port: int, host: str, sockets: Sequence[TcpSocket], holder: PortHolder | None
) -> tuple[str, ...]:
    """``other_loopback_notes`` of a port: by ``host``, or when it is held (``holder``)
    by its holder's host and without its holder's own listeners. Raises nothing."""
    if holder is None:
        return other_loopback_notes(port, host, sockets)
    return other_loopback_notes(port, holder.host, sockets, holder.owner)
