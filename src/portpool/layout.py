"""Layouts: an app's services and how each one's pool is computed per instance.

A pool is computed, never stored: service S of instance n gets ``S.size`` consecutive
ports from ``S.base + S.stride * (n - 1)``. A layout is only accepted when every pool of
every admissible instance is inside 1..65535 and shares no port with any other; the
admissible instance count (computed in ``portpool._layout_checks``) may only be lowered
by ``max_instances``.

Layouts come from a TOML file (``load_layout``), from a mapping (``parse_layout``), or
are built in (``default_layout``). Every problem is collected and raised at once as one
``LayoutError`` whose ``errors`` read ``FILE: KEY: PROBLEM``.

This module is the model (``Service``, ``Layout``) and its parsing; its parts are the
field validators (``_layout_fields``), reading a file (``_layout_load``), the pool
arithmetic (``_layout_checks``) and the words for people (``_layout_text``). Every
public name of theirs is importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from collections.abc import Mapping

from portpool._dataclass import dataclass, field
from portpool._layout_checks import (
    BROWSER_UNSAFE_PORTS,
    INSTANCE_LIMIT,
    MAX_PORT,
    MAX_SERVICES,
    admissible_instances,
    cross_problems,
    port_warnings,
    too_many_services,
)
from portpool._layout_fields import (
    DEFAULT_READY_TIMEOUT_S,
    INTERVAL_MAX_S,
    INTERVAL_MIN_S,
    SERVICE_KEYS,
    SERVICE_SOCKET_MODES,
    TOP_KEYS,
    field_problems,
    is_finite_number,
    is_int,
    layout_error,
    name_problem,
    normalize_host,
    service_problems,
    toml_type,
    unknown_key_problems,
)
from portpool._layout_load import LAYOUT_MAX_BYTES, layout_path, read_layout_document
from portpool._layout_text import (
    describe_layout,
    describe_supervision,
    host_is_literal_remote,
    host_meaning,
)
from portpool._text import printable
from portpool.errors import LayoutError, UnknownService, UsageError

# With the public names of the parts: every layout name is importable from here.
__all__ = [
    "BROWSER_UNSAFE_PORTS",
    "DEFAULT_READY_TIMEOUT_S",
    "INSTANCE_LIMIT",
    "INTERVAL_MAX_S",
    "INTERVAL_MIN_S",
    "LAYOUT_MAX_BYTES",
    "MAX_PORT",
    "MAX_SERVICES",
    "SERVICE_SOCKET_MODES",
    "Layout",
    "Service",
    "admissible_instances",
    "default_layout",
    "describe_layout",
    "describe_supervision",
    "host_is_literal_remote",
    "host_meaning",
    "is_finite_number",
    "load_layout",
    "name_problem",
    "normalize_host",
    "parse_layout",
    "port_env_name",
    "require_layout",
    "resolve_layout",
]


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
        problems = service_problems(
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
            raise layout_error("<service>", problems)
        object.__setattr__(self, "ready_timeout_s", float(self.ready_timeout_s))

    def first_port(self, instance: int) -> int:
        """The first port of this service's pool in ``instance`` (1-based). Raises
        ValueError if ``instance`` is not an int >= 1."""
        if not is_int(instance) or instance < 1:
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
        """The environment variable that carries this service's port: PORTPOOL_PORT_<NAME>.
        Raises nothing."""
        return port_env_name(self.name)


def port_env_name(service: str) -> str:
    """``PORTPOOL_PORT_API_SERVER`` for ``api-server``: upper case, "_" for the rest."""
    return "PORTPOOL_PORT_" + re.sub(r"[^A-Za-z0-9]", "_", service).upper()


# What makes two layouts the same, wherever each was read from.
_SETTINGS = (
    "app",
    "services",
    "host",
    "heartbeat_interval_s",
    "shield_interval_s",
    "max_instances",
)


@dataclass(frozen=True)
class Layout:
    """An app's validated layout: a value, the same on every machine.

    ``heartbeat_interval_s`` and ``shield_interval_s`` are seconds (the file's
    ``heartbeat_interval`` and ``shield_interval``). ``max_instances`` is the effective
    maximum: pass 0 (the default) for the computed admissible count, or a lower number.
    ``admissible_instances``, ``limit_reason`` and ``warnings`` are derived on
    construction; values passed for them are replaced. ``warnings`` are the ones the
    layout alone implies (ports below 1024, on browsers' unsafe-port list, in X11's
    6000-6063); the ones that depend on the host (a pool inside its ephemeral port
    range) come from ``portpool.layout_warnings``. Raises LayoutError listing every problem, with
    ``source`` as the file.
    """

    app: str
    services: tuple[Service, ...]
    host: str = "127.0.0.1"
    heartbeat_interval_s: float = 30.0
    shield_interval_s: float = 10.0
    max_instances: int = 0
    admissible_instances: int = 0
    source: str = "<default>"
    warnings: tuple[str, ...] = ()
    limit_reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        services = tuple(self.services)
        object.__setattr__(self, "services", services)
        requested = self.max_instances or None
        problems = field_problems(
            self.app, self.host, self.heartbeat_interval_s, self.shield_interval_s, requested
        )
        bad = [s for s in services if not isinstance(s, Service)]
        if bad:
            problems.append(("services", f"must be Service objects, not {bad[0]!r}"))
            raise layout_error(self.source, problems)
        cross, admissible, reason = cross_problems(services, requested)
        problems.extend(cross)
        if problems:
            raise layout_error(self.source, problems)
        object.__setattr__(self, "host", normalize_host(self.host))  # doctor printed "::0"
        object.__setattr__(self, "heartbeat_interval_s", float(self.heartbeat_interval_s))
        object.__setattr__(self, "shield_interval_s", float(self.shield_interval_s))
        object.__setattr__(self, "admissible_instances", admissible)
        object.__setattr__(self, "max_instances", requested or admissible)
        object.__setattr__(self, "limit_reason", reason)
        # Only instances that can run: a lowered maximum silences the rest. No ephemeral
        # range: a value object's warnings must not depend on the machine that built it.
        warnings = port_warnings(self.source, services, requested or admissible)
        object.__setattr__(self, "warnings", tuple(warnings))

    @property
    def descriptors_needed(self) -> int:
        """About how many file descriptors an instance of this layout holds: per service
        a lock, its record and the listening socket; plus the slot, std streams and
        the state dir's handles. Raises nothing."""
        return 3 * len(self.services) + 16

    def service(self, name: str) -> Service:
        """The service called ``name``. Raises UnknownService (a LayoutError and a
        UsageError) naming the known ones if there is none."""
        for s in self.services:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.services)
        shown = printable(str(name))
        problem = f"no such service; this layout has: {known}"
        # Said as the name asked for: "services.NAME: ..." read as a key of the file.
        where = self.source if self.source != "<default>" else f"app {self.app!r}"
        message = f"{where}: no such service '{shown}' in this layout; it has: {known}"
        raise UnknownService(self.source, f"services.{shown}", problem, [message])

    def _check_instance(self, instance: int) -> None:
        if not is_int(instance) or not 1 <= instance <= self.admissible_instances:
            raise ValueError(
                f"instance must be 1..{self.admissible_instances} for app {self.app!r}, "
                f"not {instance!r}"
            )

    def pool(self, service: str, instance: int) -> list[int]:
        """The ordered ports (int) of ``service`` in ``instance``. Raises ValueError for
        an ``instance`` outside 1..admissible, UnknownService for an unknown ``service``."""
        self._check_instance(instance)
        return self.service(service).pool(instance)

    def pools(self, instance: int) -> dict[str, list[int]]:
        """Every service's name -> its pool (ports, int) in ``instance``, in the layout's
        service order. Raises ValueError for an ``instance`` outside 1..admissible."""
        self._check_instance(instance)
        return {s.name: s.pool(instance) for s in self.services}

    def check_number(self, number: int | None, given_as: str = "--instance") -> None:
        """Raise UsageError (exit 2) for an instance ``number`` outside
        1..``max_instances``, naming it as the user gave it (``given_as``: an option or
        argument name); None (no number given) passes. ``True`` is not 1: it passed here
        and then failed as a ValueError."""
        if number is not None and not (is_int(number) and 1 <= number <= self.max_instances):
            raise UsageError(
                f"{given_as} must be 1..{self.max_instances} for app {self.app!r}, not {number!r}"
            )

    def same_as(self, other: Layout) -> bool:
        """Whether ``other`` has the same app, host, intervals, maximum and services,
        whichever file each was read from (one file spelled two ways is one layout).
        Raises nothing."""
        return all(getattr(self, k) == getattr(other, k) for k in _SETTINGS)

    def with_changes(self, **changes: object) -> Layout:
        """A copy with ``changes`` (field name -> value) applied and validated again.
        Raises LayoutError if invalid, TypeError for a name that is not a field.

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
    """The original system's layout (six services: 6000+, 6010+, 6020+, 6030+, 7000+,
    9000+, +100 per instance), started with the built-in reference services. Raises
    nothing."""
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
        heartbeat_interval_s=30.0,
        shield_interval_s=10.0,
    )


# --- parsing ------------------------------------------------------------------------


def parse_layout(data: Mapping[str, object], source: str) -> Layout:
    """The layout described by ``data`` (a parsed TOML document) from file ``source``.

    Raises LayoutError listing every problem as ``source: key: problem``.
    """
    if not isinstance(data, Mapping):
        raise LayoutError(source, "<document>", f"must be a table, not {toml_type(data)}")
    problems = unknown_key_problems(data, TOP_KEYS, "")
    if "app" not in data:
        problems.append(("app", 'is required, e.g. app = "myapp"'))
    app = data.get("app", "app")
    host = data.get("host", "127.0.0.1")
    heartbeat = data.get("heartbeat_interval", 30.0)
    shield = data.get("shield_interval", 10.0)
    max_instances = data.get("max_instances")
    problems.extend(field_problems(app, host, heartbeat, shield, max_instances))

    services: list[Service] = []
    raw_services = data.get("services")
    if raw_services is None:
        problems.append(("services", "at least one service is required, e.g. [services.api]"))
    elif not isinstance(raw_services, Mapping):
        problems.append(("services", f"must be a table, not {toml_type(raw_services)}"))
    elif not raw_services:
        problems.append(("services", "at least one service is required, e.g. [services.api]"))
    elif len(raw_services) > MAX_SERVICES:
        # Refused before any per-service work: validation stays bounded whatever the file.
        problems.append(("services", too_many_services(len(raw_services))))
    else:
        for name, table in raw_services.items():
            key = f"services.{name}"
            if not isinstance(table, Mapping):
                problems.append((key, f"must be a table, not {toml_type(table)}"))
                continue
            own = unknown_key_problems(table, SERVICE_KEYS, f"{key}.")
            own.extend((f"{key}.{k}", "is required") for k in ("base", "size") if k not in table)
            own.extend(
                service_problems(
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
            problems.extend(cross_problems(services, max_instances, names)[0])
        raise layout_error(source, problems)
    return Layout(
        app=app,  # type: ignore[arg-type]
        services=tuple(services),
        host=host,  # type: ignore[arg-type]
        heartbeat_interval_s=heartbeat,  # type: ignore[arg-type]
        shield_interval_s=shield,  # type: ignore[arg-type]
        max_instances=max_instances or 0,  # type: ignore[arg-type]
        source=source,
    )


def load_layout(path: str | os.PathLike[str]) -> Layout:
    """The layout in the TOML file at ``path`` (a regular file of at most
    ``LAYOUT_MAX_BYTES``; a leading UTF-8 byte order mark is accepted). A ``Path`` is
    kept as its ``str``: the layout's ``source`` (and every error's file) is a string.

    Raises LayoutFileError (exit code 2) if the file cannot be used at all, LayoutError
    naming the file and the key (or line and column) of every problem in it.
    """
    # A Path stayed the source: `portpool layout --json`'s document failed to encode.
    path = os.fspath(path)
    return parse_layout(read_layout_document(path), path)


def resolve_layout(
    config: str | os.PathLike[str] | None, cwd: str | os.PathLike[str] | None = None
) -> Layout:
    """The layout to use: ``config`` if given, else ``portpool.toml`` in ``cwd`` (default:
    the current directory) if there is anything by that name, else the built-in layout.

    A relative ``config`` is relative to ``cwd``. Raises LayoutError (UsageError if the
    working directory was removed); a ``portpool.toml`` that exists but is unusable (a
    FIFO, a directory, a dangling symlink) is an error, never a reason to fall back to
    the built-in layout.
    """
    path = layout_path(
        None if config is None else os.fspath(config), None if cwd is None else os.fspath(cwd)
    )
    return default_layout() if path is None else load_layout(path)


def require_layout(layout: object) -> Layout:
    """``layout`` if it is a Layout, else TypeError: a path raised AttributeError from
    deep inside (``load_layout(path)`` reads a file)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout (load_layout(path) reads a file), not {layout!r}")
    return layout
