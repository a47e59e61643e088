"""Readiness probes: when a started service counts as ready, for ``portpool up``.

A layout's ``ready`` key picks the probe:

- ``"tcp"`` (default). With ``socket = "fd"`` the socket listens before the service
  starts and the kernel completes handshakes on its own, so a connect proves nothing:
  the probe connects (and closes its sending side at once), then waits until the
  kernel reports that connection taken off the listening socket's accept queue
  (``connection_accepted``: it got a file, or is gone), which only happens when the
  service calls accept(). What the service then does with the connection, an answer
  or its close, reaches the probe's still open receiving side: it wakes ``wait`` and
  proves the accept by itself, as only a process that accepted it can do either.
  With ``socket = "port"``: a connect succeeds, and no process portpool did not start
  listens where it connected.
- ``"http:<path>"``: ``GET <path>`` answers with a 2xx status.
- ``"log:<regex>"``: a line of the service's output matches (``re.search``'s syntax, each line
  given at most 0.2 s), as the
  line reads on a terminal: without a trailing carriage return, colour codes or other
  escape sequences, and each part after a carriage return inside it on its own.
- ``"none"``: ready as soon as it is started.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from portpool._addresses import endpoint
from portpool._platform import accept_queue_length, connection_accepted, is_listening
from portpool._text import cut, printable

if TYPE_CHECKING:
    import regex

__all__ = ["ReadinessProbe", "probe_host", "probe_hosts"]

_CONNECT_TIMEOUT_S = 1.0
# How long one line may take a log: pattern. Python's re cannot be stopped: a pattern
# that backtracks (^(a+)+$ on 40 a's and a b) held up's interpreter for hours, its
# ready_timeout_s and every signal with it. The regex package stops at a timeout, and
# matches with the interpreter's lock let go meanwhile.
_LINE_MATCH_S = 0.2
_PATH_SAFE = "".join(chr(c) for c in range(33, 127))  # printable ASCII stays as written
# Terminal control sequences (CSI, like colours, and OSC, like hyperlinks) a logger adds
# when it believes it writes to a terminal: "log:listening on" never matched
# "\x1b[32mlistening\x1b[0m on", which reads "listening on" on the screen. Then DCS,
# APC and the like, and every other escape (ESC, intermediates, a final byte): `tput
# sgr0` writes "\x1b(B\x1b[m", and its "\x1b(B" left "ready\x1b(B on" unmatched.
_TERMINAL_CODES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[ -/]*[0-~]"
)
_HTTP_TIMEOUT_S = 2.0
_HTTP_MIN_WAIT_S = 0.05  # the last check before the ready timeout still gets a chance
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
# How long an http answer that says the service closes the connection waits for that close.
_SERVICE_CLOSE_WAIT_S = 0.2
_ALIVE_CHECK_S = 0.1  # how often a wait for an http answer asks whether to go on
_BODY_WAIT_S = 1.0  # for the rest of an answer whose status came


def probe_host(host: str) -> str:
    """The address a local probe connects to for a service bound to ``host``."""
    if host in ("localhost", "0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def probe_hosts(host: str) -> tuple[str, ...]:
    """The addresses a local probe tries, in order, for a service bound to ``host``:
    for "localhost" both loopbacks, as clients resolve it to either (a server that
    listens on "localhost" may take ::1 alone, as Node does: it was never ready); for
    "::" both too, as its lease covers both families (a server given the port by
    number that binds 0.0.0.0 or 127.0.0.1 answered, yet was never ready)."""
    if host == "localhost":
        return ("127.0.0.1", "::1")
    if host == "::":
        return ("::1", "127.0.0.1")
    return (probe_host(host),)


def _shut_down(sock: socket.socket) -> bool:
    """Whether ``sock`` no longer listens. A service that shuts the passed socket down
    (to wake a thread blocked in accept) resets every queued connection, the probe's
    too, which then is gone from the kernel's table as if accepted and closed: up said
    "ready" for a service that never accepted, on a dead port. False where the OS does
    not say."""
    try:
        return is_listening(sock) is False
    except OSError:
        return False


class ReadinessProbe:
    """One service's readiness check, made again for every start of the service.

    ``spec`` is the layout's ``ready`` value; ``listening`` is the socket ``up`` holds
    for a ``socket = "fd"`` service (None for ``socket = "port"``). ``check()`` makes
    one bounded attempt (about 2 s at most; an http answer is awaited up to
    ``check``'s ``wait_s``) and returns True once the service is ready;
    ``feed_line`` gives it the service's output lines (for ``log:``). Thread-safe.
    """

    def __init__(
        self, spec: str, host: str, port: int, listening: socket.socket | None = None
    ) -> None:
        self.spec = spec
        self.hosts = probe_hosts(host)
        self.host = self.hosts[0]  # the address that answered last
        self.port = port
        self.listening = listening
        kind, _, arg = spec.partition(":")
        self.kind = kind
        # A request line is ASCII: "http:/héalth" raised UnicodeEncodeError in the
        # probe's thread, and up then waited forever. Sent as a browser would.
        self.path = urllib.parse.quote(arg, safe=_PATH_SAFE) if kind == "http" else ""
        self.pattern = _log_pattern(arg) if kind == "log" else None
        self._slow_line: str | None = None  # the start of a line that took too long
        self._matched = threading.Event()
        self._lines = 0  # output lines seen (log:), to say when there were none
        self._partial = False  # the last thing seen is the start of an unended line
        # (family, server side, our side) of the probe connection, once made.
        self._probe: tuple[int, tuple[str, int], tuple[str, int]] | None = None
        # Our end of that connection, half-closed, while the service has not yet used
        # it; ``_answered`` once the service wrote to it or closed it.
        self._conn: socket.socket | None = None
        self._answered = False
        self.last_problem = "not checked yet"
        # Asked every 0.1 s while an http answer is awaited: False gives up the wait
        # (the service exited, the instance stops). Set by whoever started the service.
        self.running: Callable[[], bool] = lambda: True

    def feed_line(self, line: str) -> None:
        """One line of the service's output (without its newline). Matched as it
        reads on a terminal too: without colour codes and a trailing carriage return
        (CRLF output once never matched a pattern ending in ``$``)."""
        if self.pattern is None:
            return
        self._lines += 0 if self._partial else 1  # the line whose start was counted
        self._partial = False
        plain = _TERMINAL_CODES.sub("", line).rstrip("\r")
        # A carriage return inside the line (a spinner's "starting...\rready") sends
        # the cursor back: the screen shows each part over the last, so "^ready" is
        # matched against each part too.
        parts = plain.split("\r") if "\r" in plain else ()
        if any(self._search(text) for text in (plain, line, *parts)):
            self._matched.set()

    def _search(self, text: str) -> bool:
        assert self.pattern is not None
        try:
            return self.pattern.search(text, concurrent=True, timeout=_LINE_MATCH_S) is not None
        except TimeoutError:
            self._slow_line = cut(printable(text), 60)
            return False

    def feed_partial(self, text: str) -> None:
        """The start of a line the service wrote (and flushed) without ending it yet, all
        of it so far: matched as ``feed_line`` matches a line, since a terminal shows it
        at once (a prompt, "ready" followed by a progress line). Waiting for its newline
        left such a service never ready, said to have "printed no line at all"."""
        if self.pattern is None:
            return
        self.feed_line(text)  # counts the line once, however many pieces it comes in
        self._partial = True

    def close(self) -> None:
        """Forget the probe connection (the next ``check`` makes a new one)."""
        self._drop_connection()
        self._probe = None
        self._answered = False

    def wait(self, timeout_s: float, stop: threading.Event) -> bool:
        """Wait up to ``timeout_s`` seconds before the next ``check``: True when the
        service gave a sign meanwhile that it may pass now (``tcp`` on a passed socket:
        it answered or closed the probe connection), else False once the time ran out
        or ``stop`` was set. While the probe connection is watched, ``stop`` is seen
        when the time runs out: keep ``timeout_s`` short. Sleeping the whole interval
        (up to 50 ms) made up say "ready" that late after the service accepted."""
        if self._conn is None:
            stop.wait(max(0.0, timeout_s))
            return False
        return self._read_answer(timeout_s)

    def proved_before_exit(self) -> bool:
        """After the service exited before a ``check`` saw it ready: whether it was ready
        all the same. A fast service can serve and exit between two checks (20 requests
        take less than one probe interval); its run made progress. Only a ``log:`` match
        or, for an ``fd`` socket, the probe connection taken off the queue can say so
        after the fact; an http or port probe cannot (False). ``none`` was ready when it
        started (True): a fast exit before the first check was reported as "exited before
        it was ready", and as "exited on its own" after it."""
        if self.kind == "none":
            return True
        if self.kind == "log":
            return self._matched.is_set()
        if self.kind == "tcp" and self.listening is not None and self._probe is not None:
            if self._read_answer():
                return True
            return not _shut_down(self.listening) and connection_accepted(*self._probe) is True
        return False

    def check(self, wait_s: float = _HTTP_TIMEOUT_S) -> bool:
        """One attempt; True when the service is ready (``last_problem`` says why not).
        ``wait_s``: how long an http answer may take (the time left before the ready
        timeout; at least 50 ms). A fixed 2 s made a health check that answers in
        3 s never ready, whatever ``ready_timeout_s`` allowed, and each abandoned
        request kept a single-threaded server busy for the next one; a floor of 2 s
        made one answering after ``ready_timeout_s`` ready all the same."""
        if self.kind == "none":
            return True
        if self.kind == "log":
            self.last_problem = f"no output line matched {self.spec[4:]!r} yet"
            if self._slow_line is not None:
                self.last_problem += (
                    f"; the pattern took too long on a line ({self._slow_line!r}: over "
                    f"{_LINE_MATCH_S:g} s, it backtracks: write it without nested "
                    "repetition such as (a|a)+)"
                )
            if not self._lines:
                # The usual cause: output to a pipe is block-buffered (Python, C stdio),
                # so the line a terminal showed at once never reached up.
                self.last_problem += (
                    "; the service printed no line at all (output to a pipe may stay in "
                    "its buffer: flush after the line, or for Python set PYTHONUNBUFFERED=1)"
                )
            return self._matched.is_set()
        if self.kind == "http":
            return self._check_http(max(_HTTP_MIN_WAIT_S, wait_s))
        if self.listening is not None:
            return self._check_accepting(self.listening)
        return self._check_connect()

    def _connect(self) -> socket.socket | None:
        problems = []
        for host in self.hosts:
            try:
                conn = socket.create_connection((host, self.port), timeout=_CONNECT_TIMEOUT_S)
            except OSError as e:
                problems.append(f"connect to {endpoint(host, self.port)}: {e.strerror or e}")
                continue
            self.host = host
            return conn
        self.last_problem = "; ".join(problems)
        return None

    def _check_connect(self) -> bool:
        conn = self._connect()
        if conn is None:
            return False
        conn.close()
        intruder = self._foreign_listener()
        if intruder is not None:
            self.last_problem = (
                f"port {self.port} is answered by {intruder}, not by the service: a "
                "program portpool did not start took it before the service bound it"
            )
            return False
        return True

    def _foreign_listener(self) -> str | None:
        """Who, not started by us, listens where the probe connected; None if nobody or
        the OS does not say. With ``socket = "port"`` the service binds the port itself,
        so a foreign program can be first: its answer once made a service that then
        failed to bind "ready", and every restart of a crash loop too."""
        import os

        from portpool._addresses import takes_traffic
        from portpool._occupants import foreign_listeners, with_owners
        from portpool._platform import tcp_sockets

        try:
            sockets = tcp_sockets(self.port, listening_only=True)
            found = with_owners(s for s in sockets if takes_traffic(s, self.host))
        except OSError:
            return None
        # Ours: what descends from this process, a subreaper (a daemonized service too).
        foreign = [o for o in foreign_listeners(found, os.getpid()) if o.pids]
        return f"{foreign[0].who()} on {foreign[0].place()}" if foreign else None

    def _check_accepting(self, listening: socket.socket) -> bool:
        if self._probe is None:
            conn = self._connect()
            if conn is None:
                return False
            try:
                server_side, our_side = conn.getpeername()[:2], conn.getsockname()[:2]
                # Our end closed for writing at once: a service that reads a request
                # from each connection must not wait on ours (a single-threaded server
                # would wait forever, and so would we). The connection stays queued
                # until accepted; what the service then writes, or its close, reaches
                # us (``wait``).
                conn.shutdown(socket.SHUT_WR)
            except OSError as e:
                conn.close()
                self.last_problem = f"probe connection to port {self.port}: {e.strerror or e}"
                return False
            self._conn = conn
            self._probe = (listening.family, server_side, our_side)
        if self._read_answer():
            return True
        if _shut_down(listening):
            self.last_problem = (
                f"the socket of port {self.port} no longer listens: the service shut it "
                "down without accepting a connection"
            )
            return False
        accepted = connection_accepted(*self._probe)
        if accepted is None or accepted:
            return True  # None: the OS does not say (not Linux), a handshake is all we get
        waiting = accept_queue_length(listening)
        self.last_problem = (
            f"the service has not accepted a connection on port {self.port} yet "
            f"({waiting} waiting in its accept queue)"
        )
        return False

    def _read_answer(self, timeout_s: float = 0.0) -> bool:
        """Whether the service answered or closed the probe connection (True from then
        on), waiting up to ``timeout_s`` for it. Only a process that accepted it can: a
        queued connection gets nothing. A service that closed it before our end was
        half-closed left its side waiting out TIME_WAIT without a file, which the
        kernel's table reads as "not accepted" for a minute; our end sees the close. A
        reset proves nothing (the listener may have gone): the kernel's table is asked,
        as before."""
        if self._answered:
            return True
        conn = self._conn
        if conn is None:
            return False
        try:
            # A socket timeout, not select(): select() cannot take an fd above 1023.
            conn.settimeout(timeout_s if timeout_s > 0 else 0.0)
            conn.recv(4096)  # an answer or b"" (closed): either proves the accept
        except (BlockingIOError, TimeoutError):
            return False  # nothing yet
        except OSError:
            self._drop_connection()
            return False
        self._answered = True
        self._drop_connection()
        return True

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _check_http(self, timeout_s: float) -> bool:
        import http.client  # with email and more: only for an http: probe (run needs none)

        sock = self._connect()
        if sock is None:
            self.last_problem = f"GET {self.path}: {self.last_problem}"
            return False
        sock.settimeout(timeout_s)
        try:
            last = sock.dup()  # closed after http.client's close: it says how we end
        except OSError as e:
            sock.close()
            self.last_problem = f"GET {self.path} on port {self.port}: {e.strerror or e}"
            return False
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        conn.sock = sock  # connected to whichever address answered
        response = None
        try:
            conn.request("GET", self.path, headers={"User-Agent": "portpool-readiness"})
            if not self._await_answer(sock, timeout_s):
                return False
            response = conn.getresponse()
            # The status says it all; the body is read (a close with unread data resets
            # the server's side) but not awaited: an HTTP/1.0 answer without a length
            # that kept its connection open was never ready, whatever its 200.
            sock.settimeout(min(sock.gettimeout() or _BODY_WAIT_S, _BODY_WAIT_S))
            with contextlib.suppress(OSError, http.client.HTTPException):
                response.read()
        except (OSError, http.client.HTTPException) as e:
            # The service's bytes (a status line that is not HTTP) on one printable line.
            said = cut(printable(str(e).strip())) or type(e).__name__
            self.last_problem = f"GET {self.path} on port {self.port}: {said}"
            if isinstance(e, ConnectionResetError | http.client.BadStatusLine):
                # What a TLS-only server does with a plain request: the bare "connection
                # reset" left users guessing for the whole ready_timeout_s.
                self.last_problem += (
                    " (the http: probe speaks plain HTTP; for a service that speaks only "
                    "HTTPS, use ready = 'tcp' or 'log:<regex>')"
                )
            return False
        finally:
            with contextlib.suppress(OSError):
                conn.close()
                if response is not None:
                    response.close()
            closes = response is not None and response.will_close
            _end_probe_connection(last, _SERVICE_CLOSE_WAIT_S if closes else 0.0)
        if 200 <= response.status < 300:
            return True
        self.last_problem = f"GET {self.path} on port {self.port} answered {response.status}"
        return False

    def _await_answer(self, sock: socket.socket, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the first byte of an answer (or the server's
        hang-up) on ``sock``, asking ``running`` every 0.1 s; False (``last_problem``
        says why) when it never came or ``running`` said to stop. One wait of the whole
        ready timeout missed a service that died meanwhile: with ``socket = "fd"`` the
        request stays queued on up's own socket, so up saw the exit (a restart by the
        policy) only when ready_timeout_s ran out, and stopped the instance instead."""
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                self.last_problem = f"GET {self.path} on port {self.port}: timed out"
                return False
            sock.settimeout(min(left, _ALIVE_CHECK_S))
            try:
                sock.recv(1, socket.MSG_PEEK)  # consumes nothing: http.client reads it
            except TimeoutError:
                if not self.running():
                    self.last_problem = f"GET {self.path} on port {self.port}: no answer yet"
                    return False
                continue
            except OSError:
                pass  # the read that follows says what went wrong, as before
            sock.settimeout(max(left, 0.001))
            return True


def _log_pattern(text: str) -> regex.Pattern[str]:
    """``text`` compiled for ``log:`` readiness by the regex package (Python's re
    syntax), which can stop a match. Raises regex.error (the layout checked it with re)."""
    import regex

    return regex.compile(text, flags=regex.VERSION0)


def _end_probe_connection(sock: socket.socket, wait_s: float) -> None:
    """Close a probe's connection ``sock``. One the service closed first (seen within
    ``wait_s`` seconds) is reset: our FIN left the service's side in TIME_WAIT on its
    own port, and for a minute after a stop a server without SO_REUSEADDR could not
    bind it (a server that reads on after closing its side, a lingering close, reads
    the reset instead of our end). One the service has not closed ends with our FIN, as
    usual: a reset before its own close broke its shutdown(). Raises nothing."""
    try:
        sock.settimeout(wait_s)
        with contextlib.suppress(OSError):  # a timeout, nothing yet: BlockingIOError
            if sock.recv(1, socket.MSG_PEEK) == b"":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    finally:
        sock.close()
