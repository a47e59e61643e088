"""Running commands and services on an instance: the supervisor layer's public names.

``run_command()`` (``portpool run``) and ``run_up()`` (``portpool up``) are the
library calls behind the two commands; the CLI and other code import them from here.
Where each concern lives:

- ``portpool._processes``: ``Supervisor``, the processes started for one instance,
  each with its whole tree (start with sockets, wait, stop), and ``Outcome``;
- ``portpool._run``: ``run_command``, one command and its signals;
- ``portpool._up``: ``run_up``, every service held until a signal or a failure;
- ``portpool._services``: ``up``'s services under a Supervisor (keepers, rolling
  restarts), loaded only by ``run_up``;
- ``portpool._launch``: starting one process through the exec shim
  (``portpool._spawn``), its output, and who still holds a port;
- ``portpool._keeper``, ``portpool._readiness``, ``portpool._restart``,
  ``portpool._order``: one service's life, its readiness probe, its restart policy
  and the start order; ``portpool._relay``: the signals of ``run`` and ``up``.
"""

from __future__ import annotations

from portpool._launch import (
    DEFAULT_GRACE_S,
    base_environment,
    describe_status,
    exit_status,
    find_program,
    spawn,
)
from portpool._processes import Outcome, Supervisor
from portpool._run import run_command
from portpool._up import run_up

__all__ = [
    "DEFAULT_GRACE_S",
    "Outcome",
    "Supervisor",
    "base_environment",
    "describe_status",
    "exit_status",
    "find_program",
    "run_command",
    "run_up",
    "spawn",
]
