"""Receiving sockets by the systemd socket-activation protocol (POSIX).

``portpool run --fds`` and ``portpool up`` (``socket = "fd"``) start a service with its
listening sockets at fds 3, 4, ... and set ``LISTEN_FDS`` (how many),
``LISTEN_FDNAMES`` (their service names, colon-separated) and ``LISTEN_PID`` (the pid
they are meant for, so a grandchild that inherits the environment does not take them
too). In the service::

    from portpool.integrations import listen_socket, serve_http

    sock = listen_socket("api-server")   # bound and listening already: never bind again
    serve_http(sock, MyHandler)          # or serve_asgi(app, sock), serve_aiohttp(app, sock)

``listen_fds()`` gives every passed socket by name. The first call reads and unsets the
variables; later calls return the same socket objects, so asking for a second socket by
name still works. Sockets passed by systemd itself are received the same way.
"""

from __future__ import annotations

import os
import socket

from portpool.errors import PassedSocketError

LISTEN_FDS_START = 3
_ENV = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")
_MAX_FDS = 1024

# Received once per process: a socket object owns its fd, so wrapping the same fd twice
# would let one object's close (or garbage collection) close the other's socket.
_received: dict[str, socket.socket] | None = None


def _parse(count_text: str, pid_text: str | None, names_text: str) -> list[str] | None:
    """The name of each passed fd, or None when the sockets are not for this process."""
    if pid_text is None:
        return None  # the protocol requires LISTEN_PID; without it nothing is ours
    try:
        count = int(count_text)
        pid = int(pid_text)
    except ValueError:
        raise PassedSocketError(
            f"LISTEN_FDS={count_text!r} / LISTEN_PID={pid_text!r} are not numbers"
        ) from None
    if pid != os.getpid():
        return None  # meant for another process (we inherited the environment)
    if not 0 <= count <= _MAX_FDS:
        raise PassedSocketError(f"LISTEN_FDS={count} is out of range 0..{_MAX_FDS}")
    given = names_text.split(":") if names_text else []
    if len(given) > count:
        raise PassedSocketError(
            f"LISTEN_FDNAMES has {len(given)} names ({names_text!r}) for {count} sockets"
        )
    names = [
        given[i] if i < len(given) and given[i] else f"fd{LISTEN_FDS_START + i}"
        for i in range(count)
    ]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise PassedSocketError(f"LISTEN_FDNAMES names {', '.join(doubled)} more than once")
    return names


def listen_fds(unset_environment: bool = True) -> dict[str, socket.socket]:
    """The sockets passed to this process, by name (unnamed ones as "fd3", "fd4", ...).

    Returns {} when nothing was passed, or when ``LISTEN_PID`` is absent or names
    another process. Raises PassedSocketError when the variables are malformed, names
    repeat, or an fd is not a socket; on error no fd is closed or wrapped. With
    ``unset_environment`` the variables are removed (even on error), so processes we
    start do not believe the sockets are theirs. The sockets are made non-inheritable.
    Calls after the first successful one return the same socket objects.
    """
    global _received
    count_text = os.environ.get("LISTEN_FDS")
    pid_text = os.environ.get("LISTEN_PID")
    names_text = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for name in _ENV:
            os.environ.pop(name, None)
    if _received is not None:
        return dict(_received)
    if count_text is None:
        return {}
    names = _parse(count_text, pid_text, names_text)
    if names is None:
        return {}
    result: dict[str, socket.socket] = {}
    for i, name in enumerate(names):
        fd = LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            for made in result.values():
                made.detach()  # leave the fds as we found them
            raise PassedSocketError(
                f"LISTEN_FDS: fd {fd} ({name}) is not a socket: {e.strerror or e}"
            ) from e
        sock.set_inheritable(False)
        result[name] = sock
    _received = result
    return dict(result)


def listen_socket(name: str | None = None) -> socket.socket:
    """The passed socket named ``name``, or the only one passed when ``name`` is None.

    Raises PassedSocketError when nothing was passed to this process, when ``name``
    was not passed, or when ``name`` is None and several sockets were passed.
    """
    # Read before listen_fds() unsets it, to say precisely why nothing is ours.
    meant_for = os.environ.get("LISTEN_PID", "") if "LISTEN_FDS" in os.environ else ""
    sockets = listen_fds()
    if not sockets and meant_for.isdigit() and int(meant_for) != os.getpid():
        # Usually a shell that forks instead of exec'ing its last command: the sockets
        # and LISTEN_PID were given to the shell, not to us.
        parent = int(meant_for) == os.getppid()
        who = "this process's parent" if parent else "another process"
        raise PassedSocketError(
            f"LISTEN_PID is {meant_for}, the pid of {who} (a shell that started this "
            f"program without exec?), not of this process ({os.getpid()}): use `exec` in "
            "the shell command (sh -c 'exec python3 svc.py') or put the service's own "
            "command in the layout"
        )
    if not sockets:
        raise PassedSocketError(
            "no sockets were passed to this process (LISTEN_FDS/LISTEN_PID unset or for "
            'another pid); start it with `portpool run --fds` or a `socket = "fd"` service'
        )
    if name is None:
        if len(sockets) != 1:
            raise PassedSocketError(f"several sockets were passed ({', '.join(sockets)}); name one")
        return next(iter(sockets.values()))
    try:
        return sockets[name]
    except KeyError:
        raise PassedSocketError(
            f"no socket named {name!r} was passed (got: {', '.join(sockets)})"
        ) from None
