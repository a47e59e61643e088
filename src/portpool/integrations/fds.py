"""Receiving sockets by the systemd socket-activation protocol.

``portpool run --fds`` and ``portpool up`` (``socket = "fd"``) place the listening
sockets at fds 3, 4, ... and set ``LISTEN_FDS`` (their count), ``LISTEN_FDNAMES``
(colon-separated service names) and ``LISTEN_PID`` (the pid they are meant for, so a
grandchild that inherited the environment does not take them too).
"""

from __future__ import annotations

import os
import socket

from portpool.errors import PassedSocketError

LISTEN_FDS_START = 3
_ENV = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")


def listen_fds(unset_environment: bool = True) -> dict[str, socket.socket]:
    """The sockets passed to this process, by name (unnamed ones as "fd3", "fd4", ...).

    Returns {} when nothing was passed. Raises PassedSocketError when the variables are
    malformed or the fds are not sockets. With ``unset_environment`` the variables are
    removed, so children we start do not believe the sockets are theirs.
    """
    count_text = os.environ.get("LISTEN_FDS")
    pid_text = os.environ.get("LISTEN_PID")
    names_text = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for name in _ENV:
            os.environ.pop(name, None)
    if count_text is None:
        return {}
    try:
        count = int(count_text)
        pid = int(pid_text) if pid_text is not None else None
    except ValueError:
        raise PassedSocketError(
            f"LISTEN_FDS={count_text!r} / LISTEN_PID={pid_text!r} are not numbers"
        ) from None
    if pid is not None and pid != os.getpid():
        return {}  # meant for another process (we inherited the environment)
    if not 0 <= count <= 1024:
        raise PassedSocketError(f"LISTEN_FDS={count} is out of range")
    names = names_text.split(":") if names_text else []
    result: dict[str, socket.socket] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise PassedSocketError(f"LISTEN_FDS: fd {fd} ({name}) is not a socket: {e}") from e
        sock.set_inheritable(False)
        result[name] = sock
    return result


def listen_socket(name: str | None = None) -> socket.socket:
    """The one passed socket named ``name`` (or the only one). Raises PassedSocketError."""
    sockets = listen_fds()
    if not sockets:
        raise PassedSocketError("no sockets were passed (LISTEN_FDS is not set for this pid)")
    if name is None:
        if len(sockets) != 1:
            raise PassedSocketError(f"several sockets were passed ({', '.join(sockets)}); name one")
        return next(iter(sockets.values()))
    try:
        return sockets.pop(name)
    except KeyError:
        raise PassedSocketError(
            f"no socket named {name!r} was passed (got: {', '.join(sockets) or 'none'})"
        ) from None
