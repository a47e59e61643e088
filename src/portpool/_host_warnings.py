"""A layout's warnings on this host: its own, and those that depend on the machine.

A ``Layout`` is a value: its ``warnings`` are the same on every machine (ports below
1024, on browsers' unsafe-port list). Whether a pool lies inside the OS's ephemeral port
range depends on the host (``/proc`` on Linux, a ``sysctl`` run on macOS), so it is
asked here, where commands show warnings, and never when a layout is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from portpool._layout_checks import port_warnings
from portpool._platform import ephemeral_port_range

if TYPE_CHECKING:
    from portpool.layout import Layout

__all__ = ["layout_warnings"]


def layout_warnings(layout: Layout) -> tuple[str, ...]:
    """Every warning about ``layout``'s ports on this host, as ``FILE: services.S: ...``
    lines, one per service and kind, in the layout's service order: ``layout.warnings``
    plus pools inside this host's ephemeral port range (any outgoing connection may take
    those ports), then a ``host`` this machine does not have (every bind would fail;
    ``::1`` on a host without IPv6). Reads the range each call (a ``sysctl`` subprocess
    on macOS); raises TypeError for a ``layout`` that is no Layout, nothing else (a
    range the OS does not tell gives no such warning).
    """
    from portpool.layout import host_is_literal_remote, normalize_host, require_layout

    require_layout(layout)
    warnings = port_warnings(
        layout.source, layout.services, layout.max_instances, ephemeral_port_range()
    )
    # Only then a socket is needed to tell (::1: a host without IPv6 has none).
    if host_is_literal_remote(layout.host) or normalize_host(layout.host) == "::1":
        from portpool._addresses import host_warning

        warnings.extend(filter(None, [host_warning(layout.host)]))
    return tuple(warnings)
