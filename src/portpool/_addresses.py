"""What a lease's ``host`` binds and covers: the address semantics, in one place.

A lease must cover every address its clients may use, so that a client reaches the
service or is refused, never a foreign program:

- ``127.0.0.1``, ``::1``, another specific address: that address;
- ``localhost``: 127.0.0.1, served, and ``::1`` (where the host has IPv6), held; or
  the other way round where the system resolves ``localhost`` to ``::1`` alone;
- ``::``: one dual-stack socket (``IPV6_V6ONLY=0``): every IPv6 and IPv4 address;
- ``0.0.0.0``: every IPv4 address.

Why ``::1`` is held and not served for ``localhost``: a service is handed one socket
(``PORT``, one ``LISTEN_FDS`` fd, ``sock=``) and most servers accept exactly one, so two
sockets under one name would break them. The held socket is bound and never listens:
a client that tries ``::1`` first is refused at once (RST), and every client that
resolves ``localhost`` (browsers, Node >= 20, curl, Python) then tries 127.0.0.1; no
foreign program can listen on ``[::1]:P`` meanwhile.

Overlap follows Linux's bind rules (``inet_rcv_saddr_equal``): two sockets on one port
overlap when their address sets meet, where a wildcard covers its family and a ``[::]``
socket without ``IPV6_V6ONLY`` covers IPv4 too. The same rule says whether a foreign
listener can receive traffic meant for a lease (a more specific listener wins only while
it listens: ours may be restarting). ``meets`` applies it to a socket of the kernel's
table; the pool's refusals, ``doctor`` and the shield all judge by it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import socket

from portpool._dataclass import dataclass
from portpool._layout_fields import no_tcp_listener
from portpool._platform import TcpSocket, exclusive_bind_options
from portpool.errors import InvalidPort
from portpool.layout import normalize_host

# listen()'s backlog when no layout says otherwise
DEFAULT_BACKLOG = 128
# (family 4 or 6, address, or None for the family's wildcard)
Scope = tuple[int, str | None]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class BindTarget:
    """One socket a lease binds: ``serves`` is the one handed to the service; the others
    are held (bound, never listening) only so that nobody else can bind them."""

    family: socket.AddressFamily
    address: str
    v6only: bool | None  # IPV6_V6ONLY for an AF_INET6 socket, None for AF_INET
    serves: bool


def endpoint(host: str, port: int) -> str:
    """``host:port`` as a URL writes it, an IPv6 address in brackets (``[::1]:8080``):
    ``:::8080`` was printed for a service on ``::``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(port: int) -> int:
    """``port`` if it is an int in 1..65535 (not a bool), else raises InvalidPort."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidPort(port)
    return port


@functools.lru_cache(maxsize=1)
def has_ipv6_loopback() -> bool:
    """Whether ``::1`` can be bound here (IPv6 enabled, loopback configured)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def is_local_address(host: str) -> bool | None:
    """Whether this host has the address a lease on ``host`` serves on (a bind to port 0
    tells; EADDRNOTAVAIL, or EAFNOSUPPORT from a kernel without IPv6, says no). None if
    the name does not resolve or another error leaves it unknown."""
    try:
        target = bind_targets(host)[0]
    except OSError:
        return None
    try:
        with socket.socket(target.family, socket.SOCK_STREAM) as s:
            s.bind((target.address, 0))
    except OSError as e:
        return False if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) else None
    return True


def _loopbacks() -> tuple[BindTarget, ...]:
    """127.0.0.1, served, and ::1 held where this host has it: what ``localhost`` covers
    (known without resolving the name)."""
    ipv4 = BindTarget(socket.AF_INET, "127.0.0.1", None, True)
    if not has_ipv6_loopback():
        return (ipv4,)
    return (ipv4, BindTarget(socket.AF_INET6, "::1", True, False))


@functools.lru_cache(maxsize=1)
def _localhost_is_ipv6_only() -> bool:
    """Whether this system resolves ``localhost`` to IPv6 addresses only (``::1
    localhost`` alone in /etc/hosts): its clients never try 127.0.0.1 then. False when
    the name does not resolve."""
    try:
        infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    families = {info[0] for info in infos}
    return families == {socket.AF_INET6}


@functools.lru_cache(maxsize=64)
def bind_targets(host: str) -> tuple[BindTarget, ...]:
    """The sockets a lease on ``host`` binds, the served one first.

    ``host`` is read through ``layout.normalize_host``; a name other than ``localhost`` is
    resolved: its first address served, the others held (its clients may try any).
    Raises OSError if the name does not resolve.
    """
    host = normalize_host(host)
    if host == "localhost":
        both = _loopbacks()
        if len(both) == 2 and _localhost_is_ipv6_only():
            # Served on 127.0.0.1, the lease refused every client that resolves the name.
            ipv4, ipv6 = both
            return (dataclasses.replace(ipv6, serves=True), dataclasses.replace(ipv4, serves=False))
        return both
    try:
        return (_address_target(host),)
    except ValueError:
        pass
    # Every address: with the first alone, a client of the name trying another one (::1
    # before 127.0.0.1, in the system's order) could reach a foreign program there.
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except UnicodeError as e:  # refused before any lookup ("a..b"): it escaped raw
        raise socket.gaierror(
            socket.EAI_NONAME, f"host name {host!r} cannot be looked up: {e}"
        ) from None
    first, *others = dict.fromkeys(_address_target(str(info[4][0])) for info in infos)
    return (first, *(dataclasses.replace(t, serves=False) for t in others))


def unbindable(host: str) -> str | None:
    """Why no TCP server can listen on ``host``, or None: each such bind failed alike,
    "no free port" (exit 3), or a multicast address was leased and listened on where
    no client reaches it. Judged by the addresses it binds (``bind_targets``): "224.1"
    and a name are resolved to one. Raises OSError if a name does not resolve."""
    for target in bind_targets(host):
        ip = ipaddress.ip_address(target.address)
        if no_tcp_listener(ip):
            return "is a multicast or broadcast address, where a TCP server cannot listen"
        if ip.version == 6 and ip.is_link_local and ip.scope_id is None:
            return "is a link-local address without its zone, e.g. fe80::1%eth0"
    return None


def _address_target(host: str) -> BindTarget:
    """The socket a lease on the IP address ``host`` serves with. Raises ValueError."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # what the kernel binds for it; an IPv6-only bind was EINVAL
    if ip.version == 6:
        address = str(ip)
        if ip.scope_id is not None and not ip.is_link_local:
            address = address.partition("%")[0]  # a zone means nothing here (::1%lo)
        # Only "::" is dual-stack: users expect it to take IPv4 too (as on most hosts).
        return BindTarget(socket.AF_INET6, address, not ip.is_unspecified, True)
    return BindTarget(socket.AF_INET, str(ip), None, True)


@functools.lru_cache(maxsize=256)
def parse_address(text: str) -> IPAddress:
    """An IP address as a socket or the kernel's table spells it (``[::1]``, ``fe80::1%lo``),
    a v4-mapped IPv6 address as its IPv4 address. Raises ValueError."""
    addr = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def socket_scopes(family: int, address: str, v6only: bool | None) -> frozenset[Scope]:
    """The addresses a socket bound to ``address`` takes (``family`` 4 or 6).

    ``v6only`` None for a ``[::]`` socket means unknown: it may take IPv4 too.
    A v4-mapped IPv6 address counts as its IPv4 address. Raises ValueError.
    """
    ip = parse_address(address)
    if ip.version == 4:
        return frozenset({(4, None if ip.is_unspecified else str(ip))})
    if not ip.is_unspecified:
        return frozenset({(6, str(ip))})
    if v6only:
        return frozenset({(6, None)})
    return frozenset({(6, None), (4, None)})


@functools.lru_cache(maxsize=64)
def covered_scopes(host: str) -> frozenset[Scope]:
    """Every address a lease on ``host`` covers. Raises OSError if it does not resolve."""
    out: set[Scope] = set()
    # localhost: which loopback serves does not matter here, so the name is not resolved
    # (doctor asks it of every port's listeners, whatever the layout's host).
    targets = _loopbacks() if normalize_host(host) == "localhost" else bind_targets(host)
    for t in targets:
        out |= socket_scopes(6 if t.family == socket.AF_INET6 else 4, t.address, t.v6only)
    return frozenset(out)


def overlaps(a: frozenset[Scope], b: frozenset[Scope]) -> bool:
    """Whether two address sets meet (a wildcard meets every address of its family)."""
    for fam_a, addr_a in a:
        for fam_b, addr_b in b:
            if fam_a == fam_b and (addr_a is None or addr_b is None or addr_a == addr_b):
                return True
    return False


def meets(sock: TcpSocket, scopes: frozenset[Scope]) -> bool:
    """Whether ``sock``'s addresses meet ``scopes`` (``covered_scopes`` of a host): the
    one rule for bind conflicts and for whose traffic a listener can receive."""
    try:
        theirs = socket_scopes(sock.family, sock.address, sock.v6only)
    except ValueError:
        return True  # an address we cannot read: assume the worst
    return overlaps(theirs, scopes)


def bound_wider(sock: TcpSocket, covered: frozenset[Scope]) -> bool:
    """Whether ``sock``, on no address of ``covered``, may still block a bind there: an
    IPv6 connection (or its TIME_WAIT) is listed by the address it uses, while Linux's
    bind check still counts the ``[::]`` (IPv6 and IPv4) its socket was bound to
    against the IPv4 wildcard (``[::]:P`` then connected from ``[::1]:P`` refused a
    lease on 0.0.0.0, and the refusal named "a process the OS does not name"). An IPv4
    connection's bind address follows the one it uses: the table tells the truth.
    Raises nothing."""
    return (
        sock.state not in ("listen", "bound")
        and sock.family == 6
        and sock.v6only is not True
        and (4, None) in covered
    )


def occupies(sock: TcpSocket, host: str) -> bool:
    """Whether ``sock`` uses an address a lease on ``host`` covers (bind overlap).

    Raises OSError if ``host`` does not resolve."""
    return meets(sock, covered_scopes(host))


def takes_traffic(sock: TcpSocket, host: str) -> bool:
    """Whether ``sock`` listens where it can receive traffic meant for a lease on
    ``host``: the shield's rule. A ``[::]`` socket with ``IPV6_V6ONLY`` takes no IPv4
    (another user's such socket once tripped every lease on 127.0.0.1); one whose flag
    the OS did not say is assumed to take both. Raises OSError if ``host`` does not
    resolve."""
    return sock.state == "listen" and occupies(sock, host)


def _sockaddr(target: BindTarget, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """``target``'s address for ``bind``, with the scope id of a link-local address
    (Python's own parsing drops ``%eth0``: every bind read "Invalid argument")."""
    if "%" not in target.address:
        return (target.address, port)
    flags = socket.AI_NUMERICHOST
    for *_, addr in socket.getaddrinfo(target.address, port, target.family, 0, 0, flags):
        if len(addr) == 4:
            return (str(addr[0]), port, int(addr[2]), int(addr[3]))
    return (target.address, port)


def bind_target(
    target: BindTarget, port: int, backlog: int, *, reuse: bool = True
) -> socket.socket:
    """A socket bound to ``target`` on ``port``: listening if it serves, else only bound.

    ``reuse=False`` binds as a server that does not set SO_REUSEADDR would (the probe of
    ``doctor``). Raises OSError.
    """
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        if reuse:
            exclusive_bind_options(sock)
        if target.v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(target.v6only))
        sock.bind(_sockaddr(target, port))
        if target.serves:
            sock.listen(backlog)
        elif reuse:
            # A held socket that keeps SO_REUSEADDR could share its address with a
            # foreign SO_REUSEADDR socket; cleared, any other bind conflicts with it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_all(host: str, port: int, backlog: int, *, reuse: bool = True) -> list[socket.socket]:
    """The sockets of ``bind_targets(host)`` on ``port``, served first; all or none (but
    for a name's other address that this machine does not have: none to hold).

    Raises OSError (the first bind that failed), after closing what was bound.
    """
    sockets: list[socket.socket] = []
    try:
        for target in bind_targets(host):
            try:
                sockets.append(bind_target(target, port, backlog, reuse=reuse))
            except OSError as e:
                # A name's other address that is not this machine's: nobody here can
                # listen on it either, so there is nothing to hold.
                if target.serves or e.errno != errno.EADDRNOTAVAIL:
                    raise
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def host_warning(host: str) -> str | None:
    """One line for ``layout`` when this machine does not have ``host``'s address (every
    bind will fail): an address other than a wildcard or IPv4 loopback, ``::1`` included;
    else None. 192.0.2.1 passed ``layout`` silently before."""
    host = normalize_host(host)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # localhost, or a name: it resolves at start
    if ip.is_unspecified or (ip.is_loopback and ip.version == 4):
        return None  # always this machine's (no socket: `layout` stays light)
    # ::1 too: a host without IPv6 has none, and `layout` was silent while `doctor` said
    # "every start fails".
    if is_local_address(host) is False:  # a test bind
        others = ", ".join(h for h in ("127.0.0.1", "::1", "localhost", "::") if h != host)
        return (
            f"host {host} is not an address of this machine: every start fails until it "
            f"is (use {others} or 0.0.0.0)"
        )
    return None
