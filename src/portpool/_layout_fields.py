"""Field validators of a layout: the problem, if any, with one value of a TOML table.

Each function takes a value as parsed (any type) and returns what is wrong with it, in
words for the ``FILE: KEY: PROBLEM`` lines of a ``LayoutError``; none raises. The model
(``portpool.layout``) collects them; relations between services are
``portpool._layout_checks``'s concern.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeGuard

from portpool._layout_checks import MAX_PORT, MAX_SERVICES, Problem
from portpool._text import cut, printable, toml_value
from portpool.errors import LayoutError

SERVICE_SOCKET_MODES = ("fd", "port")
# The layout file's keys: at its top, and in each [services.NAME] table.
TOP_KEYS = ("app", "host", "heartbeat_interval", "shield_interval", "max_instances", "services")
SERVICE_KEYS = (
    "base",
    "size",
    "stride",
    "command",
    "socket",
    "restart",
    "depends_on",
    "ready",
    "ready_timeout_s",
)
# The layout file's ``restart`` values (portpool._restart applies them): defined here so
# that reading a layout never loads the supervisor's restart machinery.
RESTART_POLICIES = ("no", "on-failure", "always")

DEFAULT_READY_TIMEOUT_S = 30.0


# --- small helpers ------------------------------------------------------------------


def layout_error(source: str, problems: Sequence[Problem]) -> LayoutError:
    """One LayoutError for every problem, each line ``FILE: KEY: PROBLEM``."""
    key, problem = problems[0]
    # A key holds a service name of any length: cut, as values are.
    lines = [f"{printable(source)}: {printable(cut(k, 120))}: {p}" for k, p in problems]
    return LayoutError(source, key, problem, errors=lines)


def toml_type(value: object) -> str:
    """The TOML name of ``value``'s type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _name_problem(kind: str, name: object) -> str | None:
    if not isinstance(name, str):
        return f"{kind} name must be a string, not {toml_type(name)}"
    return name_problem(kind, name)


# App and service names become path components of the state dir (statedir.check_name
# enforces this rule there); "\Z", because "$" accepts a final newline.
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def name_problem(kind: str, name: str) -> str | None:
    """Why ``name`` (an app or service name, ``kind`` says which) is not valid, or None.

    Names become path components: no separators, no leading dot, 1-64 characters.
    """
    if _NAME.match(name):
        return None
    return (
        f"{kind} name {toml_value(name)} must be 1-64 letters, digits, '.', '_' or '-', "
        "all ASCII, starting with a letter or digit"
    )


def unknown_key_problems(
    table: Iterable[object], known: Sequence[str], prefix: str
) -> list[Problem]:
    """Each key of ``table`` not in ``known`` (TOP_KEYS or SERVICE_KEYS), as
    ``PREFIXKEY``, with the key it probably is or where it belongs."""
    out: list[Problem] = []
    for key in table:
        if key not in known:
            where = f"{prefix}{key}" if isinstance(key, str) else f"{prefix}{key!r}"
            hint = _key_hint(key, known) if isinstance(key, str) else ""
            out.append((where, f"unknown key{hint}; expected one of: {', '.join(known)}"))
    return out


# Words other tools use for a key of ours (no spelling is close: "port" is not "base").
_OTHER_WORDS = {
    "port": "base",
    "first_port": "base",
    "start": "base",
    "start_port": "base",
    "count": "size",
    "ports": "size",
    "pool_size": "size",
    "cmd": "command",
    "argv": "command",
    "after": "depends_on",
    "requires": "depends_on",
    "needs": "depends_on",
    "healthcheck": "ready",
    "health": "ready",
    "timeout": "ready_timeout_s",
    "name": "app",
    "instances": "max_instances",
    "heartbeat": "heartbeat_interval",
    "shield": "shield_interval",
    "address": "host",
    "bind": "host",
    "service": "services",
}


def _key_hint(key: str, known: Sequence[str]) -> str:
    """`` (did you mean 'command'?)`` for a typo, or where a key of the other level goes:
    a bare "unknown key" left ``comand`` or a top-level ``base`` to be puzzled out."""
    import difflib  # only for a file with an unknown key

    close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.75)
    if close:
        return f" (did you mean {close[0]!r}?)"
    meant = _OTHER_WORDS.get(key.lower().replace("-", "_"))
    if meant is not None and meant in known:
        return f" (did you mean {meant!r}?)"
    if tuple(known) == TOP_KEYS and key in SERVICE_KEYS:
        return " (it belongs in a [services.NAME] table)"
    if tuple(known) == SERVICE_KEYS and key in TOP_KEYS:
        return " (it belongs at the top of the file, before any [services.NAME] table)"
    return ""


# --- services -----------------------------------------------------------------------


def service_problems(
    *,
    name: object,
    base: object,
    size: object,
    stride: object,
    command: object,
    socket: object,
    restart: object = "no",
    depends_on: object = (),
    ready: object = "tcp",
    ready_timeout_s: object = DEFAULT_READY_TIMEOUT_S,
) -> list[Problem]:
    """Every problem of one service's own fields (not of its relation to others)."""
    key = f"services.{name}"
    out: list[Problem] = []
    problem = _name_problem("service", name)
    if problem:
        out.append((key, problem))
    for sub, value, low in (("base", base, 1), ("size", size, 1), ("stride", stride, 0)):
        if not is_int(value):
            out.append((f"{key}.{sub}", f"must be an integer, not {toml_type(value)}"))
        elif value < low:
            out.append((f"{key}.{sub}", f"must be >= {low}, not {value}"))
    if is_int(base) and base > MAX_PORT:
        out.append((f"{key}.base", f"{base} is not a port in 1..{MAX_PORT}"))
    elif is_int(base) and is_int(size) and base >= 1 and size >= 1:
        last = base + size - 1
        if last > MAX_PORT:
            out.append(
                (
                    f"{key}.size",
                    f"instance 1's pool {base}..{last} leaves the port range 1..{MAX_PORT}",
                )
            )
    if command is not None:
        if not isinstance(command, list | tuple) or not command:
            wrong = f"must be a non-empty array of strings, not {toml_value(command)}"
            out.append((f"{key}.command", wrong))
        else:
            for i, arg in enumerate(command):
                if not isinstance(arg, str):
                    out.append((f"{key}.command[{i}]", f"must be a string, not {toml_type(arg)}"))
                elif "\0" in arg:
                    out.append((f"{key}.command[{i}]", "must not contain a NUL character"))
            if isinstance(command[0], str) and not command[0]:
                out.append((f"{key}.command[0]", "the program must not be empty"))
    if socket not in SERVICE_SOCKET_MODES:
        out.append(
            (
                f"{key}.socket",
                f"must be one of {', '.join(map(repr, SERVICE_SOCKET_MODES))}, "
                f"not {toml_value(socket)}",
            )
        )
    out.extend(_supervision_problems(key, restart, depends_on, ready, ready_timeout_s))
    return out


def _ready_problem(ready: object) -> str | None:
    """None if ``ready`` is "tcp", "none", "http:/<path>" or "log:<regex>"."""
    if not isinstance(ready, str):
        return f"must be a string, not {toml_type(ready)}"
    kind, colon, arg = ready.partition(":")
    if ready in ("tcp", "none"):
        return None
    if kind == "http" and colon:
        if not arg.startswith("/"):
            return f"the path must start with '/', not {toml_value(arg)}"
        if arg.startswith("//"):
            # "http://127.0.0.1:8000/health" passed and then asked the service for the
            # path "//127.0.0.1:8000/health": a 404 until ready_timeout_s, exit 5.
            return (
                f"give the path only, e.g. 'http:/health', not {toml_value(ready)}: the probe asks "
                "the service's own address and port"
            )
        if "#" in arg:
            # Sent as written, "/health#top" is a path no server routes (browsers drop it).
            return f"the path must have no '#fragment' (it is never sent), not {toml_value(arg)}"
        if any(c.isspace() or not c.isprintable() for c in arg):
            # "http:/ he alth" passed and failed only after ready_timeout_s, at run time
            return f"the path must have no spaces or control characters, not {toml_value(arg)}"
        return None
    if kind == "log" and colon:
        if not arg:
            return "log: needs a regular expression, e.g. 'log:listening on'"
        try:
            re.compile(arg)
        # OverflowError, RecursionError: "a{99999999999}" ended in a traceback.
        except (re.error, OverflowError, RecursionError) as e:
            return f"invalid regular expression {toml_value(arg)}: {e}"
        return None
    return f"must be 'tcp', 'http:<path>', 'log:<regex>' or 'none', not {toml_value(ready)}"


def _supervision_problems(
    key: str, restart: object, depends_on: object, ready: object, ready_timeout_s: object
) -> list[Problem]:
    """Problems of the keys that say how ``up`` starts, checks and restarts a service."""
    out: list[Problem] = []
    if restart not in RESTART_POLICIES:
        allowed = ", ".join(map(repr, RESTART_POLICIES))
        out.append((f"{key}.restart", f"must be one of {allowed}, not {toml_value(restart)}"))
    if not isinstance(depends_on, list | tuple):
        wrong = f"must be an array of service names, not {toml_value(depends_on)}"
        out.append((f"{key}.depends_on", wrong))
    elif len(depends_on) > MAX_SERVICES:
        # Bounded whatever the file: 20,000 names took 5 s and printed 20,000 lines.
        too_many = f"names {len(depends_on)} services; a layout has at most {MAX_SERVICES}"
        out.append((f"{key}.depends_on", too_many))
    else:
        seen: set[str] = set()
        for i, dep in enumerate(depends_on):
            if not isinstance(dep, str):
                out.append((f"{key}.depends_on[{i}]", f"must be a string, not {toml_type(dep)}"))
            elif dep in seen:
                out.append((f"{key}.depends_on[{i}]", f"names {toml_value(dep)} twice"))
            else:
                seen.add(dep)
    problem = _ready_problem(ready)
    if problem:
        out.append((f"{key}.ready", problem))
    problem = _interval_problem(ready_timeout_s)
    if problem:
        out.append((f"{key}.ready_timeout_s", problem))
    return out


def is_finite_number(value: float) -> bool:
    """False for NaN, infinities, and integers too large to be a float (10**400)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# Intervals outside this range broke the threads that use them: 1e10 s overflowed the
# thread's wait (the shield died silently), 1e-300 s busy-looped a core.
INTERVAL_MIN_S = 0.01
INTERVAL_MAX_S = 86400.0


def _interval_problem(value: object) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"must be a number of seconds, not {toml_type(value)}"
    if not is_finite_number(value) or not INTERVAL_MIN_S <= value <= INTERVAL_MAX_S:
        return (
            f"must be a number of seconds from {INTERVAL_MIN_S:g} to {INTERVAL_MAX_S:g} "
            f"(one day), not {toml_value(value)}"
        )
    return None


def _host_problem(host: object) -> str | None:
    """Why ``host`` cannot be bound by every lease, or None. Hosts the kernel can never
    bind are refused here, not by every bind later ("Invalid argument", exit 3)."""
    if not isinstance(host, str):
        return f"must be a string, not {toml_type(host)}"
    if host.lower() == "localhost":  # a name's case never matters, as acquire's does not
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        shown = toml_value(host)
        return f"must be an IP address (e.g. 127.0.0.1 or ::1) or 'localhost', not {shown}"
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    # Before the advice to write the IPv4 address of a mapped one: 224.0.0.1 is refused too.
    if no_tcp_listener(ip):
        return f"{host!r} is a multicast or broadcast address; a TCP server cannot bind it"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            base = host.partition("%")[0]
            fix = (
                "a link-local address cannot be bound portably either; use ::1, :: or a "
                "global address"
                if ip.is_link_local
                else f"write {base!r}"
            )
            return f"{host!r} has a scope id (%{ip.scope_id}), which portpool cannot bind; {fix}"
        if ip.is_link_local:
            return (
                f"{host!r} is a link-local address, which a TCP server cannot portably "
                "bind; use ::1, :: or a global address"
            )
        if mapped is not None:
            return (
                f"{host!r} is an IPv4-mapped address, which portpool's IPv6 sockets cannot "
                f"bind; write {mapped} instead"
            )
    return None


def no_tcp_listener(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` (or the IPv4 address it maps) is multicast or the broadcast
    address: a TCP server can never listen there. Raises nothing."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # what the kernel binds for it (::ffff:224.0.0.1 was leased)
    return ip.is_multicast or str(ip) == "255.255.255.255"


def normalize_host(host: str) -> str:
    """The one spelling of ``host`` every judgement uses (layout text, the diagnosis,
    the shield): an IP literal in its canonical form (``::0`` and ``0:0:0:0:0:0:0:0`` are
    ``::``, ``0:0:0:0:0:0:0:1`` is ``::1``), ``localhost`` in lower case, any other name
    as given. ``layout`` said "covers: ::0 only" for a host that binds dual-stack."""
    if host.lower() == "localhost":
        return "localhost"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def field_problems(
    app: object, host: object, heartbeat: object, shield: object, max_instances: object
) -> list[Problem]:
    """Every problem of a layout's top-level fields."""
    out: list[Problem] = []
    problem = _name_problem("app", app)
    if problem:
        out.append(("app", problem))
    problem = _host_problem(host)
    if problem:
        out.append(("host", problem))
    for key, value in (("heartbeat_interval", heartbeat), ("shield_interval", shield)):
        problem = _interval_problem(value)
        if problem:
            out.append((key, problem))
    if max_instances is not None:
        if not is_int(max_instances):
            out.append(("max_instances", f"must be an integer, not {toml_type(max_instances)}"))
        elif max_instances < 1:
            out.append(("max_instances", f"must be >= 1, not {max_instances}"))
    return out
