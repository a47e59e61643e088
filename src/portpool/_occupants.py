"""Who is on a port: a socket of the kernel's table and its processes, in words.

Refusals, ``doctor``, ``run``'s notes and the shield's trips all name occupants here.

A socket's owner is named only as far as the OS tells (pids and programs on Linux, from
sock_diag and ``/proc/*/fd``); a socket of another user's process is said to be so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from portpool._addresses import endpoint
from portpool._dataclass import dataclass
from portpool._platform import (
    TcpSocket,
    ancestors,
    environment_of,
    owners_of_inodes,
    process_name,
    user_id,
)

# States a connection is in after its program closed it (the kernel finishes it alone).
_CLOSING = frozenset({"fin-wait-1", "fin-wait-2", "closing", "last-ack"})


@dataclass(frozen=True)
class Occupant:
    """One socket on the port: the kernel's entry, plus its processes where known."""

    socket: TcpSocket
    pids: tuple[int, ...] = ()
    programs: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """The socket's state: ``listen``, ``bound``, ``time-wait``, ... Raises nothing."""
        return self.socket.state

    @property
    def orphaned(self) -> bool:
        """Whether the socket is a connection its program closed and the kernel finishes
        alone (closing, and no inode: no file refers to it). Such sockets were named "an
        unknown process has a connection" after every stop of the reference app.
        Raises nothing."""
        s = self.socket
        return s.state in _CLOSING and s.inode is None and s.pid is None and not self.pids

    @property
    def listening(self) -> bool:
        """Whether the socket listens (state ``listen``). Raises nothing."""
        return self.socket.state == "listen"

    def who(self) -> str:
        """``pid 12 (nginx)``, or what is known instead. Raises nothing."""
        if self.pids:
            return ", ".join(
                f"pid {p} ({n})" for p, n in zip(self.pids, self.programs, strict=True)
            )
        if self.socket.state == "time-wait":
            return "no process (the kernel keeps it up to 60 s)"
        if self.orphaned:
            return "no process (its program closed it)"
        if self.socket.uid is not None and self.socket.uid != user_id():
            return f"a process of uid {self.socket.uid} (the OS does not say which)"
        return "an unknown process"

    def place(self) -> str:
        """The local address, e.g. ``[::]:8000 (IPv6 only)`` or ``127.0.0.1:8000``.
        Raises nothing."""
        s = self.socket
        text = endpoint(s.address, s.port)
        if s.family == 6 and s.address == "::" and s.state in ("listen", "bound"):
            text += {True: " (IPv6 only)", False: " (IPv6 and IPv4)", None: ""}[s.v6only]
        return text

    def what(self) -> str:
        """The socket's state and address, e.g. ``listening on [::]:8000 (IPv6 only)``.
        Raises nothing."""
        s = self.socket
        if s.state == "listen":
            return f"listening on {self.place()}"
        if s.state == "bound":
            return f"bound to {self.place()} (not listening)"
        if s.state == "time-wait":
            return f"a closed connection in TIME_WAIT from {self.place()} to {s.remote}"
        if self.orphaned:
            return (
                f"a closed connection from {self.place()} to {s.remote} ({s.state}), "
                "which the kernel ends on its own"
            )
        return f"a connection from {self.place()} to {s.remote} ({s.state})"

    def describe(self) -> str:
        """``pid 12 (nginx) listening on ...``, ``pid 12 (curl) has a connection ...``.
        Raises nothing."""
        if self.socket.state == "time-wait" or self.orphaned:
            return self.what()
        verb = "" if self.socket.state in ("listen", "bound") else "has "
        return f"{self.who()} {verb}{self.what()}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: the socket's state, address, port (int), v6only, remote, and the
        ``pids`` and ``programs`` lists. Raises nothing."""
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
# Said of connections named by inference (``_addresses.bound_wider``).
BOUND_WIDER = (
    ", whose socket was bound to [::] (IPv6 and IPv4) before it connected, which counts"
    " against the port's IPv4 wildcard (0.0.0.0), no other IPv4 address: the OS lists a"
    " connection by the address it uses"
)
PLAIN_BIND_EXAMPLES = 3  # sockets named in the note; the rest only counted


def plain_bind_note(occupants: Iterable[Occupant], *, inferred: bool = False) -> str:
    """The note for a port our SO_REUSEADDR bind takes but a plain bind does not: who
    blocks it (a connection or TIME_WAIT left by a SO_REUSEADDR socket: the note read
    "cannot bind it yet: " with nothing named). Names at most ``PLAIN_BIND_EXAMPLES``
    sockets and counts them all: a busy port's note once listed 5,561 TIME_WAIT
    connections in one line of 411,543 characters. ``inferred``: they are on no
    covered address (``_addresses.bound_wider``), and the note says why they count."""
    blocking = [o for o in occupants if not o.listening]
    count = len(blocking)
    named = "; ".join(o.describe() for o in blocking[:PLAIN_BIND_EXAMPLES])
    if not named:
        return f"{PLAIN_BIND_NOTE}: a socket the OS does not list"
    if inferred:
        named += BOUND_WIDER
    if count <= 1:
        return f"{PLAIN_BIND_NOTE}: {named}"
    waiting = sum(1 for o in blocking if o.socket.state == "time-wait")
    kinds = f"{count} sockets" + (f" ({waiting} in TIME_WAIT)" if waiting else "")
    shown = "" if count <= PLAIN_BIND_EXAMPLES else f", the first {PLAIN_BIND_EXAMPLES}"
    return f"{PLAIN_BIND_NOTE}: {kinds} block it{shown}: {named}"


# Listeners first: they are what a user looks for; then only-bound sockets, then the rest.
_STATE_ORDER = {"listen": 0, "bound": 1}


def occupants_text(occupants: Iterable[Occupant]) -> str:
    """Each occupant's ``describe()``, listeners first, joined by "; ": at most
    ``PLAIN_BIND_EXAMPLES`` named, the rest counted ("and 38 more sockets (2 in
    TIME_WAIT)"). A foreign server with 40 open connections made its refusal (in `up`'s
    error, `doctor`, `status --json` and the dashboard) a line of 3,716 characters, one
    entry per connection. Empty for no occupants. Raises nothing."""
    ordered = sorted(occupants, key=lambda o: _STATE_ORDER.get(o.state, 2))
    named = "; ".join(o.describe() for o in ordered[:PLAIN_BIND_EXAMPLES])
    rest = ordered[PLAIN_BIND_EXAMPLES:]
    if not rest:
        return named
    waiting = sum(1 for o in rest if o.state == "time-wait")
    noun = "more socket" if len(rest) == 1 else "more sockets"
    kinds = f" ({waiting} in TIME_WAIT)" if waiting else ""
    return f"{named}; and {len(rest)} {noun}{kinds}"


def with_owners(
    sockets: Iterable[TcpSocket],
    scan: Callable[[Iterable[int]], dict[int, list[int]]] = owners_of_inodes,
) -> list[Occupant]:
    """``sockets`` with the pids and program names the OS tells (one /proc scan, or
    ``scan``: a ``SocketOwners`` shared by the diagnoses of many ports)."""
    found = list(sockets)
    owners = scan({s.inode for s in found if s.inode and s.pid is None})
    out = []
    for s in found:
        pids = tuple([s.pid] if s.pid is not None else owners.get(s.inode or 0, []))
        out.append(Occupant(s, pids, tuple(process_name(p) or "?" for p in pids)))
    return out


@dataclass(frozen=True)
class Owner:
    """Whose processes a held port's listeners may be, by its holder's shield: the
    holder (``pid``), its services (``services``, pids) and what they start, and what
    else descends from the holder, except the children it inherited through the exec
    that started it (``inherited``, which ``up`` and ``run`` record: a sidecar of
    ``sh -c 'sidecar & exec portpool up'``) and what they start. Once it inherited any,
    another child is its own only when its environment carries ``marks`` (the
    instance's variables), as ``_lineage`` judges it. doctor took an inherited
    sidecar's listener for the holder's while the shield tripped on it, and a library
    instance's service outside its tree for an intruder the shield never stopped."""

    pid: int
    services: frozenset[int] = frozenset()
    inherited: frozenset[int] = frozenset()
    marks: tuple[tuple[str, str], ...] = ()

    def owns(self, pid: int) -> bool:
        """Whether process ``pid`` is the holder's own. Raises nothing (a process that
        is gone or cannot be read is not proven its own)."""
        if pid == self.pid or pid in self.services:
            return True
        chain = ancestors(pid)
        if self.services.intersection(chain):
            return True
        if self.pid not in chain:
            return False
        child = [pid, *chain][chain.index(self.pid)]  # the holder's child on the way
        if child in self.inherited:
            return False
        if not self.inherited:
            return True
        env = environment_of(child)
        return bool(self.marks) and env is not None and all(env.get(k) == v for k, v in self.marks)


def foreign_listeners(occupants: Iterable[Occupant], holder: Owner | int | None) -> list[Occupant]:
    """The listeners among ``occupants`` (of a held port) not proven to be the holder's
    or its services': the shield's rule (a listener whose owner the OS does not name
    counts as foreign). ``doctor`` said "held" with no occupant while the shield
    tripped on a foreign ``[::1]:P`` server that received the lease's clients.

    A socket the holder itself has open is the holder's, whoever shares it: a service
    that daemonizes keeps the lease's socket, and ``doctor`` named that socket (and the
    holder) as an intruder the shield would stop, which it never did. ``holder``: its
    ``Owner``, or only its pid (then all that descends from it is its own)."""
    owner = Owner(holder) if isinstance(holder, int) else holder
    out = []
    for o in occupants:
        if not o.listening:
            continue
        if (
            owner is not None
            and o.pids
            and (owner.pid in o.pids or all(owner.owns(p) for p in o.pids))
        ):
            continue
        out.append(o)
    return out


def intruder_note(occupant: Occupant) -> str:
    """The note for a foreign listener on a held port, in the shield's words."""
    return (
        f"but also listened on by {occupant.who()} on {occupant.place()}, which can "
        "receive the lease's clients (the shield stops the instance)"
    )
