"""The library face of the commands that act on a running instance from another
terminal (``port``, ``env``, ``stop``, ``logs``, ``up --detach``), for programs that
manage instances themselves.

Each concern lives in its own module: which instance, its port and environment in
``_find``; stopping in ``_stop``; detached logs in ``_logs``; starting detached in
``_detach``. Everything reads the state dir and never trusts a record alone.
"""

from __future__ import annotations

from portpool._detach import Detached, start_detached
from portpool._find import check_number, find_instance, format_env, instance_env, service_port
from portpool._logs import follow_log, log_path
from portpool._stop import Stopped, stop_instances

__all__ = [
    "Detached",
    "Stopped",
    "check_number",
    "find_instance",
    "follow_log",
    "format_env",
    "instance_env",
    "log_path",
    "service_port",
    "start_detached",
    "stop_instances",
]
