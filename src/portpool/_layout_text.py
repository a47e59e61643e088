"""Layouts in words for people: what ``portpool layout`` prints and what a host covers.

Presentation only: nothing here validates a layout or asks the machine anything
(``portpool._addresses.host_warning`` and ``portpool._host_warnings`` do, and their
answers are passed in).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from portpool._layout_checks import span
from portpool._layout_fields import normalize_host
from portpool._text import printable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from portpool.layout import Layout


def host_meaning(host: str) -> str:
    """One line saying which addresses a lease on ``host`` covers (for ``layout``), for
    the host's canonical spelling (``::0`` is ``::``)."""
    host = normalize_host(host)
    if host == "localhost":
        # True on every machine (a layout is a value): the IPv6-only case and a host
        # without IPv6 are said too (it read "127.0.0.1, served" where ::1 was).
        return (
            "127.0.0.1 served and ::1 held bound (where this host has IPv6): no one else "
            "listens there; the other way round where localhost resolves to ::1 alone"
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


def host_is_literal_remote(host: str) -> bool:
    """Whether ``host`` is an IP address other than a loopback or wildcard one: only
    such a host can be missing from this machine (``_addresses.host_warning`` asks)."""
    try:
        ip = ipaddress.ip_address(normalize_host(host))
    except ValueError:
        return False  # localhost, or a name: it resolves at start
    return not (ip.is_loopback or ip.is_unspecified)


def describe_layout(layout: Layout, warnings: Sequence[str] | None = None) -> list[str]:
    """The lines ``portpool layout`` prints: settings, every admissible instance's
    pools, then ``warnings`` (default: ``layout.warnings``; ``portpool layout`` passes
    what this machine adds, from ``layout_warnings`` and ``_addresses.host_warning``: a
    layout itself never asks the machine)."""
    origin = layout.source
    if origin == "<default>":  # not read from a file: the built-in one, or made in Python
        from portpool.layout import default_layout

        built_in = layout.same_as(default_layout())
        origin = "built-in default layout" if built_in else "made in Python, not read from a file"
    hb = f"{layout.heartbeat_interval_s:g}"
    sh = f"{layout.shield_interval_s:g}"
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
    lines.extend(f"warning: {w}" for w in (layout.warnings if warnings is None else warnings))
    # A file's name and its ready patterns may hold control characters: printed raw, an
    # ESC in `ready = "log:..."` reached the terminal.
    return [printable(line) for line in lines]


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
