"""The layout as one JSON-ready document (``portpool layout --json``), for scripts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from portpool._host_warnings import layout_warnings
from portpool.layout import Layout

__all__ = ["layout_document"]


def layout_document(layout: Layout, more_warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The layout as one JSON-ready object: settings, services, every admissible
    instance's pools, warnings (this host's, then ``more_warnings``)."""
    return {
        "app": layout.app,
        "source": layout.source,
        "host": layout.host,
        "heartbeat_interval": layout.heartbeat_interval_s,
        "shield_interval": layout.shield_interval_s,
        "max_instances": layout.max_instances,
        "admissible_instances": layout.admissible_instances,
        "limit_reason": layout.limit_reason,
        "services": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
            for s in layout.services
        ],
        "instances": [
            {"number": n, "pools": layout.pools(n)} for n in range(1, layout.max_instances + 1)
        ],
        "warnings": [*layout_warnings(layout), *more_warnings],
    }
