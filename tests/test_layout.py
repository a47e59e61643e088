"""Layouts: the default numbers, TOML loading, every validation rule, warnings, and
property tests that nothing but LayoutError escapes and accepted layouts are sound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portpool
from portpool._host_warnings import layout_warnings
from portpool._layout_checks import port_warnings
from portpool._platform import ephemeral_port_range
from portpool.errors import LayoutError
from portpool.layout import (
    BROWSER_UNSAFE_PORTS,
    INSTANCE_LIMIT,
    SERVICE_SOCKET_MODES,
    Layout,
    Service,
    admissible_instances,
    default_layout,
    describe_layout,
    load_layout,
    parse_layout,
    resolve_layout,
)
from portpool.statedir import StateDir

DEFAULT_NUMBERS = [
    ("mcp-universal", 6000, 3),
    ("ollama-mcp", 6010, 3),
    ("groq-api", 6020, 3),
    ("sandra-ia", 6030, 4),
    ("conversational", 7000, 5),
    ("api-server", 9000, 3),
]

GOOD = """\
app = "demo"
host = "127.0.0.1"
heartbeat_interval = 5
shield_interval = 2.5

[services.web]
base = 20000
size = 3
stride = 10
command = ["python", "-m", "demo.web"]
socket = "port"

[services.api]
base = 20004
size = 2
stride = 10
"""


def write(tmp_path: Path, text: str, name: str = "portpool.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def refused(tmp_path: Path, text: str) -> LayoutError:
    path = write(tmp_path, text)
    with pytest.raises(LayoutError) as info:
        load_layout(path)
    assert info.value.file == path
    for line in info.value.errors:
        assert line.startswith(f"{path}: "), line
    return info.value


def brute_force_admissible(services: tuple[Service, ...], limit: int = INSTANCE_LIMIT) -> int:
    """The admissible count the slow, obvious way: port by port, instance by instance."""
    owner: dict[int, tuple[str, int]] = {}
    for n in range(1, limit + 1):
        for s in services:
            for port in s.pool(n):
                if not 1 <= port <= 65535 or port in owner:
                    return n - 1
                owner[port] = (s.name, n)
    return limit


def assert_sound(layout: Layout) -> None:
    """Every pool of instances 1..admissible is in range and shares no port."""
    assert 1 <= layout.max_instances <= layout.admissible_instances <= INSTANCE_LIMIT
    seen: set[int] = set()
    total = 0
    for n in range(1, layout.admissible_instances + 1):
        for name, pool in layout.pools(n).items():
            assert pool == layout.service(name).pool(n)
            assert all(1 <= p <= 65535 for p in pool)
            seen.update(pool)
            total += len(pool)
    assert len(seen) == total
    assert layout.admissible_instances == brute_force_admissible(layout.services)


# --- the default layout ---------------------------------------------------------------


def test_default_layout_has_the_original_numbers() -> None:
    layout = default_layout()
    assert layout.app == "qwen-valencia"
    assert layout.host == "127.0.0.1"
    assert layout.heartbeat_interval_s == 30.0
    assert layout.shield_interval_s == 10.0
    assert layout.source == "<default>"
    assert [(s.name, s.base, s.size) for s in layout.services] == DEFAULT_NUMBERS
    for s in layout.services:
        assert s.stride == 100
        assert s.socket == "fd"
        assert s.command == (sys.executable, "-m", "portpool.services", s.name)
    assert layout.pools(1) == {
        "mcp-universal": [6000, 6001, 6002],
        "ollama-mcp": [6010, 6011, 6012],
        "groq-api": [6020, 6021, 6022],
        "sandra-ia": [6030, 6031, 6032, 6033],
        "conversational": [7000, 7001, 7002, 7003, 7004],
        "api-server": [9000, 9001, 9002],
    }
    assert layout.pool("sandra-ia", 3) == [6230, 6231, 6232, 6233]
    assert layout.pool("api-server", 10) == [9900, 9901, 9902]


def test_default_layout_admits_ten_instances_and_says_why() -> None:
    layout = default_layout()
    assert layout.admissible_instances == 10
    assert layout.max_instances == 10
    assert admissible_instances(layout.services) == 10
    # Instance 11's mcp-universal pool is instance 1's conversational pool.
    assert "instance 11's mcp-universal" in layout.limit_reason
    assert "conversational" in layout.limit_reason
    assert "7000..7002" in layout.limit_reason
    assert_sound(layout)
    with pytest.raises(ValueError, match=r"1\.\.10"):
        layout.pool("mcp-universal", 11)
    with pytest.raises(ValueError, match="start at 1"):
        layout.service("mcp-universal").pool(0)


def test_default_layout_warns_about_port_6000_and_x11s_range() -> None:
    warnings = default_layout().warnings
    unsafe = [w for w in warnings if "unsafe-port" in w]
    assert unsafe == [
        "<default>: services.mcp-universal: port 6000 (instance 1) is on browsers' "
        "unsafe-port list: Chromium and Firefox refuse to connect there"
    ]
    assert 6000 in BROWSER_UNSAFE_PORTS
    # X11 holds 6000+N for display :N: every MCP pool of instance 1 is there (DESIGN.md),
    # but only 6000 is on the browsers' list, and nothing warned about the others.
    x11 = [w for w in warnings if "X11" in w]
    assert [w.split(": ")[1] for w in x11] == [
        "services.mcp-universal",
        "services.ollama-mcp",
        "services.groq-api",
        "services.sandra-ia",
    ]
    assert x11[0].startswith(
        "<default>: services.mcp-universal: ports 6000..6002 (instance 1) are in X11's "
        "range 6000-6063: "
    )
    assert "ports 6030..6033 (instance 1) are in X11's range" in x11[3]
    # A pool that reaches into the range only at a later instance says which.
    late = Layout("a", (Service("s", 5800, 2, 100),))
    (warning,) = [w for w in late.warnings if "X11" in w]
    assert "ports 6000..6001 (instance 3) are in X11's range" in warning
    assert {6665, 6666, 6667, 6668, 6669, 10080, 22, 25} <= BROWSER_UNSAFE_PORTS


def test_env_names() -> None:
    assert default_layout().service("api-server").env_name == "PORTPOOL_PORT_API_SERVER"
    assert Service("mcp.v2", 20000, 1).env_name == "PORTPOOL_PORT_MCP_V2"


def test_unknown_service_names_the_known_ones() -> None:
    with pytest.raises(LayoutError) as info:
        default_layout().service("nope")
    assert info.value.key == "services.nope"
    assert "mcp-universal" in str(info.value)
    assert "api-server" in str(info.value)


def test_describe_layout_lists_every_admissible_instance() -> None:
    lines = describe_layout(default_layout())
    text = "\n".join(lines)
    assert "app: qwen-valencia" in lines
    assert "host: 127.0.0.1" in lines
    assert "max instances: 10 (admissible: 10" in text
    instance_lines = [line for line in lines if line.startswith("instance ")]
    assert len(instance_lines) == 10
    assert instance_lines[0].startswith("instance 1: mcp-universal 6000..6002, ollama-mcp")
    assert "api-server 9900..9902" in instance_lines[9]
    assert lines[-1].startswith("warning: ") and "6000" in lines[-1]


def test_describe_lists_only_instances_up_to_max(tmp_path: Path) -> None:
    layout = load_layout(write(tmp_path, "max_instances = 2\n" + GOOD))
    lines = describe_layout(layout)
    assert "max instances: 2 (admissible: 1000" in "\n".join(lines)
    assert "instance 2: web 20010..20012, api 20014..20015" in lines
    assert not any(line.startswith("instance 3:") for line in lines)
    assert "(instances 3..1000 would fit but are above max_instances: not used)" in lines


def test_base_out_of_range_names_the_base(tmp_path: Path) -> None:
    path = write(tmp_path, 'app = "x"\n[services.a]\nbase = 70000\nsize = 3\n')
    with pytest.raises(LayoutError) as info:
        load_layout(path)
    assert f"{path}: services.a.base: 70000 is not a port in 1..65535" in info.value.errors


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(LayoutError) as info:
        load_layout(path)
    assert str(info.value) == f"{path}: cannot be read: No such file or directory"


# --- loading a file -------------------------------------------------------------------


def test_a_good_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    layout = load_layout(path)
    assert layout.source == path
    assert layout.app == "demo"
    assert layout.heartbeat_interval_s == 5.0
    assert layout.shield_interval_s == 2.5
    assert layout.service("web").command == ("python", "-m", "demo.web")
    assert layout.service("web").socket == "port"
    assert layout.service("api").command is None
    assert layout.service("api").socket == "fd"
    assert [s.name for s in layout.services] == ["web", "api"]  # file order
    assert layout.pools(2) == {"web": [20010, 20011, 20012], "api": [20014, 20015]}
    # stride 10 with web's 20000..20002 and api's 20004..20005: never collide
    assert layout.admissible_instances == INSTANCE_LIMIT == layout.max_instances
    assert_sound(layout)


def test_max_instances_lowers_the_maximum(tmp_path: Path) -> None:
    layout = load_layout(write(tmp_path, "max_instances = 4\n" + GOOD))
    assert layout.max_instances == 4
    assert layout.admissible_instances == INSTANCE_LIMIT


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    error = refused(tmp_path, 'app = "x"\n[services.a]\nbase = \nsize = 1\n')
    assert error.key == "line 3, column 8"
    assert "invalid TOML" in str(error)


def test_unknown_keys_are_refused_at_every_level(tmp_path: Path) -> None:
    error = refused(tmp_path, "colour = 1\n" + GOOD + "prot = 3\n")
    assert error.errors == [
        f"{error.file}: colour: unknown key; expected one of: app, host, heartbeat_interval,"
        " shield_interval, max_instances, services",
        f"{error.file}: services.api.prot: unknown key; expected one of: base, size, stride,"
        " command, socket, restart, depends_on, ready, ready_timeout_s",
    ]


@pytest.mark.parametrize(
    ("line", "where", "meant"),
    [
        # Words other tools use: no spelling is close, and "unknown key" left the user to
        # find that a service's first port is its "base".
        ("port = 9000", "services.api.port", "base"),
        ("count = 3", "services.api.count", "size"),
        ("cmd = ['x']", "services.api.cmd", "command"),
        ("after = []", "services.api.after", "depends_on"),
        ("healthcheck = 'tcp'", "services.api.healthcheck", "ready"),
        ("timeout = 3", "services.api.timeout", "ready_timeout_s"),
    ],
)
def test_an_unknown_key_another_tool_uses_names_ours(
    tmp_path: Path, line: str, where: str, meant: str
) -> None:
    error = refused(tmp_path, GOOD + line + "\n")
    [problem] = [p for p in error.errors if f": {where}: " in p]
    assert f"unknown key (did you mean {meant!r}?)" in problem, problem


def test_an_unknown_top_key_another_tool_uses_names_ours(tmp_path: Path) -> None:
    error = refused(tmp_path, "name = 'x'\ninstances = 3\n" + GOOD)
    assert "name: unknown key (did you mean 'app'?)" in str(error), error
    assert "instances: unknown key (did you mean 'max_instances'?)" in str(error), error


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("size = true", "services.x.size", "must be an integer, not a boolean"),
        ('size = "3"', "services.x.size", "must be an integer, not a string"),
        ("size = 2.0", "services.x.size", "must be an integer, not a float"),
        ("size = 0", "services.x.size", "must be >= 1, not 0"),
        ("stride = -1", "services.x.stride", "must be >= 0, not -1"),
        ("base = 0", "services.x.base", "must be >= 1, not 0"),
        ("base = 65534", "services.x.size", "instance 1's pool 65534..65536 leaves"),
        ("command = []", "services.x.command", "must be a non-empty array of strings"),
        ('command = "python"', "services.x.command", "must be a non-empty array"),
        ('command = ["python", 3]', "services.x.command[1]", "must be a string, not an int"),
        ('command = [""]', "services.x.command[0]", "the program must not be empty"),
        ('socket = "tcp"', "services.x.socket", "must be one of 'fd', 'port', not 'tcp'"),
        ("socket = 1", "services.x.socket", "must be one of"),
    ],
)
def test_service_values_are_checked(tmp_path: Path, line: str, key: str, problem: str) -> None:
    fields = {"base": "base = 20000", "size": "size = 3"}
    fields[line.split(" =", maxsplit=1)[0]] = line  # the tested line replaces a default one
    error = refused(tmp_path, 'app = "a"\n[services.x]\n' + "\n".join(fields.values()) + "\n")
    assert error.key == key
    assert problem in error.problem


@pytest.mark.parametrize(
    ("line", "key", "shown"),
    [
        # The value as the file spells it: Python's spelling (False, datetime.date(...),
        # {'a': 1}) is not what the user wrote.
        ("restart = false", "services.x.restart", "not false"),
        ("socket = 1979-05-27", "services.x.socket", "not 1979-05-27"),
        ("socket = 1979-05-27T07:32:00Z", "services.x.socket", "not 1979-05-27T07:32:00Z"),
        ("command = {a = 1, b = [true]}", "services.x.command", "not {a = 1, b = [true]}"),
        ("depends_on = true", "services.x.depends_on", "not true"),
        ('ready = ["tcp"]', "services.x.ready", "not an array"),
    ],
)
def test_a_wrong_value_is_shown_as_the_file_spells_it(
    tmp_path: Path, line: str, key: str, shown: str
) -> None:
    error = refused(tmp_path, f'app = "a"\n[services.x]\nbase = 20000\nsize = 3\n{line}\n')
    assert error.key == key
    assert error.problem.endswith(shown), error.problem


@pytest.mark.parametrize(
    "line",
    [
        f'socket = "{"s" * 200_000}"',
        f'ready = "{"r" * 200_000}"',
        f'ready = "http:/{"p" * 200_000}#"',
        f"restart = [{', '.join(['1'] * 50_000)}]",
        f'depends_on = "{"d" * 200_000}"',
        f'depends_on = ["{"d" * 200_000}"]',
        f'command = "{"c" * 200_000}"',
    ],
)
def test_a_huge_wrong_value_is_shown_cut(tmp_path: Path, line: str) -> None:
    # The whole value was printed: a 200 KB string made a 200 KB error line.
    error = refused(tmp_path, f'app = "a"\n[services.x]\nbase = 20000\nsize = 3\n{line}\n')
    assert len(error.errors[0]) < 400, error.errors[0][:400]
    assert "..." in error.problem


@pytest.mark.parametrize(
    "line",
    [
        f'app = "{"a" * 200_000}"',
        f'host = "{"h" * 200_000}"',
        f"[services.{'s' * 200_000}]\nbase = 20000\nsize = 3",
    ],
)
def test_a_huge_name_is_shown_cut(tmp_path: Path, line: str) -> None:
    text = f"{line}\n" if line.startswith("[") else f"{line}\n[services.x]\nbase = 1\nsize = 1\n"
    if line.startswith("["):
        text = f'app = "a"\n{text}'
    error = refused(tmp_path, text)
    problems = [p for p in error.errors if "..." in p]
    assert problems and all(len(p.split(": ", 2)[2]) < 400 for p in problems), error.errors


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("app = 3", "app", "must be a string, not an integer"),
        ('app = "../etc"', "app", "must be 1-64 letters"),
        ('app = ""', "app", "must be 1-64 letters"),
        ('host = "example.com"', "host", "must be an IP address"),
        ("host = 127", "host", "must be a string"),
        ("heartbeat_interval = 0", "heartbeat_interval", "0.01 to 86400 (one day), not 0"),
        ("heartbeat_interval = -1.5", "heartbeat_interval", "to 86400 (one day), not -1.5"),
        ("heartbeat_interval = nan", "heartbeat_interval", "to 86400 (one day), not nan"),
        ("shield_interval = inf", "shield_interval", "to 86400 (one day), not inf"),
        ("heartbeat_interval = 1e10", "heartbeat_interval", "not 10000000000.0"),
        ("shield_interval = 1e300", "shield_interval", "not 1e+300"),
        ("shield_interval = 1e-300", "shield_interval", "from 0.01 to"),
        ('shield_interval = "10"', "shield_interval", "must be a number of seconds, not a str"),
        ("shield_interval = true", "shield_interval", "not a boolean"),
        ("max_instances = 0", "max_instances", "must be >= 1, not 0"),
        ("max_instances = 2.5", "max_instances", "must be an integer, not a float"),
        ("max_instances = false", "max_instances", "must be an integer, not a boolean"),
    ],
)
def test_top_level_values_are_checked(tmp_path: Path, line: str, key: str, problem: str) -> None:
    name = line.split(" =", maxsplit=1)[0]
    body = "\n".join(x for x in GOOD.splitlines() if not x.startswith(f"{name} ="))
    error = refused(tmp_path, f"{line}\n{body}\n")
    assert error.key == key
    assert problem in error.problem


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        'host = "nowhere"\n[services.a]\nbase = true\n[services.b]\nsize = 0\nbase = 1\n',
    )
    keys = [line.split(": ")[1] for line in error.errors]
    assert keys == ["app", "host", "services.a.size", "services.a.base", "services.b.size"]


def test_required_keys(tmp_path: Path) -> None:
    assert refused(tmp_path, 'app = "a"\n').key == "services"
    assert refused(tmp_path, 'app = "a"\nservices = {}\n').key == "services"
    assert (
        refused(tmp_path, 'app = "a"\nservices = 3\n').problem == "must be a table, not an integer"
    )
    assert refused(tmp_path, 'app = "a"\n[services]\nx = 3\n').key == "services.x"
    error = refused(tmp_path, 'app = "a"\n[services.x]\nstride = 1\n')
    assert [line.split(": ")[1] for line in error.errors] == [
        "services.x.base",
        "services.x.size",
    ]


def test_overlapping_pools_are_refused_naming_both_services_and_ports(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        'app = "a"\n[services.web]\nbase = 20000\nsize = 5\n'
        "[services.api]\nbase = 20003\nsize = 4\n",
    )
    assert error.key == "services.api"
    assert "web" in error.problem
    assert "api" in error.problem
    assert "20003..20004" in error.problem
    assert error.problem == (
        "in instance 1, api's pool 20003..20006 and web's pool 20000..20004 "
        "share ports 20003..20004"
    )


def test_overlaps_across_instances_lower_the_admissible_count(tmp_path: Path) -> None:
    text = 'app = "a"\n[services.a]\nbase = 20000\nsize = 5\n[services.b]\nbase = 21000\nsize = 4\n'
    layout = load_layout(write(tmp_path, text))
    assert layout.admissible_instances == 10
    error = refused(tmp_path, "max_instances = 11\n" + text)
    assert error.key == "max_instances"
    assert error.problem == (
        "is 11 but at most 10 instances keep every pool disjoint and inside 1..65535: "
        "instance 11's a pool 21000..21004 would overlap instance 1's b pool 21000..21003 "
        "(ports 21000..21003)"
    )


def test_max_instances_above_the_default_count_is_refused(tmp_path: Path) -> None:
    lines = ['app = "qwen-valencia"\nmax_instances = 11\n']
    for name, base, size in DEFAULT_NUMBERS:
        lines.append(f"[services.{name}]\nbase = {base}\nsize = {size}\n")
    error = refused(tmp_path, "".join(lines))
    assert error.key == "max_instances"
    assert "at most 10 instances" in error.problem
    assert "mcp-universal" in error.problem and "conversational" in error.problem


def test_leaving_the_port_range_limits_instances() -> None:
    layout = Layout("a", (Service("top", 65000, 10, 100),))
    assert layout.admissible_instances == 6  # instance 7 would be 65600..65609
    assert "instance 7's top pool 65600..65609 would leave" in layout.limit_reason


def test_stride_zero_admits_one_instance() -> None:
    layout = Layout("a", (Service("fixed", 20000, 2, 0),))
    assert layout.admissible_instances == layout.max_instances == 1
    assert "instance 2's fixed pool" in layout.limit_reason


def test_the_instance_limit_caps_the_count() -> None:
    services = (Service("one", 20000, 1, 1),)
    assert admissible_instances(services) == INSTANCE_LIMIT
    assert admissible_instances(services, limit=7) == 7
    with pytest.raises(ValueError):
        admissible_instances(services, limit=0)


def test_duplicate_service_names(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        'app = "a"\n[services.web]\nbase = 20000\nsize = 1\n[services.web]\nbase = 20010\n',
    )
    assert error.key == "services.web"
    assert "duplicate service name" in error.problem
    assert "line 5" in error.problem
    error = refused(
        tmp_path,
        'app = "a"\n[services]\nweb = {base = 20000, size = 1}\nweb = {base = 20010, size = 1}\n',
    )
    assert error.key == "services.web"
    assert "line 4" in error.problem


@pytest.mark.parametrize(
    ("text", "key", "parent"),
    [
        # A [header] after an inline table read "duplicate service name" for services.b,
        # which appears once.
        ('services = { a = { base = 20000, size = 1 } }\n[services.b]\nbase = 20010\n',
         "services.b", "services"),
        ('[services]\na = { base = 20000, size = 1 }\n[services.a.x]\n', "services.a.x",
         "services.a"),
        # A dotted key into one read "invalid TOML: Cannot mutate immutable namespace".
        ('services.a = { base = 20000 }\nservices.a.size = 1\n', "services.a.size",
         "services.a"),
        # So did an [[array of tables]] header into one.
        ('services = { a = { base = 20000, size = 1 } }\n[[services.b]]\nbase = 20010\n',
         "services.b", "services"),
        ('services = { a = { base = 20000, size = 1 } }\n[[services.a.deps]]\nx = 1\n',
         "services.a.deps", "services.a"),
    ],
)  # fmt: skip
def test_a_key_added_to_an_inline_table_is_named_as_such(
    tmp_path: Path, text: str, key: str, parent: str
) -> None:
    error = refused(tmp_path, 'app = "a"\n' + text)
    assert error.key == key
    assert error.problem.startswith(
        f"cannot be added to {parent}, which an earlier line wrote as an inline table"
    ), error.problem
    assert f"write {parent} as a [{parent}] table (at line " in error.problem


def test_a_key_added_to_a_value_is_named_as_such(tmp_path: Path) -> None:
    error = refused(tmp_path, 'app = "a"\nservices = [1]\n[services.b]\n')
    assert error.key == "services.b"
    assert error.problem == (
        "cannot be added to services, which an earlier line set to a value, not a table "
        "(at line 3, column 12)"
    )
    # A [table] header onto a value read "invalid TOML: Cannot overwrite a value".
    error = refused(tmp_path, 'app = "a"\n[services.a]\nbase = 20000\n[services.a.base]\n')
    assert error.key == "services.a.base"
    assert error.problem == (
        "is set to a value by an earlier line, so a [services.a.base] table cannot follow "
        "(at line 4, column 17)"
    )


def test_a_key_set_twice(tmp_path: Path) -> None:
    error = refused(tmp_path, 'app = "a"\n[services.web]\nbase = 20000\nbase = 20001\nsize = 1\n')
    assert error.key == "services.web.base"
    assert "set twice" in error.problem and "line 4" in error.problem


def test_services_whose_port_variables_collide(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        'app = "a"\n[services.api-server]\nbase = 20000\nsize = 1\n'
        "[services.api_server]\nbase = 20010\nsize = 1\n",
    )
    assert error.key == "services.api_server"
    assert "PORTPOOL_PORT_API_SERVER" in error.problem
    with pytest.raises(LayoutError, match="duplicate service name"):
        Layout("a", (Service("x", 20000, 1), Service("x", 20010, 1)))


@pytest.mark.parametrize("name", ["", "-x", "a/b", "..", "x" * 65, "café"])
def test_bad_service_names(tmp_path: Path, name: str) -> None:
    error = refused(tmp_path, f'app = "a"\n[services."{name}"]\nbase = 20000\nsize = 1\n')
    assert error.key == f"services.{name}"


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(LayoutError) as info:
        load_layout(str(tmp_path / "missing.toml"))
    assert "cannot be read" in str(info.value)
    with pytest.raises(LayoutError, match="is a directory, not a regular file"):
        load_layout(str(tmp_path))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'app = "a"\n# caf\xe9\n')
    with pytest.raises(LayoutError) as info:
        load_layout(str(bad))
    assert info.value.key == "line 2, column 6"
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize(
    "line",
    [
        "restart = " + "[" * 400 + "]" * 400,
        "command = " + "{a = " * 300 + "1" + "}" * 300,
        "socket = " + "[{a = " * 150 + "1" + "}]" * 150,
    ],
)
def test_a_deeply_nested_wrong_value_is_shown_cut(tmp_path: Path, line: str) -> None:
    # tomllib reads 400 levels; spelling them back recursed once per level and ended
    # `layout` in a RecursionError traceback instead of the layout error.
    error = refused(tmp_path, f'app = "a"\n[services.x]\nbase = 20000\nsize = 3\n{line}\n')
    assert error.key.startswith("services.x.")
    assert len(error.errors[0]) < 400, error.errors[0][:400]
    assert "..." in error.problem


def test_pathological_toml_is_a_layout_error(tmp_path: Path) -> None:
    assert "nested too deeply" in str(refused(tmp_path, "x = " + "[" * 5000))
    assert "invalid TOML" in str(refused(tmp_path, "x = " + "9" * 5000 + "\n"))


def test_hosts() -> None:
    service = (Service("s", 20000, 1),)
    for host in ("127.0.0.1", "::1", "0.0.0.0", "localhost", "192.168.1.10"):
        assert Layout("a", service, host=host).host == host
    with pytest.raises(LayoutError, match="host"):
        Layout("a", service, host="my-laptop")
    # Not "write 224.0.0.1 instead", which is refused as well.
    for mapped in ("::ffff:224.0.0.1", "::ffff:255.255.255.255"):
        with pytest.raises(LayoutError, match="is a multicast or broadcast address"):
            Layout("a", service, host=mapped)


def test_localhost_in_any_case_is_localhost(tmp_path: Path) -> None:
    # host = "Localhost" was "must be an IP address ... or 'localhost'", though a name's
    # case never matters and acquire(host="LOCALHOST") took both loopbacks.
    for spelling in ("Localhost", "LOCALHOST"):
        assert Layout("a", (Service("s", 20000, 1),), host=spelling).host == "localhost"
        path = tmp_path / "p.toml"
        path.write_text(f'app = "a"\nhost = "{spelling}"\n[services.s]\nbase = 20000\nsize = 1\n')
        cli = [sys.executable, "-m", "portpool.cli", "layout", "--config", str(path)]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "host: localhost\n" in done.stdout


# --- warnings -------------------------------------------------------------------------


def test_privileged_ports_warn() -> None:
    layout = Layout("a", (Service("web", 80, 3, 1000),))
    low = [w for w in layout.warnings if "below 1024" in w]
    assert low == [
        "<default>: services.web: ports 80..82 (instance 1) are below 1024: binding them "
        "needs administrator rights on most systems"
    ]
    # One port is "it": it read "port 80 (instance 1) is below 1024: binding them".
    one = Layout("a", (Service("web", 80, 1),), max_instances=1)
    assert [w for w in one.warnings if "below 1024" in w] == [
        "<default>: services.web: port 80 (instance 1) is below 1024: binding it "
        "needs administrator rights on most systems"
    ]
    (warning,) = port_warnings("f", (Service("e", 40000, 1),), 1, (32768, 60999))
    assert "any outgoing connection may take it; move the pool" in warning


def test_ephemeral_ports_warn() -> None:
    # The pure check, with a range given: the same on every machine.
    low, high = 32768, 60999
    base = low - 250  # instances 1..3 outside; from instance 4 on the pools are inside
    late = (Service("late", base, 2, 100),)
    (warning,) = [w for w in port_warnings("f", late, 100, (low, high)) if "ephemeral" in w]
    assert warning.startswith(f"f: services.late: ports {base + 300}..{base + 301}, ..., ")
    assert "(instances 4-100)" in warning
    assert f"{low}-{high}" in warning
    assert "lower max_instances" in warning
    # the pool that straddles the range start only counts the ports inside it
    edge = (Service("edge", low - 1, 2, 0),)
    (warning,) = [w for w in port_warnings("f", edge, 1, (low, high)) if "ephemeral" in w]
    assert f"port {low} (instance 1) is inside" in warning
    assert not any("ephemeral" in w for w in port_warnings("f", edge, 1, None))


def host_ephemeral_range() -> tuple[int, int]:
    span = ephemeral_port_range()
    if span is None:
        pytest.skip("this OS does not tell its ephemeral port range")
    return span


def test_a_layout_is_a_value_its_warnings_never_ask_the_host() -> None:
    """A Layout once read /proc (or ran sysctl) when built: its warnings depended on the
    machine that built it. The host's part comes from ``layout_warnings``."""
    low, high = host_ephemeral_range()
    layout = Layout("a", (Service("late", low - 250, 2, 100),))
    assert not any("ephemeral" in w for w in layout.warnings)
    on_host = layout_warnings(layout)
    (warning,) = [w for w in on_host if "ephemeral" in w]
    last_inside = min(layout.max_instances, (high - layout.services[0].base) // 100 + 1)
    assert f"services.late: ports {low + 50}..{low + 51}, ..., " in warning
    assert f"(instances 4-{last_inside})" in warning
    assert f"{low}-{high}" in warning
    # the layout's own warnings are all there, in the same order
    assert [w for w in on_host if "ephemeral" not in w] == list(layout.warnings)


def test_the_layout_command_shows_the_hosts_ephemeral_warning(tmp_path: Path) -> None:
    low, high = host_ephemeral_range()
    path = write(
        tmp_path,
        f'app = "eph"\n[services.irc]\nbase = 6565\nsize = 2\nstride = 0\n'
        f"[services.late]\nbase = {low - 1}\nsize = 2\nstride = 0\n",
    )
    cli = [sys.executable, "-m", "portpool.cli", "layout", "--config", path]
    text = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: {path}: services.irc: port 6566 (instance 1) is on "
        "browsers' unsafe-port list: Chromium and Firefox refuse to connect there",
        f"warning: {path}: services.late: port {low} (instance 1) is "
        f"inside the OS's ephemeral port range {low}-{high}: any outgoing connection may "
        "take it; move the pool out of it",
    ]
    as_json = subprocess.run(
        [*cli, "--json"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert json.loads(as_json)["warnings"] == [w.removeprefix("warning: ") for w in warnings]


def test_unsafe_ports_are_grouped_per_service() -> None:
    layout = Layout("a", (Service("irc", 6565, 10, 1000),))
    (warning,) = [w for w in layout.warnings if "unsafe-port" in w]
    # 6566 in instance 1; 6665..6669 are not in any pool (6565+1000k..+9); 10080 isn't either
    assert warning.startswith("<default>: services.irc: port 6566 (instance 1) is on")
    wide = Layout("a", (Service("wide", 6560, 140, 1000),))
    (warning,) = [w for w in wide.warnings if "unsafe-port" in w]
    assert "ports 6566, 6665..6669, 6679, 6697 (instance 1) are" in warning


def test_warnings_only_cover_instances_that_can_run() -> None:
    span = ephemeral_port_range()
    unlimited = Layout("a", (Service("s", 20000, 3, 100),))
    if span is not None and span[0] <= 20000 + 100 * (unlimited.max_instances - 1):
        assert any("lower max_instances" in w for w in layout_warnings(unlimited))
    lowered = Layout("a", (Service("s", 20000, 3, 100),), max_instances=3)
    assert lowered.warnings == () == layout_warnings(lowered)


# --- the Python API ---------------------------------------------------------------------


def test_service_checks_its_fields() -> None:
    with pytest.raises(LayoutError) as info:
        Service("s", 20000, 0)
    assert info.value.key == "services.s.size"
    with pytest.raises(LayoutError):
        Service("s", 20000, 1, socket="unix")
    assert Service("s", 20000, 1, command=["a", "b"]).command == ("a", "b")  # type: ignore[arg-type]
    assert SERVICE_SOCKET_MODES == ("fd", "port")


def test_with_changes_revalidates() -> None:
    fast = default_layout().with_changes(heartbeat_interval_s=0.2, shield_interval_s=0.05)
    assert (fast.heartbeat_interval_s, fast.shield_interval_s) == (0.2, 0.05)
    assert fast.max_instances == 10
    with pytest.raises(LayoutError, match="shield_interval"):
        default_layout().with_changes(shield_interval_s=0)
    lowered = default_layout().with_changes(max_instances=3)
    assert lowered.max_instances == 3
    with pytest.raises(LayoutError, match="at most 10"):
        default_layout().with_changes(max_instances=11)
    wider = default_layout().with_changes(
        services=tuple(Service(s.name, s.base, s.size, 1000) for s in default_layout().services)
    )
    # instance 2's mcp-universal pool (7000..7002) would be instance 1's conversational
    assert wider.admissible_instances == wider.max_instances == 1
    assert_sound(wider)


def test_a_big_layout_is_validated_exactly() -> None:
    services = tuple(Service(f"s{i}", 10000 + i, 1, 100) for i in range(100))
    layout = Layout("big", services)
    assert layout.admissible_instances == 555  # instance 556's s36 pool would be 65536
    assert_sound(layout)
    crowded = tuple(Service(f"c{i}", 1024 + 2 * i, 2, 600) for i in range(300))
    assert_sound(Layout("crowded", crowded))


# --- resolve_layout -------------------------------------------------------------------


def test_resolve_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    assert resolve_layout(None, str(cwd)) is default_layout()
    local = write(cwd, GOOD)
    assert resolve_layout(None, str(cwd)).source == local
    other = write(tmp_path, GOOD.replace('"demo"', '"other"'), "other.toml")
    chosen = resolve_layout(other, str(cwd))
    assert (chosen.app, chosen.source) == ("other", other)
    assert resolve_layout("portpool.toml", str(cwd)).source == local  # relative to cwd
    sub = cwd / "sub"
    sub.mkdir()
    assert resolve_layout(None, str(sub)) is default_layout()  # parents are not searched
    monkeypatch.chdir(cwd)
    assert resolve_layout(None).app == "demo"
    assert resolve_layout(None).source == "portpool.toml"
    with pytest.raises(LayoutError, match="cannot be read"):
        resolve_layout("missing.toml")


def test_a_broken_local_file_is_not_silently_replaced_by_the_default(tmp_path: Path) -> None:
    write(tmp_path, "app = \n")
    with pytest.raises(LayoutError):
        resolve_layout(None, str(tmp_path))


# --- property tests ---------------------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-5, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["fd", "port", "127.0.0.1", "::1", "localhost", "x", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
service_tables = st.fixed_dictionaries(
    {},
    optional={
        "base": st.one_of(st.integers(min_value=-2, max_value=66000), values),
        "size": st.one_of(st.integers(min_value=-1, max_value=40), values),
        "stride": st.one_of(st.integers(min_value=-1, max_value=400), values),
        "command": st.one_of(st.lists(st.text(max_size=6), max_size=3), values),
        "socket": st.one_of(st.sampled_from(["fd", "port", "tcp"]), values),
        "extra": values,
    },
)
names = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True), st.text(max_size=8))
documents = st.fixed_dictionaries(
    {},
    optional={
        "app": st.one_of(names, values),
        "host": st.one_of(st.sampled_from(["127.0.0.1", "::1", "localhost", "nope"]), values),
        "heartbeat_interval": st.one_of(st.floats(), values),
        "shield_interval": st.one_of(st.integers(min_value=-1, max_value=20), values),
        "max_instances": st.one_of(st.integers(min_value=-1, max_value=1200), values),
        "services": st.one_of(
            st.dictionaries(names, st.one_of(service_tables, values), max_size=5), values
        ),
        "unknown": values,
    },
)
# Mostly-valid documents, so that many examples are accepted and checked for soundness.
plausible = st.fixed_dictionaries(
    {
        "app": st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True),
        "services": st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True),
            st.fixed_dictionaries(
                {
                    "base": st.integers(min_value=1, max_value=65535),
                    "size": st.integers(min_value=1, max_value=30),
                },
                optional={"stride": st.integers(min_value=0, max_value=3000)},
            ),
            min_size=1,
            max_size=6,
        ),
    },
    optional={"max_instances": st.integers(min_value=1, max_value=60)},
)


# One stride for every service: the usual layout, counted by a faster path.
same_stride = st.integers(min_value=1, max_value=2000).flatmap(
    lambda stride: st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=65535), st.integers(min_value=1, max_value=40)
        ),
        min_size=1,
        max_size=8,
    ).map(
        lambda rules: {
            "app": "same",
            "services": {
                f"s{i}": {"base": base, "size": size, "stride": stride}
                for i, (base, size) in enumerate(rules)
            },
        }
    )
)


def check_parse(data: Mapping[str, object]) -> None:
    try:
        layout = parse_layout(data, "fuzz.toml")
    except LayoutError as e:
        error: LayoutError | None = e
    else:
        error = None
    if error is not None:
        assert error.errors
        assert all(line.startswith("fuzz.toml: ") for line in error.errors)
        return
    assert_sound(layout)
    if layout.admissible_instances < INSTANCE_LIMIT:
        # maximal: one more instance really would collide or leave the range
        n = layout.admissible_instances + 1
        ports = [p for m in range(1, n + 1) for s in layout.services for p in s.pool(m)]
        assert len(set(ports)) < len(ports) or not all(1 <= p <= 65535 for p in ports)
    requested = data.get("max_instances")
    assert layout.max_instances == (requested or layout.admissible_instances)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_random_documents_only_ever_raise_layout_error(data: dict[str, object]) -> None:
    check_parse(data)


@settings(max_examples=200, deadline=None)
@given(plausible)
def test_accepted_layouts_have_disjoint_in_range_pools(data: dict[str, object]) -> None:
    check_parse(data)


@settings(max_examples=200, deadline=None)
@given(same_stride)
def test_same_stride_layouts_are_counted_exactly(data: dict[str, object]) -> None:
    check_parse(data)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.binary(max_size=300),
    plausible,
    st.integers(min_value=0, max_value=400),
    st.binary(max_size=8),
)
def test_random_files_only_ever_raise_layout_error(
    tmp_path: Path, junk: bytes, doc: dict[str, object], cut: int, splice: bytes
) -> None:
    # Pure junk, and a valid document with bytes spliced in at a random place.
    lines = [f'app = "{doc["app"]}"']
    if "max_instances" in doc:
        lines.append(f"max_instances = {doc['max_instances']}")
    services = doc["services"]
    assert isinstance(services, dict)
    for name, table in services.items():
        lines.append(f"[services.{name}]")
        lines.extend(f"{k} = {v}" for k, v in table.items())
    text = ("\n".join(lines) + "\n").encode()
    for content in (junk, text, text[:cut] + splice + text[cut:]):
        path = tmp_path / "fuzz.toml"
        path.write_bytes(content)
        try:
            layout = load_layout(str(path))
        except LayoutError as e:
            refusal: LayoutError | None = e
        else:
            refusal = None
            assert_sound(layout)
        assert refusal is None or refusal.file == str(path)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_layout(str(path)).app == "demo"


def test_special_and_oversized_files_are_refused_with_exit_code_2(tmp_path: Path) -> None:
    from portpool.errors import LayoutFileError
    from portpool.layout import LAYOUT_MAX_BYTES

    big = tmp_path / "big.toml"
    big.write_bytes(GOOD.encode() + b"#" * LAYOUT_MAX_BYTES)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.toml"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [
        (big, "is larger than"),
        (fifo, "is a FIFO, not a regular file"),
        (dangling, "is a dangling symbolic link"),
        (tmp_path, "is a directory, not a regular file"),
    ]
    if os.path.exists("/dev/zero"):
        cases.append((Path("/dev/zero"), "is a character device, not a regular file"))
    for path, problem in cases:
        with pytest.raises(LayoutFileError) as info:
            load_layout(str(path))
        assert info.value.exit_code == 2
        assert str(info.value) == f"{path}: {problem}" or problem in str(info.value)


def test_overlaps_are_counted_exactly_and_services_are_capped(tmp_path: Path) -> None:
    from portpool.layout import MAX_SERVICES

    def many(count: int) -> dict[str, object]:
        services = {f"s{i}": {"base": 20000, "size": 1} for i in range(count)}
        return {"app": "a", "services": services}

    with pytest.raises(LayoutError) as info:
        parse_layout(many(MAX_SERVICES), "many.toml")
    pairs = MAX_SERVICES * (MAX_SERVICES - 1) // 2
    assert info.value.errors[0] == (
        "many.toml: services.s1: in instance 1, s1's pool 20000 and s0's pool 20000 "
        "share port 20000"
    )
    assert info.value.errors[-1] == f"many.toml: services: ... and {pairs - 20} more overlaps"
    assert len(info.value.errors) == 21
    with pytest.raises(LayoutError) as info:
        parse_layout(many(40_000), "huge.toml")
    assert info.value.errors == [
        f"huge.toml: services: has 40000 services; a layout may have at most {MAX_SERVICES}"
    ]
    with pytest.raises(LayoutError, match="at most"):
        Layout("a", tuple(Service(f"s{i}", 1000 + i, 1) for i in range(MAX_SERVICES + 1)))


def bitset_admissible_same_stride(
    services: tuple[Service, ...], stride: int, limit: int
) -> tuple[int, str] | None:
    """The same-stride count as a bit set shifted once per instance: the obvious (and
    slow) way, for checking the sorted-gap one."""
    from portpool._layout_checks import MAX_PORT, _overlap_text, span

    ports = 0
    for s in services:
        ports |= ((1 << s.size) - 1) << s.base
    if ports.bit_count() != sum(s.size for s in services):
        return None
    edge = min(services, key=lambda s: (MAX_PORT - s.base - s.size + 1) // stride)
    in_range = (MAX_PORT - edge.base - edge.size + 1) // stride + 1
    for k in range(1, min(limit, in_range)):
        both = ports & (ports << (k * stride))
        if both:
            port = (both & -both).bit_length() - 1
            a = next(s for s in services if 0 <= port - k * stride - s.base < s.size)
            b = next(s for s in services if 0 <= port - s.base < s.size)
            return k, _overlap_text(a, k + 1, b, 1)
    if limit <= in_range:
        return limit, f"portpool allows at most {limit} instance{'' if limit == 1 else 's'}"
    first = edge.first_port(in_range + 1)
    return in_range, (
        f"instance {in_range + 1}'s {edge.name} pool {span(first, first + edge.size - 1)} "
        f"would leave the port range 1..{MAX_PORT}"
    )


@settings(max_examples=300, deadline=None)
@given(same_stride, st.integers(min_value=1, max_value=INSTANCE_LIMIT))
def test_same_stride_count_and_reason_match_the_bit_set_way(
    data: dict[str, Any], limit: int
) -> None:
    from portpool._layout_checks import _admissible_same_stride

    try:
        services = tuple(
            Service(name=name, base=rule["base"], size=rule["size"], stride=rule["stride"])
            for name, rule in data["services"].items()
        )
    except LayoutError:
        return  # a pool of instance 1 beyond 65535: refused before any counting
    stride = services[0].stride
    expected = bitset_admissible_same_stride(services, stride, limit)
    assert _admissible_same_stride(services, stride, limit) == expected
    if expected is not None:
        assert expected[0] == brute_force_admissible(services, limit)


def test_counted_nouns_are_singular_for_one() -> None:
    """Counts of one read "1 instance", never "1 instances" (nor "1 more overlaps")."""
    from portpool._layout_checks import _compact, count_admissible

    # 7 services sharing a port are 21 pairs: one more than the 20 shown in full.
    services = {f"s{i}": {"base": 20000, "size": 1} for i in range(7)}
    with pytest.raises(LayoutError) as info:
        parse_layout({"app": "a", "services": services}, "one.toml")
    assert info.value.errors[-1] == "one.toml: services: ... and 1 more overlap"
    layout = parse_layout({"app": "a", "services": {"s": {"base": 20000, "size": 1}}}, "x")
    assert count_admissible(layout.services, 1) == (1, "portpool allows at most 1 instance")
    assert count_admissible(layout.services, 2)[1] == "portpool allows at most 2 instances"
    runs = [(p, p) for p in range(0, 14, 2)]
    assert _compact(runs).endswith("... (1 more range)")
    assert _compact([*runs, (20, 20)]).endswith("... (2 more ranges)")


def _ready_layout_text(ready: str) -> str:
    return f'app = "a"\n[services.x]\nbase = 20000\nsize = 1\nready = "{ready}"\n'


def _ready_layout(tmp_path: Path, ready: str) -> str:
    return write(tmp_path, _ready_layout_text(ready))


@pytest.mark.parametrize(
    ("ready", "problem"),
    [
        ("http://127.0.0.1:8000/health", "give the path only, e.g. 'http:/health'"),
        ("http://localhost/", "give the path only, e.g. 'http:/health'"),
        ("http://x", "give the path only, e.g. 'http:/health'"),
        ("http:/health#top", "the path must have no '#fragment'"),
    ],
)
def test_an_http_ready_path_that_cannot_be_sent_is_refused(
    tmp_path: Path, ready: str, problem: str
) -> None:
    """A URL (or a fragment) passed validation and was sent as the path ("//host:port/..."):
    a 404 until ready_timeout_s, exit 5, instead of a layout error before anything starts."""
    with pytest.raises(LayoutError) as info:
        load_layout(_ready_layout(tmp_path, ready))
    assert info.value.key == "services.x.ready"
    assert problem in info.value.problem
    assert load_layout(_ready_layout(tmp_path, "http:/a//b?c=d")).services[0].ready


def test_a_maximum_above_portpools_own_limit_says_so(tmp_path: Path) -> None:
    """Pools that fit more than INSTANCE_LIMIT instances: the maximum is refused for the
    limit, not with "at most 1000 instances keep every pool disjoint" (they keep more)."""
    error = refused(tmp_path, f"max_instances = {INSTANCE_LIMIT + 1}\n" + GOOD)
    assert error.key == "max_instances"
    assert error.problem == (
        f"is {INSTANCE_LIMIT + 1} but portpool allows at most {INSTANCE_LIMIT} instances"
    )
    assert load_layout(write(tmp_path, f"max_instances = {INSTANCE_LIMIT}\n" + GOOD))


def test_a_path_object_is_kept_as_a_string(tmp_path: Path) -> None:
    """load_layout(Path(...)) kept the Path as ``source``: the layout's JSON document
    (``portpool layout --json``) failed to encode, and errors carried a Path as file."""
    from portpool._layout_document import layout_document

    path = Path(write(tmp_path, GOOD))
    for layout in (load_layout(path), resolve_layout(path), resolve_layout(None, tmp_path)):
        assert type(layout.source) is str
        assert json.loads(json.dumps(layout_document(layout)))["source"] == layout.source
    assert load_layout(path) == load_layout(str(path))
    bad = Path(write(tmp_path, 'app = "a"\n', "bad.toml"))
    with pytest.raises(LayoutError) as info:
        load_layout(bad)
    assert info.value.file == str(bad)


def test_an_unknown_key_names_the_key_it_is_probably(tmp_path: Path) -> None:
    """A typo (``comand``, ``readyy``, ``Base``) or a key at the wrong level is named:
    "unknown key" alone left the reader to compare it with the list by eye."""
    error = refused(
        tmp_path,
        "stride = 100\nmax_instance = 2\n"
        + GOOD
        + 'comand = ["x"]\nreadyy = "tcp"\nBase = 3\nshield_interval = 1\n',
    )
    problems = {line.split(": ")[1]: line for line in error.errors}
    assert "(it belongs in a [services.NAME] table)" in problems["stride"]
    assert "(did you mean 'max_instances'?)" in problems["max_instance"]
    assert "(did you mean 'command'?)" in problems["services.api.comand"]
    assert "(did you mean 'ready'?)" in problems["services.api.readyy"]
    assert "(did you mean 'base'?)" in problems["services.api.Base"]
    assert "(it belongs at the top of the file" in problems["services.api.shield_interval"]
    assert all("unknown key" in line for line in error.errors)


@pytest.mark.skipif(sys.platform == "win32", reason="a removed working directory is POSIX's")
@pytest.mark.parametrize("command", [["layout"], ["status"], ["doctor"], ["layout", "--json"]])
def test_a_removed_working_directory_is_not_the_built_in_layout(
    tmp_path: Path, home: Path, command: list[str]
) -> None:
    """In a directory that was removed, layout and status showed the built-in app (and
    its instances) as if there were no ./portpool.toml, while run said the directory was
    gone: every command now says so (exit 2)."""
    from tests.helpers import PORTPOOL

    gone = tmp_path / "gone"
    gone.mkdir()
    in_gone = ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone)]
    done = subprocess.run(
        [*in_gone, *PORTPOOL, *command], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "the current directory no longer exists" in done.stderr
    assert "qwen-valencia" not in done.stdout


def test_a_missing_directory_to_look_in_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError) as info:
        resolve_layout(None, str(tmp_path / "nowhere"))
    assert info.value.exit_code == 2
    assert (
        str(info.value)
        == f"{tmp_path / 'nowhere'}: is not a directory: no portpool.toml to look for"
    )
    assert resolve_layout(None, str(tmp_path)) is default_layout()


def test_an_instance_number_is_an_int_named_as_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``True`` passed the range check (it is 1) and failed later as a ValueError; the
    Python entry point said "--instance", an option its caller never typed."""
    from portpool import get_service_port_pool
    from portpool.errors import UsageError

    layout = default_layout()
    for bad in (True, 0, 11):
        with pytest.raises(UsageError, match=rf"^--instance must be 1\.\.10 .*not {bad!r}$"):
            layout.check_number(bad)
    layout.check_number(10)
    write(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"^instance must be 1\.\.1000 for app 'demo', not 0$"):
        get_service_port_pool("web", 0)
    assert get_service_port_pool("web", 2) == [20010, 20011, 20012]


def test_a_stride_smaller_than_the_size_warns(tmp_path: Path) -> None:
    """Pools of consecutive instances that overlap admit one instance: only the limit
    said so before, and a second `up` got "no free instance slot" without a warning."""
    path = write(tmp_path, 'app = "a"\n[services.api]\nbase = 20000\nsize = 5\nstride = 3\n')
    layout = load_layout(path)
    assert layout.max_instances == 1
    expected = (
        f"{path}: services.api: stride 3 is smaller than size 5: each instance's pool "
        "overlaps the next one's, so only 1 instance fits; make stride at least 5 "
        "(stride = 0 means one instance on purpose)"
    )
    assert layout.warnings == (expected,)
    assert expected in layout_warnings(layout)
    shown = subprocess.run(
        [sys.executable, "-m", "portpool.cli", "layout", "--config", path],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"warning: {expected}" in shown.stdout.splitlines()
    for stride in (0, 5, 100):  # one instance on purpose, or pools that never overlap
        text = f'app = "a"\n[services.api]\nbase = 20000\nsize = 5\nstride = {stride}\n'
        assert load_layout(write(tmp_path, text)).warnings == ()


def test_text_that_is_not_utf8_is_located_and_utf16_is_named(tmp_path: Path) -> None:
    """The line alone was given; a UTF-16 file (Windows PowerShell's `>`) read as "line 1:
    is not valid UTF-8 text", which did not say what to do."""
    path = tmp_path / "portpool.toml"
    path.write_bytes(b'app = "a"\n[services.x]\nbase = 1\nsize = 1 # caf\xe9\n')
    with pytest.raises(LayoutError) as info:
        load_layout(str(path))
    assert (info.value.key, info.value.problem) == ("line 4, column 15", "is not valid UTF-8 text")
    for encoding in ("utf-16", "utf-16-be"):
        bom = "\ufeff" if encoding == "utf-16-be" else ""  # utf-16 writes its own
        path.write_bytes((bom + GOOD).encode(encoding))
        with pytest.raises(LayoutError) as info:
            load_layout(str(path))
        assert info.value.problem.startswith("is UTF-16 text"), encoding
        assert "save it as UTF-8" in info.value.problem


def test_a_key_with_a_control_character_stays_on_its_error_line(tmp_path: Path) -> None:
    """A quoted key with a newline split its error line in two, and the CLI (which
    escapes each line) printed "FILE: services.a" and "b: service name ..." as two."""
    error = refused(
        tmp_path,
        'app = "a"\n"top\\nkey" = 1\n[services."a\\nb"]\nbase = 20000\nsize = 1\n'
        '[services.c]\nbase = 20010\nsize = 1\n"x\\u001b[31m" = 2\n',
    )
    assert error.errors == [
        f"{error.file}: top\\nkey: unknown key; expected one of: app, host, "
        "heartbeat_interval, shield_interval, max_instances, services",
        f"{error.file}: services.a\\nb: service name 'a\\nb' must be 1-64 letters, digits, "
        "'.', '_' or '-', all ASCII, starting with a letter or digit",
        f"{error.file}: services.c.x\\x1b[31m: unknown key; expected one of: base, size, "
        "stride, command, socket, restart, depends_on, ready, ready_timeout_s",
    ]
    assert error.key == "top\nkey"  # the attribute keeps the key as the file spelled it
    with pytest.raises(LayoutError) as info:
        default_layout().service("a\nb")
    assert str(info.value).count("\n") == 0


def test_the_layout_text_shows_control_characters_escaped(tmp_path: Path) -> None:
    """`portpool layout` printed a ready pattern's ESC and BEL raw to the terminal."""
    path = write(
        tmp_path,
        'app = "a"\n[services.api]\nbase = 20000\nsize = 1\ncommand = ["x"]\n'
        'ready = "log:\\u001b\\\\[32mready\\u0007"\n',
    )
    assert load_layout(path).services[0].ready == "log:\x1b\\[32mready\x07"
    shown = subprocess.run(
        [sys.executable, "-m", "portpool.cli", "layout", "--config", path],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "service api: ready log:\\x1b\\[32mready\\x07 within 30 s" in shown.stdout
    assert all(line.isprintable() for line in shown.stdout.splitlines())


def test_a_layout_made_in_python_is_not_called_the_built_in_one() -> None:
    made = Layout("mine", (Service("web", 20000, 2),))
    assert describe_layout(made)[1] == "layout: made in Python, not read from a file"
    assert describe_layout(default_layout())[1] == "layout: built-in default layout"


def test_dependency_checks_stay_bounded_whatever_the_file(tmp_path: Path) -> None:
    """20,000 names in one depends_on took 5 s (a quadratic duplicate check) and printed
    20,000 lines; names that are not services each repeated the list of all services."""
    many = ", ".join(f'"d{i}"' for i in range(20000))
    error = refused(
        tmp_path, f'app = "a"\n[services.api]\nbase = 20000\nsize = 1\ndepends_on = [{many}]\n'
    )
    assert error.errors == [
        f"{error.file}: services.api.depends_on: names 20000 services; a layout has at most 1000"
    ]
    services = {f"s{i}": {"base": 20000 + i, "size": 1, "depends_on": [f"x{i}"]} for i in range(30)}
    with pytest.raises(LayoutError) as info:
        parse_layout({"app": "a", "services": services}, "f.toml")
    lines = info.value.errors
    assert len(lines) == 21
    assert lines[0] == (
        "f.toml: services.s0.depends_on: depends on 'x0', which is not a service; known: "
        + ", ".join(f"s{i}" for i in range(20))
        + ", ... (10 more)"
    )
    assert (
        lines[-1] == "f.toml: services.s20.depends_on: ... and 10 more names that are not services"
    )
    bounded = {
        f"s{i}": {"base": 20000 + i, "size": 1, "depends_on": ["s0"] * 1000} for i in range(1, 3)
    }
    with pytest.raises(LayoutError, match=r"depends_on\[999\]: names 's0' twice"):
        parse_layout({"app": "a", "services": {"s0": {"base": 1024, "size": 1}, **bounded}}, "f")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("a{99999999999}", "the repetition number is too large"),
        ("(" * 5000 + ")" * 5000, "maximum recursion depth exceeded"),
    ],
)
def test_a_log_pattern_re_cannot_compile_is_a_layout_error(
    tmp_path: Path, pattern: str, problem: str
) -> None:
    """re.compile raised OverflowError and RecursionError, not re.error: a traceback."""
    error = refused(tmp_path, _ready_layout_text(f"log:{pattern}"))
    assert error.key == "services.x.ready"
    assert error.problem.startswith("invalid regular expression ")
    assert problem in error.problem
    assert len(error.problem) < 200


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32-le", "UTF-32"),
     ("utf-32-be", "UTF-32"), ("utf-32", "UTF-32")],
)  # fmt: skip
def test_a_file_in_a_wide_encoding_is_named_with_or_without_a_byte_order_mark(
    tmp_path: Path, encoding: str, name: str
) -> None:
    """ASCII in UTF-16 without a byte order mark is valid UTF-8 (NUL between the
    letters): it read as "line 1, column 2: invalid TOML: Expected '='"; UTF-32's mark
    (FF FE 00 00 starts like UTF-16's) was called UTF-16."""
    path = tmp_path / "portpool.toml"
    path.write_bytes(GOOD.encode(encoding))
    with pytest.raises(LayoutError) as info:
        load_layout(str(path))
    assert info.value.key == "<document>"
    assert info.value.problem.startswith(f"is {name} text ("), info.value.problem
    assert info.value.problem.endswith("save it as UTF-8")


# Every public call that takes a layout, as a user calls it (``state`` where it takes one).
_TAKES_A_LAYOUT: dict[str, Callable[[Any, StateDir], object]] = {
    "run_command": lambda layout, state: portpool.run_command(layout, ["true"]),
    "run_up": lambda layout, state: portpool.run_up(layout),
    "start_detached": lambda layout, state: portpool.start_detached(layout, state=state),
    "start_instance": lambda layout, state: portpool.start_instance(layout, state=state),
    "examine_layout": lambda layout, state: portpool.examine_layout(layout, state=state),
    "examine_layout_of_one_service": lambda layout, state: portpool.examine_layout(
        layout, state=state, service="a"
    ),
    "layout_warnings": lambda layout, state: portpool.layout_warnings(layout),
    "find_instance": lambda layout, state: portpool.find_instance(layout, state=state),
    "service_port": lambda layout, state: portpool.service_port(layout, "a", state=state),
    "instance_env": lambda layout, state: portpool.instance_env(layout, state=state),
    "stop_instances": lambda layout, state: portpool.stop_instances(layout, state=state),
    "follow_log": lambda layout, state: portpool.follow_log(layout, print, state=state),
}


@pytest.mark.parametrize("name", sorted(_TAKES_A_LAYOUT))
def test_a_path_given_for_a_layout_is_a_type_error_that_says_how_to_read_one(
    name: str, tmp_path: Path, state: StateDir
) -> None:
    """``run_command("portpool.toml", ...)`` raised "AttributeError: 'str' object has no
    attribute 'descriptors_needed'" from deep inside, as did every call here but
    ``start_instance``."""
    path = tmp_path / "portpool.toml"
    path.write_text('app = "x"\n[services.a]\nbase = 20000\nsize = 1\n')
    wrong: list[object] = [str(path), path, {"app": "x"}]
    if name != "start_instance":  # None: its default layout
        wrong.append(None)
    for layout in wrong:
        with pytest.raises(TypeError, match=r"layout must be a Layout \(load_layout\(path\)"):
            _TAKES_A_LAYOUT[name](layout, state)
    assert not (Path(state.path) / "apps").exists()  # nothing was started or written


# Every public call that takes an instance number, given one as a str.
_TAKES_A_NUMBER: dict[str, Callable[[Any, StateDir], object]] = {
    "find_instance": lambda layout, state: portpool.find_instance(layout, "1", state=state),
    "stop_instances": lambda layout, state: portpool.stop_instances(layout, "1", state=state),
    "service_port": lambda layout, state: portpool.service_port(layout, "a", "1", state=state),
    "instance_env": lambda layout, state: portpool.instance_env(layout, "1", state=state),
    "follow_log": lambda layout, state: portpool.follow_log(layout, print, number="1", state=state),
}


@pytest.mark.parametrize("name", sorted(_TAKES_A_NUMBER))
def test_an_instance_number_given_as_a_str_is_a_usage_error(
    name: str, tmp_path: Path, state: StateDir
) -> None:
    """``find_instance(layout, "1")`` raised "'>' not supported between instances of
    'str' and 'int'" (a TypeError from a compare deep inside)."""
    path = tmp_path / "portpool.toml"
    path.write_text('app = "x"\n[services.a]\nbase = 20000\nsize = 1\n')
    with pytest.raises(portpool.UsageError, match=r"must be 1\.\.\d+ for app 'x', not '1'"):
        _TAKES_A_NUMBER[name](portpool.load_layout(str(path)), state)
