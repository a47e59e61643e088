"""The one diagnosis of a port: what occupies it for a host, and who.

The pool's refusals, ``doctor`` and the shield all judge a port through this module, so
they never disagree (they did: ``doctor`` called a port free that ``run`` refused, and
the shield tripped on sockets that could not take our traffic). It answers:

- which TCP sockets use the port on an address the host's lease covers: listening, only
  bound, connected with the port as local port, in TIME_WAIT; with ``IPV6_V6ONLY`` and
  the pids and program names where the OS tells (sock_diag and ``/proc/*/fd`` on Linux);
- whether our own bind would succeed (the kernel's word: a probe bind, as ``acquire``
  does, since whether a connection's socket blocks a bind depends on its SO_REUSEADDR,
  which no table shows), and whether a server that does not set SO_REUSEADDR would;
- whether a listener can receive traffic meant for a lease (for the shield).

Layer: pool. It imports only what lies below (``lock``, ``statedir``, ``_platform``,
``_addresses``) and ``layout``/``errors``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from portpool._addresses import Scope, bind_all, covered_scopes, overlaps, socket_scopes
from portpool._platform import (
    LockTable,
    TcpSocket,
    locked_inodes,
    owners_of_inodes,
    process_name,
    socket_inode,
    tcp_sockets,
    user_id,
)
from portpool.errors import Refusal
from portpool.layout import Layout, normalize_host
from portpool.lock import inspect_port
from portpool.statedir import StateDir

if TYPE_CHECKING:
    from portpool.pool import Lease

DEFAULT_BACKLOG = 128


def _where(sock: TcpSocket) -> str:
    return f"[{sock.address}]:{sock.port}" if sock.family == 6 else f"{sock.address}:{sock.port}"


@dataclass(frozen=True)
class Occupant:
    """One socket on the port: the kernel's entry, plus its processes where known."""

    socket: TcpSocket
    pids: tuple[int, ...] = ()
    programs: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        return self.socket.state

    @property
    def listening(self) -> bool:
        return self.socket.state == "listen"

    def who(self) -> str:
        """``pid 12 (nginx)``, or what is known instead."""
        if self.pids:
            return ", ".join(
                f"pid {p} ({n})" for p, n in zip(self.pids, self.programs, strict=True)
            )
        if self.socket.state == "time-wait":
            return "no process (the kernel keeps it up to 60 s)"
        if self.socket.uid is not None and self.socket.uid != user_id():
            return f"a process of uid {self.socket.uid} (the OS does not say which)"
        return "an unknown process"

    def place(self) -> str:
        """The local address, e.g. ``[::]:8000 (IPv6 only)`` or ``127.0.0.1:8000``."""
        s = self.socket
        text = _where(s)
        if s.family == 6 and s.address == "::" and s.state in ("listen", "bound"):
            text += {True: " (IPv6 only)", False: " (IPv6 and IPv4)", None: ""}[s.v6only]
        return text

    def what(self) -> str:
        """The socket's state and address, e.g. ``listening on [::]:8000 (IPv6 only)``."""
        s = self.socket
        if s.state == "listen":
            return f"listening on {self.place()}"
        if s.state == "bound":
            return f"bound to {self.place()} (not listening)"
        if s.state == "time-wait":
            return f"a closed connection in TIME_WAIT from {self.place()} to {s.remote}"
        return f"a connection from {self.place()} to {s.remote} ({s.state})"

    def describe(self) -> str:
        """``pid 12 (nginx) listening on ...``, ``pid 12 (curl) has a connection ...``."""
        if self.socket.state == "time-wait":
            return self.what()
        verb = "" if self.socket.state in ("listen", "bound") else "has "
        return f"{self.who()} {verb}{self.what()}"

    def to_dict(self) -> dict[str, object]:
        s = self.socket
        return {
            "state": s.state,
            "address": s.address,
            "port": s.port,
            "v6only": s.v6only,
            "remote": s.remote,
            "pids": list(self.pids),
            "programs": list(self.programs),
        }


PLAIN_BIND_NOTE = "a server that does not set SO_REUSEADDR cannot bind it yet"
PLAIN_BIND_EXAMPLES = 3  # sockets named in the note; the rest only counted


def plain_bind_note(occupants: Iterable[Occupant]) -> str:
    """The note for a port our SO_REUSEADDR bind takes but a plain bind does not: who
    blocks it (a connection or TIME_WAIT left by a SO_REUSEADDR socket: the note read
    "cannot bind it yet: " with nothing named). Names at most ``PLAIN_BIND_EXAMPLES``
    sockets and counts them all: a busy port's note once listed 5,561 TIME_WAIT
    connections in one line of 411,543 characters."""
    blocking = [o for o in occupants if not o.listening]
    count = len(blocking)
    named = "; ".join(o.describe() for o in blocking[:PLAIN_BIND_EXAMPLES])
    if not named:
        return f"{PLAIN_BIND_NOTE}: a socket the OS does not list"
    if count <= 1:
        return f"{PLAIN_BIND_NOTE}: {named}"
    waiting = sum(1 for o in blocking if o.socket.state == "time-wait")
    kinds = f"{count} sockets" + (f" ({waiting} in TIME_WAIT)" if waiting else "")
    shown = "" if count <= PLAIN_BIND_EXAMPLES else f", the first {PLAIN_BIND_EXAMPLES}"
    return f"{PLAIN_BIND_NOTE}: {kinds} block it{shown}: {named}"


def meets(sock: TcpSocket, scopes: frozenset[Scope]) -> bool:
    """Whether ``sock``'s addresses meet ``scopes`` (``covered_scopes`` of a host): the
    one rule for bind conflicts and for whose traffic a listener can receive."""
    try:
        theirs = socket_scopes(sock.family, sock.address, sock.v6only)
    except ValueError:
        return True  # an address we cannot read: assume the worst
    return overlaps(theirs, scopes)


def occupies(sock: TcpSocket, host: str) -> bool:
    """Whether ``sock`` uses an address a lease on ``host`` covers (bind overlap).

    Raises OSError if ``host`` does not resolve."""
    return meets(sock, covered_scopes(host))


def takes_traffic(sock: TcpSocket, host: str) -> bool:
    """Whether ``sock`` listens where it can receive traffic meant for a lease on
    ``host``: the shield's rule. A ``[::]`` socket with ``IPV6_V6ONLY`` takes no IPv4;
    one whose flag the OS did not say is assumed to take both."""
    return sock.state == "listen" and occupies(sock, host)


def with_owners(sockets: Iterable[TcpSocket]) -> list[Occupant]:
    """``sockets`` with the pids and program names the OS tells (one /proc scan)."""
    found = list(sockets)
    owners = owners_of_inodes({s.inode for s in found if s.inode and s.pid is None})
    out = []
    for s in found:
        pids = tuple([s.pid] if s.pid is not None else owners.get(s.inode or 0, []))
        out.append(Occupant(s, pids, tuple(process_name(p) or "?" for p in pids)))
    return out


def _belongs_to(pid: int, holder: int) -> bool:
    """Whether ``pid`` is ``holder`` or one of its descendants (a service it started)."""
    if pid == holder:
        return True
    import psutil  # not at import: `import portpool` stays light

    try:
        return any(parent.pid == holder for parent in psutil.Process(pid).parents())
    except (psutil.Error, OSError):
        return False


def foreign_listeners(occupants: Iterable[Occupant], holder: int | None) -> list[Occupant]:
    """The listeners among ``occupants`` (of a held port) not proven to be the holder's
    or its services': the shield's rule (a listener whose owner the OS does not name
    counts as foreign). ``doctor`` said "held" with no occupant while the shield
    tripped on a foreign ``[::1]:P`` server that received the lease's clients."""
    out = []
    for o in occupants:
        if not o.listening:
            continue
        if holder is not None and o.pids and all(_belongs_to(p, holder) for p in o.pids):
            continue
        out.append(o)
    return out


def intruder_note(occupant: Occupant) -> str:
    """The note for a foreign listener on a held port, in the shield's words."""
    return (
        f"but also listened on by {occupant.who()} on {occupant.place()}, which can "
        "receive the lease's clients (the shield stops the instance)"
    )


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

    @property
    def bindable(self) -> bool:
        return self.bind_error is None

    def describe_occupants(self) -> str:
        if not self.occupants:
            return "a process the OS does not name"
        return "; ".join(o.describe() for o in self.occupants)

    def refusal(self) -> Refusal | None:
        """Why ``acquire`` refuses the port, or None if it can have it. Its text is the
        same whether the pool met the error itself or ``doctor`` probed for it."""
        err, port, host = self.bind_error, self.port, self.host
        if err is None:
            return None
        if err == errno.EADDRINUSE:
            return Refusal(port, "in use", f"used by {self.describe_occupants()}")
        if err in (errno.EACCES, errno.EPERM):
            return Refusal(port, "permission denied", f"binding {host}:{port}: {self.bind_message}")
        if err == errno.EADDRNOTAVAIL:
            return Refusal(port, "unavailable", f"{host} is not an address of this host")
        return Refusal(port, "error", f"binding {host}:{port}: {self.bind_message}")

    def notes(self) -> list[str]:
        """What a free port still has on it that a user may trip over."""
        if not self.bindable:
            return []
        return [plain_bind_note(self.occupants)] if self.plain_bind_blocked else []

    def to_dict(self) -> dict[str, object]:
        refusal = self.refusal()
        return {
            "port": self.port,
            "host": self.host,
            "bindable": self.bindable,
            "refusal": None if refusal is None else str(refusal),
            "plain_bind_blocked": self.plain_bind_blocked,
            "occupants": [o.to_dict() for o in self.occupants],
        }


def _probe(host: str, port: int, *, reuse: bool) -> OSError | None:
    try:
        for sock in bind_all(host, port, DEFAULT_BACKLOG, reuse=reuse):
            sock.close()
    except OSError as e:
        return e
    return None


def diagnose(
    port: int,
    host: str,
    *,
    bind_error: OSError | None = None,
    probe: bool = True,
    sockets: Sequence[TcpSocket] | None = None,
) -> PortDiagnosis:
    """What occupies ``port`` for a lease on ``host``, and who.

    ``bind_error``: the error a real bind just got (the pool's case: no probe then).
    Otherwise ``probe`` binds the port for a moment exactly as ``acquire`` would, and
    once more without SO_REUSEADDR, then closes it (never while a portpool lock holds
    the port: the caller checks). ``sockets``: one ``tcp_sockets()`` read to reuse for
    many ports. Raises OSError if ``host`` does not resolve.
    """
    host = normalize_host(host)
    seen = tcp_sockets(port) if sockets is None else [s for s in sockets if s.port == port]
    occupants = tuple(with_owners(s for s in seen if occupies(s, host)))
    plain_blocked = None
    if bind_error is None and probe:
        bind_error = _probe(host, port, reuse=True)
        if bind_error is None:
            plain_blocked = _probe(host, port, reuse=False) is not None
    if bind_error is None:
        return PortDiagnosis(port, host, occupants, None, "", plain_blocked, probe)
    message = bind_error.strerror or str(bind_error)
    return PortDiagnosis(port, host, occupants, bind_error.errno, message, plain_blocked, probe)


def handed_over(layout: Layout, leases: Iterable[Lease]) -> list[Lease]:
    """The leases whose service gets only the number and binds the port itself: their
    socket was closed (``run`` without ``--fds``) or their service has ``socket =
    "port"`` (``up`` closes it when it starts the service)."""
    port_mode = {s.name for s in layout.services if s.socket == "port"}
    return [lease for lease in leases if lease.socket is None or lease.service in port_mode]


def plain_bind_notes(leases: Iterable[Lease]) -> list[str]:
    """One line per lease whose port a server that does not set SO_REUSEADDR cannot bind
    yet, naming who blocks it (``doctor``'s note): for leases handed to their service by
    number only (``socket = "port"``, ``run`` without ``--fds``), whose own bind then
    fails. Our own sockets (served and held) are not counted. Reads the socket table
    per lease; binds nothing.

    Such a port is kept, not skipped: the block lasts at most a TIME_WAIT (60 s) or one
    outgoing connection, a server that sets SO_REUSEADDR (most do) binds it anyway, and
    skipping would move the service off its predictable port for a passing state.
    """
    out = []
    for lease in leases:
        mine = {socket_inode(s) for s in (lease.socket, *lease.held) if s is not None}
        blocking = [
            s
            for s in tcp_sockets(lease.port)
            if s.state != "listen" and s.inode not in mine and occupies(s, lease.host)
        ]
        if blocking:
            who = f"service {lease.service!r} " if lease.service else ""
            out.append(f"{who}port {lease.port}: {plain_bind_note(with_owners(blocking))}")
    return out


# ---------------------------------------------------------------- doctor


@dataclass(frozen=True)
class PortVerdict:
    """``doctor``'s word on one pool port: None ``refusal`` means ``acquire`` can have it;
    otherwise the very Refusal ``acquire`` would report."""

    instance: int
    service: str
    port: int
    refusal: Refusal | None
    notes: tuple[str, ...] = ()
    diagnosis: PortDiagnosis | None = None

    @property
    def kind(self) -> str:
        """``free``, ``held`` (by portpool), ``foreign`` (in use), or the refusal's reason."""
        if self.refusal is None:
            return "free"
        return {"held": "held", "in use": "foreign"}.get(self.refusal.reason, self.refusal.reason)

    def describe(self) -> str:
        if self.refusal is None:
            return "; ".join(("free", *self.notes))
        if self.refusal.reason == "held":
            # "held by instance 1 of app (pid ...)", and any foreign listener on it
            return "; ".join((self.refusal.detail, *self.notes))
        return f"{self.refusal.reason} ({self.refusal.detail})"

    def to_dict(self) -> dict[str, object]:
        return {
            "instance": self.instance,
            "service": self.service,
            "port": self.port,
            "kind": self.kind,
            "text": self.describe(),
            "notes": list(self.notes),
            "occupants": [] if self.diagnosis is None else self.diagnosis.to_dict()["occupants"],
        }


@dataclass(frozen=True)
class DoctorReport:
    """Every pool port of every admissible instance, judged as ``acquire`` would."""

    app: str
    host: str
    max_instances: int
    verdicts: tuple[PortVerdict, ...]

    def counts(self) -> dict[str, int]:
        out = {"free": 0, "held": 0, "foreign": 0}
        for v in self.verdicts:
            out[v.kind] = out.get(v.kind, 0) + 1
        return out

    def summary(self) -> list[str]:
        """Lines about the whole report that no single port says: a host this machine
        does not have (every port read "unavailable"), foreign listeners on held ports."""
        out = []
        unavailable = self.counts().get("unavailable", 0)
        if unavailable:
            out.append(
                f"host {self.host} is not an address of this machine: every start fails "
                "until it is (check `host` in the layout)"
            )
        intruded = sum(1 for v in self.verdicts if v.kind == "held" and v.notes)
        if intruded:
            out.append(
                f"{intruded} held ports are also listened on by a foreign program, which "
                "can receive their clients"
            )
        return out

    def to_dict(self, *, show_free: bool = True) -> dict[str, object]:
        """JSON-ready; ``ports`` lists free ports only with ``show_free`` (``doctor``
        without ``--all``), while ``counts`` always counts every port."""
        return {
            "app": self.app,
            "host": self.host,
            "max_instances": self.max_instances,
            "counts": self.counts(),
            "summary": self.summary(),
            "ports": [v.to_dict() for v in self.verdicts if show_free or v.refusal is not None],
        }


def classify_port(
    state: StateDir,
    port: int,
    host: str,
    *,
    locked: LockTable | None = None,
    sockets: Sequence[TcpSocket] | None = None,
) -> tuple[Refusal | None, tuple[str, ...], PortDiagnosis | None]:
    """Whether ``acquire`` on ``host`` would take ``port`` now, and if not the Refusal it
    would give: held by a portpool lock holder, else the kernel's probe bind. Kills and
    keeps nothing. Raises OSError if ``host`` does not resolve."""
    seen = inspect_port(state, port, locked)
    if not seen.is_free:
        # Never probed (the holder's sockets are there); its listeners are still read.
        found = diagnose(port, host, probe=False, sockets=sockets)
        holder = None if seen.record is None else seen.record.pid
        notes = tuple(intruder_note(o) for o in foreign_listeners(found.occupants, holder))
        return Refusal(port, "held", seen.describe()), notes, found
    found = diagnose(port, host, sockets=sockets)
    return found.refusal(), tuple(found.notes()), found


def examine_layout(
    layout: Layout, state: StateDir | None = None, service: str | None = None
) -> DoctorReport:
    """``doctor``: what blocks which pool port of every admissible instance (of
    ``service`` only, if given), naming foreign holders where the OS says. Kills nothing.
    Raises UnknownService (exit 2) for a ``service`` the layout lacks, StateDirError for
    an unusable state dir, OSError if the layout's host does not resolve."""
    services = layout.services if service is None else (layout.service(service),)
    own = state is None
    state = state or StateDir.open(create=False)  # read-only: creates nothing
    try:
        locked = locked_inodes()
        sockets = tcp_sockets()
        verdicts = []
        for number in range(1, layout.max_instances + 1):
            for svc in services:
                for port in svc.pool(number):
                    refusal, notes, found = classify_port(
                        state, port, layout.host, locked=locked, sockets=sockets
                    )
                    verdicts.append(PortVerdict(number, svc.name, port, refusal, notes, found))
        return DoctorReport(layout.app, layout.host, layout.max_instances, tuple(verdicts))
    finally:
        if own:
            state.close()
