"""Layouts: an app's services and how each one's pool is computed per instance.

A pool is computed, never stored: service S of instance n gets ``S.size`` consecutive
ports from ``S.base + S.stride * (n - 1)``. A layout is only accepted when every pool of
every admissible instance is inside 1..65535 and shares no port with any other; the
admissible instance count (computed in ``portpool._layout_checks``) may only be lowered
by ``max_instances``.

Layouts come from a TOML file (``load_layout``), from a mapping (``parse_layout``), or
are built in (``default_layout``). Every problem is collected and raised at once as one
``LayoutError`` whose ``errors`` read ``FILE: KEY: PROBLEM``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import re
import stat
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

from portpool._layout_checks import (
    BROWSER_UNSAFE_PORTS,
    INSTANCE_LIMIT,
    MAX_PORT,
    MAX_SERVICES,
    Problem,
    admissible_instances,
    count_admissible,
    env_collisions,
    instance1_overlaps,
    port_warnings,
    span,
)
from portpool._order import dependency_problems
from portpool._restart import RESTART_POLICIES
from portpool.errors import LayoutError, LayoutFileError, UnknownService

__all__ = [
    "BROWSER_UNSAFE_PORTS",
    "INSTANCE_LIMIT",
    "INTERVAL_MAX_S",
    "INTERVAL_MIN_S",
    "MAX_PORT",
    "MAX_SERVICES",
    "SERVICE_SOCKET_MODES",
    "Layout",
    "Service",
    "admissible_instances",
    "default_layout",
    "describe_layout",
    "is_finite_number",
    "load_layout",
    "parse_layout",
    "port_env_name",
    "resolve_layout",
]

SERVICE_SOCKET_MODES = ("fd", "port")

_SERVICE_KEYS = (
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
DEFAULT_READY_TIMEOUT_S = 30.0
_TOP_KEYS = (
    "app",
    "host",
    "heartbeat_interval",
    "shield_interval",
    "max_instances",
    "services",
)


# --- small helpers ------------------------------------------------------------------


def _toml_type(value: object) -> str:
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


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _name_problem(kind: str, name: object) -> str | None:
    if not isinstance(name, str):
        return f"{kind} name must be a string, not {_toml_type(name)}"
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
        f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


# --- services -----------------------------------------------------------------------


def _service_problems(
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
        if not _is_int(value):
            out.append((f"{key}.{sub}", f"must be an integer, not {_toml_type(value)}"))
        elif value < low:
            out.append((f"{key}.{sub}", f"must be >= {low}, not {value}"))
    if _is_int(base) and base > MAX_PORT:
        out.append((f"{key}.base", f"{base} is not a port in 1..{MAX_PORT}"))
    elif _is_int(base) and _is_int(size) and base >= 1 and size >= 1:
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
            out.append((f"{key}.command", f"must be a non-empty array of strings, not {command!r}"))
        else:
            for i, arg in enumerate(command):
                if not isinstance(arg, str):
                    out.append((f"{key}.command[{i}]", f"must be a string, not {_toml_type(arg)}"))
                elif "\0" in arg:
                    out.append((f"{key}.command[{i}]", "must not contain a NUL character"))
            if isinstance(command[0], str) and not command[0]:
                out.append((f"{key}.command[0]", "the program must not be empty"))
    if socket not in SERVICE_SOCKET_MODES:
        out.append(
            (
                f"{key}.socket",
                f"must be one of {', '.join(map(repr, SERVICE_SOCKET_MODES))}, not {socket!r}",
            )
        )
    out.extend(_supervision_problems(key, restart, depends_on, ready, ready_timeout_s))
    return out


def _ready_problem(ready: object) -> str | None:
    """None if ``ready`` is "tcp", "none", "http:/<path>" or "log:<regex>"."""
    if not isinstance(ready, str):
        return f"must be a string, not {_toml_type(ready)}"
    kind, colon, arg = ready.partition(":")
    if ready in ("tcp", "none"):
        return None
    if kind == "http" and colon:
        return None if arg.startswith("/") else f"the path must start with '/', not {arg!r}"
    if kind == "log" and colon:
        if not arg:
            return "log: needs a regular expression, e.g. 'log:listening on'"
        try:
            re.compile(arg)
        except re.error as e:
            return f"invalid regular expression {arg!r}: {e}"
        return None
    return f"must be 'tcp', 'http:<path>', 'log:<regex>' or 'none', not {ready!r}"


def _supervision_problems(
    key: str, restart: object, depends_on: object, ready: object, ready_timeout_s: object
) -> list[Problem]:
    """Problems of the keys that say how ``up`` starts, checks and restarts a service."""
    out: list[Problem] = []
    if restart not in RESTART_POLICIES:
        allowed = ", ".join(map(repr, RESTART_POLICIES))
        out.append((f"{key}.restart", f"must be one of {allowed}, not {restart!r}"))
    if not isinstance(depends_on, list | tuple):
        out.append((f"{key}.depends_on", f"must be an array of service names, not {depends_on!r}"))
    else:
        for i, dep in enumerate(depends_on):
            if not isinstance(dep, str):
                out.append((f"{key}.depends_on[{i}]", f"must be a string, not {_toml_type(dep)}"))
    problem = _ready_problem(ready)
    if problem:
        out.append((f"{key}.ready", problem))
    problem = _interval_problem(ready_timeout_s)
    if problem:
        out.append((f"{key}.ready_timeout_s", problem))
    return out


def _dependency_problems(
    services: Sequence[Service], names: Collection[str] | None = None
) -> list[Problem]:
    graph = {s.name: s.depends_on for s in services}
    found = dependency_problems(graph, names)
    return [(f"services.{name}.depends_on", p) for name, p in found]


@dataclass(frozen=True)
class Service:
    """One service of a layout and the rule that gives its pool in every instance.

    Raises LayoutError when a field is invalid (name, base, size, stride, command,
    socket, restart, depends_on, ready, ready_timeout_s), naming the key. ``restart``,
    ``depends_on``, ``ready`` and ``ready_timeout_s`` (seconds) only matter to ``up``.
    """

    name: str
    base: int
    size: int
    stride: int = 100
    command: tuple[str, ...] | None = None
    socket: str = "fd"
    restart: str = "no"
    depends_on: tuple[str, ...] = ()
    ready: str = "tcp"
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S

    def __post_init__(self) -> None:
        if isinstance(self.command, list):
            object.__setattr__(self, "command", tuple(self.command))
        if isinstance(self.depends_on, list):
            object.__setattr__(self, "depends_on", tuple(self.depends_on))
        problems = _service_problems(
            name=self.name,
            base=self.base,
            size=self.size,
            stride=self.stride,
            command=self.command,
            socket=self.socket,
            restart=self.restart,
            depends_on=self.depends_on,
            ready=self.ready,
            ready_timeout_s=self.ready_timeout_s,
        )
        if problems:
            raise _layout_error("<service>", problems)
        object.__setattr__(self, "ready_timeout_s", float(self.ready_timeout_s))

    def first_port(self, instance: int) -> int:
        """The first port of this service's pool in ``instance`` (1-based)."""
        if not _is_int(instance) or instance < 1:
            raise ValueError(f"instance numbers start at 1, not {instance!r}")
        return self.base + self.stride * (instance - 1)

    def pool(self, instance: int) -> list[int]:
        """The ordered ports of this service's pool in ``instance`` (1-based).

        Raises ValueError if ``instance`` < 1. It does not check the port range: use
        ``Layout.pool`` for an instance the layout admits.
        """
        first = self.first_port(instance)
        return list(range(first, first + self.size))

    @property
    def env_name(self) -> str:
        """The environment variable that carries this service's port: PORTPOOL_PORT_<NAME>."""
        return port_env_name(self.name)


def port_env_name(service: str) -> str:
    """``PORTPOOL_PORT_API_SERVER`` for ``api-server``: upper case, "_" for the rest."""
    return "PORTPOOL_PORT_" + re.sub(r"[^A-Za-z0-9]", "_", service).upper()


# --- layouts ------------------------------------------------------------------------


def _layout_error(source: str, problems: Sequence[Problem]) -> LayoutError:
    key, problem = problems[0]
    return LayoutError(source, key, problem, errors=[f"{source}: {k}: {p}" for k, p in problems])


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
        return f"must be a number of seconds, not {_toml_type(value)}"
    if not is_finite_number(value) or not INTERVAL_MIN_S <= value <= INTERVAL_MAX_S:
        return (
            f"must be a number of seconds from {INTERVAL_MIN_S:g} to {INTERVAL_MAX_S:g} "
            f"(one day), not {value!r}"
        )
    return None


def _host_problem(host: object) -> str | None:
    """Why ``host`` cannot be bound by every lease, or None. Hosts the kernel can never
    bind are refused here, not by every bind later ("Invalid argument", exit 3)."""
    if not isinstance(host, str):
        return f"must be a string, not {_toml_type(host)}"
    if host == "localhost":
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"must be an IP address (e.g. 127.0.0.1 or ::1) or 'localhost', not {host!r}"
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
        if ip.ipv4_mapped is not None:
            return (
                f"{host!r} is an IPv4-mapped address, which portpool's IPv6 sockets cannot "
                f"bind; write {ip.ipv4_mapped} instead"
            )
    if ip.is_multicast or (ip.version == 4 and host == "255.255.255.255"):
        return f"{host!r} is a multicast or broadcast address; a TCP server cannot bind it"
    return None


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


def host_meaning(host: str) -> str:
    """One line saying which addresses a lease on ``host`` covers (for ``layout``), for
    the host's canonical spelling (``::0`` is ``::``)."""
    host = normalize_host(host)
    if host == "localhost":
        return (
            "127.0.0.1, served, and ::1, held bound so no other program can listen there "
            "(a client trying ::1 first is refused and falls back to 127.0.0.1)"
        )
    if host == "::":
        return "every IPv6 and IPv4 address, one dual-stack socket (IPV6_V6ONLY off)"
    if host == "0.0.0.0":
        return (
            "every IPv4 address; IPv6 clients are not served by this lease "
            "(another program may listen on ::1)"
        )
    if host == "127.0.0.1":
        return (
            "the IPv4 loopback only; IPv6 clients ('localhost' resolved to ::1) are not "
            "served by this lease (another program may listen on ::1)"
        )
    if host == "::1":
        return (
            "the IPv6 loopback only; IPv4 clients are not served by this lease "
            "(another program may listen on 127.0.0.1)"
        )
    return f"{host} only; the port's other addresses follow the kernel's bind rules"


def _field_problems(
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
        if not _is_int(max_instances):
            out.append(("max_instances", f"must be an integer, not {_toml_type(max_instances)}"))
        elif max_instances < 1:
            out.append(("max_instances", f"must be >= 1, not {max_instances}"))
    return out


def _too_many(count: int) -> str:
    return f"has {count} services; a layout may have at most {MAX_SERVICES}"


def _cross_problems(
    services: Sequence[Service], max_instances: object, names: Collection[str] | None = None
) -> tuple[list[Problem], int, str]:
    """Problems between services: names, overlaps, the admissible count and the maximum."""
    out: list[Problem] = []
    if not services:
        out.append(("services", "at least one service is required, e.g. [services.api]"))
        return out, 0, "there are no services"
    if len(services) > MAX_SERVICES:
        out.append(("services", _too_many(len(services))))
        return out, 0, "there are too many services"
    out.extend(env_collisions(services))
    out.extend(_dependency_problems(services, names))
    out.extend(instance1_overlaps(services))
    admissible, reason = count_admissible(services, INSTANCE_LIMIT)
    if admissible == 0 and not out:
        out.append(("services", f"no instance is possible: {reason}"))
    elif admissible and _is_int(max_instances) and max_instances > admissible:
        out.append(
            (
                "max_instances",
                f"is {max_instances} but at most {admissible} instances keep every pool "
                f"disjoint and inside 1..{MAX_PORT}: {reason}",
            )
        )
    return out, admissible, reason


@dataclass(frozen=True)
class Layout:
    """An app's validated layout.

    ``max_instances`` is the effective maximum: pass 0 (the default) for the computed
    admissible count, or a lower number. ``admissible_instances``, ``limit_reason`` and
    ``warnings`` are derived on construction; values passed for them are replaced.
    Raises LayoutError listing every problem, with ``source`` as the file.
    """

    app: str
    services: tuple[Service, ...]
    host: str = "127.0.0.1"
    heartbeat_interval: float = 30.0
    shield_interval: float = 10.0
    max_instances: int = 0
    admissible_instances: int = 0
    source: str = "<default>"
    warnings: tuple[str, ...] = ()
    limit_reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        services = tuple(self.services)
        object.__setattr__(self, "services", services)
        requested = self.max_instances or None
        problems = _field_problems(
            self.app, self.host, self.heartbeat_interval, self.shield_interval, requested
        )
        bad = [s for s in services if not isinstance(s, Service)]
        if bad:
            problems.append(("services", f"must be Service objects, not {bad[0]!r}"))
            raise _layout_error(self.source, problems)
        cross, admissible, reason = _cross_problems(services, requested)
        problems.extend(cross)
        if problems:
            raise _layout_error(self.source, problems)
        object.__setattr__(self, "heartbeat_interval", float(self.heartbeat_interval))
        object.__setattr__(self, "shield_interval", float(self.shield_interval))
        object.__setattr__(self, "admissible_instances", admissible)
        object.__setattr__(self, "max_instances", requested or admissible)
        object.__setattr__(self, "limit_reason", reason)
        # Only instances that can run: a lowered maximum silences the rest.
        warnings = port_warnings(self.source, services, requested or admissible)
        object.__setattr__(self, "warnings", tuple(warnings))

    @property
    def descriptors_needed(self) -> int:
        """About how many file descriptors an instance of this layout holds: per service
        a lock, its record and the listening socket; plus the slot, std streams and
        the state dir's handles."""
        return 3 * len(self.services) + 16

    def service(self, name: str) -> Service:
        """The service called ``name``; LayoutError naming the known ones if there is none."""
        for s in self.services:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.services)
        raise UnknownService(
            self.source, f"services.{name}", f"no such service; this layout has: {known}"
        )

    def _check_instance(self, instance: int) -> None:
        if not _is_int(instance) or not 1 <= instance <= self.admissible_instances:
            raise ValueError(
                f"instance must be 1..{self.admissible_instances} for app {self.app!r}, "
                f"not {instance!r}"
            )

    def pool(self, service: str, instance: int) -> list[int]:
        """The pool of ``service`` in ``instance``: ValueError outside 1..admissible."""
        self._check_instance(instance)
        return self.service(service).pool(instance)

    def pools(self, instance: int) -> dict[str, list[int]]:
        """Every service's pool in ``instance``, in the layout's service order."""
        self._check_instance(instance)
        return {s.name: s.pool(instance) for s in self.services}

    def with_changes(self, **changes: object) -> Layout:
        """A copy with ``changes`` applied and validated again (LayoutError if invalid).

        A maximum that was not lowered follows the new admissible count.
        """
        if "max_instances" not in changes and self.max_instances == self.admissible_instances:
            changes["max_instances"] = 0
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# --- the built-in layout ------------------------------------------------------------

_DEFAULT_SERVICES = (
    ("mcp-universal", 6000, 3),
    ("ollama-mcp", 6010, 3),
    ("groq-api", 6020, 3),
    ("sandra-ia", 6030, 4),
    ("conversational", 7000, 5),
    ("api-server", 9000, 3),
)
_DEFAULT_DEPENDS_ON = {
    "api-server": ("mcp-universal", "ollama-mcp", "groq-api", "sandra-ia", "conversational")
}


@functools.lru_cache(maxsize=1)
def default_layout() -> Layout:
    """The original system's layout, started with the built-in reference services."""
    return Layout(
        app="qwen-valencia",
        services=tuple(
            Service(
                name=name,
                base=base,
                size=size,
                stride=100,
                command=(sys.executable, "-m", "portpool.services", name),
                socket="fd",
                # "is up" means every service answers, the dashboard (api-server) last.
                ready="http:/health",
                depends_on=_DEFAULT_DEPENDS_ON.get(name, ()),
            )
            for name, base, size in _DEFAULT_SERVICES
        ),
        host="127.0.0.1",
        heartbeat_interval=30.0,
        shield_interval=10.0,
    )


# --- parsing ------------------------------------------------------------------------


def _unknown_keys(table: Iterable[object], known: Sequence[str], prefix: str) -> list[Problem]:
    out: list[Problem] = []
    for key in table:
        if key not in known:
            where = f"{prefix}{key}" if isinstance(key, str) else f"{prefix}{key!r}"
            out.append((where, f"unknown key; expected one of: {', '.join(known)}"))
    return out


def parse_layout(data: Mapping[str, object], source: str) -> Layout:
    """The layout described by ``data`` (a parsed TOML document) from file ``source``.

    Raises LayoutError listing every problem as ``source: key: problem``.
    """
    if not isinstance(data, Mapping):
        raise LayoutError(source, "<document>", f"must be a table, not {_toml_type(data)}")
    problems = _unknown_keys(data, _TOP_KEYS, "")
    if "app" not in data:
        problems.append(("app", 'is required, e.g. app = "myapp"'))
    app = data.get("app", "app")
    host = data.get("host", "127.0.0.1")
    heartbeat = data.get("heartbeat_interval", 30.0)
    shield = data.get("shield_interval", 10.0)
    max_instances = data.get("max_instances")
    problems.extend(_field_problems(app, host, heartbeat, shield, max_instances))

    services: list[Service] = []
    raw_services = data.get("services")
    if raw_services is None:
        problems.append(("services", "at least one service is required, e.g. [services.api]"))
    elif not isinstance(raw_services, Mapping):
        problems.append(("services", f"must be a table, not {_toml_type(raw_services)}"))
    elif not raw_services:
        problems.append(("services", "at least one service is required, e.g. [services.api]"))
    elif len(raw_services) > MAX_SERVICES:
        # Refused before any per-service work: validation stays bounded whatever the file.
        problems.append(("services", _too_many(len(raw_services))))
    else:
        for name, table in raw_services.items():
            key = f"services.{name}"
            if not isinstance(table, Mapping):
                problems.append((key, f"must be a table, not {_toml_type(table)}"))
                continue
            own = _unknown_keys(table, _SERVICE_KEYS, f"{key}.")
            own.extend((f"{key}.{k}", "is required") for k in ("base", "size") if k not in table)
            own.extend(
                _service_problems(
                    name=name,
                    base=table.get("base", 1),
                    size=table.get("size", 1),
                    stride=table.get("stride", 100),
                    command=table.get("command"),
                    socket=table.get("socket", "fd"),
                    restart=table.get("restart", "no"),
                    depends_on=table.get("depends_on", ()),
                    ready=table.get("ready", "tcp"),
                    ready_timeout_s=table.get("ready_timeout_s", DEFAULT_READY_TIMEOUT_S),
                )
            )
            if own:
                problems.extend(own)
                continue
            command = table.get("command")
            services.append(
                Service(
                    name=name,
                    base=table["base"],
                    size=table["size"],
                    stride=table.get("stride", 100),
                    command=tuple(command) if command is not None else None,
                    socket=table.get("socket", "fd"),
                    restart=table.get("restart", "no"),
                    depends_on=tuple(table.get("depends_on", ())),
                    ready=table.get("ready", "tcp"),
                    ready_timeout_s=table.get("ready_timeout_s", DEFAULT_READY_TIMEOUT_S),
                )
            )
    if problems:
        # Report what is wrong between the services that are right, too.
        if services:
            names = [str(n) for n in raw_services] if isinstance(raw_services, Mapping) else None
            problems.extend(_cross_problems(services, max_instances, names)[0])
        raise _layout_error(source, problems)
    return Layout(
        app=app,  # type: ignore[arg-type]
        services=tuple(services),
        host=host,  # type: ignore[arg-type]
        heartbeat_interval=heartbeat,  # type: ignore[arg-type]
        shield_interval=shield,  # type: ignore[arg-type]
        max_instances=max_instances or 0,  # type: ignore[arg-type]
        source=source,
    )


_AT = re.compile(r"\s*\(at (line (\d+), column (\d+)|end of document)\)\s*$")
_DECLARED_TWICE = re.compile(r"Cannot declare \(((?:'(?:[^'\\]|\\.)*',? ?)+)\) twice")
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"^\s*([^=#\[]+?)\s*=")


def _dotted(raw: str) -> list[str]:
    return [p.strip().strip("\"'") for p in raw.split(".")]


def _duplicate_key(text: str, message: str, line: int | None) -> list[str] | None:
    """The dotted key a TOML "declared twice" / "cannot overwrite" error is about, if
    it can be told; tomllib only gives the position."""
    m = _DECLARED_TWICE.search(message)
    if m:
        return re.findall(r"'((?:[^'\\]|\\.)*)'", m.group(1))
    if line is None or "Cannot overwrite a value" not in message:
        return None
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return None
    km = _KEY_LINE.match(lines[line - 1])
    if not km:
        return None
    header: list[str] = []
    for previous in reversed(lines[: line - 1]):
        hm = _HEADER.match(previous)
        if hm:
            header = _dotted(hm.group(1))
            break
    return header + _dotted(km.group(1))


def _syntax_error(path: str, text: str, error: ValueError) -> LayoutError:
    message = str(error)
    m = _AT.search(message)
    line: int | None = None
    if m and m.group(2):
        line = int(m.group(2))
        where = f"line {line}, column {m.group(3)}"
    elif m:
        where = "end of document"
    else:
        where = "<document>"
    bare = message[: m.start()] if m else message
    key = _duplicate_key(text, bare, line)
    if key is not None and len(key) == 2 and key[0] == "services":
        return LayoutError(
            path, ".".join(key), f"duplicate service name (declared again at {where})"
        )
    if key:
        return LayoutError(path, ".".join(key), f"is set twice (again at {where})")
    return LayoutError(path, where, f"invalid TOML: {bare}")


LAYOUT_MAX_BYTES = 1 << 20  # a real layout is a few KiB; /dev/zero once read until MemoryError

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _read_layout_file(path: str) -> bytes:
    """The bytes of the regular file at ``path``, at most ``LAYOUT_MAX_BYTES``.

    O_NONBLOCK: opening a FIFO must not wait for a writer (it hung forever). The kind
    is checked on the open file (fstat), so it cannot be swapped after the check.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        if os.path.islink(path):
            problem = "is a dangling symbolic link: its target does not exist"
            raise LayoutFileError(path, problem) from e
        raise LayoutFileError(path, f"cannot be read: {e.strerror or e}") from e
    except OSError as e:
        raise LayoutFileError(path, f"cannot be read: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise LayoutFileError(path, f"is {kind}, not a regular file; give a TOML file")
        chunks: list[bytes] = []
        size = 0
        while size <= LAYOUT_MAX_BYTES:
            chunk = os.read(fd, LAYOUT_MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise LayoutFileError(path, f"cannot be read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if size > LAYOUT_MAX_BYTES:
        raise LayoutFileError(path, f"is larger than {LAYOUT_MAX_BYTES} bytes; not a layout")
    return b"".join(chunks)


def load_layout(path: str) -> Layout:
    """The layout in the TOML file at ``path`` (a regular file of at most
    ``LAYOUT_MAX_BYTES``; a leading UTF-8 byte order mark is accepted).

    Raises LayoutFileError (exit code 2) if the file cannot be used at all, LayoutError
    naming the file and the key (or line and column) of every problem in it.
    """
    raw = _read_layout_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LayoutError(path, f"line {line}", "is not valid UTF-8 text") from e
    text = text.removeprefix("\ufeff")  # editors on Windows write a BOM; TOML tools skip it
    import tomllib  # only when a file is read: keeps `import portpool` light

    try:
        data = tomllib.loads(text)
    except RecursionError as e:
        raise LayoutError(path, "<document>", "invalid TOML: nested too deeply") from e
    except ValueError as e:  # TOMLDecodeError, and integers too long to convert
        raise _syntax_error(path, text, e) from e
    return parse_layout(data, path)


def resolve_layout(config: str | None, cwd: str | None = None) -> Layout:
    """The layout to use: ``config`` if given, else ``portpool.toml`` in ``cwd`` (default:
    the current directory) if there is anything by that name, else the built-in layout.

    A relative ``config`` is relative to ``cwd``. Raises LayoutError; a ``portpool.toml``
    that exists but is unusable (a FIFO, a directory, a dangling symlink) is an error,
    never a reason to fall back to the built-in layout.
    """
    base = cwd if cwd is not None else ""
    if config is not None:
        return load_layout(os.path.join(base, config) if base else config)
    local = os.path.join(base, "portpool.toml") if base else "portpool.toml"
    try:
        os.lstat(local)
    except FileNotFoundError:
        return default_layout()
    except OSError as e:
        raise LayoutFileError(local, f"cannot be read: {e.strerror or e}") from e
    return load_layout(local)


# --- for people ---------------------------------------------------------------------


def host_is_literal_remote(host: str) -> bool:
    """Whether ``host`` is an IP address other than a loopback or wildcard one: only
    such a host can be missing from this machine (``_addresses.host_warning`` asks)."""
    try:
        ip = ipaddress.ip_address(normalize_host(host))
    except ValueError:
        return False  # localhost, or a name: it resolves at start
    return not (ip.is_loopback or ip.is_unspecified)


def describe_layout(layout: Layout, host_warning: str | None = None) -> list[str]:
    """The lines ``portpool layout`` prints: settings, every admissible instance's
    pools, then the warnings (``host_warning``: what the machine says of the host, from
    ``_addresses.host_warning``; a layout itself never asks the machine)."""
    origin = "built-in default layout" if layout.source == "<default>" else layout.source
    hb = f"{layout.heartbeat_interval:g}"
    sh = f"{layout.shield_interval:g}"
    lines = [
        f"app: {layout.app}",
        f"layout: {origin}",
        f"host: {layout.host}",
        f"covers: {host_meaning(layout.host)}",
        f"heartbeat every {hb} s, shield check every {sh} s",
        f"max instances: {layout.max_instances} (admissible: {layout.admissible_instances}, "
        f"because {layout.limit_reason})",
    ]
    for n in range(1, layout.max_instances + 1):
        pools = ", ".join(
            f"{s.name} {span(s.first_port(n), s.first_port(n) + s.size - 1)}"
            for s in layout.services
        )
        lines.append(f"instance {n}: {pools}")
    if layout.admissible_instances > layout.max_instances:
        lines.append(
            f"(instances {layout.max_instances + 1}..{layout.admissible_instances} would fit "
            "but are above max_instances: not used)"
        )
    lines.extend(describe_supervision(layout))
    lines.extend(f"warning: {w}" for w in layout.warnings)
    lines.extend(f"warning: {w}" for w in filter(None, [host_warning]))
    return lines


def describe_supervision(layout: Layout) -> list[str]:
    """One line per service with a command: how ``up`` starts, checks and restarts it."""
    lines = []
    for s in layout.services:
        if not s.command:
            continue
        after = ", ".join(s.depends_on) if s.depends_on else "-"
        lines.append(
            f"service {s.name}: ready {s.ready} within {s.ready_timeout_s:g} s, "
            f"restart {s.restart}, after {after}"
        )
    return lines
