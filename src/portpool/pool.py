"""Pools and leases: try each port of a pool in order; lock it, then bind and listen.

The bound, listening socket is the reservation (rule 5): it is handed to the service,
so nothing can slip in between the check and the use. A port that is locked by
nobody but cannot be bound belongs to a foreign program: skip it, never fight it, and
say why in the words of ``portpool.diagnosis`` (the ones ``doctor`` uses too). What a
host binds (both loopbacks for ``localhost``, dual-stack ``::``) is ``_addresses``'s.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterable

from portpool._addresses import (
    DEFAULT_BACKLOG,
    bind_all,
    bind_target,
    bind_targets,
    check_port,
    endpoint,
    unbindable,
)
from portpool._dataclass import dataclass, field
from portpool._layout_fields import normalize_host
from portpool._platform import SocketOwners, is_alive, is_listening, socket_inode
from portpool._portstatus import SharedLockTable
from portpool._record import PortRecord
from portpool.errors import (
    AlreadyHeldHere,
    InvalidArgument,
    LockHeld,
    LockHolder,
    PoolExhausted,
    PortPoolError,
    Refusal,
    ResourceLimit,
    StateDirError,
)
from portpool.lock import PortLock
from portpool.statedir import StateDir, out_of_descriptors, write_error

_Socket = socket.socket  # the field ``socket`` shadows the module inside Lease

__all__ = ["DEFAULT_BACKLOG", "Lease", "acquire", "bind_listen", "check_port"]


@dataclass
class Lease:
    """A port acquired from a pool: its kernel lock, its listening socket, its record.

    Release it (or leave its ``with`` block) to close the socket, erase the record and
    unlock; one dropped unreleased stays whole (lock, socket, record) until the process
    exits. ``socket`` is None once handed off with ``close_socket``. ``refusals`` says
    why the ports before this one in the pool were skipped. ``held`` are the extra
    sockets that keep the rest of the host's addresses (``::1`` for ``localhost``)
    from anyone else: bound, never listening, never handed to the service.
    """

    port: int
    host: str
    socket: socket.socket | None
    lock: PortLock
    service: str = ""
    refusals: list[Refusal] = field(default_factory=list)
    held: list[_Socket] = field(default_factory=list)
    backlog: int = DEFAULT_BACKLOG  # listen()'s queue length, as acquired

    @property
    def record(self) -> PortRecord | None:
        """The port's record as last written by us, None before it was. Raises nothing."""
        return self.lock.record

    @property
    def socket_inode(self) -> int | None:
        """The listening socket's inode (Linux), None if closed or unknown. Raises nothing."""
        return None if self.socket is None else socket_inode(self.socket)

    def fileno(self) -> int:
        """The listening socket's file descriptor (int), to hand to a service. Raises
        PortPoolError once ``close_socket`` or ``release`` closed it, or the socket itself
        was closed (a server's shutdown: -1 was returned)."""
        fd = -1 if self.socket is None else self.socket.fileno()
        if fd == -1:
            raise PortPoolError(f"port {self.port}: the lease's socket was already closed")
        return fd

    def listen_again(self) -> bool:
        """Put our socket back in listen state if a holder of it shut it down: True if it
        had to. ``shutdown(2)`` on a passed listening socket (a server waking a thread
        blocked in accept) stops it listening for every holder, ours too, while it
        stays bound to the port; a restart was handed it dead. False where the OS does
        not say (no SO_ACCEPTCONN) or the socket is gone. The queue length is the
        one it was acquired with. Raises OSError."""
        if self.socket is None or self.socket.fileno() == -1:
            return False
        if is_listening(self.socket) is not False:
            return False
        self.socket.listen(self.backlog)
        return True

    def close_socket(self) -> None:
        """Close our sockets but keep the lock (another portpool user can't take the port;
        a foreign program could, which the shield reports). The held ones go too: the
        service binds the port itself now, maybe on ``::``, which they would block.
        Raises nothing."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        for sock in self.held:
            sock.close()
        self.held.clear()

    def skip_note(self) -> str | None:
        """One line saying which port this lease got and why each earlier port of its
        pool was refused; None when it got the pool's first port. Raises nothing."""
        if not self.refusals:
            return None
        who = f"service {self.service!r}" if self.service else "lease"
        why = "; ".join(str(r) for r in self.refusals)
        return f"{who} got port {self.port}, not {self.refusals[0].port}: {why}"

    def heartbeat(self) -> None:
        """Refresh the record's ``heartbeat_at`` now. Raises LockError once released or
        when another process wrote over the record (left as found, for the shield),
        StateDirError if the write fails (a full disk, a quota)."""
        try:
            self.lock.heartbeat()
        except OSError as e:
            where = f"{self.lock.lock.directory.path}/{self.port}.json"
            raise write_error(where, "cannot write metadata", e) from e

    def release(self) -> None:
        """Close the socket, erase the record, unlock. Safe to call twice. Raises
        nothing."""
        self.close_socket()
        self.lock.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self) -> str | tuple[object, ...]:
        raise not_transferable(f"Lease (port {self.port})")

    def __repr__(self) -> str:
        return f"Lease(service={self.service!r}, host={self.host!r}, port={self.port})"


def not_transferable(what: str) -> TypeError:
    """The error for pickling or copying ``what`` (a Lease, an Instance): multiprocessing's
    spawn and forkserver pickle a Process's arguments, and failed with "cannot pickle
    '_thread.lock' object", which says nothing."""
    return TypeError(
        f"a portpool {what} cannot be pickled or copied: its kernel locks belong to this "
        "process. Pass lease.socket (or instance.env()) to the other process "
        "(multiprocessing sends sockets) and keep it here until that is done"
    )


def bind_listen(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A socket bound to ``host:port`` and listening, exclusively: the one a lease on
    ``host`` serves with (127.0.0.1 for ``localhost``, or ::1 where the system resolves
    ``localhost`` to it alone; ``::`` dual-stack). Raises OSError."""
    return bind_target(bind_targets(host)[0], port, backlog)


_BIND_RETRIES = 3


def _bind_or_refusal(
    host: str, port: int, backlog: int, owners: SocketOwners
) -> list[socket.socket] | Refusal:
    """The lease's sockets, or why not. An address in use by no socket the kernel lists
    was only probed for a moment (``doctor``): try again rather than skip the port."""
    for attempt in range(_BIND_RETRIES + 1):
        try:
            return bind_all(host, port, backlog)
        except OSError as e:
            limit = out_of_descriptors(e)
            if limit is not None:
                raise limit from e
            try:
                from portpool.diagnosis import diagnose_port  # only for a refused port

                found = diagnose_port(port, host, bind_error=e, owners=owners)
            except OSError:  # the host name no longer resolves
                return Refusal(port, "error", f"binding {endpoint(host, port)}: {e.strerror or e}")
            if e.errno != errno.EADDRINUSE or found.occupants or attempt == _BIND_RETRIES:
                refusal = found.refusal()
                assert refusal is not None  # a bind error always has one
                return refusal
        time.sleep(0.001 * (attempt + 1))
    raise AssertionError("unreachable")  # the loop always returns


def _holder_detail(holder: LockHolder | None) -> str:
    if holder is not None and not holder.is_free:
        return holder.describe()
    # Free by the time we looked: its holder released it between our try and our look.
    return "another process (released just now)"


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


# Waits (ms) before trying a port again whose holder looks like it is only passing.
_BUSY_WAITS_MS = (1, 2, 4, 8, 16, 32, 32)


def _only_passing(holder: LockHolder | None) -> bool:
    """Whether a busy port's holder is likely there only for a moment: the lock was
    free when we looked, or its record names no live process. ``gc`` holds a dead
    holder's lock while it removes the files, and pushed 4-11% of simultaneous starts
    off a free first port; a live recorded holder is refused at once."""
    from portpool._portstatus import PortStatus  # imported already by inspect_port

    if not isinstance(holder, PortStatus):
        return False
    if holder.is_free or holder.record is None:
        return True
    return not is_alive(holder.record.identity)


def _lock_port(state: StateDir, port: int, table: SharedLockTable) -> PortLock | Refusal:
    """The port's lock, or why not. A port held only for a moment (a cleaner, a holder
    leaving) is tried again a few times rather than skipped while really free. Raises
    StateDirError when the ports directory itself refuses (read-only, not writable):
    no other port would do better, and port by port it read as "all taken" (exit 3)."""
    ports_dir = state.ports().path
    for wait_ms in (*_BUSY_WAITS_MS, None):
        try:
            return PortLock.acquire(state, port, table)
        except LockHeld as e:
            if e.holder is not None and e.holder.unusable is not None:
                # Held through another name of the file: no wait frees this one.
                return Refusal(port, "error", e.holder.unusable)
            if wait_ms is None or not _only_passing(e.holder):
                return Refusal(port, "held", _holder_detail(e.holder))
            time.sleep(wait_ms / 1000)
        except AlreadyHeldHere:
            return Refusal(port, "held", "by this process already")
        except ResourceLimit:
            raise  # out of descriptors: no other port of the pool would do better
        except StateDirError as e:
            if e.path == ports_dir:
                raise
            return Refusal(port, "error", str(e))
        except PortPoolError as e:
            return Refusal(port, "error", str(e))
    raise AssertionError("unreachable")  # the loop always returns


def _check_arguments(host: str, app: str, instance: int, service: str, backlog: int) -> None:
    """Refuse what ``acquire`` cannot use before any port is tried: a host name that
    does not resolve was "no free port in pool" (PoolExhausted, exit code 3), an
    ``instance`` of "1" wrote a record that no reader could read."""
    if not isinstance(host, str):  # None raised AttributeError from deep in binding
        raise TypeError(f"host must be a str (an IP address or a name), not {host!r}")
    for name, text in (("app", app), ("service", service)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, not {text!r}")
    for name, number in (("instance", instance), ("backlog", backlog)):
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f"{name} must be an int, not {number!r}")
        if not 0 <= number < 2**31:
            raise InvalidArgument(name, number, "must be 0 or more (and below 2**31)")
    try:  # a name is resolved here (an address is not): every bind would fail alike
        problem = unbindable(host)
    except OSError as e:
        raise InvalidArgument("host", host, f"cannot be resolved ({e.strerror or e})") from None
    if problem is not None:
        raise InvalidArgument("host", host, problem)


def acquire(
    state: StateDir,
    pool: Iterable[int],
    *,
    host: str = "127.0.0.1",
    app: str = "",
    instance: int = 0,
    service: str = "",
    backlog: int = DEFAULT_BACKLOG,
) -> Lease:
    """Acquire the first port of ``pool`` that is neither locked nor bound by anyone.

    ``state``: the state dir (``StateDir.open()``); ``pool``: port numbers (ints in
    1..65535; any iterable of them), tried in order; ``host``: the IP address or name
    to listen on (a name binds every address it resolves to); ``app``, ``instance``,
    ``service``: labels the port's record shows to ``status``; ``backlog``:
    ``listen()``'s queue length.
    Returns a Lease holding the lock and the listening socket, its record written; use
    it in a ``with`` block or call ``release()``.
    Raises PoolExhausted with a Refusal per port when every port is refused, InvalidPort
    (a ValueError) for a value that is not a port, InvalidArgument (a ValueError) for a
    ``host`` name that does not resolve, a multicast or broadcast ``host`` or an IPv6
    link-local one without its zone, or an ``instance`` or ``backlog`` below 0,
    TypeError for a ``state`` that is no StateDir, a ``pool`` that is no iterable or
    one str, a ``host``, ``app`` or ``service`` that is not a str, an ``instance`` or
    ``backlog`` that is not an int, StateDirError if the ports directory is unusable or
    the record cannot be written, ResourceLimit when out of file descriptors.
    """
    # Each raised AttributeError or "'NoneType' object is not iterable" from deep inside.
    if not isinstance(state, StateDir):
        raise TypeError(f"state must be a StateDir (StateDir.open()), not {state!r}")
    if isinstance(pool, (str, bytes)):  # its characters were checked as ports
        raise TypeError(f"pool must be port numbers (ints), not one {type(pool).__name__}")
    _check_arguments(host, app, instance, service, backlog)
    # One spelling, as a layout's: the lease and its record kept "LOCALHOST".
    host = normalize_host(host)
    try:
        ports = iter(pool)  # what iterates by __getitem__ alone too
    except TypeError:
        raise TypeError(f"pool must be port numbers (ints), not {pool!r}") from None
    # A list: checking an iterator's ports once used it up, and a free port was refused.
    pool = [check_port(port) for port in ports]
    # An unusable ports directory is the state dir's fault, raised here: refused port by
    # port, it read as "every port of its pool is taken by others" (exit 3).
    state.ports()
    refusals: list[Refusal] = []
    # Read only if a port is refused, once for them all: the lock table, and who has
    # each socket open (scanned per refused port, refusing a large pool took seconds).
    table, owners = SharedLockTable(), SocketOwners()
    for port in pool:
        taken = _lock_port(state, port, table)
        if isinstance(taken, Refusal):
            refusals.append(taken)
            continue
        lock = taken
        try:
            bound = _bind_or_refusal(host, port, backlog, owners)
        except BaseException:
            lock.release()
            raise
        if isinstance(bound, Refusal):
            lock.release()
            refusals.append(bound)
            continue
        try:
            lock.write_record(app=app, instance=instance, service=service, host=host)
        except OSError as e:
            _close_all(bound)
            lock.release()
            raise write_error(f"{state.path}/ports/{port}.json", "cannot write metadata", e) from e
        except BaseException:
            _close_all(bound)
            lock.release()
            raise
        lease = Lease(port, host, bound[0], lock, service, refusals, bound[1:], backlog)
        lock.lock.guards = lease  # dropped unreleased, it stays whole until exit
        return lease
    raise PoolExhausted(pool, refusals, service or None)
