"""Serving a portpool socket: receiving passed sockets, and helpers for Python servers.

Each server library is imported only inside its helper, so ``import portpool`` stays light.
"""

from __future__ import annotations

from portpool.integrations.fds import LISTEN_FDS_START, listen_fds, listen_socket

__all__ = ["LISTEN_FDS_START", "listen_fds", "listen_socket"]
